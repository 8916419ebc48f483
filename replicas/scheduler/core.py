"""The replica-local scheduler: request bookkeeping, batch ids, and event handling.

Engine protocol (the simulator follows the same one):

* ``on_arrival`` / ``on_prefill_complete`` / ``on_abort`` / ``on_finish`` each return a
  :class:`~replicas.scheduler.events.Decision`; apply it (drop, preempt, run, in that order)
  before delivering the next event. Scheduling passes run only inside these methods.
* KV: the engine's :class:`~replicas.scheduler.view.MemoryView` (given at construction) is
  queried live by every pass; the scheduler calls its ``release(ids)`` when a request's KV may
  be freed (abort, finish, end of a program with aborted members), before re-planning.
  The engine allocates KV itself when it starts a new program (the plan's ranges).
* When the executor actually starts or resumes a planned program, call ``mark_started(plan, t)``;
  when it actually stops one at an operator boundary, call ``mark_suspended(batch_id, t)``
  (also usable to pause the running program, e.g. for decode steps; ``mark_started`` again to
  continue it). ``executed_s`` accumulates from these marks only. ``mark_started`` closes any
  other open interval, since one program runs at a time.

Decisions take effect in the bookkeeping when they are made: the planned batch is the running
one from then on, and a preempted batch is suspended. If another event arrives before the engine
started a plan, the next decision supersedes it (a never-started new batch goes back to the queue).
Times only move forward: a ``now`` earlier than the last one seen is treated as the last one.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from replicas.decode_cadence import DecodeForecast
from replicas.scheduler.calibration import CostCalibration
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.events import IDLE, Abort, Arrival, BatchPlan, Decision, Event, Finish, PrefillComplete
from replicas.scheduler.expiry import find_hopeless
from replicas.scheduler.policies import SchedulingPolicy, make_policy
from replicas.scheduler.queues import Queues
from replicas.scheduler.request import Request, RequestState
from replicas.scheduler.stats import QueueStats, Refusal, late_refusal, pass_summary, pending_work_s, queue_stats
from replicas.scheduler.urgent_reserve import UrgentReserve
from replicas.scheduler.view import Batch, MemoryView, SchedulerView, UnlimitedMemory

S = RequestState
_PREFILLING = frozenset({S.WAITING, S.RUNNING, S.SUSPENDED})


class Scheduler:
    """Event-driven scheduler of one replica; pure logic over events, timestamps and a cost model.

    ``memory`` is the engine's live KV view (default: unlimited). ``perf_clock`` only measures
    how long each scheduling pass takes (``pass_durations``); decisions never read a clock.
    """

    def __init__(
        self,
        cost_model: CostModel,
        config: SchedulerConfig | None = None,
        *,
        memory: MemoryView | None = None,
        policy: SchedulingPolicy | None = None,
        perf_clock: Callable[[], float] = time.perf_counter,
        max_pass_samples: int = 100_000,
    ) -> None:
        self.config = config if config is not None else SchedulerConfig()
        self.base_cost_model = cost_model  # the profile as measured
        self.cost_model = cost_model  # the profile scaled by the calibration factor in use
        self.calibration = CostCalibration()
        self.memory: MemoryView = memory if memory is not None else UnlimitedMemory()
        self.policy = policy if policy is not None else make_policy(self.config.policy, self.config)
        self._perf_clock = perf_clock
        self._requests: dict[str, Request] = {}  # live (not terminal)
        self._q = Queues()
        self._memory_blocked = False
        self._last_now = -math.inf
        window = self.config.urgent_reserve_window_s
        self._reserve = UrgentReserve(window) if window is not None else None
        self.scheduling_passes = 0
        self.preemptions = 0
        self.terminal_counts: Counter[str] = Counter()
        self.pass_durations: deque[float] = deque(maxlen=max_pass_samples)
        #: Set by the engine: the decode steps it will force into prefill (policies pack around them).
        self.decode_forecast: Callable[[], DecodeForecast | None] | None = None

    # ------------------------------------------------------------------ events
    def handle(self, event: Event) -> Decision:
        """Dispatch an event object to its ``on_*`` method (for simulators and queues)."""
        match event:
            case Arrival(request, now):
                return self.on_arrival(request, now)
            case PrefillComplete(batch_id, now):
                return self.on_prefill_complete(batch_id, now)
            case Abort(request_id, now):
                return self.on_abort(request_id, now)
            case Finish(request_id, now):
                return self.on_finish(request_id, now)
        raise TypeError(f"unknown event {event!r}")

    def on_arrival(self, request: Request, now: float) -> Decision:
        """Queue ``request`` (or reject it under admission control) and re-plan."""
        now = self._tick(now)
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request_id: {rid!r} is already queued")
        if request.state is not S.WAITING:
            raise ValueError(f"Request.state: a new request must be waiting, got {request.state}")
        predicted = self._predict(request)
        if self._reserve is not None:  # offered load, whether admitted or not
            self._reserve.record(request.slo_class, request.ttft_slo_s, predicted, now)
        refusal = self._admission_refusal(request, predicted, now)
        if refusal is not None:
            self._refuse(request, refusal, now)
            return Decision(rejected=(rid,))
        self._requests[rid] = request
        self._q.predicted[rid] = predicted
        if self._worth_waiting(request, self._view(now)):
            self._q.deferred[rid] = request
        else:
            self._q.waiting[rid] = request
        return self._pass(now)

    def _predict(self, r: Request) -> float:
        """Predicted prefill of ``r``'s uncached tokens, attending over its cached ones."""
        return self.cost_model.predict_suffix(r.num_prompt_tokens - r.cached_tokens, r.cached_tokens)

    def _worth_waiting(self, r: Request, view: SchedulerView) -> bool:
        """Whether ``r`` should wait for the live request computing its next uncached blocks.

        It waits while that request is still prefilling and, predicting that its whole prefill runs
        after the work slack-gated EDF puts before it (as admission control predicts), ``r``'s own
        prefill of the rest then still ends ``alpha * ttft_slo`` before ``r``'s deadline. Otherwise
        it computes the shared blocks itself: duplicated work, but its SLO first.
        """
        owner = self._requests.get(r.shares_with) if r.shares_with is not None else None
        if owner is None or owner.state not in _PREFILLING:
            return False
        own_key = view.key(owner)[:2]
        ahead = sum(view.predicted_remaining(x) for x in view.prefill_requests() if x is not r
                    and x is not owner and view.key(x)[:2] <= own_key)
        published = r.cached_tokens + r.shared_tokens
        after = self.cost_model.predict_suffix(r.num_prompt_tokens - published, published)
        finish = view.now + ahead + view.predicted_remaining(owner) + after
        return finish <= r.finish_by(self.config.alpha)

    def set_cached(self, request_id: str, cached_tokens: int) -> None:
        """A deferred request's prefix grew in the cache (its owner published it): it now starts at
        ``cached_tokens``. Only for a deferred request (the engine checks :meth:`is_deferred`)."""
        r = self._q.deferred.get(request_id)
        if r is None:
            raise ValueError(f"set_cached: request {request_id!r} is not waiting for a shared prefix")
        if not r.cached_tokens <= cached_tokens < r.num_prompt_tokens:
            raise ValueError(f"set_cached: {cached_tokens} cached tokens for {request_id!r} "
                             f"(had {r.cached_tokens}, prompt {r.num_prompt_tokens})")
        r.cached_tokens = r.prefilled = cached_tokens
        r.shared_tokens = max(r.shared_tokens - cached_tokens, 0)
        self._q.predicted[request_id] = self._predict(r)

    def is_deferred(self, request_id: str) -> bool:
        """Whether ``request_id`` waits for another request to publish its shared prefix."""
        return request_id in self._q.deferred

    def _release_deferred(self, view: SchedulerView) -> None:
        """Deferred requests whose owner finished (or is gone), or that could no longer wait, queue."""
        for rid, r in list(self._q.deferred.items()):
            if not self._worth_waiting(r, view):
                del self._q.deferred[rid]
                r.shares_with, r.shared_tokens = None, 0
                self._q.waiting[rid] = r
                view.waiting.append(r)
                view.deferred.remove(r)

    def _admission_refusal(self, request: Request, predicted: float, now: float) -> Refusal | None:
        """Why admission refuses ``request`` (see :class:`SchedulerConfig`), or None."""
        cfg = self.config
        view = self._view(now)
        if cfg.max_queued_work_s is not None:
            pending = pending_work_s(view)
            if pending + predicted > cfg.max_queued_work_s:
                return Refusal(f"replica overloaded: {pending:.3f}s of predicted prefill work queued "
                               f"(max_queued_work_s {cfg.max_queued_work_s:g})",
                               pending + predicted - cfg.max_queued_work_s)
        late_check = (cfg.admission_control and request.sheddable) or cfg.late_reject_factor is not None
        share = (self._reserve.share_above(request.slo_class, request.ttft_slo_s, now)
                 if self._reserve is not None and late_check else 0.0)
        if cfg.admission_control and request.sheddable:
            return late_refusal(view, request, predicted, reserved_share=share)
        if cfg.late_reject_factor is not None:
            return late_refusal(view, request, predicted, cfg.late_reject_factor, reserved_share=share)
        return None

    def on_prefill_complete(self, batch_id: int, now: float, compute_s: float | None = None) -> Decision:
        """The program of ``batch_id`` ended: members reaching the prompt end start decoding.

        ``compute_s``: the time the executor spent running the program (without the decode steps
        interleaved while it was the running batch); the calibration learns from it when given,
        otherwise from the batch's running time between start and completion.
        """
        now = self._tick(now)
        batch = self._q.take(batch_id)
        if batch is None:
            if not 0 <= batch_id < self._q.next_batch_id:
                raise KeyError(f"batch_id: {batch_id} was never planned")
            return self._pass(now)  # dropped after an abort: nothing to record
        done = self._q.complete(batch, now)
        if self.config.calibrate_cost:
            self._calibrate(batch, batch.executed_s if compute_s is None else compute_s)
        self._release(batch.zombies)
        d = self._pass(now)
        return Decision(run=d.run, preempt_running=d.preempt_running, dropped=d.dropped, freed=tuple(batch.zombies),
                        prefilled=tuple(done), rejected=d.rejected, memory_blocked=d.memory_blocked)

    def on_abort(self, request_id: str, now: float) -> Decision:
        """Remove ``request_id`` in any state; unknown or already terminal ids are ignored."""
        now = self._tick(now)
        r = self._requests.pop(request_id, None)
        if r is None:
            return IDLE
        prev = r.state
        self._end(r, S.ABORTED, now)
        batch, emptied = self._q.remove(r, prev)
        freed: list[str] = [request_id]
        dropped: tuple[int, ...] = ()
        if batch is not None and emptied:
            dropped, freed = (batch.batch_id,), [*batch.zombies, request_id]
        elif batch is not None and batch.started:  # its program still writes this KV: free it when it ends
            batch.zombies.append(request_id)
            freed = []
        self._release(freed)
        d = self._pass(now)
        return Decision(run=d.run, preempt_running=d.preempt_running, dropped=dropped, freed=tuple(freed),
                        prefilled=d.prefilled, rejected=d.rejected, memory_blocked=d.memory_blocked)

    def on_finish(self, request_id: str, now: float) -> Decision:
        """Decoding of ``request_id`` ended; re-plans only if work waits for memory or the executor idles."""
        now = self._tick(now)
        r = self._requests.get(request_id)
        if r is None:
            return IDLE
        if r.state is not S.DECODING:
            raise ValueError(f"on_finish: request {request_id!r} is {r.state}, not decoding")
        del self._requests[request_id]
        self._end(r, S.FINISHED, now)
        self._release([request_id])
        idle_with_work = self._q.running is None and self._q.has_pending()
        if not (self._memory_blocked or idle_with_work):
            return Decision(freed=(request_id,))
        d = self._pass(now)
        return Decision(run=d.run, preempt_running=d.preempt_running, dropped=d.dropped, freed=(request_id,),
                        prefilled=d.prefilled, rejected=d.rejected, memory_blocked=d.memory_blocked)

    # ------------------------------------------------------------------ executor marks
    def mark_started(self, plan: BatchPlan, now: float) -> None:
        """The executor started or resumed ``plan`` at ``now`` (closes other open intervals)."""
        now = self._tick(now)
        b = self._q.running
        if b is None or b.batch_id != plan.batch_id:
            raise ValueError(f"mark_started: batch {plan.batch_id} is not the planned running batch (stale plan?)")
        for other in self._q.suspended.values():
            other.stop_timer(now)
        b.started = b.dispatched = True
        b.start_timer(now)

    def mark_suspended(self, batch_id: int, now: float) -> None:
        """The executor stopped ``batch_id`` at an operator boundary at ``now`` (unknown ids: ignored)."""
        now = self._tick(now)
        b = self._q.find(batch_id)
        if b is not None:
            b.stop_timer(now)

    # ------------------------------------------------------------------ queries
    def get(self, request_id: str) -> Request | None:
        """A live (not terminal) request by id."""
        return self._requests.get(request_id)

    @property
    def running(self) -> BatchPlan | None:
        """The running batch as a plan, for inspection (None when idle; ``resume`` = it has run before)."""
        b = self._q.running
        return b.plan(resume=b.started) if b is not None else None

    @property
    def suspended_batch_ids(self) -> tuple[int, ...]:
        """Ids of suspended programs."""
        return tuple(self._q.suspended)

    @property
    def waiting_ids(self) -> tuple[str, ...]:
        """Waiting requests, arrival order."""
        return tuple(self._q.waiting)

    @property
    def partial_ids(self) -> tuple[str, ...]:
        """Partly prefilled requests without a program (``chunked``)."""
        return tuple(self._q.partial)

    def stats(self, now: float, *, per_request: bool = True) -> QueueStats:
        """Queue state for the router; see :class:`~replicas.scheduler.stats.QueueStats`
        (``per_request=False`` leaves the per-request entries out)."""
        decoding = sum(r.state is S.DECODING for r in self._requests.values())
        return replace(
            queue_stats(self._view(now), decoding=decoding, per_request=per_request),
            policy=self.policy.name,
            finished=self.terminal_counts[S.FINISHED],
            aborted=self.terminal_counts[S.ABORTED],
            rejected=self.terminal_counts[S.REJECTED],
            scheduling_passes=self.scheduling_passes,
            preemptions=self.preemptions,
            memory_blocked=self._memory_blocked,
            cost_scale=self.calibration.factor,
        )

    def pass_stats(self) -> dict[str, float | int]:
        """Count, mean, median, p99 and max of the recorded pass durations (seconds)."""
        return pass_summary(self.pass_durations)

    # ------------------------------------------------------------------ internals
    def _tick(self, now: float) -> float:
        if now > self._last_now:
            self._last_now = now
        return self._last_now

    def _calibrate(self, batch: Batch, measured_s: float) -> None:
        """Learn from a finished program how much slower than profiled prefill runs now."""
        old = self.calibration.factor
        factor = self.calibration.observe(self._profiled_program_s(batch), measured_s)
        if factor is None:
            return
        rescale = factor / old
        self.cost_model = self.base_cost_model.scaled(factor)
        predicted = self._q.predicted
        for rid in predicted:
            predicted[rid] *= rescale

    def _profiled_program_s(self, batch: Batch) -> float:
        """The idle profile's time for ``batch``'s program: ``predict_ranges`` of its slices. A slice
        ``[start, end)`` with ``start > 0`` (a later chunk, or the rest after a prefix-cache hit)
        includes attention over the KV before it, which costing it as a fresh prompt of
        ``end - start`` tokens would leave out, and later chunks would then read as a slowdown
        (the ``chunked`` policy runs every long prompt this way)."""
        return self.base_cost_model.predict_ranges(batch.range_list())

    def _view(self, now: float) -> SchedulerView:
        forecast = self.decode_forecast
        return self._q.view(now, self.cost_model, self.memory, forecast() if forecast is not None else None)

    def _expire_hopeless(self, now: float) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Refuse the work :func:`~replicas.scheduler.expiry.find_hopeless` picks; returns the refused
        request ids and the suspended batches dropped with them (their KV freed)."""
        factor = self.config.late_reject_factor
        q = self._q
        if factor is None or not (q.waiting or q.suspended or q.partial or q.deferred):
            return (), ()
        hopeless = find_hopeless(q, factor, now)
        refused: list[str] = []
        for r in hopeless.waiting:
            self._expire(r, S.WAITING, f"no prefill within {factor:g} x", factor, now)
            refused.append(r.request_id)
        for batch in hopeless.batches:
            self._release(batch.zombies)  # the program that would have freed them is dropped
        for r in hopeless.started:
            self._expire(r, S.SUSPENDED, f"prefill not finished within {factor:g} x", factor, now)
            refused.append(r.request_id)
        self._release([r.request_id for r in hopeless.started])
        return tuple(refused), tuple(b.batch_id for b in hopeless.batches)

    def _expire(self, r: Request, state: RequestState, what: str, factor: float, now: float) -> None:
        self._q.remove(r, state)
        self._requests.pop(r.request_id, None)
        self._refuse(r, Refusal(f"expired: {what} the {r.ttft_slo_s:.3f}s TTFT SLO (waited {now - r.arrival_s:.3f}s); "
                                "the replica is overloaded", factor * r.ttft_slo_s), now)

    def _pass(self, now: float) -> Decision:
        t0 = self._perf_clock()
        expired, dropped = self._expire_hopeless(now)
        view = self._view(now)
        if self._q.deferred:
            self._release_deferred(view)
        decision = self.policy.decide(view, now)
        if expired:
            decision = Decision(run=decision.run, preempt_running=decision.preempt_running,
                                dropped=(*decision.dropped, *dropped), freed=decision.freed,
                                prefilled=decision.prefilled, rejected=(*decision.rejected, *expired),
                                memory_blocked=decision.memory_blocked)
        out = self._apply(decision)
        self._memory_blocked = decision.memory_blocked
        self.scheduling_passes += 1
        self.pass_durations.append(self._perf_clock() - t0)
        return out

    def _apply(self, d: Decision) -> Decision:
        """Commit a policy decision to the bookkeeping; report a preemption only for a live program."""
        q, plan = self._q, d.run
        if plan is None:
            preempted = q.displace() if d.preempt_running and q.running is not None else False
        else:
            batch = q.suspended.pop(plan.batch_id) if plan.resume else q.new_batch(plan)
            preempted = False
            if q.running is not None:
                if not d.preempt_running:
                    raise RuntimeError(
                        f"policy {self.policy.name!r} planned a batch without preempting the running one"
                    )
                preempted = q.displace()
            q.commit(batch)
        self.preemptions += preempted
        if preempted == d.preempt_running:
            return d  # decisions are immutable: no copy needed
        return Decision(run=d.run, preempt_running=preempted, dropped=d.dropped, freed=d.freed,
                        prefilled=d.prefilled, rejected=d.rejected, memory_blocked=d.memory_blocked)

    def _release(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            self.memory.release(tuple(request_ids))

    def _refuse(self, r: Request, refusal: Refusal, now: float) -> None:
        """End ``r`` as rejected, with the reason and retry hint its client gets."""
        self._end(r, S.REJECTED, now)
        reason, factor = refusal.reason, self.calibration.factor
        if factor != 1.0:  # the predictions behind the refusal are the profile scaled by this
            reason += f" (prefill runs at {factor:.2f}x its profiled time now)"
        r.reject_reason, r.retry_after_s = reason, refusal.retry_after_s

    def _end(self, r: Request, state: RequestState, now: float) -> None:
        r.state, r.finish_s = state, now
        self.terminal_counts[state] += 1
