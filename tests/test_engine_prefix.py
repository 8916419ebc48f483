"""Prefix caching through real forward passes: a hit computes only the rest and matches a cold run,
also when the prefix belongs to a program suspended at any preemption point; memory pressure
evicts cached blocks, never a live request's; a prompt that can never fit is refused clearly."""

from __future__ import annotations

import asyncio

import pytest
import torch

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig
from replicas.executor import PreemptibleExecutor
from replicas.kv_cache import PagedKVCache
from replicas.model.decoder import DecoderModel
from replicas.prefix_tracker import PrefixTracker
from replicas.programs import PrefillItem, prefill_program
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from tests.polling import wait_for

BS = 8
ATOL = 2e-5  # fp32: attention over gathered cached keys vs a fresh causal kernel differs by rounding only


@pytest.fixture(scope="module")
def model(tiny_checkpoint_factory) -> DecoderModel:
    return DecoderModel.load(tiny_checkpoint_factory("llama", seed=5, num_layers=3))


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _cold(model: DecoderModel, tokens: list[int]) -> torch.Tensor:
    kv = PagedKVCache(model.kv_spec(block_size=BS), num_blocks=64)
    kv.allocator.ensure_capacity(0, len(tokens))
    return PreemptibleExecutor("none").run_to_completion(prefill_program(model, kv, [PrefillItem(0, tokens)]))[0]


class Cache:
    """A caching KV pool and its tracker, driven the way the engine drives them."""

    def __init__(self, model: DecoderModel) -> None:
        self.model = model
        self.kv = PagedKVCache(model.kv_spec(block_size=BS), num_blocks=64, enable_prefix_caching=True)
        self.tracker = PrefixTracker(self.kv.allocator, "tiny|float32")

    def start(self, rid: str, seq: int, tokens: list[int], chunk: int, granularity: str = "none"):
        """Admit and start a prefill program from the cached prefix on; returns (cached, executor, task)."""
        match = self.tracker.admit(rid, seq, tokens)
        self.kv.allocator.ensure_capacity(seq, len(tokens))
        item = PrefillItem(seq, tokens, match.cached_tokens, len(tokens))
        ex = PreemptibleExecutor(granularity)
        program = prefill_program(self.model, self.kv, [item], chunk,
                                  on_pass=lambda segs: [self.tracker.passed(s.seq_id, s.end) for s in segs])
        return match.cached_tokens, ex, ex.start(program)


def test_a_prefix_hit_gives_the_cold_logits_and_greedy_token(model):
    vocab = model.config.vocab_size
    shared = _prompt(1, 40, vocab)
    first, second = shared + _prompt(2, 9, vocab), shared + _prompt(3, 13, vocab)
    cache = Cache(model)
    cached, ex, task = cache.start("a", 1, first, chunk=64)
    assert cached == 0 and ex.run(task)
    cached, ex, task = cache.start("b", 2, second, chunk=64)
    assert cached == 40  # five full blocks of the shared 40 tokens
    assert ex.run(task)
    hit, cold = task.result[2], _cold(model, second)
    assert torch.allclose(hit, cold, atol=ATOL, rtol=0) and int(hit.argmax()) == int(cold.argmax())
    assert cache.kv.allocator.block_table(2)[:5] == cache.kv.allocator.block_table(1)[:5]  # the same blocks


@pytest.mark.parametrize("granularity", ["block", "op"])
def test_a_hit_on_a_program_suspended_at_every_point_leaves_both_with_their_cold_results(model, granularity):
    """A long prompt runs in passes of 16 tokens; at every preemption point a request sharing its
    first 32 tokens arrives, takes what is published by then (whole passes only) and runs to the
    end; then the long one resumes. Both end as they would have alone."""
    vocab = model.config.vocab_size
    long = _prompt(7, 56, vocab)
    short = long[:32] + _prompt(8, 6, vocab)
    cold_long, cold_short = _cold(model, long), _cold(model, short)
    cache = Cache(model)
    _, ex, task = cache.start("ref", 0, long, chunk=16, granularity=granularity)
    while not ex.run(task, should_stop=lambda: True):
        pass
    points, reference = task.points_passed, task.result[0]
    assert torch.allclose(reference, cold_long, atol=ATOL, rtol=0)
    hits = set()
    for stop_at in range(1, points + 1):
        cache = Cache(model)
        _, ex, task = cache.start("long", 1, long, chunk=16, granularity=granularity)
        finished = ex.run(task, should_stop=lambda t=task, k=stop_at: t.points_passed >= k)
        cached, ex2, other = cache.start("short", 2, short, chunk=16)
        hits.add(cached)
        assert cached % 16 == 0 and cached <= 32  # only whole passes: never a block mid-way through the layers
        assert ex2.run(other)
        assert torch.allclose(other.result[2], cold_short, atol=ATOL, rtol=0), f"short differs at stop {stop_at}"
        assert finished or ex.run(task)
        assert torch.equal(task.result[1], reference), f"long differs after stop {stop_at}"
        cache.kv.allocator.check_invariants()
    assert hits == {0, 16, 32}  # before the first pass ended, after it, after the second


