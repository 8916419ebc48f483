"""The replica engine: one loop thread drives the scheduler, the executor and decoding.

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
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from replicas.compute_thread import ComputeThread
from replicas.detokenize import OutputStream
from replicas.engine_config import EngineConfig, cpu_threads_of
from replicas.engine_decode import DecodeBatcher
from replicas.engine_handover import Admitted, admit_handover, build_handover
from replicas.engine_stats import EngineStats
from replicas.engine_types import LiveRequest, RequestOutput, Sink, TokenLogprob, ends_request
from replicas.executor import PreemptibleExecutor, Task
from replicas.handover import HandoverError, KVHandover
from replicas.kv_blocks import KVCacheFull
from replicas.kv_cache import PagedKVCache
from replicas.logits_processing import prompt_token_logprobs
from replicas.model.batch import Segment
from replicas.model.decoder import DecoderModel
from replicas.parallel_sampling import drop_choices, fork_choices, retire_choice
from replicas.prefix_hash import PrefixNaming, prefix_salt
from replicas.prefix_tracker import PrefixTracker
from replicas.programs import PrefillItem, prefill_program
from replicas.sampling import RequestSampler, sample_batch
from replicas.sampling_params import SamplingParams
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.core import Scheduler
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.driver import apply_decision
from replicas.scheduler.events import BatchPlan, Decision
from replicas.scheduler.request import Request
from replicas.ttft_parts import EngineTTFT, TTFTTimer
from state.clock import WALL_CLOCK, Clock, require_clock
from state.schema import PrefixSummary

if TYPE_CHECKING:  # llguidance: loaded on the first structured-output request
    from replicas.structured_output import GrammarTokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")


def _score_prompt(lr: LiveRequest, seg: Segment, rows: torch.Tensor) -> None:
    """Prompt logprobs of the tokens after ``seg``'s positions (row ``j`` predicts token ``start + j + 1``)."""
    prompt = lr.request.prompt_ids
    targets = prompt[seg.start + 1:min(seg.end + 1, len(prompt))]
    lr.prompt_logprobs.extend(prompt_token_logprobs(rows, targets, lr.params.prompt_logprobs or 0))


