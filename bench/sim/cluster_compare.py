"""The simulator's goodput beside a measured multi-node cluster's, in one run of one command.

``flowprefill bench sim --validate --nodes N --trace PATH`` starts a private Redis and a local
N-node Ray cluster (``ServingStack.start_cluster``: the head and N-1 worker raylets on loopback,
one FlowPrefill replica on each worker node, the router on the head, as ``bench router --nodes``
and ``bench faults --nodes`` deploy it), with the real engine (SmolLM2, one compute thread per
replica, its TTFT profile measured for that thread count by ``ServingStack.prepare``, up to
``PROFILE_MAX_TOKENS``).

The workload is ``bench serve``'s (:func:`bench.serve_bench.build_requests`: the trace window,
lengths scaled, the server's SLO classes from ``ray_config.yaml``, seeded). The simulator gets
the same requests (arrival, prompt tokens, output tokens, class, SLO) as the same number of
replicas, with the replicas' own cost profile and engine settings
(:func:`bench.sim.validate.scheduler_config_of`, :func:`~bench.sim.validate.exec_config_of`, as
``bench sim --validate`` builds them for one in-process replica) behind the same router policy.

Both goodputs come from :func:`bench.rate_search.find_goodput` on one grid: the simulated search
runs first from 60% of the predicted prefill capacity, and the measured one starts at the
simulated goodput (fewer real replays near the answer; its grid is the same). Every measured rate
is paired with the simulated attainment at that rate (:func:`pair_points`), so the table shows
where the two agree on meeting the 90% goal and where they part.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bench.rate_search import ATTAINMENT_GOAL, GoodputSearch, find_goodput
from bench.sim.cluster import ClusterSim, RouterConfig, SimSetup
from bench.sim.validate import exec_config_of, scheduler_config_of
from bench.sim.workload import SimWorkload, explicit_workload

if TYPE_CHECKING:
    from bench.loadgen import LoadRequest
    from bench.stack import ServingStack
    from router.slo import SLOClass

NAMESPACE = "bench-sim-nodes"
PROFILE_MAX_TOKENS = 1024  # the replicas' profile: twice the longest prompt at the default 1/16 lengths (465)


@dataclass(frozen=True)
class ClusterCompareConfig:
    """The cluster, the trace window (as ``bench serve`` takes it) and the two searches."""

    trace: str
    nodes: int = 3
    window_start_s: float = 29.0
    window_s: float | None = None
    requests: int = 24
    length_scale: float = 1 / 16
    max_output_tokens: int = 4
    seed: int = 0
    max_runs: int = 5
    refine_steps: int = 1
    repeats: int = 1
    boundary_delay_s: float = 0.002
    drain_s: float = 60.0
    port: int = 8795
    grpc_port: int = 9795

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise ValueError(f"--nodes: the head and at least one worker node, so at least 2, got {self.nodes}")
        if self.requests < 2:
            raise ValueError(f"--validate-requests: need at least 2 requests, got {self.requests}")
        if self.max_runs < 1 or self.repeats < 1:
            raise ValueError(f"max_runs and repeats: need at least 1, got {self.max_runs}, {self.repeats}")


def sim_workload(requests: Sequence[LoadRequest], classes: Sequence[SLOClass],
                 predict: Callable[[int], float]) -> SimWorkload:
    """The measured run's requests (rate scale 1) as the simulator's workload: same arrivals,
    prompt lengths, output tokens, classes, priorities, TTFT SLOs and sheddability, same order."""
    by_name = {c.name: c for c in classes}
    missing = sorted({r.slo_class for r in requests} - set(by_name))
    if missing:
        raise ValueError(f"slo classes: requests name {missing}, not among {sorted(by_name)}")
    return explicit_workload([r.arrival_s for r in requests], [r.input_tokens for r in requests],
                             [r.ttft_slo_s for r in requests], predict, max_tokens=[r.max_tokens for r in requests],
                             priority=[r.priority for r in requests], slo_class=[r.slo_class for r in requests],
                             sheddable=[by_name[r.slo_class].sheddable for r in requests],
                             span_s=requests[-1].arrival_s - requests[0].arrival_s)


def pair_points(measured: GoodputSearch, simulate: Callable[[float], float], base_rate: float,
                replicas: int) -> list[dict[str, Any]]:
    """One row per measured rate scale: the measured attainment (median of its runs, and the runs),
    the simulated attainment at the same scale, and whether both are on the same side of the goal."""
    rows = []
    for scale in sorted(measured.runs):
        real = measured.median(scale)
        sim = simulate(scale)
        rows.append({"scale": scale, "rate_rps": scale * base_rate, "rate_per_replica": scale * base_rate / replicas,
                     "measured_attainment": real, "measured_runs": list(measured.runs[scale]),
                     "simulated_attainment": sim, "agree": (real >= ATTAINMENT_GOAL) == (sim >= ATTAINMENT_GOAL)})
    return rows


def goodput_row(label: str, search: GoodputSearch, base_rate: float, replicas: int) -> dict[str, Any]:
    """A goodput search as the table's row: cluster and per-replica goodput, and the next failing rate."""
    return {"label": label, "goodput_rps": search.good * base_rate,
            "goodput_per_replica": search.good * base_rate / replicas, "goodput_scale": search.good,
            "next_failing_rps": None if search.bad is None else search.bad * base_rate, "runs": len(search.runs)}


