"""Predicted-work accounting: admission control, queue state for the router, pass timings."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from replicas.scheduler.request import Request
from replicas.scheduler.urgent_reserve import MAX_SHARE
from replicas.scheduler.view import Batch, SchedulerView


class Refusal(NamedTuple):
    """An admission refusal: the reason (for the client) and when a retry may succeed (seconds)."""

    reason: str
    retry_after_s: float


def late_refusal(view: SchedulerView, request: Request, predicted_s: float, late_factor: float = 1.0,
                 reserved_share: float = 0.0) -> Refusal | None:
    """The :class:`Refusal` of a ``request`` predicted to miss its TTFT SLO by more than ``late_factor``.

    Work ahead of it: the predicted remaining prefill time of every queued, running or suspended
    request that the scheduler's slack-gated EDF order runs first: feasible work with a deadline not
    later than its own (and, if it is itself infeasible, all feasible work and earlier late work);
    work already past hope runs after it.  ``reserved_share`` is the capacity that more urgent
    classes are predicted to take while it waits (:mod:`replicas.scheduler.urgent_reserve`): the
    work ahead and its own run at ``1 - reserved_share`` of the replica.  It is refused when
    ``now + (ahead + predicted_s) / (1 - reserved_share)`` exceeds ``arrival + late_factor *
    ttft_slo`` (1.0: its deadline), or when the share reaches :data:`MAX_SHARE`; a retry may succeed
    once the excess has drained.
    """
    own = (request.deadline - view.now - predicted_s <= 0.0, request.deadline)
    ahead = 0.0
    for r in view.prefill_requests():
        late, deadline = view.key(r)[:2]
        if (late, deadline) <= own:
            ahead += view.predicted_remaining(r)
    limit = f"{late_factor:g} x " if late_factor != 1.0 else ""
    if reserved_share >= MAX_SHARE:
        return Refusal(f"more urgent classes are offering {reserved_share:.0%} of this replica's prefill capacity; "
                       f"the {request.ttft_slo_s:.3f}s TTFT SLO cannot be met beside them", request.ttft_slo_s)
    finish = view.now + (ahead + predicted_s) / (1.0 - max(reserved_share, 0.0))
    excess = finish - request.arrival_s - late_factor * request.ttft_slo_s
    if excess <= 0.0:
        return None
    kept = f", {reserved_share:.0%} of capacity kept for more urgent classes" if reserved_share > 0.0 else ""
    return Refusal(
        f"predicted TTFT {finish - request.arrival_s:.3f}s exceeds {limit}the {request.ttft_slo_s:.3f}s TTFT SLO "
        f"({ahead:.3f}s of earlier-deadline prefill work ahead, {predicted_s:.3f}s for this prompt{kept})",
        excess,
    )


def pending_work_s(view: SchedulerView) -> float:
    """Predicted seconds of all prefill work on the replica: running and suspended programs, queue."""
    running = batch_remaining_s(view, view.running) if view.running is not None else 0.0
    suspended = sum(batch_remaining_s(view, b) for b in view.suspended.values())
    queued = sum(view.predicted_remaining(r) for r in view.queued())
    return running + suspended + queued + sum(view.predicted_remaining(r) for r in view.deferred)


def batch_remaining_s(view: SchedulerView, batch: Batch) -> float:
    """Predicted seconds left in ``batch``'s program: ``predict_ranges(its slices) - executed``."""
    total = view.cost_model.predict_ranges(batch.range_list())
    return max(total - batch.executed_s - batch.open_s(view.now), 0.0)


@dataclass(frozen=True)
class QueueEntry:
    """One unfinished prefill in a queue-state snapshot (``deadline``: the clock the events carry)."""

    request_id: str
    deadline: float
    predicted_remaining_s: float
    remaining_tokens: int = 0
    slack_s: float | None = None


@dataclass(frozen=True)
class QueueStats:
    """The scheduler's queue state at ``now``, for the router and the engine's published snapshot.

    ``waiting`` / ``running`` / ``suspended`` (preempted batches and partly prefilled requests) list
    each request's deadline, remaining tokens, predicted remaining seconds
    (``max(predict(prompt) - executed, 0)``) and slack. ``running_remaining_s`` is the running
    program's predicted remaining time (batched); ``pending_work_s`` adds the suspended programs'
    and the queued requests'. The counters are the scheduler's since it started.
    """

    now: float
    waiting: tuple[QueueEntry, ...] = ()
    running: tuple[QueueEntry, ...] = ()
    suspended: tuple[QueueEntry, ...] = ()
    running_batch_id: int | None = None
    running_remaining_s: float = 0.0
    suspended_batches: int = 0
    pending_work_s: float = 0.0
    decoding: int = 0
    policy: str = ""
    finished: int = 0
    aborted: int = 0
    rejected: int = 0
    scheduling_passes: int = 0
    preemptions: int = 0
    memory_blocked: bool = False
    cost_scale: float = 1.0

    @property
    def counts(self) -> dict[str, int]:
        """Requests per state (decoding ones included)."""
        return {"waiting": len(self.waiting), "running": len(self.running), "suspended": len(self.suspended),
                "decoding": self.decoding}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (entries as dicts, ``counts`` added)."""
        return {**asdict(self), "counts": self.counts}


def _entry(view: SchedulerView, r: Request) -> QueueEntry:
    return QueueEntry(r.request_id, r.deadline, view.predicted_remaining(r), r.remaining_tokens, view.slack(r))


def queue_stats(view: SchedulerView, *, decoding: int, per_request: bool = True) -> QueueStats:
    """The :class:`QueueStats` of ``view`` (entries left out unless ``per_request``; counters unset)."""
    running = view.running
    running_rem = batch_remaining_s(view, running) if running is not None else 0.0
    if not per_request:
        return QueueStats(view.now, running_batch_id=None if running is None else running.batch_id,
                          running_remaining_s=running_rem, suspended_batches=len(view.suspended),
                          pending_work_s=pending_work_s(view), decoding=decoding)
    suspended_reqs = [*view.partial, *(r for b in view.suspended.values() for r in b.requests)]
    running_reqs = running.requests if running is not None else []
    return QueueStats(
        view.now,
        waiting=tuple(_entry(view, r) for r in (*view.waiting, *view.deferred)),
        running=tuple(_entry(view, r) for r in running_reqs),
        suspended=tuple(_entry(view, r) for r in suspended_reqs),
        running_batch_id=None if running is None else running.batch_id,
        running_remaining_s=running_rem,
        suspended_batches=len(view.suspended),
        pending_work_s=pending_work_s(view),
        decoding=decoding,
    )


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def pass_summary(durations: Iterable[float]) -> dict[str, float | int]:
    """``passes``, ``mean_s``, ``median_s``, ``p99_s``, ``max_s`` (zeros when empty)."""
    xs = sorted(durations)
    if not xs:
        return {"passes": 0, "mean_s": 0.0, "median_s": 0.0, "p99_s": 0.0, "max_s": 0.0}
    return {
        "passes": len(xs),
        "mean_s": sum(xs) / len(xs),
        "median_s": _quantile(xs, 0.5),
        "p99_s": _quantile(xs, 0.99),
        "max_s": xs[-1],
    }
