"""P/D disaggregation for real: Ray Serve with 1 prefill + 1 decode SmolLM2 replica, Redis, HTTP on
loopback. Greedy output over HTTP equals a colocated engine's; the handover is measured."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PORT = 38731
GRPC_PORT = 38732
BASE = f"http://127.0.0.1:{PORT}"
MODEL = "SmolLM2-135M-Instruct"
NAMESPACE = "pd-serving-test"
EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "pd.yaml"


def _post(body: dict, stream: bool = False) -> tuple[int, object, float | None]:
    """(status, JSON body or the SSE events, seconds to the first streamed event)."""
    req = urllib.request.Request(BASE + "/v1/completions", data=json.dumps({**body, "stream": stream}).encode(),
                                 headers={"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        if not stream:
            return resp.status, json.loads(resp.read()), None
        events, first = [], None
        for line in resp:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events.append(json.loads(line[6:]))
                first = first if first is not None else time.perf_counter() - started
        return resp.status, events, first


@pytest.fixture(scope="module")
def cluster(redis_server, default_model_dir):
    """Ray on loopback with the example P/D app deployed (its args, this test's model dir and ports)."""
    from cluster.launcher import ensure_profile, load_app_args, run_app, start_local_ray  # noqa: I001 (before ray)

    import ray
    from ray import serve

    args = load_app_args(EXAMPLE)
    engine = {**args["engine"], "model": str(default_model_dir)}
    args = ensure_profile({**args, "namespace": NAMESPACE, "engine": engine})
    start_local_ray()  # every core, as `flowprefill serve` starts it: the example must fit this machine
    try:
        run_app(args, "127.0.0.1", PORT, redis_server.url, grpc_port=GRPC_PORT)
        yield args
    finally:
        serve.shutdown()
        ray.shutdown()


def _colocated_text(model_dir: Path, cpu_threads: int, prompt: list[int], max_tokens: int) -> str:
    """The same request on a colocated engine in this process, with the replicas' thread count."""
    from replicas.engine import ReplicaEngine
    from replicas.engine_config import EngineConfig
    from replicas.sampling_params import SamplingParams
    from replicas.scheduler.request import Request

    engine = ReplicaEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=64 << 20, cpu_threads=cpu_threads))
    engine.start()
    try:
        async def run() -> str:
            request = Request("ref", list(prompt), arrival_s=engine.clock(), ttft_slo_s=60.0)
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            return "".join([out.text async for out in engine.generate(request, params)])

        return asyncio.run(run())
    finally:
        engine.shutdown()


def test_pd_greedy_output_over_http_equals_colocated_output_and_the_handover_is_measured(cluster, default_model_dir):
    from ray import serve

    prompts = {"short": list(range(2000, 2040)), "long": [1000 + (i * 37) % 20000 for i in range(500)]}
    for name, prompt in prompts.items():
        want = _colocated_text(default_model_dir, cluster["engine"]["cpu_threads"], prompt, 16)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        status, out, _ = _post(body)
        assert status == 200, out
        assert out["choices"][0]["text"] == want, name
        assert out["usage"]["completion_tokens"] == 16
        status, events, first_s = _post(body, stream=True)
        assert status == 200
        assert "".join(c["text"] for e in events for c in e.get("choices", ())) == want
        assert first_s is not None
        sent = serve.get_deployment_handle("FlowPrefillReplica", app_name="flowprefill").stats.remote().result()
        got = serve.get_deployment_handle("FlowPrefillDecode", app_name="flowprefill").stats.remote().result()
        print(f"\n{name} ({len(prompt)} tokens): {sent['handover']['bytes_sent'] // sent['handover']['sent']} bytes "
              f"per handover on average so far; last: gather {sent['handover']['gather_ms']['last']:.1f} ms, "
              f"put {sent['handover']['put_ms']['last']:.1f} ms, get {got['handover']['get_ms']['last']:.1f} ms, "
              f"ready to fetched {got['handover']['transfer_ms']['last']:.1f} ms; TTFT streamed {first_s:.3f} s")
    decode = serve.get_deployment_handle("FlowPrefillDecode", app_name="flowprefill").stats.remote().result()
    prefill = serve.get_deployment_handle("FlowPrefillReplica", app_name="flowprefill").stats.remote().result()
    assert prefill["role"] == "prefill" and decode["role"] == "decode"
    assert prefill["handover"]["sent"] == decode["handover"]["received"] == 4
    assert prefill["handover"]["bytes_sent"] == decode["handover"]["bytes_received"] > 0
    assert prefill["counters"]["decode_steps"] == 0 and decode["counters"]["handovers_in"] == 4
    assert decode["kv_free_tokens"] == decode["kv_total_tokens"]  # nothing held once the streams ended
    print("\nprefill handover:", json.dumps(prefill["handover"]), "\ndecode handover:", json.dumps(decode["handover"]))
    with urllib.request.urlopen(BASE + "/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    assert "flowprefill_handover_ms_count 4.0" in metrics
