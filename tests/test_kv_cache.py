"""Paged KV cache: block accounting, all-or-nothing allocation, slot mapping."""

import random

import pytest
import torch

from replicas.kv_blocks import BlockAllocator, KVCacheFull
from replicas.kv_cache import KVCacheSpec, PagedKVCache, slot_indices


def test_budget_sizes_the_pool():
    spec = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float32, block_size=16)
    assert spec.bytes_per_block == 2 * 30 * 16 * 3 * 64 * 4
    cache = PagedKVCache.from_budget(spec, 10 * spec.bytes_per_block + 5)
    assert cache.allocator.num_blocks == 10
    assert cache.keys[0].shape == (160, 3, 64)
    with pytest.raises(ValueError, match="below one block"):
        PagedKVCache.from_budget(spec, spec.bytes_per_block - 1)


def test_full_pool_raises_and_changes_nothing():
    alloc = BlockAllocator(num_blocks=4, block_size=16)
    alloc.ensure_capacity(1, 40)  # 3 blocks
    with pytest.raises(KVCacheFull) as err:
        alloc.ensure_capacity(2, 33)  # needs 3, 1 free
    assert err.value.blocks_needed == 3 and err.value.blocks_free == 1
    assert not alloc.has(2) and alloc.num_free_blocks == 1
    alloc.ensure_capacity(1, 64)  # extend into the last block
    assert alloc.num_free_blocks == 0 and alloc.capacity(1) == 64
    assert alloc.free(1) == 4 and alloc.num_free_blocks == 4
    alloc.check_invariants()


def test_slots_follow_the_block_table():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    alloc.ensure_capacity(7, 2)
    alloc.ensure_capacity(9, 4)
    alloc.ensure_capacity(7, 10)
    table = alloc.block_table(7)
    slots = slot_indices(alloc, 7, 0, 10).tolist()
    assert slots == [table[p // 4] * 4 + p % 4 for p in range(10)]
    assert not set(slots) & set(slot_indices(alloc, 9, 0, 4).tolist())
    with pytest.raises(IndexError):
        slot_indices(alloc, 7, 0, 13)


def test_write_then_gather_round_trips():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, block_size=4)
    cache = PagedKVCache(spec, num_blocks=6)
    cache.allocator.ensure_capacity(0, 9)
    slots = cache.slots(0, 0, 9)
    k, v = torch.randn(9, 2, 4), torch.randn(9, 2, 4)
    cache.write(1, slots, k, v)
    gk, gv = cache.gather(1, slots)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    assert torch.count_nonzero(cache.keys[0]) == 0


def test_no_leak_after_thousands_of_random_operations():
    """Random alloc / extend / preempt (free) / finish sequences never lose or share a block."""
    rng = random.Random(1234)
    alloc = BlockAllocator(num_blocks=64, block_size=16)
    lengths: dict[int, int] = {}
    owner: dict[int, int] = {}
    full_seen = 0
    for step in range(5000):
        op = rng.random()
        if op < 0.4 or not lengths:
            seq, n = step, rng.randint(1, 200)
            try:
                alloc.ensure_capacity(seq, n)
                lengths[seq] = n
            except KVCacheFull:
                full_seen += 1
                assert not alloc.has(seq)
        elif op < 0.7:
            seq = rng.choice(list(lengths))
            n = lengths[seq] + rng.randint(1, 40)
            before = alloc.block_table(seq)
            try:
                alloc.ensure_capacity(seq, n)
                lengths[seq] = n
                assert alloc.block_table(seq)[: len(before)] == before  # extension never moves blocks
            except KVCacheFull:
                full_seen += 1
                assert alloc.block_table(seq) == before
        else:
            seq = rng.choice(list(lengths))
            assert alloc.free(seq) == -(-lengths.pop(seq) // 16)
        owner = {}
        for seq in lengths:
            assert alloc.capacity(seq) >= lengths[seq]
            for block in alloc.block_table(seq):
                assert block not in owner, "block shared by two sequences"
                owner[block] = seq
        assert len(owner) + alloc.num_free_blocks == 64
    alloc.check_invariants()
    assert full_seen > 0, "the test should exercise a full pool"
    for seq in list(lengths):
        alloc.free(seq)
    assert alloc.num_free_blocks == 64
