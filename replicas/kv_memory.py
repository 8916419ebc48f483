"""The KV blocks an engine's live requests hold, and whether another request's tokens still fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from replicas.kv_cache import PagedKVCache


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
