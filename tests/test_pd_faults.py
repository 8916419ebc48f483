"""P/D under replica faults for real: Ray Serve with 2 prefill + 2 decode replicas of a tiny checkpoint,
Redis, HTTP on loopback. A handover is held at the fault's instant by fault injection
(tests/pd_fault_replica.py); the kills are real (SIGKILL of the decode replica's worker process,
``ray.kill`` of the prefill replica's actor).

* A decode replica killed after the prefill replica streamed the first token, before the client had a
  decoded token: the same handover (the router holds its reference) goes to the other decode
  replica; the output equals the fault-free run's.
* A prefill replica killed before the decode replica fetched the handover (its object died with its
  owner): the request is prefilled again on the other prefill replica and continues from the token
  the client already has.

Afterwards the router's journal is empty and no KV block is held on any replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.pd_fault_replica import FAULT_DIR_ENV
from tests.polling import wait_for
from tests.sse_client import stream_completion

pytestmark = pytest.mark.slow

PORT = 38741
BASE = f"http://127.0.0.1:{PORT}"
MODEL = "tiny-pd"
NAMESPACE = "pd-faults-test"
PROMPT = [(i * 37) % 400 + 3 for i in range(120)]
BODY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}


def _stream(body: dict, timeout: float = 180) -> tuple[int, list[dict]]:
    return stream_completion(BASE, body, timeout)


def _text(events: list[dict]) -> str:
    return "".join(c["text"] for e in events for c in e.get("choices", ()))


def _router_stats() -> dict:
    with urllib.request.urlopen(BASE + "/v1/router/stats", timeout=30) as resp:
        return json.loads(resp.read())


def _reprefills() -> float:
    """Requests the router prefilled again because their handover was lost (its /metrics)."""
    with urllib.request.urlopen(BASE + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('flowprefill_replica_retries_total{error="HandoverLost"}'))


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pd-fault")


@pytest.fixture(scope="module")
def pd_cluster(redis_server, tiny_checkpoint_factory, fault_dir):
    """2 prefill + 2 decode replicas (fault-injecting ``decode``), on Ray started with the fault dir set."""
    from cluster.launcher import ensure_profile, start_local_ray  # noqa: I001 (before ray)

    import ray
    from ray import serve

    from cluster.app import AppConfig, build_app
    from tests.pd_fault_replica import HoldingReplicaServer

    os.environ[FAULT_DIR_ENV] = str(fault_dir)  # before Ray starts: its workers inherit it
    engine = {"role": "prefill", "model": str(tiny_checkpoint_factory()), "cpu_threads": 1,
              "kv_cache_bytes": 4 << 20, "profile_max_tokens": 512}
    args = ensure_profile({"model_name": MODEL, "num_replicas": 2, "replica_cpus": 0.25, "namespace": NAMESPACE,
                           "engine": engine, "decode": {"num_replicas": 2, "replica_cpus": 0.25},
                           "redis_url": redis_server.url})
    start_local_ray(num_cpus=4)
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app(AppConfig.from_args(args), HoldingReplicaServer), name="flowprefill",
                  route_prefix="/", blocking=False)
        wait_for(lambda: len(asyncio.run(_states(redis_server.url))) == 4, "4 replicas in Redis", timeout_s=120)
        yield {"redis": redis_server}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(FAULT_DIR_ENV, None)


async def _states(redis_url: str) -> dict:
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        return await state.read_all_replica_states(skip_invalid=True)


async def _journal_entry(redis_url: str):  # noqa: ANN202 (a JournalEntry or None)
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        ids = list(await state._redis.hkeys(state.keys.journal()))
        return await state.journal_get(ids[0]) if len(ids) == 1 else None


async def _journal(redis_url: str) -> list:
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        return list(await state._redis.hkeys(state.keys.journal()))


def _arm(fault_dir: Path, mode: str) -> None:
    for name in ("claimed", "release"):
        (fault_dir / name).unlink(missing_ok=True)
    (fault_dir / "mode").write_text(mode)


def _claimed(fault_dir: Path) -> dict:
    path = fault_dir / "claimed"
    raw = path.read_text() if path.exists() else ""
    return json.loads(raw) if raw.endswith("}") else {}


def _disarm(fault_dir: Path) -> None:
    (fault_dir / "mode").unlink(missing_ok=True)
    (fault_dir / "release").touch()


def _replica_actor(replica_id: str):  # noqa: ANN202 (a Ray ActorHandle)
    import ray

    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(replica_id))
    return ray.get_actor(actor["name"], namespace=actor["namespace"])


def _nothing_held(redis_url: str, roles: dict[str, int]) -> dict:
    """The live replicas' published states once every one reports all its KV free (or falsy)."""
    states = asyncio.run(_states(redis_url))
    by_role = {role: [s for s in states.values() if s.role == role] for role in roles}
    if any(len(by_role[role]) != n for role, n in roles.items()):
        return {}
    if any(s.kv_free_tokens != s.kv_total_tokens or s.decoding or s.requests for s in states.values()):
        return {}
    return states


def _start_client(results: dict, body: dict) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.update(out=_stream(body)))
    thread.start()
    return thread


def test_reference_output_without_faults(pd_cluster, fault_dir):
    """The fault-free P/D output the fault tests compare with (and a warm cluster)."""
    _disarm(fault_dir)
    status, events = _stream(BODY)
    assert status == 200 and events[-1]["choices"][0]["finish_reason"] == "length", events
    (fault_dir / "reference.txt").write_text(_text(events))


