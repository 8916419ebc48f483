"""``scripts/gpu_check DIR``: prove the CUDA path on a GPU in one command (``--dry-run``: on the CPU).

Steps, each timed and reported even when another fails:

1. ``cuda_tests``: ``pytest -m cuda`` over every test file that uses the marker (found by
   scanning ``tests/``, so a new CUDA test anywhere is picked up): bf16 parity with
   transformers, bitwise suspend/resume in fp32 at K = 1, 2, 4, interleaving, KV accounting,
   launch-ahead, and the prefix-cache hook. On the CPU they skip and the report says why.
2. ``checkpoint``: a Llama-3.1-8B-shaped random checkpoint in bf16 (``PRESETS["llama3-8b"]``),
   drawn on the GPU and written shard by shard into ``/dev/shm`` when it has room (else the
   temporary directory); a tiny one of the same architecture in a dry run.
3. ``bench_engine``: :func:`bench.engine_bench.run_engine_bench` at 512/2048/8192 tokens: MFU
   against the GPU's dense bf16 peak (:mod:`bench.flops`), checkpoint overhead at ``block``,
   preemption latency at K = 1, 2, 4 beside chunked prefill at 256/512/2048, decode steps at
   batch 1, 8, 64.
4. ``profile``: the TTFT cost model of that model (:func:`replicas.profiling.profile_model`),
   written as ``DIR/<model>-<dtype>-<device>-<hardware>.json`` (bench/profiles/ format).

Writes ``DIR/gpu_check.json``, ``DIR/gpu_check.md`` (:mod:`bench.gpu_check_report`), the
profile, ``DIR/cuda_tests.xml`` and ``.log`` (pytest's) and ``DIR/gpu_check.log`` (everything
printed, and the traceback of a failed step). Exit 0 when every step ran and no CUDA test
failed (``--strict`` also needs the targets met), else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from replicas.model.decoder import DecoderModel

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480.0  # the whole check, on an H100/H200
STEPS = ("environment", "cuda_tests", "checkpoint", "bench_engine", "profile")
CUDA_MARK = re.compile(r"pytest\.mark\.cuda\b|from tests\.devices import")
#: The dry run's model: the 8B preset's architecture (llama3 RoPE, GQA 4:1, untied, padded
#: vocabulary) at tiny widths.
DRY_RUN_SHAPES: dict[str, Any] = dict(hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                                      intermediate_size=448, model_vocab_size=2048, num_shards=2)


@dataclass
class Plan:
    """What one gpu_check run does (a GPU run, or the CPU dry run with the same steps)."""

    out_dir: Path
    dry_run: bool
    device: str = "cuda"
    dtype: str = "bfloat16"
    lengths: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    repeats: int = 0  # 0: bench engine's default (3 at the longest length, more for shorter ones)
    latency_tokens: int = 4096
    latency_runs: int = 2
    decode_batches: tuple[int, ...] = (1, 8, 64)
    decode_context: int = 1024
    profile_max_tokens: int = 8192
    profile_repeats: int = 2
    peak_tflops: float | None = None
    work_dir: Path | None = None
    keep_checkpoint: bool = False
    skip_tests: bool = False
    strict: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        """The plan for the command line: a dry run shrinks repeats, the latency and profile prompts (2048
        tokens) and the decode context (256), not the steps, the prefill lengths or the report's keys."""
        plan = cls(out_dir=Path(args.dir), dry_run=args.dry_run, peak_tflops=args.peak_tflops,
                   work_dir=Path(args.work_dir) if args.work_dir else None, keep_checkpoint=args.keep_checkpoint,
                   skip_tests=args.skip_tests, strict=args.strict)
        if args.dry_run:
            plan.device, plan.repeats, plan.latency_runs, plan.profile_repeats = "cpu", 1, 1, 1
            plan.latency_tokens, plan.profile_max_tokens, plan.decode_context = 2048, 2048, 256
        return plan


class _Tee:
    """Writes to the console and the log file at once."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """Test files that use the ``cuda`` marker (directly or through tests/devices.py)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if CUDA_MARK.search(p.read_text(encoding="utf-8")))


