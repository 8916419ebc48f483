"""``flowprefill bench soak``: the trace at a steady fraction of goodput for minutes, watching for drift.

A FlowPrefill server (``flowprefill serve`` as a subprocess, as in ``bench serve``) receives the
trace window repeated back to back at ``fraction x goodput`` requests per second, open loop, for
``minutes``.  Every ``sample_s`` the bench records the resident memory of every process of the
server (the launcher, Ray's workers and actors, Redis), the requests finished, errors and TTFT
attainment of that interval.  The report says whether memory grew: the slope of a least-squares
line through the samples after the first quarter (warm-up), in MiB per minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.loadgen import LoadConfig, LoadRequest, RequestResult, run_load
from bench.outcomes import class_outcomes
from bench.serve_bench import engine_overrides, warm_up
from bench.serve_config import ServeBenchConfig, slo_classes
from bench.serve_workload import ServeWorkload, build_workload
from bench.servers import ManagedServer, max_cost_scale, server_spec


@dataclass(frozen=True)
class SoakConfig:
    """What to run: ``goodput_rps`` from ``bench serve`` (FlowPrefill's), ``fraction`` of it."""

    trace: str
    goodput_rps: float
    minutes: float = 10.0
    fraction: float = 0.8
    sample_s: float = 10.0
    max_requests: int = 32  # the window `bench serve --quick` measures goodput on (its requests, tiled)
    length_scale: float = 1 / 16
    max_output_tokens: int = 8
    seed: int = 0
    log_dir: str = "out/soak"

    def __post_init__(self) -> None:
        if not self.goodput_rps > 0 or not self.minutes > 0 or not 0 < self.fraction <= 10:
            raise ValueError("--goodput-rps and --minutes must be positive, --fraction in (0, 10]")


def window_workload(trace: str, model_dir: Path, max_requests: int, length_scale: float, max_output_tokens: int,
                    seed: int) -> ServeWorkload:
    """The trace window ``bench serve`` measures goodput on (from 29 s); ``.requests(k)`` is copy ``k``
    at rate scale 1, with prompts of its own (see :func:`tiled`)."""
    from replicas.model.tokenizer import Tokenizer

    cfg = ServeBenchConfig(trace=trace, systems=("flowprefill",), max_requests=max_requests,
                           length_scale=length_scale, max_output_tokens=max_output_tokens, seed=seed,
                           window_start_s=29.0)
    return build_workload(cfg, Tokenizer.from_dir(model_dir), slo_classes(None))


def window_requests(trace: str, model_dir: Path, max_requests: int, length_scale: float, max_output_tokens: int,
                    seed: int) -> list[LoadRequest]:
    """Copy 0 of :func:`window_workload`'s window."""
    return window_workload(trace, model_dir, max_requests, length_scale, max_output_tokens, seed).requests(0)


def tiled(requests: list[LoadRequest], rate_rps: float, duration_s: float,
          copies: Callable[[int], list[LoadRequest]] | None = None, first_copy: int = 0) -> list[LoadRequest]:
    """``requests`` repeated back to back at ``rate_rps`` on average until ``duration_s``.

    With ``copies``, copy ``k`` (numbered from ``first_copy``) sends ``copies(k)``'s prompts at
    ``requests``' arrivals: a prefix cache then hits only what a window shares within itself, never a
    prompt an earlier copy sent (the same prompts over and over would be served from the cache)."""
    span = max(requests[-1].arrival_s, 1e-9)
    scale = (max(len(requests) - 1, 1) / span) / rate_rps  # stretch factor of the inter-arrival gaps
    out: list[LoadRequest] = []
    offset = 0.0
    copy = first_copy
    while True:
        prompts = requests if copies is None or copy == 0 else copies(copy)
        for r, p in zip(requests, prompts, strict=True):
            t = offset + r.arrival_s * scale
            if t >= duration_s:
                return out
            out.append(replace(r, arrival_s=t, prompt=p.prompt, input_tokens=p.input_tokens))
        offset += span * scale + scale * span / max(len(requests) - 1, 1)
        copy += 1


def copies_used(requests: list[LoadRequest], tiled_out: list[LoadRequest]) -> int:
    """How many copies of ``requests`` :func:`tiled` started in ``tiled_out`` (the next ``first_copy``)."""
    return -(-len(tiled_out) // max(len(requests), 1))


def process_tree_rss_mib(root_pid: int) -> float:
    """Resident memory of ``root_pid`` and all its descendants (Linux /proc), in MiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total_kib, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kib / 1024.0


def _slope_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / var if var > 0 else 0.0


async def _soak(cfg: SoakConfig, base_url: str, model: str, requests: list[LoadRequest], root_pid: int,
                bar: Any) -> tuple[list[RequestResult], list[dict[str, Any]]]:  # noqa: ANN401
    done: list[RequestResult] = []
    samples: list[dict[str, Any]] = []
    load = asyncio.create_task(run_load(LoadConfig(base_url, model, drain_s=60.0), requests, on_done=done.append))
    t0, seen = time.perf_counter(), 0
    while not load.done():
        await asyncio.wait({load}, timeout=cfg.sample_s)
        window, seen = done[seen:], len(done)
        met = sum(r.met for r in window)
        errors = sum(r.error is not None and not r.error.startswith("cancelled") for r in window)
        refused = sum(r.status == 429 for r in window)
        samples.append({"t_s": time.perf_counter() - t0, "rss_mib": process_tree_rss_mib(root_pid),
                        "finished": len(window), "errors": errors, "refused_429": refused,
                        "attainment": met / len(window) if window else None,
                        "cost_scale": await asyncio.to_thread(max_cost_scale, base_url)})
        bar.update(len(window))
    return await load, samples


def run_soak(cfg: SoakConfig, model_dir: Path | None = None) -> dict[str, Any]:
    """Start the server, run the soak, stop it; returns the JSON report."""
    from tqdm import tqdm

    from replicas.model.default_model import prepare_default_model

    model_dir = model_dir or prepare_default_model()
    workload = window_workload(cfg.trace, model_dir, cfg.max_requests, cfg.length_scale, cfg.max_output_tokens,
                               cfg.seed)
    base = workload.requests(0)
    rate = cfg.fraction * cfg.goodput_rps
    requests = tiled(base, rate, cfg.minutes * 60.0, copies=workload.requests)
    work = Path(cfg.log_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec = server_spec("flowprefill", model_dir, model_dir.name, work_dir=work,
                       engine=engine_overrides(cfg.length_scale))
    with ManagedServer(spec, work / "server.log") as server:  # started and ready
        startup_s = server.startup_s
        assert server.proc is not None
        warm_up(spec.base_url, server.model_name, base, count=len(base))  # every prompt length once, unscored
        with tqdm(total=len(requests), desc=f"soak {cfg.minutes:g} min at {rate:.3g} req/s", unit="req") as bar:
            results, samples = asyncio.run(_soak(cfg, spec.base_url, server.model_name, requests,
                                                 server.proc.pid, bar))
    warm = [(s["t_s"], s["rss_mib"]) for s in samples if s["t_s"] >= 0.25 * cfg.minutes * 60.0]
    errors = [r.error for r in results if r.error is not None and not r.error.startswith("cancelled")]
    return {
        "config": asdict(cfg), "rate_rps": rate, "requests": len(results), "startup_s": startup_s,
        "completed": sum(r.error is None for r in results), "errors": len(errors), "error_examples": errors[:5],
        "cancelled": sum(r.error is not None and r.error.startswith("cancelled") for r in results),
        "attainment": sum(r.met for r in results) / max(len(results), 1), "classes": class_outcomes(results),
        "rss_mib_first": samples[0]["rss_mib"] if samples else None,
        "rss_mib_last": samples[-1]["rss_mib"] if samples else None,
        "rss_slope_mib_per_min_after_warmup": _slope_per_min(warm), "samples": samples,
    }


def print_soak(report: dict[str, Any]) -> None:
    """One line per sample, then the verdict."""
    print(f"{'t (s)':>7} {'RSS MiB':>9} {'finished':>9} {'errors':>7} {'429':>5} {'attainment':>11} {'cost x':>7}")
    for s in report["samples"]:
        att = "-" if s["attainment"] is None else f"{s['attainment']:.2f}"
        scale = "-" if s.get("cost_scale") is None else f"{s['cost_scale']:.2f}"
        print(f"{s['t_s']:>7.0f} {s['rss_mib']:>9.0f} {s['finished']:>9} {s['errors']:>7} {s.get('refused_429', 0):>5} "
              f"{att:>11} {scale:>7}")
    for name, row in report.get("classes", {}).items():
        reasons = sorted(row.get("refusal_reasons", {}).items(), key=lambda kv: -kv[1])[:3]
        print(f"{name:>12}: {row['requests']} requests, {row['completed']} completed, {row['met']} met "
              f"(attainment {row['attainment']}), {row['rejected_429']} refused"
              + "".join(f"\n{'':>14}{n} x {reason}" for reason, n in reasons))
    print(json.dumps({k: report[k] for k in ("rate_rps", "requests", "completed", "errors", "cancelled",
                                               "attainment", "rss_mib_first", "rss_mib_last",
                                               "rss_slope_mib_per_min_after_warmup")}, indent=1))
