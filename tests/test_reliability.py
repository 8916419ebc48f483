"""Faults on the real serving path: a replica actor killed under load, Redis stopped and restarted.

Real Ray Serve, a real password-protected redis-server on its own port, real HTTP on loopback.
The replicas run the model-free ``echo`` engine with a configured speed (so requests are waiting,
prefilling and streaming when a fault hits) and no model weights are loaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicas.sampling_params import MAX_N
from tests.polling import wait_for
from tests.sse_client import stream_completion

pytestmark = pytest.mark.slow

PORT = 8766
GRPC_PORT = 9766
BASE = f"http://127.0.0.1:{PORT}"
MODEL = "echo-model"
NAMESPACE = "reliability-test"
APP = "flowprefill"
PASSWORD = "s3cret-Pa55-for-tests"


def _post(body: dict, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(BASE + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _stream(body: dict, timeout: float = 60) -> tuple[int, list[dict]]:
    return stream_completion(BASE, body, timeout)


def _router_stats() -> dict:
    with urllib.request.urlopen(BASE + "/v1/router/stats", timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def echo_cluster(tiny_checkpoint_factory):
    """Two echo replicas (100 ms per output token; 20 s per 1k prompt tokens before the first),
    SLO-aware routing over a password-protected Redis on a fixed port."""
    from cluster.launcher import run_app, start_local_ray  # noqa: I001 (before ray: sets its env)
    from state.redis_server import RedisServer

    import ray
    from ray import serve

    redis = RedisServer(password=PASSWORD)
    redis.start()
    args = {"model_name": MODEL, "num_replicas": 2, "replica_cpus": 0.25, "router_policy": "slo_aware",
            "namespace": NAMESPACE, "engine_kind": "echo",
            "engine": {"model": str(tiny_checkpoint_factory()), "decode_step_s": 0.1,
                       "prefill_s_per_1k_tokens": 20.0}}
    start_local_ray(num_cpus=4)
    try:
        run_app(args, "127.0.0.1", PORT, redis.url, grpc_port=GRPC_PORT)
        yield {"redis": redis, "model_dir": tiny_checkpoint_factory()}
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.stop()


async def _registered(redis_url: str) -> dict:
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        return await state.read_all_replica_states(skip_invalid=True)


async def _journal(redis_url: str, replica_id: str | None = None) -> list:
    """The ingress's journal of accepted, unanswered requests (all, or those on ``replica_id``)."""
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        if replica_id is not None:
            return await state.journal_for_replica(replica_id)
        return list(await state._redis.hkeys(state.keys.journal()))




