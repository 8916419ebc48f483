"""Prefill/decode disaggregation at the engine level (no Ray): a prefill engine hands each request over
after its first token, a decode engine continues it; output equals a colocated engine's, token for
token, and neither side leaks a KV block."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig, EngineConfigError
from replicas.engine_types import RequestOutput
from replicas.handover import KVHandover
from replicas.prefix_hash import block_names
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


class Outputs:
    """Outputs per request, with an event when its stream ends (no sleeping to wait)."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.done: dict[str, threading.Event] = {}
        self.order: list[tuple[str, str]] = []

    def sink(self, rid: str, on_out=None):  # noqa: ANN001, ANN201
        self.outputs.setdefault(rid, [])
        self.done[rid] = threading.Event()

        def push(out: RequestOutput) -> None:
            if out.token_ids and not any(o.token_ids for o in self.outputs[rid]):
                self.order.append((rid, "first"))
            self.outputs[rid].append(out)
            if on_out is not None:
                on_out(out)
            if out.finish_reason is not None:
                self.done[rid].set()

        return push

    def wait(self, *rids: str) -> None:
        for rid in rids:
            assert self.done[rid].wait(120), f"{rid} did not finish"

    def tokens(self, rid: str) -> list[int]:
        return [t for out in self.outputs[rid] for t in out.token_ids]

    def last(self, rid: str) -> RequestOutput:
        return self.outputs[rid][-1]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", seed=4, num_layers=6, hidden_size=128, intermediate_size=256)


def _engine(model_dir, **settings) -> ReplicaEngine:
    settings.setdefault("kv_cache_bytes", 8 << 20)
    config = EngineConfig(model=str(model_dir), **settings)
    engine = ReplicaEngine(config, cost_model=CostModel.from_coefficients(1e-3, 2e-5, max_profiled_tokens=8192))
    engine.start()
    return engine


def _request(rid: str, n: int, slo_s: float, arrival: float, seed: int = 0) -> Request:
    ids = [(seed * 7919 + i * 31) % 400 + 3 for i in range(n)]
    return Request(rid, ids, arrival_s=arrival, ttft_slo_s=slo_s)


def _assert_no_leaks(*engines: ReplicaEngine) -> None:
    for engine in engines:
        alloc = engine.kv.allocator
        assert not engine.live
        assert alloc.num_free_blocks == alloc.num_blocks, f"{engine.role}: KV blocks leaked"
        alloc.check_invariants()


class PD:
    """A prefill engine wired to a decode engine in-process: each handover output goes to the decoder."""

    def __init__(self, prefill: ReplicaEngine, decode: ReplicaEngine) -> None:
        self.prefill, self.decode = prefill, decode
        self.got = Outputs()
        self.handovers: dict[str, KVHandover] = {}

    def submit(self, request: Request, params: SamplingParams = GREEDY) -> None:
        rid = request.request_id
        decode_sink = self.got.sink(rid)

        def on_prefill(out: RequestOutput) -> None:
            if out.finish_reason == "handover":
                self.handovers[rid] = out.handover
                self.decode.add_handover(out.handover, decode_sink)
            elif out.finish_reason is not None:  # finished on the prefill side (max_tokens 1, eos, error)
                decode_sink(RequestOutput(rid, (), "", out.finish_reason))

        self.got.outputs[rid] = []
        self.prefill.add_request(request, params, self._forward(rid, on_prefill))

    def _forward(self, rid: str, on_prefill):  # noqa: ANN001, ANN202
        def push(out: RequestOutput) -> None:
            if out.token_ids:
                if not self.got.outputs[rid]:
                    self.got.order.append((rid, "first"))
                self.got.outputs[rid].append(dataclasses.replace(out, finish_reason=None))
            on_prefill(out)
        return push


def _colocated_tokens(engine: ReplicaEngine, requests: list[Request], params: SamplingParams = GREEDY
                      ) -> dict[str, list[int]]:
    got = Outputs()
    for r in requests:
        engine.add_request(dataclasses.replace(r), params, got.sink(r.request_id))
    got.wait(*(r.request_id for r in requests))
    return {r.request_id: got.tokens(r.request_id) for r in requests}


@pytest.fixture(scope="module")
def engines(model_dir):
    built = {role: _engine(model_dir, role=role) for role in ("colocated", "prefill", "decode")}
    yield built
    for engine in built.values():
        engine.shutdown()


