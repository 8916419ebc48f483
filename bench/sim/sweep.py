"""``flowprefill bench sim``: goodput per replica for each replica count and router policy.

For each replica count ``N`` the trace is tiled ``N`` times (:func:`bench.sim.workload.cluster_workload`),
so that load grows with ``N``; for each router policy the rate scale is searched as ``bench
policies`` does (steps of 1.5x until attainment crosses 90%, then geometric bisection) and
goodput is the highest rate with at least 90% TTFT attainment. The search for the next ``N``
starts from the previous goodput per replica.

The searches of one router policy form a chain (each starts from the previous goodput), and the
chains of different router policies are independent: they run on ``jobs`` worker processes
(default: one per usable CPU), with the same results as one after another.

``simulated_requests_per_s`` is every simulated request (early-stopped runs count only the
arrivals they reached) divided by the wall time of the whole sweep, workload building, process
start-up and search included; the CPU time of all processes and the machine's load average are
reported next to it.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.rate_search import ATTAINMENT_GOAL, search_rate_scale
from bench.shared_prefix import reusable_fraction
from bench.sim.cluster import ROUTER_POLICIES, ClusterSim, RouterConfig, RunResult, SimSetup
from bench.sim.floor import scheduler_floor
from bench.sim.replica import ExecConfig
from bench.sim.workload import SimWorkload, cluster_workload
from bench.traces import Trace, load_trace
from replicas.cost_profiling import detect_hardware, profile_file_name
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.cost_model import CostModel


@dataclass
class SimBenchConfig:
    """What to simulate (CLI flags of ``flowprefill bench sim``)."""

    trace: str
    replicas: tuple[int, ...] = (1, 4, 16, 64, 256)
    router_policies: tuple[str, ...] = ("slo_aware", "round_robin", "pow2")
    policy: str = "flowprefill"
    profile: str | None = None
    length_scale: float = 1 / 16
    max_output_tokens: int = 4
    window_start_s: float = 0.0
    window_s: float | None = None
    requests_per_replica: int = 60
    max_requests: int = 16000
    chunk_tokens: int = 128
    seed: int = 0
    refine_steps: int = 4
    max_steps: int = 12
    staleness_s: float = 0.0
    boundary_delay_s: float = 0.002
    decode_step_s: float | None = None
    decode_curve: tuple[tuple[int, float], ...] = ()
    exec_time_scale: float = 1.0
    seq_overhead_s: float = 0.0
    early_stop: bool = True
    shed: bool = True
    jobs: int = 0  # worker processes, one router policy each (0: one per usable CPU, at most one per policy)
    prefix_mode: str | None = None  # unique | trace | multiturn (None: trace when the trace has block ids)
    prefix_groups: float = 1.0  # keep this fraction of the prefix groups (bench.shared_prefix.sample_prefix_groups)
    kv_cache_tokens: int | None = None  # each replica's KV pool, in tokens (None: the engine's default pool)

    def __post_init__(self) -> None:
        bad = [p for p in self.router_policies if p not in ROUTER_POLICIES]
        if bad or not self.router_policies:
            raise ValueError(f"--router-policies: unknown {bad}; expected some of {ROUTER_POLICIES}")
        if not self.replicas or min(self.replicas) < 1:
            raise ValueError(f"--replicas: need positive counts, got {self.replicas}")
        if self.jobs < 0:
            raise ValueError(f"--jobs: need 0 (automatic) or a positive count, got {self.jobs}")


def default_profile_path() -> Path:
    """The cached CPU profile of the default model on this machine, with the compute threads a
    replica uses by default (every usable core): what ``serve`` would use."""
    from replicas.engine_config import usable_cores
    from replicas.model.default_model import MODEL_NAME

    root = Path(os.environ.get("FLOWPREFILL_CACHE", Path.home() / ".cache" / "flowprefill"))
    return root / "profiles" / profile_file_name(MODEL_NAME, "float32", "cpu", detect_hardware("cpu"), usable_cores())


def load_profile(path: str | None) -> tuple[CostModel, str]:
    """``--profile FILE`` (any saved cost model, CPU or GPU), else the cached default, else profile now."""
    if path is not None:
        return CostModel.load(path), str(path)
    cached = default_profile_path()
    if cached.is_file():
        return CostModel.load(cached), str(cached)
    import torch

    from replicas.engine_config import usable_cores
    from replicas.model.decoder import DecoderModel
    from replicas.model.default_model import prepare_default_model
    from replicas.profiling import load_or_profile, profile_cache_path

    torch.set_num_threads(usable_cores())  # as a replica runs by default (the profile's name says so)
    model = DecoderModel.load(prepare_default_model())
    return load_or_profile(model), str(profile_cache_path(model))


def default_kv_cache_tokens(block_size: int = 16) -> int:
    """Tokens the engine's default KV pool (``EngineConfig.kv_cache_bytes``, float32) holds for the
    default model: what a simulated replica's prefix cache may hold by default."""
    from replicas.engine_config import EngineConfig
    from replicas.model.config import ModelConfig
    from replicas.model.default_model import prepare_default_model

    c = ModelConfig.from_dir(prepare_default_model())
    per_block = 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * 4
    return EngineConfig().kv_cache_bytes // per_block * block_size


