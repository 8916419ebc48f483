"""``scripts/gpu_check``: its dry run on the CPU writes the report a GPU run writes, so it cannot rot.

The dry run (one subprocess, about 30 s on 2 cores) runs every step of the GPU check with a tiny
checkpoint of the 8B preset's architecture; the tests below read what it wrote.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu_check import STEPS, cuda_test_files, parse_junit
from bench.gpu_check_report import TEST_AREAS, area_of, evaluate_targets, render_markdown
from replicas.scheduler.cost_model import CostModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path, float]:
    out = tmp_path_factory.mktemp("gpu-check")
    start = time.perf_counter()
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check"), "--dry-run", str(out)], cwd=ROOT,
                          env={**os.environ, "GPU_CHECK_PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=400)
    return proc, out, time.perf_counter() - start


@pytest.fixture(scope="module")
def report(dry_run) -> dict:
    proc, out, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text())


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_dry_run_writes_the_json_the_table_the_profile_and_the_logs(dry_run, report):
    proc, out, seconds = dry_run
    names = {p.name for p in out.iterdir()}
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log", "cuda_tests.xml", "cuda_tests.log",
            report["profile"]["file"]} == names
    assert len(names) <= 8  # what a device run can bring back
    assert report["mode"] == "dry-run" and report["ok"] is True and report["targets_met"] is None
    assert list(report["steps"]) == list(STEPS) and all(s["ok"] and s["seconds"] > 0 for s in report["steps"].values())
    assert 0 < report["elapsed_s"] < seconds and "gpu_check: wrote" in proc.stdout
    print(f"gpu_check --dry-run took {seconds:.1f} s")


def test_every_number_is_finite_and_the_measured_ones_positive(report):
    assert all(math.isfinite(x) for x in _numbers(report))
    env = report["environment"]
    assert env["device"] == "cpu" and env["gemm_tflops"] > 0 and env["peak_tflops"] == env["gemm_tflops"]
    bench = report["bench"]
    assert bench["prefill"]["lengths"] == ["512", "2048", "8192"]
    for key in ("ours", "ours_block", "transformers"):
        for n in bench["prefill"]["lengths"]:
            assert bench["prefill"]["tokens_per_s"][key][n] > 0 and bench["prefill"]["tflops"][key][n] > 0
            assert 0 < bench["prefill"]["mfu"][key][n] < 5  # a tiny model against this CPU's own GEMM rate
    assert all(-5 < v < 5 for v in bench["checkpoint_overhead"]["block"].values())
    assert all(v > 0 for v in bench["checkpoint_overhead"]["direct"].values())
    rows = bench["preemption_ms"]["rows"]
    for name in ("block-K1", "block-K2", "block-K4", "chunked-256", "chunked-512", "chunked-2048"):
        assert 0 < rows[name]["p50"] <= rows[name]["p99"] <= rows[name]["max"], name
    assert [rows[f"block-K{k}"]["K"] for k in (1, 2, 4)] == [1, 2, 4]
    assert list(bench["decode_step_ms"]["by_batch"]) == ["1", "8", "64"]
    assert all(ms > 0 for ms in bench["decode_step_ms"]["by_batch"].values())
    ck = report["checkpoint"]
    assert ck["parameters"] == report["bench_engine"]["parameters"] > 0
    assert 0 < ck["bytes"] - 2 * ck["parameters"] < 1 << 16  # bf16 weights plus the safetensors headers
    assert ck["shapes"]["num_heads"] // ck["shapes"]["num_kv_heads"] == 4 and ck["shapes"]["rope_theta"] == 500000.0


def test_the_cuda_tests_are_reported_skipped_on_the_cpu_with_the_reason(report):
    tests = report["cuda_tests"]
    assert tests["exit_code"] == 0 and tests["ok"] is True
    assert set(tests["files"]) >= {"tests/test_cuda_path.py", "tests/test_model_equivalence.py",
                                   "tests/test_preemption.py"}
    assert tests["counts"]["skipped"] == len(tests["tests"]) > 20 and tests["counts"]["passed"] == 0
    assert all("needs a CUDA device" in t["reason"] for t in tests["tests"])
    for area in ("parity", "suspend_resume", "interleaving", "kv_accounting", "launch_ahead", "prefix_cache"):
        assert tests["areas"][area]["skipped"] > 0, area
    assert tests["areas"]["other"]["skipped"] == 0  # every CUDA test is named after its area
    ids = [t["id"] for t in tests["tests"]]
    assert sum("bf16_parity" in i and "-cuda]" in i for i in ids) == 5  # every architecture
    assert sum("suspend_at_every_point" in i for i in ids) == 9  # 3 granularities x K = 1, 2, 4


def test_the_profile_is_a_cost_model_bench_sim_can_load(dry_run, report):
    _, out, _ = dry_run
    cost = CostModel.load(out / report["profile"]["file"])
    assert cost.model == "llama3-tiny-random" and cost.dtype == "bfloat16" and cost.device == "cpu"
    assert 0 < cost.predict(512) < cost.predict(8192)
    assert report["profile"]["predict_ms"]["8192"] == pytest.approx(cost.predict(8192) * 1e3)  # extrapolated


def test_the_markdown_is_rendered_from_the_json_and_shows_targets_beside_values(dry_run, report):
    _, out, _ = dry_run
    md = (out / "gpu_check.md").read_text()
    assert md == render_markdown(report)
    for heading in ("## Targets", "## Steps", "## CUDA tests", "## Prefill", "## Preemption latency",
                    "## Decode step", "## TTFT cost model"):
        assert heading in md
    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == {"prefill MFU at 2048+ tokens (block)", "checkpoint overhead at block",
                            "preemption p99 at K = 2 (block)"}
    assert all(t["measured"] is not None and t["pass"] in (True, False) and not t["binding"] for t in targets.values())
    assert "| checkpoint overhead at block | <= 3% |" in md and "(not binding)" in md
    assert "| block-K2 | 2 |" in md and "| chunked-2048 | 2 |" in md


def test_targets_pass_and_fail_on_the_measured_values():
    summary = {
        "prefill": {"lengths": ["512", "2048", "8192"],
                    "mfu": {"ours_block": {"512": 0.2, "2048": 0.55, "8192": 0.49}}},
        "checkpoint_overhead": {"block": {"512": 0.031, "2048": 0.01, "8192": 0.0}},
        "preemption_ms": {"prompt_tokens": 4096, "rows": {"block-K2": {"p99": 4.9}}},
    }
    mfu, overhead, p99 = evaluate_targets(summary, binding=True)
    assert (mfu["measured"], mfu["pass"], mfu["detail"]) == (0.49, False, "lowest at 8192 tokens")  # 512 not judged
    assert (overhead["measured"], overhead["pass"]) == (0.031, False)
    assert (p99["measured"], p99["pass"], p99["binding"]) == (4.9, True, True)
    summary["prefill"]["mfu"] = None  # no peak known for the device
    assert evaluate_targets(summary, binding=True)[0]["pass"] is None


def test_a_test_file_using_the_marker_is_picked_up_and_areas_follow_test_names(tmp_path):
    assert {"tests/test_cuda_path.py", "tests/test_preemption.py"} <= set(cuda_test_files())
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_prefix.py").write_text("@pytest.mark.cuda\ndef test_prefix_cache_hit(): ...\n")
    (tmp_path / "tests" / "test_plain.py").write_text("def test_x(): ...\n")
    assert cuda_test_files(tmp_path) == ["tests/test_prefix.py"]
    assert area_of("test_prefix_cache_hit_equals_cold[cuda]") == "prefix_cache"
    assert area_of("test_bf16_parity_with_transformers[cuda-llama]") == "parity"
    assert area_of("test_something_else") == "other"
    assert [a for a, _ in TEST_AREAS][-1] == "prefix_cache"


def test_junit_cases_become_outcomes_with_reasons(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok" time="0.5"/>'
                   '<testcase classname="tests.test_a" name="test_skip[cuda]" time="0">'
                   '<skipped message="needs a CUDA device">x</skipped></testcase>'
                   '<testcase classname="tests.test_b" name="test_bad" time="1"><failure message="boom"/></testcase>'
                   '</testsuite></testsuites>')
    assert parse_junit(xml) == [
        {"id": "tests/test_a.py::test_ok", "outcome": "passed", "reason": "", "seconds": 0.5},
        {"id": "tests/test_a.py::test_skip[cuda]", "outcome": "skipped", "reason": "needs a CUDA device",
         "seconds": 0.0},
        {"id": "tests/test_b.py::test_bad", "outcome": "failed", "reason": "boom", "seconds": 1.0},
    ]


def test_every_stored_profile_loads_as_a_cost_model():
    for path in sorted((ROOT / "bench" / "profiles").glob("*.json")):
        cost = CostModel.load(path)
        assert cost.predict(2048) > 0, path.name
