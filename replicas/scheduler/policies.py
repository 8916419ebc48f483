"""Scheduling policies: ``flowprefill`` (the paper) and the ``chunked`` and ``fcfs`` baselines.

A policy is a pure function of a :class:`SchedulerView`: it returns a :class:`Decision` with
``run`` and ``preempt_running`` only; the :class:`~replicas.scheduler.core.Scheduler` applies it
to its bookkeeping. Contract: when ``run`` is set and a batch is running, ``preempt_running``
is True; a new plan's ``batch_id`` is ``view.next_batch_id``.
"""

from __future__ import annotations

import heapq
import operator
from abc import ABC, abstractmethod

from replicas.scheduler.config import POLICY_NAMES, SchedulerConfig
from replicas.scheduler.events import IDLE, Decision
from replicas.scheduler.priority import PriorityKey
from replicas.scheduler.request import Request
from replicas.scheduler.view import Batch, SchedulerView

__all__ = ["ChunkedPolicy", "FcfsPolicy", "FlowPrefillPolicy", "SchedulerConfig", "SchedulingPolicy", "make_policy"]


class SchedulingPolicy(ABC):
    """Decides what the executor runs next; called by the scheduler core on every event."""

    name: str = ""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    @abstractmethod
    def decide(self, view: SchedulerView, now: float) -> Decision:
        """One scheduling pass over ``view`` at time ``now``."""


_first = operator.itemgetter(0)  # the key of a (key, request) pair


def _resume(view: SchedulerView, batch: Batch) -> Decision:
    return Decision(run=batch.plan(resume=True), preempt_running=view.running is not None)


class FlowPrefillPolicy(SchedulingPolicy):
    """Slack-gated EDF with operator-level preemption and SLO-aware batching.

    The head (most urgent request anywhere) runs: if it is in the running batch nothing changes;
    if it is in a suspended batch that batch is resumed; if it is queued a new batch starts with
    it (plus other short queued requests while the head keeps its ``alpha * ttft_slo`` margin, the
    decode steps the engine will force into the batch counted),
    preempting the running batch unless ``max_suspended_batches`` are already suspended. When KV
    memory cannot hold the new batch, the most urgent already-admitted batch runs instead.
    """

    name = "flowprefill"

    def decide(self, view: SchedulerView, now: float) -> Decision:
        """See the class docstring."""
        queued = view.keyed(view.queued())
        top = min(queued, key=_first) if queued else None
        for b in (*view.suspended.values(), view.running):  # started work: keys are unique (request ids)
            if b is not None:
                for kr in view.member_keys(b):
                    if top is None or kr[0] < top[0]:
                        top = kr
        if top is None:
            return IDLE
        head = top[1]
        running = view.running
        if running is not None and head.batch_id == running.batch_id:
            return IDLE
        if head.batch_id is not None:
            return _resume(view, view.suspended[head.batch_id])
        if running is not None and len(view.suspended) >= self.config.max_suspended_batches:
            return IDLE
        members = self._build_batch(view, head, queued, now)
        if members is None:
            return self._memory_fallback(view)
        return Decision(run=view.new_plan(members), preempt_running=running is not None)

    def _build_batch(
        self, view: SchedulerView, head: Request, queued: list[tuple[PriorityKey, Request]], now: float
    ) -> list[tuple[Request, int]] | None:
        """The head plus short queued requests that keep its margin; None if the head does not fit in KV."""
        cfg, memory = self.config, view.memory
        total = head.remaining_tokens
        kv = view.kv_tokens(head, total)
        if not memory.can_admit(kv):
            return None
        members = [(head, total)]
        short = cfg.short_threshold
        if total > short or view.slack(head) < cfg.alpha * head.ttft_slo_s:  # short: uncached tokens (a hit is short)
            return members
        limit = head.finish_by(cfg.alpha)
        decode = view.decode  # steps forced into the batch however urgent it is: they delay every member
        others = [kr for kr in queued if kr[1] is not head and kr[1].remaining_tokens <= short]
        heapq.heapify(others)  # pop in priority order; usually only a few are taken
        ranges = [(head.prefilled, head.prefilled + total)]
        while others:
            req = heapq.heappop(others)[1]
            n = req.remaining_tokens
            if total + n > cfg.batch_token_budget:
                break
            need = view.kv_tokens(req, n)
            slice_ = (req.prefilled, req.prefilled + n)
            work = view.cost_model.predict_ranges([*ranges, slice_])
            if decode is not None:
                work += decode.seconds_within(now, work)
            if now + work > limit or not memory.can_admit(kv + need):
                break
            members.append((req, n))
            ranges.append(slice_)
            total += n
            kv += need
        return members

    def _memory_fallback(self, view: SchedulerView) -> Decision:
        """Run the most urgent work that already holds its KV (running or suspended)."""
        best: Batch | None = None
        best_key: PriorityKey | None = None
        for batch in (*view.suspended.values(), *([view.running] if view.running is not None else [])):
            k = view.batch_key(batch)
            if best_key is None or k < best_key:
                best, best_key = batch, k
        if best is None or best is view.running:
            return Decision(memory_blocked=True)
        return Decision(run=best.plan(resume=True), preempt_running=view.running is not None, memory_blocked=True)


