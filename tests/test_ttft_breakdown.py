"""The load generator's records of the server's TTFT decomposition (header and SSE field, without a
server: a fake aiohttp session) and the per-class breakdown tables of bench serve and bench overload."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bench.loadgen import LoadConfig, LoadRequest, RequestResult, _send
from bench.overload import OverloadConfig, phase_breakdowns, print_overload
from bench.ttft_breakdown import COLUMNS, format_breakdown, ttft_breakdown
from replicas.ttft_parts import PARTS, TTFT_PARTS_HEADER, TTFTParts

PARTS_A = TTFTParts(0.001, 0.002, 0.1, 0.2, 0.3, 0.01, 0.003)
PARTS_B = TTFTParts(0.002, 0.004, 0.3, 0.4, 0.0, 0.0, 0.005)


class FakeContent:
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def __aiter__(self) -> Any:  # noqa: ANN401
        async def gen() -> Any:  # noqa: ANN401
            for line in self.lines:
                yield line

        return gen()


class FakeResponse:
    def __init__(self, headers: dict[str, str], events: list[dict[str, Any] | str], status: int = 200) -> None:
        self.status, self.headers = status, headers
        lines = [b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n" for e in events]
        self.content = FakeContent([*lines, b"data: [DONE]\n"])

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def text(self) -> str:
        return ""


class FakeSession:
    def __init__(self, response: FakeResponse) -> None:
        self.response = response

    def post(self, url: str, json: Any, headers: dict[str, str]) -> FakeResponse:  # noqa: ANN401
        return self.response


def _chunk(text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:  # noqa: ANN401
    return {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": text,
                                                                       "finish_reason": finish}], **extra}


def _load(headers: dict[str, str], events: list[dict[str, Any] | str]) -> RequestResult:
    req = LoadRequest(0.0, "hi", 2, 2, "interactive", 0, 1.0)
    res = RequestResult(0, "interactive", 2, 1.0, 0.0)
    asyncio.run(_send(FakeSession(FakeResponse(headers, events)), LoadConfig("http://x", "m"), 0, req, res, 0.0))
    return res


def test_the_header_becomes_the_records_parts():
    res = _load({TTFT_PARTS_HEADER: PARTS_A.to_header()}, [_chunk("a"), _chunk("b", "length")])
    assert res.error is None and res.ttft_parts == PARTS_A
    assert res.unattributed_s == pytest.approx(res.ttft_s - PARTS_A.total_s)
    row = res.to_dict()
    assert row["ttft_parts"] == PARTS_A.to_dict() and row["unattributed_s"] == res.unattributed_s
    json.dumps(row)


def test_the_finish_chunks_field_is_read_and_wins_over_the_header():
    field = {"flowprefill": {"ttft_parts": PARTS_B.to_dict()}}
    res = _load({}, [_chunk("a"), _chunk("b", "length", **field)])
    assert res.ttft_parts == PARTS_B
    res = _load({TTFT_PARTS_HEADER: PARTS_A.to_header()}, [_chunk("a"), _chunk("b", "length", **field)])
    assert res.ttft_parts == PARTS_B


@pytest.mark.parametrize("header, extra", [
    ("{not json", None),
    (json.dumps({**PARTS_A.to_dict(), "queue_s": -1.0}), None),
    (None, {"flowprefill": {"ttft_parts": {"queue_s": "soon"}}}),
    (None, {"flowprefill": "oops"}),
    (None, {"flowprefill": {"ttft_parts": [1, 2, 3]}}),
    (None, None),  # a server that sends nothing (vLLM)
])
def test_a_malformed_or_missing_decomposition_is_none_not_an_error(header, extra):
    res = _load({TTFT_PARTS_HEADER: header} if header else {}, [_chunk("a"), _chunk("b", "length", **(extra or {}))])
    assert res.error is None and res.ttft_s is not None and res.output_tokens == 2
    assert res.ttft_parts is None and res.unattributed_s is None


def test_a_malformed_field_keeps_a_good_header():
    res = _load({TTFT_PARTS_HEADER: PARTS_A.to_header()},
                [_chunk("a"), _chunk("b", "length", flowprefill={"ttft_parts": {"queue_s": None}})])
    assert res.ttft_parts == PARTS_A


def _result(i: int, cls: str, slo: float, ttft: float | None, parts: TTFTParts | None) -> RequestResult:
    return RequestResult(i, cls, 10, slo, float(i), 0.0, ttft, None if ttft is None else ttft + 1, 2,
                         None if ttft is not None else "cancelled: no first token within the TTFT SLO",
                         ttft_parts=parts)


def _results() -> list[RequestResult]:
    return [
        _result(0, "interactive", 1.0, 0.7, PARTS_A),   # met: parts 0.616, unattributed 0.084
        _result(1, "interactive", 1.0, 1.2, PARTS_B),   # missed: parts 0.711, unattributed 0.489
        _result(2, "interactive", 1.0, None, None),    # no first token
        _result(3, "batch", 60.0, 0.9, PARTS_B),
        _result(4, "batch", 60.0, 0.5, None),          # a first token without parts
    ]


def test_breakdown_numbers_per_class_and_for_the_missed():
    b = ttft_breakdown(_results())
    assert b["columns"] == list(COLUMNS) and b["timed"] == 3
    inter = b["classes"]["interactive"]
    assert inter["all"]["requests"] == 2 and inter["no_first_token"] == 1 and inter["without_parts"] == 0
    for name in PARTS:
        a, c = getattr(PARTS_A, name), getattr(PARTS_B, name)
        assert inter["all"]["mean"][name] == pytest.approx((a + c) / 2)
        lo, hi = sorted((a, c))
        assert inter["all"]["p90"][name] == pytest.approx(lo + 0.9 * (hi - lo))  # numpy's linear percentile
    assert inter["all"]["mean"]["ttft_s"] == pytest.approx(0.95)
    unattributed = ((0.7 - PARTS_A.total_s) + (1.2 - PARTS_B.total_s)) / 2
    assert inter["all"]["mean"]["unattributed_s"] == pytest.approx(unattributed)
    assert inter["missed"]["requests"] == 1
    assert inter["missed"]["mean"]["suspended_s"] == 0.0 and inter["missed"]["mean"]["queue_s"] == pytest.approx(0.3)
    assert inter["missed"]["mean"]["unattributed_s"] == pytest.approx(1.2 - PARTS_B.total_s)
    batch = b["classes"]["batch"]
    assert batch["all"]["requests"] == 1 and batch["missed"] is None and batch["without_parts"] == 1
    assert b["classes"]["all"]["all"]["requests"] == 3 and b["classes"]["all"]["missed"]["requests"] == 1
    json.dumps(b)


def test_breakdown_table_cells_are_mean_slash_p90_ms():
    lines = format_breakdown(ttft_breakdown(_results()))
    assert "queue" in lines[0] and "suspended" in lines[0] and "unattrib" in lines[0]
    rows = {line[:20].strip(): line[20:].split() for line in lines[2:] if not line.strip().startswith("first")}
    assert rows["interactive"][0] == "2"
    assert rows["interactive"][1 + PARTS.index("queue_s")] == "200.0/280.0"
    assert rows["interactive missed"][1 + PARTS.index("queue_s")] == "300.0/300.0"
    assert rows["batch"][len(COLUMNS)] == "900.0/900.0"  # the client's TTFT
    assert "first token but no parts: {'batch': 1}" in lines[-1]
    assert format_breakdown(ttft_breakdown([_result(0, "batch", 60.0, 0.5, None)]))[0].strip().startswith(
        "no TTFT decomposition")


def test_overload_reports_the_breakdown_per_phase(capsys):
    cfg = OverloadConfig(trace="t", goodput_rps=1.0, before_s=1, overload_s=2, after_s=10)
    phases = phase_breakdowns(cfg, _results())
    assert phases["before"]["classes"]["interactive"]["all"]["requests"] == 1  # arrival 0
    assert phases["overload"]["classes"]["interactive"]["missed"]["requests"] == 1  # arrival 1
    assert phases["after"]["classes"]["batch"]["all"]["requests"] == 1
    empty = {"requests": 0, "completed": 0, "attainment": None, "bound": 0.0, "rejected_429": 0, "retry_after": 0,
             "other_errors": 0, "cancelled": 0}
    report = {"phases": {p: {"all": empty} for p in phases}, "rss_mib_peak": dict.fromkeys(phases),
              "ttft_breakdown": phases, "requests": 5, "health_failures": 0, "healthy_after": True,
              "journal_after": {}}
    print_overload(report)
    out = capsys.readouterr().out
    assert "overload: TTFT decomposition per class" in out and "interactive missed" in out


def test_bench_serve_prints_the_breakdown_of_the_median_run_at_the_common_scale(capsys):
    from bench.serve_bench import common_breakdowns, print_report

    breakdown = ttft_breakdown(_results())
    runs = [{"attainment": a, "attainment_per_class": {}, "errors": 0, "cancelled": 0,
             "ttft_breakdown": breakdown if a == 0.5 else None} for a in (0.2, 0.5, 0.9)]
    entry = {"system": "flowprefill", "goodput": 1.0, "startup_s": 1.0, "error": None,
             "points": [{"scale": 1.0, "rate_rps": 2.0, "attainment": 0.5, "attainment_min": 0.2,
                         "attainment_max": 0.9, "repeats": runs}]}
    vllm = {**entry, "system": "vllm", "points": [{**entry["points"][0], "repeats": [
        {"attainment": 0.5, "ttft_breakdown": ttft_breakdown([_result(0, "batch", 60.0, 0.5, None)])}]}]}
    report = {"trace": "t", "requests": 5, "base_rate_rps": 2.0, "length_scale": 1 / 16, "common_scale": 1.0,
              "requests_per_class": {}, "systems": [entry, vllm]}
    assert common_breakdowns(report)["flowprefill"] is breakdown  # the median run's
    print_report(report)
    out = capsys.readouterr().out
    assert "TTFT decomposition per class at 2.00 req/s" in out
    assert "interactive missed" in out and "no TTFT decomposition" in out