def prepare_trace(cfg: SimBenchConfig) -> tuple[Trace, str]:
    """The trace as ``--prefix-mode`` replays it (block ids kept, dropped or generated), and the mode."""
    from bench.shared_prefix import apply_prefix_mode, resolve_prefix_mode, sample_prefix_groups  # noqa: I001

    trace = load_trace(cfg.trace)
    mode = resolve_prefix_mode(cfg.prefix_mode, trace)
    trace = apply_prefix_mode(trace, mode)
    if cfg.prefix_groups < 1.0:
        trace = sample_prefix_groups(trace, cfg.prefix_groups, cfg.seed)
    return trace, mode


def sched_config(policy: str, length_scale: float, chunk_tokens: int) -> SchedulerConfig:
    """Scheduler settings as ``bench.policy_bench.policy_configs`` sets them for the engine (lengths scaled)."""
    f = length_scale
    return SchedulerConfig(policy=policy, short_threshold=max(int(2048 * f), 1),
                           batch_token_budget=max(int(8192 * f), 1), chunk_tokens=chunk_tokens,
                           granularity="block" if policy == "flowprefill" else "none")


def summarize_run(wl: SimWorkload, run: RunResult, scale: float) -> dict[str, Any]:
    """One measured point (JSON-ready)."""
    finite = np.array([v for v in run.ttft_s if v is not None], dtype=np.float64)
    p50, p90 = (np.percentile(finite, [50, 90]) if finite.size else (np.nan, np.nan))
    return {
        "scale": scale, "rate_rps": scale * wl.rate_rps, "rate_per_replica": scale * wl.rate_rps / wl.copies,
        "attainment": run.attainment, "stopped_early": run.stopped_early, "requests": len(wl),
        "simulated": run.simulated, "ttft_p50_s": None if np.isnan(p50) else float(p50),
        "ttft_p90_s": None if np.isnan(p90) else float(p90), "shed": run.shed, "preemptions": run.preemptions,
        "decode_steps": run.decode_steps, "wall_s": run.wall_s,
        "prefix_hit_rate": run.prefix_hit_tokens / run.prefix_queried_tokens if run.prefix_queried_tokens else None,
    }