def test_greedy_output_through_a_handover_equals_colocated_output(engines):
    colocated, prefill, decode = engines["colocated"], engines["prefill"], engines["decode"]
    now = colocated.clock()
    # a prompt shorter than a block, one of exactly two blocks, longer ones over several passes
    requests = [_request(f"r{n}", n, 30.0, now, seed=n) for n in (5, 32, 77, 300)]
    want = _colocated_tokens(colocated, requests)
    pd = PD(prefill, decode)
    for r in requests:
        pd.submit(dataclasses.replace(r))
    pd.got.wait(*want)
    for r in requests:
        rid = r.request_id
        assert pd.got.tokens(rid) == want[rid], rid
        assert pd.got.last(rid).finish_reason == "length"
        h = pd.handovers[rid]
        blocks = -(-r.num_prompt_tokens // 16)
        assert h.keys.shape[1] == blocks and h.nbytes == blocks * decode.kv.spec.bytes_per_block
        assert list(h.block_names) == block_names(r.prompt_ids, 16, prefill.prefix.salt)
    assert prefill.counters["handovers_out"] == decode.counters["handovers_in"] == len(requests)
    assert prefill.counters["decode_steps"] == 0  # the prefill engine never decodes
    assert prefill.stats().counters["handover_bytes_out"] == decode.stats().counters["handover_bytes_in"] > 0
    _assert_no_leaks(colocated, prefill, decode)
    # the prefill side kept the prompts' full blocks cached (as vLLM and SGLang do), none held
    assert prefill.kv.allocator.num_cached_blocks > 0


def test_a_prefill_preempted_at_operator_boundaries_then_handed_over_gives_equal_output(model_dir, engines):
    colocated, decode = engines["colocated"], engines["decode"]
    prefill = _engine(model_dir, role="prefill", granularity="block", enable_prefix_caching=False)
    try:
        now = prefill.clock()
        long, short = _request("long", 1500, 60.0, now, seed=1), _request("short", 12, 0.5, now, seed=2)
        want = _colocated_tokens(colocated, [long, short])
        pd = PD(prefill, decode)
        submitted = threading.Event()

        def on_state(_stats) -> None:  # the moment the long prompt runs, an urgent short one arrives
            running = prefill.scheduler.running
            if running is not None and running.request_ids == ("long",) and not submitted.is_set():
                submitted.set()
                pd.submit(dataclasses.replace(short, arrival_s=prefill.clock()))

        prefill.on_state_change = on_state
        pd.submit(dataclasses.replace(long))
        pd.got.wait("long")
        assert submitted.is_set()
        pd.got.wait("short")
        assert prefill.counters["preemptions"] >= 1 and prefill.counters["prefill_batches"] == 2
        assert pd.got.order.index(("short", "first")) < pd.got.order.index(("long", "first"))
        assert pd.got.tokens("long") == want["long"] and pd.got.tokens("short") == want["short"]
        prefill.on_state_change = None
        _assert_no_leaks(prefill, decode)
    finally:
        prefill.shutdown()


def test_a_seeded_sampled_request_continues_its_random_stream_on_the_decode_side(engines):
    colocated, prefill, decode = engines["colocated"], engines["prefill"], engines["decode"]
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=1234, ignore_eos=True,
                            repetition_penalty=1.3)
    r = _request("seeded", 40, 30.0, colocated.clock(), seed=9)
    want = _colocated_tokens(colocated, [r], params)
    pd = PD(prefill, decode)
    pd.submit(dataclasses.replace(r), params)
    pd.got.wait("seeded")
    assert pd.got.tokens("seeded") == want["seeded"]
    assert pd.handovers["seeded"].generator_state is not None
    _assert_no_leaks(prefill, decode)


def test_a_decode_engine_publishes_its_decode_pace_and_tightest_tpot_slo_while_decoding(engines):
    """What the decode router reads from Redis (router/decode_router.py)."""
    prefill, decode = engines["prefill"], engines["decode"]
    r = dataclasses.replace(_request("paced", 40, 30.0, prefill.clock(), seed=3), tpot_slo_s=0.25)
    seen: dict[str, object] = {}
    got = Outputs()

    def watch(out: RequestOutput) -> None:  # on the decode engine's thread, between its steps
        if len(got.tokens("paced")) == 5:
            seen.update(published=decode.stats(), interval=decode.decoder.step_interval_s, tpot=decode.decoder.tpot_s)

    decode_sink = got.sink("paced", watch)

    def on_prefill(out: RequestOutput) -> None:
        if out.finish_reason == "handover":
            decode.add_handover(out.handover, decode_sink)

    prefill.add_request(r, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), on_prefill)
    got.wait("paced")
    assert len(got.tokens("paced")) == 11 and got.last("paced").finish_reason == "length"
    published = seen["published"]
    assert published.decoding == 1 and published.tpot_target_s == 0.25  # the stream's own TPOT SLO binds
    assert seen["interval"] > 0 and seen["tpot"] == seen["interval"]  # one stream: a token every step
    after = decode.stats()
    assert after.decoding == 0 and after.tpot_s == 0.0 and after.tpot_target_s == 0.0
    state = after.queue_state("d", "flowprefill", 1, after.updated_at)
    assert state.decode_step_interval_s == after.decode_step_interval_s > 0
    _assert_no_leaks(prefill, decode)


def test_a_one_token_request_finishes_on_the_prefill_side_without_a_handover(engines):
    prefill = engines["prefill"]
    got = Outputs()
    before = prefill.counters["handovers_out"]
    prefill.add_request(_request("one", 20, 30.0, prefill.clock()), SamplingParams(max_tokens=1, temperature=0.0),
                        got.sink("one"))
    got.wait("one")
    assert got.last("one").finish_reason == "length" and len(got.tokens("one")) == 1
    assert prefill.counters["handovers_out"] == before
    _assert_no_leaks(prefill)


