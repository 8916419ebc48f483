"""The vLLM replica engine (replicas/vllm_engine.py).

Fast tests (no vLLM): settings validation, the child-process plumbing and the engine's HTTP
mapping, accounting and abort against a stand-in server (tests/fake_vllm_server.py).  Slow tests
(``slow``; skipped only when ``.venv-vllm`` is missing): ONE real vLLM server, inside a FlowPrefill
Serve app with ``engine_kind: vllm`` deployed next to an app on the native engine.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.app import AppConfig
from replicas.engine_config import EngineConfigError
from replicas.engine_stats import EngineStats
from replicas.engine_types import TokenLogprob, ends_request
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from replicas.vllm_engine import VLLMConfig, VLLMEngine, deadline_priority
from replicas.vllm_process import VLLMStartError, cpu_list, parse_cpu_list, parse_vllm_metrics
from state.clock import Clock
from tests.polling import wait_for

FAKE_SERVER = Path(__file__).with_name("fake_vllm_server.py")


# ---------------------------------------------------------------------- settings (fast)
@pytest.mark.parametrize(("settings", "field"), [
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"max_num_batched_tokens": "512"}, "max_num_batched_tokens"),
    ({"long_prefill_token_threshold": -1}, "long_prefill_token_threshold"),
    ({"max_model_len": True}, "max_model_len"),
    ({"kv_cache_gib": 1.5}, "kv_cache_gib"),
    ({"dtype": "int8"}, "dtype"),
    ({"omp_threads_bind": "cores 0 to 3"}, "omp_threads_bind"),
    ({"startup_timeout_s": 0}, "startup_timeout_s"),
    ({"venv": ""}, "venv"),
    ({"extra_args": "--enforce-eager"}, "extra_args"),
    ({"extra_args": ["--x", 3]}, "extra_args[1]"),
    ({"model": 7}, "model"),
    ({"profile_max_tokens": 9000}, "profile_max_tokens"),
    ({"device": "cuda"}, "device"),
])
def test_bad_settings_are_refused_naming_the_field(settings, field):
    with pytest.raises(EngineConfigError) as err:
        VLLMConfig.from_dict(settings, prefix="args.engine")
    assert err.value.field == f"args.engine.{field}"
    with pytest.raises(EngineConfigError) as err:  # the app validates them the same way, at build time
        AppConfig.from_args({"engine_kind": "vllm", "engine": settings})
    assert err.value.field == f"args.engine.{field}"


def test_good_settings_become_vllm_flags_and_environment():
    config = VLLMConfig.from_dict({"dtype": "bfloat16", "max_num_batched_tokens": 2048,
                                   "long_prefill_token_threshold": None, "kv_cache_gib": 2,
                                   "omp_threads_bind": "0-1", "extra_args": ["--enforce-eager"]})
    args = config.server_args("/models/m", "m")
    assert args[args.index("--max-num-batched-tokens") + 1] == "2048"
    assert args[args.index("--dtype") + 1] == "bfloat16" and args[-1] == "--enforce-eager"
    for flag in ("--enable-chunked-prefill", "--no-enable-prefix-caching", "--scheduling-policy"):
        assert flag in args
    assert "--long-prefill-token-threshold" not in args
    assert config.server_env() == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    default = VLLMConfig.from_dict({})
    assert default.server_args("/m", "m")[-2:] == ["--long-prefill-token-threshold", "256"]
    assert parse_cpu_list(default.server_env()["VLLM_CPU_OMP_THREADS_BIND"]) == sorted(os.sched_getaffinity(0))
    assert AppConfig.from_args({"engine_kind": "vllm", "engine": {"kv_cache_gib": 2}}).engine_limits() == (None, 1024)


def test_cpu_lists_round_trip_and_deadline_priorities_order_by_deadline():
    assert cpu_list([5, 0, 1, 2]) == "0-2,5" and parse_cpu_list("0-2,5") == [0, 1, 2, 5]
    assert cpu_list([3]) == "3"
    now = 1_780_000_000.0
    assert deadline_priority(now + 0.5) < deadline_priority(now + 1.0) < deadline_priority(now + 60.0)
    assert deadline_priority(now + 1.0) - deadline_priority(now) == 1000  # milliseconds


def test_missing_vllm_environment_is_a_clear_error(tmp_path):
    config = VLLMConfig.from_dict({"venv": str(tmp_path / "nowhere")})
    with pytest.raises(EngineConfigError) as err:
        config.check_environment("args.engine")
    assert err.value.field == "args.engine.venv" and "scripts/vllm_env.sh" in str(err.value)
    from cluster.launcher import ensure_profile

    with pytest.raises(EngineConfigError, match="scripts/vllm_env.sh"):  # `flowprefill serve` fails before Ray
        ensure_profile({"engine_kind": "vllm", "engine": {"venv": str(tmp_path / "nowhere")}})


def test_serve_engine_flag_selects_the_kind_and_drops_settings_of_another_kind(monkeypatch):
    import cluster.launcher
    from cluster.cli import main

    seen = {}
    monkeypatch.setattr(cluster.launcher, "serve_main", lambda path, overrides, *a, **kw: seen.update(overrides) or 0)
    assert main(["serve", "--engine", "vllm"]) == 0
    assert seen["engine_kind"] == "vllm" and "device" not in seen["engine"]  # ray_config.yaml's are native ones
    AppConfig.from_args({**seen, "redis_url": None})  # valid for the vLLM engine


def test_prometheus_text_is_read():
    text = """# HELP vllm:num_requests_running Number of requests in model execution batches.
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:generation_tokens_total{engine="0",model_name="m"} 77.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="2000"} 1.0
"""
    got = parse_vllm_metrics(text)
    assert got["vllm:num_requests_running"] == 2 and got["vllm:num_requests_waiting"] == 3
    assert got["vllm:kv_cache_usage_perc"] == 0.5 and got["kv_total_tokens"] == 32000
    assert got["vllm:generation_tokens_total"] == 77


# ---------------------------------------------------------------------- against a stand-in server (fast)
@pytest.fixture
def fake_venv(tmp_path, monkeypatch):
    """A ``venv`` whose ``bin/python`` runs tests/fake_vllm_server.py; the request log path."""
    root = tmp_path / "fake-venv"
    (root / "bin").mkdir(parents=True)
    (root / ".installed-test").touch()
    python = root / "bin" / "python"
    python.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {FAKE_SERVER} "$@"\n')  # drop "-m MODULE"
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setenv("FLOWPREFILL_CACHE", str(tmp_path / "cache"))
    return {"venv": str(root), "log": log}


def _requests(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_engine_against_a_stand_in_server(fake_venv, tiny_checkpoint_factory):
    """Start, profile, generate (body and outputs), account queue state, abort on close, shut down."""
    states: list[dict] = []
    config = VLLMConfig.from_dict({"model": str(tiny_checkpoint_factory()), "venv": fake_venv["venv"],
                                   "profile_max_tokens": 256, "max_model_len": 512, "metrics_interval_s": 0.1})
    engine = VLLMEngine(config, on_state_change=lambda s: states.append(s.to_dict()))
    try:
        engine.start()
        assert engine.is_alive() and engine.kind == "vllm" and engine.policy_name == "vllm-priority"
        assert engine.max_model_len == 512 and engine.vocab_size == engine.model_config.vocab_size
        # Profiled through the server: max_tokens=1 requests of growing length, fitted and cached on disk.
        profiled = [r for r in _requests(fake_venv["log"]) if r.get("max_tokens") == 1]
        assert len({len(r["prompt"]) for r in profiled}) >= 10 and max(len(r["prompt"]) for r in profiled) == 256
        assert engine.cost_model.predict(256) > engine.cost_model.predict(16) > 0
        cached = list((Path(os.environ["FLOWPREFILL_CACHE"]) / "profiles").glob("*-vllm-b512-t*.json"))
        assert len(cached) == 1 and CostModel.load(cached[0]) == engine.cost_model

        now = time.time()
        urgent = Request("urgent", list(range(5, 105)), arrival_s=now, ttft_slo_s=0.5)
        relaxed = Request("relaxed", list(range(5, 405)), arrival_s=now, ttft_slo_s=60.0)
        params = SamplingParams(max_tokens=3, temperature=0.0, stop=("zz",), seed=7, top_k=5)

        async def both() -> tuple[list, list]:
            return tuple(await asyncio.gather(*[_collect(engine.generate(r, params)) for r in (relaxed, urgent)]))

        out_relaxed, out_urgent = asyncio.run(both())
        for outs, req in ((out_relaxed, relaxed), (out_urgent, urgent)):
            assert [o.token_ids for o in outs] == [(1000,), (1001,), (1002,)]
            assert "".join(o.text for o in outs) == " t0 t1 t2" and outs[-1].finish_reason == "length"
            assert outs[-1].completion_tokens == 3 and outs[0].prompt_tokens == req.num_prompt_tokens
            assert outs[0].ttft_s is not None and outs[0].ttft_s > 0 and outs[1].ttft_s is None
        bodies = {len(r["prompt"]): r for r in _requests(fake_venv["log"]) if r.get("stream")}
        body = bodies[100]
        assert body["prompt"] == urgent.prompt_ids and body["return_token_ids"] and body["stream"]
        assert (body["max_tokens"], body["temperature"], body["stop"], body["seed"], body["top_k"]) == (
            3, 0.0, ["zz"], 7, 5)
        assert body["priority"] == deadline_priority(urgent.deadline) < bodies[400]["priority"]
        # While both were in prefill the state listed them with their deadlines; then nothing.
        listed = {r["request_id"]: r["deadline"] for s in states for r in s["running"] + s["waiting"]}
        assert listed == {"urgent": urgent.deadline, "relaxed": relaxed.deadline}
        assert all(r["predicted_remaining_s"] >= 0 for s in states for r in s["running"] + s["waiting"])
        assert states[-1]["running"] == states[-1]["waiting"] == [] and states[-1]["pending_work_s"] == 0.0

        # A long prompt's first event (its ids repeated: ~300 KB on one line) is read whole.
        huge = Request("huge", [12345] * 50_000, arrival_s=time.time(), ttft_slo_s=5.0)
        outs = asyncio.run(_collect(engine.generate(huge, SamplingParams(max_tokens=2))))
        assert [o.token_ids for o in outs] == [(1000,), (1001,)] and outs[-1].finish_reason == "length"

        # n choices come back by their index; the request ends with the last choice's finish.
        outs = asyncio.run(_collect(engine.generate(Request("n2", [7] * 10, arrival_s=time.time(), ttft_slo_s=5.0),
                                                    SamplingParams(max_tokens=2, n=2))))
        assert [(o.index, o.token_ids, o.completion_tokens) for o in outs] == [
            (0, (1000,), 1), (1, (1100,), 1), (0, (1001,), 2), (1, (1101,), 2)]
        assert [o.choices_left for o in outs if o.finish_reason] == [1, 0] and ends_request(outs[-1])
        assert next(r for r in _requests(fake_venv["log"]) if r.get("prompt") == [7] * 10)["n"] == 2
        # prompt logprobs: vLLM answers them unstreamed, with ranks; they come on the first output
        outs = asyncio.run(_collect(engine.generate(Request("pl", [7, 8, 9], arrival_s=time.time(), ttft_slo_s=5.0),
                                                    SamplingParams(max_tokens=2, prompt_logprobs=1))))
        assert [(o.token_ids, o.text, o.finish_reason) for o in outs] == [((1000, 1001), " t0 t1", "length")]
        assert outs[0].ttft_s is not None and ends_request(outs[0])
        assert outs[0].prompt_logprobs == (TokenLogprob(7, None), TokenLogprob(8, -0.1, ((3, -0.01),), 2),
                                           TokenLogprob(9, -0.2, ((3, -0.01),), 2))
        sent = next(r for r in _requests(fake_venv["log"]) if r.get("prompt") == [7, 8, 9])
        assert sent["prompt_logprobs"] == 1 and sent["stream"] is False

        # Closing the stream early closes the HTTP stream: the server sees the client go away.
        async def first_then_close() -> None:
            gen = engine.generate(Request("long", [5] * 10, arrival_s=time.time(), ttft_slo_s=1.0),
                                  SamplingParams(max_tokens=500))
            await gen.__anext__()
            await gen.aclose()

        asyncio.run(first_then_close())
        wait_for(lambda: any("aborted" in r for r in _requests(fake_venv["log"])), "the server to see the abort")
        aborted = next(r["aborted"] for r in _requests(fake_venv["log"]) if "aborted" in r)
        assert aborted < 100
        assert engine.counters["aborted"] == 1 and engine.stats().decoding == 0
        # vLLM's own numbers come from /metrics.
        wait_for(lambda: engine.stats().kv_total_tokens == 16000, "a metrics poll")
        assert engine.stats().kv_free_tokens == 12000
        groups = [engine.server.pgid, engine.server.watchdog.pid]
    finally:
        engine.shutdown()
    assert not engine.is_alive()
    for pgid in groups:  # the server's process group and its watchdog are gone
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)


async def _collect(gen) -> list:
    return [out async for out in gen]




class _StubServer:
    url = "http://127.0.0.1:9"

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass


def test_queue_accounting_follows_vllms_order(tiny_checkpoint_factory):
    """Predicted prefill work is worked off one second per second: a started request keeps going
    (vLLM never preempts it for priority), the waiting ones follow by deadline; decoding leaves."""
    now = [1000.0]
    states: list[dict] = []
    engine = VLLMEngine(VLLMConfig.from_dict({"model": str(tiny_checkpoint_factory()), "max_model_len": 512,
                                              "profile_max_tokens": 256}),
                        clock=Clock(lambda: now[0], "test"), server=_StubServer(),
                        on_state_change=lambda s: states.append(s.to_dict()),
                        cost_model=CostModel.from_coefficients(0.0, 0.01))  # 10 ms per token
    long = Request("long", [5] * 300, arrival_s=1000.0, ttft_slo_s=60.0)  # 3 s, relaxed
    late = Request("late", [5] * 100, arrival_s=1000.0, ttft_slo_s=30.0)  # 1 s
    urgent = Request("urgent", [5] * 100, arrival_s=1000.0, ttft_slo_s=0.5)  # 1 s, earliest deadline
    engine._track(long)
    assert [r["request_id"] for r in states[-1]["running"]] == ["long"]  # an idle vLLM starts it at once
    now[0] = 1001.0  # 1 s of "long" done: it started, so it stays ahead of later, more urgent arrivals
    engine._track(late)
    engine._track(urgent)

    def rows(kind: str) -> list[tuple[str, float]]:
        return [(r["request_id"], round(r["predicted_remaining_s"], 6)) for r in states[-1][kind]]

    assert rows("running") == [("long", 2.0)] and rows("waiting") == [("urgent", 1.0), ("late", 1.0)]
    assert states[-1]["pending_work_s"] == pytest.approx(4.0)
    now[0] = 1003.5  # "long" finished its predicted prefill, "urgent" got 0.5 s
    assert engine._first_token("long") == 1003.5
    assert rows("running") == [("urgent", 0.5)] and rows("waiting") == [("late", 1.0)]
    assert states[-1]["decoding"] == 1 and states[-1]["running_remaining_s"] == pytest.approx(0.5)
    now[0] = 1010.0  # the predictions ran out before the first tokens came: 0 s left, still listed
    engine._untrack("long", True)
    assert rows("running") == [("urgent", 0.0), ("late", 0.0)] and states[-1]["decoding"] == 0
    engine._untrack("urgent", False)
    engine._untrack("late", True)
    assert states[-1]["running"] == [] and engine.counters == {"submitted": 3, "finished": 2, "aborted": 1,
                                                               "errors": 0}
    assert states[-1]["kv_free_tokens"] == states[-1]["kv_total_tokens"] > 0


def test_the_server_does_not_outlive_a_killed_replica(tmp_path):
    """A Ray actor killed with SIGKILL runs no cleanup: the watchdog stops the server's group."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from pathlib import Path\n"
        "from replicas.vllm_process import VLLMProcess\n"
        "p = VLLMProcess(Path('/bin/sleep'), [], {}, 'x')\n"
        "p.argv = ['/bin/sleep', '300']\n"
        "p.start()\n"
        "print(p.pgid, flush=True)\n"
        "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pgid = int(parent.stdout.readline())
    os.killpg(pgid, 0)  # the server runs
    parent.kill()
    parent.wait()
    wait_for(lambda: not _group_alive(pgid), "the watchdog to stop the server", timeout_s=15.0)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_server_that_dies_at_start_is_reported_with_its_log(fake_venv, tiny_checkpoint_factory, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "1")
    config = VLLMConfig.from_dict({"model": str(tiny_checkpoint_factory()), "venv": fake_venv["venv"],
                                   "max_model_len": 512, "profile_max_tokens": 256})
    with pytest.raises(VLLMStartError, match=r"exited with status 3(.|\n)*boom, cannot start"):
        VLLMEngine(config)


