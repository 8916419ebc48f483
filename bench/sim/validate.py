"""Validate the simulator against real in-process replays of the same requests at the same rate.

``flowprefill bench sim --validate --trace PATH`` builds the workload exactly as ``bench policies``
does (window, lengths scaled by 1/16, seeded SLO classes, prompts of real tokens), replays it
``real_runs`` times (3 by default) open loop on a real :class:`~replicas.engine.ReplicaEngine`
running ``flowprefill`` with the default model and the cost profile the engine loads, at the rate
that puts the predicted prefill utilisation at ``utilization``, then simulates the same requests on
one simulated replica with the same scheduler settings and cost model, and reports the relative
errors of the TTFT p50 and p90 against the median of the replays' p50 and p90. One replay is too
noisy a reference: three identical replays of the 60-request window gave p50 1.19, 1.51, 2.38 s.

The same comparison per SLO class (:func:`per_class_comparison`) follows. Over all requests the
p50 of this window falls in the gap between the interactive cluster (about 0.3 s) and the batch one
(1-4 s), so it moves by a second when a few batch requests finish a little earlier or later: on
one day its error ranged over 5-49% between validations, while each class's p50 and p90 stayed
close. The JSON keeps every request's TTFT (each replay and each simulation) for plots.

Before the replay, the engine's decode step is measured offline at 1-16 sequences
(:func:`bench.decode_bench.measure_decode_steps`); ``sim`` runs prefill by the cost model and
decode by that curve, i.e. everything it knows was measured before the run.
``sim_marginal_decode`` charges decode as the cost model's marginal token instead (what the
sweep does without a curve), to show what the curve is worth.

The real run's execution is timed as it happens (prefill programs against their predicted
seconds, decode steps), because the engine does not run at its profile's speed: on the 2-core dev
machine the replays' prefill programs took 0.93-1.18x their prediction from run to run (per
program p10-p90 0.84-1.4x), and other processes on shared cores slow it further and unevenly. A further
simulation, ``sim_calibrated``, uses execution times fitted to the replay
(prefill: ``measured = scale * predicted + overhead * (sequences - 1)`` over every prefill
program, the machine's slowdown and a per-sequence launch overhead that ``predict_batch`` does
not charge; decode: the median measured step per batch size), so its error is the simulator's
own (queueing, preemption, batching, decode interleaving), separated from the cost model's
error on a busy machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.sim.cluster import ClusterSim, RouterConfig, SimSetup
from bench.sim.exec_model import ExecConfig, decode_token_seconds, program_seconds
from bench.sim.workload import explicit_workload
from replicas.scheduler.config import SchedulerConfig


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p90 = np.percentile(np.asarray(values, dtype=np.float64), [50, 90])
    return float(p50), float(p90)


def _rel(sim: float | None, real: float | None) -> float | None:
    return None if sim is None or not real else abs(sim - real) / real


class ExecutionTimer:
    """Times one engine's prefill programs and decode steps against the simulator's execution model."""

    def __init__(self, engine: Any, cost: Any) -> None:  # noqa: ANN401 - a ReplicaEngine and its CostModel
        self.measured: dict[str, float] = {}
        self.programs: dict[str, tuple[int, float]] = {}  # label -> (sequences, predicted s)
        self.steps: list[tuple[int, float, float]] = []  # (sequences, predicted s, measured s)
        run, step, decoder = engine.executor.run, engine.decoder.step, engine.decoder

        def timed_run(task: Any, should_stop: Any = None) -> bool:  # noqa: ANN401
            if task.label not in self.programs:
                plan = engine._plans.get(int(task.label.split("-")[1]))  # noqa: SLF001 - diagnostics only
                self.programs[task.label] = (len(plan.ranges), program_seconds(cost, plan.ranges)) if plan else (0, 0)
            t0 = time.perf_counter()
            try:
                return run(task, should_stop)
            finally:
                self.measured[task.label] = self.measured.get(task.label, 0.0) + time.perf_counter() - t0

        def timed_step() -> Any:  # noqa: ANN401
            batch = list(decoder.active.values())[: decoder.max_batch]
            pred = cost.a + sum(decode_token_seconds(cost, lr.request.num_prompt_tokens) for lr in batch)
            t0 = time.perf_counter()
            try:
                return step()
            finally:
                self.steps.append((len(batch), pred, time.perf_counter() - t0))

        engine.executor.run, engine.decoder.step = timed_run, timed_step  # this instance only

    def reset(self) -> None:
        """Forget what was timed so far (the warm-up)."""
        self.measured.clear()
        self.programs.clear()
        self.steps.clear()

    def program_samples(self) -> list[tuple[int, float, float]]:
        """``(sequences, predicted s, measured s)`` of every timed prefill program."""
        return [(*self.programs[k], self.measured[k]) for k in self.measured if self.programs.get(k, (0, 0))[1]]

    def summary(self) -> dict[str, Any]:
        """Measured against predicted seconds, and the fit ``measured = scale * predicted + overhead * (seqs - 1)``."""
        progs = self.program_samples()
        meas, pred = sum(x[2] for x in progs), sum(x[1] for x in progs)
        ratios = [x[2] / x[1] for x in progs]
        steps = [x[2] for x in self.steps]
        scale, overhead = fit_execution(progs)
        return {"prefill_measured_s": meas, "prefill_predicted_s": pred, "slowdown": meas / pred if pred else None,
                "slowdown_p10_p50_p90": [float(x) for x in np.percentile(ratios, [10, 50, 90])] if ratios else None,
                "decode_steps": len(steps), "decode_step_mean_s": float(np.mean(steps)) if steps else None,
                "decode_step_predicted_mean_s": float(np.mean([x[1] for x in self.steps])) if steps else None,
                "fit_exec_time_scale": scale, "fit_seq_overhead_s": overhead,
                "fit_decode_curve": [list(p) for p in fit_decode_curve(self.steps)],
                "programs": [list(x) for x in progs], "steps": [list(x) for x in self.steps]}


def fit_execution(samples: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Least squares ``measured = scale * predicted + overhead * (sequences - 1)`` with both ``>= 0``."""
    if not samples:
        return 1.0, 0.0
    a = np.array([[p, k - 1] for k, p, _ in samples], dtype=np.float64)
    y = np.array([m for _, _, m in samples], dtype=np.float64)
    (scale, overhead), *_ = np.linalg.lstsq(a, y, rcond=None)
    if overhead < 0 or scale <= 0:
        scale, overhead = float(a[:, 0] @ y / max(a[:, 0] @ a[:, 0], 1e-12)), 0.0
    return float(scale), float(overhead)


