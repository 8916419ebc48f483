"""In-process goodput benchmark of the scheduling policies (no Ray, no HTTP).

``flowprefill bench policies --trace PATH [--window-s N] [--quick] [--json FILE] [--plot FILE]``

A window of the trace is replayed open loop against one replica engine per policy
configuration, all sharing one loaded model and one TTFT cost model. Goodput is the highest
request rate at which at least 90% of requests meet their TTFT SLO (DistServe's definition),
found by stepping the arrival-rate scale by 1.5x until attainment crosses 90% and then bisecting;
the two boundary rates are replayed ``--repeats`` times (3) and judged on their median attainment
(:func:`bench.rate_search.find_goodput`), and each point keeps every replay under ``repeats``.

SLOs follow :mod:`bench.slo_classes`: a request's class comes from its (scaled) input length,
class SLOs are multiples of the cost model's prediction for a reference prompt, and no request's
SLO is below ``slack`` times its own predicted isolated latency. When lengths are scaled down
for a CPU run, every length-valued setting (reference prompt, class threshold, the engine's
batching threshold, batch budget and long-prompt chunk) is scaled by the same factor, so the
pressure stays what it is unscaled; chunk sizes of the ``chunked`` baseline are given as used.

Shared prefixes (``--prefix-mode``, :mod:`bench.shared_prefix`): ``trace`` (the default for a trace
with block ids, Mooncake) and ``multiturn`` (generated conversations, for Azure) build prompts that
share exactly the prefixes their block ids say (:meth:`bench.prompts.PromptBuilder.build_shared`),
and add the configuration ``flowprefill-nocache``: ``flowprefill`` with ``enable_prefix_caching:
false``, the same trace with the engine's cache off. ``unique`` (the default otherwise) keeps
today's prompts. Every replay sends new prompts with the same sharing (a new block namespace, or
in ``unique`` mode a new first token, :func:`bench.replay.fresh_prompts`), so the cache keeps
nothing from one replay that the next could hit; warm-up uses run 0's. Each replay's prefix-cache
hit rate comes from the engine's counters (``prefix_queried_tokens``, ``prefix_hit_tokens``;
unknown when the engine keeps none) and is reported beside the goodput, at the goodput rate.

Traces: Azure LLM inference 2023 (CC-BY 4.0), Patel et al., "Splitwise", ISCA 2024; Mooncake
(Apache-2.0), Qin et al., "Mooncake: A KVCache-centric Disaggregated Architecture for LLM Serving", FAST'25.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.multiturn import MultiTurnConfig
from bench.prefix_stats import PrefixCounters, engine_prefix_counters, format_hit_rate, total
from bench.prompts import PromptBuilder
from bench.rate_search import find_goodput as search_goodput
from bench.rate_search import median_run, point_text
from bench.replay import ReplayRequest, fresh_prompts, make_prompts, replay, summarize
from bench.shared_prefix import (
    apply_prefix_mode,
    check_prefix_flags,
    resolve_prefix_mode,
    reusable_fraction,
    sample_prefix_groups,
)
from bench.slo_classes import DEFAULT_REF_TOKENS, LengthRule, assign_classes, classes_for_predictor, ttft_slo_for
from bench.traces import Trace, load_trace
from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig

NOCACHE = "flowprefill-nocache"


@dataclass
class PolicyBenchConfig:
    """What to replay and which policies to compare."""

    trace: str
    window_start_s: float = 0.0
    window_s: float | None = None
    max_requests: int = 60
    length_scale: float = 1 / 16
    max_output_tokens: int = 4
    chunk_sizes: tuple[int, ...] = (64, 128, 256)
    seed: int = 0
    refine_steps: int = 2
    repeats: int = 3  # replays at each boundary rate (the best passing and the lowest failing); 1 elsewhere
    policies: tuple[str, ...] | None = None  # only these configurations, in this order (None: all)
    quick: bool = False
    engine: dict[str, Any] = field(default_factory=dict)  # extra EngineConfig settings
    prefix_mode: str | None = None  # unique | trace | multiturn; None: trace if the trace has block ids
    multiturn_system_tokens: int = MultiTurnConfig.system_prompt_tokens  # full-length tokens
    multiturn_continue: float = MultiTurnConfig.continue_probability
    prefix_groups: float = 1.0  # trace mode: keep this fraction of the prefix groups (whole trace, seeded)

    def __post_init__(self) -> None:
        check_prefix_flags(self.prefix_mode, self.multiturn)
        if not 0.0 < self.prefix_groups <= 1.0:
            raise ValueError(f"--prefix-groups: expected a fraction in (0, 1], got {self.prefix_groups!r}")
        if self.repeats < 1:
            raise ValueError(f"--repeats: need at least 1, got {self.repeats}")
        if self.quick:  # under 10 minutes on 2 cores: fewer requests, two chunk sizes, no bisection
            self.max_requests = min(self.max_requests, 16)
            self.refine_steps = 0
            self.chunk_sizes = self.chunk_sizes[-2:]

    def multiturn(self) -> MultiTurnConfig:
        """The multi-turn generator's settings (``--prefix-mode multiturn``)."""
        return MultiTurnConfig(system_prompt_tokens=self.multiturn_system_tokens,
                               continue_probability=self.multiturn_continue, seed=self.seed)


