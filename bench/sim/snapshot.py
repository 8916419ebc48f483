"""The queue state a simulated replica publishes, read straight from its scheduler's queues.

The same numbers as ``Scheduler.stats()`` (what the engine publishes and the router turns into a
:class:`~router.placement.ReplicaLoad`), with the same floating-point operations as
:class:`~replicas.scheduler.view.SchedulerView`, without building a view or per-request dicts:
the simulated router reads it after every published state.
"""

from __future__ import annotations

from replicas.scheduler.core import Scheduler
from replicas.scheduler.request import Request

Items = tuple[tuple[float, float], ...]  # (deadline, predicted remaining s)


def queue_snapshot(sched: Scheduler, now: float) -> tuple[Items, Items, float]:
    """``(queued, running, running_remaining_s)`` of ``sched`` at ``now``: ``(deadline,
    predicted_remaining_s)`` of waiting, partly prefilled and suspended requests, of the running
    batch's members, and that batch's predicted remaining seconds (``stats.batch_remaining_s``)."""
    q = sched._q  # noqa: SLF001 - the fields Scheduler.stats() publishes
    pred = q.predicted
    queued = []
    for r in q.waiting.values():  # never started: executed_s is all there is (SchedulerView.executed)
        p = pred.get(r.request_id)
        if p is None or r.batch_id is not None:
            queued.append((r.arrival_s + r.ttft_slo_s, remaining(sched, r, now)))
        else:
            x = p - r.executed_s
            queued.append((r.arrival_s + r.ttft_slo_s, 0.0 if x < 0.0 else x))
    if q.partial:
        queued.extend((r.arrival_s + r.ttft_slo_s, remaining(sched, r, now)) for r in q.partial.values())
    for b in q.suspended.values():
        queued.extend((r.arrival_s + r.ttft_slo_s, remaining(sched, r, now)) for r in b.requests)
    running = q.running
    if running is None:
        return tuple(queued), (), 0.0
    members = tuple((r.arrival_s + r.ttft_slo_s, remaining(sched, r, now)) for r in running.requests)
    left = sched.cost_model.predict_ranges(running.range_list()) - running.executed_s - running.open_s(now)
    return tuple(queued), members, 0.0 if left < 0.0 else left


def remaining(sched: Scheduler, r: Request, now: float) -> float:
    """``SchedulerView.predicted_remaining(r)`` at ``now``: ``max(predicted - executed, 0)``."""
    q = sched._q  # noqa: SLF001
    p = q.predicted.get(r.request_id)
    if p is None:
        p = sched.cost_model.predict_suffix(r.num_prompt_tokens - r.cached_tokens, r.cached_tokens)
    e = r.executed_s
    if r.batch_id is not None:  # SchedulerView.executed: add the open interval of its program
        b = q.find(r.batch_id)
        if b is not None:
            e = e + b.open_s(now)
    x = p - e
    return 0.0 if x < 0.0 else x  # max(x, 0.0)
