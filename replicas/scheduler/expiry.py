"""Which queued work is too old to serve: the scheduler's late-work expiry (``late_reject_factor``).

Work already older than ``factor`` times its TTFT SLO is refused:

* waiting (and deferred) requests, whose prefill never started: admission would refuse them now,
  and serving them only delays work that can still make its deadline (after an overload, such a
  backlog kept the replica late);
* suspended batches whose every member is that old, and partly prefilled requests that old:
  slack-gated EDF runs them after all feasible work, so after a burst they stayed suspended for
  good, and at ``max_suspended_batches`` of them no urgent arrival could preempt again. Their
  programs are dropped and their KV freed (by the scheduler, :meth:`Scheduler._expire_hopeless`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from replicas.scheduler.queues import Queues
from replicas.scheduler.request import Request
from replicas.scheduler.view import Batch


@dataclass
class Hopeless:
    """The work :func:`find_hopeless` picked: never started, started (partial or in ``batches``)."""

    waiting: list[Request] = field(default_factory=list)
    started: list[Request] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)


def find_hopeless(q: Queues, factor: float, now: float) -> Hopeless:
    """The queued work of ``q`` older than ``factor`` times its TTFT SLO at ``now``."""

    def old(r: Request) -> bool:
        return now - r.arrival_s > factor * r.ttft_slo_s

    out = Hopeless(waiting=[r for r in (*q.waiting.values(), *q.deferred.values()) if old(r)],
                   started=[r for r in q.partial.values() if old(r)])
    for batch in q.suspended.values():
        if all(old(r) for r in batch.requests):
            out.batches.append(batch)
            out.started += batch.requests
    return out