def build_workload(cfg: PolicyBenchConfig, tokenizer: object, predict: Any) -> tuple[list[ReplayRequest], Trace]:  # noqa: ANN401
    """The trace window, scaled, with run 0's prompts and per-request SLOs (seeded, deterministic).

    The trace returned has block ids when prompts share prefixes (see :func:`workload_prompts`)."""
    trace = load_trace(cfg.trace)
    mode = resolve_prefix_mode(cfg.prefix_mode, trace)
    trace = sample_prefix_groups(trace, cfg.prefix_groups, cfg.seed) if cfg.prefix_groups < 1 else trace
    if cfg.window_s is not None:
        trace = trace.window(cfg.window_start_s, cfg.window_s)
    trace = apply_prefix_mode(trace.head(cfg.max_requests), mode, cfg.multiturn())
    trace = trace.scale_lengths(cfg.length_scale, max_output=cfg.max_output_tokens)
    if len(trace) < 2:
        raise ValueError(f"trace window holds {len(trace)} requests; widen --window-s")
    first = trace.requests[0].arrival_s
    ref_tokens = max(int(DEFAULT_REF_TOKENS * cfg.length_scale), 1)
    classes = classes_for_predictor(predict, ref_tokens=ref_tokens)
    by_name = {c.name: c for c in classes}
    rule = LengthRule().scaled(cfg.length_scale)
    names = assign_classes(trace, classes, seed=cfg.seed, rule=rule)
    prompts = workload_prompts(tokenizer, trace, cfg.seed, 0)
    requests = [
        ReplayRequest(r.arrival_s - first, prompt, max(r.output_tokens, 1), by_name[name],
                      ttft_slo_for(r.input_tokens, by_name[name], predict))
        for r, prompt, name in zip(trace.requests, prompts, names)
    ]
    return requests, trace


def workload_prompts(tokenizer: object, trace: Trace, seed: int, run: int,
                     base: list[list[int]] | None = None) -> list[list[int]]:
    """The prompts of replay ``run``: sharing the trace's block ids (block namespace ``run``) when it
    has them, else :func:`bench.replay.make_prompts`'s unique ones (``base`` when given) made new
    for the run by :func:`bench.replay.fresh_prompts`."""
    if trace.has_prefixes:
        builder = PromptBuilder(tokenizer, seed, add_special_tokens=False)  # type: ignore[arg-type]
        return [list(builder.build_shared(i, r.input_tokens, r.hash_ids, trace.block_tokens, namespace=run).token_ids)
                for i, r in enumerate(trace.requests)]
    return fresh_prompts(tokenizer, base or make_prompts(tokenizer, [r.input_tokens for r in trace.requests]), run)


