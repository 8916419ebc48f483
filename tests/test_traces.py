"""Tests for bench.traces and bench.slo_classes.

The Azure LLM inference trace 2023 (CC-BY 4.0) is by Patel et al., "Splitwise: Efficient generative
LLM inference using phase splitting", ISCA 2024.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.slo_classes import (
    DEFAULT_CLASS_SPEC,
    THREE_TIER_RULE,
    LengthRule,
    assign_classes,
    classes_for_predictor,
    classes_from_reference,
    request_ttft_slos,
    ttft_slo_for,
)
from bench.traces import Trace, TraceFormatError, TraceRequest, load_trace
from router.slo import SLOClass

AZURE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "azure_llm_2023"
needs_azure = pytest.mark.skipif(
    not (AZURE / "stats.json").is_file(),
    reason=f"Azure traces not found at {AZURE} (shared/ is not checked out beside the repo)")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _trace(*rows: tuple[float, int, int]) -> Trace:
    return Trace(tuple(TraceRequest(*r) for r in rows), "synthetic")


# ---------------------------------------------------------------- real Azure traces


@needs_azure
@pytest.mark.parametrize("kind,rows", [("code", 8819), ("conv", 19366)])
def test_azure_traces_match_stats(kind: str, rows: int) -> None:
    name = f"AzureLLMInferenceTrace_{kind}.csv"
    stats = json.loads((AZURE / "stats.json").read_text())[name]
    tr = load_trace(AZURE / name)
    assert len(tr) == rows == stats["input"]["n"]
    assert tr.requests[0].arrival_s == 0.0
    assert tr.duration_s == pytest.approx(stats["arrival"]["span_s"], rel=1e-9)
    s = tr.summary()
    assert s["rate_rps"] == pytest.approx(stats["arrival"]["rate_rps"], rel=1e-9)
    for field in ("input", "output"):
        for key in ("mean", "p50", "p90", "p99", "min", "max"):
            assert s[field][key] == pytest.approx(stats[field][key], rel=1e-6), (field, key)


@needs_azure
def test_azure_auto_detect_and_explicit_format_agree() -> None:
    p = AZURE / "AzureLLMInferenceTrace_code.csv"
    assert load_trace(p).requests == load_trace(p, fmt="azure").requests


# ---------------------------------------------------------------- formats


def test_azure_format_rebases_and_parses_7_digit_fractions(tmp_path: Path) -> None:
    p = _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
               "2023-11-16 23:59:59.9000000,10,1\n2023-11-17 00:00:00.1500001,20,0\n")
    tr = load_trace(p)
    assert [r.input_tokens for r in tr] == [10, 20] and [r.output_tokens for r in tr] == [1, 0]
    assert tr.requests[0].arrival_s == 0.0
    assert tr.requests[1].arrival_s == pytest.approx(0.2500001, abs=1e-12)


def test_generic_csv_and_jsonl(tmp_path: Path) -> None:
    c = _write(tmp_path, "g.csv", "input_tokens,arrival_s,output_tokens,note\n5,0.5,2,x\n\n7,1.5,3,y\n")
    j = _write(tmp_path, "g.jsonl", '{"arrival_s": 0.5, "input_tokens": 5, "output_tokens": 2}\n\n'
               '{"arrival_s": 1.5, "input_tokens": 7.0, "output_tokens": 3, "extra": [1]}\n')
    expected = (TraceRequest(0.5, 5, 2), TraceRequest(1.5, 7, 3))
    assert load_trace(c).requests == expected
    assert load_trace(j).requests == expected
    assert load_trace(c, fmt="csv").requests == expected


def test_mooncake_ms_to_seconds(tmp_path: Path) -> None:
    # hash_ids name 512-token blocks: 6955 tokens take 14 (tests/test_trace_prefixes.py covers them)
    p = _write(tmp_path, "m.jsonl", '{"timestamp": 0, "input_length": 6955, "output_length": 52, '
               f'"hash_ids": {list(range(14))}}}\n{{"timestamp": 27482, "input_length": 6472, "output_length": 26}}\n')
    tr = load_trace(p)
    assert tr.requests == (TraceRequest(0.0, 6955, 52, tuple(range(14))), TraceRequest(27.482, 6472, 26))
    # Auto-detection does not depend on the extension for JSON content.
    q = _write(tmp_path, "m.txt", p.read_text())
    assert load_trace(q).requests == tr.requests


def test_unknown_format_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(_write(tmp_path, "x.csv", "arrival_s,input_tokens,output_tokens\n0,1,1\n"), fmt="parquet")


# ---------------------------------------------------------------- malformed files

AZ_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZ_ROW = "2023-11-16 18:17:03.9799600,4808,10\n"


@pytest.mark.parametrize("name,text,line,where,detail", [
    ("bad_int.csv", AZ_HEAD + AZ_ROW + "2023-11-16 18:17:04.0000000,abc,8\n", 3, "column 'ContextTokens'",
     "expected a positive integer, got 'abc'"),
    ("neg.csv", AZ_HEAD + AZ_ROW * 2 + "2023-11-16 18:17:04.0000000,5,-3\n", 4, "column 'GeneratedTokens'",
     "expected a non-negative integer, got '-3'"),
    ("zero_in.csv", AZ_HEAD + "2023-11-16 18:17:04.0000000,0,3\n", 2, "column 'ContextTokens'",
     "positive integer"),
    ("bad_ts.csv", AZ_HEAD + "2023-11-16T25:00:00,5,3\n", 2, "column 'TIMESTAMP'", "expected a timestamp"),
    ("missing_col.csv", "TIMESTAMP,ContextTokens\n" + "2023-11-16 18:17:04,5\n", 1,
     "column 'GeneratedTokens'", "missing from header"),
    ("short_row.csv", AZ_HEAD + AZ_ROW + "2023-11-16 18:17:05.0,5\n", 3, "column 'GeneratedTokens'",
     "missing value"),
    ("unsorted.csv", AZ_HEAD + AZ_ROW + "2023-11-16 18:17:05.0,5,1\n2023-11-16 18:17:04.5,5,1\n", 4,
     "column 'TIMESTAMP'", "earlier than the previous request's (line 3)"),
    ("unsorted_g.csv", "arrival_s,input_tokens,output_tokens\n1.0,1,1\n0.5,1,1\n", 3, "column 'arrival_s'",
     "sorted"),
    ("nan.csv", "arrival_s,input_tokens,output_tokens\nnan,1,1\n", 2, "column 'arrival_s'", "finite"),
    ("header_only.csv", AZ_HEAD, 1, "", "no requests"),
    ("empty.csv", "", 1, "", "empty file"),
    ("blank.jsonl", "\n\n", 1, "", "empty file"),
    ("bad.jsonl", '{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}\n{"arrival_s": 1, oops}\n', 2,
     "", "invalid JSON"),
    ("not_obj.jsonl", '{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}\n[1, 2]\n', 2, "",
     "expected a JSON object"),
    ("float_tok.jsonl", '{"arrival_s": 0, "input_tokens": 1.5, "output_tokens": 1}\n', 1,
     "field 'input_tokens'", "expected a positive integer, got 1.5"),
    ("bool_tok.jsonl", '{"arrival_s": 0, "input_tokens": 3, "output_tokens": true}\n', 1,
     "field 'output_tokens'", "got true"),
    ("moon_missing.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n'
     '{"timestamp": 10, "input_length": 5}\n', 2, "field 'output_length'", "missing"),
    ("moon_unsorted.jsonl", '{"timestamp": 10, "input_length": 5, "output_length": 1}\n\n'
     '{"timestamp": 3, "input_length": 5, "output_length": 1}\n', 3, "field 'timestamp'", "(line 1)"),
    ("unknown.csv", "a,b,c\n1,2,3\n", 1, "", "cannot tell the format"),
])
def test_malformed_files_name_file_line_and_column(tmp_path: Path, name: str, text: str, line: int,
                                                   where: str, detail: str) -> None:
    p = _write(tmp_path, name, text)
    with pytest.raises(TraceFormatError) as ei:
        load_trace(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert where in msg and detail in msg, msg
    assert ei.value.line == line and isinstance(ei.value, ValueError)


def test_error_message_shape_matches_editor_convention(tmp_path: Path) -> None:
    p = _write(tmp_path, "trace.csv", AZ_HEAD + AZ_ROW * 15 + "2023-11-16 18:17:04.0000000,abc,8\n")
    with pytest.raises(TraceFormatError) as ei:
        load_trace(p)
    expected = "trace.csv:17: column 'ContextTokens': expected a positive integer, got 'abc'"
    assert str(ei.value).endswith(expected)
    assert ei.value.field == "ContextTokens"


def test_non_utf8_file(tmp_path: Path) -> None:
    p = tmp_path / "bin.csv"
    p.write_bytes(b"arrival_s,input_tokens,output_tokens\n0,1,1\n\xff\xfe,1,1\n")
    with pytest.raises(TraceFormatError, match=r":3: not UTF-8"):
        load_trace(p)


# ---------------------------------------------------------------- transformations


def test_window_head_and_rate() -> None:
    tr = _trace((0.0, 10, 1), (1.0, 20, 2), (2.5, 30, 3), (4.0, 40, 4), (6.0, 50, 5))
    w = tr.window(1.0, 3.0)  # [1.0, 4.0): the request at exactly 4.0 is excluded
    assert [(r.arrival_s, r.input_tokens) for r in w] == [(0.0, 20), (1.5, 30)]
    assert [r.arrival_s for r in tr.window(0.5, 2.1)] == [0.5, 2.0]  # kept relative to start_s
    assert len(tr.window(10.0, 5.0)) == 0 and tr.window(10.0, 5.0).rate_rps == 0.0
    assert [r.input_tokens for r in tr.head(2)] == [10, 20] and len(tr.head(99)) == 5 and len(tr.head(0)) == 0
    assert tr.duration_s == 6.0 and tr.rate_rps == pytest.approx(5 / 6)
    fast = tr.scale_rate(2.0)
    assert [r.arrival_s for r in fast] == [0.0, 0.5, 1.25, 2.0, 3.0]
    assert fast.rate_rps == pytest.approx(2 * tr.rate_rps)
    assert [r.input_tokens for r in fast] == [10, 20, 30, 40, 50]
    assert "window" in w.source and w.source.startswith("synthetic")
    for bad in (lambda: tr.scale_rate(0), lambda: tr.scale_rate(math.inf), lambda: tr.window(-1, 1),
                lambda: tr.window(0, 0), lambda: tr.head(-1)):
        with pytest.raises(ValueError):
            bad()


def test_scale_lengths_rounds_half_up_and_clamps() -> None:
    tr = _trace((0.0, 1, 100), (1.0, 3, 7), (2.0, 5, 0), (3.0, 100, 2000))
    s = tr.scale_lengths(0.5)
    assert [r.input_tokens for r in s] == [1, 2, 3, 50]  # 0.5->1 (min 1), 1.5->2, 2.5->3
    assert [r.output_tokens for r in s] == [100, 7, 0, 2000]
    c = tr.scale_lengths(0.5, min_input=2, max_input=40, max_output=64)
    assert [r.input_tokens for r in c] == [2, 2, 3, 40]
    assert [r.output_tokens for r in c] == [64, 7, 0, 64]
    assert [r.arrival_s for r in c] == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        tr.scale_lengths(1.0, min_input=0)
    with pytest.raises(ValueError):
        tr.scale_lengths(1.0, min_input=10, max_input=5)


def test_trace_constructor_validates() -> None:
    with pytest.raises(ValueError, match="sorted"):
        _trace((1.0, 1, 1), (0.5, 1, 1))
    with pytest.raises(ValueError, match="input_tokens"):
        _trace((0.0, 0, 1))
    assert Trace((), "empty").summary()["input"] is None


@settings(max_examples=60, deadline=None)
@given(gaps=st.lists(st.floats(0, 100), min_size=1, max_size=40), factor=st.floats(0.01, 100),
       start=st.floats(0, 500), dur=st.floats(0.01, 500))
def test_transforms_preserve_order_and_counts(gaps: list[float], factor: float, start: float,
                                              dur: float) -> None:
    t, rows = 0.0, []
    for i, g in enumerate(gaps):
        t += g
        rows.append((t, i + 1, i))
    tr = _trace(*rows)
    assert len(tr.scale_rate(factor)) == len(tr) == len(tr.scale_lengths(factor))
    w = tr.window(start, dur)
    assert all(0 <= r.arrival_s < dur + 1e-9 for r in w)
    assert len(w) == sum(start <= a < start + dur for a, _, _ in rows)


# ---------------------------------------------------------------- SLO classes


def test_classes_from_reference() -> None:
    cls = classes_from_reference(0.1)
    assert [c.name for c in cls] == [s[0] for s in DEFAULT_CLASS_SPEC]
    assert [c.ttft_slo_s for c in cls] == pytest.approx([0.3, 1.0, 3.0])
    assert [c.priority for c in cls] == [0, 1, 2] and [c.sheddable for c in cls] == [False, False, True]
    via = classes_for_predictor(lambda n: n / 5120, ref_tokens=512, tpot_slo_s=0.05)
    assert [c.ttft_slo_s for c in via] == pytest.approx([0.3, 1.0, 3.0])
    assert all(c.tpot_slo_s == 0.05 for c in via)
    with pytest.raises(ValueError):
        classes_from_reference(0.0)
    with pytest.raises(ValueError):
        classes_from_reference(1.0, [("a", 1.0, 0, False), ("a", 2.0, 1, True)])
    with pytest.raises(ValueError):
        SLOClass("x", -1.0, None, 0, False)


def test_assignment_threshold_and_determinism() -> None:
    tr = _trace(*[(float(i), n, 1) for i, n in enumerate([1, 1023, 1024, 1025, 4096, 4097, 20000])])
    cls = classes_from_reference(0.05)
    assert assign_classes(tr, cls, seed=0) == ["interactive"] * 3 + ["batch"] * 4
    assert assign_classes(tr, cls, seed=0, rule=THREE_TIER_RULE) == \
        ["interactive"] * 3 + ["standard"] * 2 + ["batch"] * 2
    assert assign_classes(tr, cls, seed=0, rule=LengthRule(thresholds=(1023,))) == \
        ["interactive"] * 2 + ["batch"] * 5
    scaled = LengthRule().scaled(0.125)
    assert scaled.thresholds == (128,)
    with pytest.raises(ValueError, match="not in the given classes"):
        assign_classes(tr, cls[:1], seed=0)
    with pytest.raises(ValueError):
        LengthRule(thresholds=(10, 5), class_names=("a", "b", "c"))


def test_moved_fraction_is_seeded_and_exact() -> None:
    tr = _trace(*[(float(i), 1 + (i * 37) % 3000, 1) for i in range(1000)])
    cls = classes_from_reference(0.05)
    rule = LengthRule(move_fraction=0.2)
    base = assign_classes(tr, cls, seed=1)
    a, b = assign_classes(tr, cls, seed=7, rule=rule), assign_classes(tr, cls, seed=7, rule=rule)
    assert a == b
    assert sum(x != y for x, y in zip(a, base)) == 200
    assert assign_classes(tr, cls, seed=8, rule=rule) != a
    assert assign_classes(tr, cls, seed=123) == base  # no moves: the seed does not matter


def test_per_request_slo_scales_with_own_latency() -> None:
    cls = classes_from_reference(0.1)  # interactive 0.3 s, batch 3.0 s

    def predict(n: int) -> float:
        return n * 1e-4

    assert ttft_slo_for(100, cls[0], predict) == pytest.approx(0.3)
    assert ttft_slo_for(8000, cls[2], predict) == pytest.approx(3.0)
    assert ttft_slo_for(20000, cls[2], predict) == pytest.approx(4.0)  # 2 x 2.0 s
    tr = _trace((0.0, 100, 1), (1.0, 20000, 1))
    names = assign_classes(tr, cls, seed=0)
    assert request_ttft_slos(tr, names, cls, predict, slack=1.0) == pytest.approx([0.3, 3.0])