def test_the_decode_side_attaches_prompt_blocks_its_prefix_cache_holds_instead_of_copying_them(engines):
    prefill, decode = engines["prefill"], engines["decode"]
    now = prefill.clock()
    pd = PD(prefill, decode)
    pd.submit(_request("turn1", 100, 30.0, now, seed=21))
    pd.got.wait("turn1")
    cached_before = decode.counters["handover_cached_tokens"]
    pd.submit(_request("turn1-again", 100, 30.0, now, seed=21))
    pd.got.wait("turn1-again")
    assert pd.got.tokens("turn1") == pd.got.tokens("turn1-again")
    # all full blocks but the one holding the last prompt token: (100 - 1) // 16 blocks
    assert decode.counters["handover_cached_tokens"] - cached_before == (99 // 16) * 16
    _assert_no_leaks(prefill, decode)


def test_a_bad_or_unfitting_handover_is_refused_naming_why_and_nothing_is_held(model_dir, engines):
    prefill = engines["prefill"]
    small = _engine(model_dir, role="decode", kv_cache_bytes=6 * prefill.kv.spec.bytes_per_block)
    try:
        handovers: dict[str, KVHandover] = {}
        got = Outputs()
        for rid, n in (("fits", 40), ("big", 200)):
            done = threading.Event()

            def keep(out: RequestOutput, rid: str = rid, done: threading.Event = done) -> None:
                if out.finish_reason == "handover":
                    handovers[rid] = out.handover
                if out.finish_reason is not None:
                    done.set()

            prefill.add_request(_request(rid, n, 30.0, prefill.clock(), seed=n), GREEDY, keep)
            assert done.wait(60)
        assert small.kv.allocator.num_blocks == 6
        bad = dataclasses.replace(handovers["fits"], keys=handovers["fits"].keys[:, :1])
        wrong_model = dataclasses.replace(handovers["fits"], salt="another-model")
        for rid, h in (("bad", bad), ("wrong", wrong_model), ("big", handovers["big"])):
            small.add_handover(h, got.sink(rid))
        got.wait("bad", "wrong", "big")
        assert got.last("bad").finish_reason == "rejected" and "handover.keys" in got.last("bad").error
        assert "handover.salt" in got.last("wrong").error
        assert "out of KV memory" in got.last("big").error
        _assert_no_leaks(small)
        small.add_handover(handovers["fits"], got.sink("fits"))
        got.wait("fits")
        assert got.last("fits").finish_reason == "length" and len(got.tokens("fits")) == GREEDY.max_tokens - 1
        _assert_no_leaks(small)
    finally:
        small.shutdown()


def test_aborting_a_handed_over_request_frees_its_kv(engines):
    prefill, decode = engines["prefill"], engines["decode"]
    pd = PD(prefill, decode)
    pd.submit(_request("victim", 50, 30.0, prefill.clock(), seed=3),
              SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True))

    def until_decoding() -> bool:
        return "victim" in decode.decoder.active

    deadline = decode.clock() + 60
    while not until_decoding():
        assert decode.clock() < deadline, "the handover never reached the decode batch"
        threading.Event().wait(0.01)
    decode.abort("victim")
    pd.got.wait("victim")
    assert pd.got.last("victim").finish_reason == "abort"
    _assert_no_leaks(prefill, decode)


def test_role_is_validated_by_name():
    with pytest.raises(EngineConfigError, match="engine.role"):
        EngineConfig.from_dict({"role": "both"})
    assert EngineConfig().role == "colocated"


@pytest.mark.slow
def test_smollm2_greedy_output_through_a_handover_equals_colocated_and_reports_its_cost(default_model_dir):
    prompt = list(range(1000, 1500))  # ~500 tokens
    engines = {role: _engine(default_model_dir, role=role, kv_cache_bytes=256 << 20)
               for role in ("colocated", "prefill", "decode")}
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        r = Request("smol", prompt, arrival_s=engines["colocated"].clock(), ttft_slo_s=60.0)
        want = _colocated_tokens(engines["colocated"], [r], params)
        pd = PD(engines["prefill"], engines["decode"])
        pd.submit(dataclasses.replace(r), params)
        pd.got.wait("smol")
        assert pd.got.tokens("smol") == want["smol"]
        h = pd.handovers["smol"]
        spec = engines["decode"].kv.spec
        assert h.nbytes == -(-500 // spec.block_size) * spec.bytes_per_block
        admit_ms = engines["decode"].counters["handover_admit_us"] / 1e3
        print(f"\nSmolLM2 handover: {len(prompt)} tokens, {h.nbytes} bytes, gather {h.gather_s * 1e3:.2f} ms, "
              f"admit {admit_ms:.2f} ms ({torch.get_num_threads()} threads)")
        _assert_no_leaks(engines["prefill"], engines["decode"])
    finally:
        for engine in engines.values():
            engine.shutdown()
