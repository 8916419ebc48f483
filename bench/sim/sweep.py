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
from dataclasses import asdict, replace
from queue import Empty
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.rate_search import ATTAINMENT_GOAL, search_rate_scale
from bench.shared_prefix import reusable_fraction
from bench.sim.cluster import ClusterSim, RouterConfig, RunResult, SimSetup
from bench.sim.exec_model import ExecConfig, decode_curve_seconds, decode_token_seconds
from bench.sim.floor import scheduler_floor
from bench.sim.kv_transfer import (
    model_kv_bytes_per_token,
)
from bench.sim.pd import PDConfig, split_replicas
from bench.sim.sweep_config import (
    SimBenchConfig,
    chain_label,
    default_kv_cache_tokens,
    load_profile,
    prepare_trace,
    sched_config,
)
from bench.sim.sweep_report import plot_goodput, print_table, series_of, speeds
from bench.sim.workload import SimWorkload, cluster_workload
from bench.slo_classes import DEFAULT_REF_TOKENS
from bench.traces import Trace
from replicas.scheduler.cost_model import CostModel

__all__ = ["find_goodput", "plot_goodput", "print_table", "run_sweep"]
TPOT_MULTIPLE = 5.0  # a P/D sweep's default TPOT SLO: this many batch-1 decode steps


def summarize_run(wl: SimWorkload, run: RunResult, scale: float) -> dict[str, Any]:
    """One measured point (JSON-ready)."""
    finite = np.array([v for v in run.ttft_s if v is not None], dtype=np.float64)
    p50, p90 = (np.percentile(finite, [50, 90]) if finite.size else (np.nan, np.nan))
    return {
        "scale": scale, "rate_rps": scale * wl.rate_rps, "rate_per_replica": scale * wl.rate_rps / wl.copies,
        "attainment": run.attainment, "stopped_early": run.stopped_early, "requests": len(wl),
        "simulated": run.simulated, "ttft_p50_s": None if np.isnan(p50) else float(p50),
        "ttft_p90_s": None if np.isnan(p90) else float(p90), "shed": run.shed, "preemptions": run.preemptions,
        "decode_steps": run.decode_steps, "wall_s": run.wall_s, "handovers": run.handovers,
        **_tpot_percentiles(run),
        "prefix_hit_rate": run.prefix_hit_tokens / run.prefix_queried_tokens if run.prefix_queried_tokens else None,
    }


def _tpot_percentiles(run: RunResult) -> dict[str, float | None]:
    tpots = [v for v in run.tpot_s if v is not None]
    if not tpots:
        return {"tpot_p50_s": None, "tpot_p90_s": None}
    p50, p90 = np.percentile(np.asarray(tpots, dtype=np.float64), [50, 90])
    return {"tpot_p50_s": float(p50), "tpot_p90_s": float(p90)}


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


Progress = Callable[[str, int, float | None, float | None], None]  # (column, replicas, scale, attainment)
Chain = tuple[str, "tuple[int, int] | None"]  # (router policy, P:D ratio or None: colocated)