def _engine(model_dir: str, **settings: object) -> ReplicaEngine:
    cost = CostModel.from_coefficients(1e-3, 1e-4, max_profiled_tokens=8192)
    return ReplicaEngine(EngineConfig(model=model_dir, cpu_threads=1, block_size=BS, **settings), cost_model=cost)


def _generate(engine: ReplicaEngine, rid: str, tokens: list[int], max_tokens: int = 4) -> list:
    request = Request(rid, list(tokens), arrival_s=engine.clock(), ttft_slo_s=60.0, max_tokens=max_tokens)

    async def run() -> list:
        return [out async for out in engine.generate(request, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                              ignore_eos=True))]
    return asyncio.run(run())


def test_the_engine_serves_the_second_turn_from_the_cache_with_the_cold_tokens(tiny_checkpoint_factory):
    model_dir = str(tiny_checkpoint_factory("llama", seed=5, num_layers=3))
    vocab = DecoderModel.load(model_dir).config.vocab_size
    system = _prompt(11, 48, vocab)
    turn2 = system + _prompt(12, 10, vocab)
    cold = _engine(model_dir, enable_prefix_caching=False)
    warm = _engine(model_dir)
    for engine in (cold, warm):
        engine.start()
    try:
        _generate(warm, "t1", system + _prompt(13, 7, vocab))
        want = [o.token_ids for o in _generate(cold, "c2", turn2)]
        got = _generate(warm, "t2", turn2)
        assert [o.token_ids for o in got] == want
        counters = warm.stats().counters
        assert counters["prefix_hit_tokens"] == 48 and counters["prefix_queried_tokens"] == 55 + 58
        assert cold.stats().counters["prefix_hit_tokens"] == 0 and cold.stats().prefix is None
        summary = warm.stats().prefix
        assert summary is not None and summary.block_tokens == 4 * BS and len(summary.names) >= 1
    finally:
        cold.shutdown()
        warm.shutdown()
    assert warm.kv.allocator.num_free_blocks == warm.kv.allocator.num_blocks  # cached blocks are reclaimable
    warm.kv.allocator.check_invariants()


def test_memory_pressure_evicts_cached_prefixes_never_a_live_requests_kv(tiny_checkpoint_factory):
    model_dir = str(tiny_checkpoint_factory("llama", seed=5, num_layers=3))
    model = DecoderModel.load(model_dir)
    vocab = model.config.vocab_size
    block_bytes = model.kv_spec(BS).bytes_per_block
    engine = _engine(model_dir, kv_cache_bytes=12 * block_bytes)  # 12 blocks of 8 tokens
    engine.start()
    try:
        old = _prompt(21, 60, vocab)
        _generate(engine, "old", old, max_tokens=2)  # leaves 7 published blocks cached
        alloc = engine.kv.allocator  # the engine frees a request's KV just after its last output
        wait_for(lambda: alloc.num_free_blocks == 12, "the finished request's KV freed (and cached)")
        assert alloc.num_cached_blocks >= 7
        big = _prompt(22, 80, vocab)  # needs 11 blocks: most of the cache must go
        got = _generate(engine, "big", big, max_tokens=3)
        assert got[-1].finish_reason == "length" and got[-1].error is None
        assert [o.token_ids for o in got] == [(int(t),) for t in _greedy(model, big, 3)]
        assert alloc.evictions >= 6
        huge = _generate(engine, "huge", _prompt(23, 100, vocab))  # 13 blocks: can never fit
        assert huge[-1].finish_reason == "rejected" and "can never run here" in huge[-1].error
    finally:
        engine.shutdown()
    engine.kv.allocator.check_invariants()


def _greedy(model: DecoderModel, tokens: list[int], steps: int) -> list[int]:
    out, seq = [], list(tokens)
    for _ in range(steps):
        out.append(int(_cold(model, seq).argmax()))
        seq.append(out[-1])
    return out


@pytest.mark.slow
def test_smollm2_prefix_hit_matches_the_cold_logits(default_model_dir):
    from replicas.model.tokenizer import Tokenizer

    model = DecoderModel.load(default_model_dir)
    tok = Tokenizer.from_dir(default_model_dir)
    system = [{"role": "system", "content": "You are a careful assistant. " * 12}]
    first = tok.encode_chat([*system, {"role": "user", "content": "What is the capital of France?"}])
    second = tok.encode_chat([*system, {"role": "user", "content": "Name a large city in Japan."}])
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    cache = Cache(model)
    _, ex, task = cache.start("a", 1, first, chunk=8192)
    assert ex.run(task)
    cached, ex2, hit = cache.start("b", 2, second, chunk=8192)
    assert cached == common // BS * BS and cached > 64  # the system prompt and the template before the user turn
    assert ex2.run(hit)
    cold = _cold(model, second)
    assert torch.allclose(hit.result[2], cold, atol=1e-4, rtol=0) and int(hit.result[2].argmax()) == int(cold.argmax())
