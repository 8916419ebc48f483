"""The CUDA path: launch-ahead bounded by events, the engine on the device, KV accounting.

``scripts/gpu_check`` runs every ``cuda``-marked test (``-m cuda``); the CPU twins of the
parametrized ones (``DEVICES``, ``DEVICE_K``) run in the default suite, prefix-cache equality
(:func:`test_prefix_cache_hit_equals_a_cold_prefill`) included.
"""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig
from replicas.executor import PreemptibleExecutor
from replicas.kv_cache import KVCacheSpec, PagedKVCache
from replicas.model.decoder import Boundary
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from tests.devices import CUDA_KS, DEVICE_K, DEVICES
from tests.test_engine import GREEDY, Collector, _request

SLEEP_CYCLES = 2_000_000  # one "operator": a GPU sleep of ~1 ms at 2 GHz


def _sleep_op_s() -> float:
    """How long one ``torch.cuda._sleep(SLEEP_CYCLES)`` runs at the clocks of the moment."""
    torch.cuda._sleep(SLEEP_CYCLES)  # warm: the clocks rise under load
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(SLEEP_CYCLES)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


@pytest.mark.cuda
@pytest.mark.parametrize("k", CUDA_KS)
def test_launch_ahead_is_bounded_by_k_events_and_a_preemption_lands_within_k_operators(k):
    """At each point the host has waited only for operators more than K points old, never for the
    newest (no host sync per point), and a suspension leaves at most K operators to drain."""
    op_s = _sleep_op_s()
    ops: list[torch.cuda.Event] = []

    def program():
        for _ in range(16):
            torch.cuda._sleep(SLEEP_CYCLES)
            ops.append(torch.cuda.Event())
            ops[-1].record()
            yield Boundary.BLOCK
        return "done"

    executor = PreemptibleExecutor("block", max_inflight=k, device="cuda")
    seen: list[list[bool]] = []

    def check() -> bool:
        seen.append([e.query() for e in ops])
        return len(seen) == 8

    task = executor.start(program())
    assert executor.run(task, check) is False  # suspended at the 8th point
    returned = time.perf_counter()
    assert len(executor._events) <= k
    torch.cuda.synchronize()
    drain_s = time.perf_counter() - returned
    for states in seen:
        assert all(states[: len(states) - k]), "an operator more than K points old was still running"
    assert not all(states[-1] for states in seen), "the host waited for the newest operator at every point"
    assert drain_s <= (k + 1) * op_s + 2e-3, f"{drain_s * 1e3:.2f} ms to drain after suspension, K={k}"
    assert drain_s >= (k - 1) * op_s * 0.5, "the host did not run ahead by K operators"
    assert executor.run(task, lambda: False) is True and task.result == "done"
    assert len(executor._events) == 0  # drained when the program ends


@pytest.mark.parametrize("device", DEVICES)
def test_kv_accounting_matches_the_device_memory_it_takes(device):
    """The pool takes exactly ``blocks * bytes_per_block`` of the device's memory, and a write lands
    in its sequence's slots on the device and nowhere else."""
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)
    cuda = device == "cuda"
    if cuda:  # nothing of earlier tests may be freed while this measures
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    cache = PagedKVCache.from_budget(spec, 100 * spec.bytes_per_block + 7, device)
    held = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert cache.allocator.num_blocks == 100 and held == 100 * spec.bytes_per_block
    assert all(t.device.type == device for t in cache.keys + cache.values)
    if cuda:  # per-layer tensors are multiples of the allocator's 512-byte rounding
        assert torch.cuda.memory_allocated() - before == held
    cache.allocator.ensure_capacity(0, 37)
    cache.allocator.ensure_capacity(1, 20)
    slots = cache.slots(0, 0, 37).to(device)
    k = torch.randn(37, 2, 64, device=device).to(torch.bfloat16)
    cache.write(2, slots, k, -k)
    gk, gv = cache.gather(2, slots)
    assert torch.equal(gk, k) and torch.equal(gv, -k)
    assert int(torch.count_nonzero(cache.keys[2].abs().sum((1, 2)))) == 37  # nothing else was written
    other = cache.gather(2, cache.slots(1, 0, 20).to(device))[0]
    assert int(torch.count_nonzero(other)) == 0
    assert cache.allocator.free(0) == 3 and cache.allocator.free(1) == 2
    cache.allocator.check_invariants()
    assert cache.allocator.num_free_blocks == 100


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", seed=4, num_layers=6, hidden_size=128, intermediate_size=256)


