"""P/D meets n > 1: a handover carries one sequence, so a prefill replica decodes a request with
n > 1 itself; its choices equal a colocated engine's, and no KV block leaks."""

from __future__ import annotations

import threading

import pytest

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig
from replicas.engine_types import RequestOutput, ends_request
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", seed=4, num_layers=6, hidden_size=128, intermediate_size=256)


def _choices(engine: ReplicaEngine, rid: str, params: SamplingParams) -> tuple[dict[int, list[int]], list[str]]:
    by_index: dict[int, list[int]] = {}
    reasons: list[str] = []
    done = threading.Event()

    def sink(out: RequestOutput) -> None:
        by_index.setdefault(out.index, []).extend(out.token_ids)
        if out.finish_reason is not None:
            reasons.append(out.finish_reason)
        if ends_request(out):
            done.set()

    ids = [(i * 31) % 400 + 3 for i in range(40)]
    engine.add_request(Request(rid, ids, arrival_s=engine.clock(), ttft_slo_s=30.0), params, sink)
    assert done.wait(120), f"{rid} did not finish"
    return by_index, reasons


@pytest.fixture(scope="module")
def engines(model_dir):
    built = {role: ReplicaEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=8 << 20, role=role),
                                 cost_model=CostModel.from_coefficients(1e-3, 2e-5, max_profiled_tokens=8192))
             for role in ("colocated", "prefill")}
    for engine in built.values():
        engine.start()
    yield built
    for engine in built.values():
        engine.shutdown()


def test_a_prefill_replica_decodes_n_choices_itself_and_they_equal_colocated(engines):
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=11, n=3, ignore_eos=True)
    want, _ = _choices(engines["colocated"], "c", params)
    got, reasons = _choices(engines["prefill"], "p", params)
    assert sorted(got) == [0, 1, 2] and all(len(t) == 6 for t in got.values())
    assert got == want and "handover" not in reasons
    for engine in engines.values():
        alloc = engine.kv.allocator
        assert not engine.live and alloc.num_free_blocks == alloc.num_blocks


def test_a_prefill_replica_decodes_structured_output_itself(engines):
    """A handover carries no grammar state: a json_schema request stays on the prefill replica."""
    params = SamplingParams(max_tokens=12, temperature=0.0, json_schema='{"type": "object"}')
    want, _ = _choices(engines["colocated"], "c-json", params)
    got, reasons = _choices(engines["prefill"], "p-json", params)
    assert got == want and len(got[0]) > 1 and "handover" not in reasons
