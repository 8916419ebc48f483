"""Engine benchmark: prefill throughput, cost of preemption points, preemption latency, decode steps.

``flowprefill bench engine [--quick] [--json FILE]``

- ``prefill_tokens_per_s``: one prompt per length, our engine (granularity ``none`` and
  ``block``) and ``transformers`` on the same checkpoint, dtype and threads, measured
  interleaved (the order rotates every repeat) after one untimed run of each at that length
  (allocator warm-up: throughput rose ~30% over the first runs of a process), reported as the
  best of the repeats. Short lengths get more repeats (about 12 at 512 tokens, 3 at 8192).
- ``speedup_vs_transformers``: ``block`` (what the server runs) against transformers, and
  ``checkpoint_overhead``: ``1 - throughput(block) / throughput(none)``, both the **median of
  the per-repeat ratios**. The three runs of one repeat are adjacent in time, so a ratio within
  a repeat cancels the slow drift of a shared machine (run-to-run spread here is about 10%,
  more than the effects measured), and the median drops the repeats a neighbour disturbed.
  ``*_best`` keep the ratio of the best runs.
- ``checkpoint_cost``: the cost of the preemption points themselves, measured directly: a
  program that only yields, run at ``block`` granularity with the engine's kind of stop check
  (a queue emptiness test), gives microseconds per point; times the points in one pass at each
  length, over that pass's time, it is the overhead the points add (``direct_overhead``), free
  of the run-to-run noise above.
- ``preempt_latency_ms``: a background thread asks for a preemption at random moments while a
  long prefill runs; the latency is the time from the request to the executor returning (free
  for other work). The program is resumed at once and asked again, so one run yields many
  samples. Chunked execution (separate programs of C tokens, checked between chunks) is
  measured the same way for C in 256, 512 and 2048.
- ``decode_step_ms``: one decode step per batch size, small-row GEMM path on and off
  (:mod:`bench.decode_bench`).
"""

from __future__ import annotations

import queue
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bench.decode_bench import measure_decode_steps, print_decode
from replicas.executor import Granularity, PreemptibleExecutor
from replicas.kv_cache import PagedKVCache
from replicas.model.decoder import Boundary, DecoderModel
from replicas.programs import PrefillItem, prefill_program


@dataclass
class EngineBenchConfig:
    """What to measure; ``quick`` picks smaller sizes that finish within a minute."""

    quick: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    lengths: list[int] = field(default_factory=list)
    repeats: int = 0
    latency_tokens: int = 0
    latency_runs: int = 0
    chunk_sizes: tuple[int, ...] = (256, 512, 2048)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths:
            self.lengths = [128, 256, 512] if self.quick else [512, 2048, 8192]
        self.repeats = self.repeats or (2 if self.quick else 3)
        self.latency_tokens = self.latency_tokens or (768 if self.quick else 4096)
        self.latency_runs = self.latency_runs or (1 if self.quick else 2)

    def repeats_at(self, n: int) -> int:
        """Repeats at length ``n``: ``repeats`` at the longest length, more for shorter ones (cheap;
        not in ``quick`` runs, which must stay within a minute)."""
        if self.quick:
            return self.repeats
        return max(self.repeats, min(4 * self.repeats, round(self.repeats * max(self.lengths) / (2 * n))))


