"""The HTTP benchmark's pieces: open-loop schedule, error counting, attainment, prompts, search.

The server here is a fault-injection fake (:class:`SlowFaultInjectingSSEServer`): a tiny asyncio
HTTP server on 127.0.0.1 that streams OpenAI-style SSE slowly and fails on purpose when the
prompt asks it to. It stands in for any OpenAI-compatible server; no model is loaded.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace

import pytest

from bench.loadgen import LoadConfig, LoadRequest, RequestResult, run_load, summarize
from bench.prompts import PromptBuilder, make_prompts, max_tokens_for
from bench.rate_search import find_goodput, fixed_rate, grid

FIRST_DELAY_S = 0.15
TOKEN_GAP_S = 0.1


@dataclass
class SlowFaultInjectingSSEServer:
    """Fake /v1/completions: first token after ``FIRST_DELAY_S``, then one token per ``TOKEN_GAP_S``.

    Prompt directives: ``"http500"`` answers 500; ``"sse-error"`` streams one token then an error
    event; ``"drop"`` closes the connection mid-stream; ``"hang"`` never sends a token.
    """

    received: list[tuple[float, dict, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    server: asyncio.base_events.Server | None = None
    handlers: set[asyncio.Task] = field(default_factory=set)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in self.handlers:  # e.g. a "hang" still sleeping
                task.cancel()
            await asyncio.gather(*self.handlers, return_exceptions=True)
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.handlers.add(task)
        try:
            while True:  # keep-alive: several requests per connection
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
                body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))))
                self.received.append((time.perf_counter(), body, headers))
                if not await self._respond(body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def _respond(self, body: dict, writer: asyncio.StreamWriter) -> bool:
        prompt = body["prompt"]
        if prompt == "http500":
            msg = b'{"error": {"message": "injected failure"}}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(msg), msg))
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        await writer.drain()
        if prompt == "hang":
            await asyncio.sleep(30)
            return False
        await asyncio.sleep(FIRST_DELAY_S)
        n = body["max_tokens"]
        for i in range(n):
            if i:
                await asyncio.sleep(TOKEN_GAP_S)
            if prompt == "drop" and i == 1:
                writer.transport.abort()
                return False
            if prompt == "sse-error" and i == 1:
                writer.write(b'data: {"error": {"message": "injected mid-stream error"}}\n\ndata: [DONE]\n\n')
                await writer.drain()
                return False
            chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}]}
            writer.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await writer.drain()
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}}
        writer.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        await writer.drain()
        return False


def _req(at: float, prompt: str = "hello", max_tokens: int = 4, cls: str = "interactive", prio: int = 0,
         slo: float = 1.0) -> LoadRequest:
    return LoadRequest(at, prompt, 3, max_tokens, cls, prio, slo)


async def _run(requests: list[LoadRequest], **cfg: object) -> tuple[list[RequestResult], SlowFaultInjectingSSEServer,
                                                                     float, float]:
    server = SlowFaultInjectingSSEServer()
    await server.start()
    try:
        t0 = time.perf_counter()
        results = await run_load(LoadConfig(f"http://127.0.0.1:{server.port}", "fake", **cfg), requests)
        return results, server, t0, time.perf_counter() - t0
    finally:
        await server.close()


def test_open_loop_sends_on_schedule_while_earlier_requests_are_still_streaming():
    # Each request streams for 0.15 + 9 * 0.1 = 1.05 s; they are due every 0.1 s.
    arrivals = [0.0, 0.1, 0.2, 0.3, 0.5]
    results, server, t0, elapsed = asyncio.run(_run([_req(a, max_tokens=10) for a in arrivals]))
    got = sorted(t - t0 for t, _, _ in server.received)
    assert len(got) == len(arrivals)
    assert all(r.sent_s is not None and r.sent_s >= r.arrival_s for r in results)  # never early
    for i in range(1, len(results)):  # open loop: each request went out while the one before still streamed
        prev = results[i - 1]
        assert results[i].sent_s < prev.sent_s + prev.e2e_s and got[i] < got[i - 1] + prev.e2e_s
    for r in results:
        assert r.error is None
        assert r.ttft_s == pytest.approx(FIRST_DELAY_S, abs=0.08)
        assert r.output_tokens == 10
        assert r.tpot_s == pytest.approx(TOKEN_GAP_S, abs=0.03)
        assert r.e2e_s == pytest.approx(FIRST_DELAY_S + 9 * TOKEN_GAP_S, abs=0.15)
        assert r.met


def test_slo_goes_out_as_header_and_priority_field():
    reqs = [_req(0.0, cls="interactive", prio=0), _req(0.0, cls="batch", prio=2, max_tokens=1)]
    _, server, _, _ = asyncio.run(_run(reqs))
    seen = sorted((h["x-slo-class"], b["priority"], b["stream"], b["max_tokens"]) for _, b, h in server.received)
    assert seen == [("batch", 2, True, 1), ("interactive", 0, True, 4)]
    body = server.received[0][1]
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}


def test_token_id_prompts_are_sent_as_lists():
    _, server, _, _ = asyncio.run(_run([LoadRequest(0.0, (5, 6, 7), 3, 2, "standard", 1, 5.0)]))
    assert server.received[0][1]["prompt"] == [5, 6, 7]


def test_errors_are_counted_and_never_abort_the_run():
    reqs = [_req(0.0, "http500"), _req(0.02, "sse-error"), _req(0.04, "drop"), _req(0.06, "fine")]
    results, _, _, _ = asyncio.run(_run(reqs))
    by_prompt = dict(zip(["http500", "sse-error", "drop", "fine"], results))
    assert by_prompt["http500"].error.startswith("HTTP 500")
    assert "injected mid-stream error" in by_prompt["sse-error"].error
    assert by_prompt["drop"].error is not None
    assert by_prompt["fine"].error is None and by_prompt["fine"].output_tokens == 4
    s = summarize(results)
    assert s["errors"] == 3 and s["requests"] == 4
    # the mid-stream failures did deliver a first token in time; the 500 did not
    assert s["met"] == 3 and s["attainment"] == pytest.approx(0.75)


def test_connection_refused_is_an_error_not_an_exception():
    server_port = _closed_port()
    results = asyncio.run(run_load(LoadConfig(f"http://127.0.0.1:{server_port}", "fake"), [_req(0.0)]))
    assert results[0].error is not None and results[0].ttft_s is None and not results[0].met


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_requests_past_their_slo_are_cancelled_after_the_last_arrival():
    reqs = [_req(0.0, "hang", slo=0.3), _req(0.05, "fine", slo=1.0)]
    results, _, _, _ = asyncio.run(_run(reqs, drain_s=20.0))
    assert results[0].error == "cancelled: no first token within the TTFT SLO" and not results[0].met  # not drained
    assert results[1].error is None and results[1].met
    s = summarize(results)
    assert s["cancelled"] == 1 and s["errors"] == 0 and s["attainment"] == pytest.approx(0.5)


def test_drain_limit_cancels_everything_left():
    results, _, _, _ = asyncio.run(_run([_req(0.0, "hang", slo=60.0)], drain_s=0.4))
    assert results[0].error == "cancelled: no first token by the drain limit"  # its 60 s SLO had not passed


def test_unsorted_requests_are_refused():
    with pytest.raises(ValueError, match="sorted"):
        asyncio.run(run_load(LoadConfig("http://127.0.0.1:9", "fake"), [_req(1.0), _req(0.0)]))


def _res(cls: str, ttft: float | None, slo: float, error: str | None = None) -> RequestResult:
    return RequestResult(0, cls, 10, slo, 0.0, 0.0, ttft, None if ttft is None else ttft + 1, 5, error)


def test_attainment_overall_and_per_class():
    results = [
        _res("interactive", 0.5, 1.0), _res("interactive", 1.5, 1.0), _res("interactive", None, 1.0, "HTTP 429: shed"),
        _res("interactive", 0.9, 1.0), _res("batch", 30.0, 60.0), _res("batch", 61.0, 60.0),
    ]
    s = summarize(results)
    assert s["attainment_per_class"] == {"batch": 0.5, "interactive": 0.5}
    assert s["requests_per_class"] == {"batch": 2, "interactive": 4}
    assert s["met"] == 3 and s["attainment"] == pytest.approx(0.5) and not s["ok"]
    assert s["errors"] == 1 and s["error_kinds"] == {"HTTP 429": 1}
    assert summarize([_res("a", 0.1, 1.0)] * 9 + [_res("a", None, 1.0)])["ok"]  # exactly 90% reaches the goal


def test_tpot_needs_two_tokens_and_no_error():
    r = RequestResult(0, "a", 1, 1.0, 0.0, 0.0, ttft_s=0.2, e2e_s=1.2, output_tokens=6)
    assert r.tpot_s == pytest.approx(0.2)
    assert RequestResult(0, "a", 1, 1.0, 0.0, 0.0, ttft_s=0.2, e2e_s=1.2, output_tokens=1).tpot_s is None


@pytest.fixture(scope="module")
def smollm_tokenizer(default_model_dir):
    from replicas.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_checkpoint_factory):
    from replicas.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_checkpoint_factory("llama3"))


@pytest.mark.parametrize("which", [pytest.param("smollm_tokenizer", marks=pytest.mark.slow), "tiny_tokenizer"])
def test_prompts_retokenize_to_the_requested_length_and_are_unique(which, request):
    tok = request.getfixturevalue(which)
    lengths = [1, 2, 3, 7, 16, 64, 129, 465, 2000]
    prompts = make_prompts(tok, lengths * 3, seed=3)
    for p, n in zip(prompts, lengths * 3):
        assert p.num_tokens == n
        assert len(tok.encode(p.text, add_special_tokens=True)) == n
        assert list(p.token_ids) == tok.encode(p.text, add_special_tokens=True)
    assert len({p.text for p in prompts}) == len(prompts)
    # no two prompts share a first token unless the pool is exhausted: no shared cache block
    firsts = [p.token_ids[0] for p in prompts[:20]]
    assert len(set(firsts)) == len(firsts)
    # seeded: the same seed gives the same prompts, another seed others
    assert make_prompts(tok, [64], seed=3)[0].text != make_prompts(tok, [64], seed=4)[0].text
    assert make_prompts(tok, [64], seed=3) == make_prompts(tok, [64], seed=3)


def test_prompt_builder_refuses_impossible_lengths(tiny_tokenizer):
    with pytest.raises(ValueError, match="num_tokens"):
        PromptBuilder(tiny_tokenizer).build(0, 0)


def test_max_tokens_follows_the_trace_capped():
    assert max_tokens_for(13, 8) == 8
    assert max_tokens_for(5, 8) == 5
    assert max_tokens_for(0, 8) == 1
    assert max_tokens_for(300, None) == 300
    with pytest.raises(ValueError):
        max_tokens_for(3, 0)


def test_goodput_search_finds_the_boundary_and_confirms_it_on_medians():
    capacity = 3.0  # attainment falls below 90% above this scale

    def measure(s: float) -> float:
        calls.append(s)
        return 1.0 if s <= capacity else 0.8

    calls: list[float] = []
    found = find_goodput(measure, 1.0, max_runs=8, refine_steps=3, repeats=3)
    assert grid(1.0, 2) == 2.25 and grid(1.0, 3) == 3.375
    assert 2.25 < found.good <= capacity < found.bad  # 2.25 passes, 3.375 fails, bisection in between
    assert len(found.runs[found.good]) == 3 and len(found.runs[found.bad]) == 3  # both boundary scales repeated
    assert calls[:4] == [1.0, 1.5, 2.25, 3.375] and len(calls) == 4 + 3 + 2 + 2
    assert all(len(v) == 1 for s, v in found.runs.items() if s not in (found.good, found.bad))
    assert not found.budget_spent
    calls.clear()
    found = find_goodput(lambda s: 0.0, 1.0, max_runs=3, refine_steps=2, repeats=1)
    assert found.good == 0.0 and sorted(found.runs) == [grid(1.0, -4), grid(1.0, -2), 1.0]  # big steps, no pass


def test_goodput_search_falls_back_when_the_boundary_median_fails():
    flaky = {grid(1.0, 1): [0.95, 0.5, 0.6]}  # passes once, then fails twice: the median is below the goal

    def measure(s: float) -> float:
        if s in flaky:
            return flaky[s].pop(0)
        return 1.0 if s <= 1.5 else 0.0

    found = find_goodput(measure, 1.0, max_runs=4, refine_steps=0, repeats=3)
    assert found.good == 1.0 and found.bad == grid(1.0, 1) and found.runs[grid(1.0, 1)] == [0.95, 0.5, 0.6]
    assert found.median(1.0) == 1.0 and len(found.runs[1.0]) == 3


def test_goodput_search_moves_up_when_the_failing_boundary_median_passes():
    flaky = {grid(1.0, 1): [0.5, 0.95, 0.92]}  # one unlucky first run: its median passes

    def measure(s: float) -> float:
        if s in flaky:
            return flaky[s].pop(0)
        return 1.0 if s <= 1.5 else 0.0

    found = find_goodput(measure, 1.0, max_runs=4, refine_steps=0, repeats=3)
    assert found.good == grid(1.0, 1) and found.median(found.good) == 0.92
    assert found.bad is None  # nothing failing was tried above it: the goodput is a lower bound


def test_goodput_search_stops_when_its_budget_is_spent():
    budget = iter([False, False, True])
    found = find_goodput(lambda s: 1.0, 1.0, max_runs=6, refine_steps=2, repeats=3, out_of_budget=lambda: next(budget))
    assert found.budget_spent and found.good == 1.5 and sorted(found.runs) == [1.0, 1.5]


def test_fixed_rate_replays_one_scale_and_judges_it_on_the_median():
    seen = iter([0.95, 0.85, 0.92, 0.91, 0.70])
    tried: list[float] = []
    found = fixed_rate(lambda s: tried.append(s) or next(seen), 0.7, 5)
    assert tried == [0.7] * 5 and found.runs == {0.7: [0.95, 0.85, 0.92, 0.91, 0.70]}
    assert (found.good, found.bad, found.median(0.7)) == (0.7, None, 0.91)
    failing = fixed_rate(lambda s: 0.5, 2.0, 3)
    assert (failing.good, failing.bad) == (0.0, 2.0)
    with pytest.raises(ValueError, match="at least 1 run"):
        fixed_rate(lambda s: 1.0, 1.0, 0)


def test_serve_bench_refuses_a_bad_fixed_rate():
    from bench.serve_config import ServeBenchConfig

    with pytest.raises(ValueError, match="--fixed-rate"):
        ServeBenchConfig(trace="t.csv", systems=("flowprefill",), fixed_rate_rps=0.0)
    assert ServeBenchConfig(trace="t.csv", systems=("flowprefill",), fixed_rate_rps=2.5).fixed_rate_rps == 2.5


def test_priority_field_can_be_left_out():
    from bench.loadgen import request_body

    body = request_body(LoadConfig("http://127.0.0.1:1", "m", send_priority=False, ignore_eos=False), _req(0.0))
    assert "priority" not in body and "ignore_eos" not in body and body["stream"] is True


def test_server_specs_carry_the_fair_settings(tmp_path, monkeypatch):
    import yaml

    from bench import servers

    spec = servers.server_spec("chunked", tmp_path / "m", "m", work_dir=tmp_path, engine={"short_threshold": 128},
                               chunk_tokens=64)
    config = yaml.safe_load(spec.cleanup[0].read_text())
    engine = config["applications"][0]["args"]["engine"]
    assert engine["policy"] == "chunked" and engine["policy_chunk_tokens"] == 64 and engine["short_threshold"] == 128
    assert config["applications"][0]["args"]["slo"]["classes"][0]["name"] == "interactive"  # the rest is kept
    assert spec.argv[spec.argv.index("--policy") + 1] == "chunked" and "--grpc-port" in spec.argv

    monkeypatch.setattr(servers, "vllm_available", lambda: (True, ""))
    v = servers.server_spec("vllm", tmp_path / "m", "m", work_dir=tmp_path)
    args = " ".join(v.argv)
    for flag in ("--enable-chunked-prefill", "--scheduling-policy priority", "--dtype float32",
                 "--max-num-batched-tokens 512", "--long-prefill-token-threshold 256", "--no-enable-prefix-caching",
                 "--host 127.0.0.1"):
        assert flag in args
    assert v.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    fv = servers.server_spec("flowprefill-vllm", tmp_path / "m", "m", work_dir=tmp_path)
    fv_args = yaml.safe_load(fv.cleanup[0].read_text())["applications"][0]["args"]
    assert fv.argv[fv.argv.index("--engine") + 1] == "vllm" and fv_args["engine_kind"] == "vllm"
    assert fv_args["engine"]["max_num_batched_tokens"] == 512
    assert fv_args["engine"]["long_prefill_token_threshold"] == 256
    from replicas.vllm_process import VLLMConfig

    VLLMConfig.from_dict(fv_args["engine"])  # the settings the vLLM engine accepts (same as the vllm system's)
    monkeypatch.setattr(servers, "vllm_available", lambda: (False, "run scripts/vllm_env.sh"))
    with pytest.raises(servers.ServerStartError, match="vllm_env"):
        servers.server_spec("vllm", tmp_path / "m", "m", work_dir=tmp_path)


# A stand-in server process: answers /v1/models, and has a child in its process group.
_FAKE_SERVER = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[2], "w").write(str(child.pid))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"data": [{"id": "fake-model"}]}'
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_managed_server_waits_for_readiness_and_kills_its_process_group(tmp_path):
    import os
    import sys

    from bench.servers import ManagedServer, ServerSpec, free_port

    port, pid_file = free_port(), tmp_path / "child.pid"
    spec = ServerSpec("fake", [sys.executable, "-c", _FAKE_SERVER, str(port), str(pid_file)], port, "other-name",
                      ready_timeout_s=20)
    with ManagedServer(spec, tmp_path / "fake.log") as server:
        assert server.model_name == "fake-model"  # taken from /v1/models when the expected name is absent
        child = int(pid_file.read_text())
        os.kill(child, 0)  # alive
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the server's child process survived stop()")


def test_managed_server_reports_an_early_exit_with_its_log(tmp_path):
    import sys

    from bench.servers import ManagedServer, ServerSpec, ServerStartError

    spec = ServerSpec("broken", [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"], 1, "m")
    with pytest.raises(ServerStartError, match="(?s)status 3.*no model here"):
        with ManagedServer(spec, tmp_path / "broken.log"):
            pass


def test_goodput_search_never_goes_below_the_floor():
    tried: list[float] = []

    def measure(s: float) -> float:
        tried.append(s)
        return 0.5

    found = find_goodput(measure, 1.0, max_runs=6, refine_steps=2, repeats=1, min_scale=0.3)
    assert found.good == 0.0 and tried == [1.0, grid(1.0, -2), 0.3]  # 0.444 then the floor, then stop
    tried.clear()
    found = find_goodput(lambda s: tried.append(s) or (1.0 if s <= 0.3 else 0.0), 0.1, max_runs=6,
                         refine_steps=0, repeats=0, min_scale=0.3)
    assert found.good == 0.3 and tried == [0.3, 0.45]  # a start below the floor starts at the floor


def test_soak_tiles_the_window_at_the_requested_mean_rate():
    from bench.soak import tiled

    window = [LoadRequest(t, "x", 1, 1, "standard", 1, 5.0) for t in (0.0, 0.5, 3.0, 4.0)]  # 3 gaps in 4 s
    out = tiled(window, rate_rps=3.0, duration_s=20.0)
    assert abs(len(out) - 60) <= 2 and all(b.arrival_s >= a.arrival_s for a, b in zip(out, out[1:]))
    assert out[4].arrival_s - out[3].arrival_s == pytest.approx(1 / 3.0)  # the gap between copies: one mean gap
    assert out[-1].arrival_s < 20.0


def test_idle_probe_times_fresh_median_prompts_one_at_a_time():
    """bench serve --fixed-rate's probe, against the fake server (first token after FIRST_DELAY_S):
    three sequential requests, each a new prompt sharing no prefix with the window's, max_tokens 1."""
    import threading

    from bench.serve_spread import correlation, format_spread, idle_probe_ms, probe_prompt

    loop = asyncio.new_event_loop()
    server = SlowFaultInjectingSSEServer()
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        window = [_req(0.0, "short"), _req(0.1, "the median prompt"), _req(0.2, "the longest prompt of all")]
        window = [replace(r, input_tokens=n) for r, n in zip(window, (3, 7, 12))]
        probe = idle_probe_ms(f"http://127.0.0.1:{server.port}", "fake", window, run=2)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert probe is not None and FIRST_DELAY_S * 1000 <= probe < FIRST_DELAY_S * 1000 + 250
    sent = [body for _, body, _ in server.received]
    assert [b["prompt"] for b in sent] == [f" probe{t}the median prompt" for t in (6, 7, 8)]
    assert all(b["max_tokens"] == 1 for b in sent)
    ids = (5, 6, 7, 8)
    assert probe_prompt(ids, 0) == (6, 7, 8, 5) and probe_prompt(ids, 1) == (7, 8, 5, 6)
    assert correlation([0.9, 0.8, 1.0], [450.0, 600.0, 400.0]) < -0.9 and correlation([1.0, 1.0], [1.0, 2.0]) is None
    point = {"rate_rps": 4.0, "attainment": 0.9, "spread": 0.2,
             "repeats": [{"attainment": 0.9, "probe_ms": 450.0}, {"attainment": 0.8, "probe_ms": 600.0},
                         {"attainment": 1.0, "probe_ms": 400.0}]}
    (head, line) = format_spread([{"system": "flowprefill", "points": [point]}])
    assert line.startswith("  flowprefill at 4.00 req/s: 0.90@450, 0.80@600, 1.00@400; median 0.90, spread 0.20, r -0.")


def test_short_fixed_rate_replays_are_warned_about_and_long_ones_are_not():
    from bench.serve_spread import short_replay_warning

    warning = short_replay_warning(32, 10.0)  # the replay whose spread was 0.19: 3.2 s, 32 requests
    assert warning is not None and "3.2 s" in warning and "0.031 of attainment" in warning
    assert short_replay_warning(160, 2.2) is None  # 72.7 s, 160 requests: spread 0.04
    assert short_replay_warning(500, 50.0) is not None  # many requests, but 10 s of one moment's speed
    with pytest.raises(ValueError, match="positive rate"):
        short_replay_warning(10, 0.0)
