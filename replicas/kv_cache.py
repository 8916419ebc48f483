"""Paged KV cache: a pool of fixed-size blocks, a block table per sequence.

Bookkeeping (:class:`BlockAllocator`) is separate from storage (:class:`PagedKVCache`) so the
scheduler and simulator can account memory without tensors. Allocation is all-or-nothing: when
the pool cannot hold a request, :class:`KVCacheFull` is raised and nothing changes; a slot is
never handed out twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCacheFull(RuntimeError):
    """Raised when the block pool cannot hold the requested tokens."""

    def __init__(self, seq_id: int, blocks_needed: int, blocks_free: int) -> None:
        super().__init__(
            f"KV cache full: sequence {seq_id} needs {blocks_needed} more blocks, {blocks_free} free"
        )
        self.seq_id = seq_id
        self.blocks_needed = blocks_needed
        self.blocks_free = blocks_free


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


class BlockAllocator:
    """Free list of blocks and a block table per sequence (pure bookkeeping)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free)

    @property
    def free_tokens(self) -> int:
        """Token capacity of the free blocks."""
        return len(self._free) * self.block_size

    def blocks_needed(self, seq_id: int, total_tokens: int) -> int:
        """Extra blocks ``seq_id`` needs to hold ``total_tokens`` tokens."""
        have = len(self._tables.get(seq_id, ()))
        return max(-(-total_tokens // self.block_size) - have, 0)

    def can_allocate(self, seq_id: int, total_tokens: int) -> bool:
        """Whether :meth:`ensure_capacity` would succeed now."""
        return self.blocks_needed(seq_id, total_tokens) <= len(self._free)

    def ensure_capacity(self, seq_id: int, total_tokens: int) -> None:
        """Grow ``seq_id``'s table to hold ``total_tokens``; all or nothing."""
        need = self.blocks_needed(seq_id, total_tokens)
        if need > len(self._free):
            raise KVCacheFull(seq_id, need, len(self._free))
        table = self._tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._free.pop())

    def free(self, seq_id: int) -> int:
        """Return ``seq_id``'s blocks to the pool; returns how many were freed (0 if unknown)."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(reversed(table))
        return len(table)

    def has(self, seq_id: int) -> bool:
        """Whether ``seq_id`` holds blocks."""
        return seq_id in self._tables

    def capacity(self, seq_id: int) -> int:
        """Tokens ``seq_id`` can hold without growing."""
        return len(self._tables.get(seq_id, ())) * self.block_size

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of ``seq_id``'s block ids, in order."""
        return list(self._tables.get(seq_id, ()))

    def slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Flat slot indices (``block * block_size + offset``) for positions ``[start, end)``."""
        if end > self.capacity(seq_id) or start < 0 or start > end:
            raise IndexError(
                f"positions [{start}, {end}) outside sequence {seq_id}'s capacity {self.capacity(seq_id)}"
            )
        table = torch.tensor(self._tables[seq_id], dtype=torch.int64)
        positions = torch.arange(start, end, dtype=torch.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def check_invariants(self) -> None:
        """Assert no block is lost or shared (used by tests and debug builds)."""
        held = [b for table in self._tables.values() for b in table]
        every = held + self._free
        if len(every) != self.num_blocks or set(every) != set(range(self.num_blocks)):
            raise AssertionError(
                f"block accounting broken: {len(held)} held + {len(self._free)} free != {self.num_blocks}"
            )


class PagedKVCache:
    """Key and value storage per layer, ``[num_blocks * block_size, kv_heads, head_dim]``."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.allocator = BlockAllocator(num_blocks, spec.block_size)
        shape = (num_blocks * spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        self.values = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

    @classmethod
    def from_budget(cls, spec: KVCacheSpec, budget_bytes: int, device: torch.device | str = "cpu") -> PagedKVCache:
        """A cache with as many blocks as ``budget_bytes`` allows (at least one)."""
        blocks = spec.blocks_for_budget(budget_bytes)
        if blocks < 1:
            raise ValueError(
                f"kv_cache_bytes {budget_bytes} is below one block ({spec.bytes_per_block} bytes)"
            )
        return cls(spec, blocks, device)

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
