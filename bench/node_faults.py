"""``flowprefill bench faults --nodes N --kill node``: attainment before, during and after losing a node.

The app runs on a local N-node cluster (``ServingStack.start_cluster``: head + N-1 worker raylets
on loopback, one replica per worker node, the router on the head, as tests/test_multinode.py
deploys it) with the model-free ``echo`` engine, which takes a configured time per prompt token
and per output token (asyncio sleeps, no CPU), so the run fits a 2-core machine. Redis is a
private ``redis-server`` on a loopback port that every node reaches.

Streaming requests are sent open loop at ``rate_rps`` for ``3 x phase_s`` seconds; at ``phase_s``
one worker node is SIGKILLed with every process it runs (``LocalCluster.kill_node``: a lost
machine). Requests are grouped by arrival into ``before kill``, ``kill`` (the ``phase_s`` after
it) and ``after kill``, and counted as in :mod:`bench.faults`: accepted, completed, failed with a
clear error (an HTTP status or an SSE error event), lost (no answer ``drain_s`` after the last
arrival, plus every journal entry left once the load is over). Lost must be 0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.faults import COUNTERS, summarize_phases
from bench.loadgen import LoadConfig, LoadRequest, RequestResult, run_load, run_load_sync
from bench.servers import metric_values, metrics_text, router_journal
from bench.stack import NodeCluster, ServingStack

NODE_PHASES = ("before kill", "kill", "after kill")
MODEL = "bench-model"
NAMESPACE = "bench-node-faults"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "


@dataclass(frozen=True)
class NodeFaultConfig:
    """The cluster, the echo replicas' speed, the load and the kill's timing."""

    nodes: int = 3
    rate_rps: float = 4.0
    phase_s: float = 20.0
    drain_s: float = 90.0
    prompt_words: int = 40
    max_tokens: int = 16
    prefill_s_per_1k_tokens: float = 2.0  # echo: ~0.1 s before the first token of a 40-word prompt
    decode_step_s: float = 0.05  # echo: 16 outputs take ~0.8 s, so a few streams are always under way
    slo_class: str = "interactive"
    ttft_slo_s: float = 1.0  # ray_config.yaml's interactive class
    replica_cpus: float = 0.5
    port: int = 8791
    grpc_port: int = 9791
    journal_wait_s: float = 30.0  # after the load: how long the journal may take to drain

    def __post_init__(self) -> None:
        if self.nodes < 3:
            raise ValueError(f"--nodes: a node kill needs the head and two workers (one to kill, one to survive), "
                             f"so at least 3, got {self.nodes}")
        if not self.rate_rps > 0:
            raise ValueError(f"--rate-rps: must be positive, got {self.rate_rps}")
        if not self.phase_s > 0:
            raise ValueError(f"--phase-s: must be positive, got {self.phase_s}")

    def phase_of(self, arrival_s: float) -> str:
        """The phase a request arriving at ``arrival_s`` belongs to."""
        return NODE_PHASES[min(2, max(0, int(arrival_s // self.phase_s)))]


def node_requests(cfg: NodeFaultConfig, count_tokens: Callable[[str], int] | None = None) -> list[LoadRequest]:
    """Evenly spaced requests over ``3 x phase_s``, each prompt unique; ``count_tokens(text)`` sizes them."""
    out = []
    words = (WORDS * (cfg.prompt_words // len(WORDS.split()) + 1)).split()[:cfg.prompt_words]
    for i in range(int(3 * cfg.phase_s * cfg.rate_rps)):
        prompt = f"request {i}: " + " ".join(words)
        tokens = count_tokens(prompt) if count_tokens else len(prompt.split())
        out.append(LoadRequest(arrival_s=i / cfg.rate_rps, prompt=prompt, input_tokens=tokens,
                               max_tokens=cfg.max_tokens, slo_class=cfg.slo_class, priority=0,
                               ttft_slo_s=cfg.ttft_slo_s))
    return out


def ttft_by_phase(cfg: NodeFaultConfig, results: list[RequestResult]) -> dict[str, dict[str, float | None]]:
    """Per phase: p50 / p99 / max TTFT (ms) of the requests that got a first token."""
    out: dict[str, dict[str, float | None]] = {}
    for phase in NODE_PHASES:
        ttfts = sorted(r.ttft_s * 1000.0 for r in results
                       if r.ttft_s is not None and cfg.phase_of(r.arrival_s) == phase)

        def pct(q: float, xs: list[float] = ttfts) -> float | None:
            return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

        out[phase] = {"p50": pct(0.5), "p99": pct(0.99), "max": ttfts[-1] if ttfts else None}
    return out


def format_ttft(ttft: dict[str, dict[str, float | None]]) -> str:
    """One line per phase: the TTFT percentiles (ms)."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return "\n".join(f"  TTFT {phase:<12} p50 {ms(t['p50']):>6} ms  p99 {ms(t['p99']):>6} ms  max {ms(t['max']):>6} ms"
                     for phase, t in ttft.items())


