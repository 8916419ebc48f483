"""Tests for the cluster simulator (bench/sim/): virtual time only, analytic cost models, no sleeps."""

from __future__ import annotations

import random

import pytest

from bench.sim.cluster import ClusterSim, Router, RouterConfig, SimSetup
from bench.sim.exec_model import ExecConfig, program_seconds
from bench.sim.replica import SimReplica, SimRequest
from bench.sim.sweep import find_goodput
from bench.sim.sweep_config import SimBenchConfig
from bench.sim.workload import SimWorkload, explicit_workload, tile_window
from bench.traces import Trace, TraceRequest
from replicas.engine_stats import EngineStats
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.core import Scheduler
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from router.placement import PlacementRequest, ReplicaLoad, load_from_state, rank_replicas

MS_PER_TOKEN = CostModel.from_coefficients(0.0, 1e-3)  # predict(n) = n ms, batches add up, decode costs 1 ms
DELAY = 0.002  # operator-boundary delay used throughout


def setup(policy: str = "flowprefill", router: str = "round_robin", cost: CostModel = MS_PER_TOKEN,
          **exec_kw) -> SimSetup:
    sched = SchedulerConfig(policy=policy, granularity="block" if policy == "flowprefill" else "none")
    return SimSetup(cost, sched, ExecConfig(boundary_delay_s=DELAY, **exec_kw), RouterConfig(policy=router))