def find_goodput(sim: ClusterSim, wl: SimWorkload, start: float, cfg: SimBenchConfig,
                 on_point: Callable[[float, float], None] | None = None) -> dict[str, Any]:
    """Search the rate scale (see the module docstring); returns goodput and every point.
    ``on_point(scale, attainment)`` is called after every simulated run."""
    points: dict[float, dict[str, Any]] = {}

    def measure(scale: float) -> float:
        run = sim.run(wl, scale, stop_below=ATTAINMENT_GOAL if cfg.early_stop else None)
        points[scale] = summarize_run(wl, run, scale)
        if on_point is not None:
            on_point(scale, run.attainment)
        return run.attainment

    good, bad = search_rate_scale(measure, start, max_steps=cfg.max_steps, refine_steps=cfg.refine_steps)
    goodput = good * wl.rate_rps
    return {"replicas": wl.copies, "goodput_scale": good, "goodput": goodput,
            "goodput_per_replica": goodput / wl.copies, "requests": len(wl), "window_s": wl.span_s,
            "bracket": bad / good if good and bad else None,  # lowest failing / goodput scale: the resolution
            "points": [points[k] for k in sorted(points)]}


Progress = Callable[[str, int, float | None, float | None], None]  # (router policy, replicas, scale, attainment)


