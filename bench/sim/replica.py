"""One simulated replica: the real :class:`~replicas.scheduler.core.Scheduler` driven in virtual time.

The replica mirrors :class:`replicas.engine.ReplicaEngine`'s loop with the model replaced by the
TTFT cost model:

* **Prefill programs.** A :class:`~replicas.scheduler.events.BatchPlan` runs for
  :func:`program_seconds` (``CostModel.predict_ranges`` of its slices; a slice starting at
  ``s > 0`` attends to the KV before it, the way ``chunked`` continues a prompt or a prefix-cache
  hit resumes). A suspended program keeps its remaining seconds and resumes where it stopped.
* **Events, as the engine feeds them.** Arrivals go to an inbox that is drained when the running
  program reaches an operator boundary (``boundary_delay_s`` after the arrival; with granularity
  ``none`` only when the program ends; immediately when the replica is idle), then
  ``on_arrival``; the end of a program gives ``on_prefill_complete``; the last decode token gives
  ``on_finish``. Decisions are applied by the engine's own
  :func:`~replicas.scheduler.driver.apply_decision` (this replica is its
  :class:`~replicas.scheduler.driver.DecisionTarget`), at the same virtual time.
* **Decode.** Decoding requests step together, one token per step, costing a measured decode
  curve (seconds per step against the batch size, :func:`decode_curve_seconds`) when one is
  given, else ``a + sum(marginal cost of one token at the prompt length)`` from the cost model
  (or a fixed ``decode_step_s``). On CPU the marginal-token model is 2-3x too cheap: a few rows'
  GEMMs are bound by reading the weights, not by their flops. As in
  :class:`~replicas.engine_decode.DecodeBatcher`, steps run back to back when no prefill runs,
  and interleave at an operator boundary of a running prefill when the engine's
  :class:`~replicas.decode_cadence.DecodeCadence` says so (the same object decides). A decode step
  is not preemptible: arrivals wait for its end.

Not modelled: KV memory (unlimited), the engine's ``max_waiting`` queue bound, sampling and
publishing overheads beyond the cost model, and context growth during decode.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bench.sim.exec_model import ExecConfig, decode_curve_seconds, decode_token_seconds, program_seconds
from bench.sim.snapshot import queue_snapshot
from replicas.decode_cadence import DecodeCadence, DecodeForecast
from replicas.kv_blocks import BlockAllocator
from replicas.prefix_hash import BlockName
from replicas.prefix_tracker import PrefixTracker
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.core import Scheduler
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.driver import apply_decision
from replicas.scheduler.events import BatchPlan, Decision
from replicas.scheduler.request import Request

INF = math.inf
IDLE, PREFILL, DECODE = 0, 1, 2


class SimRequest:
    """A request in flight in the simulation: the scheduler's :class:`Request` plus decode state."""

    __slots__ = ("idx", "request", "cost_s", "tokens_left", "token_s", "tpot_s", "names", "routing")

    def __init__(self, idx: int, request: Request, cost_s: float, names: tuple[BlockName, ...] = (),
                 routing: tuple[str, ...] = ()) -> None:
        self.idx = idx
        self.request = request
        self.cost_s = cost_s  # predicted prefill seconds on its replica (what the router puts in flight)
        self.tokens_left = 0
        self.token_s = 0.0
        self.tpot_s = request.tpot_slo_s
        self.names = names  # the prompt's block names (prefix caching; empty: not modelled)
        self.routing = routing  # its routing names, for prefix-aware placement


Recorder = Callable[[int, float | None], None]  # (request index, TTFT or None for rejected)


