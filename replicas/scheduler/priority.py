"""Slack-gated EDF ordering (the paper's priority).

``slack = (deadline - now) - max(predicted_total - executed, 0)``. Feasible requests
(``slack > 0``) come first, earliest deadline first; infeasible ones follow, also EDF. Ties go
to the lower ``priority`` value, then the earlier arrival, then the request id (deterministic).
A batch's key is its best member's key.
"""

from __future__ import annotations

from collections.abc import Iterable

from replicas.scheduler.request import Request

PriorityKey = tuple[bool, float, int, float, str]


def slack(req: Request, now: float, predicted_total_s: float, executed_s: float) -> float:
    """Seconds to spare if ``req``'s remaining prefill ran alone from ``now``."""
    remaining = predicted_total_s - executed_s
    return (req.deadline - now) - (remaining if remaining > 0.0 else 0.0)


def priority_key(req: Request, slack_s: float) -> PriorityKey:
    """Sort key: smaller is more urgent."""
    return (slack_s <= 0.0, req.deadline, req.priority, req.arrival_s, req.request_id)


def best_key(keys: Iterable[PriorityKey]) -> PriorityKey | None:
    """The most urgent of ``keys`` (None when empty)."""
    return min(keys, default=None)
