"""The pure parts of the multi-node benchmarks, without Ray: argument checks, the node-kill timeline
and ledger, and the router's side-by-side comparison."""

from __future__ import annotations

import argparse

import pytest

from bench.fault_cli import add_faults_parser, check_fault_args
from bench.faults import summarize_phases
from bench.loadgen import RequestResult
from bench.node_faults import NODE_PHASES, NodeFaultConfig, node_requests
from bench.router_multinode import ROWS, check_router_nodes, compare, format_comparison


def test_fault_arguments_pair_the_kill_with_the_node_count_and_the_trace() -> None:
    check_fault_args("replica", 1, "trace.csv")
    check_fault_args("node", 3, None)
    check_fault_args("node", 4, None)
    with pytest.raises(ValueError, match="--kill node: needs --nodes >= 3"):
        check_fault_args("node", 2, None)
    with pytest.raises(ValueError, match="--nodes 3: the replica crash"):
        check_fault_args("replica", 3, "trace.csv")
    with pytest.raises(ValueError, match="--trace: required"):
        check_fault_args("replica", 1, None)
    with pytest.raises(ValueError, match="--kill"):
        check_fault_args("disk", 3, None)


def test_faults_parser_takes_kill_and_nodes_and_calls_the_stack_only_when_run() -> None:
    parser = argparse.ArgumentParser()
    called = []
    add_faults_parser(parser.add_subparsers(), lambda: called.append(1))
    args = parser.parse_args(["faults", "--nodes", "3", "--kill", "node", "--phase-s", "5"])
    assert (args.kill, args.nodes, args.trace, args.phase_s, args.rate_rps) == ("node", 3, None, 5.0, None)
    assert not called


def test_node_kill_config_refuses_too_few_nodes_and_splits_three_phases() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        NodeFaultConfig(nodes=2)
    with pytest.raises(ValueError, match="--rate-rps"):
        NodeFaultConfig(rate_rps=0)
    cfg = NodeFaultConfig(phase_s=10, rate_rps=2)
    assert [cfg.phase_of(t) for t in (0, 9.9, 10, 19.9, 20, 29.9, 45)] == [
        "before kill", "before kill", "kill", "kill", "after kill", "after kill", "after kill"]
    reqs = node_requests(cfg, count_tokens=lambda text: 7)
    assert len(reqs) == 60 and reqs[-1].arrival_s == pytest.approx(29.5)
    assert len({r.prompt for r in reqs}) == 60 and {r.input_tokens for r in reqs} == {7}
    assert {(r.slo_class, r.ttft_slo_s, r.max_tokens) for r in reqs} == {("interactive", 1.0, 16)}


def test_node_kill_ledger_counts_each_phase_and_adds_the_journal_to_the_last() -> None:
    cfg = NodeFaultConfig(phase_s=10)
    results = [
        RequestResult(0, "interactive", 9, 1.0, arrival_s=1, ttft_s=0.2, e2e_s=1.0, output_tokens=16, status=200),
        RequestResult(1, "interactive", 9, 1.0, arrival_s=11, ttft_s=0.2, status=200,
                      error="stream error: replica failed while streaming"),
        RequestResult(2, "interactive", 9, 1.0, arrival_s=12, ttft_s=2.5, e2e_s=3.0, output_tokens=16, status=200),
        RequestResult(3, "interactive", 9, 1.0, arrival_s=25, error="cancelled: still open at the drain limit"),
    ]
    table = summarize_phases(NODE_PHASES, cfg.phase_of, results, journal_left=1)
    assert list(table) == list(NODE_PHASES)
    kill = table["kill"]
    assert (kill["requests"], kill["accepted"], kill["completed"], kill["failed_clearly"], kill["lost"]) == (
        2, 2, 1, 1, 0)
    assert kill["attainment"] == 0.0  # one cut short, one answered past its TTFT SLO
    assert table["before kill"]["attainment"] == 1.0
    assert table["after kill"]["lost"] == 2  # hung, plus the journal's leftover


def _report(decision: tuple[float, float], overhead: tuple[float, float], rps: float) -> dict:
    pair = {"n": 220, "p50": decision[0], "p99": decision[1]}
    return {"routing_decision_ms": pair, "routing_decision_under_load_ms": pair,
            "router_overhead_ms": {"p50": overhead[0], "p99": overhead[1]},
            "client_ttft_ms": {"p50": 20.0, "p99": None}, "serve_floor_ms": {"p50": 5.0}, "max_rps": rps}


def test_comparison_puts_both_runs_side_by_side_with_the_difference() -> None:
    single, multi = _report((0.5, 1.5), (10.0, 20.0), 200), _report((0.8, 2.5), (12.5, 30.0), 150)
    comp = compare(single, multi)
    rows = {r["metric"]: r for r in comp["rows"]}
    assert [r["metric"] for r in comp["rows"]] == [label for label, _, _ in ROWS]
    assert rows["routing decision p99 (idle)"] == {"metric": "routing decision p99 (idle)", "single_ms": 1.5,
                                                    "multi_ms": 2.5, "diff_ms": 1.0}
    assert rows["router overhead p50"]["diff_ms"] == pytest.approx(2.5)
    assert rows["client TTFT p99"]["diff_ms"] is None  # a missing figure stays missing
    assert comp["decisions"] == {"single": 220, "multi": 220} and comp["max_rps"] == {"single": 200, "multi": 150}
    multi["cluster"], multi["replicas_deployed"] = {"nodes": 3}, 2
    text = format_comparison({"single_node": single, "multi_node": multi, "comparison": comp})
    assert "3 nodes" in text and "2 replicas on the workers" in text
    assert any(line.startswith("routing decision p99 (idle)") and line.split()[-3:] == ["1.50", "2.50", "+1.00"]
               for line in text.splitlines())


def test_router_nodes_are_checked_before_anything_starts() -> None:
    check_router_nodes(1, "flowprefill")
    check_router_nodes(3, "echo")
    with pytest.raises(ValueError, match="echo engine only"):
        check_router_nodes(3, "flowprefill")
    with pytest.raises(ValueError, match="at least 1"):
        check_router_nodes(0, "echo")


def test_ttft_per_phase_skips_requests_without_a_first_token() -> None:
    from bench.node_faults import format_ttft, ttft_by_phase

    cfg = NodeFaultConfig(phase_s=10)
    results = [RequestResult(i, "interactive", 9, 1.0, arrival_s=i, ttft_s=0.1 * (i + 1)) for i in range(10)]
    results.append(RequestResult(10, "interactive", 9, 1.0, arrival_s=12, error="HTTP 500: x", status=500))
    ttft = ttft_by_phase(cfg, results)
    assert ttft["before kill"] == {"p50": pytest.approx(600.0), "p99": pytest.approx(1000.0),
                                   "max": pytest.approx(1000.0)}
    assert ttft["kill"] == {"p50": None, "p99": None, "max": None}
    assert "TTFT kill" in format_ttft(ttft) and " - ms" in format_ttft(ttft)
