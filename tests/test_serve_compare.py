"""``bench serve``: the chunked baseline at several chunk sizes, and the goodput comparison it reports."""

from __future__ import annotations

import pytest

from bench.serve_compare import format_comparison, goodput_comparison
from bench.serve_config import ServeBenchConfig, expand_systems
from bench.servers import split_system


def test_chunked_expands_to_one_system_per_chunk_size_in_order():
    assert expand_systems(("flowprefill", "chunked", "fcfs", "vllm"), (64, 128, 256)) == (
        "flowprefill", "chunked-64", "chunked-128", "chunked-256", "fcfs", "vllm")
    # named sizes are kept, duplicates dropped
    assert expand_systems(("chunked-128", "chunked", "flowprefill"), (128, 512)) == (
        "chunked-128", "chunked-512", "flowprefill")
    cfg = ServeBenchConfig(trace="t.csv", systems=("chunked",), chunk_sizes=(32, 96))
    assert cfg.systems == ("chunked-32", "chunked-96")
    assert split_system("chunked-96") == ("chunked", 96) and split_system("fcfs") == ("fcfs", None)


@pytest.mark.parametrize(("systems", "sizes", "message"), [
    (("chunked-x",), (64,), "chunked-x"),
    (("chunked-0",), (64,), "positive integer"),
    (("sglang",), (64,), "unknown system 'sglang'"),
    (("chunked",), (0,), "--chunk-sizes"),
    ((), (64,), "at least one"),
])
def test_bad_systems_and_chunk_sizes_are_named(systems, sizes, message):
    with pytest.raises(ValueError, match=message):
        ServeBenchConfig(trace="t.csv", systems=systems, chunk_sizes=sizes)


def _entry(system: str, goodput: float | None, min_rate: float | None = 0.5) -> dict:
    return {"system": system, "goodput": goodput, "min_rate_rps": min_rate, "points": [], "error": None}


def test_comparison_takes_the_best_chunk_size_and_the_best_own_baseline():
    entries = [_entry("flowprefill", 6.0), _entry("chunked-64", 0.9), _entry("chunked-128", 1.5),
               _entry("chunked-256", 1.2), _entry("fcfs", 1.4), _entry("vllm", 2.4)]
    cmp = goodput_comparison(entries)
    assert cmp["best_chunked"] == {"system": "chunked-128", "goodput": 1.5}
    assert cmp["best_own_baseline"] == {"system": "chunked-128", "goodput": 1.5}
    assert cmp["flowprefill_vs_vllm"] == {"of": "vllm", "ratio": pytest.approx(2.5), "ratio_is_lower_bound": False,
                                          "interval": [None, None]}  # no failing rate recorded: no bracket
    assert cmp["flowprefill_vs_best_own_baseline"]["ratio"] == pytest.approx(4.0)
    lines = format_comparison(cmp)
    assert "FlowPrefill goodput / vLLM (vllm): 2.50x" in lines
    assert "best own baseline: chunked-128 (1.500 req/s)" in lines

    entries[4] = _entry("fcfs", 2.0)  # fcfs beats every chunk size
    cmp = goodput_comparison(entries)
    assert cmp["best_chunked"]["system"] == "chunked-128" and cmp["best_own_baseline"]["system"] == "fcfs"
    assert cmp["flowprefill_vs_best_own_baseline"]["ratio"] == pytest.approx(3.0)


def test_a_baseline_below_the_rate_floor_gives_a_lower_bound_and_a_skipped_one_no_ratio():
    entries = [_entry("flowprefill", 3.0), _entry("vllm", 0.0, min_rate=0.6), _entry("fcfs", None)]
    cmp = goodput_comparison(entries)
    assert cmp["flowprefill_vs_vllm"] == {"of": "vllm", "ratio": pytest.approx(5.0), "ratio_is_lower_bound": True,
                                          "interval": [pytest.approx(5.0), None]}
    assert cmp["best_own_baseline"] is None and cmp["flowprefill_vs_best_own_baseline"] is None
    assert "FlowPrefill goodput / vLLM (vllm): >= 5.00x" in format_comparison(cmp)
    assert goodput_comparison([_entry("vllm", 2.0)])["flowprefill_vs_vllm"] is None


def test_the_ratio_comes_with_the_interval_the_grid_brackets_allow():
    fp = {**_entry("flowprefill", 3.0), "next_failing_rate_rps": 4.5}  # its goodput lies in [3.0, 4.5)
    vllm = {**_entry("vllm", 1.0), "next_failing_rate_rps": 1.5}  # in [1.0, 1.5)
    cmp = goodput_comparison([fp, vllm])
    assert cmp["flowprefill_vs_vllm"]["ratio"] == pytest.approx(3.0)
    assert cmp["flowprefill_vs_vllm"]["interval"] == [pytest.approx(2.0), pytest.approx(4.5)]
    assert "FlowPrefill goodput / vLLM (vllm): 3.00x  (grid interval 2.00-4.50x, medians of repeats)" \
        in format_comparison(cmp)
    top = {**fp, "next_failing_rate_rps": None}  # passed every rate tried: no upper end
    assert goodput_comparison([top, vllm])["flowprefill_vs_vllm"]["interval"] == [pytest.approx(2.0), None]


def test_repeats_and_budget_are_checked_and_quick_bounds_its_wall_time():
    with pytest.raises(ValueError, match="--repeats"):
        ServeBenchConfig(trace="t.csv", repeats=0)
    with pytest.raises(ValueError, match="--vllm-block-size"):
        ServeBenchConfig(trace="t.csv", vllm_block_size=20)
    with pytest.raises(ValueError, match="--budget-s"):
        ServeBenchConfig(trace="t.csv", budget_s=-1.0)
    quick = ServeBenchConfig(trace="t.csv", systems=("flowprefill", "vllm"), quick=True)
    assert quick.repeats == 3 and quick.budget_s == 3600.0 and quick.budget_per_system_s() == 1800.0
    assert ServeBenchConfig(trace="t.csv").budget_per_system_s() is None


def test_a_window_with_a_long_idle_gap_gets_a_warning_naming_where_it_starts():
    from bench.serve_bench import idle_gap_warning
    from bench.traces import Trace, TraceRequest

    # two bursts of 4 requests 1 s apart, 100 s between them: 99 s of a 103 s window is idle
    arrivals = [0.0, 0.3, 0.6, 1.0, 101.0, 101.5, 102.0, 103.0]
    trace = Trace(tuple(TraceRequest(a, 10, 1) for a in arrivals))
    assert trace.longest_gap() == (pytest.approx(100.0), 4)
    warning = idle_gap_warning(trace)
    assert warning is not None and "idle gap of 100.0 s before request 4 (97% of its 103.0 s)" in warning
    assert "--max-requests 4" in warning
    assert idle_gap_warning(trace.head(4)) is None  # the first burst alone: no gap
    assert Trace(()).longest_gap() == (0.0, 0) and idle_gap_warning(trace.head(1)) is None