def _engine(model_dir, target: tuple[str, int], **settings) -> ReplicaEngine:
    device, k = target
    config = EngineConfig(model=str(model_dir), device=device, max_inflight=k, kv_cache_bytes=16 << 20, **settings)
    engine = ReplicaEngine(config, cost_model=CostModel.from_coefficients(1e-3, 2e-5, max_profiled_tokens=8192))
    engine.start()
    return engine


def _alone(engine: ReplicaEngine, rid: str, n: int, seed: int, params: SamplingParams = GREEDY) -> list[int]:
    got = Collector()
    engine.add_request(_request(rid, n, 60.0, engine.clock(), seed=seed), params, got.sink(rid))
    got.wait(rid)
    return got.tokens(rid)


@pytest.mark.parametrize("target", DEVICE_K)
def test_urgent_request_preempts_a_long_prefill_on_the_device_with_kv_accounting(model_dir, target):
    """The engine on the device: an urgent short request suspends a long prefill at an operator
    boundary (up to K operators still in flight), runs, and the long one resumes with the same
    tokens as alone; while it is suspended every block is held by a live request or free, and at
    the end all are free."""
    engine = _engine(model_dir, target, policy="flowprefill", granularity="block")
    try:
        got = Collector()
        submitted = threading.Event()
        while_suspended: list[tuple[int, int]] = []

        def on_state(_stats) -> None:  # on the engine's loop thread
            sched = engine.scheduler
            running = sched.running
            if running is not None and running.request_ids == ("long",) and not submitted.is_set():
                submitted.set()
                engine.add_request(_request("short", 12, 0.5, engine.clock(), seed=2), GREEDY, got.sink("short"))
            long = sched.get("long")
            if long is not None and long.state.value == "suspended":
                alloc = engine.kv.allocator
                alloc.check_invariants()
                held = sum(len(alloc.block_table(seq)) for seq in (engine.live[r].seq_id for r in engine.live))
                while_suspended.append((held, alloc.num_free_blocks))

        engine.on_state_change = on_state
        engine.add_request(_request("long", 1500, 60.0, engine.clock(), seed=1), GREEDY, got.sink("long"))
        got.wait("long", "short")
        engine.on_state_change = None
        assert got.order.index(("short", "first")) < got.order.index(("long", "first"))
        assert engine.counters["preemptions"] >= 1 and engine.counters["prefill_batches"] == 2  # resumed
        assert while_suspended, "the long prefill was never seen suspended"
        total = engine.kv.allocator.num_blocks
        assert all(held + free == total and held >= -(-1500 // 16) for held, free in while_suspended)
        assert _alone(engine, "alone", 1500, seed=1) == got.tokens("long")
        assert _alone(engine, "short-alone", 12, seed=2) == got.tokens("short")
        assert engine.kv.allocator.num_free_blocks == total
    finally:
        engine.shutdown()


@pytest.mark.parametrize("target", DEVICE_K)
def test_interleaving_decode_steps_with_a_long_prefill_keeps_both_outputs(model_dir, target):
    """A decoding request with a tight TPOT target takes decode steps at the operator boundaries of a
    long prefill (the executor suspends it with operators in flight, a decode step runs, it resumes):
    both produce exactly the tokens they produce alone."""
    engine = _engine(model_dir, target, policy="flowprefill", granularity="block")
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    try:
        got = Collector()
        during_long: list[int] = []
        first = threading.Event()

        def dec_sink(out) -> None:  # the loop thread: the scheduler may be read here
            running = engine.scheduler.running
            if running is not None and running.request_ids == ("long",):
                during_long.append(len(got.outputs["dec"]))
            push(out)
            first.set()

        push = got.sink("dec")
        dec = Request("dec", [(i * 37) % 400 + 3 for i in range(20)], arrival_s=engine.clock(), ttft_slo_s=5.0,
                      tpot_slo_s=1e-4)  # a decode step is due at every boundary
        engine.add_request(dec, params, dec_sink)
        assert first.wait(60)
        engine.add_request(_request("long", 2000, 60.0, engine.clock(), seed=6), GREEDY, got.sink("long"))
        got.wait("dec", "long")
        assert during_long, "no decode step ran while the long prefill was running"
        assert engine.counters["decode_steps"] >= params.max_tokens - 1
        dec_alone = Collector()
        again = Request("dec2", dec.prompt_ids, arrival_s=engine.clock(), ttft_slo_s=5.0, tpot_slo_s=1e-4)
        engine.add_request(again, params, dec_alone.sink("dec2"))
        dec_alone.wait("dec2")
        assert dec_alone.tokens("dec2") == got.tokens("dec")
        assert _alone(engine, "long-alone", 2000, seed=6) == got.tokens("long")
        assert engine.kv.allocator.num_free_blocks == engine.kv.allocator.num_blocks
    finally:
        engine.shutdown()


@pytest.mark.parametrize("device_k", DEVICE_K)
def test_prefix_cache_hit_equals_a_cold_prefill(tiny_checkpoint_factory, device_k):
    """A prefill that reuses a cached prefix, including one published by a program suspended at every
    preemption point with K operators launched ahead, gives a cold prefill's logits and greedy token on
    the device; the suspended program itself resumes bitwise equal to an uninterrupted run."""
    from replicas.model.decoder import DecoderModel
    from replicas.prefix_tracker import PrefixTracker
    from replicas.programs import PrefillItem, prefill_program

    device, k = device_k
    model = DecoderModel.load(tiny_checkpoint_factory("llama", seed=5, num_layers=3), device=device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(9)
    long = torch.randint(0, vocab, (56,), generator=g).tolist()
    short = long[:32] + torch.randint(0, vocab, (6,), generator=g).tolist()

    def cold(tokens: list[int]) -> torch.Tensor:
        kv = PagedKVCache(model.kv_spec(8), num_blocks=32, device=device)
        kv.allocator.ensure_capacity(0, len(tokens))
        return PreemptibleExecutor("none", device=device).run_to_completion(
            prefill_program(model, kv, [PrefillItem(0, tokens)]))[0]

    def started(kv: PagedKVCache, tracker: PrefixTracker, rid: str, seq: int, tokens: list[int], ex):
        match = tracker.admit(rid, seq, tokens)
        kv.allocator.ensure_capacity(seq, len(tokens))
        item = PrefillItem(seq, tokens, match.cached_tokens, len(tokens))
        program = prefill_program(model, kv, [item], 16, on_pass=lambda segs: [tracker.passed(x.seq_id, x.end)
                                                                               for x in segs])
        return match.cached_tokens, ex.start(program)

    cold_short = cold(short)
    ex = PreemptibleExecutor("block", max_inflight=k, device=device)
    reference = None
    for stop_at in range(1, 13):  # 4 passes of 3 layers, 2 points each: every point in the first two passes
        kv = PagedKVCache(model.kv_spec(8), num_blocks=32, device=device, enable_prefix_caching=True)
        tracker = PrefixTracker(kv.allocator, "tiny")
        _, task = started(kv, tracker, "long", 1, long, ex)
        ex.run(task, should_stop=lambda t=task, n=stop_at: t.points_passed >= n)
        cached, other = started(kv, tracker, "short", 2, short, PreemptibleExecutor("none", device=device))
        assert cached in (0, 16, 32)
        PreemptibleExecutor("none", device=device).run(other)
        assert torch.allclose(other.result[2], cold_short, atol=2e-5, rtol=0)
        assert int(other.result[2].argmax()) == int(cold_short.argmax())
        assert ex.run(task)
        reference = task.result[1] if reference is None else reference
        assert torch.equal(task.result[1], reference), f"the suspended program differs after stop {stop_at}"
