"""What ``scripts/gpu_check`` reports: the summary of a ``bench engine`` run, the targets, the Markdown.

The JSON (:func:`summarize_bench`, :func:`evaluate_targets`) and the Markdown table
(:func:`render_markdown`, rendered from that JSON alone) have the same keys in a GPU run and in
a ``--dry-run`` on the CPU, so the test suite's dry run checks the format a GPU run will write.
"""

from __future__ import annotations

import math
from typing import Any

#: The CUDA path's targets (issue #21), checked against a GPU run's numbers.
MFU_MIN, MFU_FROM_TOKENS = 0.50, 2048
CHECKPOINT_OVERHEAD_MAX = 0.03
PREEMPT_P99_MAX_MS, PREEMPT_K = 5.0, 2

#: Areas of the CUDA tests, by a word in the test's name (tests/devices.py says how to name one).
TEST_AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("parity", ("parity", "match_transformers", "matches_transformers")),
    ("suspend_resume", ("suspend", "never_stops")),
    ("interleaving", ("interleav",)),
    ("kv_accounting", ("kv_account",)),
    ("launch_ahead", ("launch_ahead",)),
    ("prefix_cache", ("prefix_cache",)),
)


def area_of(test_name: str) -> str:
    """The area a CUDA test counts under (``other`` when its name names none)."""
    name = test_name.lower()
    for area, words in TEST_AREAS:
        if any(w in name for w in words):
            return area
    return "other"


def finite_or_none(value: Any) -> Any:  # noqa: ANN401
    """``value`` with every NaN or infinity (anywhere inside) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def summarize_bench(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a ``bench engine`` report (the full report stays beside them)."""
    lat = report["preempt_latency_ms"]
    return {
        "prefill": {
            "lengths": [str(n) for n in report["config"]["lengths"]],
            "tokens_per_s": report["prefill_tokens_per_s"],
            "tflops": report["prefill_tflops"],
            "mfu": report["mfu"],
            "flops": {n: f["total"] for n, f in report["prefill_flops"].items()},
            "attention_share": {n: f["attention"] / f["total"] for n, f in report["prefill_flops"].items()},
        },
        "checkpoint_overhead": {
            "block": report["checkpoint_overhead"],
            "block_best": report["checkpoint_overhead_best"],
            "direct": report["checkpoint_cost"]["direct_overhead"],
            "per_point_us": report["checkpoint_cost"]["per_point_us"],
        },
        "preemption_ms": {
            "prompt_tokens": lat["prompt_tokens"],
            "rows": {name: {"K": row["max_inflight"], "p50": row["p50"], "p99": row["p99"], "max": row["max"],
                            "measured_p50": row["measured"]["p50"], "measured_requests": row["measured"]["samples"]}
                     for name, row in lat.items() if isinstance(row, dict)},
        },
        "decode_step_ms": {
            "context": report["decode_step_ms"]["context"],
            "by_batch": {b: row["small_rows_ms"] for b, row in report["decode_step_ms"]["by_batch"].items()},
        },
    }


def _target(name: str, required: str, measured: float | None, ok: bool | None, detail: str) -> dict[str, Any]:
    return {"name": name, "required": required, "measured": measured, "pass": ok, "detail": detail}


