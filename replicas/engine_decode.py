"""Batched decode steps for the replica engine's decoding requests (when to step: :mod:`replicas.decode_cadence`)."""

from __future__ import annotations

import torch

from replicas.decode_cadence import STEP_EMA_WEIGHT, DecodeCadence
from replicas.engine_types import LiveRequest, TokenLogprob
from replicas.executor import PreemptibleExecutor
from replicas.kv_cache import PagedKVCache
from replicas.model.decoder import DecoderModel
from replicas.programs import decode_program
from replicas.sampling import sample_batch
from state.clock import WALL_CLOCK, Clock, require_clock


class DecodeBatcher:
    """Decoding sequences, stepped together one token at a time (at most ``max_batch`` per step)."""

    def __init__(self, model: DecoderModel, kv: PagedKVCache, max_batch: int,
                 clock: Clock = WALL_CLOCK) -> None:
        self.model = model
        self.kv = kv
        self.max_batch = max_batch
        self.clock = require_clock(clock, "DecodeBatcher")
        self.active: dict[str, LiveRequest] = {}
        self.executor = PreemptibleExecutor("none", device=model.device)
        self.cadence = DecodeCadence()
        self.step_interval_s = 0.0  # smoothed time between consecutive steps of a busy batch (0: none yet)
        self._busy_since_step: float | None = None  # the last step's end while sequences kept decoding

    def add(self, key: str, live: LiveRequest) -> None:
        """Start (or keep) decoding the sequence ``key`` (:attr:`LiveRequest.key`: a request id, or a
        choice of an ``n``-choice request)."""
        self.active.setdefault(key, live)

    def remove(self, key: str) -> None:
        """Stop decoding the sequence ``key`` (finished or aborted)."""
        self.active.pop(key, None)
        if not self.active:  # an idle gap is no inter-token time
            self._busy_since_step = None

    @property
    def tpot_s(self) -> float:
        """Each decoding stream's time per output token now: the smoothed step interval, times the
        steps a round over the batch takes when more sequences decode than one step holds (0: unknown)."""
        return self.step_interval_s * max(-(-len(self.active) // self.max_batch), 1)

    def newest(self) -> LiveRequest:
        """The most recently added request (the one to drop when memory runs out)."""
        return next(reversed(self.active.values()))

    @property
    def next_step_sequences(self) -> int:
        """How many sequences the next step takes."""
        return min(len(self.active), self.max_batch)

    def due(self, now: float, tpot_target_s: float, prefill_urgent: bool) -> bool:
        """Whether a step should interleave with a running prefill now (:meth:`DecodeCadence.due`)."""
        return self.cadence.due(now, tpot_target_s, prefill_urgent)

    def step(self) -> list[tuple[LiveRequest, int, TokenLogprob | None]]:
        """One decode step; returns each stepped request with its sampled token (and its log
        probabilities, when the request asked for them).

        Raises :class:`~replicas.kv_blocks.KVCacheFull` (nothing stepped) when a sequence cannot grow.
        """
        started = self.clock()
        batch = list(self.active.values())[: self.max_batch]
        for live in batch:
            self.kv.allocator.ensure_capacity(live.seq_id, live.position + 1)
        triples = [(live.seq_id, live.stream.token_ids[-1], live.position) for live in batch]
        logits = self.executor.run_to_completion(decode_program(self.model, self.kv, triples))
        rows = torch.stack([logits[live.seq_id] for live in batch])
        sampled = sample_batch(rows, [lr.sampler for lr in batch])
        for live in batch:
            live.position += 1
            # round-robin when more sequences decode than fit in one step
            self.active[live.key] = self.active.pop(live.key)
        ended = self.clock()
        self.cadence.record_step(started, ended, len(batch))
        if self._busy_since_step is not None:
            gap = ended - self._busy_since_step
            self.step_interval_s = gap if self.step_interval_s == 0 else \
                (1 - STEP_EMA_WEIGHT) * self.step_interval_s + STEP_EMA_WEIGHT * gap
        self._busy_since_step = ended
        return [(live, token, logprob) for live, (token, logprob) in zip(batch, sampled)]