class _Prefiller:
    """Our engine reduced to what the benchmark needs: prefill one prompt, free its KV."""

    def __init__(self, model: DecoderModel, max_tokens: int) -> None:
        self.model = model
        spec = model.kv_spec()
        self.kv = PagedKVCache(spec, -(-max_tokens // spec.block_size) + 1, model.device)

    def program(self, ids: list[int], start: int = 0, end: int | None = None, chunk: int = 8192) -> Any:  # noqa: ANN401
        self.kv.allocator.ensure_capacity(0, len(ids))
        return prefill_program(self.model, self.kv, [PrefillItem(0, ids, start, end)], chunk)

    def reset(self) -> None:
        self.kv.allocator.free(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure_throughput(model: DecoderModel, model_dir: Path, cfg: EngineBenchConfig,
                       bar: tqdm) -> dict[str, Any]:
    """Tokens per second per length for ours (none, block) and transformers, interleaved."""
    import transformers  # slow import; only the benchmark needs it

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=model.dtype, attn_implementation="sdpa"
    ).to(model.device).eval()
    prefiller = _Prefiller(model, max(cfg.lengths))
    rng = random.Random(cfg.seed)
    executors = {g: PreemptibleExecutor(g, device=model.device) for g in ("none", "block")}
    result: dict[str, Any] = {"lengths": cfg.lengths, "ours_none": {}, "ours_block": {}, "transformers": {},
                              "speedup": {}, "overhead": {}, "repeats": {}}
    with torch.inference_mode():  # warm-up: first calls pay for allocator and kernel setup
        hf(torch.tensor([[1] * 64], device=model.device), logits_to_keep=1)
    executors["none"].run_to_completion(prefiller.program([1] * 64))
    prefiller.reset()
    for n in cfg.lengths:
        ids = [rng.randrange(model.config.vocab_size) for _ in range(n)]
        tensor = torch.tensor([ids], device=model.device)
        times: dict[str, list[float]] = {"ours_none": [], "ours_block": [], "transformers": []}

        def ours(g: str, ids: list[int] = ids) -> None:
            executors[g].run_to_completion(prefiller.program(ids))
            prefiller.reset()

        def reference(tensor: torch.Tensor = tensor) -> None:
            with torch.inference_mode():
                hf(tensor, logits_to_keep=1, use_cache=True)

        runs: dict[str, Callable[[], None]] = {
            "ours_none": lambda: ours("none"), "ours_block": lambda: ours("block"), "transformers": reference}
        order = list(runs)
        for key in order:  # untimed: glibc's mmap threshold adapts to the first frees of each size
            runs[key]()
        repeats = cfg.repeats_at(n)
        for r in range(repeats):
            # Rotate the order every repeat: a run pays for the allocator state the previous one
            # left (freed buffers, page faults), and no variant should always follow the same one.
            for key in order[r % 3:] + order[: r % 3]:
                times[key].append(_time(runs[key], model.device))
            bar.update(1)
        for key, seconds in times.items():
            result[key][str(n)] = n / min(seconds)
        t_none, t_block, t_ref = times["ours_none"], times["ours_block"], times["transformers"]
        result["speedup"][str(n)] = statistics.median(r / b for r, b in zip(t_ref, t_block))
        result["overhead"][str(n)] = statistics.median(1 - o / b for o, b in zip(t_none, t_block))
        result["repeats"][str(n)] = repeats
    return result


def _yield_only_program(points: int) -> Any:  # noqa: ANN401
    for _ in range(points):
        yield Boundary.BLOCK
    return None


def measure_checkpoint_cost(model: DecoderModel, lengths: list[int], seconds_none: dict[str, float],
                            points: int = 200_000) -> dict[str, Any]:
    """Microseconds per ``block`` preemption point, and the share of a pass they take at each length."""
    inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
    executor = PreemptibleExecutor("block", device=model.device)
    per_point: list[float] = []
    for _ in range(5):
        start = time.perf_counter()
        executor.run(executor.start(_yield_only_program(points)), lambda: not inbox.empty())
        per_point.append((time.perf_counter() - start) / points)
    cost_s = min(per_point)
    per_pass = 2 * model.config.num_layers  # block: after attention and after the MLP of each layer
    return {
        "per_point_us": cost_s * 1e6, "points_per_pass": per_pass,
        "direct_overhead": {n: per_pass * cost_s / seconds_none[n] for n in map(str, lengths)},
    }


class _PreemptionProbe:
    """A thread that asks for a preemption at random moments and timestamps each request."""

    def __init__(self, mean_gap_s: float, seed: int) -> None:
        self.mean_gap_s = mean_gap_s
        self.rng = random.Random(seed)
        self.flag = threading.Event()
        self.armed = threading.Event()
        self.stopped = threading.Event()
        self.requested_at = 0.0
        self.samples: list[float] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopped.is_set():
            self.armed.wait()
            self.armed.clear()
            if self.stopped.wait(self.rng.uniform(0, 2 * self.mean_gap_s)):
                return
            self.requested_at = time.perf_counter()
            self.flag.set()

    def __enter__(self) -> _PreemptionProbe:
        self.thread.start()
        self.armed.set()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.armed.set()
        self.thread.join(timeout=10)

    def should_stop(self) -> bool:
        return self.flag.is_set()

    def record_and_rearm(self) -> None:
        """Called when the executor returned after a request: log the latency, ask again later."""
        self.samples.append(time.perf_counter() - self.requested_at)
        self.flag.clear()
        self.armed.set()


def _latency_stats(samples_s: list[float]) -> dict[str, float | int]:
    ms = np.array(samples_s) * 1000 if samples_s else np.array([float("nan")])
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max()),
            "samples": len(samples_s)}