def evaluate_targets(summary: dict[str, Any], binding: bool) -> list[dict[str, Any]]:
    """Each target with the measured value and pass/fail (None where it could not be measured)."""
    targets = []
    mfu = summary["prefill"]["mfu"]
    long = [n for n in summary["prefill"]["lengths"] if int(n) >= MFU_FROM_TOKENS]
    if mfu and long:
        worst = min(long, key=lambda n: mfu["ours_block"][n])
        value = mfu["ours_block"][worst]
        targets.append(_target(f"prefill MFU at {MFU_FROM_TOKENS}+ tokens (block)", f">= {MFU_MIN:.0%}", value,
                               value >= MFU_MIN, f"lowest at {worst} tokens"))
    else:
        targets.append(_target(f"prefill MFU at {MFU_FROM_TOKENS}+ tokens (block)", f">= {MFU_MIN:.0%}", None, None,
                               "no peak to divide by" if not mfu else f"no length >= {MFU_FROM_TOKENS}"))
    overhead = summary["checkpoint_overhead"]["block"]
    worst = max(overhead, key=lambda n: overhead[n])
    targets.append(_target("checkpoint overhead at block", f"<= {CHECKPOINT_OVERHEAD_MAX:.0%}", overhead[worst],
                           overhead[worst] <= CHECKPOINT_OVERHEAD_MAX, f"highest at {worst} tokens"))
    row = summary["preemption_ms"]["rows"].get(f"block-K{PREEMPT_K}")
    p99 = None if row is None else row["p99"]
    targets.append(_target(f"preemption p99 at K = {PREEMPT_K} (block)", f"< {PREEMPT_P99_MAX_MS:g} ms", p99,
                           None if p99 is None or not math.isfinite(p99) else p99 < PREEMPT_P99_MAX_MS,
                           f"{summary['preemption_ms']['prompt_tokens']}-token prefill"))
    for t in targets:
        t["binding"] = binding
    return targets


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:  # noqa: ANN401
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _pass(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown table of a gpu_check JSON report (every number in it comes from the JSON)."""
    env, lines = report["environment"], []
    dry = report["mode"] == "dry-run"
    lines += [f"# gpu_check: {report['mode']} on {env['device_name']}", "",
              f"torch {env['torch']}, CUDA {env['cuda'] or '-'}, python {env['python']}; "
              f"peak bf16 {_fmt(env['peak_tflops'], '.1f')} TFLOP/s ({env['peak_source']}); "
              f"measured GEMM {_fmt(env['gemm_tflops'], '.1f')} TFLOP/s; "
              f"{report['elapsed_s']:.0f} s in all (budget {report['budget_s']:.0f} s). "
              f"ok: {report['ok']}; targets met: {report['targets_met']}", ""]
    if dry:
        lines += ["Dry run on the CPU with a tiny checkpoint: the steps and the format of a GPU run; "
                  "its numbers are not the GPU's and its targets bind nothing.", ""]
    lines += ["## Targets", "", "| target | required | measured | result | note |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        pct = "MFU" in t["name"] or "overhead" in t["name"]
        value = _fmt(t["measured"] * 100 if pct and t["measured"] is not None else t["measured"], ".2f",
                     "%" if pct else " ms")
        result = _pass(t["pass"]) + ("" if t["binding"] else " (not binding)")
        lines.append(f"| {t['name']} | {t['required']} | {value} | {result} | {t['detail']} |")
    lines += ["", "## Steps", "", "| step | ok | seconds | error |", "|---|---|---|---|"]
    for name, step in report["steps"].items():
        lines.append(f"| {name} | {step['ok']} | {_fmt(step['seconds'], '.1f')} | {step['error'] or ''} |")
    tests = report["cuda_tests"]
    lines += ["", f"## CUDA tests (`pytest -m {tests['marker']}`, exit {tests['exit_code']})", "",
              "| area | passed | failed | skipped | note |", "|---|---|---|---|---|"]
    for area, row in tests["areas"].items():
        lines.append(f"| {area} | {row['passed']} | {row['failed']} | {row['skipped']} | {row['note']} |")
    c = tests["counts"]
    lines.append(f"| **all** | {c['passed']} | {c['failed'] + c['errors']} | {c['skipped']} | |")
    ck = report["checkpoint"]
    lines += ["", "## Benchmark model", "",
              f"{ck['preset']}: {ck['parameters'] / 1e9:.3g} B parameters, {ck['bytes'] / 2**30:.2f} GiB "
              f"{ck['dtype']}, drawn on {ck['drawn_on']} and written in {_fmt(ck['build_s'], '.1f')} s; "
              + ", ".join(f"{k} {v}" for k, v in ck["shapes"].items())]
    bench = report["bench"]
    if bench is None:
        lines += ["", "(bench engine did not run)"]
    else:
        pre, ovh = bench["prefill"], bench["checkpoint_overhead"]
        mfu = pre["mfu"]
        lines += ["", "## Prefill", "",
                  "| tokens | ours tok/s | block tok/s | transformers tok/s | block TFLOP/s | MFU block | MFU ours "
                  "| MFU transformers | attention FLOPs | ckpt overhead (median) | (direct) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in pre["lengths"]:
            tps, tf = pre["tokens_per_s"], pre["tflops"]
            lines.append(
                f"| {n} | {_fmt(tps['ours'][n], '.0f')} | {_fmt(tps['ours_block'][n], '.0f')} | "
                f"{_fmt(tps['transformers'][n], '.0f')} | {_fmt(tf['ours_block'][n], '.1f')} | "
                + " | ".join(_fmt(mfu[k][n] * 100, '.1f', '%') if mfu else "-"
                             for k in ("ours_block", "ours", "transformers"))
                + f" | {pre['attention_share'][n]:.1%} | {_fmt(ovh['block'][n] * 100, '.2f', '%')} | "
                f"{_fmt(ovh['direct'][n] * 100, '.3f', '%')} |")
        pm = bench["preemption_ms"]
        lines += ["", f"## Preemption latency ({pm['prompt_tokens']}-token prefill, ms until the device is free)",
                  "", "| mode | K | p50 | p99 | max | measured p50 | requests |", "|---|---|---|---|---|---|---|"]
        for name, row in pm["rows"].items():
            lines.append(f"| {name} | {row['K']} | {_fmt(row['p50'])} | {_fmt(row['p99'])} | {_fmt(row['max'])} | "
                         f"{_fmt(row['measured_p50'])} | {row['measured_requests']} |")
        dec = bench["decode_step_ms"]
        lines += ["", f"## Decode step (context {dec['context']})", "", "| batch | ms |", "|---|---|"]
        lines += [f"| {b} | {_fmt(ms)} |" for b, ms in dec["by_batch"].items()]
    prof = report["profile"]
    lines += ["", "## TTFT cost model", ""]
    if prof is None:
        lines.append("(profile did not run)")
    else:
        err = prof["fit_error"]
        lines.append(f"`{prof['file']}` (bench/profiles/ format): a={prof['a']:.4g} b={prof['b']:.4g} "
                     f"c={prof['c']:.4g} d={prof['d']:.4g}; held-out error median {_fmt(err.get('median_rel'), '.1%')},"
                     f" p90 {_fmt(err.get('p90_rel'), '.1%')}; predicted TTFT "
                     + ", ".join(f"{n} tokens {ms:.2f} ms" for n, ms in prof["predict_ms"].items()))
    return "\n".join(lines) + "\n"
