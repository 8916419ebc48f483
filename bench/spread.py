"""``bench spread``: where FlowPrefill's run-to-run TTFT spread comes from, measured by replaying one
window several times at one rate under controlled variants, each in a fresh process.

A *variant* is one way of running the same in-process engine, chosen by the environment torch
loads in (its OpenMP settings) or by engine settings: ``baseline`` (as shipped), ``omp-passive``
(``OMP_WAIT_POLICY=PASSIVE``: workers sleep at once between operators), ``omp-active``
(``OMP_WAIT_POLICY=ACTIVE``: they spin), ``omp-spin`` (``GOMP_SPINCOUNT=1000000``: they spin for
a while, then sleep), ``threads-1`` (one compute thread instead of one per core), ``malloc-keep``
(glibc's malloc with fixed thresholds: activations come from the heap and freed memory is never
handed back to the kernel, so re-allocating it costs no page faults). A *competitor* is a busy loop
on one core, started beside a variant's replays to show what another runnable process does.

Before each replay the worker times a *probe*: one fresh 256-token prompt on the idle engine, three
times (the median), so each replay's result can be set beside the speed the machine itself had at
that moment (the platform's floor: on a shared VM that speed moves with the host's other tenants).
Per replay the worker records attainment, TTFT p50/p90 and every garbage collection that ran on the
engine's compute thread (count, total and longest pause), so a slow replay can be matched to its
collections. Every replay sends prompts of its own (no replay hits another's prefix cache entries).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from bench.serve_spread import correlation

VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {  # variant -> (environment, engine settings)
    "baseline": ({}, {}),
    "omp-passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, {}),
    "omp-active": ({"OMP_WAIT_POLICY": "ACTIVE"}, {}),
    "omp-spin": ({"GOMP_SPINCOUNT": "1000000"}, {}),  # spin longer (not forever) before sleeping
    "threads-1": ({}, {"cpu_threads": 1}),
    # glibc malloc with fixed thresholds: big tensors from the heap, never trimmed back to the OS
    "malloc-keep": ({"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}, {}),
}
COMPETITORS = ("none", "busy-loop")
PROBE_TOKENS = 256


@dataclass
class SpreadConfig:
    """One window replayed ``runs`` times at ``rate_rps`` per variant, optionally beside a competitor."""

    trace: str
    rate_rps: float
    runs: int = 5
    max_requests: int = 48
    window_start_s: float = 0.0
    length_scale: float = 1 / 16
    seed: int = 0
    variants: tuple[str, ...] = ("baseline", "omp-active")
    competitor: str = "none"

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
        if self.competitor not in COMPETITORS:
            raise ValueError(f"--competitor: expected one of {', '.join(COMPETITORS)}, got {self.competitor!r}")
        if self.runs < 2:
            raise ValueError(f"--runs: a spread needs at least 2 replays, got {self.runs}")
        if not self.rate_rps > 0:
            raise ValueError(f"--rate: expected a positive request rate, got {self.rate_rps!r}")


class ThreadGCLog:
    """Garbage collections timed with ``gc.callbacks``, split into those on one thread (the engine's
    compute thread) and those on any other (which hold the GIL the compute thread needs between
    operators)."""

    def __init__(self, thread_ident: int | None) -> None:
        self.ident = thread_ident
        self.pauses_ms: dict[bool, list[float]] = {True: [], False: []}
        self._started: dict[int, float] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:  # gc.callbacks hook
        me = threading.get_ident()
        if phase == "start":
            self._started[me] = time.perf_counter()
        elif (t0 := self._started.pop(me, None)) is not None:
            self.pauses_ms[me == self.ident].append((time.perf_counter() - t0) * 1000.0)

    def take(self) -> dict[str, float]:
        """Count, total and longest pause (ms) on the compute thread and on others, since the last take."""
        mine, other = self.pauses_ms[True], self.pauses_ms[False]
        self.pauses_ms = {True: [], False: []}
        return {"gc_count": len(mine), "gc_total_ms": round(sum(mine), 2),
                "gc_max_ms": round(max(mine, default=0.0), 2),
                "gc_other_count": len(other), "gc_other_total_ms": round(sum(other), 2),
                "gc_other_max_ms": round(max(other, default=0.0), 2)}


def run_worker(cfg: SpreadConfig, variant: str) -> dict[str, Any]:
    """Replay the window ``cfg.runs`` times in this process (its environment is the variant's)."""
    from bench.policy_bench import (
        PolicyBenchConfig,
        build_workload,
        load_model_and_cost,
        policy_configs,
        workload_prompts,
    )
    from bench.replay import replay, summarize
    from replicas.engine import ReplicaEngine
    from replicas.engine_config import EngineConfig
    from replicas.model.default_model import prepare_default_model
    from replicas.model.tokenizer import Tokenizer

    model_dir = prepare_default_model()
    pcfg = PolicyBenchConfig(trace=cfg.trace, window_start_s=cfg.window_start_s, max_requests=cfg.max_requests,
                             length_scale=cfg.length_scale, seed=cfg.seed)
    base = EngineConfig(model=str(model_dir), **policy_configs(pcfg)["flowprefill"], **VARIANTS[variant][1])
    tokenizer = Tokenizer.from_dir(model_dir)

    model, cost = load_model_and_cost(model_dir, base)
    requests, trace = build_workload(pcfg, tokenizer, cost.predict)
    scale = cfg.rate_rps * max(requests[-1].arrival_s, 1e-9) / len(requests)
    engine = ReplicaEngine(base, model=model, tokenizer=tokenizer, cost_model=cost)
    engine.start()
    gc_log = ThreadGCLog(engine.compute_thread_ident)
    gc.callbacks.append(gc_log)
    runs: list[dict[str, Any]] = []
    try:
        replay(engine, [replace(r, arrival_s=r.arrival_s / 100.0) for r in requests[:3]], drain_s=60, tag="warmup")
        gc_log.take()
        for k in range(1, cfg.runs + 1):
            prompts = workload_prompts(tokenizer, trace, cfg.seed, k, [r.prompt_ids for r in requests])
            reqs = [replace(r, prompt_ids=p, arrival_s=r.arrival_s / scale) for r, p in zip(requests, prompts)]
            probe_ms = engine_probe_ms(engine, tokenizer, requests[0].slo_class, k)
            t0, use0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            results = replay(engine, reqs, drain_s=30 + 3 * reqs[-1].arrival_s, tag=f"spread{k}")
            ttfts = sorted(r.ttft_s for r in results if r.ttft_s is not None)
            row = {**summarize(results), "wall_s": round(time.perf_counter() - t0, 2),
                   "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else None,
                   "cost_scale": engine.stats().cost_scale, "probe_ms": probe_ms,
                   **gc_log.take(), **_rusage_since(use0)}
            runs.append(row)
            print(f"  {variant} replay {k}/{cfg.runs}: attainment {row['attainment']:.3f}, "
                  f"p50 {row['ttft_p50_s']:.3f}s, gc {row['gc_count']} ({row['gc_total_ms']:.1f} ms) on the "
                  f"compute thread, {row['gc_other_count']} ({row['gc_other_total_ms']:.1f} ms) elsewhere, "
                  f"slowdown {row['cost_scale']:.2f}x, {row['minor_faults']} page faults, {row['wall_s']} s, "
                  f"probe {probe_ms:.1f} ms",
                  file=sys.stderr, flush=True)
    finally:
        gc.callbacks.remove(gc_log)
        engine.shutdown()
    return {"variant": variant, "env": VARIANTS[variant][0], "engine": VARIANTS[variant][1], "runs": runs}


def engine_probe_ms(engine: Any, tokenizer: Any, slo_class: Any, run: int, tokens: int = PROBE_TOKENS) -> float:  # noqa: ANN401
    """Median TTFT (ms) of three fresh ``tokens``-token prompts, one at a time, on the idle engine."""
    from bench.replay import ReplayRequest, fresh_prompts, make_prompts, replay

    base = make_prompts(tokenizer, [tokens])
    times = []
    for i in range(3):
        prompt = fresh_prompts(tokenizer, base, 100 + 3 * run + i)[0]  # never cached before
        (res,) = replay(engine, [ReplayRequest(0.0, prompt, 1, slo_class, 60.0)], drain_s=60, tag=f"probe{run}.{i}")
        times.append((res.ttft_s or float("inf")) * 1000.0)
    return round(statistics.median(times), 2)


def _rusage_since(before: resource.struct_rusage) -> dict[str, int]:
    """This process's page faults (minor: the kernel zeroing or mapping a page) and context switches
    (involuntary: preempted by the kernel) since ``before``."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return {"minor_faults": now.ru_minflt - before.ru_minflt, "major_faults": now.ru_majflt - before.ru_majflt,
            "voluntary_switches": now.ru_nvcsw - before.ru_nvcsw,
            "involuntary_switches": now.ru_nivcsw - before.ru_nivcsw}


def _competitor() -> subprocess.Popen[bytes]:
    """A busy loop on one core at normal priority: the controlled 'something else runnable'."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def summarize_variant(result: dict[str, Any]) -> dict[str, Any]:
    """Median, min, max and spread (max - min) of attainment, medians of TTFT p50 and GC pause."""
    runs = result["runs"]
    att = [r["attainment"] for r in runs]
    return {"variant": result["variant"], "competitor": result.get("competitor", "none"),
            "attainment_median": statistics.median(att), "attainment_min": min(att), "attainment_max": max(att),
            "spread": round(max(att) - min(att), 4),
            "ttft_p50_median_s": statistics.median(r["ttft_p50_s"] for r in runs if r["ttft_p50_s"] is not None),
            "gc_total_ms_median": statistics.median(r["gc_total_ms"] for r in runs),
            "gc_max_ms": max(r["gc_max_ms"] for r in runs),
            "gc_other_total_ms_median": statistics.median(r["gc_other_total_ms"] for r in runs),
            "gc_other_max_ms": max(r["gc_other_max_ms"] for r in runs),
            "cost_scale_median": statistics.median(r["cost_scale"] for r in runs),
            "minor_faults_median": statistics.median(r.get("minor_faults", 0) for r in runs),
            "involuntary_switches_median": statistics.median(r.get("involuntary_switches", 0) for r in runs),
            "probe_ms_median": statistics.median(r.get("probe_ms", 0.0) for r in runs),
            "probe_ms_min": min(r.get("probe_ms", 0.0) for r in runs),
            "probe_ms_max": max(r.get("probe_ms", 0.0) for r in runs),
            "attainment_vs_probe": correlation([r["attainment"] for r in runs],
                                                [r.get("probe_ms", 0.0) for r in runs])}


def run_spread_bench(cfg: SpreadConfig) -> dict[str, Any]:
    """Each variant in a fresh process (beside the competitor, if any); the JSON report."""
    from tqdm import tqdm

    results = []
    for variant in tqdm(cfg.variants, desc="bench spread", unit="variant"):
        env = {**os.environ, **VARIANTS[variant][0]}
        rival = _competitor() if cfg.competitor == "busy-loop" else None
        try:
            out = subprocess.run([sys.executable, "-m", "bench.spread", "--worker", variant,
                                  json.dumps(asdict(cfg))], env=env, check=True, stdout=subprocess.PIPE)
        finally:
            if rival is not None:
                rival.kill()
                rival.wait()
        results.append({**json.loads(out.stdout), "competitor": cfg.competitor})
    report = {"config": asdict(cfg), "variants": results, "summary": [summarize_variant(r) for r in results]}
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    """One row per variant: attainment median [min-max], spread, TTFT p50, GC pauses, prefill slowdown."""
    cfg = report["config"]
    print(f"\nbench spread: {cfg['trace']}, {cfg['max_requests']} requests at {cfg['rate_rps']} req/s, "
          f"{cfg['runs']} replays per variant, competitor: {cfg['competitor']}")
    print(f"{'variant':<12} {'attainment median [min-max]':<28} {'spread':>7} {'p50 TTFT':>9} "
          f"{'GC ms (compute/other)':>22} {'GC max ms':>10} {'slowdown':>9} {'page faults':>12} {'preempted':>10} "
          f"{'probe ms [min-max]':>20} {'r(att,probe)':>13}")
    for s in report["summary"]:
        att = f"{s['attainment_median']:.3f} [{s['attainment_min']:.3f}-{s['attainment_max']:.3f}]"
        gcs = f"{s['gc_total_ms_median']:.1f} / {s['gc_other_total_ms_median']:.1f}"
        print(f"{s['variant']:<12} {att:<28} {s['spread']:>7.3f} {s['ttft_p50_median_s']:>8.3f}s {gcs:>22} "
              f"{max(s['gc_max_ms'], s['gc_other_max_ms']):>10.1f} {s['cost_scale_median']:>8.2f}x "
              f"{s['minor_faults_median']:>12.0f} {s['involuntary_switches_median']:>10.0f} "
              f"{s['probe_ms_median']:>7.1f} [{s['probe_ms_min']:.0f}-{s['probe_ms_max']:.0f}]".rjust(21)
              + f" {s['attainment_vs_probe'] if s['attainment_vs_probe'] is not None else '-':>13}")


def main(argv: list[str]) -> int:
    """Worker entry: ``python -m bench.spread --worker VARIANT CONFIG_JSON`` prints its result as JSON."""
    if len(argv) != 3 or argv[0] != "--worker":
        print("usage: python -m bench.spread --worker VARIANT CONFIG_JSON (use `flowprefill bench spread`)",
              file=sys.stderr)
        return 2
    cfg = SpreadConfig(**{**json.loads(argv[2]), "variants": (argv[1],)})
    json.dump(run_worker(cfg, argv[1]), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
