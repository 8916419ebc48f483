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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.decode_bench import DECODE_BATCHES, measure_decode_steps, print_decode
from bench.flops import detect_peak_tflops, prefill_flops
from bench.preemption_latency import Prefiller, latency_configs, measure_preemption, timed
from replicas.executor import PreemptibleExecutor
from replicas.model.decoder import Boundary, DecoderModel


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
    prefiller = Prefiller(model, max(cfg.lengths))
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
                times[key].append(timed(runs[key], model.device))
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