def parse_junit(path: Path) -> list[dict[str, Any]]:
    """Every test case of a pytest JUnit XML file: id, outcome, reason, seconds."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        outcome, reason = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                reason = (node.get("message") or "").strip()
                break
        cases.append({"id": f"{module}.py::{case.get('name')}", "outcome": outcome, "reason": reason[:400],
                      "seconds": float(case.get("time") or 0.0)})
    return cases


def run_cuda_tests(plan: Plan) -> dict[str, Any]:
    """``pytest -m cuda`` in a child process (its own CUDA context), summarised per area."""
    from bench.gpu_check_report import TEST_AREAS, area_of

    files = cuda_test_files()
    xml = plan.out_dir / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
           f"--junitxml={xml}", *files]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if plan.dry_run:  # the CPU rehearsal, also on a machine with a GPU: the CUDA tests skip and say why
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    (plan.out_dir / "cuda_tests.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    print("\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]) or "(pytest printed nothing)")
    tests = parse_junit(xml) if xml.is_file() else []
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped", "error")}
    areas: dict[str, dict[str, Any]] = {}
    for area in [a for a, _ in TEST_AREAS] + ["other"]:
        mine = [t for t in tests if area_of(t["id"].split("::")[-1]) == area]
        reasons = sorted({t["reason"] for t in mine if t["outcome"] == "skipped"})
        areas[area] = {"passed": sum(t["outcome"] == "passed" for t in mine),
                       "failed": sum(t["outcome"] in ("failed", "error") for t in mine),
                       "skipped": sum(t["outcome"] == "skipped" for t in mine),
                       "note": "; ".join(reasons)[:300] if reasons else ("" if mine else "no test yet")}
    return {"marker": "cuda", "files": files, "command": " ".join(cmd[1:]), "exit_code": proc.returncode,
            "counts": {"passed": counts["passed"], "failed": counts["failed"], "skipped": counts["skipped"],
                       "errors": counts["error"]},
            "areas": areas, "tests": tests,
            "ok": proc.returncode == 0 and bool(tests) and not counts["failed"] and not counts["error"]}


def measure_gemm_tflops(device: str, dtype: str) -> float:
    """The matrix rate this device reaches on one square bf16 GEMM (8192 on CUDA, 1024 on CPU)."""
    import torch

    n, reps = (8192, 10) if device == "cuda" else (1024, 3)
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def environment(plan: Plan) -> dict[str, Any]:
    """Versions, the device, its datasheet peak (:mod:`bench.flops`) and its measured GEMM rate."""
    import torch

    from bench.flops import detect_peak_tflops

    cuda = plan.device == "cuda"
    name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine() or "cpu")
    peak, source = (plan.peak_tflops, "given (--peak-tflops)") if plan.peak_tflops else (None, "")
    gemm = measure_gemm_tflops(plan.device, plan.dtype)
    if peak is None and cuda:
        peak, source = detect_peak_tflops(name)
    if peak is None and not cuda:  # dry run: the measured GEMM rate stands in, so MFU is computed as on a GPU
        peak, source = gemm, "dry run: this CPU's measured GEMM rate stands in for a datasheet peak"
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": plan.device, "device_name": name, "peak_tflops": peak, "peak_source": source,
        "gemm_tflops": gemm, "threads": torch.get_num_threads(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
    return info


def _work_root(plan: Plan, need_bytes: int) -> Path:
    """Where the checkpoint goes: ``--work-dir``, else /dev/shm when it has room (memory speed),
    else the temporary directory."""
    if plan.work_dir is not None:
        return plan.work_dir
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1.25 * need_bytes:
        return shm
    return Path(tempfile.gettempdir())


def build_checkpoint(plan: Plan) -> tuple[Path, dict[str, Any]]:
    """The benchmark model: the 8B preset drawn on the GPU, its tiny twin on the CPU in a dry run."""
    from replicas.model.tiny import PRESETS, build_preset_checkpoint, preset_parameters

    overrides = {**(DRY_RUN_SHAPES if plan.dry_run else {}), "dtype": plan.dtype}
    shapes = {**PRESETS["llama3-8b"], **overrides}
    params = preset_parameters("llama3-8b", **overrides)
    element = 4 if plan.dtype == "float32" else 2
    name = "llama3-tiny-random" if plan.dry_run else "llama3-8b-random"
    path = Path(tempfile.mkdtemp(prefix="flowprefill-gpu-check-", dir=_work_root(plan, params * element))) / name
    start = time.perf_counter()
    build_preset_checkpoint(path, "llama3-8b", **overrides, device=plan.device)
    files = list(path.glob("*.safetensors"))
    return path, {
        "preset": "llama3-8b architecture at tiny widths (dry run)" if plan.dry_run else "llama3-8b",
        "dir": str(path), "dtype": plan.dtype, "drawn_on": plan.device, "build_s": time.perf_counter() - start,
        "bytes": sum(p.stat().st_size for p in files), "shards": len(files), "parameters": params,
        "shapes": {k: shapes[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                          "intermediate_size", "head_dim", "model_vocab_size", "rope_theta")},
    }


def run_bench(plan: Plan, model_dir: Path, model: DecoderModel) -> dict[str, Any]:
    """``bench engine`` on the benchmark model (loaded once: ``model``) with the plan's sizes."""
    from bench.engine_bench import EngineBenchConfig, run_engine_bench

    cfg = EngineBenchConfig(dtype=plan.dtype, device=plan.device, lengths=list(plan.lengths), repeats=plan.repeats,
                            latency_tokens=plan.latency_tokens, latency_runs=plan.latency_runs,
                            chunk_sizes=(256, 512, 2048), max_inflight=(1, 2, 4),
                            decode_batches=plan.decode_batches, decode_context=plan.decode_context,
                            peak_tflops=plan.peak_tflops)
    return run_engine_bench(model_dir, cfg, model)


