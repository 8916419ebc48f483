"""What a policy sees during one scheduling pass: queues, batches, the cost model and KV memory.

The scheduler does not own the KV cache. The engine hands it a :class:`MemoryView` at
construction; every pass queries it live, so it must reflect the engine's current free KV.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from replicas.decode_cadence import DecodeForecast
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.events import BatchPlan
from replicas.scheduler.priority import PriorityKey
from replicas.scheduler.request import Request


class MemoryView(Protocol):
    """Live view of the engine's KV memory (e.g. an adapter over ``BlockAllocator``).

    ``can_admit(extra_tokens)``: whether KV for ``extra_tokens`` more tokens fits now (the
    policies pass per-request block-rounded sums, see :meth:`SchedulerView.kv_tokens`).
    Work already started (running or suspended programs, partial chunked prefills) holds its KV
    and never needs admission again. ``release(request_ids)``: return these requests' KV to the
    pool; the scheduler calls it exactly when that is safe (aborted with no live program writing
    it, or finished), before it re-plans, so that the plan sees the freed memory.
    """

    @property
    def free_tokens(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def can_admit(self, extra_tokens: int) -> bool: ...

    def release(self, request_ids: Sequence[str]) -> None: ...


@dataclass
class UnlimitedMemory:
    """A :class:`MemoryView` that admits everything (simulations without a memory model)."""

    block_size: int = 16
    free_tokens: int = sys.maxsize

    def can_admit(self, extra_tokens: int) -> bool:
        """Always True."""
        return True

    def release(self, request_ids: Sequence[str]) -> None:
        """Nothing to do."""


@dataclass
class TokenPool:
    """A :class:`MemoryView` with its own accounting, for tests and simulators.

    The simulated engine calls :meth:`allocate` when it starts a program; each request holds
    ``ceil(tokens / block_size)`` blocks. ``capacity_tokens`` is the pool size in tokens.
    """

    capacity_tokens: int
    block_size: int = 16
    tokens: dict[str, int] = field(default_factory=dict)  # request id -> tokens held
    _used_blocks: int = 0

    @property
    def free_tokens(self) -> int:
        """Token capacity of the free blocks."""
        return self.capacity_tokens // self.block_size * self.block_size - self._used_blocks * self.block_size

    def _blocks(self, n: int) -> int:
        return -(-n // self.block_size)

    def can_admit(self, extra_tokens: int) -> bool:
        """Whether ``extra_tokens`` (rounded up to blocks) fit in the free blocks."""
        return self._blocks(extra_tokens) * self.block_size <= self.free_tokens

    def allocate(self, request_id: str, extra_tokens: int) -> None:
        """Grow ``request_id``'s KV by ``extra_tokens``; raises ``MemoryError`` when it does not fit."""
        before = self.tokens.get(request_id, 0)
        need = self._blocks(before + extra_tokens) - self._blocks(before)
        if need * self.block_size > self.free_tokens:
            raise MemoryError(f"KV for {request_id!r}: {need} blocks needed, {self.free_tokens} tokens free")
        self.tokens[request_id] = before + extra_tokens
        self._used_blocks += need

    def release(self, request_ids: Sequence[str]) -> None:
        """Free these requests' blocks (unknown ids are ignored)."""
        for rid in request_ids:
            self._used_blocks -= self._blocks(self.tokens.pop(rid, 0))


@dataclass(eq=False)
class Batch:
    """A prefill program the scheduler has committed to: running, or suspended with its KV.

    ``ranges`` maps each live member to its prompt-token range. ``run_since`` is set while the
    executor actually runs the program (between the engine's start and suspend marks);
    ``started``: the program exists on the executor; ``dispatched``: the engine acknowledged the
    current commitment with ``mark_started``. ``zombies``: members aborted while the program is
    alive, whose KV is reported for freeing when the program ends.
    """

    batch_id: int
    requests: list[Request]
    ranges: dict[str, tuple[int, int]]
    executed_s: float = 0.0
    run_since: float | None = None
    started: bool = False
    dispatched: bool = False
    zombies: list[str] = field(default_factory=list)

    def plan(self, resume: bool) -> BatchPlan:
        """The executor's view of this batch."""
        ids = tuple(r.request_id for r in self.requests)
        return BatchPlan(self.batch_id, ids, tuple(self.ranges[i] for i in ids), resume)

    def token_counts(self) -> list[int]:
        """Tokens each live member computes in this program."""
        return [self.ranges[r.request_id][1] - self.ranges[r.request_id][0] for r in self.requests]

    def range_list(self) -> list[tuple[int, int]]:
        """The prompt slice each live member computes in this program (``start``: tokens already in KV)."""
        return [self.ranges[r.request_id] for r in self.requests]

    def open_s(self, now: float) -> float:
        """Running time since the last start mark, not yet added to ``executed_s``."""
        return max(now - self.run_since, 0.0) if self.run_since is not None else 0.0

    def start_timer(self, now: float) -> None:
        """Open a running interval (no-op if one is open)."""
        if self.run_since is None:
            self.run_since = now

    def stop_timer(self, now: float) -> None:
        """Close the running interval, crediting its length to the batch and its live members."""
        dt = self.open_s(now)
        self.run_since = None
        self.executed_s += dt
        for r in self.requests:
            r.executed_s += dt


