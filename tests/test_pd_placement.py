"""Decode placement (router/decode_router.py): room for the handover's KV first, then TPOT headroom, both
read from Redis (a real redis-server), on a ManualClock; no Ray cluster."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve.request_router import PendingRequest

from router.decode_router import DecodeDemand, DecodeRequestRouter, rank_decoders, ticket_demand, tpot_headroom
from state.client import ClusterState
from state.clock import ManualClock
from state.schema import ReplicaInfo, ReplicaQueueState

NOW = 1_700_000_000.0
NAMESPACE = "pd-placement-test"


def _state(rid: str, *, free: int = 5000, decoding: int = 0, interval_s: float = 0.0, target_s: float = 0.0,
           max_decoding: int = 64, total: int = 10_000, at: float = NOW) -> ReplicaQueueState:
    rounds = max(-(-decoding // max_decoding), 1)
    return ReplicaQueueState(rid, "flowprefill", "m", at, 1, kv_free_tokens=free, role="decode", decoding=decoding,
                             kv_total_tokens=total, max_decoding=max_decoding, decode_step_interval_s=interval_s,
                             tpot_s=interval_s * rounds if decoding else 0.0, tpot_target_s=target_s)


def test_a_decode_replica_without_kv_memory_for_the_handover_is_skipped():
    states = {"short": _state("short", free=500), "busy": _state("busy", free=900, decoding=30, interval_s=0.2)}
    # "short" idles (all its TPOT SLO to spare) but cannot hold 600 tokens: never chosen, whatever else it has
    assert rank_decoders(["short", "busy"], states, DecodeDemand(600, 0.5), NOW) == ["busy"]
    # a replica without a fresh state may have room: it ranks after the known ones with room
    assert rank_decoders(["short", "busy", "new"], states, DecodeDemand(600), NOW) == ["busy", "new"]


def test_among_replicas_with_room_the_most_tpot_headroom_wins():
    states = {
        "slow": _state("slow", decoding=4, interval_s=0.05),       # 0.10 - 0.05 = 0.05 s to spare
        "fast": _state("fast", decoding=8, interval_s=0.02),       # 0.10 - 0.02 = 0.08
        "tight": _state("tight", decoding=2, interval_s=0.03, target_s=0.04),  # its streams' 0.04 binds: 0.01
        "full": _state("full", decoding=8, interval_s=0.02, max_decoding=8),  # one more round: 0.10 - 0.04 = 0.06
        "idle": _state("idle", free=2000),                          # the whole 0.10
    }
    order = rank_decoders(list(states), states, DecodeDemand(600, 0.1), NOW)
    assert order == ["idle", "fast", "full", "slow", "tight"]
    assert tpot_headroom(states["full"], 0.1) == pytest.approx(0.06)
    # without a class SLO the replica's own tightest stream's, else the engine default, binds
    assert tpot_headroom(states["tight"], None) == pytest.approx(0.01)
    assert tpot_headroom(states["slow"], None) == pytest.approx(0.45)
    # equal headroom: fewest decoding, then most free KV
    tie = {"a": _state("a", free=3000), "b": _state("b", free=4000)}
    assert rank_decoders(["a", "b"], tie, DecodeDemand(600, 0.1), NOW) == ["b", "a"]


def test_when_no_replica_has_room_the_handover_waits_then_is_refused_clearly():
    states = {"a": _state("a", free=300), "b": _state("b", free=400)}
    demand = DecodeDemand(600, 0.1)
    assert rank_decoders(["a", "b"], states, demand, NOW, waited_s=29.0, max_kv_wait_s=30.0) == []  # waits
    # past the wait the short ones are tried, most free first: they refuse, and the router's resends end in a 503
    assert rank_decoders(["a", "b"], states, demand, NOW, waited_s=30.0, max_kv_wait_s=30.0) == ["b", "a"]
    # a request larger than every replica's whole KV pool never fits: no wait at all
    small = {"a": _state("a", free=300, total=500)}
    assert rank_decoders(["a"], small, demand, NOW, waited_s=0.0) == ["a"]


def test_stale_states_count_as_unknown():
    states = {"old": _state("old", free=9000, at=NOW - 10), "ok": _state("ok", free=700, decoding=3, interval_s=0.1)}
    assert rank_decoders(["old", "ok"], states, DecodeDemand(600), NOW, max_age_s=5.0) == ["ok", "old"]


def test_ticket_demand_reads_the_kv_tokens_and_tpot_slo_and_ignores_bad_values():
    def pending(ticket: object) -> PendingRequest:
        return PendingRequest(args=[ticket, []], kwargs={}, metadata=SimpleNamespace(internal_request_id="i"))

    async def run() -> None:  # a PendingRequest holds a future of the running loop
        assert ticket_demand(pending({"kv_tokens": 65, "tpot_slo_s": 0.2})) == DecodeDemand(65, 0.2)
        assert ticket_demand(pending({"kv_tokens": True, "tpot_slo_s": float("nan")})) == DecodeDemand(0, None)
        assert ticket_demand(pending("not a ticket")) == DecodeDemand() == ticket_demand(None)

    asyncio.run(run())


# ------------------------------------------------- the Serve router over a real Redis, on a ManualClock
def _replica(rid: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid))


def _pending(kv_tokens: int, internal: str, tpot_slo_s: float | None = 0.1) -> PendingRequest:
    ticket = {"request_id": internal, "bytes": 64, "kv_tokens": kv_tokens, "ready_at": NOW, "tpot_slo_s": tpot_slo_s}
    return PendingRequest(args=[ticket, ["ref"]], kwargs={},
                          metadata=SimpleNamespace(request_id=internal, internal_request_id=internal))


async def _publish(url: str, *states: ReplicaQueueState) -> None:
    async with ClusterState(url, namespace=NAMESPACE) as cluster:
        for st in states:
            await cluster.register_replica(st.replica_id, ReplicaInfo(st.replica_id, "m", "flowprefill"))
            await cluster.publish_replica_state(st.replica_id, st)


def _router(url: str, clock: ManualClock, **kw: Any) -> DecodeRequestRouter:  # noqa: ANN401
    router = DecodeRequestRouter.__new__(DecodeRequestRouter)  # Serve's __init__ needs a controller
    router.initialize_state(redis_url=url, namespace=NAMESPACE, cache_ttl_s=0.0, clock=clock, **kw)
    return router


def _ids(tiers: list[list[Any]]) -> list[str]:
    return [t[0].replica_id.unique_id for t in tiers]


def test_the_decode_router_places_by_kv_and_tpot_headroom_read_from_redis(redis_server):
    clock = ManualClock(NOW)
    reps = [_replica("d-slow"), _replica("d-fast"), _replica("d-short")]

    async def run() -> None:
        await _publish(redis_server.url, _state("d-slow", free=4000, decoding=2, interval_s=0.08),
                       _state("d-fast", free=1000, decoding=6, interval_s=0.02), _state("d-short", free=200))
        router = _router(redis_server.url, clock)
        first = _pending(600, "h1")
        tiers = await router.choose_replicas(reps, first)
        assert _ids(tiers) == ["d-fast", "d-slow"] and first.routing_context.should_backoff
        router.on_request_routed(first, reps[1].replica_id, None)
        # d-fast's state does not show h1's 600 tokens yet: 1000 - 600 cannot hold another 600
        clock.advance(0.01)
        assert _ids(await router.choose_replicas(reps, _pending(600, "h2"))) == ["d-slow"]
        # its next state shows them (and h1's stream): this router no longer subtracts them itself
        await _publish(redis_server.url, _state("d-fast", free=1000 - 600, decoding=7, interval_s=0.02,
                                                at=clock.advance(0.01)))
        assert _ids(await router.choose_replicas(reps, _pending(300, "h3"))) == ["d-fast", "d-slow"]
        router.on_request_completed(reps[1].replica_id, "h1")

    asyncio.run(run())


def test_a_handover_waits_for_kv_memory_and_goes_where_it_frees_up(redis_server):
    clock = ManualClock(NOW + 100)
    reps = [_replica("w-a"), _replica("w-b")]

    async def run() -> None:
        await _publish(redis_server.url, _state("w-a", free=100, decoding=9, interval_s=0.01, at=clock.now),
                       _state("w-b", free=300, decoding=1, interval_s=0.01, at=clock.now))
        router = _router(redis_server.url, clock, max_kv_wait_s=10.0)
        waiting = _pending(600, "big")
        assert await router.choose_replicas(reps, waiting) == [] and router.kv_waits == 1  # neither: it waits
        clock.advance(4.0)
        await _publish(redis_server.url, _state("w-a", free=700, decoding=8, interval_s=0.01, at=clock.now))
        assert _ids(await router.choose_replicas(reps, waiting)) == ["w-a"]  # a stream finished there: room
        # another handover that finds no room waits at most max_kv_wait_s, then is tried (and refused) clearly
        other = _pending(900, "bigger")
        assert await router.choose_replicas(reps, other) == []
        clock.advance(10.0)
        await _publish(redis_server.url, _state("w-a", free=700, decoding=8, interval_s=0.01, at=clock.now),
                       _state("w-b", free=300, decoding=1, interval_s=0.01, at=clock.now))
        assert _ids(await router.choose_replicas(reps, other)) == ["w-a", "w-b"]
        assert router.kv_waits == 2

    asyncio.run(run())


def test_decode_router_refuses_a_bad_wait_setting():
    with pytest.raises(ValueError, match="max_kv_wait_s"):
        _router("redis://127.0.0.1:1", ManualClock(NOW), max_kv_wait_s=-1)
