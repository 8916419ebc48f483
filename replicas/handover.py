"""Prefill/decode handover: what a prefill engine hands a decode engine after the first token.

A ``prefill`` engine (:class:`~replicas.engine.ReplicaEngine` with ``role="prefill"``) runs a
prompt as a colocated engine does (operator-level preemption, the event-driven scheduler),
samples the first token, streams it, and then builds a :class:`KVHandover`: the request, its
sampling parameters and random generator state, the tokens generated so far, the prompt's KV
(only the blocks the prompt uses, as CPU tensors) and the prompt's prefix-cache block names.
A ``decode`` engine admits it (:func:`admit_kv`): it allocates its own blocks, attaching the
ones its prefix cache already holds under the same names and copying the rest in, and continues
decoding in its decode batch.

The prefill engine then frees the request's sequence; its published (full, complete) prompt
blocks stay in its prefix cache as unreferenced, evictable blocks, as vLLM and SGLang keep them,
so the next prompt sharing the prefix is a cache hit on the prefill side.

Penalties and ``min_tokens`` need the generated tokens only (their counts are rebuilt from
``generated``); a seeded request carries its ``torch.Generator`` state so that its draws continue
exactly where the prefill engine's stopped. An unseeded request draws from each process's
default generator, as it would after any move.

A handover crosses actors (Ray): :meth:`KVHandover.validate` checks every field against the
receiving engine's model and KV geometry and raises :class:`HandoverError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from replicas.engine_config import ROLES
from replicas.errors import HandoverError
from replicas.kv_blocks import BlockAllocator
from replicas.kv_cache import PagedKVCache
from replicas.prefix_hash import BlockName
from replicas.sampling_params import SamplingParams
from replicas.scheduler.request import Request

__all__ = ["ROLES", "HandoverError", "KVHandover", "gather_kv", "prompt_blocks", "scatter_kv"]


@dataclass
class KVHandover:
    """One request's state after its prefill, as the decode side needs it.

    ``keys``/``values`` are ``[num_layers, num_blocks, block_size, kv_heads, head_dim]`` on the CPU:
    the blocks that hold the prompt's ``num_tokens`` positions (the last one may be partly used).
    ``block_names`` are the prompt's full blocks' prefix-cache names (empty where the prefill engine
    caches no prefixes). ``gather_s`` is how long the prefill engine took to copy the KV out.
    """

    request: Request
    params: SamplingParams
    generated: tuple[int, ...]
    num_tokens: int
    block_size: int
    salt: str
    keys: torch.Tensor
    values: torch.Tensor
    block_names: tuple[BlockName, ...] = ()
    generator_state: torch.Tensor | None = None
    gather_s: float = 0.0
    source: str = ""  # the prefill replica's id, for logs and stats

    @property
    def request_id(self) -> str:
        """The handed-over request's id."""
        return self.request.request_id

    @property
    def nbytes(self) -> int:
        """Bytes of KV carried (keys and values)."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def validate(self, cache: PagedKVCache, salt: str, vocab_size: int) -> None:
        """Check this handover against the receiving engine's ``cache`` geometry, its prefix ``salt``
        (model and dtype) and vocabulary; raises :class:`HandoverError` naming the first bad field."""
        if not isinstance(self.request, Request):
            raise HandoverError("handover.request", f"expected a Request, got {type(self.request).__name__}")
        if not isinstance(self.params, SamplingParams):
            raise HandoverError("handover.params", f"expected SamplingParams, got {type(self.params).__name__}")
        if self.salt != salt:
            raise HandoverError("handover.salt", f"KV of {self.salt!r} cannot continue on {salt!r} (model/dtype)")
        spec = cache.spec
        if self.block_size != spec.block_size:
            raise HandoverError("handover.block_size", f"{self.block_size} != this engine's {spec.block_size}")
        prompt = len(self.request.prompt_ids)
        if self.num_tokens != prompt:
            raise HandoverError("handover.num_tokens", f"{self.num_tokens} KV positions for a {prompt}-token prompt")
        if (not isinstance(self.generated, tuple) or len(self.generated) != 1
                or not all(isinstance(t, int) and 0 <= t < vocab_size for t in self.generated)):
            raise HandoverError("handover.generated", f"expected the first token, one id in [0, {vocab_size}), "
                                f"got {self.generated!r}")
        blocks = -(-self.num_tokens // spec.block_size)
        shape = (spec.num_layers, blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        for name in ("keys", "values"):
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != spec.dtype:
                got = (tuple(tensor.shape), tensor.dtype) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise HandoverError(f"handover.{name}", f"expected a {spec.dtype} tensor of shape {shape}, got {got}")
        full = self.num_tokens // spec.block_size
        if self.block_names and (len(self.block_names) != full
                                 or not all(isinstance(n, bytes) for n in self.block_names)):
            raise HandoverError("handover.block_names", f"expected {full} block names (bytes), got "
                                f"{len(self.block_names)}")
        if self.generator_state is not None and (self.params.seed is None
                                                 or not isinstance(self.generator_state, torch.Tensor)):
            raise HandoverError("handover.generator_state", "a generator state needs a seeded request (a tensor)")
        if not isinstance(self.gather_s, int | float) or not math.isfinite(self.gather_s):
            raise HandoverError("handover.gather_s", f"expected a finite number, got {self.gather_s!r}")


def prompt_blocks(allocator: BlockAllocator, seq_id: int, num_tokens: int) -> list[int]:
    """The block ids holding ``seq_id``'s first ``num_tokens`` positions."""
    table = allocator.block_table(seq_id)
    need = -(-num_tokens // allocator.block_size)
    if len(table) < need:
        raise ValueError(f"sequence {seq_id} holds {len(table)} blocks, {need} needed for {num_tokens} tokens")
    return table[:need]


def _blocked(layer: torch.Tensor, block_size: int) -> torch.Tensor:
    """A layer's flat ``[slots, H, D]`` storage viewed as ``[blocks, block_size, H, D]``."""
    return layer.view(-1, block_size, *layer.shape[1:])


def gather_kv(cache: PagedKVCache, blocks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of ``blocks``' keys and values on the CPU, ``[layers, len(blocks), block_size, H, D]``.

    Each of keys and values is allocated once, at its final shape, and every layer's blocks are
    selected straight into their slice of it (no per-layer tensors stacked afterwards: one copy of
    the KV instead of two). On a GPU the buffers are filled there and copied to the CPU in one go."""
    bs = cache.spec.block_size
    first = cache.keys[0]
    index = torch.tensor(list(blocks), dtype=torch.int64, device=first.device)
    shape = (len(cache.keys), len(index), bs, *first.shape[1:])
    keys = torch.empty(shape, dtype=first.dtype, device=first.device)
    values = torch.empty(shape, dtype=first.dtype, device=first.device)
    for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
        torch.index_select(_blocked(k, bs), 0, index, out=keys[layer])
        torch.index_select(_blocked(v, bs), 0, index, out=values[layer])
    return keys.to("cpu"), values.to("cpu")


def scatter_kv(cache: PagedKVCache, blocks: Sequence[int], keys: torch.Tensor, values: torch.Tensor,
               first: int = 0) -> None:
    """Write the handed-over blocks ``keys[:, first:]``/``values[:, first:]`` into ``blocks`` (same count)."""
    if len(blocks) != keys.shape[1] - first:
        raise ValueError(f"{len(blocks)} destination blocks for {keys.shape[1] - first} handed-over blocks")
    if not blocks:
        return
    bs = cache.spec.block_size
    device = cache.keys[0].device
    index = torch.tensor(list(blocks), dtype=torch.int64, device=device)
    for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
        _blocked(k, bs).index_copy_(0, index, keys[layer, first:].to(device))
        _blocked(v, bs).index_copy_(0, index, values[layer, first:].to(device))