def run_profile(plan: Plan, model: DecoderModel) -> dict[str, Any]:
    """The TTFT cost model of the benchmark model, saved in DIR under its profile-cache name."""
    import torch

    from replicas.cost_profiling import detect_hardware, profile_file_name
    from replicas.profiling import profile_model

    cost = profile_model(model, max_tokens=plan.profile_max_tokens, repeats=plan.profile_repeats, progress=False)

    threads = torch.get_num_threads() if plan.device == "cpu" else None
    name = profile_file_name(model.name, plan.dtype, plan.device, detect_hardware(plan.device), threads)
    cost.save(plan.out_dir / name)
    return {"file": name, "a": cost.a, "b": cost.b, "c": cost.c, "d": cost.d, "fit_error": dict(cost.fit_error),
            "hardware": cost.hardware, "predict_ms": {str(n): cost.predict(n) * 1e3 for n in plan.lengths}}


@contextlib.contextmanager
def _step(steps: dict[str, dict[str, Any]], name: str, log: TextIO) -> Iterator[dict[str, Any]]:
    """Time a step and keep going when it fails (the error is reported, the next step runs)."""
    record: dict[str, Any] = {"ok": False, "seconds": None, "error": None}
    steps[name] = record
    print(f"\n== gpu_check: {name}", flush=True)
    start = time.perf_counter()
    try:
        yield record
        record["ok"] = True
    except Exception as exc:  # reported in the JSON; the remaining steps still run
        record["error"] = f"{type(exc).__name__}: {exc}"[:500]
        log.write(traceback.format_exc())
        print(f"gpu_check: step {name} failed: {record['error']}", file=sys.stderr)
    finally:
        record["seconds"] = time.perf_counter() - start


