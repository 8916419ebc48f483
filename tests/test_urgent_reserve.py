"""Capacity kept for more urgent classes at admission (replicas/scheduler/urgent_reserve.py): the
window arithmetic, the refusal it adds, and a burst in the simulator (the real scheduler in
virtual time) where it gives the interactive class what the capacity allows."""

from __future__ import annotations

import pytest

from bench.sim.cluster import ClusterSim, SimSetup
from bench.sim.replica import ExecConfig
from bench.sim.router import RouterConfig
from bench.sim.workload import explicit_workload
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.core import Scheduler
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from replicas.scheduler.urgent_reserve import MAX_SHARE, UrgentReserve

MS_PER_TOKEN = CostModel.from_coefficients(0.0, 1e-3)  # predict(n) = n ms


def test_the_share_counts_only_tighter_slos_within_the_window():
    r = UrgentReserve(window_s=2.0)
    r.record(0.3, 0.4, now=0.0)  # interactive, 0.4 s of prefill
    r.record(0.3, 0.2, now=1.0)
    r.record(3.0, 1.0, now=1.5)  # standard
    assert r.share_above(3.0, now=1.5) == pytest.approx(0.3)  # (0.4 + 0.2) / 2 s
    assert r.share_above(0.3, now=1.5) == 0.0  # nothing is tighter than the tightest class
    assert r.share_above(10.0, now=1.5) == pytest.approx(0.8)
    assert r.share_above(3.0, now=2.5) == pytest.approx(0.1)  # the first arrival left the window
    assert r.share_above(3.0, now=10.0) == 0.0
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="urgent_reserve_window_s"):
            UrgentReserve(bad)


def _req(rid: str, tokens: int, slo: float, at: float) -> Request:
    return Request(rid, [1] * tokens, arrival_s=at, ttft_slo_s=slo, slo_class="interactive" if slo < 1 else "standard")


def test_a_standard_request_is_refused_when_urgent_traffic_leaves_it_too_little():
    s = Scheduler(MS_PER_TOKEN, SchedulerConfig(late_reject_factor=1.0, urgent_reserve_window_s=1.0))
    s._reserve.record(0.5, 0.8, 0.0)  # interactive work offered at 0.8 s per second over the last second
    idle = Scheduler(MS_PER_TOKEN, SchedulerConfig(late_reject_factor=1.0, urgent_reserve_window_s=None))
    assert not idle.on_arrival(_req("s1", 500, 2.0, 0.5), 0.5).rejected  # without the reserve it looks easy
    late = _req("s1", 500, 2.0, 0.5)  # 0.5 s of its own on an idle queue: 0.5 / (1 - 0.8) = 2.5 s > 2 s
    assert s.on_arrival(late, 0.5).rejected == ("s1",)
    assert late.reject_reason is not None and "80% of capacity kept for more urgent classes" in late.reject_reason
    assert not s.on_arrival(_req("s2", 300, 2.0, 0.5), 0.5).rejected  # 0.3 / 0.2 = 1.5 s: fits
    assert not s.on_arrival(_req("i1", 400, 0.5, 0.5), 0.5).rejected  # the tightest class is not held back


def test_at_the_max_share_a_less_urgent_request_is_refused_outright():
    s = Scheduler(MS_PER_TOKEN, SchedulerConfig(late_reject_factor=1.5, urgent_reserve_window_s=1.0))
    s._reserve.record(0.5, MAX_SHARE, 0.0)  # the urgent class alone offers 95% of the replica
    tiny = _req("s", 10, 5.0, 0.0)
    assert s.on_arrival(tiny, 0.0).rejected == ("s",)
    assert tiny.reject_reason is not None and "more urgent classes are offering 95%" in tiny.reject_reason


def burst(interactive_rps: float, standard_rps: float, seconds: float) -> object:
    """Interactive (50 tokens = 50 ms, SLO 0.3 s) and standard (400 tokens = 0.4 s, SLO 3 s) arrivals,
    evenly spaced, interleaved."""
    rows = [(k / interactive_rps, 50, 0.3) for k in range(int(seconds * interactive_rps))]
    rows += [(k / standard_rps + 0.01, 400, 3.0) for k in range(int(seconds * standard_rps))]
    rows.sort()
    return explicit_workload([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], MS_PER_TOKEN.predict)


def _per_class(wl: object, ttfts: list[float | None]) -> dict[float, float]:
    met: dict[float, list[bool]] = {}
    for slo, ttft in zip(wl.ttft_slo_s, ttfts):  # type: ignore[attr-defined]
        met.setdefault(slo, []).append(ttft is not None and ttft <= slo)
    return {slo: sum(v) / len(v) for slo, v in met.items()}


@pytest.mark.parametrize("late_factor", [1.0, 1.5])
def test_in_a_burst_the_reserve_gives_the_urgent_class_what_the_capacity_allows(late_factor):
    # offered: interactive 0.6 s/s, standard 1.2 s/s, i.e. 1.8x the replica; interactive alone fits (bound 1.0)
    wl = burst(interactive_rps=12, standard_rps=3, seconds=20)
    att = {}
    for window in (None, 5.0):
        sched = SchedulerConfig(late_reject_factor=late_factor, urgent_reserve_window_s=window)
        run = ClusterSim(SimSetup(MS_PER_TOKEN, sched, ExecConfig(boundary_delay_s=0.002),
                                  RouterConfig(policy="round_robin")), 1).run(wl)
        att[window] = _per_class(wl, run.ttft_s)
    assert att[5.0][0.3] >= 0.9  # >= 0.9 x its bound of 1.0
    assert att[5.0][0.3] > att[None][0.3] + 0.1
    assert att[5.0][3.0] > 0.1  # the standard class still gets the capacity left over
