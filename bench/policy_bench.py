"""In-process goodput benchmark of the scheduling policies (no Ray, no HTTP).

``flowprefill bench policies --trace PATH [--window-s N] [--quick] [--json FILE] [--plot FILE]``

A window of the trace is replayed open loop against one replica engine per policy
configuration, all sharing one loaded model and one TTFT cost model. Goodput is the highest
request rate at which at least 90% of requests meet their TTFT SLO (DistServe's definition),
found by doubling the arrival-rate scale until attainment drops below 90% and then bisecting.

SLOs follow :mod:`bench.slo_classes`: a request's class comes from its (scaled) input length,
class SLOs are multiples of the cost model's prediction for a reference prompt, and no request's
SLO is below ``slack`` times its own predicted isolated latency. When lengths are scaled down
for a CPU run, every length-valued setting (reference prompt, class threshold, the engine's
batching threshold, batch budget and long-prompt chunk) is scaled by the same factor, so the
pressure stays what it is unscaled; chunk sizes of the ``chunked`` baseline are given as used.

Traces: Azure LLM inference 2023 (CC-BY 4.0), Patel et al., "Splitwise", ISCA 2024.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.rate_search import search_rate_scale
from bench.replay import ReplayRequest, make_prompts, replay, summarize
from bench.slo_classes import DEFAULT_REF_TOKENS, LengthRule, assign_classes, classes_for_predictor, ttft_slo_for
from bench.traces import Trace, load_trace
from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig


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
    quick: bool = False
    engine: dict[str, Any] = field(default_factory=dict)  # extra EngineConfig settings

    def __post_init__(self) -> None:
        if self.quick:  # under 10 minutes on 2 cores: fewer requests, two chunk sizes, no bisection
            self.max_requests = min(self.max_requests, 16)
            self.refine_steps = 0
            self.chunk_sizes = self.chunk_sizes[-2:]


def build_workload(cfg: PolicyBenchConfig, tokenizer: object, predict: Any) -> tuple[list[ReplayRequest], Trace]:  # noqa: ANN401
    """The trace window, scaled, with prompts and per-request SLOs (seeded, deterministic)."""
    trace = load_trace(cfg.trace)
    if cfg.window_s is not None:
        trace = trace.window(cfg.window_start_s, cfg.window_s)
    trace = trace.head(cfg.max_requests).scale_lengths(cfg.length_scale, max_output=cfg.max_output_tokens)
    if len(trace) < 2:
        raise ValueError(f"trace window holds {len(trace)} requests; widen --window-s")
    first = trace.requests[0].arrival_s
    ref_tokens = max(int(DEFAULT_REF_TOKENS * cfg.length_scale), 1)
    classes = classes_for_predictor(predict, ref_tokens=ref_tokens)
    by_name = {c.name: c for c in classes}
    rule = LengthRule().scaled(cfg.length_scale)
    names = assign_classes(trace, classes, seed=cfg.seed, rule=rule)
    prompts = make_prompts(tokenizer, [r.input_tokens for r in trace.requests])
    requests = [
        ReplayRequest(r.arrival_s - first, prompt, max(r.output_tokens, 1), by_name[name],
                      ttft_slo_for(r.input_tokens, by_name[name], predict))
        for r, prompt, name in zip(trace.requests, prompts, names)
    ]
    return requests, trace


def policy_configs(cfg: PolicyBenchConfig) -> dict[str, dict[str, Any]]:
    """Engine settings per compared configuration (length settings scaled like the trace)."""
    f = cfg.length_scale
    scaled = {"short_threshold": max(int(2048 * f), 1), "batch_token_budget": max(int(8192 * f), 1),
              "chunk_tokens": max(int(8192 * f), 1)}
    out = {"flowprefill": {"policy": "flowprefill", "granularity": "block", **scaled},
           "fcfs": {"policy": "fcfs", "granularity": "none", **scaled}}
    for c in cfg.chunk_sizes:
        out[f"chunked-{c}"] = {"policy": "chunked", "granularity": "none", "policy_chunk_tokens": c, **scaled}
    return out


def _scaled(requests: list[ReplayRequest], rate_scale: float) -> list[ReplayRequest]:
    return [replace(r, arrival_s=r.arrival_s / rate_scale) for r in requests]


def find_goodput(engine: ReplicaEngine, requests: list[ReplayRequest], base_rate: float, cfg: PolicyBenchConfig,
                 bar: tqdm, start_scale: float) -> dict[str, Any]:
    """Step the rate by 1.5x (3x when far below the goal) from ``start_scale`` until attainment crosses 90%,
    then bisect geometrically.

    Returns the goodput and every point measured.
    """
    points: dict[float, dict[str, Any]] = {}
    span = requests[-1].arrival_s

    def measure(scale: float) -> float:
        results = replay(engine, _scaled(requests, scale), drain_s=30 + 3 * span / scale, tag=f"s{scale:g}")
        summary = summarize(results)
        summary["rate_rps"] = scale * base_rate
        points[scale] = summary
        bar.update(1)
        bar.set_postfix(scale=f"{scale:.3g}", attain=f"{summary['attainment']:.2f}")
        return summary["attainment"]

    good, _ = search_rate_scale(measure, start_scale, max_steps=8, refine_steps=cfg.refine_steps)
    return {"goodput": good * base_rate, "goodput_scale": good, "points": {f"{k:g}": v for k, v in points.items()}}


def run_policy_bench(cfg: PolicyBenchConfig, model_dir: Path | None = None) -> dict[str, Any]:
    """Run every policy configuration side by side and return the JSON report."""
    from replicas.compute_thread import run_on_fresh_thread
    from replicas.model.decoder import DecoderModel
    from replicas.model.default_model import prepare_default_model
    from replicas.model.tokenizer import Tokenizer
    from replicas.profiling import load_or_profile
    from replicas.scheduler.cost_model import CostModel

    model_dir = model_dir or prepare_default_model()
    base = EngineConfig(model=str(model_dir), **cfg.engine)

    def load() -> tuple[DecoderModel, CostModel]:
        model = DecoderModel.load(model_dir, dtype=base.dtype, device=base.device)
        return model, load_or_profile(model, base.profile, max_tokens=base.profile_max_tokens)

    # not on this thread: each engine computes on a thread of its own (see replicas.compute_thread)
    model, cost = run_on_fresh_thread(load)
    tokenizer = Tokenizer.from_dir(model_dir)
    requests, trace = build_workload(cfg, tokenizer, cost.predict)
    base_rate = len(requests) / max(requests[-1].arrival_s, 1e-9)
    # Start each search near 70% predicted utilisation so replays are neither idle nor hopeless.
    work_s = sum(cost.predict(len(r.prompt_ids)) for r in requests)
    start_scale = 0.7 * requests[-1].arrival_s / max(work_s, 1e-9)
    report: dict[str, Any] = {
        "trace": cfg.trace, "window_requests": len(requests), "base_rate_rps": base_rate,
        "length_scale": cfg.length_scale, "config": asdict(cfg), "cost_model_fit_error": cost.fit_error,
        "slo_classes": sorted({(r.slo_class.name, round(r.slo_class.ttft_slo_s, 4)) for r in requests}),
        "policies": [],
    }
    configs = policy_configs(cfg)  # flowprefill first: its goodput is the common rate for the table
    common: float | None = None
    with tqdm(total=len(configs) * (3 + cfg.refine_steps), desc="bench policies", unit="replay") as bar:
        for name, settings in configs.items():
            engine = ReplicaEngine(replace(base, **settings), model=model, tokenizer=tokenizer, cost_model=cost)
            engine.start()
            try:
                replay(engine, _scaled(requests[:3], 100.0), drain_s=60, tag="warmup")  # first-call costs
                result = find_goodput(engine, requests, base_rate, cfg, bar, start_scale)
                common = common or result["goodput_scale"] or None
                if common and f"{common:g}" not in result["points"]:
                    at = summarize(replay(engine, _scaled(requests, common), drain_s=30 + 3 * requests[-1].arrival_s
                                          / common, tag="common"))
                    result["points"][f"{common:g}"] = {**at, "rate_rps": common * base_rate}
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
    """Goodput table, with attainment per class at a common rate (the flowprefill goodput scale)."""
    rows = report["policies"]
    common = rows[0].get("common_scale") if rows else None
    print(f"\n{report['trace']}: {report['window_requests']} requests, base rate {report['base_rate_rps']:.2f} req/s, "
          f"lengths x{report['length_scale']:g}")
    print(f"{'policy':>14} {'goodput r/s':>12} {'p50 TTFT s':>11} {'p99 TTFT s':>11} {'preempt':>8} "
          f"{'sched p50 ms':>13}  attainment per class at scale {common if common is None else f'{common:.3g}'}")
    for r in rows:
        pts = r["points"]
        at = pts.get(f"{common:g}") if common else None
        at = at or max(pts.values(), key=lambda p: p["attainment"])
        per_class = " ".join(f"{k}={v:.2f}" for k, v in at["attainment_per_class"].items())
        sched = r["scheduling_pass"].get("median_s", float("nan")) * 1000
        p50 = at["ttft_p50_s"] if at["ttft_p50_s"] is not None else float("nan")
        p99 = at["ttft_p99_s"] if at["ttft_p99_s"] is not None else float("nan")
        print(f"{r['policy']:>14} {r['goodput']:>12.3f} {p50:>11.3f} {p99:>11.3f} {r['preemptions']:>8} "
              f"{sched:>13.3f}  {per_class}")
    deep = report.get("scheduling_pass_1000_waiting")
    if deep:
        print(f"scheduling pass with {deep['n_waiting']} waiting ({deep['policy']}): median "
              f"{deep['median_s'] * 1000:.3f} ms, p99 {deep['p99_s'] * 1000:.3f} ms over {deep['passes']} passes")