def _timeline_latencies(points: list[float], begin: float, end: float, draws: int, seed: int) -> list[float]:
    """Latency a request arriving uniformly in ``[begin, end)`` sees: time to the next point."""
    marks = np.array(sorted([*points, end]))
    t = np.random.default_rng(seed).uniform(begin, end, draws)
    nxt = marks[np.searchsorted(marks, t, side="left")]
    return list(nxt - t)


def measure_preemption(model: DecoderModel, cfg: EngineBenchConfig, bar: tqdm) -> dict[str, Any]:
    """Preemption latency per granularity and for chunked execution (milliseconds).

    Each run both serves real preemption requests from a probe thread (``measured``: request
    to executor-free, resumed at once) and records the time of every preemption point; the
    headline p50/p99/max come from 2000 request times drawn uniformly over the run against that
    measured timeline (enough samples for a p99), and ``measured`` validates them.
    """
    n = cfg.latency_tokens
    prefiller = _Prefiller(model, n)
    ids = [random.Random(cfg.seed + 1).randrange(model.config.vocab_size) for _ in range(n)]
    PreemptibleExecutor("none").run_to_completion(prefiller.program(ids[:64]))  # warm-up
    prefiller.reset()
    whole = _time(lambda: (PreemptibleExecutor("none").run_to_completion(prefiller.program(ids)),
                           prefiller.reset()), model.device)
    out: dict[str, Any] = {"prompt_tokens": n, "uninterrupted_s": whole,
                           "method": "timeline of measured preemption points, 2000 uniform request times"}
    configs: list[tuple[str, str, int]] = [(g.value, g.value, n) for g in Granularity]
    configs += [(f"chunked-{c}", "none", c) for c in cfg.chunk_sizes]
    for index, (name, granularity, chunk) in enumerate(configs):
        executor = PreemptibleExecutor(granularity, device=model.device)
        measured: list[float] = []
        timeline: list[float] = []
        for run in range(cfg.latency_runs):
            points: list[float] = []
            gap = whole / max(min(-(-n // chunk), 40) if granularity == "none" else 40, 2)
            with _PreemptionProbe(gap, seed=cfg.seed + 97 * index + run) as probe:

                def check(points: list[float] = points, probe: _PreemptionProbe = probe) -> bool:
                    points.append(time.perf_counter())
                    return probe.should_stop()

                begin = time.perf_counter()
                for start in range(0, n, chunk):
                    task = executor.start(prefiller.program(ids, start, min(start + chunk, n), chunk))
                    while not executor.run(task, check):
                        probe.record_and_rearm()
                    if start + chunk < n and check():  # a chunk boundary is a preemption point
                        probe.record_and_rearm()
                end = time.perf_counter()
                if probe.should_stop():  # asked during the last stretch: served at completion
                    probe.record_and_rearm()
                measured += probe.samples
            timeline += _timeline_latencies(points, begin, end, 2000 // cfg.latency_runs, cfg.seed + run)
            prefiller.reset()
            bar.update(1)
        out[name] = {**_latency_stats(timeline), "measured": _latency_stats(measured)}
    return out


def run_engine_bench(model_dir: Path, cfg: EngineBenchConfig) -> dict[str, Any]:
    """Run every measurement, print a table, return the JSON report."""
    torch.manual_seed(cfg.seed)
    model = DecoderModel.load(model_dir, dtype=cfg.dtype, device=cfg.device)
    steps = sum(map(cfg.repeats_at, cfg.lengths)) + (len(Granularity) + len(cfg.chunk_sizes)) * cfg.latency_runs
    with tqdm(total=steps, desc="bench engine", unit="run") as bar:
        throughput = measure_throughput(model, model_dir, cfg, bar)
        latency = measure_preemption(model, cfg, bar)
        decode = measure_decode_steps(model, repeats=2 if cfg.quick else 3)
    lengths = [str(n) for n in cfg.lengths]
    cost = measure_checkpoint_cost(model, cfg.lengths, {n: int(n) / throughput["ours_none"][n] for n in lengths})
    report = {
        "model": str(model_dir), "dtype": cfg.dtype, "device": cfg.device,
        "threads": torch.get_num_threads(), "config": asdict(cfg),
        "prefill_tokens_per_s": {
            "ours": throughput["ours_none"], "ours_block": throughput["ours_block"],
            "transformers": throughput["transformers"],
        },
        "speedup_vs_transformers": throughput["speedup"],
        "speedup_vs_transformers_best": {
            n: throughput["ours_block"][n] / throughput["transformers"][n] for n in lengths
        },
        "checkpoint_overhead": throughput["overhead"],
        "checkpoint_overhead_best": {
            n: 1 - throughput["ours_block"][n] / throughput["ours_none"][n] for n in lengths
        },
        "checkpoint_cost": cost,
        "repeats": throughput["repeats"],
        "preempt_latency_ms": latency,
        "decode_step_ms": decode,
    }
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    """The human-readable table."""
    tput = report["prefill_tokens_per_s"]
    print(f"\nprefill throughput ({report['model']}, {report['dtype']}, {report['device']}, "
          f"{report['threads']} threads)")
    cost = report["checkpoint_cost"]
    print(f"{'tokens':>8} {'ours tok/s':>11} {'ours block':>11} {'transformers':>13} {'speedup':>8} {'(best)':>7} "
          f"{'ckpt ovh':>9} {'(best)':>7} {'direct':>8} {'repeats':>7}")
    for n in tput["ours"]:
        print(f"{n:>8} {tput['ours'][n]:>11.1f} {tput['ours_block'][n]:>11.1f} {tput['transformers'][n]:>13.1f} "
              f"{report['speedup_vs_transformers'][n]:>8.3f} {report['speedup_vs_transformers_best'][n]:>7.3f} "
              f"{report['checkpoint_overhead'][n]:>9.3f} {report['checkpoint_overhead_best'][n]:>7.3f} "
              f"{cost['direct_overhead'][n]:>8.5f} {report['repeats'][n]:>7}")
    print(f"(speedup and ckpt ovh: median of per-repeat ratios; best: ratio of best runs; direct: "
          f"{cost['points_per_pass']} points x {cost['per_point_us']:.2f} us / pass time)")
    lat = report["preempt_latency_ms"]
    print(f"\npreemption latency, {lat['prompt_tokens']}-token prefill "
          f"(uninterrupted {lat['uninterrupted_s']:.2f} s)")
    print(f"{'mode':>14} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'measured p50':>13} {'measured max':>13} "
          f"{'requests':>8}")
    for name, row in lat.items():
        if isinstance(row, dict):
            m = row["measured"]
            print(f"{name:>14} {row['p50']:>9.1f} {row['p99']:>9.1f} {row['max']:>9.1f} "
                  f"{m['p50']:>13.1f} {m['max']:>13.1f} {m['samples']:>8}")
    if "decode_step_ms" in report:
        print_decode(report["decode_step_ms"])