def workload(rows: list[tuple[float, int, float]], **kw) -> SimWorkload:
    """``rows`` of (arrival s, prompt tokens, TTFT SLO s)."""
    return explicit_workload([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                             MS_PER_TOKEN.predict, **kw)


def test_long_then_short_preempts_exactly_like_the_scheduler_decides():
    wl = workload([(0.0, 1000, 10.0), (0.1, 10, 0.05)])
    run = ClusterSim(setup(), 1).run(wl)
    # the same events fed to a bare scheduler: the short one arrives at the next boundary and preempts
    s = Scheduler(MS_PER_TOKEN, SchedulerConfig())
    long_, short = (Request(str(i), [0] * n, arrival_s=a, ttft_slo_s=slo) for i, (a, n, slo) in
                    enumerate([(0.0, 1000, 10.0), (0.1, 10, 0.05)]))
    d = s.on_arrival(long_, 0.0)
    s.mark_started(d.run, 0.0)
    d = s.on_arrival(short, 0.1 + DELAY)
    assert d.preempt_running and d.run.request_ids == ("1",)
    s.mark_suspended(0, 0.1 + DELAY)
    s.mark_started(d.run, 0.1 + DELAY)
    d = s.on_prefill_complete(1, 0.1 + DELAY + 0.010)
    assert d.prefilled == ("1",) and d.run.resume and d.run.batch_id == 0
    assert run.preemptions == s.preemptions == 1
    assert run.ttft_s[1] == pytest.approx(DELAY + 0.010)
    assert run.ttft_s[0] == pytest.approx(1.0 + 0.010)  # the long one ran on until the boundary, then waited 10 ms
    assert run.attainment == 1.0


def test_fcfs_does_not_preempt_and_the_short_request_waits():
    wl = workload([(0.0, 1000, 10.0), (0.1, 10, 0.05)])
    run = ClusterSim(setup("fcfs"), 1).run(wl)
    assert run.preemptions == 0
    assert run.ttft_s[0] == pytest.approx(1.0)
    assert run.ttft_s[1] == pytest.approx(1.0 + 0.010 - 0.1)
    assert run.attainment == 0.5


def test_chunked_slices_pay_attention_to_earlier_tokens():
    cost = CostModel.from_coefficients(0.0, 1e-3, 1e-6)
    assert program_seconds(cost, ((0, 100),)) == pytest.approx(cost.predict(100))
    assert program_seconds(cost, ((100, 200),)) == pytest.approx(cost.predict(200) - cost.predict(100))
    wl = explicit_workload([0.0], [300], [10.0], cost.predict)
    sched = SchedulerConfig(policy="chunked", chunk_tokens=100, granularity="none")
    run = ClusterSim(SimSetup(cost, sched, ExecConfig(boundary_delay_s=DELAY)), 1).run(wl)
    assert run.prefill_batches == 3
    assert run.ttft_s[0] == pytest.approx(cost.predict(300))  # no launch overhead (a = 0): slices add up


def test_decode_steps_follow_the_engine_and_block_arrivals():
    cost = CostModel.from_coefficients(0.1, 1e-3)  # every forward (and decode step) pays 0.1 s
    wl = explicit_workload([0.0, 0.15], [100, 100], [10.0, 10.0], cost.predict, max_tokens=[3, 1])
    run = ClusterSim(SimSetup(cost, SchedulerConfig(), ExecConfig(boundary_delay_s=DELAY)), 1).run(wl)
    first = cost.predict(100)  # 0.2 s; then decode steps back to back (nothing else to run)
    step = 0.1 + (cost.predict(101) - cost.predict(100))
    assert run.ttft_s[0] == pytest.approx(first)
    # the second one, queued behind the first (earlier deadline), starts at 0.2 but the first decode step
    # (due at once) runs before it: it ends at 0.301
    assert run.ttft_s[1] == pytest.approx(first + step + cost.predict(100) - 0.15)
    assert run.decode_steps == 2


def test_decode_interleaves_a_long_prefill_at_the_tpot_cadence():
    cost = CostModel.from_coefficients(0.01, 1e-3)
    wl = explicit_workload([0.0, 0.02], [10, 3000], [1.0, 100.0], cost.predict, max_tokens=[4, 1])
    run = ClusterSim(SimSetup(cost, SchedulerConfig(), ExecConfig(boundary_delay_s=DELAY, default_tpot_slo_s=0.5)),
                     1).run(wl)
    assert run.decode_steps == 3  # one right away, then two inside the 3 s prefill, each about 0.5 s apart
    step = 0.01 + (cost.predict(11) - cost.predict(10))
    assert run.ttft_s[1] == pytest.approx(cost.predict(10) + step + cost.predict(3000) + 2 * step - 0.02, abs=1e-9)


def test_a_decode_step_may_not_spend_the_batching_margin_of_a_running_prefill():
    """A step due 0.40 s into a 0.42 s interactive prefill would still end before its deadline
    (0.35 + 1.0 s) but not before its finish-by time (deadline less alpha x SLO = 0.1 s): it waits
    until the first token, so the prefill keeps its margin for what the replica cannot see."""
    cost = CostModel.from_coefficients(0.1, 1e-3)  # a decode step of one sequence: 0.101 s
    wl = explicit_workload([0.0, 0.35], [100, 320], [10.0, 1.0], cost.predict, max_tokens=[20, 1])
    run = ClusterSim(SimSetup(cost, SchedulerConfig(), ExecConfig(boundary_delay_s=DELAY, default_tpot_slo_s=0.5)),
                     1).run(wl)
    first, step = cost.predict(100), 0.1 + (cost.predict(101) - cost.predict(100))
    started = first + 2 * step  # the interactive one waits for the decode step in flight when it arrives
    assert run.ttft_s[1] == pytest.approx(started + cost.predict(320) - 0.35)  # no step inside its prefill
    assert started + cost.predict(320) > started + 0.5 - step  # ... where the TPOT cadence had one due
    assert run.decode_steps == 19  # deferred, not dropped

def test_queue_snapshot_matches_the_published_state_the_router_reads():
    wakes: list[float] = []
    rep = SimReplica(0, "r0", MS_PER_TOKEN, SchedulerConfig(max_suspended_batches=8), ExecConfig(),
                     lambda r, t: wakes.append(t), lambda i, v: None)
    rng = random.Random(1)
    t = 0.0
    for i in range(12):
        t += rng.uniform(0.0, 0.3)
        while wakes and min(wakes) <= t and rep.wake_at <= t:
            rep.wake(rep.wake_at)
        rep.deliver(t, SimRequest(i, Request(str(i), [0] * rng.randint(5, 400), arrival_s=t,
                                             ttft_slo_s=rng.uniform(0.05, 2.0)), 0.0))
    queued, running, running_s = rep.queue_snapshot()
    published = EngineStats.from_queue(rep.sched.stats(rep.event_at), model="m", updated_at=rep.event_at)
    state = published.queue_state("r0", "flowprefill", rep.seq, rep.event_at)  # as ReplicaServer publishes it
    ref = load_from_state(state, 0.0, state.updated_at, 5.0)
    assert sorted(queued) == sorted(ref.queued) and queued
    assert sorted(running) == sorted(ref.running) and running_s == pytest.approx(ref.running_remaining_s)


def test_idle_replicas_collapse_to_the_same_choice_as_ranking_all():
    cost = MS_PER_TOKEN
    reps = [SimReplica(i, f"r{i:02d}", cost, SchedulerConfig(), ExecConfig(), lambda r, t: None, lambda i, v: None)
            for i in range(20)]
    rng = random.Random(3)
    for i, rep in enumerate(reps):
        if i % 3 == 1:  # some busy replicas
            for j in range(rng.randint(1, 4)):
                rep.deliver(0.0, SimRequest(j, Request(f"{i}-{j}", [0] * rng.randint(50, 500), arrival_s=0.0,
                                                       ttft_slo_s=rng.uniform(0.2, 2.0)), 0.0))
    router = Router(reps, cost, RouterConfig(policy="slo_aware", vectorized=False))
    table_router = Router(reps, cost, RouterConfig(policy="slo_aware"))  # nothing happens on the replicas now
    assert table_router.fresh is not None and router.fresh is None
    for k in range(50):
        now = 0.01
        req = Request(f"q{k}", [0] * rng.randint(10, 600), arrival_s=now, ttft_slo_s=rng.uniform(0.05, 2.0))
        loads = router._loads(now)
        assert len(loads) < len(reps)
        full = [ReplicaLoad(r.replica_id, *r.queue_snapshot(), age_s=now, known=True) for r in reps]
        preq = PlacementRequest(req.request_id, req.num_prompt_tokens, req.deadline, req.ttft_slo_s)
        margin = RouterConfig().slack_margin_frac * req.ttft_slo_s
        want = rank_replicas("slo_aware", preq, full, cost, now, margin_s=margin).ranked[0]
        assert router.choose(SimRequest(k, req, 0.0), now).replica_id == want
        assert table_router.choose(SimRequest(k, req, 0.0), now).replica_id == want
    assert rank_replicas("round_robin", None, full, cost, 0.0, rr_counter=7).ranked[0] == reps[7].replica_id


def overload_trace() -> SimWorkload:
    """Long (0.9 s, SLO 2 s) and short (10 ms, SLO 0.1 s) prompts alternating every 0.25 s: round robin
    sends every long one to the same replica (0.9 s of work every 0.5 s)."""
    rows = []
    for k in range(40):
        rows.append((0.5 * k, 900, 2.0))
        rows.append((0.5 * k + 0.25, 10, 0.1))
    return workload(rows)


def test_slo_aware_routing_beats_round_robin_on_overload():
    wl = overload_trace()
    att = {p: ClusterSim(setup(router=p), 2).run(wl).attainment for p in ("slo_aware", "round_robin")}
    assert att["round_robin"] <= 0.8  # the long ones pile up on one replica
    assert att["slo_aware"] >= 0.95
    assert att["slo_aware"] > att["round_robin"] + 0.15


def poisson(n: int, seed: int = 0) -> SimWorkload:
    rng = random.Random(seed)
    t, rows = 0.0, []
    for _ in range(n):
        t += rng.expovariate(10.0)
        tokens = rng.choice([20, 50, 400])
        rows.append((t, tokens, 0.1 if tokens < 100 else 1.5))
    return workload(rows)


def test_attainment_falls_with_the_rate_and_goodput_grows_with_replicas():
    wl = poisson(150)
    sim = ClusterSim(setup(router="round_robin"), 1)
    atts = [sim.run(wl, s).attainment for s in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert atts[0] == 1.0 and atts[-1] < 0.5
    assert all(b <= a + 0.02 for a, b in zip(atts, atts[1:]))  # monotone-ish
    cfg = SimBenchConfig(trace="-", refine_steps=2)
    one = find_goodput(ClusterSim(setup(router="round_robin"), 1), wl, 1.0, cfg)
    tiled = Trace(tuple(TraceRequest(a, n, 1) for a, n in zip(wl.arrival_s, wl.tokens)))
    trace4, span = tile_window(tiled, 4, seed=1)
    wl4 = explicit_workload([r.arrival_s for r in trace4], [r.input_tokens for r in trace4],
                            [0.1 if r.input_tokens < 100 else 1.5 for r in trace4], MS_PER_TOKEN.predict, span_s=span)
    four = find_goodput(ClusterSim(setup(router="round_robin"), 4), SimWorkload(**{**wl4.__dict__, "copies": 4}),
                        one["goodput_scale"], cfg)
    assert one["goodput"] > 0 and len(wl4) == 4 * len(wl)
    assert four["goodput"] >= 3.0 * one["goodput"]  # four replicas: at least about four times the load
    assert four["goodput_per_replica"] >= 0.75 * one["goodput_per_replica"]


def test_early_stop_only_when_the_goal_is_already_missed():
    wl = poisson(300)
    sim = ClusterSim(setup(), 1)
    full, early = sim.run(wl, 4.0), sim.run(wl, 4.0, stop_below=0.9)
    assert early.stopped_early and early.simulated < len(wl)
    assert full.attainment < 0.9 and early.attainment < 0.9
    fine = sim.run(wl, 0.25, stop_below=0.9)
    assert not fine.stopped_early and fine.attainment == sim.run(wl, 0.25).attainment == 1.0


def test_runs_are_deterministic():
    wl = poisson(200, seed=5)
    a = ClusterSim(setup(router="pow2"), 3).run(wl, 2.0)
    b = ClusterSim(setup(router="pow2"), 3).run(wl, 2.0)
    assert a.ttft_s == b.ttft_s and a.preemptions == b.preemptions


def test_one_copy_is_the_bench_policies_workload(tmp_path):
    policy_bench = pytest.importorskip("bench.policy_bench")
    from bench.sim.workload import cluster_workload
    from bench.traces import load_trace

    rng = random.Random(2)
    path = tmp_path / "trace.csv"
    t, lines = 0.0, ["arrival_s,input_tokens,output_tokens"]
    for _ in range(80):
        t += rng.expovariate(2.0)
        lines.append(f"{t:.4f},{rng.randint(3, 7000)},{rng.randint(1, 40)}")
    path.write_text("\n".join(lines) + "\n")

    class Tokenizer:
        def encode(self, text: str) -> list[int]:
            return list(range(50))

    cost = CostModel.from_coefficients(0.05, 1e-4, 1e-8)
    cfg = policy_bench.PolicyBenchConfig(trace=str(path), max_requests=60, seed=3)
    reqs, _ = policy_bench.build_workload(cfg, Tokenizer(), cost.predict)
    wl = cluster_workload(load_trace(path), cost.predict, 1, requests_per_copy=60, seed=3)
    assert wl.arrival_s == pytest.approx([r.arrival_s for r in reqs])
    assert wl.tokens == tuple(len(r.prompt_ids) for r in reqs)
    assert wl.max_tokens == tuple(r.max_tokens for r in reqs)
    assert wl.ttft_slo_s == pytest.approx([r.ttft_slo_s for r in reqs])
    assert wl.slo_class == tuple(r.slo_class.name for r in reqs)


def test_stale_state_still_counts_work_in_flight():
    wl = workload([(0.1, 1000, 5.0), (0.2, 1000, 5.0), (3.5, 10, 5.0)])
    for staleness in (0.0, 1.0):
        s = setup("fcfs", router="least_loaded")
        s.router = RouterConfig(policy="least_loaded", staleness_s=staleness)
        sim = ClusterSim(s, 2)
        run = sim.run(wl)
        # the second request sees the first one in flight (stale) or in the state (fresh): the other replica
        assert run.ttft_s[:2] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="staleness"):
        RouterConfig(staleness_s=-1.0)


def test_execution_calibration_scales_programs_and_charges_extra_sequences():
    from bench.sim.validate import fit_execution

    wl = workload([(0.0, 10, 1.0), (0.0, 20, 1.0), (0.0, 30, 1.0)])
    run = ClusterSim(setup(exec_time_scale=2.0, seq_overhead_s=0.01), 1).run(wl)
    # the first starts alone on the idle replica; the other two are batched behind it (one extra sequence)
    assert run.prefill_batches == 2
    assert run.ttft_s == pytest.approx([2 * 0.010, 2 * 0.010 + 2 * 0.050 + 0.01, 2 * 0.010 + 2 * 0.050 + 0.01])
    rng = random.Random(0)
    points = [(rng.randint(1, 8), rng.uniform(0.1, 1.0)) for _ in range(40)]
    samples = [(k, p, 1.3 * p + 0.008 * (k - 1)) for k, p in points]
    assert fit_execution(samples) == pytest.approx((1.3, 0.008))


def test_decode_curve_is_interpolated_and_extrapolated_by_its_last_slope():
    from bench.sim.exec_model import decode_curve_seconds

    curve = ((1, 0.05), (2, 0.06), (4, 0.06), (8, 0.10))
    got = [decode_curve_seconds(curve, k) for k in (1, 2, 3, 6, 8, 12)]
    assert got == pytest.approx([0.05, 0.06, 0.06, 0.08, 0.10, 0.14])
    assert decode_curve_seconds(((4, 0.2),), 1) == decode_curve_seconds(((4, 0.2),), 9) == 0.2
    assert decode_curve_seconds(((1, 0.3), (2, 0.2)), 5) == pytest.approx(0.2)  # never extrapolated downwards
    for bad in (((2, 0.1), (1, 0.2)), ((1, 0.1), (1, 0.2)), ((0, 0.1),), ((1, -0.1),)):
        with pytest.raises(ValueError, match="decode_curve"):
            ExecConfig(decode_curve=bad)


def test_a_request_arriving_during_a_decode_step_waits_for_the_curves_step_time():
    # A (10 tokens, 2 output tokens) prefills in 0.010 s and then takes one decode step of one sequence;
    # B arrives during that step, is drained at its end and prefills in 0.010 s
    wl = workload([(0.0, 10, 5.0), (0.011, 10, 5.0)], max_tokens=[2, 1])
    run = ClusterSim(setup(decode_curve=((1, 0.5), (4, 0.8))), 1).run(wl)
    assert run.decode_steps == 1
    assert run.ttft_s == pytest.approx([0.010, 0.010 + 0.5 - 0.011 + 0.010])
    fixed = ClusterSim(setup(decode_curve=((1, 0.5),), decode_step_s=0.2), 1).run(wl)  # a fixed step wins
    assert fixed.ttft_s[1] == pytest.approx(0.010 + 0.2 - 0.011 + 0.010)


def test_decode_curve_flag_is_parsed_and_a_bad_one_names_the_flag():
    import argparse

    from bench.sim.cli import parse_decode_curve

    assert parse_decode_curve("1:0.06, 4:0.065,16:0.16") == ((1, 0.06), (4, 0.065), (16, 0.16))
    for bad in ("1:0.06,x:1", "4", "4:0.1,2:0.2", "1:-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="batch:seconds|increasing batch sizes"):
            parse_decode_curve(bad)


def test_decode_curve_fit_takes_the_median_step_per_batch_size():
    from bench.sim.validate import fit_decode_curve

    steps = [(2, 0.0, 0.12), (1, 0.0, 0.06), (2, 0.0, 0.10), (2, 0.0, 0.50), (5, 0.0, 0.2), (1, 0.0, 0.07)]
    curve = fit_decode_curve(steps)
    assert [k for k, _ in curve] == [1, 2, 5]
    assert [s for _, s in curve] == pytest.approx([0.065, 0.12, 0.2])
    assert fit_decode_curve([]) == ()


def mixed_workload(n: int, seed: int) -> SimWorkload:
    """Bursty arrivals of short (tight SLO, often sheddable) and long prompts: queues, sheds, late work."""
    rng = random.Random(seed)
    t, rows, shed = 0.0, [], []
    for _ in range(n):
        t += rng.expovariate(40.0 if rng.random() < 0.7 else 4.0)
        tokens = rng.choice([10, 30, 60, 200, 700])
        rows.append((t, tokens, rng.uniform(0.03, 0.2) if tokens < 100 else rng.uniform(0.5, 3.0)))
        shed.append(tokens < 100 and rng.random() < 0.5)
    return workload(rows, sheddable=shed, max_tokens=[rng.randint(1, 4) for _ in rows])


@pytest.mark.parametrize("router", ["slo_aware", "least_loaded"])
@pytest.mark.parametrize("kw", [{}, {"slack_margin_frac": 0.3, "heartbeat_s": 0.25}, {"shed": False}])
def test_vectorized_router_reproduces_the_per_decision_ranking(router, kw):
    """The PlacementTable path (incremental rows, heartbeats, lazy re-classification) makes the same choices
    as rank_replicas over ReplicaLoads rebuilt per decision: identical runs, bit for bit."""
    wl = mixed_workload(700, seed=11)
    runs, reclassified = [], 0
    for vectorized in (False, True):
        s = setup(router=router)
        s.router = RouterConfig(policy=router, vectorized=vectorized, **kw)
        sim = ClusterSim(s, 5)
        runs.append(sim.run(wl, 1.0))
        reclassified = sim.last_router.fresh.reclassified if vectorized else 0
    slow, fast = runs
    assert fast.ttft_s == slow.ttft_s
    assert (fast.shed, fast.preemptions, fast.events) == (slow.shed, slow.preemptions, slow.events)
    assert slow.shed > 0 or router != "slo_aware" or kw.get("shed") is False
    assert reclassified > 0  # the lazy 50 ms / heartbeat re-classification was exercised


def test_real_percentiles_take_the_median_over_replays_and_per_request():
    from bench.sim.validate import real_percentiles

    runs = [[1.0, 2.0, 3.0, None], [3.0, 4.0, 5.0, 6.0], [2.0, 3.0, 100.0, 7.0]]
    real = real_percentiles(runs)
    p50s = [2.0, 4.5, 5.0]  # numpy's interpolated p50 of each run's finished requests
    assert [p[0] for p in real["runs_p50_p90_s"]] == pytest.approx(p50s)
    assert real["ttft_p50_s"] == pytest.approx(4.5)
    assert real["per_request_s"][:3] == pytest.approx([2.0, 3.0, 5.0])
    assert real["per_request_s"][3] is None  # not finished in every run

    from bench.sim.validate import _compare

    sim = [2.0, 3.3, None, 6.0]
    cmp = _compare(real, sim, 0.75)
    assert cmp["ttft_s"] == sim and cmp["compared"] == 2  # kept whole for plots; compared where both finished
    assert cmp["per_request_median_rel_error"] == pytest.approx(0.05)  # |2-2|/2 = 0 and |3.3-3|/3 = 0.1


def test_sweep_on_two_worker_processes_matches_the_sweep_in_one(tmp_path, capsys):
    from bench.sim.sweep import run_sweep

    rng = random.Random(3)
    t, rows = 0.0, ["arrival_s,input_tokens,output_tokens"]
    for _ in range(40):
        t += rng.expovariate(8.0)
        rows.append(f"{t:.4f},{rng.choice([20, 60, 900])},{rng.choice([1, 3])}")
    trace = tmp_path / "trace.csv"
    trace.write_text("\n".join(rows) + "\n")
    profile = tmp_path / "profile.json"
    MS_PER_TOKEN.save(profile)
    kw = dict(trace=str(trace), replicas=(1, 4), router_policies=("slo_aware", "round_robin"), profile=str(profile),
              length_scale=1.0, requests_per_replica=30, max_requests=100, refine_steps=2, max_steps=6)
    one = run_sweep(SimBenchConfig(**kw, jobs=1))
    two = run_sweep(SimBenchConfig(**kw, jobs=2))
    assert one["jobs"] == 1 and two["jobs"] == 2 and two["scheduler_floor_requests_per_s"] > 0
    assert [(r["replicas"], r["router_policy"]) for r in two["results"]] == [
        (1, "slo_aware"), (1, "round_robin"), (4, "slo_aware"), (4, "round_robin")]
    strip = [[{k: v for k, v in p.items() if k != "wall_s"} for p in r["points"]] for r in one["results"]]
    assert strip == [[{k: v for k, v in p.items() if k != "wall_s"} for p in r["points"]] for r in two["results"]]
    assert [r["goodput"] for r in one["results"]] == [r["goodput"] for r in two["results"]]
    assert all(r["goodput"] > 0 for r in one["results"])
    # two bisections of a 1.5x (or, after a 3x step down, 3x) bracket
    assert all(1.0 < r["bracket"] <= 3 ** 0.25 + 1e-9 for r in one["results"])
    out = capsys.readouterr().out
    assert "on 2 process(es)" in out and "search resolution: each goodput is within" in out
    with pytest.raises(ValueError, match="--jobs"):
        SimBenchConfig(**kw, jobs=-1)


def test_scheduler_floor_runs_every_request_through_the_real_scheduler():
    from bench.sim.floor import scheduler_floor

    out = scheduler_floor(MS_PER_TOKEN, SchedulerConfig(), requests=200, prompt_tokens=30, repeats=2)
    assert len(out["requests_per_s_rounds"]) == 2 and out["requests_per_s"] == max(out["requests_per_s_rounds"])
    assert out["finished"] == out["requests"] == 200 and out["requests_per_s"] == pytest.approx(200 / out["wall_s"])
    with pytest.raises(ValueError, match="requests"):
        scheduler_floor(MS_PER_TOKEN, SchedulerConfig(), requests=0)


def test_per_class_comparison_is_stable_where_the_overall_median_falls_between_clusters():
    from bench.sim.validate import per_class_comparison, real_percentiles

    classes = ["interactive"] * 4 + ["batch"] * 4
    # two real replays: the same clusters, two batch requests a little earlier in the second
    runs = [[0.2, 0.3, 0.3, 0.4, 3.0, 3.2, 3.4, 9.0], [0.2, 0.3, 0.3, 0.4, 2.0, 2.8, 3.4, 9.0]]
    sim = [0.2, 0.3, 0.3, 0.4, 3.0, 3.2, 3.4, 9.0]
    out = per_class_comparison(runs, sim, classes)
    assert list(out) == ["interactive", "batch"] and out["interactive"]["requests"] == 4
    assert out["interactive"]["rel_error_p50"] == pytest.approx(0.0)
    assert out["batch"]["real_p50_s"] == pytest.approx(3.2)  # the median of the runs' p50s, 3.3 and 3.1
    assert out["batch"]["sim_p50_s"] == pytest.approx(3.3)
    assert out["batch"]["rel_error_p50"] == pytest.approx(3.3 / 3.2 - 1)
    # over all requests the p50 sits in the gap: 1.7 against 1.2 in the two replays
    assert [p[0] for p in real_percentiles(runs)["runs_p50_p90_s"]] == pytest.approx([1.7, 1.2])