class SimReplica:
    """A replica engine in virtual time; ``schedule(replica, t)`` asks the loop to call :meth:`wake` at ``t``."""

    def __init__(self, index: int, replica_id: str, cost: CostModel, sched_config: SchedulerConfig,
                 exec_config: ExecConfig, schedule: Callable[[SimReplica, float], None], record: Recorder) -> None:
        self.index, self.replica_id = index, replica_id
        self.cost, self.cfg = cost, exec_config
        self.sched = Scheduler(cost, sched_config, perf_clock=float, max_pass_samples=1)
        self.cache: BlockAllocator | None = None
        self.prefix: PrefixTracker | None = None
        if exec_config.cache_blocks:
            self.cache = BlockAllocator(exec_config.cache_blocks, exec_config.block_size, enable_prefix_caching=True,
                                        max_cached_blocks=int(exec_config.cache_share * exec_config.cache_blocks))
            self.prefix = PrefixTracker(self.cache, "sim")  # names come with the requests (bench.sim.workload)
        self.preemptible = sched_config.granularity != "none"
        self._schedule, self._record = schedule, record
        self.live: dict[str, SimRequest] = {}  # admitted or in the inbox, until finished
        self.inbox: list[SimRequest] = []
        self.inbox_cost_s = 0.0  # predicted seconds in the inbox (dispatched, not yet in the published state)
        self.inbox_at = INF
        self.plans: dict[int, BatchPlan] = {}
        self.work: dict[int, float] = {}  # started program -> remaining seconds
        self.cur: int | None = None
        self.since: float | None = None  # when the current program last started progressing
        self.mode = IDLE
        self.step_start = self.step_end = 0.0
        self.step_batch: list[SimRequest] | None = None  # None: every decoding request
        self.decoding: dict[str, SimRequest] = {}
        self.decode_token_s = 0.0  # sum of the decoding requests' per-token seconds
        self.tpot_decoding = 0  # decoding requests with their own TPOT SLO
        self.cadence = DecodeCadence()
        self.sched.decode_forecast = self._decode_forecast
        self._due: tuple[float, float] | None = None  # cached (TPOT target, urgent after) of the current program
        self._urgency: tuple[float, float] | None = None  # (predicted batch s, min finish-by) of the current plan
        self.wake_at = INF
        self.ver = 0
        self.event_at = 0.0  # time of the last published state (after every scheduler event; 0: at start)
        self.seq = 0  # published states so far
        self.publish_hook: Callable[[SimReplica, float], None] | None = None  # after every published state
        self.deliver_hook: Callable[[SimReplica, float], None] | None = None  # after every dispatch
        self.done_hook: Callable[[SimRequest, float], None] | None = None  # a request's last token is out
        self.preemptions = 0
        self.prefill_batches = 0
        self.decode_steps = 0

    # ------------------------------------------------------------------ inputs
    def deliver(self, t: float, sr: SimRequest) -> None:
        """The router dispatched ``sr`` at ``t``."""
        self.live[sr.request.request_id] = sr
        if self.mode == IDLE:
            self._admit(t, sr)
            self._settle(t)
        else:
            self.inbox.append(sr)
            self.inbox_cost_s += sr.cost_s
            if self.mode == PREFILL and self.preemptible and self.inbox_at == INF:
                self.inbox_at = t + self.cfg.boundary_delay_s
        self._reschedule()
        if self.deliver_hook is not None:
            self.deliver_hook(self, t)

    def wake(self, t: float) -> None:
        """Whatever was due at ``t`` (program end, inbox drain at a boundary, decode step start or end)."""
        if self.mode == DECODE:
            self._end_step(t)
        elif self.mode == PREFILL:
            cur = self.cur
            assert cur is not None and self.since is not None
            if t >= self.since + self.work[cur] - 1e-12:
                self._complete(t, cur)
            else:
                self._pause(t)
                if self.inbox and t >= self.inbox_at:
                    if self.decoding and self._decode_due(t):
                        self._start_step(t)  # the engine steps decode before draining its inbox
                    else:
                        self._drain(t)
                        self._settle(t)
                elif self.decoding:
                    self._start_step(t)
        self._reschedule()

    # ------------------------------------------------------------------ the engine's steps
    def _publish(self, t: float) -> None:
        """The engine publishes its queue state after every event (``ReplicaEngine._publish``)."""
        self.event_at = t
        self.seq += 1
        if self.publish_hook is not None:
            self.publish_hook(self, t)

    def _admit(self, t: float, sr: SimRequest) -> None:
        r = sr.request
        if self.prefix is not None and sr.names:
            match = self.prefix.admit(r.request_id, sr.idx, r.prompt_ids, names=sr.names)
            r.cached_tokens = r.prefilled = match.cached_tokens
            r.shares_with, r.shared_tokens = match.shares_with, match.shared_tokens
        self._apply(self.sched.on_arrival(r, t), t)
        self._publish(t)

    def _drain(self, t: float) -> None:
        if not self.inbox:
            return
        inbox, self.inbox = self.inbox, []
        self.inbox_cost_s, self.inbox_at = 0.0, INF
        for sr in inbox:
            self._admit(t, sr)

    def _apply(self, d: Decision, t: float) -> None:
        """Carry out a decision as the engine does (:func:`~replicas.scheduler.driver.apply_decision`)."""
        if apply_decision(d, t, self, self.sched):
            self.preemptions += 1

    # ------------------------------------------------------------------ DecisionTarget
    @property
    def current_batch(self) -> int | None:
        """The program that runs (or would run after a decode step), None when none."""
        return self.cur

    def refuse(self, request_id: str, now: float) -> None:
        """A request refused at admission, or expired: recorded as rejected."""
        sr = self.live.pop(request_id, None)
        if sr is not None:
            self._record(sr.idx, None)
            self._release(sr)

    def drop_program(self, batch_id: int) -> None:
        """Forget a program whose members are gone."""
        self.work.pop(batch_id, None)
        self.plans.pop(batch_id, None)
        if self.cur == batch_id:
            self.cur = self.since = None

    def suspend_current(self, now: float) -> None:
        """Credit the running program's progress and stop it (its remaining seconds are kept)."""
        self._pause(now)
        self.cur = self.since = None

    def start_program(self, plan: BatchPlan, now: float) -> bool:
        """A new program costs :func:`program_seconds` of its slices; a resumed one keeps what it had left."""
        bid = plan.batch_id
        if not plan.resume:
            if self.cache is not None:  # the KV the program writes (no memory limit on execution itself)
                for rid, (_, end) in zip(plan.request_ids, plan.ranges):
                    sr = self.live.get(rid)
                    if sr is not None and sr.names and self.cache.can_allocate(sr.idx, end):
                        self.cache.ensure_capacity(sr.idx, end)
            extra = self.cfg.seq_overhead_s * (len(plan.ranges) - 1)
            self.work[bid] = program_seconds(self.cost, plan.ranges) * self.cfg.exec_time_scale + extra
            self.prefill_batches += 1
        self.plans[bid] = plan
        self.cur, self.since = bid, now
        self._due = self._urgency = None
        return True

    def _pause(self, t: float) -> None:
        """Credit the current program's progress up to ``t`` (it goes on from ``t`` unless stopped)."""
        if self.cur is not None and self.since is not None:
            self.work[self.cur] -= t - self.since
            self.since = t

    def _complete(self, t: float, bid: int) -> None:
        self.work.pop(bid, None)
        plan = self.plans.pop(bid, None)
        self.cur = self.since = None
        prefix = self.prefix
        if prefix is not None and plan is not None:  # as the engine: publish, then let waiters attach
            for rid, (_, end) in zip(plan.request_ids, plan.ranges):
                sr = self.live.get(rid)
                if sr is not None:
                    prefix.passed(sr.idx, end)
            for rid in plan.request_ids:
                for waiter in prefix.waiting_on(rid):
                    if self.sched.is_deferred(waiter):
                        self.sched.set_cached(waiter, prefix.extend(waiter))
        d = self.sched.on_prefill_complete(bid, t)
        if prefix is not None:
            for rid in d.prefilled:
                prefix.prefilled(rid)
        self._apply(d, t)
        for rid in d.prefilled:
            sr = self.live.get(rid)
            if sr is not None:
                self._prefilled(t, sr)
        self._publish(t)
        if self.decoding and (self.cur is None or self._decode_due(t)):
            self._start_step(t)
        else:
            self._drain(t)
            self._settle(t)

    def _prefilled(self, t: float, sr: SimRequest) -> None:
        """``sr``'s prompt is computed and its first token sampled: it ends here (one output token) or
        decodes here (a colocated replica; :class:`bench.sim.pd.SimPrefillReplica` hands it over)."""
        self._record(sr.idx, t - sr.request.arrival_s)
        if sr.request.max_tokens <= 1:
            self._finish(t, sr)
        else:
            self._start_decoding(sr)

    def _start_decoding(self, sr: SimRequest) -> None:
        """``sr`` joins the decoding requests with its remaining ``max_tokens - 1`` tokens."""
        sr.tokens_left = sr.request.max_tokens - 1
        sr.token_s = decode_token_seconds(self.cost, sr.request.num_prompt_tokens)
        self.decoding[sr.request.request_id] = sr
        self.decode_token_s += sr.token_s
        self.tpot_decoding += sr.tpot_s is not None
        self._due = None

    def _release(self, sr: SimRequest) -> None:
        """Free what a request held in the prefix cache model (its published blocks stay cached)."""
        if self.prefix is not None and self.cache is not None:
            self.cache.free(sr.idx)
            self.prefix.forget(sr.request.request_id)

    def _finish(self, t: float, sr: SimRequest) -> None:
        """``sr``'s last token is out: it leaves, and the cluster hears of it (``done_hook``)."""
        self._leave(t, sr)
        if self.done_hook is not None:
            self.done_hook(sr, t)

    def _leave(self, t: float, sr: SimRequest) -> None:
        """``sr`` leaves this replica (finished, or handed over to a decode replica)."""
        rid = sr.request.request_id
        self.live.pop(rid, None)
        self._release(sr)
        if self.decoding.pop(rid, None) is not None:
            self.tpot_decoding -= sr.tpot_s is not None
            self.decode_token_s -= sr.token_s
        self._apply(self.sched.on_finish(rid, t), t)
        self._publish(t)

    def _settle(self, t: float) -> None:
        """After the inbox is drained: run the current program, else decode back to back, else idle."""
        if self.cur is not None:
            self.mode = PREFILL
            if self.since is None:
                self.since = t
                self._due = None
        elif self.decoding:
            self._start_step(t)
        else:
            self.mode = IDLE

    # ------------------------------------------------------------------ decode
    def _start_step(self, t: float) -> None:
        self._pause(t)
        self.since = None  # the program (if any) waits for the step
        cap, decoding = self.cfg.max_decoding, self.decoding
        batch: list[SimRequest] | None = None
        if len(decoding) > cap:
            batch = list(decoding.values())[:cap]
            for sr in batch:  # round robin when more decode than fit in one step
                rid = sr.request.request_id
                decoding[rid] = decoding.pop(rid)
        if self.cfg.decode_step_s is not None:
            took = self.cfg.decode_step_s
        elif self.cfg.decode_curve:
            took = decode_curve_seconds(self.cfg.decode_curve, len(decoding) if batch is None else len(batch))
        else:
            token_s = self.decode_token_s if batch is None else sum(sr.token_s for sr in batch)
            k = len(decoding) if batch is None else len(batch)
            took = (self.cost.a + token_s) * self.cfg.exec_time_scale + self.cfg.seq_overhead_s * (k - 1)
        self.mode, self.step_batch = DECODE, batch
        self.step_start, self.step_end = t, t + took

    def _end_step(self, t: float) -> None:
        self.cadence.record_step(self.step_start, t, self._step_sequences(self.step_batch))
        self.decode_steps += 1
        self._due = None
        batch = self.step_batch if self.step_batch is not None else self.decoding.values()
        self.mode = IDLE
        finished = []
        for sr in batch:  # nothing joins or leaves decoding during a step
            sr.tokens_left -= 1
            if sr.tokens_left <= 0:
                finished.append(sr)
        for sr in finished:
            self._finish(t, sr)
        self._drain(t)
        self._settle(t)

    def _decode_due(self, t: float) -> bool:
        """``ReplicaEngine._decode_due`` at ``t``: the engine's cadence, asked as the engine asks it."""
        tpot, urgent_after = self._due_params()
        return self.cadence.due(t, tpot, t > urgent_after)

    def _step_sequences(self, batch: list[SimRequest] | None = None) -> int:
        """Sequences in a step: ``batch`` when a step took a subset, else the next step's."""
        return len(batch) if batch is not None else min(len(self.decoding), self.cfg.max_decoding)

    def _tpot_target(self) -> float:
        if self.tpot_decoding:
            return min(sr.tpot_s for sr in self.decoding.values() if sr.tpot_s)  # type: ignore[type-var]
        return self.cfg.default_tpot_slo_s

    def _decode_forecast(self) -> DecodeForecast | None:
        """``ReplicaEngine._decode_forecast``: the steps the cadence will force into prefill."""
        return self.cadence.forecast(self._tpot_target(), self._step_sequences()) if self.decoding else None

    def _due_params(self) -> tuple[float, float]:
        """The TPOT target and the time after which the current program is urgent (``inf``: none runs)."""
        if self._due is not None:
            return self._due
        tpot = self._tpot_target()
        urgent_after = INF
        if self.cur is not None:
            if self._urgency is None:
                plan = self.plans[self.cur]
                alpha = self.sched.config.alpha
                finish_by = [self.live[r].request.finish_by(alpha) for r in plan.request_ids if r in self.live]
                self._urgency = (self.cost.predict_ranges(plan.ranges), min(finish_by, default=INF))
            remaining, finish_by_s = self._urgency
            urgent_after = self.cadence.urgent_after(finish_by_s, remaining, self._step_sequences())
        self._due = (tpot, urgent_after)
        return self._due

    # ------------------------------------------------------------------ timing
    def _reschedule(self) -> None:
        if self.mode == DECODE:
            at = self.step_end
        elif self.mode == PREFILL:
            assert self.cur is not None and self.since is not None
            at = self.since + self.work[self.cur]
            if self.inbox and self.inbox_at < at:
                at = self.inbox_at
            if self.decoding and self.preemptible:
                due = self.cadence.due_at(*self._due_params(), not_before=self.since) + self.cfg.boundary_delay_s
                if due < at:
                    at = due
        else:
            at = INF
        if at != self.wake_at:
            self.wake_at = at
            self._schedule(self, at)

    # ------------------------------------------------------------------ what the router sees
    def queue_snapshot(self) -> tuple[tuple[tuple[float, float], ...], tuple[tuple[float, float], ...], float]:
        """``(queued, running, running_remaining_s)`` as of the last event, in the shape
        :func:`router.placement.load_from_state` makes of the published queue state: ``(deadline,
        predicted_remaining_s)`` of waiting and suspended requests, and of the running batch's members."""
        return queue_snapshot(self.sched, self.event_at)

    def queued_work_s(self) -> float:
        """Predicted seconds of prefill work here: the published queue and what is in the inbox."""
        if not self.has_prefill_work:
            return self.inbox_cost_s
        queued, _, running_s = self.queue_snapshot()
        return sum(s for _, s in queued) + running_s + self.inbox_cost_s

    @property
    def has_prefill_work(self) -> bool:
        """Whether the published queue state lists any request (decoding ones are not listed)."""
        return len(self.live) > len(self.decoding) + len(self.inbox)
