"""Paged KV cache storage: key and value tensors per layer, addressed through block tables.

Bookkeeping (:class:`~replicas.kv_blocks.BlockAllocator`: tables, reference counts, the prefix
cache) is separate from storage (:class:`PagedKVCache`) so the scheduler and the simulator can
account memory without tensors. A slot is never handed out to two sequences unless they share
the block's content (a published prefix block, which nobody writes again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replicas.kv_blocks import BlockAllocator


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the cache: what one block costs in memory."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int = 16

    @property
    def bytes_per_block(self) -> int:
        """Bytes for keys and values of one block across all layers."""
        element = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    def blocks_for_budget(self, budget_bytes: int) -> int:
        """How many blocks fit in ``budget_bytes``."""
        return max(budget_bytes // self.bytes_per_block, 0)


def slot_indices(allocator: BlockAllocator, seq_id: int, start: int, end: int) -> torch.Tensor:
    """Flat slot indices (``block * block_size + offset``) of ``seq_id``'s positions ``[start, end)``."""
    if end > allocator.capacity(seq_id) or start < 0 or start > end:
        raise IndexError(
            f"positions [{start}, {end}) outside sequence {seq_id}'s capacity {allocator.capacity(seq_id)}"
        )
    bs = allocator.block_size
    table = torch.tensor(allocator.block_table(seq_id), dtype=torch.int64)
    positions = torch.arange(start, end, dtype=torch.int64)
    return table[positions // bs] * bs + positions % bs


class PagedKVCache:
    """Key and value storage per layer, ``[num_blocks * block_size, kv_heads, head_dim]``."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str = "cpu", *,
                 enable_prefix_caching: bool = False, max_cached_blocks: int | None = None) -> None:
        self.spec = spec
        self.allocator = BlockAllocator(num_blocks, spec.block_size, enable_prefix_caching=enable_prefix_caching,
                                        max_cached_blocks=max_cached_blocks)
        shape = (num_blocks * spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        self.values = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

    @classmethod
    def from_budget(cls, spec: KVCacheSpec, budget_bytes: int, device: torch.device | str = "cpu", *,
                    enable_prefix_caching: bool = False, cache_share: float = 1.0) -> PagedKVCache:
        """A cache with as many blocks as ``budget_bytes`` allows (at least one); unreferenced cached
        prefix blocks may fill at most ``cache_share`` of them."""
        blocks = spec.blocks_for_budget(budget_bytes)
        if blocks < 1:
            raise ValueError(
                f"kv_cache_bytes {budget_bytes} is below one block ({spec.bytes_per_block} bytes)"
            )
        return cls(spec, blocks, device, enable_prefix_caching=enable_prefix_caching,
                   max_cached_blocks=int(cache_share * blocks))

    def slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """:func:`slot_indices` of ``seq_id``'s positions ``[start, end)`` (on the CPU)."""
        return slot_indices(self.allocator, seq_id, start, end)

    def fork(self, parent: int, child: int, num_tokens: int) -> None:
        """``child`` starts with ``parent``'s KV of its first ``num_tokens`` tokens: full blocks shared,
        the partial last block copied (:meth:`BlockAllocator.fork`), so that the two sequences decode
        on independently."""
        pair = self.allocator.fork(parent, child, num_tokens)
        if pair is None:
            return
        bs = self.spec.block_size
        src, dst = pair[0] * bs, pair[1] * bs
        for store in (*self.keys, *self.values):
            store[dst:dst + bs].copy_(store[src:src + bs])

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` ``[T, kv_heads, head_dim]`` at ``slots`` ``[T]``."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` (any shape ``S``) as ``[*S, kv_heads, head_dim]``."""
        flat = slots.reshape(-1)
        k = self.keys[layer].index_select(0, flat)
        v = self.values[layer].index_select(0, flat)
        tail = k.shape[1:]
        return k.reshape(*slots.shape, *tail), v.reshape(*slots.shape, *tail)
