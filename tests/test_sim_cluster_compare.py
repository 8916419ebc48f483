"""The simulator beside a measured cluster (bench/sim/cluster_compare.py): the pairing and the table,
with measured runs given as numbers (no cluster is started here; the real run is `bench sim
--validate --nodes 3`)."""

from __future__ import annotations

import pytest

from bench.loadgen import LoadRequest
from bench.rate_search import GoodputSearch, find_goodput
from bench.sim.cli import parse_pd_ratios
from bench.sim.cluster import ClusterSim, RouterConfig, SimSetup
from bench.sim.cluster_compare import (
    ClusterCompareConfig,
    format_comparison,
    goodput_row,
    pair_points,
    sim_workload,
)
from bench.sim.exec_model import ExecConfig
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.cost_model import CostModel
from router.slo import SLOClass

MS_PER_TOKEN = CostModel.from_coefficients(0.0, 1e-3)
CLASSES = (SLOClass("interactive", 0.5, None, 0, False), SLOClass("batch", 5.0, None, 2, True))


def _requests() -> list[LoadRequest]:
    # 20 requests over 10 s: 100-token interactive ones (0.1 s each) and every fifth a 1000-token batch one
    return [LoadRequest(0.5 * i, f"p{i}", 1000 if i % 5 == 4 else 100, 2, "batch" if i % 5 == 4 else "interactive",
                        2 if i % 5 == 4 else 0, 5.0 if i % 5 == 4 else 0.5) for i in range(20)]


def test_the_simulated_workload_is_the_measured_requests_column_for_column():
    reqs = _requests()
    wl = sim_workload(reqs, CLASSES, MS_PER_TOKEN.predict)
    assert wl.arrival_s == tuple(r.arrival_s for r in reqs) and wl.tokens == tuple(r.input_tokens for r in reqs)
    assert wl.max_tokens == (2,) * 20 and wl.ttft_slo_s == tuple(r.ttft_slo_s for r in reqs)
    assert wl.sheddable == tuple(r.slo_class == "batch" for r in reqs)
    assert wl.priority == tuple(r.priority for r in reqs) and wl.span_s == pytest.approx(9.5)
    assert wl.rate_rps == pytest.approx(20 / 9.5)
    with pytest.raises(ValueError, match="slo classes"):
        sim_workload(reqs, CLASSES[:1], MS_PER_TOKEN.predict)


def test_measured_rates_are_paired_with_the_simulation_at_the_same_rate():
    reqs = _requests()
    wl = sim_workload(reqs, CLASSES, MS_PER_TOKEN.predict)
    sched = SchedulerConfig(policy="flowprefill", granularity="block")
    sim = ClusterSim(SimSetup(MS_PER_TOKEN, sched, ExecConfig(decode_step_s=0.01), RouterConfig("slo_aware")), 2)
    seen: list[float] = []

    def simulate(scale: float) -> float:
        seen.append(scale)
        return sim.run(wl, scale).attainment

    # what a measured search could have found: three rates, the middle one run twice (median 0.925)
    measured = GoodputSearch(good=2.0, bad=4.0, runs={1.0: [1.0], 2.0: [0.9, 0.95], 4.0: [0.5]})
    base = wl.rate_rps
    rows = pair_points(measured, simulate, base, replicas=2)
    assert seen == [1.0, 2.0, 4.0]  # the simulation runs at exactly the measured scales, in order
    assert [r["rate_rps"] for r in rows] == pytest.approx([base, 2 * base, 4 * base])
    assert [r["rate_per_replica"] for r in rows] == pytest.approx([base / 2, base, 2 * base])
    assert [r["measured_attainment"] for r in rows] == [1.0, 0.925, 0.5]
    assert rows[1]["measured_runs"] == [0.9, 0.95]
    assert [r["simulated_attainment"] for r in rows] == [sim.run(wl, s).attainment for s in (1.0, 2.0, 4.0)]
    for r in rows:
        assert r["agree"] == ((r["measured_attainment"] >= 0.9) == (r["simulated_attainment"] >= 0.9))
    # at 1x the two replicas idle between requests: every request meets its SLO in the simulation too
    assert rows[0]["simulated_attainment"] == 1.0 and rows[0]["agree"]

    simulated = find_goodput(simulate, 1.0, max_runs=10, refine_steps=3)
    report = {"nodes": 3, "replicas": 2, "requests": 20, "trace_name": "t.csv", "pairs": rows,
              "measured": goodput_row("measured", measured, base, 2),
              "simulated": goodput_row("simulated", simulated, base, 2)}
    assert report["measured"]["goodput_rps"] == pytest.approx(2 * base)
    assert report["measured"]["goodput_per_replica"] == pytest.approx(base)
    assert report["measured"]["next_failing_rps"] == pytest.approx(4 * base)
    text = format_comparison(report)
    lines = text.splitlines()
    assert lines[0].startswith("3 nodes, 2 replicas")
    assert lines[2].split()[:3] == ["measured", f"{2 * base:.3f}", f"{base:.3f}"]
    assert lines[3].split()[0] == "simulated"
    ratio = report["simulated"]["goodput_rps"] / report["measured"]["goodput_rps"]
    assert lines[4].split() == ["sim/real", f"{ratio:.2f}"]
    assert len(lines) == 6 + len(rows)  # title, header, 2 goodput rows, ratio, pair header, one line per rate


def test_cluster_compare_settings_are_checked():
    with pytest.raises(ValueError, match="--nodes"):
        ClusterCompareConfig(trace="t", nodes=1)
    with pytest.raises(ValueError, match="--validate-requests"):
        ClusterCompareConfig(trace="t", requests=1)


def test_pd_ratios_flag_parses_and_names_bad_input():
    import argparse

    assert parse_pd_ratios("1:1,1:3,3:1") == ((1, 1), (1, 3), (3, 1))
    with pytest.raises(argparse.ArgumentTypeError, match="P:D"):
        parse_pd_ratios("1/3")