def test_killed_replica_loses_no_request(echo_cluster):
    import ray

    redis_url = echo_cluster["redis"].url
    states = wait_for(lambda: (s := asyncio.run(_registered(redis_url))) and len(s) == 2 and s, "two replicas")
    from replicas.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(echo_cluster["model_dir"])
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa "
    while len(tokenizer.encode(f"early0 {words}")) < 50:
        words += words
    prefill_s = len(tokenizer.encode(f"early0 {words}")) * 0.02  # the echo's time before the first output
    results: dict[str, tuple[int, list[dict]]] = {}

    def client(name: str) -> None:
        results[name] = _stream({"model": MODEL, "prompt": f"{name} {words}", "max_tokens": 30})

    # Streams start on both replicas (30 outputs, 3 s each), then while they stream more requests
    # arrive that wait ``prefill_s`` (>= 1 s) for their first output; the kill hits both kinds.
    threads = [threading.Thread(target=client, args=(f"early{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(prefill_s + 0.5)  # the early ones are streaming now (other processes: nothing to poll)
    late = [threading.Thread(target=client, args=(f"late{i}",)) for i in range(4)]
    for t in late:
        t.start()
    time.sleep(0.3)
    victim = sorted(states)[0]
    # The journal holds every accepted, unanswered request; the streaming ones under their replica.
    on_victim = wait_for(lambda: asyncio.run(_journal(redis_url, victim)), "journal entries on the victim")
    assert all(e.status == "running" and e.prompt_token_ids for e in on_victim)
    assert len(asyncio.run(_journal(redis_url))) == 8
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(victim))
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    for t in threads + late:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads + late), "a client hung"

    completed, failed_clearly = [], []
    for name, (status, events) in results.items():
        assert status == 200, (name, events)
        if any("error" in e for e in events):
            message = next(e["error"]["message"] for e in events if "error" in e)
            assert "replica failed while streaming" in message
            assert any(e.get("choices") for e in events), "only a stream under way may end in an error"
            failed_clearly.append(name)
        else:
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            completed.append(name)
    # Nothing lost: every request either completed or ended with a clear error; every request that
    # had not produced output yet (the late ones) was sent again and completed.
    assert len(completed) + len(failed_clearly) == 8
    assert all(name.startswith("early") for name in failed_clearly) and len(completed) >= 4
    # Every accepted request reached a terminal answer: the journal drains to empty.
    wait_for(lambda: asyncio.run(_journal(redis_url)) == [], "an empty journal")

    # Serve replaces the replica; it registers in Redis, the dead one's state expires.
    fresh = wait_for(lambda: (s := asyncio.run(_registered(redis_url))) and len(s) == 2 and victim not in s and s,
                      "a replacement replica in Redis", timeout_s=90)
    assert victim not in fresh
    for i in range(6):
        status, body = _post({"model": MODEL, "prompt": f"after the fault {i}", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_redis_outage_falls_back_to_local_estimates_and_recovers(echo_cluster):
    redis = echo_cluster["redis"]
    wait_for(lambda: len(asyncio.run(_registered(redis.url))) == 2, "two replicas")
    before = _router_stats()["redis_fallbacks"]
    journal_failures = _router_stats()["journal"]["write_failures"]
    redis.stop()
    try:
        for i in range(8):  # no request fails because Redis is away
            status, body = _post({"model": MODEL, "prompt": f"during the outage {i}", "max_tokens": 2})
            assert status == 200 and body["usage"]["completion_tokens"] == 2
        during = _router_stats()["redis_fallbacks"]
        assert during > before  # routed on local estimates, and counted
        with urllib.request.urlopen(BASE + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
        fallbacks = next(float(line.split()[-1]) for line in text.splitlines()
                         if line.startswith("flowprefill_redis_fallbacks_total"))
        assert fallbacks >= during - before
    finally:
        redis.start()  # same port and password, empty: replicas must register again
    # State is rebuilt: both replicas re-register and publish; routing reads Redis again.
    wait_for(lambda: len(asyncio.run(_registered(redis.url))) == 2, "replicas registered again", timeout_s=30)
    time.sleep(1.5)  # the router probes Redis at most once a second (its own timer), in the background
    status, _ = _post({"model": MODEL, "prompt": "the probe", "max_tokens": 2})  # triggers the probe
    assert status == 200
    settled = _router_stats()["redis_fallbacks"]
    for i in range(5):
        status, _ = _post({"model": MODEL, "prompt": f"after the outage {i}", "max_tokens": 2})
        assert status == 200
    assert _router_stats()["redis_fallbacks"] == settled
    # Journal writes failed during the outage without failing a request; nothing is left behind.
    stats = _router_stats()["journal"]
    assert stats["write_failures"] > journal_failures and stats["open_requests"] == 0
    wait_for(lambda: _router_stats()["journal"]["pending_writes"] == 0, "journal writes retried")
    assert asyncio.run(_journal(redis.url)) == []


def test_no_secret_in_logs(echo_cluster):
    logs = Path("/tmp/ray/session_latest/logs")
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and PASSWORD in p.read_text(errors="ignore")]
    assert not leaked, f"the Redis password appears in {leaked}"


def test_api_keys_on_http_and_grpc(echo_cluster, tmp_path):
    """A second app with API keys: 401 without a key, 403 for a class the key may not use, 429 over
    its rate; /health open, /metrics protected; the same on gRPC."""
    import grpc
    from ray import serve

    from cluster.app import build
    from router.grpc_build import ensure_stubs

    keys = tmp_path / "keys.yaml"
    keys.write_text("- {name: batch-only, key: batch-key-0001, allowed_classes: [batch]}\n"
                    "- {name: limited, key: limited-key-0001, rate_limit_rps: 0.01, burst: 2}\n")
    args = {"model_name": MODEL, "num_replicas": 1, "replica_cpus": 0.25, "namespace": NAMESPACE + "-keys",
            "engine_kind": "echo", "engine": {"model": str(echo_cluster["model_dir"])},
            "redis_url": echo_cluster["redis"].url, "api_keys_file": str(keys), "protect_metrics": True}
    serve.run(build(args), name="secure", route_prefix="/secure", blocking=False)
    try:
        def call(key: str | None, cls: str = "batch", path: str = "/secure/v1/completions") -> tuple[int, dict]:
            headers = {"content-type": "application/json", "x-slo-class": cls}
            if key:
                headers["authorization"] = f"Bearer {key}"
            body = json.dumps({"model": MODEL, "prompt": "hi there", "max_tokens": 1}).encode()
            req = urllib.request.Request(BASE + path, data=body if path.endswith("completions") else None,
                                         headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    raw = resp.read()
                    return resp.status, json.loads(raw) if path.endswith("completions") else {}
            except urllib.error.HTTPError as err:
                return err.code, {**json.loads(err.read()), "retry-after": err.headers.get("retry-after")}

        assert call(None)[0] == 401 and call("batch-key-0002")[0] == 401
        assert call("batch-key-0001")[0] == 200
        code, err = call("batch-key-0001", cls="interactive")
        assert code == 403 and err["error"]["param"] == "x-slo-class"
        assert [call("limited-key-0001", cls="standard")[0] for _ in range(3)] == [200, 200, 429]
        assert call("limited-key-0001")[1]["retry-after"] is not None
        with urllib.request.urlopen(BASE + "/secure/health", timeout=30) as resp:
            assert resp.status == 200  # open
        assert call(None, path="/secure/metrics")[0] == 401
        assert call("batch-key-0001", path="/secure/metrics")[0] == 200

        ensure_stubs()
        from router.grpc_gen import flowprefill_pb2 as pb
        from router.grpc_gen import flowprefill_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
            stub = pb_grpc.FlowPrefillStub(channel)
            request = pb.GenerateRequest(model=MODEL, prompt="hi there", max_tokens=1, slo_class="batch")
            app = ("application", "secure")
            with pytest.raises(grpc.RpcError) as rpc:
                list(stub.Generate(request, metadata=[app], timeout=60))
            assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            chunks = list(stub.Generate(request, metadata=[app, ("authorization", "Bearer batch-key-0001")],
                                        timeout=60))
            assert chunks[-1].finish_reason == "length"
            urgent = pb.GenerateRequest(model=MODEL, prompt="hi there", max_tokens=1, slo_class="interactive")
            with pytest.raises(grpc.RpcError) as rpc:
                list(stub.Generate(urgent, metadata=[app, ("authorization", "Bearer batch-key-0001")], timeout=60))
            assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        serve.delete("secure")


# ---------------------------------------------------------------------- bad input, property-based
_FIELD_VALUES = {
    "max_tokens": st.one_of(st.integers(-10**12, 0), st.integers(10**7, 10**18), st.text(max_size=5),  # null is valid
                            st.floats(allow_nan=True), st.booleans(), st.lists(st.integers(), max_size=2)),
    "temperature": st.one_of(st.floats(-1e6, -1e-3), st.floats(3.0001, 1e300), st.just(float("nan")),
                             st.text(max_size=3), st.booleans()),
    "top_p": st.one_of(st.floats(-10, -1e-6), st.floats(1.0001, 1e6), st.text(max_size=3), st.just([])),
    "seed": st.one_of(st.integers(-(2**80), -(2**64)), st.integers(2**64, 2**80), st.text(max_size=3),
                      st.floats(0.5, 9.5).filter(lambda f: f != int(f))),
    "stop": st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=3), st.just({"a": 1})),
    "n": st.one_of(st.integers(max_value=0), st.integers(MAX_N + 1, 10**9)),  # 1..MAX_N are served (n > 1)
    "prompt": st.one_of(st.just(""), st.just([]), st.integers(), st.just({"text": "x"}),
                        st.lists(st.integers(-(2**40), -1), min_size=1, max_size=3),
                        st.lists(st.integers(10**9, 2**40), min_size=1, max_size=3)),
    "model": st.text(min_size=1, max_size=12).filter(lambda m: m != MODEL),
    "stream": st.one_of(st.integers(2, 5), st.text(min_size=1, max_size=3)),
}


@st.composite
def _bad_body(draw) -> tuple[str, dict]:
    """A request body with one field wrong (the name of the field it breaks) or an unknown field."""
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(_FIELD_VALUES)))
        body[name] = draw(_FIELD_VALUES[name])
        return name, body
    name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12)
                .filter(lambda k: k not in body and k not in _KNOWN_FIELDS))
    body[name] = draw(st.one_of(st.integers(), st.text(max_size=4), st.none()))
    return name, body


