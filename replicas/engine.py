"""The replica engine: one loop thread drives the scheduler, the executor and decoding.

Its halves live beside it as mixins: :mod:`replicas.engine_prefill` (the scheduler's decisions on the
executor, first tokens), :mod:`replicas.engine_outputs` (tokens and finishes to the sinks) and
:mod:`replicas.engine_roles` (P/D handovers); :mod:`replicas.kv_memory` is the scheduler's view of KV.

Arrivals and aborts come from any thread through an inbox. The loop advances the current
prefill program until it finishes or a preemption point finds work in the inbox (or a decode
step due); only then does it hand events to the scheduler, which decides what runs next. The
scheduler never runs per operator or per iteration: it sees arrivals, completions, aborts and
finishes, nothing else. Decode steps of decoding requests interleave at operator boundaries of
a running prefill at the cadence their TPOT SLOs need.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from replicas.compute_thread import ComputeThread
from replicas.decode_cadence import DecodeForecast
from replicas.detokenize import OutputStream
from replicas.engine_config import EngineConfig, cpu_threads_of
from replicas.engine_decode import DecodeBatcher
from replicas.engine_outputs import OutputEmitter
from replicas.engine_prefill import PrefillRunner
from replicas.engine_roles import HandoverRole
from replicas.engine_stats import EngineStats
from replicas.engine_types import LiveRequest, RequestOutput, Sink, TokenLogprob, ends_request
from replicas.executor import PreemptibleExecutor, Task
from replicas.kv_blocks import KVCacheFull
from replicas.kv_cache import PagedKVCache
from replicas.kv_memory import KVMemory
from replicas.model.decoder import DecoderModel
from replicas.parallel_sampling import drop_choices
from replicas.prefix_hash import PrefixNaming, prefix_salt
from replicas.prefix_tracker import PrefixTracker
from replicas.sampling import RequestSampler
from replicas.sampling_params import SamplingParams
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.core import Scheduler
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.driver import apply_decision
from replicas.scheduler.events import BatchPlan, Decision
from replicas.scheduler.request import Request
from replicas.ttft_parts import TTFTTimer
from state.clock import WALL_CLOCK, Clock, require_clock
from state.schema import PrefixSummary

if TYPE_CHECKING:  # llguidance: loaded on the first structured-output request
    from replicas.structured_output import GrammarTokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")


def _log_loop_failure(done: Future[None]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.error("engine loop failed; the replica stops serving", exc_info=exc)


class ReplicaEngine(PrefillRunner, OutputEmitter, HandoverRole):
    """Model + paged KV cache + preemptible executor + event-driven scheduler, one loop thread."""

    def __init__(
        self, config: EngineConfig, *, model: DecoderModel | None = None, cost_model: CostModel | None = None,
        tokenizer: Any = None, clock: Clock = WALL_CLOCK,  # noqa: ANN401
        on_state_change: Callable[[EngineStats], None] | None = None,
    ) -> None:
        from replicas.model.default_model import prepare_default_model
        from replicas.model.tokenizer import Tokenizer
        from replicas.profiling import load_or_profile

        self.config = config
        self._loop_started = threading.Event()
        self._loop_done: Future[None] | None = None
        # every torch operation of this engine runs on this one thread (see replicas.compute_thread)
        self._compute = ComputeThread("flowprefill-engine")

        def build() -> None:
            if config.device == "cpu":  # before the model and its profile (whose name carries the count)
                torch.set_num_threads(cpu_threads_of(config))
            self.compute_threads = torch.get_num_threads()
            model_dir = config.model or str(prepare_default_model())
            self.model = model or DecoderModel.load(model_dir, dtype=config.dtype, device=config.device)
            self.tokenizer = tokenizer or Tokenizer.from_dir(model_dir)
            self.cost_model = cost_model or load_or_profile(
                self.model, config.profile, max_tokens=config.profile_max_tokens
            )
            self.kv = PagedKVCache.from_budget(
                self.model.kv_spec(config.block_size), config.kv_cache_bytes, self.model.device,
                enable_prefix_caching=config.enable_prefix_caching, cache_share=config.prefix_cache_share)

        try:
            self._compute.call(build)
        except BaseException:
            self._compute.close()
            raise
        self.executor = PreemptibleExecutor(config.granularity, config.max_inflight, self.model.device)
        self.clock = require_clock(clock, "ReplicaEngine")
        self.live: dict[str, LiveRequest] = {}
        self.decoder = DecodeBatcher(self.model, self.kv, config.max_decoding, clock)
        self.prefix = PrefixTracker(self.kv.allocator, prefix_salt(self.model.name, config.dtype))
        self.memory = KVMemory(self.kv, lambda: len(self.decoder.active))
        self.scheduler = Scheduler(
            self.cost_model,
            SchedulerConfig(
                policy=config.policy, alpha=config.alpha, short_threshold=config.short_threshold,
                batch_token_budget=config.batch_token_budget, chunk_tokens=config.policy_chunk_tokens,
                max_suspended_batches=config.max_suspended_batches, admission_control=config.admission_control,
                late_reject_factor=config.late_reject_factor, max_queued_work_s=config.max_queued_work_s,
                urgent_reserve_window_s=config.urgent_reserve_window_s, calibrate_cost=config.calibrate_cost,
                granularity=config.granularity,
            ),
            memory=self.memory,
        )
        self.scheduler.decode_forecast = self._decode_forecast
        self.on_state_change = on_state_change
        self.eos_token_ids = tuple(dict.fromkeys((*self.tokenizer.eos_token_ids, *self.model.config.eos_token_ids)))
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._tasks: dict[int, Task] = {}
        self._plans: dict[int, BatchPlan] = {}
        self._current: int | None = None  # batch id of the program the executor runs
        self._seq_ids = itertools.count()
        self._stop = threading.Event()
        self._grammar_tokenizer: GrammarTokenizer | None = None
        self.counters = {"preemptions": 0, "prefill_batches": 0, "decode_steps": 0, "rejected": 0, "errors": 0,
                         "prefill_tokens": 0,
                         "handovers_out": 0, "handover_bytes_out": 0, "handover_gather_us": 0,
                         "handovers_in": 0, "handover_bytes_in": 0, "handover_admit_us": 0,
                         "handover_cached_tokens": 0}
        self.replica_id = ""  # set by the deployment: names the source of this engine's handovers
        self._publish(self.clock())  # the idle state, so a replica is routable before its first event

    # ------------------------------------------------------------------ public, thread-safe
    kind = "flowprefill"

    @property
    def model_name(self) -> str:
        """The served model's name (its directory name)."""
        return self.model.name

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output the model's positions allow."""
        return self.model.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (prompt token ids must be below it)."""
        return self.model.config.vocab_size

    @property
    def policy_name(self) -> str:
        """The scheduling policy: flowprefill, chunked or fcfs."""
        return self.config.policy

    def prefix_naming(self) -> dict[str, object] | None:
        """How this engine names prompt prefixes (:class:`~replicas.prefix_hash.PrefixNaming`), or None
        without a prefix cache."""
        if not self.prefix.enabled:
            return None
        return PrefixNaming(self.prefix.salt, self.kv.allocator.block_size, self.prefix.stride).to_dict()

    def is_alive(self) -> bool:
        """Whether the loop runs."""
        return self._loop_done is not None and not self._loop_done.done()

    @property
    def compute_thread_ident(self) -> int | None:
        """``threading.get_ident()`` of the thread all of this engine's torch work runs on."""
        return self._compute.ident

    def start(self) -> None:
        """Start the loop on the compute thread (idempotent); raises after :meth:`shutdown`."""
        if self._stop.is_set():
            raise RuntimeError("engine: start() after shutdown()")
        if self._loop_done is None:
            self._loop_done = self._compute.submit(self._loop)
            self._loop_done.add_done_callback(_log_loop_failure)  # when it happens, as a dying thread did
            self._loop_started.wait(10.0)

    def run_on_compute_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (torch work on this engine's model, e.g. a benchmark's measurement) on the thread
        that computes everything else, before :meth:`start` or after :meth:`shutdown`'s loop has ended."""
        if self.is_alive():
            raise RuntimeError("engine: run_on_compute_thread() while the loop runs would wait for its end")
        return self._compute.call(fn)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the loop; requests still live get an ``abort`` output."""
        self._stop.set()
        self._wake.set()
        if self._loop_done is not None:
            try:
                self._loop_done.result(timeout_s)
            except FuturesTimeout:
                log.warning("engine loop did not stop within %.1f s", timeout_s)
            except Exception:  # already logged by _log_loop_failure
                pass
        self._compute.close(timeout_s)

    def add_request(self, request: Request, params: SamplingParams, sink: Sink) -> None:
        """Queue ``request``; its outputs go to ``sink`` (called on the engine thread). The engine has
        accepted it now: its TTFT decomposition's ``queue_s`` starts here."""
        self._inbox.put(("add", (request, params, sink, self.clock())))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Abort a request in any state; its KV blocks are freed."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def generate(self, request: Request, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Submit ``request`` and stream its outputs; closing the stream early aborts it."""
        async for out in self._stream(request.request_id, lambda sink: self.add_request(request, params, sink)):
            yield out

    async def _stream(self, request_id: str, submit: Callable[[Sink], None]) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        submit(lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = ends_request(out)
                yield out
        finally:
            if not finished:  # the consumer went away (client disconnect): free the request's KV
                self.abort(request_id)

    def stats(self) -> EngineStats:
        """The latest queue-state snapshot (updated after every event)."""
        return self._stats

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        self._loop_started.set()
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                task = self._tasks.get(self._current) if self._current is not None else None
                if task is not None:
                    ran_from = self.clock()
                    try:
                        finished = self.executor.run(task, self._should_stop)
                    except Exception as exc:  # a broken program must not take the replica down
                        log.exception("prefill batch %s failed", self._current)
                        self._fail_batch(self._current, f"prefill failed: {exc}")
                        continue
                    ran_s = self.clock() - ran_from
                    for timer in self._running_timers():
                        timer.computed(ran_s)
                    if finished:
                        self._complete_prefill(self._current, task)
                if self.decoder.active and (self._current is None or self._decode_due()):
                    step_from = self.clock()
                    self._decode_step()
                    step_s = self.clock() - step_from
                    for timer in self._running_timers():  # a step between two operators of a running prefill
                        timer.interleaved(step_s)
                if self._current is None and not self.decoder.active and self._inbox.empty():
                    self._wake.wait(0.5)
                    self._wake.clear()
        finally:
            for rid in list(self.live):
                self._emit_final(rid, "abort", "engine shut down")

    def _running_timers(self) -> list[TTFTTimer]:
        """The TTFT timers of the members of the batch the executor runs now."""
        plan = self._plans.get(self._current) if self._current is not None else None
        if plan is None:
            return []
        return [lr.timer for rid in plan.request_ids if (lr := self.live.get(rid)) is not None and lr.timer]

    def _should_stop(self) -> bool:
        return not self._inbox.empty() or (bool(self.decoder.active) and self._decode_due())

    def _decode_due(self) -> bool:
        now = self.clock()
        return self.decoder.due(now, self._tpot_target(), self._prefill_urgent(now))

    def _prefill_urgent(self, now: float) -> bool:
        """Whether a decode step now would push a member of the running batch past its finish-by time
        (its deadline less the batching margin, :meth:`Request.finish_by`)."""
        plan = self._plans.get(self._current) if self._current is not None else None
        if plan is None:
            return False
        remaining = self.scheduler.cost_model.predict_ranges(plan.ranges)
        alpha = self.scheduler.config.alpha
        finish_by = min((self.live[rid].request.finish_by(alpha) for rid in plan.request_ids if rid in self.live),
                        default=float("inf"))
        return self.decoder.cadence.prefill_urgent(now, finish_by, remaining, self.decoder.next_step_sequences)

    def _decode_forecast(self) -> DecodeForecast | None:
        """The steps the decode cadence will force into prefill (None while nothing decodes)."""
        if not self.decoder.active:
            return None
        return self.decoder.cadence.forecast(self._tpot_target(), self.decoder.next_step_sequences)

    def _tpot_target(self) -> float:
        slos = [lr.request.tpot_slo_s for lr in self.decoder.active.values() if lr.request.tpot_slo_s]
        return min(slos, default=self.config.default_tpot_slo_s)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            now = self.clock()
            if kind == "add":
                self._admit(*payload, now)
            elif kind == "handover":
                self._admit_handover(*payload)
            elif kind == "abort":
                lr = self.live.get(payload)
                if lr is not None:
                    drop_choices(lr, self.decoder, self.kv)
                    self._apply(self.scheduler.on_abort(payload, now), now)
                    if lr.extra.get("handover"):  # the scheduler never saw it: its KV is this engine's to free
                        self.memory.release([payload])
                    self.live.pop(payload, None)
                    self.prefix.forget(payload)
                    lr.sink(RequestOutput(payload, (), "", "abort", lr.request.num_prompt_tokens,
                                          len(lr.stream.token_ids)))
            self._publish(now)

    def _admit(self, request: Request, params: SamplingParams, sink: Sink, accepted_s: float, now: float) -> None:
        waiting = len(self.scheduler.waiting_ids)
        alloc = self.kv.allocator
        error = None
        if waiting >= self.config.max_waiting:
            error = f"replica queue full ({waiting} waiting)"
        elif -(-(request.num_prompt_tokens + 1) // alloc.block_size) > alloc.num_blocks:
            error = (f"the prompt's {request.num_prompt_tokens} tokens need more KV blocks than this replica's cache "
                     f"holds ({alloc.num_blocks} blocks of {alloc.block_size} tokens): it can never run here")
        if error is not None:
            self.counters["rejected"] += 1
            sink(RequestOutput(request.request_id, (), "", "rejected", request.num_prompt_tokens, error=error))
            return
        choice = params.for_choice(0)
        try:
            sampler = self._sampler(request, choice)
        except ValueError as exc:  # a schema the grammar library refuses (the router checks it first)
            self.counters["rejected"] += 1
            sink(RequestOutput(request.request_id, (), "", "error", request.num_prompt_tokens,
                               error=f"structured output: {exc}"))
            return
        lr = LiveRequest(request, params, sink, next(self._seq_ids), sampler,
                         self._output_stream(choice), position=request.num_prompt_tokens, timer=TTFTTimer(accepted_s))
        if params.prompt_logprobs is not None:  # the first prompt token has none; the prefill computes the rest
            lr.prompt_logprobs.append(TokenLogprob(request.prompt_ids[0], None))
        match = self.prefix.admit(request.request_id, lr.seq_id, request.prompt_ids,
                                  reuse=params.prompt_logprobs is None)
        request.cached_tokens = request.prefilled = match.cached_tokens
        request.shares_with, request.shared_tokens = match.shares_with, match.shared_tokens
        self.live[request.request_id] = lr
        self.memory.seq_of[request.request_id] = lr.seq_id
        self._apply(self.scheduler.on_arrival(request, now), now)

    def _sampler(self, request: Request, params: SamplingParams) -> RequestSampler:
        sampler = RequestSampler(params, self.model.device, prompt_ids=request.prompt_ids,
                                 eos_token_ids=self.eos_token_ids)
        if params.constrained:
            if self._grammar_tokenizer is None:  # once per engine, on first use (about a second)
                from replicas.structured_output import GrammarTokenizer

                self._grammar_tokenizer = GrammarTokenizer(self.tokenizer.to_json(), self.vocab_size,
                                                           self.eos_token_ids)
            sampler.grammar = self._grammar_tokenizer.matcher(params)
        return sampler

    def _output_stream(self, params: SamplingParams) -> OutputStream:
        return OutputStream(params, self.eos_token_ids, self.tokenizer.decode)

    def _apply(self, d: Decision, now: float) -> None:
        """Carry out a scheduling decision (:func:`~replicas.scheduler.driver.apply_decision`)."""
        if apply_decision(d, now, self, self.scheduler):
            self.counters["preemptions"] += 1

    # ------------------------------------------------------------------ decoding (prefill: engine_prefill.py)
    def _decode_step(self) -> None:
        try:
            results = self.decoder.step()
        except KVCacheFull as exc:
            victim = self.decoder.newest()
            self._finish_request(victim, "error", f"KV cache exhausted while decoding: {exc}")
            return
        now = self.clock()
        self.counters["decode_steps"] += 1
        bs = self.kv.allocator.block_size
        for lr, token, logprob in results:
            # a block of this sequence just filled: the next turn may reuse it (choice 0's only)
            if lr.position % bs == 0 and lr.index == 0:
                self.prefix.decoded(lr.request.request_id, [*lr.request.prompt_ids, *lr.stream.token_ids],
                                    lr.position)
            self._emit_token(lr, token, now, logprob)

    def _publish(self, now: float) -> None:
        alloc = self.kv.allocator
        version, names = self.prefix.summary()
        counters = {**self.counters, "prefix_queried_tokens": alloc.queried_tokens,
                    "prefix_hit_tokens": alloc.hit_tokens, "prefix_evictions": alloc.evictions}
        stats = EngineStats.from_queue(
            self.scheduler.stats(now), model=self.model.name, updated_at=now, kv_free_tokens=alloc.free_tokens,
            kv_total_tokens=alloc.num_blocks * alloc.block_size, decoding=len(self.decoder.active),
            preemptions=self.counters["preemptions"], counters=counters, role=self.role,
            max_decoding=self.config.max_decoding, decode_step_interval_s=self.decoder.step_interval_s,
            tpot_s=self.decoder.tpot_s if self.decoder.active else 0.0,
            tpot_target_s=self._tpot_target() if self.decoder.active else 0.0,
            prefix=PrefixSummary(version, self.prefix.routing_block_tokens, self.prefix.salt, names)
            if self.prefix.enabled else None,
        )
        self._stats = stats
        if self.on_state_change is not None:
            try:
                self.on_state_change(stats)
            except Exception:  # publishing is best effort; serving goes on
                log.exception("on_state_change failed")