class ChunkedPolicy(SchedulingPolicy):
    """vLLM/Sarathi-style chunked prefill: no operator preemption, re-prioritise per chunk.

    A running chunk always continues. When idle, the next chunk takes up to ``chunk_tokens``
    tokens from queued and partly prefilled requests in slack-gated EDF order, each contributing
    ``min(remaining, budget)`` tokens from its ``prefilled`` position (a slice whose KV does not
    fit is skipped). Every chunk is a new program.
    """

    name = "chunked"

    def decide(self, view: SchedulerView, now: float) -> Decision:
        """See the class docstring."""
        if view.running is not None:
            return IDLE
        if view.suspended:  # only if another policy left some: finish them first
            return _resume(view, min(view.suspended.values(), key=view.batch_key))
        queued = sorted(view.keyed(view.queued()), key=_first)
        budget, kv, blocked = self.config.chunk_tokens, 0, False
        members: list[tuple[Request, int]] = []
        for _, req in queued:
            take = min(req.remaining_tokens, budget)
            need = view.kv_tokens(req, take)
            if not view.memory.can_admit(kv + need):
                blocked = True  # skip it: a later (smaller) slice may still fit
                continue
            members.append((req, take))
            kv += need
            budget -= take
            if budget == 0:
                break
        return Decision(run=view.new_plan(members) if members else None, memory_blocked=blocked)


class FcfsPolicy(SchedulingPolicy):
    """Whole prefills in arrival order, no preemption; batches up to ``batch_token_budget`` tokens."""

    name = "fcfs"

    def decide(self, view: SchedulerView, now: float) -> Decision:
        """See the class docstring."""
        if view.running is not None:
            return IDLE
        if view.suspended:
            return _resume(view, view.suspended[min(view.suspended)])
        queued = sorted(view.queued(), key=lambda r: r.arrival_s)  # stable: ties keep arrival order
        members: list[tuple[Request, int]] = []
        total, kv, blocked = 0, 0, False
        for req in queued:
            n = req.remaining_tokens
            if members and total + n > self.config.batch_token_budget:
                break
            need = view.kv_tokens(req, n)
            if not view.memory.can_admit(kv + need):
                blocked = True
                break
            members.append((req, n))
            total += n
            kv += need
        return Decision(run=view.new_plan(members) if members else None, memory_blocked=blocked)


_POLICIES: dict[str, type[SchedulingPolicy]] = {
    FlowPrefillPolicy.name: FlowPrefillPolicy,
    ChunkedPolicy.name: ChunkedPolicy,
    FcfsPolicy.name: FcfsPolicy,
}
assert tuple(sorted(_POLICIES)) == tuple(sorted(POLICY_NAMES))


def make_policy(name: str, config: SchedulerConfig | None = None) -> SchedulingPolicy:
    """Build the policy called ``name`` (``flowprefill``, ``chunked``, ``fcfs``) with ``config``."""
    if name not in _POLICIES:
        raise ValueError(f"policy: unknown policy {name!r}; expected one of {tuple(_POLICIES)}")
    return _POLICIES[name](config if config is not None else SchedulerConfig(policy=name))
