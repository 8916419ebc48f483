"""End-to-end goodput of whole serving systems over HTTP: FlowPrefill's policies and vLLM.

``flowprefill bench serve --trace PATH --systems flowprefill,chunked,fcfs,vllm [--quick]
[--json FILE] [--plot-dir DIR]``

For each system in turn: start its server (:mod:`bench.servers`), send a few warm-up requests,
find its goodput, stop it. A window of the trace is replayed open loop over the OpenAI API
(:mod:`bench.loadgen`) at rate scales on a common geometric grid (``start_scale * 1.5**k``):
up while attainment stays >= 90%, down (by 3x when far below) until it passes, then geometric
bisection. Every rate runs once, except the two at the boundary (the best passing and the lowest
failing above it), which run ``repeats`` times (3 by default) and are judged on their median
attainment; a median that flips moves the boundary and the new boundary rate is repeated in turn
(:func:`bench.rate_search.find_goodput`). The JSON keeps every run under ``repeats`` beside each
rate's median, min and max, and the ratios between systems come with the interval the grid allows.
``--budget-s`` (3600 s with ``--quick``) bounds the wall time: each system gets its share from its
server's start, and a search whose share is spent stops there and says so (``budget_spent``).
Goodput is that scale times the window's base rate (requests/s). Rates at which sending the
window would take longer than ``max_run_s`` (60 s with ``--quick``) are not tried: a system that
fails there is reported as below that rate (goodput 0 in the JSON, with ``min_rate_rps``).

The default window is the code trace's first dense stretch: 48 requests from 29 s (32 with
``--quick``). A window that spans a long idle gap gets a warning (:func:`idle_gap_warning`): its
rate scale averages over the gap, so even a "low" rate sends the bursts faster than a server can
take them (80 requests from 29 s span a 144 s gap before request 51).

Every system is judged by the same per-class TTFT SLOs, those FlowPrefill's server applies (the
``slo`` section of ``ray_config.yaml``: interactive 1 s, standard 5 s, batch 60 s). Classes are
assigned by :data:`bench.slo_classes.THREE_TIER_RULE`, its thresholds scaled with the lengths.
Each request carries its class as ``x-slo-class`` and its priority as ``priority``.

Lengths are scaled (``length_scale``, 1/16 by default) because production prompts are too slow
to prefill on a CPU; FlowPrefill's length-valued engine settings are scaled alike, as in
:mod:`bench.policy_bench`. The ``chunked`` baseline is run once per chunk size in ``chunk_sizes``
(64, 128 and 256 tokens by default, i.e. 1k-4k at full length; 256 is vLLM's long-prefill
threshold here), each as its own system ``chunked-N``, and the best of them stands for chunked
prefill; ``chunked-N`` can also be named directly. vLLM runs with BASELINES.md's best settings.
The report ends with FlowPrefill's goodput ratio to vLLM and to its best own baseline (the best
of ``fcfs`` and every ``chunked-N``), in the JSON under ``comparison``.

Shared prefixes (``--prefix-mode``, :mod:`bench.shared_prefix`): ``trace`` replays the trace's
block ids (Mooncake ``hash_ids``; the default for such a trace), ``multiturn`` generates
conversations on the window (:mod:`bench.multiturn`; for Azure), ``unique`` (the default for a
trace without ids) keeps every prompt unique, today's comparison with vLLM's prefix caching off.
In a shared-prefix mode vLLM runs at its defaults, prefix caching on, and FlowPrefill's engines
with their own settings (``flowprefill-nocache`` is ``flowprefill`` with its cache off). Every
measured run sends new prompts with the same sharing (:mod:`bench.serve_workload`), so nothing
cached by one run is hit by the next. Each system's prefix-cache hit rate is read from its own
``/metrics`` before and after every run (:mod:`bench.prefix_stats`) and reported beside its
goodput, at the goodput rate (None when the server exports no such counters), together with the
window's reusable token fraction (what an unbounded cache could hit).

Every run's summary carries its TTFT decomposition per class (:mod:`bench.ttft_breakdown`, from
the ``x-flowprefill-ttft-parts`` each FlowPrefill answer sends); the report prints it, and keeps it
under ``ttft_breakdown``, for each system's median run at the common scale, so a miss can be
attributed (queueing, prefill compute, suspension, decode interleave, the router's hops).

Traces: Azure LLM inference 2023 (CC-BY 4.0), Patel et al., "Splitwise", ISCA 2024; Mooncake
(Apache-2.0), Qin et al., "Mooncake: A KVCache-centric Disaggregated Architecture for LLM Serving", FAST'25.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.loadgen import ATTAINMENT_GOAL, LoadConfig, LoadRequest, RequestResult, run_load_sync, summarize
from bench.prefix_stats import PrefixCounters, format_hit_rate, prefix_counters_from_metrics, total
from bench.rate_search import find_goodput, fixed_rate, median_run, point_text
from bench.serve_compare import format_comparison, goodput_comparison
from bench.serve_config import ServeBenchConfig, slo_classes
from bench.serve_spread import format_spread, idle_probe_ms, short_replay_warning
from bench.serve_workload import ServeWorkload, build_workload, idle_gap_warning, prefix_groups  # noqa: F401
from bench.servers import (
    FLOWPREFILL_SYSTEMS,
    NOCACHE,
    TOPOLOGIES,
    ManagedServer,
    ServerStartError,
    metrics_text,
    server_spec,
    split_system,
    vllm_available,
)
from bench.ttft_breakdown import format_breakdown, ttft_breakdown
from router.slo import SLOClass


def build_requests(cfg: ServeBenchConfig, tokenizer: Any, classes: tuple[SLOClass, ...]) -> list[LoadRequest]:  # noqa: ANN401
    """The trace window at rate scale 1: scaled lengths, prompts (run 0), classes and SLOs
    (see :mod:`bench.serve_workload`)."""
    return build_workload(cfg, tokenizer, classes).requests(0)


def at_scale(requests: list[LoadRequest], scale: float) -> list[LoadRequest]:
    """The same requests with every arrival divided by ``scale`` (``scale=2``: twice the rate)."""
    return [replace(r, arrival_s=r.arrival_s / scale) for r in requests]


def engine_overrides(length_scale: float) -> dict[str, int]:
    """FlowPrefill's length-valued engine settings scaled like the trace (as in bench.policy_bench)."""
    return {"short_threshold": max(int(2048 * length_scale), 1),
            "batch_token_budget": max(int(8192 * length_scale), 1),
            "chunk_tokens": max(int(8192 * length_scale), 1)}


