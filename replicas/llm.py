"""Offline generation: one batch of prompts, prefill then decode, no scheduler.

This is what ``flowprefill generate`` runs and what the correctness tests compare against the
reference implementation. The serving path drives the same model, KV cache, executor and
sampling through the replica's event-driven scheduler instead.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from replicas.detokenize import OutputStream
from replicas.errors import InvalidRequestError
from replicas.executor import Granularity, PreemptibleExecutor
from replicas.kv_cache import PagedKVCache
from replicas.model.decoder import DecoderModel
from replicas.model.tokenizer import Tokenizer
from replicas.programs import PrefillItem, decode_program, prefill_program
from replicas.sampling import RequestSampler, sample_batch
from replicas.sampling_params import SamplingParams
from replicas.scheduler.config import DEFAULT_CHUNK_TOKENS

DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class GenerationResult:
    """What one prompt produced."""

    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    ttft_s: float


def check_prompt(token_ids: Sequence[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> None:
    """Reject prompts the model cannot take, naming the field."""
    if not token_ids:
        raise InvalidRequestError("prompt", "prompt is empty")
    if len(token_ids) + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            "prompt",
            f"prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
            f"context length {max_model_len}",
        )
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("prompt", f"token id {bad} is outside the vocabulary (size {vocab_size})")


class OfflineEngine:
    """A model, its tokenizer, a paged KV cache and an executor, driven synchronously."""

    def __init__(
        self, model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, block_size: int = 16,
        granularity: Granularity | str = Granularity.BLOCK, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = DecoderModel.load(model_dir, dtype=dtype, device=device)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.kv = PagedKVCache.from_budget(self.model.kv_spec(block_size), kv_cache_bytes, self.model.device)
        self.executor = PreemptibleExecutor(granularity, device=self.model.device)
        self.chunk_tokens = chunk_tokens
        self.clock = clock
        self._seq_ids = itertools.count()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids from the tokenizer and the model config."""
        return tuple(dict.fromkeys(self.tokenizer.eos_token_ids + self.model.config.eos_token_ids))

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[GenerationResult]:
        """Prefill all prompts as one batch, then decode them together until each finishes."""
        if len(prompts) != len(params):
            raise ValueError("prompts and params must have the same length")
        config = self.model.config
        for ids, p in zip(prompts, params):
            check_prompt(ids, p, config.max_position_embeddings, config.vocab_size)
        seq_ids = [next(self._seq_ids) for _ in prompts]
        alloc = self.kv.allocator
        try:
            for seq_id, ids in zip(seq_ids, prompts):
                alloc.ensure_capacity(seq_id, len(ids))
            start = self.clock()
            items = [PrefillItem(seq_id, list(ids)) for seq_id, ids in zip(seq_ids, prompts)]
            logits = self.executor.run_to_completion(prefill_program(self.model, self.kv, items, self.chunk_tokens))
            return self._decode(seq_ids, prompts, params, logits, start)
        finally:
            for seq_id in seq_ids:
                alloc.free(seq_id)

    def _decode(
        self, seq_ids: list[int], prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
        logits: dict[int, torch.Tensor], start: float,
    ) -> list[GenerationResult]:
        samplers = [RequestSampler(p, prompt_ids=ids, eos_token_ids=self.eos_token_ids)
                    for p, ids in zip(params, prompts)]
        streams = [OutputStream(p, self.eos_token_ids, self.tokenizer.decode) for p in params]
        positions = [len(ids) for ids in prompts]
        ttft = [0.0] * len(prompts)
        active = list(range(len(prompts)))
        first = True
        while active:
            rows = torch.stack([logits[seq_ids[i]] for i in active])
            tokens = [token for token, _ in sample_batch(rows, [samplers[i] for i in active])]
            now = self.clock()
            still = []
            for i, token in zip(active, tokens):
                if first:
                    ttft[i] = now - start
                if streams[i].append(token).finish_reason is None:
                    still.append(i)
            first = False
            active = still
            if not active:
                break
            steps = []
            for i in active:
                self.kv.allocator.ensure_capacity(seq_ids[i], positions[i] + 1)
                steps.append((seq_ids[i], streams[i].token_ids[-1], positions[i]))
                positions[i] += 1
            logits = self.executor.run_to_completion(decode_program(self.model, self.kv, steps))
        return [
            GenerationResult(len(prompts[i]), list(s.token_ids), s.text, s.finish_reason or "length", ttft[i])
            for i, s in enumerate(streams)
        ]
