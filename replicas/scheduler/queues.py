"""Where each unfinished prefill is: waiting, partial, in a suspended batch, or in the running batch.

State transitions of requests and batches live here; :mod:`~replicas.scheduler.core` decides
when they happen (events) and :mod:`~replicas.scheduler.policies` what should run.
"""

from __future__ import annotations

from replicas.decode_cadence import DecodeForecast
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.events import BatchPlan
from replicas.scheduler.request import Request, RequestState
from replicas.scheduler.view import Batch, MemoryView, SchedulerView

S = RequestState


class Queues:
    """Prefill bookkeeping of one replica plus the cached whole-prompt predictions."""

    def __init__(self) -> None:
        self.waiting: dict[str, Request] = {}  # never started, arrival order
        self.deferred: dict[str, Request] = {}  # waiting for another request to publish their shared prefix
        self.partial: dict[str, Request] = {}  # partly prefilled, no program (chunked)
        self.suspended: dict[int, Batch] = {}
        self.running: Batch | None = None
        self.predicted: dict[str, float] = {}
        self.next_batch_id = 0

    def view(self, now: float, cost_model: CostModel, memory: MemoryView,
             decode: DecodeForecast | None = None) -> SchedulerView:
        """Snapshot for a policy pass."""
        return SchedulerView(
            now=now,
            waiting=list(self.waiting.values()),
            partial=list(self.partial.values()),
            suspended=self.suspended,
            running=self.running,
            cost_model=cost_model,
            memory=memory,
            next_batch_id=self.next_batch_id,
            predicted_total=self.predicted,
            deferred=list(self.deferred.values()),
            decode=decode,
        )

    def has_pending(self) -> bool:
        """Whether any prefill work is queued or suspended."""
        return bool(self.waiting or self.partial or self.suspended or self.deferred)

    def find(self, batch_id: int) -> Batch | None:
        """The running or suspended batch ``batch_id``."""
        if self.running is not None and self.running.batch_id == batch_id:
            return self.running
        return self.suspended.get(batch_id)

    def take(self, batch_id: int) -> Batch | None:
        """Remove and return the running or suspended batch ``batch_id``."""
        if self.running is not None and self.running.batch_id == batch_id:
            batch, self.running = self.running, None
            return batch
        return self.suspended.pop(batch_id, None)

    def new_batch(self, plan: BatchPlan) -> Batch:
        """Move the plan's queued requests into a new batch (``plan.batch_id`` must be the next id)."""
        if plan.batch_id != self.next_batch_id:
            raise RuntimeError(f"policy planned batch {plan.batch_id}, expected {self.next_batch_id}")
        reqs: list[Request] = []
        for rid, (start, end) in zip(plan.request_ids, plan.ranges):
            r = self.waiting.pop(rid, None)
            if r is None:
                r = self.partial.pop(rid)
            if start != r.prefilled or end > r.num_prompt_tokens:
                raise RuntimeError(f"plan range [{start}, {end}) does not fit request {rid!r}")
            reqs.append(r)
        self.next_batch_id += 1
        return Batch(plan.batch_id, reqs, dict(zip(plan.request_ids, plan.ranges)))

    def commit(self, batch: Batch) -> None:
        """Make ``batch`` the running one (the previous one must have been displaced)."""
        assert self.running is None
        self.running, batch.dispatched = batch, False
        for r in batch.requests:
            r.state, r.batch_id = S.RUNNING, batch.batch_id

    def displace(self) -> bool:
        """Take the running batch off: suspend a started program, requeue a never-started one.

        Returns whether the executor must actually preempt (the engine had started this commitment).
        """
        b = self.running
        assert b is not None
        self.running = None
        if b.started:
            self.suspended[b.batch_id] = b
            for r in b.requests:
                r.state = S.SUSPENDED
            was_dispatched, b.dispatched = b.dispatched, False
            return was_dispatched
        for r in b.requests:
            r.batch_id = None
            self.requeue(r)
        self.waiting = dict(sorted(self.waiting.items(), key=lambda kv: kv[1].arrival_s))
        return False

    def requeue(self, r: Request) -> None:
        """Queue a request without a program: waiting if nothing beyond its cached prefix is prefilled,
        else partial."""
        if r.prefilled == r.cached_tokens:
            r.state = S.WAITING
            self.waiting[r.request_id] = r
        else:
            r.state = S.SUSPENDED
            self.partial[r.request_id] = r

    def complete(self, batch: Batch, now: float) -> list[str]:
        """Record the end of ``batch``'s program; returns the ids whose prompt is now fully prefilled."""
        batch.stop_timer(now)
        done: list[str] = []
        for r in batch.requests:
            r.prefilled, r.batch_id = batch.ranges[r.request_id][1], None
            if r.prefilled >= r.num_prompt_tokens:
                r.state, r.first_token_s = S.DECODING, now
                done.append(r.request_id)
            else:
                self.requeue(r)
        return done

    def remove(self, r: Request, prev: RequestState) -> tuple[Batch | None, bool]:
        """Forget an aborted request that was in state ``prev``.

        Returns ``(batch, emptied)``: the batch it belonged to (None if none) and whether that
        batch lost its last member (it is then removed too).
        """
        rid = r.request_id
        self.predicted.pop(rid, None)
        if r.batch_id is None:
            self.waiting.pop(rid, None)
            self.partial.pop(rid, None)
            self.deferred.pop(rid, None)
            return None, False
        batch = self.running if prev is S.RUNNING else self.suspended[r.batch_id]
        assert batch is not None and batch.batch_id == r.batch_id
        batch.requests.remove(r)
        del batch.ranges[rid]
        r.batch_id = None
        if batch.requests:
            return batch, False
        self.take(batch.batch_id)
        return batch, True