_KNOWN_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                 "stream_options", "user", "priority", "slo_class", "logprobs", "echo", "suffix", "best_of",
                 "presence_penalty", "frequency_penalty", "logit_bias", "stop_token_ids", "ignore_eos",
                 "min_tokens", "repetition_penalty"}


def _with_invalid_utf8(tail: bytes) -> bytes:
    """A completion body whose prompt string holds bytes that are not UTF-8."""
    return b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe' + tail + b'"}'


def _raw_post(data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(BASE + "/v1/completions", data=data,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@settings(max_examples=int(os.environ.get("FLOWPREFILL_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_bad_body())
def test_fuzzed_bad_fields_get_a_4xx_naming_the_field(echo_cluster, case):
    name, body = case
    try:
        data = json.dumps(body, allow_nan=False)
    except ValueError:  # NaN / Infinity are not JSON at all: the body itself is what is wrong
        data, name = json.dumps(body), "body"
    status, err = _raw_post(data.encode())
    assert 400 <= status < 500, (name, body, err)
    assert name in (err["error"].get("param") or "") or name in err["error"]["message"], (name, err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=64).filter(lambda b: not _is_json_object(b)),
                      st.binary(min_size=1, max_size=16).map(_with_invalid_utf8)))
def test_fuzzed_malformed_bodies_get_a_400(echo_cluster, data):
    status, err = _raw_post(data)
    assert status == 400 and err["error"]["message"], (data, err)


def _is_json_object(b: bytes) -> bool:
    try:
        return isinstance(json.loads(b), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def test_oversized_body_and_bad_headers_then_a_good_request(echo_cluster):
    status, err = _raw_post(json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)}).encode())
    assert status == 413 and err["error"]["param"] == "body"
    status, err = _raw_post(json.dumps({"model": MODEL, "prompt": "hi"}).encode(), {"x-slo-ttft-ms": "-5"})
    assert status == 400 and err["error"]["param"] == "x-slo-ttft-ms"
    status, err = _raw_post(json.dumps({"model": MODEL, "prompt": "hi"}).encode(), {"x-slo-class": "gold"})
    assert status == 400 and err["error"]["param"] == "x-slo-class"
    status, body = _post({"model": MODEL, "prompt": "still serving", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_tokens=st.integers(-(2**31), 0) | st.integers(10**7, 2**31 - 1),
       temperature=st.floats(-1e9, -1e-3) | st.floats(3.0001, 1e9),
       which=st.sampled_from(["max_tokens", "temperature", "model", "slo_class", "prompt"]))
def test_fuzzed_bad_grpc_requests_are_invalid_argument(echo_cluster, max_tokens, temperature, which):
    import grpc

    from router.grpc_build import ensure_stubs

    ensure_stubs()
    from router.grpc_gen import flowprefill_pb2 as pb
    from router.grpc_gen import flowprefill_pb2_grpc as pb_grpc

    fields = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    fields.update({"max_tokens": {"max_tokens": max_tokens}, "temperature": {"temperature": temperature},
                   "model": {"model": "no-such-model"}, "slo_class": {"slo_class": "platinum"},
                   "prompt": {"prompt": ""}}[which])
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = pb_grpc.FlowPrefillStub(channel)
        with pytest.raises(grpc.RpcError) as rpc:
            list(stub.Generate(pb.GenerateRequest(**fields), metadata=[("application", APP)], timeout=60))
        assert rpc.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert which.split("_")[0] in rpc.value.details()
        good = list(stub.Generate(pb.GenerateRequest(model=MODEL, prompt="hello", max_tokens=2),
                                  metadata=[("application", APP)], timeout=60))
        assert good[-1].finish_reason == "length"


def test_the_ingress_does_not_cap_concurrency_below_the_replicas_queues(echo_cluster):
    """Serve's default (5 ongoing requests per ingress replica) would queue the rest FIFO in the
    proxy, out of the replicas' schedulers' sight: all 12 concurrent requests must reach replicas."""
    redis_url = echo_cluster["redis"].url
    words = "lorem ipsum dolor sit amet consectetur " * 8  # >= 1 s of echo "prefill" each
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        _post({"model": MODEL, "prompt": f"{i} {words}", "max_tokens": 1}, timeout=120)[0])) for i in range(12)]
    for t in threads:
        t.start()
    seen = wait_for(lambda: (n := sum(len(s.requests) for s in asyncio.run(_registered(redis_url)).values())) >= 12
                     and n, "12 requests queued at the replicas at once", timeout_s=30)
    for t in threads:
        t.join(timeout=120)
    assert seen >= 12 and results == [200] * 12
