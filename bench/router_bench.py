"""``flowprefill bench router``: what the router itself costs, measured on the real serving path.

The app is the real one (Serve HTTP proxy, FastAPI ingress, the SLO-aware request router reading
Redis, replica deployments publishing queue state) with the engine swapped for the model-free
``echo`` engine, so what is left is the router's own cost:

* ``router_overhead_ms``: client-measured TTFT minus the replica-reported TTFT (receipt to first
  token, ``x-flowprefill-replica-ttft-ms``) of sequential one-token requests, p50/p99;
* ``routing_decision_ms``: the request router's decision time (Redis read included) as recorded by
  the ingress (``GET /v1/router/stats``), p50/p99;
* ``max_rps``: the highest open-loop request rate at which at least ``min_success`` of the
  requests succeed and the p99 latency stays under ``latency_budget_ms``.

With ``engine="flowprefill"`` the same measurements run on the real engine (the overhead is then
the client's TTFT minus the engine's; decision times include real queue states).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.placement_bench import bench_placement
from bench.serve_floor import deploy_floor_app, measure_floor
from bench.stack import ServingStack

MODEL = "bench-model"


@dataclass(frozen=True)
class RouterBenchConfig:
    """What to run; the defaults finish in about two minutes on a 2-core machine."""

    engine: str = "echo"  # echo (model-free) or flowprefill (the real engine on the default model)
    replicas: int = 2
    replica_cpus: float = 0.5
    router_policy: str = "slo_aware"
    port: int = 8790
    grpc_port: int = 9790
    warmup: int = 20
    sequential: int = 200  # requests for the overhead measurement, one at a time
    rates: tuple[float, ...] = (25, 50, 100, 150, 200, 300, 400)
    step_s: float = 8.0  # seconds of open-loop load per rate
    min_success: float = 0.99
    latency_budget_ms: float = 500.0
    prompt: str = "The quick brown fox jumps over the lazy dog."
    extra_engine: dict[str, Any] = field(default_factory=dict)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _summary(xs: list[float]) -> dict[str, float | int | None]:
    return {"n": len(xs), "p50": _pct(xs, 0.5), "p99": _pct(xs, 0.99),
            "mean": statistics.fmean(xs) if xs else None}


def _body(cfg: RouterBenchConfig) -> bytes:
    return json.dumps({"model": MODEL, "prompt": cfg.prompt, "max_tokens": 1, "temperature": 0}).encode()


def _sequential(cfg: RouterBenchConfig, n: int) -> tuple[list[float], list[float]]:
    """Client latency and replica TTFT (ms) of ``n`` one-token requests sent one after another."""
    url, body = f"http://127.0.0.1:{cfg.port}/v1/completions", _body(cfg)
    client, replica = [], []
    for _ in range(n):
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json",
                                                             "x-slo-class": "interactive"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            elapsed = (time.perf_counter() - t0) * 1000.0
            engine_ms = float(resp.headers["x-flowprefill-replica-ttft-ms"])
        client.append(elapsed)
        replica.append(engine_ms)
    return client, replica


async def _open_loop(cfg: RouterBenchConfig, rate: float) -> dict[str, Any]:
    """Send ``rate * step_s`` requests at a fixed rate, whether or not earlier ones finished."""
    import aiohttp

    url, body = f"http://127.0.0.1:{cfg.port}/v1/completions", _body(cfg)
    n = max(1, int(rate * cfg.step_s))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    headers = {"content-type": "application/json", "x-slo-class": "interactive"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
                        return
                latencies.append((time.perf_counter() - t0) * 1000.0)
            except Exception as exc:  # counted, never fatal
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        start = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        sent_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
        total_s = time.perf_counter() - start
    ok = len(latencies)
    p99 = _pct(latencies, 0.99)
    sustained = ok >= cfg.min_success * n and p99 is not None and p99 <= cfg.latency_budget_ms
    return {"rate": rate, "sent": n, "ok": ok, "errors": errors, "send_s": sent_s, "total_s": total_s,
            "achieved_rps": ok / total_s if total_s > 0 else 0.0, "latency_ms": _summary(latencies),
            "sustained": sustained}


def _router_stats(cfg: RouterBenchConfig) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{cfg.port}/v1/router/stats", timeout=30) as resp:
        return json.loads(resp.read())


def run_router_bench(cfg: RouterBenchConfig, stack: ServingStack) -> dict[str, Any]:
    """Start Redis, Ray and the app, measure, shut everything down; returns the report."""
    import ray

    from state.redis_server import RedisServer

    args = app_args(cfg)
    if cfg.engine == "flowprefill":
        args = stack.prepare(args)
    redis = RedisServer()
    redis.start()
    try:
        stack.start_ray(num_cpus=max(4, int(cfg.replicas * cfg.replica_cpus) + 2))
        try:
            return measure(cfg, stack, args, redis.url)
        finally:
            ray.shutdown()
    finally:
        redis.stop()


def app_args(cfg: RouterBenchConfig) -> dict[str, Any]:
    """The Serve app's ``args`` for ``cfg`` (before placement and profiling)."""
    return {"model_name": MODEL, "num_replicas": cfg.replicas, "replica_cpus": cfg.replica_cpus,
            "router_policy": cfg.router_policy, "namespace": "bench-router", "engine_kind": cfg.engine,
            "engine": dict(cfg.extra_engine)}