def policy_configs(cfg: PolicyBenchConfig, nocache: bool = False) -> dict[str, dict[str, Any]]:
    """Engine settings per compared configuration (length settings scaled like the trace); with
    ``nocache`` (shared-prefix traffic), ``flowprefill-nocache`` second: flowprefill with its prefix cache off."""
    f = cfg.length_scale
    scaled = {"short_threshold": max(int(2048 * f), 1), "batch_token_budget": max(int(8192 * f), 1),
              "chunk_tokens": max(int(8192 * f), 1)}
    out = {"flowprefill": {"policy": "flowprefill", "granularity": "block", **scaled}}
    if nocache:
        out[NOCACHE] = {**out["flowprefill"], "enable_prefix_caching": False}
    out["fcfs"] = {"policy": "fcfs", "granularity": "none", **scaled}
    for c in cfg.chunk_sizes:
        out[f"chunked-{c}"] = {"policy": "chunked", "granularity": "none", "policy_chunk_tokens": c, **scaled}
    if cfg.policies is None:
        return out
    unknown = [p for p in cfg.policies if p not in out]
    if unknown:
        raise ValueError(f"--policies: unknown {', '.join(unknown)}; this run has {', '.join(out)}")
    return {p: out[p] for p in cfg.policies}


def _scaled(requests: list[ReplayRequest], rate_scale: float) -> list[ReplayRequest]:
    return [replace(r, arrival_s=r.arrival_s / rate_scale) for r in requests]


class Replays:
    """One engine's replays of the workload: replay ``k`` (1, 2, ...) sends ``prompts_for(k)`` (the
    same prompts every time when None) and records its prefix-cache counts from the engine."""

    def __init__(self, engine: ReplicaEngine, requests: list[ReplayRequest],
                 prompts_for: Callable[[int], list[list[int]]] | None = None) -> None:
        self.engine, self.requests, self.prompts_for = engine, requests, prompts_for
        self.count = 0

    def _counters(self) -> PrefixCounters | None:
        # the engine's live counters where it keeps them there, else its last stats snapshot's
        return engine_prefix_counters({**self.engine.stats().counters, **getattr(self.engine, "counters", {})})

    def __call__(self, scale: float, tag: str) -> dict[str, Any]:
        """Replay at rate ``scale``; the summary, with ``prefix_cache`` (None: the engine counts nothing)."""
        self.count += 1
        prompts = self.prompts_for(self.count) if self.prompts_for else [r.prompt_ids for r in self.requests]
        reqs = [replace(r, prompt_ids=p, arrival_s=r.arrival_s / scale) for r, p in zip(self.requests, prompts)]
        before = self._counters()
        summary = summarize(replay(self.engine, reqs, drain_s=30 + 3 * self.requests[-1].arrival_s / scale, tag=tag))
        after = self._counters()
        summary["prefix_cache"] = None if after is None else after.since(before).to_dict()
        return summary


def _counts(point: dict[str, Any]) -> PrefixCounters | None:
    c = point.get("prefix_cache")
    return None if c is None else PrefixCounters(c["queried_tokens"], c["hit_tokens"], c["evictions"])


def find_goodput(replays: Replays, base_rate: float, cfg: PolicyBenchConfig, bar: tqdm,
                 start_scale: float) -> dict[str, Any]:
    """Step the rate by 1.5x (3x when far below the goal) from ``start_scale`` until attainment crosses 90%,
    bisect geometrically, then replay both boundary rates ``cfg.repeats`` times and decide on the median
    (:func:`bench.rate_search.find_goodput`).

    Returns the goodput, the next failing rate, the prefix-cache hit rate at the goodput (over every
    replay when no rate passed; None when unknown) and every point measured: each point is its median
    replay's summary with ``attainment`` the median, ``attainment_min``/``attainment_max`` and every
    replay's summary under ``repeats``.
    """
    replays_at: dict[float, list[dict[str, Any]]] = {}

    def measure(scale: float) -> float:
        summary = replays(scale, f"s{scale:g}")
        summary["rate_rps"] = scale * base_rate
        replays_at.setdefault(scale, []).append(summary)
        bar.update(1)
        hit = (summary["prefix_cache"] or {}).get("hit_rate")
        bar.set_postfix(scale=f"{scale:.3g}", attain=f"{summary['attainment']:.2f}",
                        **({"hit": f"{hit:.0%}"} if hit is not None else {}))
        return summary["attainment"]

    found = search_goodput(measure, start_scale, max_runs=8, refine_steps=cfg.refine_steps, repeats=cfg.repeats)
    good = found.good
    points = {scale: median_point(runs) for scale, runs in replays_at.items()}
    counted = total([_counts(r) for r in replays_at[good]] if good in replays_at
                    else [_counts(r) for runs in replays_at.values() for r in runs])
    return {"goodput": good * base_rate, "goodput_scale": good,
            "next_failing_rate_rps": None if found.bad is None else found.bad * base_rate,
            "prefix_hit_rate": None if counted is None else counted.hit_rate,
            "points": {f"{k:g}": v for k, v in sorted(points.items())}}