class _BarProgress:
    """Shows a chain's progress on the sweep's bar: a point (scale and attainment) or a finished search (None)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def report(self, rp: str, n: int, scale: float | None, attainment: float | None) -> None:
        if scale is None:
            self.bar.update(1)
        else:
            self.bar.set_description(f"bench sim N={n} {rp}")
            self.bar.set_postfix(scale=f"{scale:.3g}", attain=f"{attainment:.3f}")


def _policy_chain(cfg: SimBenchConfig, cost: CostModel, trace: Trace, rp: str, workloads: dict[int, SimWorkload],
                  progress: Progress) -> tuple[list[dict[str, Any]], float]:
    """The goodput search of router policy ``rp`` at every replica count, in order (a search starts
    from the previous count's goodput per replica); returns the results and the CPU seconds taken.
    ``workloads`` caches the tiled workload per replica count (shared by the chains of one process)."""
    cpu0 = time.process_time()
    cache_blocks = (cfg.kv_cache_tokens or 0) // 16 if trace.has_prefixes else 0
    setup_base = dict(cost=cost, sched=sched_config(cfg.policy, cfg.length_scale, cfg.chunk_tokens),
                      exec=ExecConfig(boundary_delay_s=cfg.boundary_delay_s, decode_step_s=cfg.decode_step_s,
                                      decode_curve=cfg.decode_curve, cache_blocks=cache_blocks,
                                      exec_time_scale=cfg.exec_time_scale, seq_overhead_s=cfg.seq_overhead_s))
    results: list[dict[str, Any]] = []
    prev_scale: float | None = None
    gc_was = gc.isenabled()
    gc.disable()  # the simulation allocates many short-lived objects and no cycles worth collecting mid-run
    try:
        for n in cfg.replicas:
            wl = workloads.get(n)
            if wl is None:
                wl = workloads[n] = cluster_workload(
                    trace, cost.predict, n, window_start_s=cfg.window_start_s, window_s=cfg.window_s,
                    requests_per_copy=cfg.requests_per_replica, max_requests=cfg.max_requests,
                    length_scale=cfg.length_scale, max_output_tokens=cfg.max_output_tokens, seed=cfg.seed)
            router = RouterConfig(policy=rp, staleness_s=cfg.staleness_s, shed=cfg.shed, seed=cfg.seed)
            sim = ClusterSim(SimSetup(router=router, **setup_base), n)  # type: ignore[arg-type]
            start = prev_scale or 0.5 / max(wl.work_s / (n * wl.span_s), 1e-12)
            res = find_goodput(sim, wl, start, cfg, lambda scale, att, n=n: progress(rp, n, scale, att))
            res["router_policy"] = rp
            prev_scale = res["goodput_scale"] or prev_scale
            results.append(res)
            progress(rp, n, None, None)
            gc.collect()
    finally:
        if gc_was:
            gc.enable()
    return results, time.process_time() - cpu0


_worker_queue: Any = None  # the progress queue of a worker process


def _init_worker(queue: Any) -> None:  # noqa: ANN401 - a multiprocessing queue
    global _worker_queue
    _worker_queue = queue


def _queue_progress(rp: str, n: int, scale: float | None, attainment: float | None) -> None:
    _worker_queue.put((rp, n, scale, attainment))


def _chain_in_worker(cfg: SimBenchConfig, cost: CostModel, trace: Trace,
                     rp: str) -> tuple[list[dict[str, Any]], float]:
    return _policy_chain(cfg, cost, trace, rp, {}, _queue_progress)


def _parallel_chains(cfg: SimBenchConfig, cost: CostModel, trace: Trace, jobs: int,
                     bar: tqdm) -> list[tuple[list[dict[str, Any]], float]]:
    """Every router policy's chain on ``jobs`` fresh (spawned) processes, relaying their progress to ``bar``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    show = _BarProgress(bar)
    # The slowest chain first, so that it never starts last: slo_aware ranks every replica per request.
    slow_first = sorted(cfg.router_policies, key=lambda rp: rp not in ("slo_aware", "least_loaded"))
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
        futures = {rp: pool.submit(_chain_in_worker, cfg, cost, trace, rp) for rp in slow_first}
        pending = set(futures.values())
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while True:
                try:
                    show.report(*queue.get_nowait())
                except Empty:
                    break
            for f in done:
                f.result()  # a failed chain stops the sweep with its error
        return [futures[rp].result() for rp in cfg.router_policies]


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_sweep(cfg: SimBenchConfig) -> dict[str, Any]:
    """Every (replica count, router policy) pair; returns the JSON report.

    Each router policy's searches form a chain over the replica counts (a search starts from the
    previous goodput), so chains run in parallel on ``cfg.jobs`` worker processes with the same
    results as one after another.
    """
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    cost, profile_src = load_profile(cfg.profile)
    trace, mode = prepare_trace(cfg)
    if trace.has_prefixes and cfg.kv_cache_tokens is None:
        cfg = replace(cfg, kv_cache_tokens=default_kv_cache_tokens())
    jobs = min(cfg.jobs or usable_cpus(), len(cfg.router_policies))
    with tqdm(total=len(cfg.replicas) * len(cfg.router_policies), desc="bench sim", unit="search") as bar:
        if jobs <= 1:
            workloads: dict[int, SimWorkload] = {}
            chains = [_policy_chain(cfg, cost, trace, rp, workloads, _BarProgress(bar).report)
                      for rp in cfg.router_policies]
        else:
            chains = _parallel_chains(cfg, cost, trace, jobs, bar)
    order = [(n, rp) for n in cfg.replicas for rp in cfg.router_policies]  # the table's order
    results = sorted((r for chain, _ in chains for r in chain),
                     key=lambda r: order.index((r["replicas"], r["router_policy"])))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0 + (sum(c for _, c in chains) if jobs > 1 else 0.0)
    simulated = sum(p["simulated"] for r in results for p in r["points"])
    floor = scheduler_floor(cost, sched_config(cfg.policy, cfg.length_scale, cfg.chunk_tokens))
    report = {
        "trace": cfg.trace, "profile": profile_src, "cost_model": {"model": cost.model, "device": cost.device,
                                                                   "hardware": cost.hardware},
        "config": asdict(cfg), "prefix_mode": mode, "reusable_fraction": reusable_fraction(trace),
        "results": results, "simulated_requests": simulated, "wall_s": wall, "cpu_s": cpu,
        "jobs": jobs, "simulated_requests_per_s": simulated / wall,
        "simulated_requests_per_cpu_s": simulated / max(cpu, 1e-9),
        "load_average": [load0, os.getloadavg()[0]], "speed_by_router_policy": _speeds(results),
        "scheduler_floor_requests_per_s": floor["requests_per_s"],
    }
    print_table(report)
    return report


def _speeds(results: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for r in results:
        acc = out.setdefault(r["router_policy"], [0.0, 0.0])
        acc[0] += sum(p["simulated"] for p in r["points"])
        acc[1] += sum(p["wall_s"] for p in r["points"])
    return {k: n / max(s, 1e-9) for k, (n, s) in out.items()}


def print_table(report: dict[str, Any]) -> None:
    """Goodput per replica (req/s) per replica count and router policy, then the simulator's speed."""
    rows = report["results"]
    policies = list(dict.fromkeys(r["router_policy"] for r in rows))
    counts = list(dict.fromkeys(r["replicas"] for r in rows))
    cell = {(r["replicas"], r["router_policy"]): r for r in rows}
    cfg = report["config"]
    print(f"\n{Path(report['trace']).name}: policy {cfg['policy']}, lengths x{cfg['length_scale']:g}, "
          f"profile {report['cost_model']['model']} on {report['cost_model']['hardware']}")
    if report.get("prefix_mode") not in (None, "unique"):
        print(f"prefix mode {report['prefix_mode']}: {report['reusable_fraction']:.0%} of prompt tokens reusable "
              f"(unbounded cache); replicas' KV pools of {cfg['kv_cache_tokens']:,} tokens each. Prefix-cache hit rate "
              "at the goodput point in brackets")
    print("goodput per replica, req/s (cluster goodput in parentheses)")
    print(f"{'replicas':>8} {'requests':>9} " + " ".join(f"{p:>22}" for p in policies))
    for n in counts:
        reqs = next(cell[(n, p)]["requests"] for p in policies if (n, p) in cell)
        vals = []
        for p in policies:
            r = cell.get((n, p))
            hit = _hit_at_goodput(r) if r else None
            text = f"{r['goodput_per_replica']:>9.3f} ({r['goodput']:>9.2f})" if r else "-"
            vals.append(text + (f" [{hit:.0%}]" if hit is not None else ""))
        width = 28 if report.get("prefix_mode") not in (None, "unique") else 22
        print(f"{n:>8} {reqs:>9} " + " ".join(f"{v:>{width}}" for v in vals))
    brackets = [r["bracket"] for r in rows if r.get("bracket")]
    if brackets:
        print(f"search resolution: each goodput is within {max(brackets) - 1:.1%} below the lowest failing rate, "
              f"so goodputs that close are ties")
    speeds = " ".join(f"{k}={v:,.0f}" for k, v in report["speed_by_router_policy"].items())
    print(f"simulated {report['simulated_requests']:,} requests in {report['wall_s']:.1f} s wall on "
          f"{report.get('jobs', 1)} process(es) ({report['cpu_s']:.1f} s CPU): "
          f"{report['simulated_requests_per_s']:,.0f} req/s "
          f"({report['simulated_requests_per_cpu_s']:,.0f} per CPU s); per router policy (runs only): {speeds}; "
          f"load average {report['load_average'][0]:.1f} -> {report['load_average'][1]:.1f}")
    floor = report.get("scheduler_floor_requests_per_s")
    if floor:
        print(f"the real scheduler alone, one request at a time on an idle replica (bench.sim.floor): {floor:,.0f} "
              f"req/s per process, a bound on this simulator's speed per process")


def _hit_at_goodput(result: dict[str, Any]) -> float | None:
    """The prefix-cache hit rate of the run at the goodput scale (None without a cache)."""
    at = [p for p in result["points"] if p["scale"] == result["goodput_scale"]]
    return at[0].get("prefix_hit_rate") if at else None


def plot_goodput(report: dict[str, Any], path: str | Path) -> None:
    """Goodput per replica against the replica count, one line per router policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_policy: dict[str, list[tuple[int, float]]] = {}
    for r in report["results"]:
        by_policy.setdefault(r["router_policy"], []).append((r["replicas"], r["goodput_per_replica"]))
    for name, pts in by_policy.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("replicas")
    ax.set_ylabel("goodput per replica (req/s, >= 90% TTFT attainment)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{Path(report['trace']).name}: simulated, policy {report['config']['policy']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