def measure(cfg: RouterBenchConfig, stack: ServingStack, args: dict[str, Any], redis_url: str) -> dict[str, Any]:
    """Deploy the app with ``args`` on the Ray this process is connected to, measure, shut Serve down."""
    from ray import serve
    from tqdm import tqdm

    try:
        stack.deploy(args, "127.0.0.1", cfg.port, redis_url, grpc_port=cfg.grpc_port)
        _sequential(cfg, cfg.warmup)
        client, replica = _sequential(cfg, cfg.sequential)
        overhead = [c - r for c, r in zip(client, replica, strict=True)]
        decisions_idle = _router_stats(cfg)
        deploy_floor_app()
        measure_floor(cfg.port, _body(cfg), cfg.warmup)
        floor = measure_floor(cfg.port, _body(cfg), cfg.sequential)
        steps = []
        for rate in tqdm(cfg.rates, desc="open-loop rates", unit="rate"):
            step = asyncio.run(_open_loop(cfg, rate))
            steps.append(step)
            if not step["sustained"]:
                break
        decisions_load = _router_stats(cfg)
    finally:
        serve.shutdown()
    sustained = [s["rate"] for s in steps if s["sustained"]]
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra_engine"},
        "replicas_deployed": args.get("num_replicas", cfg.replicas),
        "router_overhead_ms": _summary(overhead),
        "client_ttft_ms": _summary(client),
        # Serve alone with the same hops (proxy -> ingress -> streaming handle -> back)
        "serve_floor_ms": _summary(floor),
        "router_added_ms_p50": statistics.median(client) - statistics.median(floor),
        "replica_ttft_ms": _summary(replica),
        "routing_decision_ms": decisions_idle["decision_ms"],
        "decisions_idle": decisions_idle.get("decisions"),
        "routing_decision_under_load_ms": decisions_load["decision_ms"],
        # rank_replicas alone on prebuilt indices: the decision's own cost, without the Redis read around it
        "rank_replicas_offline": bench_placement(max(cfg.replicas, 2), 100, iterations=500),
        "redis_fallbacks": decisions_load["redis_fallbacks"],
        "max_rps": max(sustained) if sustained else 0.0,
        "max_achieved_rps": max((s["achieved_rps"] for s in steps if s["sustained"]), default=0.0),
        "rate_steps": steps,
        "targets": {"routing_decision_p99_ms": 2.0, "router_overhead_p50_ms": 10.0},
    }


def print_report(report: dict[str, Any]) -> None:
    """A table of the headline numbers and of each open-loop step."""
    from rich.console import Console
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    nodes = report.get("cluster", {}).get("nodes", 1)
    where = "1 node" if nodes == 1 else f"{nodes} nodes: router on the head, replicas on the workers"
    head = Table(title=f"router bench ({report['config']['engine']} engine, "
                       f"{report.get('replicas_deployed', report['config']['replicas'])} replicas, "
                       f"{report['config']['router_policy']}; {where})")
    for col in ("metric", "p50 ms", "p99 ms", "target"):
        head.add_column(col)
    head.add_row("router overhead", ms(report["router_overhead_ms"]["p50"]), ms(report["router_overhead_ms"]["p99"]),
                 "p50 < 10")
    head.add_row("routing decision (idle)", ms(report["routing_decision_ms"]["p50"]),
                 ms(report["routing_decision_ms"]["p99"]), "p99 < 2")
    head.add_row("routing decision (all)", ms(report["routing_decision_under_load_ms"]["p50"]),
                 ms(report["routing_decision_under_load_ms"]["p99"]), "")
    rank = report["rank_replicas_offline"]
    head.add_row(f"rank_replicas alone ({rank['n_replicas']} replicas x {rank['n_queued']} queued)",
                 ms(rank["median_s"] * 1000), ms(rank["p99_s"] * 1000), "")
    head.add_row("client TTFT", ms(report["client_ttft_ms"]["p50"]), ms(report["client_ttft_ms"]["p99"]), "")
    head.add_row("Serve floor (same hops, no router code)", ms(report["serve_floor_ms"]["p50"]),
                 ms(report["serve_floor_ms"]["p99"]), "")
    head.add_row("router code on top of the floor", ms(report["router_added_ms_p50"]), "", "")
    steps = Table(title=f"open loop: max_rps = {report['max_rps']:g}")
    for col in ("offered rps", "achieved rps", "ok/sent", "p50 ms", "p99 ms", "errors", "sustained"):
        steps.add_column(col)
    for s in report["rate_steps"]:
        steps.add_row(f"{s['rate']:g}", f"{s['achieved_rps']:.1f}", f"{s['ok']}/{s['sent']}",
                      ms(s["latency_ms"]["p50"]), ms(s["latency_ms"]["p99"]),
                      json.dumps(s["errors"]) if s["errors"] else "0",
                      "yes" if s["sustained"] else "no")
    console = Console()
    console.print(head)
    console.print(steps)