def _probe_scale(base: str, model: str, requests: list[LoadRequest]) -> float:
    """A start scale near 60% prefill utilisation, from the TTFT of a few requests sent one at a time.

    Decode time is left out: servers batch decode steps (and may pace them to a TPOT target), so
    the sequential end-to-end time would overstate the cost of a request under load.
    """
    sample = sorted(requests, key=lambda r: r.input_tokens)[:: max(len(requests) // 5, 1)][:5]
    cfg = LoadConfig(base, model, drain_s=120.0, cancel_missed=False)
    busy = 0.0
    for r in sample:
        res = run_load_sync(cfg, [replace(r, arrival_s=0.0, ttft_slo_s=1e9, max_tokens=1)])[0]
        busy += res.ttft_s if res.ttft_s is not None else 10.0
    work = busy / sum(r.input_tokens for r in sample) * sum(r.input_tokens for r in requests)
    return float(f"{0.6 * requests[-1].arrival_s / max(work, 1e-9):.3g}")


def warm_up(base: str, model: str, requests: list[LoadRequest], count: int = 3) -> None:
    """``count`` unscored requests, one after another, so first-call costs (kernel set-up per new
    prompt length, caches) do not hit the measured runs."""
    cfg = LoadConfig(base, model, drain_s=180.0, cancel_missed=False)
    for i, r in enumerate(requests[:count]):
        run_load_sync(cfg, [replace(r, arrival_s=0.0, ttft_slo_s=1e9, prompt=_warm_prompt(r.prompt, i))])


def _warm_prompt(prompt: str | tuple[int, ...], i: int) -> str | tuple[int, ...]:
    # A different first token from the scored prompts', so no prefix cache entry is shared with them.
    return f" warm{i}{prompt}" if isinstance(prompt, str) else (prompt[-1], *prompt[:-1])


def _prefix_counters(base_url: str) -> PrefixCounters | None:
    """The server's prefix-cache counters now, None when it exports none or does not answer."""
    try:
        return prefix_counters_from_metrics(metrics_text(base_url, timeout_s=5.0))
    except OSError:
        return None


def _hit_rate(runs: list[PrefixCounters | None]) -> float | None:
    counted = total(runs)
    return None if counted is None else counted.hit_rate


def bench_system(system: str, cfg: ServeBenchConfig, workload: ServeWorkload, model_dir: Path, model_name: str,
                 start: float | None, bar: tqdm) -> dict[str, Any]:
    """Start ``system``, search its goodput, stop it; the report entry (``error`` set on failure).

    Warm-up and the start-scale probe send run 0's prompts; measured run ``k`` sends run ``k``'s,
    with the server's prefix-cache counters read before and after it."""
    entry: dict[str, Any] = {"system": system, "goodput": None, "goodput_scale": None, "prefix_hit_rate": None,
                             "points": [], "error": None}
    kind, chunk = split_system(system)
    if chunk is not None:
        entry["chunk_tokens"] = chunk
    if kind in ("vllm", "flowprefill-vllm"):
        ok, why = vllm_available()
        if not ok:
            print(f"\n*** bench serve: SKIPPING {system}: {why} ***\n", file=sys.stderr, flush=True)
            entry["error"] = f"skipped: {why}"
            return entry
    log_dir = Path(cfg.log_dir)
    ours = kind in FLOWPREFILL_SYSTEMS or kind == NOCACHE or kind in TOPOLOGIES
    engine = {**engine_overrides(cfg.length_scale), **cfg.engine_settings} if ours else None
    spec = server_spec(kind, model_dir, model_name, work_dir=log_dir, engine=engine, chunk_tokens=chunk or 256,
                       vllm_budget=cfg.vllm_budget, vllm_long_prefill=cfg.vllm_long_prefill,
                       threads_bind=cfg.vllm_threads_bind, prefix_caching=workload.shared,
                       vllm_block_size=cfg.vllm_block_size)
    entry["command"] = spec.argv
    results: dict[float, list[list[RequestResult]]] = {}
    prefix: dict[float, list[PrefixCounters | None]] = {}
    probes: dict[float, list[float | None]] = {}
    requests = workload.requests(0)
    base_rate = len(requests) / requests[-1].arrival_s
    bar.set_description(f"{system}: starting")
    share = cfg.budget_per_system_s()
    deadline = None if share is None else time.monotonic() + share
    try:
        with ManagedServer(spec, log_dir / f"{system}.log") as server:
            entry["startup_s"] = server.startup_s
            bar.set_description(f"{system}: warm-up")
            warm_up(spec.base_url, server.model_name, requests)
            if start is None and cfg.fixed_rate_rps is None:
                start = _probe_scale(spec.base_url, server.model_name, requests)
            entry["start_scale"] = start
            load = LoadConfig(spec.base_url, server.model_name, drain_s=cfg.drain_s)

            def measure(scale: float) -> float:
                bar.set_description(f"{system}: {scale * base_rate:.2f} req/s")
                run = sum(len(v) for v in results.values()) + 1
                if cfg.fixed_rate_rps is not None:  # the machine's speed now, beside this replay
                    probes.setdefault(scale, []).append(idle_probe_ms(spec.base_url, server.model_name,
                                                                      workload.requests(run), run))
                before = _prefix_counters(spec.base_url)
                res = run_load_sync(load, at_scale(workload.requests(run), scale))
                results.setdefault(scale, []).append(res)
                att = summarize(res)["attainment"]
                bar.update(1)
                time.sleep(1.0)  # let cancelled requests leave the server before the next run
                after = _prefix_counters(spec.base_url)
                prefix.setdefault(scale, []).append(None if after is None else after.since(before))
                hit = _hit_rate(prefix[scale][-1:])
                bar.set_postfix(attain=f"{att:.2f}", **({"hit": f"{hit:.0%}"} if hit is not None else {}))
                return att

            floor = float(f"{requests[-1].arrival_s / cfg.max_run_s:.3g}")
            # a fixed rate that fails says only that goodput is below it
            entry["min_rate_rps"] = cfg.fixed_rate_rps if cfg.fixed_rate_rps is not None else floor * base_rate
            if cfg.fixed_rate_rps is not None:  # identical replays at one rate: their spread
                warning = short_replay_warning(len(requests), cfg.fixed_rate_rps)
                if warning:
                    print(f"\nbench serve: WARNING: {warning}", file=sys.stderr, flush=True)
                found = fixed_rate(measure, cfg.fixed_rate_rps / base_rate, cfg.repeats)
            else:
                found = find_goodput(measure, start, max_runs=cfg.max_runs, refine_steps=cfg.refine_steps,
                                     repeats=cfg.repeats, min_scale=floor,
                                     out_of_budget=None if deadline is None else lambda: time.monotonic() > deadline)
    except ServerStartError as exc:
        print(f"\n*** bench serve: {system} failed to start: {exc} ***\n", file=sys.stderr, flush=True)
        entry["error"] = str(exc)
        return entry
    good, runs = found.good, found.runs
    entry.update(goodput=good * base_rate, goodput_scale=good,
                 next_failing_rate_rps=None if found.bad is None else found.bad * base_rate,
                 budget_spent=found.budget_spent)
    if found.budget_spent:
        print(f"\n*** bench serve: {system}: its {share:.0f} s budget is spent; goodput is the best rate "
              "found so far ***\n", file=sys.stderr, flush=True)
    # the hit rate at the goodput rate; over every run when no rate passed
    entry["prefix_hit_rate"] = _hit_rate(prefix[good] if good in prefix else [c for v in prefix.values() for c in v])
    counted = total(c for v in prefix.values() for c in v)
    entry["prefix_cache"] = None if counted is None else counted.to_dict()
    for scale in sorted(results):
        summaries = [{**summarize(r), "ttft_breakdown": ttft_breakdown(r)} for r in results[scale]]
        for summary, counts in zip(summaries, prefix.get(scale, [])):
            summary["prefix_cache"] = None if counts is None else counts.to_dict()
        for summary, probe in zip(summaries, probes.get(scale, [])):
            summary["probe_ms"] = probe
        entry["points"].append({
            "scale": scale, "rate_rps": scale * base_rate, "attainment": found.median(scale),
            "attainment_min": min(runs[scale]), "attainment_max": max(runs[scale]),
            "spread": max(runs[scale]) - min(runs[scale]),
            "prefix_hit_rate": _hit_rate(prefix.get(scale, [None])),
            "repeats": summaries, "results": [[x.to_dict() for x in r] for r in results[scale]],
        })
    return entry


def common_scale(entries: list[dict[str, Any]]) -> float | None:
    """The highest scale every measured system ran at (the start scale at least)."""
    sets = [{p["scale"] for p in e["points"]} for e in entries if e["points"]]
    shared = set.intersection(*sets) if sets else set()
    return max(shared) if shared else None


def run_serve_bench(cfg: ServeBenchConfig, model_dir: Path | None = None,
                    checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Bench every system in ``cfg.systems`` in turn; returns the JSON report (and prints the table).

    ``checkpoint(report)`` is called after each system, so a long run interrupted later keeps what it measured.
    """
    from replicas.model.default_model import prepare_default_model
    from replicas.model.tokenizer import Tokenizer

    model_dir = Path(model_dir or prepare_default_model()).resolve()
    classes = slo_classes(cfg.config)
    workload = build_workload(cfg, Tokenizer.from_dir(model_dir), classes)
    requests = workload.requests(0)
    base_rate = len(requests) / requests[-1].arrival_s
    report: dict[str, Any] = {
        "trace": cfg.trace, "requests": len(requests), "base_rate_rps": base_rate,
        "length_scale": cfg.length_scale, "config": asdict(cfg), "goal": ATTAINMENT_GOAL, **workload.describe(),
        "prefix_groups": prefix_groups(cfg, workload.mode),
        "slo_classes": [asdict(c) for c in classes], "slos": cfg.slos,
        "requests_per_class": {c.name: sum(r.slo_class == c.name for r in requests) for c in classes},
        "systems": [],
    }
    previous = signal.signal(signal.SIGTERM, _interrupt)  # so `timeout` or a kill still stops the servers
    try:
        _bench_all(cfg, workload, model_dir, report, checkpoint)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report["ttft_breakdown"] = common_breakdowns(report)
    print_report(report)
    return report


def common_breakdowns(report: dict[str, Any]) -> dict[str, Any]:
    """Each system's TTFT decomposition per class in its median run at the common scale (None: not run there)."""
    common = report.get("common_scale")
    out: dict[str, Any] = {}
    for e in report["systems"]:
        at = next((p for p in e["points"] if p["scale"] == common), None)
        out[e["system"]] = median_run(at["repeats"]).get("ttft_breakdown") if at else None
    return out


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _bench_all(cfg: ServeBenchConfig, workload: ServeWorkload, model_dir: Path, report: dict[str, Any],
               checkpoint: Callable[[dict[str, Any]], None] | None) -> None:
    start = cfg.start_scale
    per_system = cfg.max_runs + cfg.refine_steps + cfg.repeats
    with tqdm(total=per_system * len(cfg.systems), desc="bench serve", unit="run") as bar:
        for system in cfg.systems:
            before = bar.n
            entry = bench_system(system, cfg, workload, model_dir, model_dir.name, start, bar)
            start = start or entry.get("start_scale")
            bar.update(max(per_system - (bar.n - before), 0))  # searches that ended early
            report["systems"].append(entry)
            report["start_scale"] = start
            report["common_scale"] = common_scale(report["systems"])
            if cfg.fixed_rate_rps is None:  # a fixed rate measures spread, not goodput
                report["comparison"] = goodput_comparison(report["systems"])
            if checkpoint is not None:
                checkpoint(report)


def print_report(report: dict[str, Any]) -> None:
    """Goodput and prefix-cache hit rate per system, with attainment per class and TTFT at the common scale."""
    common = report.get("common_scale")
    print(f"\n{report['trace']}: {report['requests']} requests, base rate {report['base_rate_rps']:.2f} req/s, "
          f"lengths x{report['length_scale']:g}, classes {report['requests_per_class']}")
    if report.get("prefix_mode"):
        groups = report.get("prefix_groups", 1.0)
        sampled = f", {groups:.3g} of the trace's prefix groups" \
            if report["prefix_mode"] == "trace" and groups < 1 else ""
        print(f"prefix mode {report['prefix_mode']}{sampled}: {report.get('reusable_token_fraction', 0.0):.1%} of "
              "prompt tokens reusable within a run (unbounded cache); hit % at each system's goodput rate")
    rate = "-" if common is None else f"{common * report['base_rate_rps']:.2f} req/s"
    w = max([12, *(len(e["system"]) for e in report["systems"])])
    if report.get("slos") == "both":
        print("attainment and goodput count the requests that met both their class's TTFT and TPOT SLOs")
    print(f"{'system':>{w}} {'goodput r/s':>12} {'hit %':>6} {'startup s':>10} {'p50 TTFT s':>11} {'p99 TTFT s':>11} "
          f"{'p90 TPOT s':>11} {'errors':>7} {'cancel':>7}  attainment per class at {rate}")
    for e in report["systems"]:
        if e["error"] and not e["points"]:
            print(f"{e['system']:>{w}} {'-':>12}  {e['error'].splitlines()[0][:100]}")
            continue
        at = next((p for p in e["points"] if p["scale"] == common), None)
        summary = median_run(at["repeats"]) if at else {}

        def num(v: float | None, width: int) -> str:
            return f"{v:>{width}.3f}" if isinstance(v, int | float) else f"{'-':>{width}}"

        per_class = " ".join(f"{k}={v:.2f}" for k, v in (summary.get("attainment_per_class") or {}).items())
        goodput = num(e["goodput"], 12) if e["goodput"] or not e.get("min_rate_rps") \
            else f"{'<' + format(e['min_rate_rps'], '.3f'):>12}"
        if e["goodput"] and "next_failing_rate_rps" in e and e["next_failing_rate_rps"] is None:
            goodput = f"{'>=' + format(e['goodput'], '.3f'):>12}"  # every rate tried passed: a lower bound
        print(f"{e['system']:>{w}} {goodput} {format_hit_rate(e.get('prefix_hit_rate'))} "
              f"{num(e.get('startup_s'), 10)} {num(summary.get('ttft_p50_s'), 11)} "
              f"{num(summary.get('ttft_p99_s'), 11)} {num(summary.get('tpot_p90_s'), 11)} "
              f"{summary.get('errors', '-'):>7} {summary.get('cancelled', '-'):>7}  {per_class}")
    print("attainment per rate (req/s: median [min-max] xruns)")
    for e in report["systems"]:
        if e["points"]:
            spent = "  (budget spent)" if e.get("budget_spent") else ""
            print(f"{e['system']:>{w}}: " + ", ".join(point_text(p) for p in e["points"]) + spent)
    if report.get("config", {}).get("fixed_rate_rps") is not None:  # one rate, no search: no goodput ratio
        for line in format_spread(report["systems"]):
            print(line)
    else:
        for line in format_comparison(goodput_comparison(report["systems"])):
            print(line)
    breakdowns = report.get("ttft_breakdown") or common_breakdowns(report)
    if any(breakdowns.values()):
        print(f"TTFT decomposition per class at {rate}, each system's median run (mean/p90 ms; unattrib = "
              "client TTFT - the parts: proxy hops, client)")
        for system, breakdown in breakdowns.items():
            if breakdown is not None:
                print(f"{system}:")
                for line in format_breakdown(breakdown):
                    print(line)
