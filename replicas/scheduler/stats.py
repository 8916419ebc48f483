"""Predicted-work accounting: admission control, queue state for the router, pass timings."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

from replicas.scheduler.request import Request
from replicas.scheduler.view import Batch, SchedulerView


class Refusal(NamedTuple):
    """An admission refusal: the reason (for the client) and when a retry may succeed (seconds)."""

    reason: str
    retry_after_s: float


def late_refusal(view: SchedulerView, request: Request, predicted_s: float, late_factor: float = 1.0) -> Refusal | None:
    """The :class:`Refusal` of a ``request`` predicted to miss its TTFT SLO by more than ``late_factor``.

    Work ahead of it: the predicted remaining prefill time of every queued, running or suspended
    request that the scheduler's slack-gated EDF order runs first: feasible work with a deadline not
    later than its own (and, if it is itself infeasible, all feasible work and earlier late work);
    work already past hope runs after it.  It is refused when ``now + ahead + predicted_s`` exceeds
    ``arrival + late_factor * ttft_slo`` (1.0: its deadline); a retry may succeed once the excess
    has drained.
    """
    own = (request.deadline - view.now - predicted_s <= 0.0, request.deadline)
    ahead = 0.0
    for r in view.prefill_requests():
        late, deadline = view.key(r)[:2]
        if (late, deadline) <= own:
            ahead += view.predicted_remaining(r)
    finish = view.now + ahead + predicted_s
    excess = finish - request.arrival_s - late_factor * request.ttft_slo_s
    if excess <= 0.0:
        return None
    limit = f"{late_factor:g} x " if late_factor != 1.0 else ""
    return Refusal(
        f"predicted TTFT {finish - request.arrival_s:.3f}s exceeds {limit}the {request.ttft_slo_s:.3f}s TTFT SLO "
        f"({ahead:.3f}s of earlier-deadline prefill work ahead, {predicted_s:.3f}s for this prompt)",
        excess,
    )


def pending_work_s(view: SchedulerView) -> float:
    """Predicted seconds of all prefill work on the replica: running and suspended programs, queue."""
    running = batch_remaining_s(view, view.running) if view.running is not None else 0.0
    suspended = sum(batch_remaining_s(view, b) for b in view.suspended.values())
    return running + suspended + sum(view.predicted_remaining(r) for r in view.queued())


def batch_remaining_s(view: SchedulerView, batch: Batch) -> float:
    """Predicted seconds left in ``batch``'s program: ``predict_batch(tokens) - executed``."""
    total = view.cost_model.predict_batch(batch.token_counts())
    return max(total - batch.executed_s - batch.open_s(view.now), 0.0)


def _entry(view: SchedulerView, r: Request) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "deadline": r.deadline,
        "remaining_tokens": r.remaining_tokens,
        "predicted_remaining_s": view.predicted_remaining(r),
        "slack_s": view.slack(r),
    }


def queue_stats(view: SchedulerView, *, decoding: int) -> dict[str, Any]:
    """Queue state at ``view.now`` (JSON-ready).

    ``waiting`` / ``running`` / ``suspended`` list per-request ``deadline``, ``remaining_tokens``,
    ``predicted_remaining_s`` (``max(predict(prompt) - executed, 0)``) and ``slack_s``;
    ``suspended`` covers preempted batches and partly prefilled requests. ``running_remaining_s``
    is the running program's predicted remaining time (batched), and ``pending_work_s`` adds the
    suspended programs' and the queued requests' predicted remaining time.
    """
    running = view.running
    running_rem = batch_remaining_s(view, running) if running is not None else 0.0
    suspended_reqs = [*view.partial, *(r for b in view.suspended.values() for r in b.requests)]
    running_reqs = running.requests if running is not None else []
    return {
        "now": view.now,
        "counts": {
            "waiting": len(view.waiting),
            "running": len(running_reqs),
            "suspended": len(suspended_reqs),
            "decoding": decoding,
        },
        "waiting": [_entry(view, r) for r in view.waiting],
        "running": [_entry(view, r) for r in running_reqs],
        "suspended": [_entry(view, r) for r in suspended_reqs],
        "running_batch": None
        if running is None
        else {
            "batch_id": running.batch_id,
            "request_ids": [r.request_id for r in running.requests],
            "predicted_remaining_s": running_rem,
        },
        "running_remaining_s": running_rem,
        "suspended_batches": len(view.suspended),
        "pending_work_s": pending_work_s(view),
    }


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
