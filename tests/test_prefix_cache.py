"""The prefix cache's bookkeeping (replicas/kv_blocks.py) and block names (replicas/prefix_hash.py)."""

from __future__ import annotations

import random

import pytest

from replicas.kv_blocks import BlockAllocator, KVCacheFull
from replicas.prefix_hash import block_names, routing_names, routing_names_of

BS = 4
SALT = "m|float32"


def names(tokens: list[int]) -> list[bytes]:
    return block_names(tokens, BS, SALT)


def test_names_chain_over_every_earlier_token_and_the_salt():
    a, b = names(list(range(12))), names([*range(8), 99, 9, 10, 11])
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]  # blocks 0-1 equal, block 2 differs
    assert names([5, *range(1, 12)])[1:] != a[1:]  # a change in block 0 renames every later block
    assert block_names(list(range(12)), BS, "other|bfloat16")[0] != a[0]  # the salt names the model and dtype
    assert names(list(range(11))) == a[:2]  # only full blocks are named
    assert block_names(list(range(12)), BS, SALT, start=1, parent=a[0]) == a[1:]
    routing = routing_names(a + names(list(range(16)))[3:], 2)
    assert routing == [a[1][:4].hex(), names(list(range(16)))[3][:4].hex()]
    assert routing_names_of(list(range(16)), BS, 2, SALT) == tuple(routing)


def test_a_published_prefix_is_attached_by_the_next_sequence_and_counted():
    alloc = BlockAllocator(16, BS, enable_prefix_caching=True)
    first = names(list(range(10)))  # two full blocks (8 tokens) and a partial one
    alloc.ensure_capacity(1, 10)
    assert alloc.publish(1, first, upto_tokens=10) == 2 and alloc.num_cached_blocks == 2
    second = names([*range(8), 50, 51, 52, 53])
    assert alloc.attach_prefix(2, second) == 8  # blocks 0-1 shared, block 2 differs
    assert alloc.block_table(2) == alloc.block_table(1)[:2]
    assert [alloc.refcount(b) for b in alloc.block_table(2)] == [2, 2]
    assert (alloc.queried_tokens, alloc.hit_tokens) == (12, 8)
    alloc.ensure_capacity(2, 12)
    assert alloc.block_table(2)[2] != alloc.block_table(1)[2]  # its own block past the shared prefix
    alloc.free(1)
    alloc.free(2)
    assert alloc.num_free_blocks == 16 and alloc.num_cached_blocks == 2  # cached, yet allocatable
    alloc.check_invariants()


def test_least_recently_used_cached_blocks_go_first_and_a_chains_tail_before_its_head():
    alloc = BlockAllocator(4, BS, enable_prefix_caching=True)
    chain = names(list(range(8)))
    alloc.ensure_capacity(1, 8)
    alloc.publish(1, chain, 8)
    alloc.free(1)  # two cached blocks, the tail older than the head
    other = names(list(range(100, 108)))
    alloc.ensure_capacity(2, 8)  # the two free blocks
    alloc.publish(2, other, 8)
    alloc.free(2)
    alloc.ensure_capacity(3, 4)  # evicts the oldest: chain's tail
    assert alloc.match(chain) == 1 and alloc.match(other) == 2 and alloc.evictions == 1
    assert alloc.attach_prefix(4, chain) == 4  # the head is still there
    alloc.ensure_capacity(5, 8)  # chain's head is held: the two blocks of `other` go
    assert alloc.match(other) == 0 and alloc.match(chain) == 1
    with pytest.raises(KVCacheFull):
        alloc.ensure_capacity(6, 4)  # nothing free, nothing cached: held blocks are never taken
    alloc.check_invariants()


def test_the_cache_share_caps_unreferenced_cached_blocks():
    alloc = BlockAllocator(8, BS, enable_prefix_caching=True, max_cached_blocks=2)
    chain = names(list(range(16)))
    alloc.ensure_capacity(1, 16)
    assert alloc.publish(1, chain, 16) == 4  # held: all four stay published
    alloc.free(1)
    assert alloc.match(chain) == 2 and alloc.num_free_blocks == 8  # only the head two stay cached
    alloc.check_invariants()