def test_a_server_that_is_not_ready_in_time_is_stopped(fake_venv, tiny_checkpoint_factory, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_STARTUP_S", "30")
    config = VLLMConfig.from_dict({"model": str(tiny_checkpoint_factory()), "venv": fake_venv["venv"],
                                   "max_model_len": 512, "profile_max_tokens": 256, "startup_timeout_s": 1.5})
    t0 = time.monotonic()
    with pytest.raises(VLLMStartError, match=r"not ready after 2 s(.|\n)*fake vLLM starting"):
        VLLMEngine(config)
    assert time.monotonic() - t0 < 20


# ---------------------------------------------------------------------- one real vLLM server (slow)
PORT = 8767
BASE = f"http://127.0.0.1:{PORT}"
NATIVE, VLLM = BASE + "/native", BASE + "/vllm"
NATIVE_MODEL, VLLM_MODEL = "smollm2-native", "smollm2-vllm"
NS_NATIVE, NS_VLLM = "vllm-test-native", "vllm-test-vllm"


def _vllm_missing() -> str | None:
    try:
        VLLMConfig().check_environment()
    except EngineConfigError as exc:
        return str(exc)
    return None


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def _vllm_metrics(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        return parse_vllm_metrics(resp.read().decode())


@pytest.fixture(scope="module")
def apps(redis_server, default_model_dir):
    """One Serve instance, two apps: ``/native`` on the native engine, ``/vllm`` on one vLLM server."""
    why = _vllm_missing()
    if why:
        pytest.skip(f"vLLM is not installed: {why}")
    from cluster.launcher import ensure_profile, start_local_ray  # noqa: I001 (before ray: sets its env)

    import ray
    from ray import serve

    from cluster.app import build

    common = {"num_replicas": 1, "replica_cpus": 1.0, "router_policy": "slo_aware", "redis_url": redis_server.url}
    native = ensure_profile({**common, "model_name": NATIVE_MODEL, "namespace": NS_NATIVE,
                             "engine": {"model": str(default_model_dir), "kv_cache_bytes": 256 << 20}})
    vllm = ensure_profile({**common, "model_name": VLLM_MODEL, "namespace": NS_VLLM, "engine_kind": "vllm",
                           "engine": {"model": str(default_model_dir), "kv_cache_gib": 2}})
    start_local_ray(num_cpus=6)
    group = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build(native), name="fp-native", route_prefix="/native", blocking=False)
        t0 = time.monotonic()
        serve.run(build(vllm), name="fp-vllm", route_prefix="/vllm", blocking=False)
        ready_s = time.monotonic() - t0
        handle = serve.get_deployment_handle("FlowPrefillReplica", app_name="fp-vllm")
        details = EngineStats.from_dict(handle.stats.remote().result()).details
        group = details["vllm_pid"]
        print(f"\nvLLM app ready after {ready_s:.0f} s (server start + profile); log {details['vllm_log']}")
        yield {"redis_url": redis_server.url, "handle": handle, "vllm_url": details["vllm_url"], "ready_s": ready_s}
    finally:
        serve.shutdown()
        ray.shutdown()
        if group is not None:  # the replica stopped its vLLM server (or the watchdog did)
            try:
                wait_for(lambda: not _group_alive(group), "the vLLM server to stop", timeout_s=60.0)
            finally:
                if _group_alive(group):
                    os.killpg(group, 9)


@pytest.mark.slow
def test_openai_client_gets_the_native_engines_greedy_answer(apps):
    openai = pytest.importorskip("openai")
    answers: dict[str, list[str]] = {}
    for base, model in ((NATIVE, NATIVE_MODEL), (VLLM, VLLM_MODEL)):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        done = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
            temperature=0)
        assert done.usage.completion_tokens == 8 and streamed == done.choices[0].text
        answers[model] = [done.choices[0].text, chat.choices[0].message.content]
        assert [m.id for m in client.models.list().data] == [model]
    print(f"\ngreedy answers: native {answers[NATIVE_MODEL]!r}, vLLM {answers[VLLM_MODEL]!r}")
    assert answers[VLLM_MODEL] == answers[NATIVE_MODEL]
    assert "Paris" in answers[VLLM_MODEL][1]