def fit_decode_curve(steps: list[tuple[int, float, float]]) -> tuple[tuple[int, float], ...]:
    """``(batch size, median measured seconds)`` for every batch size among ``(sequences, predicted s,
    measured s)`` decode steps, by increasing size."""
    by_size: dict[int, list[float]] = {}
    for k, _, measured in steps:
        by_size.setdefault(k, []).append(measured)
    return tuple((k, float(np.median(by_size[k]))) for k in sorted(by_size))


def _median(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.median(finite)) if finite else None


def real_percentiles(runs: list[list[float | None]]) -> dict[str, Any]:
    """The real replays' TTFTs (one list per run, in request order): each run's p50 and p90, their
    medians (what the simulation is compared with), and each request's median TTFT over the runs
    (None where some run never gave it a first token)."""
    per_run = [_percentiles([v for v in run if v is not None]) for run in runs]
    per_request = [_median(list(v)) if all(x is not None for x in v) else None for v in zip(*runs)]
    return {"ttft_p50_s": _median([p[0] for p in per_run]), "ttft_p90_s": _median([p[1] for p in per_run]),
            "runs_p50_p90_s": [list(p) for p in per_run], "per_request_s": per_request}


def _compare(real: dict[str, Any], sim_ttft: list[float | None], attainment: float) -> dict[str, Any]:
    real_ttft = real["per_request_s"]
    both = [i for i, (a, b) in enumerate(zip(real_ttft, sim_ttft)) if a is not None and b is not None]
    real_p50, real_p90 = real["ttft_p50_s"], real["ttft_p90_s"]
    sim_p50, sim_p90 = _percentiles([sim_ttft[i] for i in both])  # type: ignore[misc]
    per_req = [abs(sim_ttft[i] - real_ttft[i]) / real_ttft[i] for i in both]  # type: ignore[operator]
    return {"ttft_p50_s": sim_p50, "ttft_p90_s": sim_p90, "attainment": attainment,
            "rel_error_p50": _rel(sim_p50, real_p50), "rel_error_p90": _rel(sim_p90, real_p90),
            "per_request_median_rel_error": float(np.median(per_req)) if per_req else None, "compared": len(both),
            "ttft_s": list(sim_ttft)}  # per request, in the replay's order (None: no first token)


