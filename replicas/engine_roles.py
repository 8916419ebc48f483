"""The P/D roles of :class:`~replicas.engine.ReplicaEngine`: a decode engine admits handovers into its
decode batch; a prefill engine hands each request on after its first token (replicas/handover.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from replicas.engine_handover import Admitted, admit_handover, build_handover
from replicas.engine_types import LiveRequest, RequestOutput, Sink
from replicas.handover import HandoverError, KVHandover


class HandoverRole:
    """Mixin of :class:`~replicas.engine.ReplicaEngine`: its P/D role and the handover in both directions."""

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