@pytest.mark.slow
def test_both_engine_kinds_take_the_same_tool_call_and_prompt_logprobs_requests(apps):
    """A named tool_choice: the grammar reaches vLLM as structured_outputs.grammar and both kinds give a
    call whose arguments validate; prompt logprobs (vLLM answers them unstreamed) agree with the native."""
    jsonschema = pytest.importorskip("jsonschema")
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    calls, scored = {}, {}
    for base, model in ((NATIVE, NATIVE_MODEL), (VLLM, VLLM_MODEL)):
        code, body, _ = _post(base + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 100,
            "temperature": 0})
        assert code == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        [call] = choice["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), params)
        calls[model] = json.loads(call["function"]["arguments"])
        code, body, _ = _post(base + "/v1/completions", {"model": model, "prompt": "The capital of France is",
                                                         "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1})
        assert code == 200, body
        scored[model] = body["choices"][0]["prompt_logprobs"]
    print(f"\nforced calls: {calls}")
    native, vllm = scored[NATIVE_MODEL], scored[VLLM_MODEL]
    assert len(native) == len(vllm) and native[0] is None and vllm[0] is None
    for a, b in zip(native[1:], vllm[1:]):  # the prompt token is in both (its top-1 neighbour may tie)
        common = a.keys() & b.keys()
        assert common and all(a[t]["logprob"] == pytest.approx(b[t]["logprob"], abs=2e-2) for t in common)
        assert all(isinstance(b[t]["rank"], int) for t in common)


@pytest.mark.slow
def test_slo_classes_and_metrics_work_with_the_vllm_engine(apps):
    body = {"model": VLLM_MODEL, "prompt": "Hello", "max_tokens": 2}
    code, ok, headers = _post(VLLM + "/v1/completions", body, {"x-slo-class": "interactive"})
    assert code == 200 and ok["usage"]["completion_tokens"] == 2
    assert 0 < float(headers["x-flowprefill-replica-ttft-ms"]) < 60_000
    code, err, _ = _post(VLLM + "/v1/completions", body, {"x-slo-class": "platinum"})
    assert code == 400 and err["error"]["param"] == "x-slo-class"
    code, _, _ = _post(VLLM + "/v1/completions", {**body, "slo_class": "batch"})
    assert code == 200
    with urllib.request.urlopen(VLLM + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    for cls in ("interactive", "batch"):
        assert f'flowprefill_ttft_seconds_count{{slo_class="{cls}"}}' in text
    assert len([ln for ln in text.splitlines() if ln.startswith("flowprefill_replica_queue_depth{")]) == 1


@pytest.mark.slow
def test_client_disconnect_aborts_the_request_in_vllm(apps):
    url = apps["vllm_url"]
    before = _vllm_metrics(url).get("vllm:generation_tokens_total", 0.0)
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)
    conn.request("POST", "/vllm/v1/completions", body=json.dumps(
        {"model": VLLM_MODEL, "prompt": "Count from one to a thousand:", "max_tokens": 400, "ignore_eos": True,
         "stream": True}), headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = 0
    while events < 3:
        if resp.fp.readline().startswith(b"data: {"):
            events += 1
    conn.sock.shutdown(2)
    conn.close()
    wait_for(lambda: _vllm_metrics(url).get("vllm:num_requests_running", 1) == 0, "vLLM to drop the request")
    stats = EngineStats.from_dict(apps["handle"].stats.remote().result())  # what crosses Ray, parsed back
    assert stats.counters["aborted"] >= 1 and stats.decoding == 0 and not stats.running
    generated = _vllm_metrics(url).get("vllm:generation_tokens_total", 0.0) - before
    print(f"\nvLLM generated {generated:.0f} of 400 tokens before the abort")
    assert generated < 200


@pytest.mark.slow
def test_queue_state_in_redis_and_placement_by_predicted_ttft(apps):
    """The vLLM replica publishes its queue state (engine kind vllm) while it prefills a long prompt;
    the router's placement over that real state and the idle native replica's predicts
    ``remaining + own`` seconds on the busy vLLM replica and routes a tight request to the native one."""
    from router.placement import PlacementRequest, load_from_state, rank_replicas
    from state.client import ClusterState

    async def read(namespace: str) -> tuple[dict, object, object]:
        async with ClusterState(apps["redis_url"], namespace=namespace) as state:
            states = await state.read_all_replica_states(skip_invalid=True)
            info = await state.replica_info(next(iter(states)))
            profile = await state.load_profile(info.model, info.hardware)
            return states, info, None if profile is None else CostModel.from_dict(profile)

    states, info, cost = asyncio.run(read(NS_VLLM))
    (vllm_id, idle), = states.items()
    assert idle.engine_kind == info.engine_kind == "vllm" and info.policy == "vllm-priority"
    assert idle.model == info.model == apps["handle"].tokenizer_info.remote().result()["model"]
    assert cost is not None and cost.fit_error["n_heldout"] >= 1
    print(f"\nvLLM profile: a={cost.a:.4g} b={cost.b:.4g} c={cost.c:.4g} d={cost.d:.4g} fit_error={cost.fit_error}")

    prompt_tokens = 1500
    slo_s = cost.predict(prompt_tokens) + 1.5  # feasible: the long prompt's deadline stays ahead of q's
    done = threading.Event()

    def long_request() -> None:
        try:
            _post(VLLM + "/v1/completions", {"model": VLLM_MODEL, "prompt": [100 + i % 1000 for i in
                                                                             range(prompt_tokens)],
                                             "max_tokens": 1}, {"x-slo-ttft-ms": str(slo_s * 1000)})
        finally:
            done.set()

    thread = threading.Thread(target=long_request)
    thread.start()

    def busy_state():
        got = asyncio.run(read(NS_VLLM))[0].get(vllm_id)
        return got if got is not None and got.requests and got.requests[0].predicted_remaining_s > 1.0 else None

    busy = wait_for(busy_state, "the vLLM replica to publish the long prompt", timeout_s=30.0)
    thread.join(timeout=300)
    assert done.is_set()
    entry = busy.requests[0]
    assert busy.engine_kind == "vllm" and entry.status == "running" and entry.prompt_tokens == prompt_tokens
    native_states, _, _ = asyncio.run(read(NS_NATIVE))
    (native_id, native), = native_states.items()
    assert native.engine_kind == "flowprefill" and not native.requests

    now = busy.updated_at
    remaining, slack = entry.predicted_remaining_s, entry.deadline - now - entry.predicted_remaining_s
    assert slack > 0
    # q: deadline just after the long prompt's (so it queues behind it, on vLLM and in the model), and
    # long enough that waiting for the rest of the long prefill makes it late there, not on the idle replica.
    n = next(k for k in range(16, 8000, 16) if cost.predict(k) >= slack + remaining / 2)
    q = PlacementRequest("q", n, entry.deadline + 0.001, entry.deadline + 0.001 - now)
    loads = [load_from_state(busy, 0.0, now, 5.0), load_from_state(native, 0.0, now, 5.0)]
    decision = rank_replicas("slo_aware", q, loads, cost, now)
    assert decision.ranked == [native_id, vllm_id], decision.reason
    assert decision.predicted_ttft[vllm_id] == pytest.approx(remaining + cost.predict(n), rel=1e-6)
    assert decision.predicted_ttft[native_id] == pytest.approx(cost.predict(n), abs=0.05)