def per_class_comparison(runs: list[list[float | None]], sim_ttft: list[float | None],
                         classes: list[str]) -> dict[str, dict[str, float | None]]:
    """Per SLO class: the real replays' median p50 and p90 (each run's own percentiles over the class's
    finished requests, as for all requests), the simulation's, and their relative errors.

    The p50 over all requests can fall in the gap between two classes' TTFT clusters (short
    interactive prompts, long batch ones), where a few requests finishing earlier or later move it by
    seconds; within one class the percentiles are stable."""
    out: dict[str, dict[str, float | None]] = {}
    for name in dict.fromkeys(classes):
        members = [i for i, c in enumerate(classes) if c == name]
        real = real_percentiles([[run[i] for i in members] for run in runs])
        sim_p50, sim_p90 = _percentiles([sim_ttft[i] for i in members if sim_ttft[i] is not None])  # type: ignore[misc]
        out[name] = {"requests": len(members), "real_p50_s": real["ttft_p50_s"], "real_p90_s": real["ttft_p90_s"],
                     "sim_p50_s": sim_p50, "sim_p90_s": sim_p90, "rel_error_p50": _rel(sim_p50, real["ttft_p50_s"]),
                     "rel_error_p90": _rel(sim_p90, real["ttft_p90_s"])}
    return out


def scheduler_config_of(ecfg: Any) -> SchedulerConfig:  # noqa: ANN401 - an EngineConfig
    """The scheduler settings a real engine with ``ecfg`` (an :class:`~replicas.engine_config.EngineConfig`) runs."""
    return SchedulerConfig(policy=ecfg.policy, alpha=ecfg.alpha, short_threshold=ecfg.short_threshold,
                           batch_token_budget=ecfg.batch_token_budget, chunk_tokens=ecfg.policy_chunk_tokens,
                           max_suspended_batches=ecfg.max_suspended_batches,
                           admission_control=ecfg.admission_control, granularity=ecfg.granularity)


def exec_config_of(ecfg: Any, boundary_delay_s: float, decode_step_s: float | None = None,  # noqa: ANN401
                   decode_curve: tuple[tuple[int, float], ...] = ()) -> ExecConfig:
    """The simulated executor of a real engine with ``ecfg``: its decode batch cap and TPOT target."""
    return ExecConfig(boundary_delay_s=boundary_delay_s, default_tpot_slo_s=ecfg.default_tpot_slo_s,
                      max_decoding=ecfg.max_decoding, decode_step_s=decode_step_s, decode_curve=decode_curve)