def format_comparison(report: dict[str, Any]) -> str:
    """One table: simulated and measured goodput for the same replicas, then every measured rate paired."""
    n = report["replicas"]

    def num(v: float | None, fmt: str = ".3f") -> str:
        return "-" if v is None else format(v, fmt)

    sim, real = report["simulated"], report["measured"]
    ratio = sim["goodput_rps"] / real["goodput_rps"] if real["goodput_rps"] else None
    lines = [f"{report['nodes']} nodes, {n} replicas (one per worker node), {report['requests']} requests of "
             f"{report['trace_name']}; goodput at >= 90% TTFT attainment",
             f"{'':<10} {'goodput req/s':>14} {'per replica':>12} {'next failing':>13} {'runs':>5}"]
    for row in (real, sim):
        lines.append(f"{row['label']:<10} {num(row['goodput_rps']):>14} {num(row['goodput_per_replica']):>12} "
                     f"{num(row['next_failing_rps']):>13} {row['runs']:>5}")
    lines.append(f"{'sim/real':<10} {num(ratio, '.2f'):>14}")
    lines.append(f"{'rate req/s':>10} {'per replica':>12} {'measured':>9} {'simulated':>10} {'same side of 90%':>17}")
    for p in report["pairs"]:
        lines.append(f"{p['rate_rps']:>10.3f} {p['rate_per_replica']:>12.3f} {p['measured_attainment']:>9.3f} "
                     f"{p['simulated_attainment']:>10.3f} {'yes' if p['agree'] else 'NO':>17}")
    return "\n".join(lines)


async def _replicas_in_redis(redis_url: str) -> int:
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        return len(await state.read_all_replica_states(skip_invalid=True))