def run_check(plan: Plan, log: TextIO) -> dict[str, Any]:
    """Every step; the JSON report (also what :func:`main` writes)."""
    import torch

    from bench.gpu_check_report import evaluate_targets, finite_or_none, summarize_bench

    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device here (use --dry-run on a CPU machine)")
    started, t0 = datetime.datetime.now(datetime.UTC), time.perf_counter()
    steps: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"schema": "flowprefill-gpu-check/1", "mode": "dry-run" if plan.dry_run else "cuda",
                              "started_at": started.isoformat(timespec="seconds"), "budget_s": BUDGET_S}
    with _step(steps, "environment", log):
        report["environment"] = environment(plan)
        plan.peak_tflops = report["environment"]["peak_tflops"]  # bench engine divides by the same peak
    tests: dict[str, Any] = {"marker": "cuda", "files": cuda_test_files(), "exit_code": None, "ok": False,
                             "counts": dict.fromkeys(("passed", "failed", "skipped", "errors"), 0),
                             "areas": {}, "tests": []}
    if not plan.skip_tests:
        with _step(steps, "cuda_tests", log):
            tests = run_cuda_tests(plan)
            if not tests["ok"]:
                raise RuntimeError(f"pytest -m cuda exited {tests['exit_code']}: {tests['counts']}")
    report["cuda_tests"] = tests
    model_dir, bench, profile = None, None, None
    report["checkpoint"] = {"preset": "-", "dir": None, "dtype": plan.dtype, "drawn_on": plan.device, "build_s": None,
                            "bytes": 0, "shards": 0, "shapes": {}, "parameters": 0}
    with _step(steps, "checkpoint", log):
        model_dir, report["checkpoint"] = build_checkpoint(plan)
        _free_device()
    model = None
    try:
        if model_dir is not None:
            with _step(steps, "bench_engine", log):
                from replicas.model.decoder import DecoderModel

                model = DecoderModel.load(model_dir, dtype=plan.dtype, device=plan.device)
                bench = run_bench(plan, model_dir, model)
                if bench["parameters"] != report["checkpoint"]["parameters"]:
                    raise RuntimeError(f"loaded {bench['parameters']} parameters, the preset has "
                                       f"{report['checkpoint']['parameters']}")
            _free_device()
            with _step(steps, "profile", log):
                if model is None:
                    raise RuntimeError("the model did not load (bench_engine failed)")
                profile = run_profile(plan, model)
    finally:
        if model_dir is not None and not plan.keep_checkpoint:
            shutil.rmtree(model_dir.parent, ignore_errors=True)
    summary = summarize_bench(bench) if bench is not None else None
    report.update(bench=summary, profile=profile, bench_engine=bench, steps=steps)
    report["targets"] = evaluate_targets(summary, binding=not plan.dry_run) if summary else []
    met = [t["pass"] for t in report["targets"]]
    report["targets_met"] = None if plan.dry_run or not met else all(m is True for m in met)
    expected = [s for s in STEPS if s != "cuda_tests" or not plan.skip_tests]
    report["ok"] = all(name in steps and steps[name]["ok"] for name in expected)
    report["elapsed_s"] = time.perf_counter() - t0
    report.setdefault("environment", {"python": platform.python_version(), "torch": "?", "cuda": None,
                                      "device": plan.device, "device_name": "?", "peak_tflops": None,
                                      "peak_source": "environment step failed", "gemm_tflops": None})
    return finite_or_none(report)


def _free_device() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``scripts/gpu_check``."""
    p = argparse.ArgumentParser(prog="scripts/gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="where gpu_check.json, gpu_check.md, cuda_tests.xml and the profile go")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with a tiny checkpoint")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU (default: from the device name, bench/flops.py)")
    p.add_argument("--work-dir", default=None, help="where the checkpoint is written (default: /dev/shm or tmp)")
    p.add_argument("--keep-checkpoint", action="store_true", help="leave the checkpoint in the work dir")
    p.add_argument("--skip-tests", action="store_true", help="leave out the CUDA tests (to iterate on the bench)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed too")
    return p


def main(argv: list[str] | None = None, run: Callable[[Plan, TextIO], dict[str, Any]] = run_check) -> int:
    """Run the check, write the JSON, the Markdown and the log; exit 0 when it proved the path."""
    from bench.gpu_check_report import render_markdown

    plan = Plan.from_args(build_parser().parse_args(argv))
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    with open(plan.out_dir / "gpu_check.log", "w", encoding="utf-8") as log:
        tee = _Tee(sys.stdout, log)
        with contextlib.redirect_stdout(tee):  # type: ignore[type-var]
            report = run(plan, log)
            (plan.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
            markdown = render_markdown(report)
            (plan.out_dir / "gpu_check.md").write_text(markdown)
            print("\n" + markdown)
            print(f"gpu_check: wrote {plan.out_dir}/gpu_check.json and gpu_check.md in {report['elapsed_s']:.0f} s; "
                  f"ok={report['ok']} targets_met={report['targets_met']}")
    if not report["ok"]:
        return 1
    return 1 if plan.strict and report["targets_met"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