def run_validation(trace: str, *, profile: str | None = None, model_dir: Path | None = None,
                   window_start_s: float = 0.0, window_s: float | None = None, max_requests: int = 60,
                   length_scale: float = 1 / 16, utilization: float = 0.6, seed: int = 0,
                   boundary_delay_s: float = 0.002, decode_step_s: float | None = None,
                   real_runs: int = 3) -> dict[str, Any]:
    """``real_runs`` real replays plus the simulation of the same requests; returns the comparison (JSON-ready)."""
    if real_runs < 1:
        raise ValueError(f"--validate-runs: need at least 1, got {real_runs}")
    from bench.decode_bench import measure_decode_steps
    from bench.policy_bench import PolicyBenchConfig, build_workload, policy_configs
    from bench.replay import replay, summarize
    from replicas.engine import ReplicaEngine
    from replicas.engine_config import EngineConfig
    from replicas.model.default_model import prepare_default_model

    model_dir = model_dir or prepare_default_model()
    base = EngineConfig(model=str(model_dir), profile=profile)
    pcfg = PolicyBenchConfig(trace=trace, window_start_s=window_start_s, window_s=window_s,
                             max_requests=max_requests, length_scale=length_scale, seed=seed)
    # the engine loads the model and its profile on its compute thread, and this process runs no
    # torch work on any other thread (see replicas.compute_thread)
    engine = ReplicaEngine(replace(base, **policy_configs(pcfg)["flowprefill"]))
    try:
        ecfg, model, cost = engine.config, engine.model, engine.cost_model
        requests, _ = build_workload(pcfg, engine.tokenizer, cost.predict)
        work_s = sum(cost.predict(len(r.prompt_ids)) for r in requests)
        scale = utilization * requests[-1].arrival_s / max(work_s, 1e-9)
        scaled = [replace(r, arrival_s=r.arrival_s / scale) for r in requests]

        decode = engine.run_on_compute_thread(lambda: measure_decode_steps(model, repeats=2))
        decode_curve = tuple((int(k), row["small_rows_ms"] / 1e3) for k, row in decode["by_batch"].items())
        timer = ExecutionTimer(engine, cost)
        engine.start()
        replay(engine, [replace(r, arrival_s=i * 0.01) for i, r in enumerate(scaled[:3])], drain_s=60, tag="warmup")
        timer.reset()
        counters0 = dict(engine.counters)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        run_results = [replay(engine, scaled, drain_s=30 + 3 * scaled[-1].arrival_s, tag=f"validate{k}")
                       for k in range(real_runs)]
        real_wall = time.perf_counter() - t0
        load1 = os.getloadavg()[0]
        counters = {k: v - counters0.get(k, 0) for k, v in engine.counters.items()}
    finally:
        engine.shutdown()
    measured = timer.summary()

    classes = [r.slo_class for r in scaled]
    wl = explicit_workload([r.arrival_s for r in scaled], [len(r.prompt_ids) for r in scaled],
                           [r.ttft_slo_s for r in scaled], cost.predict, max_tokens=[r.max_tokens for r in scaled],
                           priority=[c.priority for c in classes], slo_class=[c.name for c in classes],
                           sheddable=[c.sheddable for c in classes])
    sched = scheduler_config_of(ecfg)
    execution = exec_config_of(ecfg, boundary_delay_s, decode_step_s)
    fitted_curve = tuple((int(k), float(s)) for k, s in measured["fit_decode_curve"])
    variants = {
        "sim": replace(execution, decode_curve=decode_curve),
        "sim_marginal_decode": execution,
        "sim_calibrated": replace(execution, exec_time_scale=measured["fit_exec_time_scale"],
                                  seq_overhead_s=measured["fit_seq_overhead_s"], decode_curve=fitted_curve),
    }
    # explicit_workload keeps the (arrival) order of the replays' results
    real = real_percentiles([[r.ttft_s for r in results] for results in run_results])
    sims = {}
    for name, ex in variants.items():
        # one replica, no router in the real replay: round robin never sheds
        run = ClusterSim(SimSetup(cost, sched, ex, RouterConfig(policy="round_robin")), 1).run(wl, 1.0)
        sims[name] = {**_compare(real, run.ttft_s, run.attainment), "preemptions": run.preemptions,
                      "prefill_batches": run.prefill_batches, "decode_steps": run.decode_steps,
                      "per_class": per_class_comparison([[r.ttft_s for r in results] for results in run_results],
                                                        run.ttft_s, [c.name for c in classes])}
    summaries = [summarize(results) for results in run_results]
    report = {
        "trace": trace, "requests": len(scaled), "rate_scale": scale, "rate_rps": len(scaled) / scaled[-1].arrival_s,
        "utilization": utilization, "profile": {"model": cost.model, "hardware": cost.hardware,
                                                "fit_error": cost.fit_error},
        "real": {"ttft_p50_s": real["ttft_p50_s"], "ttft_p90_s": real["ttft_p90_s"],
                 "runs": real_runs, "runs_p50_p90_s": real["runs_p50_p90_s"],
                 "per_request_ttft_s": real["per_request_s"],  # median over the replays, per request
                 "runs_ttft_s": [[r.ttft_s for r in results] for results in run_results],
                 "slo_class": [c.name for c in classes],
                 "attainment": float(np.mean([x["attainment"] for x in summaries])),
                 "runs_attainment": [x["attainment"] for x in summaries],
                 "unfinished": sum(x["unfinished"] for x in summaries), "wall_s": real_wall, "counters": counters,
                 "execution": measured},
        **sims,
        "rel_error_p50": sims["sim"]["rel_error_p50"], "rel_error_p90": sims["sim"]["rel_error_p90"],
        "boundary_delay_s": boundary_delay_s, "decode_step_s": decode_step_s, "load_average": [load0, load1],
        "decode_curve_offline_s": [list(p) for p in decode_curve],
    }
    print_validation(report)
    return report


