"""``n`` choices from one prefill (replicas/parallel_sampling.py) in the real engine on a tiny checkpoint:
the prompt is computed once, greedy choices equal the ``n`` = 1 answer, seeded choice ``i`` equals a
separate request with seed ``seed + i``, and every KV block is free afterwards; the allocator's fork
shares full blocks and copies the partial one."""

from __future__ import annotations

import asyncio

import pytest
import torch

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig
from replicas.engine_types import RequestOutput
from replicas.kv_blocks import BlockAllocator, KVCacheFull
from replicas.kv_cache import PagedKVCache
from replicas.model.decoder import DecoderModel
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from tests.polling import wait_for

BS = 8


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory) -> str:
    return str(tiny_checkpoint_factory("llama", seed=5, num_layers=2))


def _prompt(seed: int, n: int, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _engine(model_dir: str, **settings: object) -> ReplicaEngine:
    cost = CostModel.from_coefficients(1e-3, 1e-4, max_profiled_tokens=8192)
    engine = ReplicaEngine(EngineConfig(model=model_dir, cpu_threads=1, block_size=BS, **settings), cost_model=cost)
    engine.start()
    return engine


def _run(engine: ReplicaEngine, rid: str, tokens: list[int], params: SamplingParams) -> list[RequestOutput]:
    request = Request(rid, list(tokens), arrival_s=engine.clock(), ttft_slo_s=60.0, max_tokens=params.max_tokens)

    async def run() -> list[RequestOutput]:
        return [out async for out in engine.generate(request, params)]
    return asyncio.run(run())


def _choices(outputs: list[RequestOutput], n: int) -> list[list[int]]:
    """Each choice's tokens, checking that each choice finishes once and only the last output ends it all."""
    tokens: list[list[int]] = [[] for _ in range(n)]
    finished = [0] * n
    for out in outputs:
        assert out.error is None and finished[out.index] == 0
        tokens[out.index].extend(out.token_ids)
        if out.finish_reason is not None:
            finished[out.index] = 1
            assert out.choices_left == n - sum(finished)
    assert finished == [1] * n and outputs[-1].choices_left == 0
    return tokens


def _all_free(engine: ReplicaEngine) -> bool:
    alloc = engine.kv.allocator
    return not engine.live and all(alloc.refcount(b) == 0 for b in range(alloc.num_blocks))


@pytest.mark.parametrize("length", [21, 24])  # a partial last block (copied per choice), whole blocks (all shared)
def test_greedy_choices_equal_the_single_answer_and_the_prompt_is_prefilled_once(model_dir, length):
    engine = _engine(model_dir, enable_prefix_caching=False)
    try:
        prompt = _prompt(length, length)
        single = _run(engine, "one", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        want = [t for out in single for t in out.token_ids]
        before = engine.stats().counters["prefill_tokens"]
        outs = _run(engine, "three", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=3))
        assert _choices(outs, 3) == [want] * 3
        assert engine.stats().counters["prefill_tokens"] - before == length  # once, not three times
        assert sum(1 for out in outs if out.ttft_s is not None) == 1
        wait_for(lambda: _all_free(engine), "every block of the three choices freed")
        engine.kv.allocator.check_invariants()
    finally:
        engine.shutdown()


def test_seeded_choice_i_is_the_request_with_seed_plus_i(model_dir):
    engine = _engine(model_dir, enable_prefix_caching=False)
    try:
        prompt = _prompt(3, 19)
        params = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
        separate = [[t for out in _run(engine, f"s{i}", prompt, params.for_choice(i)) for t in out.token_ids]
                    for i in range(3)]
        before = engine.stats().counters["prefill_tokens"]
        outs = _run(engine, "n3", prompt, SamplingParams(**{**params.to_dict(), "n": 3}))
        assert _choices(outs, 3) == separate
        assert len({tuple(c) for c in separate}) > 1  # the seeds do differ
        assert engine.stats().counters["prefill_tokens"] - before == 19
        assert _run(engine, "n3b", prompt, SamplingParams(**{**params.to_dict(), "n": 3}))[-1].finish_reason
        wait_for(lambda: _all_free(engine), "every block freed")
    finally:
        engine.shutdown()


def test_choices_that_stop_early_give_their_blocks_back_and_the_rest_go_on(model_dir):
    engine = _engine(model_dir, enable_prefix_caching=True)
    try:
        prompt = _prompt(4, 13)
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=4, stop_token_ids=tuple(range(0, 256, 6)))
        separate = [_run(engine, f"s{i}", prompt, params.for_choice(i)) for i in range(4)]
        lengths = [sum(len(o.token_ids) for o in outs) for outs in separate]
        outs = _run(engine, "n4", prompt, params)
        got = _choices(outs, 4)
        assert [len(c) for c in got] == lengths
        reasons = {o.index: o.finish_reason for o in outs if o.finish_reason}
        assert reasons == {i: s[-1].finish_reason for i, s in enumerate(separate)}
        wait_for(lambda: _all_free(engine), "every block freed")
        engine.kv.allocator.check_invariants()
    finally:
        engine.shutdown()


