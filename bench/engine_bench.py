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
- ``prefill_tflops`` and ``mfu``: the model FLOPs of one prefill at each length
  (:mod:`bench.flops`: GEMMs, causal attention pairs, the LM head on the last token) over the
  best time, and that over the chip's dense bf16 peak (``peak_tflops``: given, or detected from
  the CUDA device name; none on CPU unless given).
- ``preempt_latency_ms``: a background thread asks for a preemption at random moments while a
  long prefill runs; the latency is the time from the request until the device is free for
  other work: on CPU the executor returning, on CUDA the end of the operators it had already
  launched (up to ``max_inflight`` K of them, recorded with an event at every point). The
  program is resumed at once and asked again, so one run yields many samples. ``block`` runs
  at the engine's default K (2) and as ``block-K1``, ``block-K2``, ``block-K4``. Chunked
  execution (separate programs of C tokens, checked between chunks, the device synchronised at
  each boundary as an iteration-level scheduler does) is measured the same way for C in 256,
  512 and 2048.
- ``decode_step_ms``: one decode step per batch size, small-row GEMM path on and off
  (:mod:`bench.decode_bench`).
"""

from __future__ import annotations

import gc
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

from bench.decode_bench import DECODE_BATCHES, measure_decode_steps, print_decode
from bench.flops import detect_peak_tflops, prefill_flops
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
    max_inflight: tuple[int, ...] = (1, 2, 4)  # K for the block-K preemption rows
    decode_batches: tuple[int, ...] = DECODE_BATCHES
    decode_context: int = 150
    peak_tflops: float | None = None  # dense bf16 peak for MFU; None: detected from the CUDA device name
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

    # On a GPU, load straight onto it (an 8B model staged through host memory takes much longer).
    placement = {"device_map": str(model.device)} if model.device.type == "cuda" else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=model.dtype, attn_implementation="sdpa", **placement
    )
    hf = (hf if placement else hf.to(model.device)).eval()
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


def prefill_mfu(model: DecoderModel, tokens_per_s: dict[str, dict[str, float]],
                peak_tflops: float | None) -> dict[str, Any]:
    """Model FLOPs of each length's prefill, TFLOP/s per variant, and MFU against ``peak_tflops``."""
    flops = {n: prefill_flops(model.config, int(n)) for n in next(iter(tokens_per_s.values()))}
    tflops = {key: {n: flops[n].total * rate / int(n) / 1e12 for n, rate in rates.items()}
              for key, rates in tokens_per_s.items()}
    return {
        "flops": {n: {"linear": f.linear, "attention": f.attention, "lm_head": f.lm_head, "total": f.total}
                  for n, f in flops.items()},
        "tflops": tflops,
        "mfu": None if not peak_tflops else {
            key: {n: value / peak_tflops for n, value in rates.items()} for key, rates in tflops.items()},
    }


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


def _timeline_latencies(points: list[float], begin: float, end: float, draws: int, seed: int,
                        free_at: list[float] | None = None) -> list[float]:
    """Latency a request arriving uniformly in ``[begin, end)`` sees: from then until the device is
    free after the next point (``free_at[j]``: when point ``j``'s launched work has finished; on CPU
    the point itself). Points are host times, in order."""
    marks = np.array([*points, end])
    free = np.array([*(points if free_at is None else free_at), end])
    t = np.random.default_rng(seed).uniform(begin, end, draws)
    nxt = np.searchsorted(marks, t, side="left")
    return list(free[nxt] - t)