def print_validation(report: dict[str, Any]) -> None:
    """Real against simulated TTFT percentiles."""
    real, ex = report["real"], report["real"]["execution"]

    def fmt(v: float | None, pct: bool = False) -> str:
        return "-" if v is None else (f"{v:.1%}" if pct else f"{v:.3f}")

    print(f"\nvalidation: {report['requests']} requests at {report['rate_rps']:.2f} req/s "
          f"(predicted prefill utilisation {report['utilization']:.0%}), real replay {real['wall_s']:.0f} s, "
          f"load average {report['load_average'][0]:.1f} -> {report['load_average'][1]:.1f}")
    print(f"real execution: prefill {fmt(ex['slowdown'])}x the cost model (per program p10/p50/p90 "
          f"{[round(x, 2) for x in ex['slowdown_p10_p50_p90'] or []]}), decode step {fmt(ex['decode_step_mean_s'])} s "
          f"(model {fmt(ex['decode_step_predicted_mean_s'])} s); fit: x{ex['fit_exec_time_scale']:.3f} + "
          f"{ex['fit_seq_overhead_s'] * 1000:.1f} ms per extra sequence; counters {real['counters']}")
    curves = {"offline": report["decode_curve_offline_s"], "replay": ex["fit_decode_curve"]}
    print("decode step ms by batch size: " + "; ".join(
        f"{name} " + ", ".join(f"{k}: {s * 1e3:.0f}" for k, s in curve) for name, curve in curves.items()))
    print(f"{'':>15} {'TTFT p50 s':>11} {'TTFT p90 s':>11} {'attainment':>11} {'err p50':>8} {'err p90':>8}")
    label = "real" if real.get("runs", 1) == 1 else f"real (median of {real['runs']})"
    print(f"{label:>15} {fmt(real['ttft_p50_s']):>11} {fmt(real['ttft_p90_s']):>11} {real['attainment']:>11.3f}")
    if real.get("runs", 1) > 1:
        for k, ((p50, p90), att) in enumerate(zip(real["runs_p50_p90_s"], real["runs_attainment"])):
            print(f"{f'real run {k + 1}':>15} {fmt(p50):>11} {fmt(p90):>11} {att:>11.3f}")
    for name in ("sim", "sim_marginal_decode", "sim_calibrated"):
        r = report[name]
        print(f"{name:>15} {fmt(r['ttft_p50_s']):>11} {fmt(r['ttft_p90_s']):>11} {r['attainment']:>11.3f} "
              f"{fmt(r['rel_error_p50'], True):>8} {fmt(r['rel_error_p90'], True):>8}  (preemptions "
              f"{r['preemptions']}, prefill batches {r['prefill_batches']}, decode steps {r['decode_steps']})")
    print("per SLO class (real: median of the replays' percentiles), TTFT p50 / p90 s and errors:")
    for cls, row in report["sim"].get("per_class", {}).items():
        others = " ".join(f"{name} {fmt(report[name]['per_class'][cls]['rel_error_p50'], True)}/"
                          f"{fmt(report[name]['per_class'][cls]['rel_error_p90'], True)}"
                          for name in ("sim_marginal_decode", "sim_calibrated") if "per_class" in report[name])
        print(f"{cls:>15} ({row['requests']:>3}) real {fmt(row['real_p50_s'])} / {fmt(row['real_p90_s'])}, sim "
              f"{fmt(row['sim_p50_s'])} / {fmt(row['sim_p90_s'])}: {fmt(row['rel_error_p50'], True)} / "
              f"{fmt(row['rel_error_p90'], True)}; {others}")