def test_decode_replica_sigkilled_mid_handover_request_completes_on_the_other(pd_cluster, fault_dir):
    redis_url = pd_cluster["redis"].url
    want = (fault_dir / "reference.txt").read_text()
    _arm(fault_dir, "decode")
    results: dict = {}
    client = _start_client(results, BODY)
    held = wait_for(lambda: _claimed(fault_dir), "a decode replica holding the handover")
    victim = held["replica_id"]
    assert asyncio.run(_journal(redis_url)), "the request is in the journal while it runs"
    reprefills = _reprefills()
    os.kill(held["pid"], signal.SIGKILL)  # after the first token, before any decoded one reached the client
    client.join(timeout=180)
    assert not client.is_alive(), "the client hung"
    _disarm(fault_dir)
    status, events = results["out"]
    assert status == 200 and not any("error" in e for e in events), events
    assert _text(events) == want  # every token once: the first from prefill, the rest from the other decoder
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert _reprefills() == reprefills  # the same handover went to the other decoder: no second prefill
    wait_for(lambda: asyncio.run(_journal(redis_url)) == [], "an empty journal")
    assert _router_stats()["journal"]["open_requests"] == 0
    # Serve replaces the killed replica; every live replica (both roles) holds no KV block
    states = wait_for(lambda: (s := _nothing_held(redis_url, {"prefill": 2, "decode": 2})) and victim not in s and s,
                      "no KV held, the killed decode replica replaced", timeout_s=120)
    assert sum(s.kv_total_tokens for s in states.values()) > 0


def test_prefill_replica_killed_before_the_handover_is_fetched_request_is_prefilled_again(pd_cluster, fault_dir):
    import ray

    redis_url = pd_cluster["redis"].url
    want = (fault_dir / "reference.txt").read_text()
    _arm(fault_dir, "fetch")
    results: dict = {}
    client = _start_client(results, BODY)
    wait_for(lambda: _claimed(fault_dir), "a decode replica holding the handover before fetching it")
    prefill_ids = {rid for rid, s in asyncio.run(_states(redis_url)).items() if s.role == "prefill"}
    # the journal names the prefill replica that streamed the first token (the handover's owner)
    entry = wait_for(lambda: (e := asyncio.run(_journal_entry(redis_url))) and e.replica_id in prefill_ids and e,
                     "the request in the journal under its prefill replica")
    victim = entry.replica_id
    reprefills = _reprefills()
    ray.kill(_replica_actor(victim), no_restart=True)  # the handover's object dies with its owner
    time.sleep(1.0)  # let the kill land before the decode replica fetches (other processes: nothing to poll)
    (fault_dir / "release").touch()
    client.join(timeout=180)
    assert not client.is_alive(), "the client hung"
    _disarm(fault_dir)
    status, events = results["out"]
    assert status == 200 and not any("error" in e for e in events), events
    assert _text(events) == want  # the first token once (the client's), then the re-prefilled continuation
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert _reprefills() == reprefills + 1  # re-dispatched once, through the journal's retry path
    wait_for(lambda: asyncio.run(_journal(redis_url)) == [], "an empty journal")
    assert _router_stats()["journal"]["open_requests"] == 0
    wait_for(lambda: (s := _nothing_held(redis_url, {"prefill": 2, "decode": 2})) and victim not in s and s,
             "no KV held, the killed prefill replica replaced", timeout_s=120)


def test_every_decode_replica_killed_mid_handover_completes_on_a_replacement_or_fails_clearly(pd_cluster, fault_dir):
    """None left for a while: the router's resends either reach a replica Serve starts in their place
    or end with a 503 naming the decode side, never a hang; the journal drains, no KV is held."""
    import ray

    redis_url = pd_cluster["redis"].url
    want = (fault_dir / "reference.txt").read_text()
    _arm(fault_dir, "decode")
    results: dict = {}
    client = _start_client(results, BODY)
    held = wait_for(lambda: _claimed(fault_dir), "a decode replica holding the handover")
    states = asyncio.run(_states(redis_url))
    others = [rid for rid, s in states.items() if s.role == "decode" and rid != held["replica_id"]]
    for rid in others:
        ray.kill(_replica_actor(rid), no_restart=True)
    os.kill(held["pid"], signal.SIGKILL)
    client.join(timeout=240)
    assert not client.is_alive(), "the client hung"
    _disarm(fault_dir)
    status, events = results["out"]
    assert status == 200, events
    errors = [e["error"]["message"] for e in events if "error" in e]
    if errors:  # the client has the first token: a clear error on the stream, naming the decode side
        assert "decode replica" in errors[0] and _text(events) == want[:len(_text(events))], errors
    else:
        assert _text(events) == want and events[-1]["choices"][0]["finish_reason"] == "length"
    outcome = f"failed clearly: {errors[0]}" if errors else "completed on a replacement"
    print(f"\nevery decode replica killed: {outcome}")
    wait_for(lambda: asyncio.run(_journal(redis_url)) == [], "an empty journal")
    gone = {held["replica_id"], *others}
    wait_for(lambda: (s := _nothing_held(redis_url, {"prefill": 2, "decode": 2})) and not gone & set(s) and s,
             "no KV held, both decode replicas replaced", timeout_s=180)
