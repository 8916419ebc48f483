"""The replica engine end to end on a real (tiny) model: preemption, policies, aborts, streaming."""

import asyncio
import threading

import pytest

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig, EngineConfigError
from replicas.engine_types import RequestOutput
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


class Collector:
    """Outputs per request, and an event per finished request (no sleeping to wait)."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.order: list[tuple[str, str]] = []  # (request id, "first" | "finish")
        self.done: dict[str, threading.Event] = {}

    def sink(self, rid: str):
        self.outputs[rid] = []
        self.done[rid] = threading.Event()

        def push(out: RequestOutput) -> None:
            if not self.outputs[rid]:
                self.order.append((rid, "first"))
            self.outputs[rid].append(out)
            if out.finish_reason is not None:
                self.order.append((rid, "finish"))
                self.done[rid].set()

        return push

    def wait(self, *rids: str) -> None:
        for rid in rids:
            assert self.done[rid].wait(120), f"{rid} did not finish"

    def tokens(self, rid: str) -> list[int]:
        return [t for out in self.outputs[rid] for t in out.token_ids]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", seed=4, num_layers=6, hidden_size=128, intermediate_size=256)


def _engine(model_dir, **settings) -> ReplicaEngine:
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=8 << 20, **settings)
    # 1 ms + 20 us per token: deadlines below are far apart relative to this.
    engine = ReplicaEngine(config, cost_model=CostModel.from_coefficients(1e-3, 2e-5, max_profiled_tokens=8192))
    engine.start()
    return engine


def _request(rid: str, n: int, slo_s: float, arrival: float, seed: int = 0) -> Request:
    ids = [(seed * 7919 + i * 31) % 400 + 3 for i in range(n)]
    return Request(rid, ids, arrival_s=arrival, ttft_slo_s=slo_s)


def _run_long_then_short(engine: ReplicaEngine) -> Collector:
    """Submit a long prompt; the moment it is running, a short urgent one arrives."""
    got = Collector()
    submitted = threading.Event()

    def on_state(_stats) -> None:
        running = engine.scheduler.running
        if running is not None and running.request_ids == ("long",) and not submitted.is_set():
            submitted.set()
            engine.add_request(_request("short", 12, 0.5, engine.clock(), seed=2), GREEDY, got.sink("short"))

    engine.on_state_change = on_state
    engine.add_request(_request("long", 1500, 60.0, engine.clock(), seed=1), GREEDY, got.sink("long"))
    got.wait("long")
    assert submitted.is_set()
    got.wait("short")
    return got


def test_urgent_short_request_preempts_a_long_prefill_and_long_output_is_unchanged(model_dir):
    engine = _engine(model_dir, policy="flowprefill", granularity="block")
    try:
        got = _run_long_then_short(engine)
        assert got.order.index(("short", "first")) < got.order.index(("long", "first"))
        assert engine.counters["preemptions"] >= 1
        assert engine.counters["prefill_batches"] == 2  # the long batch was resumed, not restarted
        long_tokens = got.tokens("long")
        alone = Collector()
        engine.on_state_change = None
        engine.add_request(_request("alone", 1500, 60.0, engine.clock(), seed=1), GREEDY, alone.sink("alone"))
        alone.wait("alone")
        assert alone.tokens("alone") == long_tokens
        assert got.outputs["short"][0].ttft_s is not None
        assert engine.kv.allocator.num_free_blocks == engine.kv.allocator.num_blocks
    finally:
        engine.shutdown()


def test_fcfs_makes_the_short_request_wait(model_dir):
    engine = _engine(model_dir, policy="fcfs", granularity="block")
    try:
        got = _run_long_then_short(engine)
        assert got.order.index(("long", "first")) < got.order.index(("short", "first"))
        assert engine.counters["preemptions"] == 0
    finally:
        engine.shutdown()


def test_chunked_policy_runs_the_short_request_at_the_next_chunk_boundary(model_dir):
    engine = _engine(model_dir, policy="chunked", policy_chunk_tokens=256, granularity="none")
    try:
        got = _run_long_then_short(engine)
        assert got.order.index(("short", "first")) < got.order.index(("long", "first"))
        assert engine.counters["preemptions"] == 0  # no operator-level preemption, only chunk boundaries
        assert engine.counters["prefill_batches"] > 1500 // 256
    finally:
        engine.shutdown()


@pytest.mark.parametrize("when", ["waiting", "running", "decoding"])
def test_abort_in_any_state_frees_kv(model_dir, when):
    engine = _engine(model_dir)
    got = Collector()
    aborted = threading.Event()

    def on_state(_stats) -> None:
        req = engine.scheduler.get("victim")
        state = req.state.value if req is not None else None
        if not aborted.is_set() and state == when:
            aborted.set()
            engine.abort("victim")

    try:
        if when == "waiting":  # keep the executor busy so the victim waits
            engine.add_request(_request("busy", 1200, 60.0, engine.clock(), 1), GREEDY, got.sink("busy"))
        engine.on_state_change = on_state
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        engine.add_request(_request("victim", 600, 120.0, engine.clock(), 3), params, got.sink("victim"))
        got.wait("victim")
        assert got.outputs["victim"][-1].finish_reason == "abort"
        if when == "waiting":
            got.wait("busy")
        engine.on_state_change = None
        check = Collector()
        engine.add_request(_request("after", 20, 5.0, engine.clock(), 5), GREEDY, check.sink("after"))
        check.wait("after")
        assert engine.kv.allocator.num_free_blocks == engine.kv.allocator.num_blocks
    finally:
        engine.shutdown()


def test_async_stream_and_disconnect_abort(model_dir):
    engine = _engine(model_dir)

    async def scenario() -> tuple[list[RequestOutput], int]:
        outs = [out async for out in engine.generate(_request("a", 30, 5.0, engine.clock()), GREEDY)]
        stream = engine.generate(_request("b", 30, 5.0, engine.clock()), SamplingParams(max_tokens=500))
        await stream.__anext__()
        await stream.aclose()  # the client went away after the first token
        while engine.live:  # the abort is processed on the engine thread
            await asyncio.sleep(0.01)
        return outs, engine.kv.allocator.num_free_blocks

    try:
        outs, free = asyncio.run(scenario())
        assert [o.finish_reason for o in outs][-1] == "length" and sum(len(o.token_ids) for o in outs) == 6
        assert outs[0].ttft_s is not None and outs[0].prompt_tokens == 30
        assert free == engine.kv.allocator.num_blocks
    finally:
        engine.shutdown()


def test_bad_settings_name_the_field():
    with pytest.raises(EngineConfigError, match="engine.policy"):
        EngineConfig.from_dict({"policy": "lifo"})
    with pytest.raises(EngineConfigError, match="engine.granularity"):
        EngineConfig.from_dict({"granularity": "word"})
    with pytest.raises(EngineConfigError, match="engine.kv_cache_byte"):
        EngineConfig.from_dict({"kv_cache_byte": 5})
    with pytest.raises(EngineConfigError, match="engine.alpha"):
        EngineConfig.from_dict({"alpha": 1.5})
    with pytest.raises(EngineConfigError, match="engine.late_reject_factor"):
        EngineConfig.from_dict({"late_reject_factor": 0.9})
    with pytest.raises(EngineConfigError, match="engine.max_queued_work_s"):
        EngineConfig.from_dict({"max_queued_work_s": -1})
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(EngineConfigError, match="engine.cpu_threads"):
            EngineConfig.from_dict({"cpu_threads": bad})


def test_engine_computes_with_its_configured_threads_and_profiles_under_their_count(model_dir):
    """``cpu_threads`` sets the loop thread's torch threads, and a cached CPU profile is named after
    the thread count it was measured with, so a profile from more threads is never used with fewer."""
    import torch

    from replicas.cost_profiling import profile_file_name
    from replicas.profiling import profile_cache_path

    before = torch.get_num_threads()
    cost = CostModel.from_coefficients(1e-3, 1e-3, max_profiled_tokens=8192)
    try:
        engine = ReplicaEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=8 << 20, cpu_threads=1),
                               cost_model=cost)
        # OpenMP thread counts are per thread: the engine's own thread computes with 1
        assert engine.run_on_compute_thread(lambda: profile_cache_path(engine.model)).name.endswith("-t1.json")
        engine.start()
        try:
            got = Collector()
            engine.add_request(_request("r", 8, 5.0, engine.clock()), GREEDY, got.sink("r"))
            got.wait("r")
            assert len(got.tokens("r")) == GREEDY.max_tokens
            assert engine.compute_threads == 1
            with pytest.raises(RuntimeError, match="while the loop runs"):
                engine.run_on_compute_thread(lambda: None)
        finally:
            engine.shutdown()
    finally:
        torch.set_num_threads(before)
    one, two = (profile_file_name("m", "float32", "cpu", "AMD EPYC 7B13", n) for n in (1, 2))
    assert one != two and two.endswith("-t2.json")
    assert profile_file_name("m", "bfloat16", "cuda", "NVIDIA H200", 2) == "m-bfloat16-cuda-NVIDIA_H200.json"


def test_overload_admission_refuses_a_hopeless_request_with_a_retry_hint(model_dir):
    """Behind predicted work with earlier deadlines, a non-sheddable request that could only be served
    far past its SLO is refused at once (``rejected`` with ``retry_after_s``) and holds no KV; one with
    room in its SLO is served.  All arrive before the loop starts: one inbox drain, in order."""
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=8 << 20, late_reject_factor=1.5)
    # predicted 1 ms + 1 ms per token (the model runs far faster: only admission reads this)
    engine = ReplicaEngine(config, cost_model=CostModel.from_coefficients(1e-3, 1e-3, max_profiled_tokens=8192))
    try:
        got = Collector()
        free = engine.kv.allocator.num_free_blocks
        now = engine.clock()
        for i in range(4):  # arrived 8 s ago, due in 2 s: predicted TTFTs 9.5, 11, 12.5, 14 s <= 1.5 x 10
            engine.add_request(_request(f"q{i}", 1500, 10.0, now - 8.0, seed=i), GREEDY, got.sink(f"q{i}"))
        engine.add_request(_request("hopeless", 40, 2.5, now, seed=9), GREEDY, got.sink("hopeless"))
        engine.add_request(_request("roomy", 40, 60.0, now, seed=8), GREEDY, got.sink("roomy"))
        engine.start()
        got.wait("hopeless", "roomy", "q0", "q1", "q2", "q3")
        (final,) = got.outputs["hopeless"]  # 6 s ahead + 0.041 s > 1.5 x 2.5 s
        assert final.finish_reason == "rejected" and final.token_ids == ()
        assert final.error is not None and "1.5 x the 2.500s TTFT SLO" in final.error
        assert final.retry_after_s == pytest.approx(6.041 - 3.75, abs=0.05)
        assert all(got.outputs[r][-1].finish_reason == "length" for r in ("roomy", "q0", "q1", "q2", "q3"))
        assert engine.counters["rejected"] == 1
        assert engine.kv.allocator.num_free_blocks == free
    finally:
        engine.shutdown()


@pytest.mark.parametrize("calibrate", [True, False])
def test_engine_learns_how_much_slower_prefill_runs_than_its_profile(model_dir, calibrate):
    """A profile 100x too optimistic (as an idle profile is under load, in the extreme): with
    ``calibrate_cost`` the scheduler's predictions move to the measured prefill time (clamped at
    4x); without it they stay as profiled."""
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=8 << 20, calibrate_cost=calibrate)
    base = CostModel.from_coefficients(5e-3, 1e-8, max_profiled_tokens=8192)  # ~5 ms for any prompt here
    engine = ReplicaEngine(config, cost_model=base)
    engine.start()
    try:
        got = Collector()
        for i in range(12):  # one at a time: each prefill is its own program
            engine.add_request(_request(f"r{i}", 600, 60.0, engine.clock(), seed=i), GREEDY, got.sink(f"r{i}"))
            got.wait(f"r{i}")
        scheduler = engine.scheduler
        assert scheduler.base_cost_model is base
        if calibrate:
            assert scheduler.calibration.samples == 12
            assert scheduler.calibration.factor == pytest.approx(4.0, rel=0.1)
            assert scheduler.cost_model.predict(600) == pytest.approx(scheduler.calibration.factor * base.predict(600))
            assert engine.stats().cost_scale == scheduler.calibration.factor
        else:
            assert scheduler.cost_model is base and scheduler.calibration.samples == 0
    finally:
        engine.shutdown()


def test_every_torch_operation_of_an_engine_runs_on_its_one_compute_thread(model_dir, monkeypatch):
    """Model load, KV cache, prefill and decode all run on the engine's compute thread, never on the
    caller's: libgomp throttles every OpenMP team once a process holds more workers than cores (see
    replicas.compute_thread). The wrappers only record the calling thread."""
    import threading

    from replicas.kv_cache import PagedKVCache
    from replicas.model.decoder import DecoderModel

    seen: dict[str, set[int]] = {}

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            seen.setdefault(name, set()).add(threading.get_ident())
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(DecoderModel, "load", classmethod(recording("load", DecoderModel.load.__func__)))
    monkeypatch.setattr(DecoderModel, "forward", recording("forward", DecoderModel.forward))
    monkeypatch.setattr(PagedKVCache, "from_budget", classmethod(recording("kv", PagedKVCache.from_budget.__func__)))
    cost = CostModel.from_coefficients(1e-3, 1e-3, max_profiled_tokens=8192)
    engine = ReplicaEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=8 << 20), cost_model=cost)
    engine.start()
    try:
        got = Collector()
        engine.add_request(_request("r", 8, 5.0, engine.clock()), GREEDY, got.sink("r"))
        got.wait("r")
        assert len(got.tokens("r")) == GREEDY.max_tokens  # one prefill and decode steps
    finally:
        engine.shutdown()
    compute = engine._compute.ident  # noqa: SLF001 - the thread under test
    assert set(seen) == {"load", "forward", "kv"}
    assert all(idents == {compute} for idents in seen.values()), seen
    assert compute != threading.get_ident()
    with pytest.raises(RuntimeError, match="after shutdown"):
        engine.start()


def test_a_failing_loop_is_logged_when_it_fails_and_shutdown_stays_quiet(model_dir, monkeypatch, caplog):
    """Fault injection (the inbox drain is replaced by one that raises): the loop's exception is logged
    at once, the engine reports itself dead, and shutdown() does not re-raise it."""
    import logging
    import threading

    cost = CostModel.from_coefficients(1e-3, 1e-3, max_profiled_tokens=8192)
    engine = ReplicaEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=8 << 20), cost_model=cost)
    failed = threading.Event()

    def broken_drain() -> None:
        failed.set()
        raise RuntimeError("injected loop failure")

    monkeypatch.setattr(engine, "_drain_inbox", broken_drain)
    with caplog.at_level(logging.ERROR, logger="replicas.engine"):
        engine.start()
        assert failed.wait(10)
        # the next job on the compute thread runs after the loop's future and its callbacks are done
        engine._compute.call(lambda: None)  # noqa: SLF001
        assert not engine.is_alive()
        assert any("engine loop failed" in r.message and r.exc_info and "injected loop failure" in str(r.exc_info[1])
                   for r in caplog.records)
        engine.shutdown()  # does not raise