async def _replica_count(redis_url: str) -> int:
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        return len(await state.read_all_replica_states(skip_invalid=True))


async def _journal_entries(redis_url: str) -> int:
    """Entries in Redis's request journal (accepted, not yet answered), read as tests/test_multinode.py does."""
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        return int(await state._redis.hlen(state.keys.journal()))


def _poll(read: Callable[[], int], done: Callable[[int], bool], timeout_s: float, interval_s: float = 0.5) -> int:
    """``read()`` until ``done`` says so or ``timeout_s`` passed; the last value read."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


async def _load_with_kill(cfg: NodeFaultConfig, base: str, requests: list[LoadRequest], cluster: NodeCluster,
                          victim: int, events: list[dict[str, Any]]) -> list[RequestResult]:
    load = asyncio.create_task(run_load(LoadConfig(base, MODEL, drain_s=cfg.drain_s, cancel_missed=False), requests))
    t0 = time.perf_counter()
    await asyncio.sleep(cfg.phase_s)
    await asyncio.to_thread(cluster.kill_node, victim)
    events.append({"t_s": time.perf_counter() - t0, "event": f"worker node {victim} killed (SIGKILL, every process)"})
    results = await load
    events.append({"t_s": time.perf_counter() - t0, "event": "load finished"})
    return results


def run_node_faults(cfg: NodeFaultConfig, stack: ServingStack) -> dict[str, Any]:
    """Start Redis and the cluster, deploy, run the load with the node kill, stop everything; the report."""
    from replicas.model.default_model import prepare_default_model
    from replicas.model.tokenizer import Tokenizer
    from state.redis_server import RedisServer

    model_dir = prepare_default_model()  # the echo engine's tokenizer
    tokenizer = Tokenizer.from_dir(str(model_dir))
    requests = node_requests(cfg, lambda text: len(tokenizer.encode(text)))
    base = f"http://127.0.0.1:{cfg.port}"
    events: list[dict[str, Any]] = []
    with RedisServer() as redis:
        cluster = stack.start_cluster(cfg.nodes)
        try:
            from ray import serve

            placed = cluster.placement_args()
            args = {"model_name": MODEL, "namespace": NAMESPACE, "engine_kind": "echo",
                    "replica_cpus": cfg.replica_cpus, "router_policy": "slo_aware",
                    "engine": {"model": str(model_dir), "prefill_s_per_1k_tokens": cfg.prefill_s_per_1k_tokens,
                               "decode_step_s": cfg.decode_step_s}, **placed}
            try:
                stack.deploy(args, "127.0.0.1", cfg.port, redis.url, grpc_port=cfg.grpc_port)
                replicas = _poll(lambda: asyncio.run(_replica_count(redis.url)),
                                 lambda n: n >= len(cluster.worker_nodes), 120.0)
                warm = LoadConfig(base, MODEL, drain_s=60.0, cancel_missed=False)
                for r in requests[:4]:  # unscored: first-call costs on every hop
                    run_load_sync(warm, [LoadRequest(0.0, f"warm {r.prompt}", r.input_tokens, 2, r.slo_class, 0, 1e9)])
                events.append({"t_s": 0.0, "event": f"{cfg.nodes} nodes, {replicas} replicas in Redis; load starts"})
                victim = cluster.worker_nodes[0]
                results = asyncio.run(_load_with_kill(cfg, base, requests, cluster, victim, events))
                journal_left = _poll(lambda: asyncio.run(_journal_entries(redis.url)), lambda n: n == 0,
                                     cfg.journal_wait_s)
                router_open = int(router_journal(base).get("open_requests", 0))
                events.append({"t_s": events[-1]["t_s"], "event": f"journal: {journal_left} entries in Redis, "
                                                                  f"{router_open} open in the router"})
                replicas_after = asyncio.run(_replica_count(redis.url))
                events.append({"t_s": events[-1]["t_s"], "event": f"replicas left in Redis: {replicas_after}"})
                text = metrics_text(base)
                counters = {name: sum(metric_values(text, name)) for name in COUNTERS}
            finally:
                serve.shutdown()
        finally:
            cluster.close()
    phases = summarize_phases(NODE_PHASES, cfg.phase_of, results, journal_left)
    return {"config": asdict(cfg), "placement": placed, "victim_node": victim, "requests": len(results),
            "events": events, "journal_left": journal_left, "counters": counters, "phases": phases,
            "ttft_ms": ttft_by_phase(cfg, results)}