@dataclass
class SchedulerView:
    """Read-only snapshot handed to :meth:`SchedulingPolicy.decide`.

    ``waiting``: never-started requests in arrival order. ``partial``: partly prefilled requests
    with no program (``chunked`` between chunks; state suspended, KV held). ``suspended``:
    preempted programs by batch id. ``predicted_total``: cached predictions of each request's
    whole prefill (its uncached tokens after its cached ones). ``deferred``: waiting requests
    held back until another request's prefill publishes their shared prefix; policies do not plan
    them, but they count as queued work. ``decode``: the decode steps the engine will force into
    prefill from now on (None: nothing decodes, or the engine does not say).
    """

    now: float
    waiting: list[Request]
    partial: list[Request]
    suspended: Mapping[int, Batch]
    running: Batch | None
    cost_model: CostModel
    memory: MemoryView
    next_batch_id: int
    predicted_total: Mapping[str, float]
    deferred: list[Request] = field(default_factory=list)
    decode: DecodeForecast | None = None

    def batch_of(self, req: Request) -> Batch | None:
        """The running or suspended batch ``req`` belongs to."""
        bid = req.batch_id
        if bid is None:
            return None
        if self.running is not None and self.running.batch_id == bid:
            return self.running
        return self.suspended.get(bid)

    def executed(self, req: Request) -> float:
        """Seconds ``req``'s prefill has run, including an open running interval."""
        if req.batch_id is None:
            return req.executed_s
        batch = self.batch_of(req)
        return req.executed_s + (batch.open_s(self.now) if batch is not None else 0.0)

    def predicted(self, req: Request) -> float:
        """Predicted prefill latency of the whole prompt, alone."""
        pred = self.predicted_total.get(req.request_id)
        if pred is None:
            return self.cost_model.predict_suffix(req.num_prompt_tokens - req.cached_tokens, req.cached_tokens)
        return pred

    def predicted_remaining(self, req: Request) -> float:
        """``max(predicted - executed, 0)``."""
        return max(self.predicted(req) - self.executed(req), 0.0)

    def slack(self, req: Request) -> float:
        """See :func:`~replicas.scheduler.priority.slack`."""
        return (req.deadline - self.now) - self.predicted_remaining(req)

    def key(self, req: Request) -> PriorityKey:
        """Priority key of ``req`` (smaller = more urgent); same as ``priority_key(req, self.slack(req))``."""
        executed = req.executed_s if req.batch_id is None else self.executed(req)
        predicted = self.predicted_total.get(req.request_id)
        if predicted is None:
            predicted = self.predicted(req)
        remaining = predicted - executed
        deadline = req.arrival_s + req.ttft_slo_s
        slack = deadline - self.now - (remaining if remaining > 0.0 else 0.0)
        return (slack <= 0.0, deadline, req.priority, req.arrival_s, req.request_id)

    def keyed(self, reqs: Iterable[Request]) -> list[tuple[PriorityKey, Request]]:
        """``(key, request)`` pairs, computed once per pass (the hot loop of a pass)."""
        now, predicted_total, out = self.now, self.predicted_total, []
        append = out.append
        for r in reqs:
            predicted = predicted_total.get(r.request_id)
            if r.batch_id is not None or predicted is None:
                append((self.key(r), r))
                continue
            remaining = predicted - r.executed_s
            deadline = r.arrival_s + r.ttft_slo_s
            slack = deadline - now - (remaining if remaining > 0.0 else 0.0)
            append(((slack <= 0.0, deadline, r.priority, r.arrival_s, r.request_id), r))
        return out

    def member_keys(self, batch: Batch) -> list[tuple[PriorityKey, Request]]:
        """``(key, request)`` of ``batch``'s members (its open running interval is read once)."""
        now, predicted_total, bid, out = self.now, self.predicted_total, batch.batch_id, []
        append = out.append
        open_s = batch.open_s(now)
        for r in batch.requests:
            predicted = predicted_total.get(r.request_id)
            if r.batch_id != bid or predicted is None:
                append((self.key(r), r))
                continue
            remaining = predicted - (r.executed_s + open_s)  # executed(r): its batch is this one
            deadline = r.arrival_s + r.ttft_slo_s
            slack = deadline - now - (remaining if remaining > 0.0 else 0.0)
            append(((slack <= 0.0, deadline, r.priority, r.arrival_s, r.request_id), r))
        return out

    def batch_key(self, batch: Batch) -> PriorityKey:
        """A batch's key: its best member's key."""
        return min(self.key(r) for r in batch.requests)

    def queued(self) -> list[Request]:
        """Requests that need a new program: partial ones, then waiting ones."""
        return [*self.partial, *self.waiting]

    def prefill_requests(self) -> Iterator[Request]:
        """Every request whose prefill is not complete."""
        yield from self.waiting
        yield from self.deferred
        yield from self.partial
        for batch in self.suspended.values():
            yield from batch.requests
        if self.running is not None:
            yield from self.running.requests

    def kv_tokens(self, req: Request, n: int) -> int:
        """Block-rounded KV tokens ``req`` needs to grow from ``prefilled`` by ``n`` tokens (what the
        policies sum before calling ``memory.can_admit``: a pool rounds each sequence up to blocks)."""
        bs = self.memory.block_size
        return (-(-(req.prefilled + n) // bs) + (req.prefilled // -bs)) * bs

    def new_plan(self, members: list[tuple[Request, int]]) -> BatchPlan:
        """A plan for a new program computing ``n`` tokens of each ``(request, n)`` from ``prefilled``."""
        ids = tuple(r.request_id for r, _ in members)
        ranges = tuple((r.prefilled, r.prefilled + n) for r, n in members)
        return BatchPlan(self.next_batch_id, ids, ranges, resume=False)