def test_caching_off_matches_nothing_and_publishes_nothing():
    alloc = BlockAllocator(8, BS)
    alloc.ensure_capacity(1, 8)
    assert alloc.publish(1, names(list(range(8))), 8) == 0 and alloc.attach_prefix(2, names(list(range(8)))) == 0
    assert alloc.queried_tokens == 8 and alloc.hit_tokens == 0


def test_extend_prefix_takes_blocks_published_after_the_sequence_arrived():
    alloc = BlockAllocator(16, BS, enable_prefix_caching=True)
    chain = names(list(range(12)))
    assert alloc.attach_prefix(2, chain) == 0  # nothing cached yet: it would compute all of it
    alloc.ensure_capacity(1, 12)
    alloc.publish(1, chain, 8)  # the first sequence finished a pass over 8 tokens
    assert alloc.extend_prefix(2, chain) == 8 and alloc.block_table(2) == alloc.block_table(1)[:2]
    alloc.publish(1, chain, 12)
    assert alloc.extend_prefix(2, chain) == 12
    alloc.ensure_capacity(2, 13)
    with pytest.raises(ValueError, match="not a cached prefix"):
        alloc.extend_prefix(2, chain + names(list(range(16)))[3:])
    alloc.check_invariants()


def test_thousands_of_random_arrivals_aborts_preemptions_and_evictions_leak_nothing():
    """Sequences share prefixes of a few conversations; they attach, grow, publish, get suspended
    (kept) or freed in random order. No block is lost or counted twice, no reference count goes
    negative, and a block some sequence holds is never renamed or handed to another content."""
    rng = random.Random(7)
    alloc = BlockAllocator(48, BS, enable_prefix_caching=True, max_cached_blocks=30)
    roots = [[rng.randrange(1000) for _ in range(40)] for _ in range(5)]
    live: dict[int, tuple[list[bytes], int]] = {}  # seq -> (its block names, tokens allocated)
    attached: dict[int, list[tuple[int, bytes]]] = {}  # seq -> the cached (block, name) pairs it took
    full = hits = 0
    for seq in range(4000):
        op = rng.random()
        if op < 0.45 or not live:
            root = roots[rng.randrange(len(roots))]
            tokens = root[:rng.randrange(1, 41)] + [rng.randrange(1000) for _ in range(rng.randrange(0, 12))]
            seq_names = names(tokens)
            cached = alloc.attach_prefix(seq, seq_names[:(len(tokens) - 1) // BS])
            hits += cached > 0
            attached[seq] = list(zip(alloc.block_table(seq), seq_names))
            try:
                alloc.ensure_capacity(seq, len(tokens))
            except KVCacheFull:
                full += 1
                alloc.free(seq)
                continue
            live[seq] = (seq_names, len(tokens))
        elif op < 0.7:  # a pass finished: publish what it computed
            s = rng.choice(list(live))
            seq_names, n = live[s]
            alloc.publish(s, seq_names, rng.randint(0, n))
        elif op < 0.8:  # decoding grows the sequence
            s = rng.choice(list(live))
            seq_names, n = live[s]
            try:
                alloc.ensure_capacity(s, n + 3)
                live[s] = (seq_names, n + 3)
            except KVCacheFull:
                full += 1
        else:  # finished or aborted (suspended ones simply stay in `live`)
            s = rng.choice(list(live))
            del live[s]
            alloc.free(s)
        for s in live:  # what a live sequence took from the cache is still that content, and still its own
            table = alloc.block_table(s)
            for block, name in attached[s]:
                assert alloc._name_of.get(block) == name and block in table  # noqa: SLF001 - the check needs it
            assert all(alloc.refcount(b) >= 1 for b in table)
        if seq % 50 == 0:
            alloc.check_invariants()
    for s in list(live):
        alloc.free(s)
    alloc.check_invariants()
    assert alloc.num_free_blocks == alloc.num_blocks and all(alloc.refcount(b) == 0 for b in range(alloc.num_blocks))
    assert full > 50 and hits > 500 and alloc.evictions > 50  # the run exercised pressure, hits and eviction