def test_aborting_an_n_request_frees_every_choice(model_dir):
    engine = _engine(model_dir)
    try:
        prompt = _prompt(5, 30)
        request = Request("ab", prompt, arrival_s=engine.clock(), ttft_slo_s=60.0, max_tokens=200)

        async def run() -> int:
            seen = 0
            gen = engine.generate(request, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True, n=3))
            async for _out in gen:
                seen += 1
                if seen == 6:  # two tokens of each choice: then the client goes away
                    break
            await gen.aclose()
            return seen
        assert asyncio.run(run()) == 6
        wait_for(lambda: _all_free(engine), "the aborted choices' blocks freed")
    finally:
        engine.shutdown()
    engine.kv.allocator.check_invariants()


def test_fork_shares_full_blocks_and_copies_the_partial_one(model_dir):
    model = DecoderModel.load(model_dir)
    kv = PagedKVCache(model.kv_spec(block_size=4), num_blocks=5)
    alloc = kv.allocator
    alloc.ensure_capacity(0, 10)  # blocks for 10 tokens: two full, one partial
    for store in (*kv.keys, *kv.values):
        store.normal_()
    kv.fork(0, 1, 10)
    parent, child = alloc.block_table(0), alloc.block_table(1)
    assert child[:2] == parent[:2] and child[2] != parent[2]
    assert [alloc.refcount(b) for b in parent] == [2, 2, 1] and alloc.refcount(child[2]) == 1
    for store in (*kv.keys, *kv.values):
        assert torch.equal(store[child[2] * 4:child[2] * 4 + 4], store[parent[2] * 4:parent[2] * 4 + 4])
    kv.fork(0, 2, 8)  # block-aligned: nothing to copy
    assert alloc.block_table(2) == parent[:2] and alloc.refcount(parent[0]) == 3
    alloc.fork(0, 3, 10)  # takes the last free block
    with pytest.raises(KVCacheFull):  # nothing left to copy the partial block into: nothing changes
        alloc.fork(0, 4, 10)
    assert not alloc.has(4)
    for seq in (0, 1, 2, 3):
        alloc.free(seq)
    alloc.check_invariants()
    assert alloc.num_free_blocks == 5 and all(alloc.refcount(b) == 0 for b in range(5))


def test_fork_refuses_a_child_with_blocks_or_a_parent_too_short():
    alloc = BlockAllocator(4, 4)
    alloc.ensure_capacity(0, 4)
    alloc.ensure_capacity(1, 4)
    with pytest.raises(ValueError, match="already holds"):
        alloc.fork(0, 1, 4)
    with pytest.raises(ValueError, match="holds 1 blocks"):
        alloc.fork(0, 2, 9)