def _wait_for_replicas(redis_url: str, want: int, timeout_s: float = 180.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        have = asyncio.run(_replicas_in_redis(redis_url))
        if have >= want or time.monotonic() > deadline:
            return have
        time.sleep(1.0)


def run_cluster_compare(cfg: ClusterCompareConfig, stack: ServingStack) -> dict[str, Any]:
    """Measure the cluster's goodput and simulate it (see the module docstring); returns the report."""
    from pathlib import Path

    from tqdm import tqdm

    from bench.loadgen import LoadConfig, run_load_sync, summarize
    from bench.serve_bench import at_scale, build_requests, engine_overrides, warm_up
    from bench.serve_config import ServeBenchConfig, slo_classes
    from replicas.engine_config import EngineConfig
    from replicas.model.default_model import prepare_default_model
    from replicas.model.tokenizer import Tokenizer
    from replicas.scheduler.cost_model import CostModel
    from state.redis_server import RedisServer

    model_dir = prepare_default_model()
    classes = slo_classes()
    scfg = ServeBenchConfig(trace=cfg.trace, systems=("flowprefill",), window_start_s=cfg.window_start_s,
                            window_s=cfg.window_s, max_requests=cfg.requests, length_scale=cfg.length_scale,
                            max_output_tokens=cfg.max_output_tokens, seed=cfg.seed)
    requests = build_requests(scfg, Tokenizer.from_dir(str(model_dir)), classes)
    base_rate = len(requests) / requests[-1].arrival_s
    app = stack.app_args()
    with RedisServer() as redis:
        cluster = stack.start_cluster(cfg.nodes)
        try:
            from ray import serve

            placed = cluster.placement_args()
            replicas = len(cluster.worker_nodes)
            engine = {**(app.get("engine") or {}), **engine_overrides(cfg.length_scale), "model": str(model_dir),
                      "cpu_threads": 1, "profile_max_tokens": PROFILE_MAX_TOKENS}
            args = stack.prepare({**app, "num_replicas": replicas, "namespace": NAMESPACE, "engine": engine, **placed})
            ecfg = EngineConfig.from_dict(args["engine"], prefix="args.engine")
            cost = CostModel.load(ecfg.profile)
            wl = sim_workload(requests, classes, cost.predict)
            sim = ClusterSim(SimSetup(cost, scheduler_config_of(ecfg), exec_config_of(ecfg, cfg.boundary_delay_s),
                                      RouterConfig(policy=args.get("router_policy", "slo_aware"))), replicas)

            def simulate(scale: float) -> float:
                return sim.run(wl, scale).attainment

            start = 0.6 * replicas * wl.span_s / max(wl.work_s, 1e-9)
            simulated = find_goodput(simulate, start, max_runs=2 * cfg.max_runs, refine_steps=cfg.refine_steps + 2)
            try:
                stack.deploy(args, "127.0.0.1", cfg.port, redis.url, grpc_port=cfg.grpc_port)
                seen = _wait_for_replicas(redis.url, replicas)
                if seen < replicas:
                    raise RuntimeError(f"only {seen} of {replicas} replicas registered in Redis within 180 s")
                base = f"http://127.0.0.1:{cfg.port}"
                model_name = args.get("model_name", "SmolLM2-135M-Instruct")
                warm_up(base, model_name, requests)
                load = LoadConfig(base, model_name, drain_s=cfg.drain_s)
                results: dict[float, list[dict[str, Any]]] = {}
                with tqdm(desc="bench sim --nodes: measured rates", unit="run") as bar:
                    def measure(scale: float) -> float:
                        bar.set_postfix(rate=f"{scale * base_rate:.2f}")
                        summary = summarize(run_load_sync(load, at_scale(requests, scale)))
                        results.setdefault(scale, []).append(summary)
                        bar.update(1)
                        time.sleep(1.0)  # cancelled requests leave the server before the next run
                        return summary["attainment"]

                    measured = find_goodput(measure, simulated.good or start, max_runs=cfg.max_runs,
                                            refine_steps=cfg.refine_steps, repeats=cfg.repeats)
            finally:
                serve.shutdown()
        finally:
            cluster.close()
    report = {
        "config": asdict(cfg), "trace_name": Path(cfg.trace).name, "nodes": cfg.nodes, "replicas": replicas,
        "requests": len(requests), "base_rate_rps": base_rate, "placement": placed,
        "profile": {"path": ecfg.profile, "model": cost.model, "hardware": cost.hardware, "fit_error": cost.fit_error},
        "measured": goodput_row("measured", measured, base_rate, replicas),
        "simulated": goodput_row("simulated", simulated, base_rate, replicas),
        "pairs": pair_points(measured, simulate, base_rate, replicas),
        "simulated_points": {str(s): v for s, v in sorted(simulated.runs.items())},
        "measured_summaries": {str(s): [{k: v for k, v in x.items() if k != "error_kinds"} for x in runs]
                               for s, runs in sorted(results.items())},
    }
    print(format_comparison(report))
    return report


__all__ = ["ClusterCompareConfig", "format_comparison", "goodput_row", "pair_points",
           "run_cluster_compare", "sim_workload"]
