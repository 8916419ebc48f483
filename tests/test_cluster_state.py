"""Cluster state in a real ``redis-server``: registration, heartbeat TTL, atomic in-flight work,
journal, profiles, passwords, outages and malformed data."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from state.client import ClusterState, StateUnavailable
from state.clock import Clock
from state.redis_server import RedisServer, RedisServerError, redact_url, redis_url_from_env_or_start
from state.schema import (
    JournalEntry,
    Keys,
    QueuedRequest,
    ReplicaInfo,
    ReplicaQueueState,
    SchemaError,
)

pytestmark = pytest.mark.timeout(60)


def _ns() -> str:
    return "t" + uuid.uuid4().hex[:12]


def _info(rid: str) -> ReplicaInfo:
    return ReplicaInfo(replica_id=rid, model="m", engine_kind="cpu", policy="flowprefill", registered_at=1.0)


def _state(rid: str, *ids: str, seq: int = 1) -> ReplicaQueueState:
    reqs = tuple(
        QueuedRequest(request_id=i, status="waiting", deadline=100.0 + n, predicted_remaining_s=0.25, prompt_tokens=8)
        for n, i in enumerate(ids)
    )
    return ReplicaQueueState(
        replica_id=rid, engine_kind="cpu", model="m", updated_at=time.time(), seq=seq, requests=reqs,
        running_remaining_s=0.5, kv_free_tokens=1024,
    )  # fmt: skip


def _journal(rid: str, req: str, **kw: Any) -> JournalEntry:
    base: dict[str, Any] = dict(slo_class="interactive", deadline=1234.5, arrival=1234.0, params={"max_tokens": 16})
    base.update(kw)
    if "prompt" not in base and "prompt_token_ids" not in base:
        base["prompt_token_ids"] = (1, 2, 3)
    return JournalEntry(request_id=req, replica_id=rid, **base)


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())


def test_register_deregister(redis_server: RedisServer) -> None:
    async def body() -> None:
        async with ClusterState(redis_server.url, namespace=_ns()) as cs:
            await cs.register_replica("r1", _info("r1"))
            await cs.register_replica("r2", _info("r2"))
            assert await cs.registered_replicas() == {"r1", "r2"}
            assert await cs.replica_info("r1") == _info("r1")
            assert await cs.read_all_replica_states() == {}  # registered, but no heartbeat yet
            await cs.publish_replica_state("r1", _state("r1", "a"))
            states = await cs.read_all_replica_states()
            assert list(states) == ["r1"] and states["r1"] == _state("r1", "a").__class__.from_json(
                states["r1"].to_json()
            )
            assert states["r1"].request_ids == ("a",) and states["r1"].pending_work_s == 0.25
            await cs.add_inflight("r1", "x", 1.0)
            await cs.deregister_replica("r1")
            assert await cs.registered_replicas() == {"r2"}
            assert await cs.read_replica_state("r1") is None and await cs.replica_info("r1") is None
            assert await cs.read_inflight_totals() == {"r2": 0.0}
            with pytest.raises(ValueError, match="replica_id"):
                await cs.register_replica("r3", _info("r4"))

    run(body)


def test_state_ttl_makes_replica_unroutable(redis_server: RedisServer) -> None:
    async def body() -> None:
        ns = _ns()
        raw = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
        async with ClusterState(redis_server.url, namespace=ns, state_ttl_s=2.0) as cs:
            for rid in ("live", "dying"):
                await cs.register_replica(rid, _info(rid))
                await cs.publish_replica_state(rid, _state(rid))
            key = Keys(ns).replica_state("dying")
            assert 0 < await raw.pttl(key) <= 2000  # the heartbeat TTL is set on every publish
            assert set(await cs.read_all_replica_states()) == {"live", "dying"}
            await raw.pexpire(key, 30)
            deadline = time.monotonic() + 5.0
            while await raw.exists(key):
                assert time.monotonic() < deadline, "state key did not expire"
                await asyncio.sleep(0.01)
            assert set(await cs.read_all_replica_states()) == {"live"}
            assert await cs.registered_replicas() == {"live", "dying"}  # stale member is skipped, not removed
        await raw.aclose()

    run(body)


def test_inflight_adds_are_atomic_across_clients(redis_server: RedisServer) -> None:
    values = [0.5 + 0.125 * (i % 17) for i in range(200)]  # exactly representable: sums are exact

    async def body() -> None:
        ns = _ns()
        clients = [ClusterState(redis_server.url, namespace=ns) for _ in range(4)]
        await clients[0].register_replica("r1", _info("r1"))
        totals = await asyncio.gather(
            *(clients[i % 4].add_inflight("r1", f"req-{i}", v) for i, v in enumerate(values))
        )
        assert max(totals) == sum(values)
        assert len(set(totals)) == len(values)  # each add saw a distinct, consistent total
        assert (await clients[1].read_inflight_totals())["r1"] == sum(values)
        raw = redis.asyncio.Redis.from_url(redis_server.url)
        assert await raw.hlen(Keys(ns).replica_inflight("r1")) == 200
        assert await raw.pttl(Keys(ns).replica_inflight("r1")) > 0
        await raw.aclose()
        for c in clients:
            await c.close()

    run(body)


def test_publish_clears_reported_inflight(redis_server: RedisServer) -> None:
    async def body() -> None:
        async with ClusterState(redis_server.url, namespace=_ns()) as cs:
            await cs.register_replica("r1", _info("r1"))
            for rid, s in (("a", 1.0), ("b", 2.0), ("c", 4.0), ("d", 8.0)):
                await cs.add_inflight("r1", rid, s)
            assert await cs.read_inflight_totals() == {"r1": 15.0}
            await cs.publish_replica_state("r1", _state("r1", "a", "b"))
            assert await cs.read_inflight_totals() == {"r1": 12.0}
            await cs.publish_replica_state("r1", _state("r1", seq=2), reported_ids=["c"])  # c finished already
            assert await cs.read_inflight_totals() == {"r1": 8.0}
            await cs.clear_inflight("r1", "d")
            assert await cs.read_inflight_totals() == {"r1": 0.0}
            with pytest.raises(ValueError):
                await cs.add_inflight("r1", "e", float("nan"))

    run(body)


def test_journal_round_trip_and_redispatch(redis_server: RedisServer) -> None:
    async def body() -> None:
        ns = _ns()
        t = [100.0]
        async with ClusterState(redis_server.url, namespace=ns, clock=Clock(lambda: t[0], "test")) as cs:
            e1, e2 = _journal("r1", "q1"), _journal("r1", "q2", prompt="hello", params={"temperature": 0.5})
            e3 = _journal("r2", "q3")
            for e in (e1, e2, e3):
                await cs.journal_accept(e)
            assert await cs.journal_for_replica("r1") == [e1, e2]
            assert await cs.journal_get("q3") == e3
            running = await cs.journal_update_status("q1", "running")
            assert running is not None and running.status == "running" and running.updated_at == 100.0
            moved = await cs.journal_update_status("q2", "accepted", replica_id="r2")
            assert moved is not None and moved.replica_id == "r2" and moved.attempts == 2
            assert [e.request_id for e in await cs.journal_for_replica("r1")] == ["q1"]
            assert [e.request_id for e in await cs.journal_for_replica("r2")] == ["q2", "q3"]
            await cs.journal_remove("q1")
            assert await cs.journal_get("q1") is None and await cs.journal_for_replica("r1") == []
            assert await cs.journal_update_status("missing", "failed") is None
            raw = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
            await raw.sadd(Keys(ns).journal_replica("r2"), "ghost")  # dangling id: skipped and cleaned up
            assert [e.request_id for e in await cs.journal_for_replica("r2")] == ["q2", "q3"]
            assert not await raw.sismember(Keys(ns).journal_replica("r2"), "ghost")
            await raw.aclose()
            with pytest.raises(ValueError, match="status"):
                await cs.journal_update_status("q2", "bogus")

    run(body)


def test_profiles_round_trip(redis_server: RedisServer) -> None:
    from replicas.scheduler.cost_model import analytic_cost_model

    async def body() -> None:
        ns = _ns()
        model = analytic_cost_model(0.01, 1e-4, 1e-9, model="Org/Model-1B", hardware="cpu")
        async with ClusterState(redis_server.url, namespace=ns) as cs:
            assert await cs.load_profile("Org/Model-1B", "cpu") is None
            await cs.save_profile("Org/Model-1B", "cpu", model.to_dict())
            loaded = await cs.load_profile("Org/Model-1B", "cpu")
            assert loaded == model.to_dict()  # plain data: the state package knows no cost model
            raw = redis.asyncio.Redis.from_url(redis_server.url)
            await raw.set(Keys(ns).profile("Org/Model-1B", "gpu"), json.dumps([1, 2]))
            with pytest.raises(SchemaError, match="profile:Org/Model-1B:gpu.*expected a JSON object"):
                await cs.load_profile("Org/Model-1B", "gpu")
            await raw.set(Keys(ns).profile("Org/Model-1B", "tpu"), "{not json")
            with pytest.raises(SchemaError, match="not valid JSON"):
                await cs.load_profile("Org/Model-1B", "tpu")
            await raw.aclose()

    run(body)


def test_malformed_state_names_the_key(redis_server: RedisServer) -> None:
    async def body() -> None:
        ns = _ns()
        keys = Keys(ns)
        raw = redis.asyncio.Redis.from_url(redis_server.url)
        async with ClusterState(redis_server.url, namespace=ns) as cs:
            await cs.register_replica("bad", _info("bad"))
            await cs.register_replica("good", _info("good"))
            await cs.publish_replica_state("good", _state("good"))
            await raw.set(keys.replica_state("bad"), "{not json")
            with pytest.raises(SchemaError, match=f"{keys.replica_state('bad')}.*not valid JSON"):
                await cs.read_all_replica_states()
            assert set(await cs.read_all_replica_states(skip_invalid=True)) == {"good"}
            doc = json.loads(_state("bad", "a").to_json())
            doc["requests"][0]["deadline"] = "soon"
            await raw.set(keys.replica_state("bad"), json.dumps(doc))
            with pytest.raises(SchemaError, match=r"requests\[0\]\.deadline") as err:
                await cs.read_replica_state("bad")
            assert err.value.key == keys.replica_state("bad")
            await raw.set(keys.replica_state("bad"), json.dumps({**doc, "v": 99}))
            with pytest.raises(SchemaError, match="schema version"):
                await cs.read_replica_state("bad")
        await raw.aclose()

    run(body)


def test_password_protected_server() -> None:
    secret = "s3cret pw/with@odd:chars"
    with RedisServer(password=secret) as server:
        assert "s3cret" not in repr(server) and "s3cret" not in server.redacted_url

        async def body() -> None:
            async with ClusterState(server.url, namespace=_ns()) as cs:
                await cs.register_replica("r1", _info("r1"))
                assert await cs.registered_replicas() == {"r1"}
            for url in (f"redis://127.0.0.1:{server.port}/0", server.url.replace("s3cret", "wrong")):
                async with ClusterState(url, namespace=_ns()) as bad:
                    with pytest.raises(StateUnavailable, match="authentication failed") as err:
                        await bad.registered_replicas()
                    assert "s3cret" not in str(err.value) and "wrong" not in str(err.value)

        run(body)


def test_outage_raises_state_unavailable_then_recovers() -> None:
    secret = "outage-pw"
    with RedisServer(password=secret) as server:

        async def body() -> None:
            async with ClusterState(server.url, namespace=_ns(), socket_timeout_s=0.5) as cs:
                await cs.register_replica("r1", _info("r1"))
                server.stop()
                calls: list[Callable[[], Awaitable[Any]]] = [
                    cs.ping, cs.read_all_replica_states, cs.read_inflight_totals,
                    lambda: cs.add_inflight("r1", "q", 1.0), lambda: cs.publish_replica_state("r1", _state("r1")),
                    lambda: cs.journal_accept(_journal("r1", "q")), lambda: cs.journal_for_replica("r1"),
                ]  # fmt: skip
                for call in calls:
                    start = time.monotonic()
                    with pytest.raises(StateUnavailable) as err:
                        await call()
                    assert time.monotonic() - start < 3.0
                    assert secret not in str(err.value) and ":***@127.0.0.1" in str(err.value)
                server.restart()  # memory-only: the restarted server is empty
                await cs.register_replica("r1", _info("r1"))
                await cs.publish_replica_state("r1", _state("r1", "a"))
                assert set(await cs.read_all_replica_states()) == {"r1"}

        run(body)
    assert not server.running


def test_restart_with_persistence_keeps_data(tmp_path: Any) -> None:
    with RedisServer(persist_dir=tmp_path / "data") as server:
        port = server.port
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.restart()
        assert server.port == port and client.get("k") == b"v"
        client.close()


def test_start_failure_reports_log_tail(redis_server: RedisServer) -> None:
    with pytest.raises(RedisServerError, match="(?i)address already in use"):
        RedisServer(port=redis_server.port, start_timeout_s=5.0)


def test_redact_url_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert redact_url("redis://:pw@127.0.0.1:1/0") == "redis://:***@127.0.0.1:1/0"
    assert redact_url("redis://user:pw@h:1/0?password=pw&db=2") == "redis://user:***@h:1/0?password=***&db=2"
    assert redact_url("redis://127.0.0.1:1/0") == "redis://127.0.0.1:1/0"
    monkeypatch.setenv("REDIS_URL", "redis://:x@127.0.0.1:9/0")
    assert redis_url_from_env_or_start() == ("redis://:x@127.0.0.1:9/0", None)
    monkeypatch.delenv("REDIS_URL")
    url, server = redis_url_from_env_or_start()
    assert server is not None
    try:
        assert url == server.url and redis.Redis.from_url(url).ping()
    finally:
        server.close()
    assert not server.running


def test_schema_validation() -> None:
    state = _state("r1", "a", "b")
    assert ReplicaQueueState.from_json(state.to_json()) == state
    with pytest.raises(ValueError, match="':'"):
        Keys("ns").replica_state("a:b")
    with pytest.raises(ValueError, match="prompt"):
        JournalEntry(request_id="q", replica_id="r", slo_class="c", deadline=1.0, arrival=0.0)
    doc = json.loads(_journal("r", "q").to_json())
    del doc["prompt_token_ids"]
    with pytest.raises(SchemaError, match="'prompt_token_ids'"):
        JournalEntry.from_json(json.dumps(doc), key="k")
    with pytest.raises(SchemaError, match="'seq'"):
        ReplicaQueueState.from_json(json.dumps({**json.loads(state.to_json()), "seq": True}), key="k")
    scaled = dataclasses.replace(state, cost_scale=1.8)
    assert ReplicaQueueState.from_json(scaled.to_json()).cost_scale == 1.8
    old = json.loads(state.to_json())
    del old["cost_scale"]  # a state from a replica that predates the field: as profiled
    assert ReplicaQueueState.from_json(json.dumps(old)).cost_scale == 1.0
    with pytest.raises(SchemaError, match="'cost_scale'"):
        ReplicaQueueState.from_json(json.dumps({**old, "cost_scale": -1}), key="k")
