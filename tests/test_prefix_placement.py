"""Prefix-aware placement: replicas publish what their cache holds, the router prices a request on each
replica with its expected hit, SLO first; the prefix_affinity baseline follows Ray Serve LLM's rules."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig
from replicas.prefix_hash import PrefixNaming
from replicas.replica_request import ReplicaRequest
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from router.placement import (
    AFFINITY_IMBALANCE,
    PlacementRequest,
    ReplicaLoad,
    expected_hit_tokens,
    load_from_state,
    rank_replicas,
)
from state.client import ClusterState
from state.redis_server import RedisServer
from state.schema import PrefixSummary, QueuedRequest, ReplicaQueueState, SchemaError

COST = CostModel.from_coefficients(0.01, 1e-3, cached_kappa=1e-7)  # 1 ms per new token: a hit is much cheaper


@pytest.fixture(scope="module")
def served(tiny_checkpoint_factory):
    """A real engine after serving a conversation's first turn: its published summary and naming."""
    model_dir = str(tiny_checkpoint_factory("llama", seed=5, num_layers=2))
    engine = ReplicaEngine(EngineConfig(model=model_dir, cpu_threads=1, block_size=8),
                           cost_model=CostModel.from_coefficients(1e-3, 1e-4, max_profiled_tokens=8192))
    engine.start()
    first = [(7 * i) % 300 + 3 for i in range(200)]  # the first turn's prompt
    request = Request("turn1", first, arrival_s=engine.clock(), ttft_slo_s=60.0, max_tokens=2)

    async def run() -> None:
        async for _ in engine.generate(request, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)):
            pass

    try:
        asyncio.run(run())
        stats = engine.stats()
        naming = PrefixNaming.from_dict(engine.prefix_naming())
    finally:
        engine.shutdown()
    assert stats.prefix is not None and naming is not None
    return first, stats, naming


def _request(naming: PrefixNaming, tokens: list[int], now: float, slo: float) -> PlacementRequest:
    payload = ReplicaRequest("turn2", tuple(tokens), arrival_s=now, ttft_slo_s=slo,
                             sampling=SamplingParams(max_tokens=4), prefix_names=naming.names_of(tokens))
    return PlacementRequest(payload.request_id, payload.prompt_tokens, payload.deadline, payload.ttft_slo_s,
                            prefix_names=payload.prefix_names)


def _state(rid: str, now: float, *queued: QueuedRequest, prefix: PrefixSummary | None = None) -> ReplicaQueueState:
    return ReplicaQueueState(rid, "flowprefill", "m", now, 1, tuple(queued),
                             prefix_version=prefix.version if prefix else 0)


def test_the_second_turn_goes_to_the_replica_holding_the_first_when_both_meet_the_deadline(served):
    first, stats, naming = served
    now = 1000.0
    second = first + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    req = _request(naming, second, now, slo=1.0)
    holder = load_from_state(_state("A", now, prefix=stats.prefix), 0.0, now, 5.0, prefix=stats.prefix)
    other = load_from_state(_state("B", now), 0.0, now, 5.0)
    assert expected_hit_tokens(req, holder) == 192 and expected_hit_tokens(req, other) == 0  # 6 routing names x 32
    for margin in (0.0, req.ttft_slo_s):  # bin packing, or spreading (the router's default margin)
        d = rank_replicas("slo_aware", req, [other, holder], COST, now, margin_s=margin)
        assert d.ranked[0] == "A" and d.cost_s == pytest.approx(COST.predict_suffix(18, 192))
        assert d.predicted_ttft["A"] < d.predicted_ttft["B"]


def test_the_second_turn_goes_elsewhere_when_only_the_other_replica_meets_its_deadline(served):
    first, stats, naming = served
    now = 1000.0
    req = _request(naming, first + list(range(30, 40)), now, slo=0.5)
    urgent_work = QueuedRequest("x", "waiting", now + 0.49, 0.49, 490)  # earlier deadline: runs first on A
    holder = load_from_state(_state("A", now, urgent_work, prefix=stats.prefix), 0.0, now, 5.0, prefix=stats.prefix)
    other = load_from_state(_state("B", now), 0.0, now, 5.0)
    d = rank_replicas("slo_aware", req, [holder, other], COST, now, margin_s=req.ttft_slo_s)
    assert d.ranked == ["B", "A"] and d.predicted_ttft["B"] <= 0.5 < d.predicted_ttft["A"]
    assert rank_replicas("prefix_affinity", req, [holder, other], COST, now).ranked[0] == "A"  # the cache, blindly


def test_prefix_affinity_follows_the_longest_match_unless_load_is_imbalanced_or_nothing_matches():
    now = 0.0
    names = tuple(f"{i:08x}" for i in range(10))
    req = PlacementRequest("q", 640, now + 10.0, 10.0, prefix_names=names)

    def load(rid: str, cached: tuple[str, ...], depth: int = 0) -> ReplicaLoad:
        queued = tuple((now + 50.0, 0.1) for _ in range(depth))
        return ReplicaLoad(rid, queued=queued, cached=frozenset(cached), cache_block_tokens=64)

    short, long_, none = load("A", names[:2]), load("B", names[:6]), load("C", ())
    assert rank_replicas("prefix_affinity", req, [short, long_, none], COST, now).ranked == ["B", "A", "C"]
    busy = load("B", names[:6], depth=AFFINITY_IMBALANCE + 1)
    d = rank_replicas("prefix_affinity", req, [short, busy, none], COST, now)
    assert d.ranked[0] in ("A", "C") and "imbalanced" in d.reason  # balance first, as Ray Serve LLM does
    tiny = PlacementRequest("q", 6400, now + 10.0, 10.0, prefix_names=names)  # 64 of 6400 tokens: < 10 %
    d = rank_replicas("prefix_affinity", tiny, [load("A", names[:1] + ("x",) * 5), load("C", names[:1])], COST, now)
    assert d.ranked[0] == "C" and "smallest cache" in d.reason


def test_summaries_round_trip_through_redis_and_a_bad_one_names_its_field(redis_server: RedisServer, served):
    _, stats, _ = served
    ns = f"p{uuid.uuid4().hex[:8]}"
    state = stats.queue_state("rep-1", "flowprefill", seq=1, updated_at=1000.0)

    async def body() -> None:
        async with ClusterState(redis_server.url, namespace=ns) as cs:
            await cs.publish_replica_state("rep-1", state, prefix=stats.prefix)
            assert await cs.read_prefix_summaries(["rep-1", "rep-2"]) == {"rep-1": stats.prefix}
            bad = PrefixSummary(1, 32, "s", ("nothex!!",)).to_json()
            await cs._redis.set(cs.keys.replica_prefixes("rep-2"), bad)  # noqa: SLF001 - a corrupt writer
            with pytest.raises(SchemaError, match="prefixes.*names"):
                await cs.read_prefix_summaries(["rep-2"])
            assert await cs.read_prefix_summaries(["rep-1", "rep-2"], skip_invalid=True) == {"rep-1": stats.prefix}
            await cs.deregister_replica("rep-1")
            assert await cs.read_prefix_summaries(["rep-1"]) == {}

    asyncio.run(body())
    assert state.prefix_version == stats.prefix.version and state.prefix_hit_tokens == 0
    assert 0 < len(stats.prefix.names) <= 512 and all(len(n) == 8 for n in stats.prefix.names)