class _BarProgress:
    """Shows a chain's progress on the sweep's bar: a point (scale and attainment) or a finished search (None)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def report(self, label: str, n: int, scale: float | None, attainment: float | None) -> None:
        if scale is None:
            self.bar.update(1)
        else:
            self.bar.set_description(f"bench sim N={n} {label}")
            self.bar.set_postfix(scale=f"{scale:.3g}", attain=f"{attainment:.3f}")


def _policy_chain(cfg: SimBenchConfig, cost: CostModel, trace: Trace, chain: Chain, workloads: dict[int, SimWorkload],
                  progress: Progress) -> tuple[list[dict[str, Any]], float]:
    """The goodput search of one column (a router policy, colocated or at a P:D ratio) at every replica
    count, in order (a search starts from the previous count's goodput per replica); returns the
    results and the CPU seconds taken. ``workloads`` caches the tiled workload per replica count
    (shared by the chains of one process)."""
    cpu0 = time.process_time()
    rp, ratio = chain
    label = chain_label(cfg, chain)
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
                    length_scale=cfg.length_scale, max_output_tokens=cfg.max_output_tokens, seed=cfg.seed,
                    tpot_slo_s=cfg.tpot_slo_s)
            router = RouterConfig(policy=rp, staleness_s=cfg.staleness_s, shed=cfg.shed, seed=cfg.seed)
            pd = None if ratio is None else PDConfig(*split_replicas(n, ratio), cfg.transfer, cfg.pd_first_token)
            sim = ClusterSim(SimSetup(router=router, pd=pd, **setup_base), n)  # type: ignore[arg-type]
            start = prev_scale or 0.5 / max(wl.work_s / (n * wl.span_s), 1e-12)
            res = find_goodput(sim, wl, start, cfg, lambda scale, att, n=n: progress(label, n, scale, att))
            res["router_policy"] = rp
            if cfg.pd_ratios:
                res["series"] = label
                res["pd"] = None if pd is None else {"prefill": pd.prefill, "decode": pd.decode}
            prev_scale = res["goodput_scale"] or prev_scale
            results.append(res)
            progress(label, n, None, None)
            gc.collect()
    finally:
        if gc_was:
            gc.enable()
    return results, time.process_time() - cpu0


_worker_queue: Any = None  # the progress queue of a worker process


def _init_worker(queue: Any) -> None:  # noqa: ANN401 - a multiprocessing queue
    global _worker_queue
    _worker_queue = queue


def _queue_progress(label: str, n: int, scale: float | None, attainment: float | None) -> None:
    _worker_queue.put((label, n, scale, attainment))


def _chain_in_worker(cfg: SimBenchConfig, cost: CostModel, trace: Trace,
                     chain: Chain) -> tuple[list[dict[str, Any]], float]:
    return _policy_chain(cfg, cost, trace, chain, {}, _queue_progress)


def _parallel_chains(cfg: SimBenchConfig, cost: CostModel, trace: Trace, jobs: int,
                     bar: tqdm) -> list[tuple[list[dict[str, Any]], float]]:
    """Every column's chain on ``jobs`` fresh (spawned) processes, relaying their progress to ``bar``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    show = _BarProgress(bar)
    # The slowest chain first, so that it never starts last: slo_aware ranks every replica per request.
    slow_first = sorted(cfg.chains, key=lambda c: c[0] not in ("slo_aware", "least_loaded"))
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
        futures = {c: pool.submit(_chain_in_worker, cfg, cost, trace, c) for c in slow_first}
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
        return [futures[c].result() for c in cfg.chains]


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_pd(cfg: SimBenchConfig, cost: CostModel) -> tuple[SimBenchConfig, dict[str, Any] | None]:
    """A P/D sweep's defaults filled in (KV bytes per token from the model config at the profile's
    dtype, the TPOT SLO), and what the report says about them (None: not a P/D sweep)."""
    if not cfg.pd_ratios:
        return cfg, None
    if cfg.kv_bytes_per_token is None:
        from replicas.model.default_model import MODEL_NAME, prepare_default_model

        if cfg.pd_model is None and cost.model not in ("", MODEL_NAME):
            raise ValueError(f"--kv-bytes-per-token or --pd-model: the profile's model {cost.model!r} is not the "
                             f"default model, whose config gives the KV bytes per token otherwise")
        model_dir = cfg.pd_model or prepare_default_model()
        cfg = replace(cfg, kv_bytes_per_token=model_kv_bytes_per_token(model_dir, cost.dtype or "float32"))
    step_1 = batch_one_step_s(cfg, cost)
    if cfg.tpot_slo_s is None:
        cfg = replace(cfg, tpot_slo_s=TPOT_MULTIPLE * step_1)
    t = cfg.transfer
    decode_model = (f"fixed {cfg.decode_step_s * 1e3:.0f} ms" if cfg.decode_step_s is not None else
                    "curve " + ", ".join(f"{k}: {v * 1e3:.0f} ms" for k, v in cfg.decode_curve) if cfg.decode_curve
                    else "cost model's marginal token") + f" (batch 1: {step_1 * 1e3:.0f} ms)"
    return cfg, {"router_policy": cfg.router_policies[0], "tpot_slo_s": cfg.tpot_slo_s, "decode_model": decode_model,
                 "first_token": cfg.pd_first_token, "kv_bytes_per_token": t.bytes_per_token,
                 "transfer": f"{t.latency_s * 1e3:.0f} ms + {t.bytes_per_token:,} B/token at "
                             f"{t.bandwidth_bytes_per_s / 1e6:,.0f} MB/s",
                 "splits": {n: {chain_label(cfg, c): split_replicas(n, c[1]) for c in cfg.chains if c[1]}
                            for n in cfg.replicas}}


def batch_one_step_s(cfg: SimBenchConfig, cost: CostModel) -> float:
    """A decode step of one sequence as the simulated replicas charge it (at the reference prompt length)."""
    if cfg.decode_step_s is not None:
        return cfg.decode_step_s
    if cfg.decode_curve:
        return decode_curve_seconds(cfg.decode_curve, 1)
    ref = max(int(DEFAULT_REF_TOKENS * cfg.length_scale), 1)
    return (cost.a + decode_token_seconds(cost, ref)) * cfg.exec_time_scale


def run_sweep(cfg: SimBenchConfig) -> dict[str, Any]:
    """Every (replica count, column) pair; returns the JSON report. A column is a router policy, or
    in a P/D sweep (``pd_ratios``) colocated or one P:D split.

    Each column's searches form a chain over the replica counts (a search starts from the
    previous goodput), so chains run in parallel on ``cfg.jobs`` worker processes with the same
    results as one after another.
    """
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    cost, profile_src = load_profile(cfg.profile)
    cfg, pd_info = resolve_pd(cfg, cost)
    trace, mode = prepare_trace(cfg)
    if trace.has_prefixes and cfg.kv_cache_tokens is None:
        cfg = replace(cfg, kv_cache_tokens=default_kv_cache_tokens())
    chains = cfg.chains
    jobs = min(cfg.jobs or usable_cpus(), len(chains))
    with tqdm(total=len(cfg.replicas) * len(chains), desc="bench sim", unit="search") as bar:
        if jobs <= 1:
            workloads: dict[int, SimWorkload] = {}
            done = [_policy_chain(cfg, cost, trace, c, workloads, _BarProgress(bar).report) for c in chains]
        else:
            done = _parallel_chains(cfg, cost, trace, jobs, bar)
    labels = [chain_label(cfg, c) for c in chains]
    order = [(n, label) for n in cfg.replicas for label in labels]  # the table's order
    results = sorted((r for chain, _ in done for r in chain), key=lambda r: order.index((r["replicas"], series_of(r))))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0 + (sum(c for _, c in done) if jobs > 1 else 0.0)
    simulated = sum(p["simulated"] for r in results for p in r["points"])
    floor = scheduler_floor(cost, sched_config(cfg.policy, cfg.length_scale, cfg.chunk_tokens))
    report = {
        "trace": cfg.trace, "profile": profile_src, "cost_model": {"model": cost.model, "device": cost.device,
                                                                   "hardware": cost.hardware},
        "config": asdict(cfg), "prefix_mode": mode, "reusable_fraction": reusable_fraction(trace),
        "results": results, "simulated_requests": simulated, "wall_s": wall, "cpu_s": cpu,
        "jobs": jobs, "simulated_requests_per_s": simulated / wall,
        "simulated_requests_per_cpu_s": simulated / max(cpu, 1e-9),
        "load_average": [load0, os.getloadavg()[0]], "speed_by_router_policy": speeds(results),
        "scheduler_floor_requests_per_s": floor["requests_per_s"], "pd": pd_info,
    }
    print_table(report)
    return report