def _log_loop_failure(done: Future[None]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.error("engine loop failed; the replica stops serving", exc_info=exc)


class KVMemory:
    """The scheduler's live view of the paged KV cache, with headroom kept for decoding.

    The scheduler calls :meth:`release` when a request's KV may be freed (never while a program
    still writes it), before it re-plans, so the pass sees the memory it just got back.
    """

    def __init__(self, cache: PagedKVCache, decoding: Callable[[], int]) -> None:
        self.cache = cache
        self.decoding = decoding
        self.seq_of: dict[str, int] = {}  # request id -> KV sequence id, until released

    def release(self, request_ids: Sequence[str]) -> None:
        """Free the KV blocks of ``request_ids`` (unknown ids are ignored)."""
        for rid in request_ids:
            seq_id = self.seq_of.pop(rid, None)
            if seq_id is not None:
                self.cache.allocator.free(seq_id)

    @property
    def free_tokens(self) -> int:
        """Tokens the free blocks can hold."""
        return self.cache.allocator.free_tokens

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self.cache.allocator.block_size

    def can_admit(self, extra_tokens: int) -> bool:
        """Whether ``extra_tokens`` fit while leaving two blocks per decoding sequence."""
        alloc = self.cache.allocator
        reserve = 2 * self.decoding()
        return -(-extra_tokens // alloc.block_size) + reserve <= alloc.num_free_blocks


class ReplicaEngine:
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
                calibrate_cost=config.calibrate_cost,
                granularity=config.granularity,
            ),
            memory=self.memory,
        )
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

    @property
    def role(self) -> str:
        """``colocated``, ``prefill`` (hands requests over after their first token) or ``decode``."""
        return self.config.role

    def add_handover(self, handover: KVHandover, sink: Sink) -> None:
        """Continue decoding a request a prefill engine handed over (:mod:`replicas.handover`); outputs go
        to ``sink`` from the next decoded token on. A handover that fails validation, or whose KV does
        not fit now, ends at once with finish_reason ``rejected`` and the reason (nothing is held)."""
        self._inbox.put(("handover", (handover, sink)))
        self._wake.set()

    async def continue_decoding(self, handover: KVHandover) -> AsyncIterator[RequestOutput]:
        """:meth:`add_handover` as a stream (as :meth:`generate`; closing it early aborts the request)."""
        async for out in self._stream(handover.request_id, lambda sink: self.add_handover(handover, sink)):
            yield out

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
        """Whether a decode step now would push a member of the running batch past its deadline."""
        plan = self._plans.get(self._current) if self._current is not None else None
        if plan is None:
            return False
        remaining = self.scheduler.cost_model.predict_ranges(plan.ranges)
        deadline = min((self.live[rid].request.deadline for rid in plan.request_ids if rid in self.live),
                       default=float("inf"))
        return self.decoder.cadence.prefill_urgent(now, deadline, remaining)

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
        if params.json_schema is not None:
            if self._grammar_tokenizer is None:  # once per engine, on first use (about a second)
                from replicas.structured_output import GrammarTokenizer

                self._grammar_tokenizer = GrammarTokenizer(self.tokenizer.to_json(), self.vocab_size,
                                                           self.eos_token_ids)
            sampler.grammar = self._grammar_tokenizer.matcher(params.json_schema)
        return sampler

    def _output_stream(self, params: SamplingParams) -> OutputStream:
        return OutputStream(params, self.eos_token_ids, self.tokenizer.decode)

    def _admit_handover(self, h: KVHandover, sink: Sink) -> None:
        """Admit a handed-over request into the decode batch, or refuse it at once (nothing held)."""
        rid = getattr(h, "request_id", "?")
        started = self.clock()
        try:
            if self.role == "prefill":
                raise HandoverError("handover", "a prefill replica does not decode handed-over requests")
            if not isinstance(h, KVHandover):
                raise HandoverError("handover", f"expected a KVHandover, got {type(h).__name__}")
            h.validate(self.kv, self.prefix.salt, self.vocab_size)
            if rid in self.live:
                raise HandoverError("handover.request.request_id", f"{rid!r} is already live on this replica")
            got = admit_handover(h, sink, next(self._seq_ids), self.kv, self.prefix,
                                 eos_token_ids=self.eos_token_ids, decode_text=self.tokenizer.decode,
                                 can_admit=self.memory.can_admit)
        except (HandoverError, ValueError) as exc:
            got = str(exc)
        if not isinstance(got, Admitted):
            self.counters["rejected"] += 1
            prompt = h.request.num_prompt_tokens if isinstance(h, KVHandover) else 0
            sink(RequestOutput(rid, (), "", "rejected", prompt, error=got))
            return
        lr = got.live
        self.live[rid] = lr
        self.memory.seq_of[rid] = lr.seq_id
        self.decoder.add(lr.key, lr)
        self.counters["handovers_in"] += 1
        self.counters["handover_bytes_in"] += h.nbytes
        self.counters["handover_cached_tokens"] += got.cached_tokens
        self.counters["handover_admit_us"] += int((self.clock() - started) * 1e6)

    def _hand_over(self, lr: LiveRequest) -> None:
        """A prefill engine's request has its first token: send its KV and state on, free its sequence
        (its published prompt blocks stay in the prefix cache), end its stream with the handover."""
        h = build_handover(lr, self.kv, self.prefix, self.clock, source=self.replica_id)
        self.counters["handovers_out"] += 1
        self.counters["handover_bytes_out"] += h.nbytes
        self.counters["handover_gather_us"] += int(h.gather_s * 1e6)
        self._finish_request(lr, None, None)
        lr.sink(RequestOutput(lr.request.request_id, (), "", "handover", lr.request.num_prompt_tokens,
                              len(lr.stream.token_ids), handover=h))

    def _apply(self, d: Decision, now: float) -> None:
        """Carry out a scheduling decision (:func:`~replicas.scheduler.driver.apply_decision`)."""
        if apply_decision(d, now, self, self.scheduler):
            self.counters["preemptions"] += 1

    # ------------------------------------------------------------------ DecisionTarget
    @property
    def current_batch(self) -> int | None:
        """The batch id of the program the executor runs (None: none)."""
        return self._current

    def refuse(self, request_id: str, now: float) -> None:
        """A request refused at admission, or expired (waiting or suspended)."""
        lr = self.live.get(request_id)
        if lr is not None:
            self.counters["rejected"] += 1
            self._emit_final(request_id, "rejected", lr.request.reject_reason or "rejected by admission control",
                             retry_after_s=lr.request.retry_after_s)

    def drop_program(self, batch_id: int) -> None:
        """Close the program of a batch whose members are all gone."""
        task = self._tasks.pop(batch_id, None)
        self._plans.pop(batch_id, None)
        if task is not None:
            task.program.close()
        if self._current == batch_id:
            self._current = None

    def suspend_current(self, now: float) -> None:
        """The running program stops here (the loop is at an operator boundary); its generator is kept."""
        for timer in self._running_timers():
            timer.stopped(now)
        self._current = None

    def start_program(self, plan: BatchPlan, now: float) -> bool:
        """Build a new program (KV allocated for its ranges) or pick up a suspended one."""
        if not plan.resume:
            items, scored = [], {}
            try:
                for rid, (start, end) in zip(plan.request_ids, plan.ranges):
                    lr = self.live[rid]
                    self.kv.allocator.ensure_capacity(lr.seq_id, end)
                    prompt = lr.request.prompt_ids
                    wants_all = lr.params.prompt_logprobs is not None
                    if wants_all:
                        scored[lr.seq_id] = lr
                    items.append(PrefillItem(lr.seq_id, prompt, start, end, want_logits=end == len(prompt),
                                             all_logits=wants_all))
                    self.counters["prefill_tokens"] += end - start
            except KVCacheFull as exc:
                self._plans[plan.batch_id] = plan
                self._fail_batch(plan.batch_id, f"KV cache exhausted: {exc}")
                return False
            self._tasks[plan.batch_id] = self.executor.start(
                prefill_program(self.model, self.kv, items, self.config.chunk_tokens, on_pass=self._pass_done,
                                on_logits=lambda seg, rows: _score_prompt(scored[seg.seq_id], seg, rows)),
                label=f"batch-{plan.batch_id}",
            )
            self.counters["prefill_batches"] += 1
        self._plans[plan.batch_id] = plan
        self._current = plan.batch_id
        for timer in self._running_timers():
            timer.started(now)
        return True

    def _pass_done(self, segments: Sequence[Segment]) -> None:
        """A pass of a prefill program ran through every layer: publish its members' full blocks."""
        for seg in segments:
            self.prefix.passed(seg.seq_id, seg.end)

    def _complete_prefill(self, batch_id: int, task: Task) -> None:
        now = self.clock()
        self._tasks.pop(batch_id, None)
        for timer in self._running_timers():  # before the decision, which may start its next chunk
            timer.stopped(now)
        plan = self._plans.pop(batch_id, None)
        self._current = None
        for rid in plan.request_ids if plan is not None else ():  # requests that waited for these blocks
            for waiter in self.prefix.waiting_on(rid):
                if self.scheduler.is_deferred(waiter):
                    self.scheduler.set_cached(waiter, self.prefix.extend(waiter))
        decision = self.scheduler.on_prefill_complete(batch_id, now, compute_s=task.busy_s)
        for rid in decision.prefilled:
            self.prefix.prefilled(rid)
        self._apply(decision, now)
        logits: dict[int, torch.Tensor] = task.result
        members: list[LiveRequest] = []  # every choice of every prefilled request samples its first token
        for lr in (self.live[rid] for rid in decision.prefilled if rid in self.live):
            try:
                members.extend(fork_choices(lr, self.kv, lambda: next(self._seq_ids),
                                            lambda p, r=lr.request: self._sampler(r, p), self._output_stream))
            except KVCacheFull as exc:
                self._finish_request(lr, "error", f"KV cache exhausted forking {lr.params.n} choices: {exc}")
        if members:
            rows = torch.stack([logits[self.live[lr.request.request_id].seq_id] for lr in members])
            sampled = sample_batch(rows, [lr.sampler for lr in members])
            prefill_end, now = now, self.clock()
            for lr, (token, logprob) in zip(members, sampled):
                self._emit_token(lr, token, now, logprob, lr.timer.finished(prefill_end, now) if lr.timer else None)
        self._publish(now)

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

    def _emit_token(self, lr: LiveRequest, token: int, now: float, logprob: TokenLogprob | None = None,
                    ttft_timing: EngineTTFT | None = None) -> None:
        """Emit one choice's next token; a finished choice retires, the last one finishes the request."""
        step = lr.stream.append(token)
        parent = self.live[lr.request.request_id]  # choice 0 (``lr`` itself unless n > 1)
        if step.finish_reason is not None:
            parent.open_choices -= 1
        first = not lr.emitted_first
        lr.emitted_first = True
        prompt_logprobs = tuple(parent.prompt_logprobs) if first and parent.params.prompt_logprobs is not None else None
        lr.sink(RequestOutput(
            lr.request.request_id, (token,), step.text_delta, step.finish_reason, lr.request.num_prompt_tokens,
            len(lr.stream.token_ids), ttft_s=(now - lr.request.arrival_s) if first else None,
            ttft_timing=ttft_timing if first else None, logprobs=None if logprob is None else (logprob,),
            index=lr.index, choices_left=parent.open_choices, prompt_logprobs=prompt_logprobs,
        ))
        if step.finish_reason is None and self.role == "prefill" and parent.params.n == 1 \
                and parent.params.json_schema is None:
            # a handover carries one sequence and no grammar state: n > 1 and structured output decode here
            self._hand_over(lr)
        elif step.finish_reason is None:
            self.decoder.add(lr.key, lr)
        elif parent.open_choices == 0:
            self._finish_request(parent, None, None)
        else:
            retire_choice(lr, self.decoder, self.kv)

    def _finish_request(self, lr: LiveRequest, reason: str | None, error: str | None) -> None:
        """End a request: all its choices (``lr`` may be any of them), with ``reason`` (an error) if given."""
        rid = lr.request.request_id
        parent = self.live.get(rid, lr)
        drop_choices(parent, self.decoder, self.kv)
        if reason is not None:
            lr.sink(RequestOutput(rid, (), "", reason, lr.request.num_prompt_tokens, len(lr.stream.token_ids),
                                  error=error, index=lr.index))
        now = self.clock()
        self._apply(self.scheduler.on_finish(rid, now), now)  # frees its KV (published blocks stay cached)
        self.memory.release([rid])  # a handed-over request's KV, which the scheduler never saw (else a no-op)
        self.live.pop(rid, None)
        self.prefix.forget(rid)
        self._publish(now)

    def _emit_final(self, rid: str, reason: str, error: str | None, retry_after_s: float | None = None) -> None:
        """End a request the scheduler no longer tracks (rejected, failed, shut down): free all it held."""
        lr = self.live.pop(rid, None)
        if lr is None:
            return
        drop_choices(lr, self.decoder, self.kv)
        self.memory.release([rid])
        self.kv.allocator.free(lr.seq_id)
        self.prefix.forget(rid)
        lr.sink(RequestOutput(rid, (), "", reason, lr.request.num_prompt_tokens, len(lr.stream.token_ids),
                              error=error, retry_after_s=retry_after_s))

    def _fail_batch(self, batch_id: int | None, error: str) -> None:
        self.counters["errors"] += 1
        plan = self._plans.pop(batch_id, None) if batch_id is not None else None
        if batch_id is not None:
            self._tasks.pop(batch_id, None)
        if self._current == batch_id:
            self._current = None
        for rid in plan.request_ids if plan else ():
            now = self.clock()
            self._apply(self.scheduler.on_abort(rid, now), now)
            self._emit_final(rid, "error", error)

    def _publish(self, now: float) -> None:
        alloc = self.kv.allocator
        version, names = self.prefix.summary()
        counters = {**self.counters, "prefix_queried_tokens": alloc.queried_tokens,
                    "prefix_hit_tokens": alloc.hit_tokens, "prefix_evictions": alloc.evictions}
        stats = EngineStats.from_queue(
            self.scheduler.stats(now), model=self.model.name, updated_at=now, kv_free_tokens=alloc.free_tokens,
            kv_total_tokens=alloc.num_blocks * alloc.block_size, decoding=len(self.decoder.active),
            preemptions=self.counters["preemptions"], counters=counters, role=self.role,
            max_decoding=self.config.max_decoding,
            prefix=PrefixSummary(version, self.prefix.routing_block_tokens, self.prefix.salt, names)
            if self.prefix.enabled else None,
        )
        self._stats = stats
        if self.on_state_change is not None:
            try:
                self.on_state_change(stats)
            except Exception:  # publishing is best effort; serving goes on
                log.exception("on_state_change failed")