def median_point(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The replay with the median attainment (the lower middle for an even count), with the median,
    min and max attainment and every replay under ``repeats``."""
    attained = [r["attainment"] for r in runs]
    return {**median_run(runs), "attainment": statistics.median(attained),
            "attainment_min": min(attained), "attainment_max": max(attained), "repeats": runs}


def load_model_and_cost(model_dir: Path, base: EngineConfig) -> tuple[Any, Any]:
    """The model and its TTFT cost model (cached profile, else profiled now), loaded on a fresh
    thread: each engine computes on a thread of its own (see :mod:`replicas.compute_thread`)."""
    from replicas.compute_thread import run_on_fresh_thread
    from replicas.model.decoder import DecoderModel
    from replicas.profiling import load_or_profile

    def load() -> tuple[Any, Any]:
        model = DecoderModel.load(model_dir, dtype=base.dtype, device=base.device)
        return model, load_or_profile(model, base.profile, max_tokens=base.profile_max_tokens)

    return run_on_fresh_thread(load)


class RunPrompts:
    """Replay ``k``'s prompts (:func:`workload_prompts`, namespace ``k``), built once and the same for
    every configuration that replays ``k``."""

    def __init__(self, tokenizer: object, trace: Trace, seed: int, base: list[list[int]]) -> None:
        self.tokenizer, self.trace, self.seed, self.base = tokenizer, trace, seed, base
        self._runs: dict[int, list[list[int]]] = {}

    def __call__(self, run: int) -> list[list[int]]:
        if run not in self._runs:
            self._runs[run] = workload_prompts(self.tokenizer, self.trace, self.seed, run, self.base)
        return self._runs[run]


def run_policy_bench(cfg: PolicyBenchConfig, model_dir: Path | None = None) -> dict[str, Any]:
    """Run every policy configuration side by side and return the JSON report."""
    from replicas.model.default_model import prepare_default_model
    from replicas.model.tokenizer import Tokenizer

    model_dir = model_dir or prepare_default_model()
    base = EngineConfig(model=str(model_dir), **cfg.engine)
    tokenizer = Tokenizer.from_dir(model_dir)
    mode = resolve_prefix_mode(cfg.prefix_mode, load_trace(cfg.trace))
    configs = policy_configs(cfg, nocache=mode != "unique")  # flowprefill first: its goodput is the common rate
    for name, settings in configs.items():  # a setting the engine does not know fails now, named, not mid-run
        EngineConfig.from_dict({**cfg.engine, **settings}, prefix=f"bench policies {name}")
    model, cost = load_model_and_cost(model_dir, base)
    requests, trace = build_workload(cfg, tokenizer, cost.predict)
    prompts_for = RunPrompts(tokenizer, trace, cfg.seed, [r.prompt_ids for r in requests])
    base_rate = len(requests) / max(requests[-1].arrival_s, 1e-9)
    # Start each search near 70% predicted utilisation so replays are neither idle nor hopeless.
    work_s = sum(cost.predict(len(r.prompt_ids)) for r in requests)
    start_scale = 0.7 * requests[-1].arrival_s / max(work_s, 1e-9)
    report: dict[str, Any] = {
        "trace": cfg.trace, "window_requests": len(requests), "base_rate_rps": base_rate,
        "length_scale": cfg.length_scale, "config": asdict(cfg), "cost_model_fit_error": cost.fit_error,
        "slo_classes": sorted({(r.slo_class.name, round(r.slo_class.ttft_slo_s, 4)) for r in requests}),
        "prefix_mode": mode, "block_tokens": trace.block_tokens, "reusable_token_fraction": reusable_fraction(trace),
        "policies": [],
    }
    common: float | None = None
    with tqdm(total=len(configs) * (3 + cfg.refine_steps + 2 * cfg.repeats), desc="bench policies",
              unit="replay") as bar:
        for name, settings in configs.items():
            bar.set_description(f"bench policies: {name}")
            engine = ReplicaEngine(replace(base, **settings), model=model, tokenizer=tokenizer, cost_model=cost)
            engine.start()
            try:
                replay(engine, _scaled(requests[:3], 100.0), drain_s=60, tag="warmup")  # first-call costs
                replays = Replays(engine, requests, prompts_for)
                result = find_goodput(replays, base_rate, cfg, bar, start_scale)
                common = common or result["goodput_scale"] or None
                if common and f"{common:g}" not in result["points"]:
                    extra = {**replays(common, "common"), "rate_rps": common * base_rate}
                    result["points"][f"{common:g}"] = median_point([extra])
                result["common_scale"] = common
                passes = engine.scheduler.pass_stats()
                result.update(policy=name, settings=settings, preemptions=engine.counters["preemptions"],
                              scheduling_pass=passes)
            finally:
                engine.shutdown()
            report["policies"].append(result)
    from bench.scheduler_bench import bench_scheduling_pass

    report["scheduling_pass_1000_waiting"] = bench_scheduling_pass(1000)  # the scheduler alone, at depth
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    """Goodput and prefix-cache hit rate table, with attainment per class at a common rate (the
    flowprefill goodput scale)."""
    rows = report["policies"]
    common = rows[0].get("common_scale") if rows else None
    print(f"\n{report['trace']}: {report['window_requests']} requests, base rate {report['base_rate_rps']:.2f} req/s, "
          f"lengths x{report['length_scale']:g}")
    if report.get("prefix_mode"):
        print(f"prefix mode {report['prefix_mode']}: {report.get('reusable_token_fraction', 0.0):.1%} of prompt "
              "tokens reusable within a replay (unbounded cache); hit % at each goodput rate")
    w = max([14, *(len(r["policy"]) for r in rows)])
    print(f"{'policy':>{w}} {'goodput r/s':>12} {'hit %':>6} {'p50 TTFT s':>11} {'p99 TTFT s':>11} {'preempt':>8} "
          f"{'sched p50 ms':>13}  attainment per class at scale {common if common is None else f'{common:.3g}'}")
    for r in rows:
        pts = r["points"]
        at = pts.get(f"{common:g}") if common else None
        at = at or max(pts.values(), key=lambda p: p["attainment"])
        per_class = " ".join(f"{k}={v:.2f}" for k, v in at["attainment_per_class"].items())
        sched = r["scheduling_pass"].get("median_s", float("nan")) * 1000
        p50 = at["ttft_p50_s"] if at["ttft_p50_s"] is not None else float("nan")
        p99 = at["ttft_p99_s"] if at["ttft_p99_s"] is not None else float("nan")
        print(f"{r['policy']:>{w}} {r['goodput']:>12.3f} {format_hit_rate(r.get('prefix_hit_rate'))} {p50:>11.3f} "
              f"{p99:>11.3f} {r['preemptions']:>8} {sched:>13.3f}  {per_class}")
    print("attainment per rate (req/s: median [min-max] xreplays)")
    for r in rows:
        print(f"{r['policy']:>{w}}: " + ", ".join(point_text(p) for p in r["points"].values()))
    deep = report.get("scheduling_pass_1000_waiting")
    if deep:
        print(f"scheduling pass with {deep['n_waiting']} waiting ({deep['policy']}): median "
              f"{deep['median_s'] * 1000:.3f} ms, p99 {deep['p99_s'] * 1000:.3f} ms over {deep['passes']} passes")
