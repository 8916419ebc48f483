"""Open-loop, streaming load generator for any OpenAI-compatible server (``/v1/completions``).

Each :class:`LoadRequest` is sent at its scheduled time (``arrival_s`` after the run starts)
whether or not earlier requests have finished: the schedule never waits for the server, so an
overloaded server builds a queue instead of slowing the client down. Every request streams
(``stream: true``) and records, from the moment it was sent:

* TTFT: time to the first streamed chunk that carries text or a ``finish_reason``;
* e2e latency: time to ``data: [DONE]`` (a stream closed before it is an error);
* output tokens: the ``usage.completion_tokens`` of the last chunk when the server sends usage
  (``stream_options.include_usage``), else the number of chunks that carried text;
* TPOT: ``(e2e - TTFT) / (output_tokens - 1)`` when more than one token came back;
* an error string (HTTP status and body, an SSE error event, a connection failure, a timeout);
* FlowPrefill's TTFT decomposition (:class:`~replicas.ttft_parts.TTFTParts`): the
  ``x-flowprefill-ttft-parts`` header, or the ``flowprefill.ttft_parts`` field of a chunk (which
  wins); None when the server sends neither (vLLM) or sends something malformed (never an error).
  The client's TTFT less the parts' sum is ``unattributed_s``: the proxy's hops both ways and the
  client itself (:mod:`bench.ttft_breakdown` tabulates it).

Errors are counted and never abort the run; a request with an error or without a first token
misses its SLO. The SLO is sent both ways, FlowPrefill's ``x-slo-class`` header and OpenAI's
``priority`` field (lower is more urgent, vLLM's meaning), so every server gets what it reads.

Once the last request has been sent, a request still without a first token after its TTFT SLO
has certainly missed and is cancelled (its connection closed); every request still open
``drain_s`` after the last arrival is cancelled too. Cancelling only after the last arrival leaves
the load seen by every request of the run unchanged.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np

from replicas.ttft_parts import TTFT_PARTS_HEADER, TTFTParts, parse_ttft_parts

ATTAINMENT_GOAL = 0.9


@dataclass(frozen=True)
class LoadRequest:
    """One request of a run: when to send it, what to send, and the SLO it is judged by."""

    arrival_s: float
    prompt: str | tuple[int, ...]
    input_tokens: int
    max_tokens: int
    slo_class: str
    priority: int
    ttft_slo_s: float
    tpot_slo_s: float | None = None  # judged too where set (bench serve --slos both)


@dataclass
class RequestResult:
    """What happened to one request (times in seconds; ``sent_s`` is from the run start)."""

    index: int
    slo_class: str
    input_tokens: int
    ttft_slo_s: float
    arrival_s: float
    sent_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    error: str | None = None
    status: int | None = None  # HTTP status of the response (None: no response)
    retry_after: str | None = None  # the Retry-After header of a refusal
    ttft_parts: TTFTParts | None = None  # the server's TTFT decomposition, where it sent one
    tpot_slo_s: float | None = None  # the TPOT SLO it is judged by too (None: TTFT only)

    @property
    def unattributed_s(self) -> float | None:
        """Client TTFT less the server's parts (proxy hops, client); None without both."""
        if self.ttft_s is None or self.ttft_parts is None:
            return None
        return self.ttft_s - self.ttft_parts.total_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2 or self.error is not None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def met(self) -> bool:
        """Whether the first token arrived within the TTFT SLO."""
        return self.ttft_s is not None and self.ttft_s <= self.ttft_slo_s

    @property
    def met_tpot(self) -> bool:
        """Whether the request met its TPOT SLO: completed, at most ``tpot_slo_s`` per token after the
        first (vacuously with fewer than two tokens); always true without a TPOT SLO."""
        if self.tpot_slo_s is None:
            return True
        if self.ttft_s is None or self.error is not None:
            return False
        tpot = self.tpot_s
        return tpot is None or tpot <= self.tpot_slo_s

    @property
    def met_all(self) -> bool:
        """Whether the request met every SLO it is judged by (TTFT, and TPOT where it has one)."""
        return self.met and self.met_tpot

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ``tpot_s``, ``met`` and ``unattributed_s`` included."""
        return {**asdict(self), "tpot_s": self.tpot_s, "met": self.met, "met_all": self.met_all,
                "unattributed_s": self.unattributed_s}


@dataclass(frozen=True)
class LoadConfig:
    """Where to send the requests and how."""

    base_url: str  # e.g. http://127.0.0.1:8000 (the /v1 prefix is added)
    model: str
    drain_s: float = 60.0  # after the last arrival, cancel whatever is still open
    cancel_missed: bool = True  # after the last arrival, cancel requests past their TTFT SLO
    ignore_eos: bool = True  # generate max_tokens tokens, so output lengths follow the trace
    include_usage: bool = True
    send_priority: bool = True  # off for servers that refuse the field (vLLM under FCFS scheduling)
    connect_timeout_s: float = 10.0
    extra_body: dict[str, Any] = field(default_factory=dict)


def request_body(cfg: LoadConfig, req: LoadRequest) -> dict[str, Any]:
    """The JSON body of one streaming completion request."""
    prompt: str | list[int] = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
    body: dict[str, Any] = {"model": cfg.model, "prompt": prompt, "max_tokens": req.max_tokens, "stream": True,
                            "temperature": 0.0}
    if cfg.send_priority:
        body["priority"] = req.priority
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return {**body, **cfg.extra_body}


async def _read_stream(resp: aiohttp.ClientResponse, res: RequestResult, t_sent: float) -> None:
    """Consume the SSE stream of one response into ``res`` (times relative to ``t_sent``)."""
    chunks, usage_tokens, done = 0, None, False
    buffer = b""
    async for raw in resp.content:
        buffer += raw
        if not buffer.endswith(b"\n"):
            continue  # a line split across reads
        line, buffer = buffer.strip(), b""
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            res.error = f"bad SSE data: {data[:120]!r}"
            break
        if "error" in event:
            err = event["error"]
            res.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
            break
        extra = event.get("flowprefill")
        if isinstance(extra, dict) and (parts := parse_ttft_parts(extra.get("ttft_parts"))) is not None:
            res.ttft_parts = parts
        if isinstance(event.get("usage"), dict) and event["usage"].get("completion_tokens") is not None:
            usage_tokens = int(event["usage"]["completion_tokens"])
        for choice in event.get("choices") or ():
            if choice.get("text") or choice.get("finish_reason"):
                if res.ttft_s is None:
                    res.ttft_s = time.perf_counter() - t_sent
                if choice.get("text"):
                    chunks += 1
    res.e2e_s = time.perf_counter() - t_sent
    if not done and res.error is None:
        res.error = "stream ended without data: [DONE] (connection closed mid-stream)"
    res.output_tokens = usage_tokens if usage_tokens is not None else chunks


async def _send(session: aiohttp.ClientSession, cfg: LoadConfig, index: int, req: LoadRequest,
                res: RequestResult, t0: float) -> None:
    headers = {"x-slo-class": req.slo_class, "content-type": "application/json"}
    t_sent = time.perf_counter()
    res.sent_s = t_sent - t0
    try:
        async with session.post(f"{cfg.base_url.rstrip('/')}/v1/completions", json=request_body(cfg, req),
                                headers=headers) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.retry_after = resp.headers.get("Retry-After")
                text = (await resp.text())[:200]
                res.error = f"HTTP {resp.status}: {text}"
                return
            res.ttft_parts = parse_ttft_parts(resp.headers.get(TTFT_PARTS_HEADER))
            await _read_stream(resp, res, t_sent)
    except asyncio.CancelledError:
        if res.error is None:  # the run itself was cancelled (the drain names its own cancellations)
            res.error = "cancelled: the load run was stopped"
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]


async def run_load(cfg: LoadConfig, requests: Sequence[LoadRequest],
                   on_done: Callable[[RequestResult], None] | None = None) -> list[RequestResult]:
    """Send ``requests`` open loop and return one :class:`RequestResult` each, in the same order.

    ``requests`` must be sorted by ``arrival_s``. ``on_done`` is called as each request ends.
    """
    arrivals = [r.arrival_s for r in requests]
    if any(b < a for a, b in zip(arrivals, arrivals[1:])):
        raise ValueError("requests must be sorted by arrival_s")
    results = [RequestResult(i, r.slo_class, r.input_tokens, r.ttft_slo_s, r.arrival_s, tpot_slo_s=r.tpot_slo_s)
               for i, r in enumerate(requests)]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for i, req in enumerate(requests):
            delay = req.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(_send(session, cfg, i, req, results[i], t0))
            if on_done is not None:
                task.add_done_callback(lambda _t, res=results[i]: on_done(res))
            tasks.append(task)
        await _drain(cfg, requests, results, tasks, t0)
    return results


async def _drain(cfg: LoadConfig, requests: Sequence[LoadRequest], results: list[RequestResult],
                 tasks: list[asyncio.Task[None]], t0: float) -> None:
    """Wait for the open requests; cancel certain misses and, at the drain limit, everything."""
    last = requests[-1].arrival_s if requests else 0.0
    hard_stop = t0 + last + cfg.drain_s
    while True:
        pending = [t for t in tasks if not t.done()]
        if not pending:
            return
        now = time.perf_counter()
        if now >= hard_stop:
            break
        if cfg.cancel_missed:
            for task, req, res in zip(tasks, requests, results):
                if not task.done() and res.ttft_s is None and res.sent_s is not None \
                        and now - t0 - res.sent_s > req.ttft_slo_s:
                    res.error = res.error or "cancelled: no first token within the TTFT SLO"
                    task.cancel()
        await asyncio.wait(pending, timeout=min(0.05, max(hard_stop - now, 0.0)))
    for task, res in zip(tasks, results):
        if not task.done():
            res.error = res.error or ("cancelled: no first token by the drain limit" if res.ttft_s is None
                                      else "cancelled: still streaming at the drain limit")
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_load_sync(cfg: LoadConfig, requests: Sequence[LoadRequest],
                  on_done: Callable[[RequestResult], None] | None = None) -> list[RequestResult]:
    """:func:`run_load` on a fresh event loop."""
    return asyncio.run(run_load(cfg, requests, on_done))


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def summarize(results: Sequence[RequestResult], goal: float = ATTAINMENT_GOAL) -> dict[str, Any]:
    """Attainment overall and per class, TTFT / TPOT / e2e percentiles, errors and send lag.

    Attainment is the fraction of *all* requests (errors and cancellations included) whose first
    token came within their TTFT SLO, and whose time per output token stayed within their TPOT SLO
    where they carry one (:attr:`RequestResult.met_all`; ``ttft_attainment`` counts TTFT alone);
    ``ok`` says whether it reaches ``goal``. ``errors`` counts
    failures (HTTP status, stream error, connection); ``cancelled`` the requests the load generator
    gave up on (certain SLO misses after the last arrival, or open at the drain limit).
    """
    n = len(results)
    met = sum(r.met_all for r in results)
    classes = sorted({r.slo_class for r in results})
    per_class: dict[str, float] = {}
    counts: dict[str, int] = {}
    for c in classes:
        rows = [r for r in results if r.slo_class == c]
        counts[c] = len(rows)
        per_class[c] = sum(r.met_all for r in rows) / len(rows)
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    tpots = [t for r in results if (t := r.tpot_s) is not None]
    e2es = [r.e2e_s for r in results if r.e2e_s is not None and r.error is None]
    errors = [r.error for r in results if r.error is not None and not r.error.startswith("cancelled")]
    cancelled = sum(r.error is not None and r.error.startswith("cancelled") for r in results)
    kinds: dict[str, int] = {}
    for e in errors:
        kind = e.split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    lags = [r.sent_s - r.arrival_s for r in results if r.sent_s is not None]
    attainment = met / n if n else math.nan
    return {
        "requests": n, "met": met, "attainment": attainment, "ok": bool(n and attainment >= goal),
        "ttft_attainment": sum(r.met for r in results) / n if n else math.nan,
        "tpot_judged": sum(r.tpot_slo_s is not None for r in results),
        "attainment_per_class": per_class, "requests_per_class": counts,
        "ttft_p50_s": _pct(ttfts, 50), "ttft_p90_s": _pct(ttfts, 90), "ttft_p99_s": _pct(ttfts, 99),
        "tpot_p50_s": _pct(tpots, 50), "tpot_p90_s": _pct(tpots, 90), "e2e_p50_s": _pct(e2es, 50),
        "output_tokens": sum(r.output_tokens for r in results), "errors": len(errors), "error_kinds": kinds,
        "cancelled": cancelled,
        "send_lag_max_s": max(lags) if lags else None,
    }
