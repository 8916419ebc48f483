"""The prefill half of :class:`~replicas.engine.ReplicaEngine`: the scheduler's decisions carried out on
the executor (start, suspend, drop a program; refuse a request) and a program's completion, where
every prefilled request (each of its choices) samples its first token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from replicas.engine_types import LiveRequest
from replicas.executor import Task
from replicas.kv_blocks import KVCacheFull
from replicas.logits_processing import prompt_token_logprobs
from replicas.model.batch import Segment
from replicas.parallel_sampling import fork_choices
from replicas.programs import PrefillItem, prefill_program
from replicas.sampling import sample_batch
from replicas.scheduler.events import BatchPlan


def _score_prompt(lr: LiveRequest, seg: Segment, rows: torch.Tensor) -> None:
    """Prompt logprobs of the tokens after ``seg``'s positions (row ``j`` predicts token ``start + j + 1``)."""
    prompt = lr.request.prompt_ids
    targets = prompt[seg.start + 1:min(seg.end + 1, len(prompt))]
    lr.prompt_logprobs.extend(prompt_token_logprobs(rows, targets, lr.params.prompt_logprobs or 0))


class PrefillRunner:
    """Mixin of :class:`~replicas.engine.ReplicaEngine`: the scheduler's :class:`DecisionTarget` and the
    completion of prefill programs (state and helpers live on the engine)."""

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
