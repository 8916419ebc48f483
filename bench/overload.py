"""``flowprefill bench overload``: a bounded burst at many times the goodput rate, then back to normal.

A FlowPrefill server (``flowprefill serve`` as a subprocess, as in ``bench serve``) receives the
trace window open loop in three phases: ``base_fraction x goodput`` for ``before_s`` seconds,
``factor x goodput`` (10x by default) for ``overload_s`` seconds, and the base rate again for
``after_s`` seconds. Every ``sample_s`` the bench records the server's resident memory (every
process of its tree) and probes ``GET /health``. The report, per phase and SLO class: requests,
completed, TTFT attainment, refusals with 429 and whether each carried ``Retry-After``, other
errors; plus the memory peak, failed health probes, and the router's journal of accepted but
unanswered requests after the run (``/v1/router/stats``), which must be empty: nothing lost.
Per phase and class it also gives the TTFT decomposition (:mod:`bench.ttft_breakdown`): the mean
and p90 of each part of the requests' TTFT, and of the missed ones alone, so a miss can be
attributed to queueing, prefill compute, suspension, decode interleave or the router's hops.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.loadgen import LoadConfig, LoadRequest, RequestResult, run_load
from bench.outcomes import finish_rows, tally
from bench.serve_bench import engine_overrides, warm_up
from bench.servers import ManagedServer, check_engine_settings, max_cost_scale, router_journal, server_spec
from bench.soak import copies_used, process_tree_rss_mib, tiled, window_workload
from bench.ttft_breakdown import format_breakdown, ttft_breakdown

PHASES = ("before", "overload", "after")


@dataclass(frozen=True)
class OverloadConfig:
    """What to run: ``goodput_rps`` from ``bench serve`` (FlowPrefill's)."""

    trace: str
    goodput_rps: float
    factor: float = 10.0
    base_fraction: float = 0.5
    before_s: float = 30.0
    overload_s: float = 60.0
    after_s: float = 90.0
    sample_s: float = 5.0
    max_requests: int = 32  # the window `bench serve --quick` measures goodput on (its requests, tiled)
    length_scale: float = 1 / 16
    max_output_tokens: int = 8
    seed: int = 0
    log_dir: str = "out/overload"
    engine_settings: dict[str, Any] = field(default_factory=dict)  # on top of the trace-scaled ones
    repeats: int = 1  # the three phases run this many times on one server; attainment is their median

    def __post_init__(self) -> None:
        if not self.goodput_rps > 0 or not self.factor >= 1 or not 0 < self.base_fraction <= 1:
            raise ValueError("--goodput-rps must be positive, --factor >= 1, --base-fraction in (0, 1]")
        if min(self.before_s, self.overload_s, self.after_s) <= 0:
            raise ValueError("every phase must last a positive number of seconds")
        if self.repeats < 1:
            raise ValueError(f"--repeats: need at least 1, got {self.repeats}")
        check_engine_settings(self.engine_settings)

    def bounds(self) -> tuple[float, float, float]:
        """End of each phase, in seconds from the start of the load."""
        return self.before_s, self.before_s + self.overload_s, self.before_s + self.overload_s + self.after_s


def schedule(cfg: OverloadConfig, base: list[LoadRequest], copies: Callable[[int], list[LoadRequest]] | None = None,
             first_copy: int = 0) -> tuple[list[LoadRequest], int]:
    """The three phases' arrivals, back to back, and the next unused copy number: the window is tiled
    with copy ``first_copy`` onwards (:func:`bench.soak.tiled`), so no prompt repeats in a run or
    across repeats."""
    rates = (cfg.base_fraction * cfg.goodput_rps, cfg.factor * cfg.goodput_rps, cfg.base_fraction * cfg.goodput_rps)
    out: list[LoadRequest] = []
    start, copy = 0.0, first_copy
    for rate, end in zip(rates, cfg.bounds(), strict=True):
        phase = tiled(base, rate, end - start, copies=copies, first_copy=copy)
        copy += copies_used(base, phase)
        out += [replace(r, arrival_s=r.arrival_s + start) for r in phase]
        start = end
    return out, copy


def phase_of(cfg: OverloadConfig, arrival_s: float) -> str:
    """Which phase a request sent at ``arrival_s`` belongs to."""
    first, second, _ = cfg.bounds()
    return PHASES[0] if arrival_s < first else PHASES[1] if arrival_s < second else PHASES[2]


def summarize_phases(cfg: OverloadConfig, results: list[RequestResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per phase, per class (and ``all``): outcomes of the requests that arrived in it."""
    table: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in PHASES}
    for r in results:
        tally(table[phase_of(cfg, r.arrival_s)], r)
    for rows in table.values():
        finish_rows(rows)
    _capacity_bounds(cfg, results, table)
    return table


def phase_breakdowns(cfg: OverloadConfig, results: list[RequestResult]) -> dict[str, dict[str, Any]]:
    """Per phase: the TTFT decomposition per class of the requests that arrived in it."""
    return {p: ttft_breakdown([r for r in results if phase_of(cfg, r.arrival_s) == p]) for p in PHASES}


def _capacity_bounds(cfg: OverloadConfig, results: list[RequestResult],
                     table: dict[str, dict[str, dict[str, Any]]], speed: dict[str, float] | None = None,
                     key: str = "bound") -> None:
    """Add ``bound``: the best attainment the capacity allows in each phase and class.

    At most ``goodput_rps x phase seconds`` requests can meet their SLO in a phase (that is what the
    goodput measures). The best use of that capacity serves the most urgent classes first (shortest
    TTFT SLO), so a class's bound is the share of its requests left over for it, and ``all``'s is
    capacity over requests. Attainment divided by the bound says how much of the possible was had.
    ``speed`` (per phase, capacity as a fraction of the goodput's) scales that capacity; the result
    goes under ``key``.
    """
    ends = dict(zip(PHASES, cfg.bounds()))
    starts = {"before": 0.0, "overload": ends["before"], "after": ends["overload"]}
    slo = {r.slo_class: r.ttft_slo_s for r in results}
    for phase, rows in table.items():
        left = cfg.goodput_rps * (ends[phase] - starts[phase]) * (speed or {}).get(phase, 1.0)
        if "all" in rows:
            rows["all"][key] = round(min(1.0, left / rows["all"]["requests"]), 3)
        for name in sorted((c for c in rows if c != "all"), key=lambda c: (slo[c], c)):
            n = rows[name]["requests"]
            take = min(float(n), left)
            rows[name][key] = round(take / n, 3)
            left -= take


def speed_ratios(scales: dict[str, float | None]) -> dict[str, float]:
    """Per phase, the replica's prefill speed against the phase before the burst (median measured
    over profiled time ``before`` / that phase's): a burst of refusals takes CPU from prefill on a
    shared machine, so the capacity the goodput stands for shrinks by this factor. Empty when the
    before phase has no sample."""
    ref = scales.get("before")
    if not ref:
        return {}
    return {p: ref / s for p, s in scales.items() if s}


def _health_ok(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


async def _run(cfg: OverloadConfig, base_url: str, model: str, requests: list[LoadRequest], root_pid: int,
               bar: Any) -> tuple[list[RequestResult], list[dict[str, Any]]]:  # noqa: ANN401
    done: list[RequestResult] = []
    samples: list[dict[str, Any]] = []
    load = asyncio.create_task(run_load(LoadConfig(base_url, model, drain_s=60.0), requests, on_done=done.append))
    t0, seen = time.perf_counter(), 0
    while not load.done():
        await asyncio.wait({load}, timeout=cfg.sample_s)
        healthy = await asyncio.to_thread(_health_ok, base_url)
        window, seen = done[seen:], len(done)
        t = time.perf_counter() - t0
        samples.append({"t_s": t, "phase": phase_of(cfg, t), "rss_mib": process_tree_rss_mib(root_pid),
                        "healthy": healthy, "finished": len(window),
                        "refused": sum(r.status == 429 for r in window),
                        "attainment": sum(r.met for r in window) / len(window) if window else None,
                        "cost_scale": await asyncio.to_thread(max_cost_scale, base_url)})
        bar.update(len(window))
    return await load, samples


def run_overload(cfg: OverloadConfig, model_dir: Path | None = None) -> dict[str, Any]:
    """Start the server, run the three phases, stop it; returns the JSON report."""
    from tqdm import tqdm

    from replicas.model.default_model import prepare_default_model

    model_dir = model_dir or prepare_default_model()
    workload = window_workload(cfg.trace, model_dir, cfg.max_requests, cfg.length_scale, cfg.max_output_tokens,
                               cfg.seed)
    base = workload.requests(0)
    runs: list[list[LoadRequest]] = []
    copy = 1  # copy 0's prompts are the warm-up's lengths; every measured prompt is new
    for _ in range(cfg.repeats):
        requests, copy = schedule(cfg, base, workload.requests, copy)
        runs.append(requests)
    work = Path(cfg.log_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec = server_spec("flowprefill", model_dir, model_dir.name, work_dir=work,
                       engine={**engine_overrides(cfg.length_scale), **cfg.engine_settings})
    with ManagedServer(spec, work / "server.log") as server:
        assert server.proc is not None
        warm_up(spec.base_url, server.model_name, base, count=len(base))  # every prompt length once, unscored
        repeats: list[tuple[list[RequestResult], list[dict[str, Any]]]] = []
        with tqdm(total=sum(map(len, runs)), desc=f"overload {cfg.factor:g}x for {cfg.overload_s:g} s x{cfg.repeats}",
                  unit="req") as bar:
            for requests in runs:
                repeats.append(asyncio.run(_run(cfg, spec.base_url, server.model_name, requests, server.proc.pid,
                                                bar)))
        journal = router_journal(spec.base_url)
        healthy_after = _health_ok(spec.base_url)
    per_repeat = [summarize_phases(cfg, results) for results, _ in repeats]
    phases = median_phases(per_repeat)
    results = [r for rs, _ in repeats for r in rs]
    samples = [s for _, ss in repeats for s in ss]
    rss = {p: max((s["rss_mib"] for s in samples if s["phase"] == p), default=None) for p in PHASES}
    scales = {p: _median([s["cost_scale"] for s in samples if s["phase"] == p and s["cost_scale"] is not None])
              for p in PHASES}
    speed = speed_ratios(scales)
    if speed:  # the bound again at each phase's measured prefill speed (the platform's floor under the burst)
        _capacity_bounds(cfg, results, phases, speed, key="bound_at_speed")
    return {
        "config": asdict(cfg), "requests": len(results), "phases": phases, "repeats": per_repeat, "rss_mib_peak": rss,
        "cost_scale_median": scales, "ttft_breakdown": phase_breakdowns(cfg, results),
        "health_failures": sum(not s["healthy"] for s in samples), "healthy_after": healthy_after,
        "journal_after": journal, "samples": samples,
    }


COUNTS = ("requests", "completed", "met", "rejected_429", "retry_after", "other_errors", "cancelled")


def median_phases(per_repeat: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """One table from the repeats' tables: per phase and class, counts summed over the repeats, and
    ``attainment`` and ``bound`` their medians, with ``attainment_min``/``attainment_max``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for phase in PHASES:
        names = sorted({c for table in per_repeat for c in table.get(phase, {})})
        out[phase] = {}
        for name in names:
            rows = [table[phase][name] for table in per_repeat if name in table.get(phase, {})]
            merged = dict(rows[0])
            for key in COUNTS:
                merged[key] = sum(r.get(key, 0) for r in rows)
            reasons: dict[str, int] = {}
            for r in rows:
                for reason, n in (r.get("refusal_reasons") or {}).items():
                    reasons[reason] = reasons.get(reason, 0) + n
            if reasons or "refusal_reasons" in merged:
                merged["refusal_reasons"] = reasons
            attained = [r["attainment"] for r in rows if r.get("attainment") is not None]
            merged["attainment"] = statistics.median(attained) if attained else None
            merged["attainment_min"] = min(attained) if attained else None
            merged["attainment_max"] = max(attained) if attained else None
            merged["bound"] = statistics.median(r["bound"] for r in rows)
            out[phase][name] = merged
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def print_overload(report: dict[str, Any]) -> None:
    """Per phase and class: requests, completed, attainment and its capacity bound, 429s (with
    Retry-After), errors; over repeats, counts summed and attainment the median [min-max]."""
    print(f"{'phase':<9} {'class':<12} {'req':>5} {'done':>5} {'attain':>7} {'bound':>6} {'@speed':>7} {'429':>5} "
          f"{'w/RA':>5} {'err':>4} {'cancel':>6} {'RSS MiB':>8}")
    for phase, rows in report["phases"].items():
        for name, row in sorted(rows.items()):
            att = "-" if row["attainment"] is None else f"{row['attainment']:.2f}"
            spread = "" if row.get("attainment_min") is None or len(report.get("repeats") or []) < 2 \
                else f" [{row['attainment_min']:.2f}-{row['attainment_max']:.2f}]"
            rss = report["rss_mib_peak"][phase]
            at_speed = "-" if row.get("bound_at_speed") is None else f"{row['bound_at_speed']:.2f}"
            print(f"{phase:<9} {name:<12} {row['requests']:>5} {row['completed']:>5} {att:>7} {row['bound']:>6.2f} "
                  f"{at_speed:>7} {row['rejected_429']:>5} {row['retry_after']:>5} {row['other_errors']:>4} "
                  f"{row['cancelled']:>6} "
                  f"{'-' if rss is None else f'{rss:.0f}':>8}{spread}")
    scales = report.get("cost_scale_median", {})
    print("prefill time over its profile (median of samples): "
          + ", ".join(f"{p} {'-' if scales.get(p) is None else f'{scales[p]:.2f}x'}" for p in PHASES)
          + "; @speed: the bound with each phase's capacity scaled by its prefill speed against before's")
    for phase, rows in report["phases"].items():
        reasons = sorted(rows.get("all", {}).get("refusal_reasons", {}).items(), key=lambda kv: -kv[1])
        for reason, count in reasons[:3]:
            print(f"{phase:<9} 429 x{count:<4} {reason}")
    for phase, breakdown in (report.get("ttft_breakdown") or {}).items():
        print(f"{phase}: TTFT decomposition per class (mean/p90 ms; unattrib = client TTFT - the parts)")
        for line in format_breakdown(breakdown):
            print(line)
    print(json.dumps({k: report[k] for k in ("requests", "health_failures", "healthy_after", "journal_after")}))
