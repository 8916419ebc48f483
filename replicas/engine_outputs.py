"""What :class:`~replicas.engine.ReplicaEngine` sends a request's sink: each choice's tokens, the finish of
the whole request when its last choice ends, and the final word for a request the scheduler dropped."""

from __future__ import annotations

from replicas.engine_types import LiveRequest, RequestOutput, TokenLogprob
from replicas.parallel_sampling import drop_choices, retire_choice
from replicas.ttft_parts import EngineTTFT


class OutputEmitter:
    """Mixin of :class:`~replicas.engine.ReplicaEngine`: emitting tokens and ending requests."""

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
                and not parent.params.constrained:
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