class _PointClock:
    """Host time of every preemption point and, on CUDA, when the device finished what was
    launched before it (an event per point, read against a start event after the run)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.points: list[float] = []
        self.events: list[torch.cuda.Event] = []
        self.begin = 0.0
        self.start: torch.cuda.Event | None = None

    def open(self) -> None:
        """Mark the start of a run (the device idle: synchronised before)."""
        if self.cuda:
            torch.cuda.synchronize()
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.begin = time.perf_counter()

    def mark(self) -> None:
        """A preemption point, now."""
        self.points.append(time.perf_counter())
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def free_at(self) -> list[float]:
        """When the device was free after each point (host clock; call after a synchronise)."""
        if not self.cuda or self.start is None:
            return list(self.points)
        # the start event ran at once on the idle device, at host time ~begin (within a launch)
        device = [self.begin + self.start.elapsed_time(e) / 1000 for e in self.events]
        return [max(h, d) for h, d in zip(self.points, device)]


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
    out["max_inflight_default"] = PreemptibleExecutor().max_inflight
    for index, (name, granularity, chunk, k) in enumerate(latency_configs(cfg)):
        executor = PreemptibleExecutor(granularity, max_inflight=k, device=model.device)
        measured: list[float] = []
        timeline: list[float] = []
        for run in range(cfg.latency_runs):
            clock = _PointClock(model.device)
            gap = whole / max(min(-(-n // chunk), 40) if granularity == "none" else 40, 2)
            with _PreemptionProbe(gap, seed=cfg.seed + 97 * index + run) as probe:

                def check(clock: _PointClock = clock, probe: _PreemptionProbe = probe) -> bool:
                    clock.mark()
                    return probe.should_stop()

                def served(probe: _PreemptionProbe = probe) -> None:
                    _sync(model.device)  # free only once the launched operators have run
                    probe.record_and_rearm()

                clock.open()
                for start in range(0, n, chunk):
                    task = executor.start(prefiller.program(ids, start, min(start + chunk, n), chunk))
                    while not executor.run(task, check):
                        served()
                    if start + chunk < n:  # a chunk boundary is a preemption point
                        _sync(model.device)  # an iteration-level scheduler waits for each chunk
                        if check():
                            served()
                _sync(model.device)
                end = time.perf_counter()
                if probe.should_stop():  # asked during the last stretch: served at completion
                    probe.record_and_rearm()
                measured += probe.samples
            timeline += _timeline_latencies(clock.points, clock.begin, end, 2000 // cfg.latency_runs,
                                            cfg.seed + run, clock.free_at())
            prefiller.reset()
            bar.update(1)
        out[name] = {**_latency_stats(timeline), "measured": _latency_stats(measured), "max_inflight": k}
    return out


def latency_configs(cfg: EngineBenchConfig) -> list[tuple[str, str, int, int]]:
    """``(row name, granularity, chunk tokens, K)`` of every preemption-latency row."""
    n, default_k = cfg.latency_tokens, PreemptibleExecutor().max_inflight
    rows = [(g.value, g.value, n, default_k) for g in Granularity]
    rows += [(f"block-K{k}", "block", n, k) for k in cfg.max_inflight]
    return rows + [(f"chunked-{c}", "none", c, default_k) for c in cfg.chunk_sizes]


def run_engine_bench(model_dir: Path, cfg: EngineBenchConfig, model: DecoderModel | None = None) -> dict[str, Any]:
    """Run every measurement, print a table, return the JSON report (``model``: ``model_dir`` already
    loaded in ``cfg``'s dtype and device, e.g. to profile it afterwards without loading 16 GB again)."""
    torch.manual_seed(cfg.seed)
    if model is None:
        model = DecoderModel.load(model_dir, dtype=cfg.dtype, device=cfg.device)
    steps = sum(map(cfg.repeats_at, cfg.lengths)) + len(latency_configs(cfg)) * cfg.latency_runs
    with tqdm(total=steps, desc="bench engine", unit="run") as bar:
        throughput = measure_throughput(model, model_dir, cfg, bar)
        if model.device.type == "cuda":  # the reference's weights (gigabytes) went with that call
            gc.collect()
            torch.cuda.empty_cache()
        latency = measure_preemption(model, cfg, bar)
        decode = measure_decode_steps(model, batches=cfg.decode_batches, context=cfg.decode_context,
                                      repeats=2 if cfg.quick else 3)
    lengths = [str(n) for n in cfg.lengths]
    cost = measure_checkpoint_cost(model, cfg.lengths, {n: int(n) / throughput["ours_none"][n] for n in lengths},
                                   points=20_000 if model.device.type == "cuda" else 200_000)  # an event each on CUDA
    peak, peak_source = cfg.peak_tflops, "given"
    if peak is None:
        peak, peak_source = (detect_peak_tflops(torch.cuda.get_device_name(model.device))
                             if model.device.type == "cuda" else (None, "no peak for a CPU unless given"))
    rates = {"ours": throughput["ours_none"], "ours_block": throughput["ours_block"],
             "transformers": throughput["transformers"]}
    flops = prefill_mfu(model, rates, peak)
    report = {
        "model": str(model_dir), "dtype": cfg.dtype, "device": cfg.device,
        "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "config": asdict(cfg),
        "parameters": model.num_parameters,
        "prefill_tokens_per_s": rates,
        "prefill_flops": flops["flops"],
        "prefill_tflops": flops["tflops"],
        "peak_tflops": peak, "peak_source": peak_source,
        "mfu": flops["mfu"],
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
    if "prefill_tflops" in report:
        mfu = report.get("mfu")
        peak = f"{report['peak_tflops']:.1f} TFLOP/s peak" if report.get("peak_tflops") else report["peak_source"]
        print(f"\nmodel FLOPs per prefill and MFU ({peak})")
        print(f"{'tokens':>8} {'GFLOP':>10} {'attn %':>7} {'ours TF/s':>10} {'block TF/s':>11} {'hf TF/s':>8} "
              f"{'MFU block':>10}")
        for n, f in report["prefill_flops"].items():
            tf = report["prefill_tflops"]
            mfu_text = f"{mfu['ours_block'][n]:>10.1%}" if mfu else f"{'-':>10}"
            print(f"{n:>8} {f['total'] / 1e9:>10.4g} {f['attention'] / f['total']:>7.1%} {tf['ours'][n]:>10.2f} "
                  f"{tf['ours_block'][n]:>11.2f} {tf['transformers'][n]:>8.2f} {mfu_text}")
    lat = report["preempt_latency_ms"]
    print(f"\npreemption latency, {lat['prompt_tokens']}-token prefill "
          f"(uninterrupted {lat['uninterrupted_s']:.2f} s)")
    print(f"{'mode':>14} {'K':>3} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'measured p50':>13} "
          f"{'measured max':>13} {'requests':>8}")
    for name, row in lat.items():
        if isinstance(row, dict):
            m = row["measured"]
            print(f"{name:>14} {row.get('max_inflight', '-'):>3} {row['p50']:>9.2f} {row['p99']:>9.2f} "
                  f"{row['max']:>9.2f} {m['p50']:>13.2f} {m['max']:>13.2f} {m['samples']:>8}")
    if "decode_step_ms" in report:
        print_decode(report["decode_step_ms"])
