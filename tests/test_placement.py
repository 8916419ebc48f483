"""Placement logic (router.placement) and the SLO-aware request router's decisions, without Ray or Redis."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from bench.placement_bench import bench_placement
from replicas.replica_request import ReplicaRequest
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from router.local_load import OVERDUE_S, LocalLoadEstimator
from router.placement import (
    PREEMPT_LATENCY_S,
    PlacementRequest,
    ReplicaLoad,
    evaluate,
    load_from_state,
    predict_ttft,
    rank_replicas,
)
from state.client import StateUnavailable
from state.clock import Clock
from state.schema import QueuedRequest, ReplicaQueueState

NOW = 1_000_000.0
COST = CostModel.from_coefficients(0.0, 1e-4)  # 1000 tokens = 0.1 s


def q(rid: str, deadline_in: float, rem: float, status: str = "waiting") -> QueuedRequest:
    return QueuedRequest(rid, status, NOW + deadline_in, rem, 100)


def state(rid: str, *reqs: QueuedRequest, running_s: float = 0.0, age: float = 0.0, seq: int = 1) -> ReplicaQueueState:
    return ReplicaQueueState(rid, "flowprefill", "m", NOW - age, seq, tuple(reqs), running_s)


def load(st: ReplicaQueueState, inflight: float = 0.0) -> ReplicaLoad:
    return load_from_state(st, inflight, NOW, max_age_s=5.0)


def req(tokens: int = 1000, deadline_in: float = 0.5, sheddable: bool = False) -> PlacementRequest:
    return PlacementRequest("new", tokens, NOW + deadline_in, deadline_in, sheddable)


def slo(r: PlacementRequest, *loads: ReplicaLoad, **kw: object):
    return rank_replicas("slo_aware", r, list(loads), COST, NOW, **kw)


# ---------------------------------------------------------------------- the TTFT model
def test_urgent_request_avoids_replica_with_earlier_deadline_work():
    # A: a long running prefill with a late deadline (preemptible) plus queued work due before the
    # new request, which runs first (EDF) and makes it late there. B is idle.
    a = load(state("A", q("long", 30.0, 2.0, "running"), q("early", 0.25, 0.2), running_s=2.0))
    b = load(state("B"))
    r = req(1000, 0.3)
    d = slo(r, a, b)
    assert d.ranked == ["B", "A"] and not d.shed
    assert d.predicted_ttft["A"] == pytest.approx(0.2 + 0.1 + PREEMPT_LATENCY_S)
    assert d.predicted_ttft["B"] == pytest.approx(0.1)
    rr = rank_replicas("round_robin", r, [a, b], COST, NOW, rr_counter=0)
    assert rr.ranked[0] == "A"  # the baseline ignores the queue


def test_urgent_request_goes_to_an_idle_replica_rather_than_preempting_a_long_prefill():
    a = load(state("A", q("long", 30.0, 2.0, "running"), running_s=2.0))  # lots of slack: could wait 0.1 s
    b = load(state("B"))
    d = slo(req(1000, 0.5), a, b)
    assert d.predicted_ttft["A"] == pytest.approx(0.1 + PREEMPT_LATENCY_S)
    assert d.ranked == ["B", "A"] and d.reason.startswith("packed on B")


def test_preempting_beats_missing_the_deadline_when_no_replica_is_idle():
    a = load(state("A", q("long", 30.0, 2.0, "running"), running_s=2.0))  # preemptible: TTFT 0.102 s
    b = load(state("B", q("due", 0.45, 0.45)))  # earlier-deadline work first: TTFT 0.55 s, late
    d = slo(req(1000, 0.5), a, b)
    assert d.ranked == ["A", "B"] and "displaces later work" in d.reason


def test_packing_still_fills_replicas_whose_queue_runs_first():
    # Queued work due before the new request is not displaced: the fullest replica that still meets
    # the deadline wins, keeping the idle one free for more urgent work.
    a = load(state("A", q("x", 0.2, 0.15)))
    b = load(state("B"))
    assert slo(req(1000, 0.5), a, b).ranked == ["A", "B"]


def test_packing_avoids_pushing_later_work_past_its_deadline():
    a = load(state("A", q("long", 2.05, 2.0, "running"), running_s=2.0))  # 0.05 s slack < 0.1 s delay
    b = load(state("B"))
    d = slo(req(1000, 0.5), a, b)
    assert d.ranked == ["B", "A"] and "packed on B" in d.reason


def test_least_slack_wins_among_feasible_and_late_ranks_last():
    a = load(state("A", q("x", 0.2, 0.1)))
    b = load(state("B", q("y", 0.2, 0.15), q("z", 0.3, 0.15)))
    c = load(state("C"))
    late = load(state("D", q("w", 0.4, 0.35), q("v", 0.45, 0.1)))
    d = slo(req(1000, 0.5), a, b, c, late)
    assert d.ranked == ["B", "A", "C", "D"]
    assert d.predicted_ttft["D"] > 0.5 >= d.predicted_ttft["B"]


def test_margin_ranks_tight_replicas_after_roomy_ones():
    tight = load(state("T", q("x", 0.3, 0.35 - 1e-3 - 0.1)))  # ~0.05 s to spare
    roomy = load(state("R"))
    assert slo(req(1000, 0.4), tight, roomy).ranked == ["T", "R"]
    assert slo(req(1000, 0.4), tight, roomy, margin_s=0.1).ranked == ["R", "T"]


def test_none_feasible_least_late_or_shed():
    a = load(state("A", q("x", 0.3, 0.29)))
    b = load(state("B", q("y", 0.3, 0.25)))
    d = slo(req(1000, 0.35), a, b)
    assert d.ranked == ["B", "A"] and not d.shed and "least late B" in d.reason
    assert slo(req(1000, 0.35, sheddable=True), a, b).shed
    assert not slo(req(1000, 0.35, sheddable=True), a, b, allow_shed=False).shed


def test_late_work_in_queue_does_not_delay_feasible_request():
    # The replica runs feasible work first; a request already past saving waits (slack gating).
    a = load(state("A", q("doomed", 0.05, 0.5)))
    assert predict_ttft(req(1000, 0.5), a, COST, NOW) == pytest.approx(0.1)
    # ... but a request that is late itself queues behind all feasible work.
    b = load(state("B", q("ok", 5.0, 0.3)))
    assert predict_ttft(req(1000, 0.05), b, COST, NOW) == pytest.approx(0.4)


def test_inflight_and_age_decay():
    a = load(state("A", q("x", 0.4, 0.3), age=0.2), inflight=0.05)  # 0.2 s of its 0.3 s done since
    assert predict_ttft(req(1000, 0.5), a, COST, NOW) == pytest.approx(0.1 + 0.05 + 0.1)


def test_stale_and_missing_states_rank_after_known_feasible_before_late():
    stale = load(state("S", age=10.0))  # looked idle, but nobody vouches for it now
    fresh = load(state("F", q("x", 0.2, 0.2)))
    missing = ReplicaLoad("M", inflight_s=0.01, known=False)
    late = load(state("L", q("y", 0.45, 0.42)))
    assert stale.stale and not stale.usable
    d = slo(req(1000, 0.5), stale, fresh, missing, late)
    assert d.ranked == ["F", "S", "M", "L"]  # unknown ones by predicted TTFT (in flight + own)
    assert d.predicted_ttft["M"] == pytest.approx(0.11)


def test_least_loaded_and_round_robin():
    a = load(state("A", q("x", 9.0, 0.3)))
    b = load(state("B", q("y", 9.0, 0.1)), inflight=0.1)
    c = load(state("C", q("z", 9.0, 0.5)))
    assert rank_replicas("least_loaded", req(), [a, b, c], COST, NOW).ranked == ["B", "A", "C"]
    assert rank_replicas("slo_aware", None, [a, b, c], COST, NOW).ranked == ["B", "A", "C"]
    firsts = [rank_replicas("round_robin", req(), [c, a, b], COST, NOW, i).ranked[0] for i in range(4)]
    assert firsts == ["A", "B", "C", "A"]
    with pytest.raises(ValueError):
        rank_replicas("pow2", req(), [a], COST, NOW)


def test_running_batch_counts_once():
    st = state("A", q("r1", 0.3, 0.2, "running"), q("r2", 9.0, 0.25, "running"), running_s=0.27)
    assert predict_ttft(req(1000, 0.5), load(st), COST, NOW) == pytest.approx(0.27 + 0.1)


# ---------------------------------------------------------------------- local estimator
def test_local_estimator_spreads_and_drains():
    est, ids = LocalLoadEstimator(), ["a", "b", "c"]
    chosen = []
    for i in range(6):  # each 0.1 s, due within 0.25 s: two fit per replica
        r = PlacementRequest(f"r{i}", 1000, NOW + 0.25, 0.25)
        d = rank_replicas("slo_aware", r, est.loads(ids, NOW), COST, NOW)
        est.dispatched(d.ranked[0], r.request_id, d.cost_s, r.deadline, NOW)
        chosen.append(d.ranked[0])
    assert sorted(chosen) == ["a", "a", "b", "b", "c", "c"]
    assert [ld.pending_s(NOW) for ld in est.loads(ids, NOW)] == pytest.approx([0.2, 0.2, 0.2])
    # 0.15 s on: each replica's first request ran out its prediction (charged OVERDUE_S until it
    # completes), its second has 0.05 s left.
    assert [ld.pending_s(NOW + 0.15) for ld in est.loads(ids, NOW + 0.15)] == pytest.approx([0.05 + OVERDUE_S] * 3)
    est.completed("r5")
    est.completed("unknown")
    assert sum(ld.pending_s(NOW + 0.15) for ld in est.loads(ids, NOW + 0.15)) == pytest.approx(0.1 + 3 * OVERDUE_S)
    for i in range(5):
        est.completed(f"r{i}")
    assert all(ld.pending_s(NOW + 1) == 0.0 for ld in est.loads(ids, NOW + 1))


def test_local_estimator_keeps_an_overrun_long_prefill_ahead_of_an_idle_replica():
    """The flaky CI case: with Redis away, a long prefill running past its prediction must not make
    its replica look idle (it tied with the idle one, and the replica id sent urgent work behind it)."""
    est = LocalLoadEstimator(overdue_ttl_s=60.0)
    est.dispatched("a-busy", "long", 6.0, NOW + 10.0, NOW)
    later = NOW + 9.0  # 3 s past its prediction, still running
    urgent = PlacementRequest("short", 8, later + 0.3, 0.3)
    for policy in ("slo_aware", "least_loaded"):
        assert rank_replicas(policy, urgent, est.loads(["a-busy", "b-idle"], later), COST, later).ranked[0] == "b-idle"
    est.completed("long")
    assert [ld.pending_s(later) for ld in est.loads(["a-busy", "b-idle"], later)] == [0.0, 0.0]
    est.dispatched("a-busy", "lost", 1.0, later + 10.0, later)  # runs out at later + 1; no callback ever
    assert est.loads(["a-busy"], later + 60.5)[0].pending_s(later + 60.5) == pytest.approx(OVERDUE_S)
    assert est.loads(["a-busy"], later + 61.5)[0].pending_s(later + 61.5) == 0.0


def test_bench_placement_reports_every_decision_over_every_replica():
    out = bench_placement(8, 100, iterations=200)
    assert (out["n_replicas"], out["n_queued"], out["iterations"], out["fully_ranked"]) == (8, 100, 200, 200)
    assert 0 < out["median_s"] <= out["p99_s"] and out["build_median_s"] > 0  # timings, not a speed target


# ---------------------------------------------------------------------- the Serve request router (no Ray)
class FakeCluster:
    """Stands in for ClusterState: canned states, recorded add_inflight calls, switchable outage."""

    def __init__(self, states: dict[str, ReplicaQueueState], inflight: dict[str, float] | None = None) -> None:
        self.states, self.inflight, self.added, self.down = states, inflight or {}, [], False
        self.cleared: list[tuple[str, str]] = []

    async def read_all_replica_states(self, *, skip_invalid: bool = False) -> dict[str, ReplicaQueueState]:
        if self.down:
            raise StateUnavailable("Redis at redis://:***@h:1 unavailable during read: ConnectionError")
        return dict(self.states)

    async def read_inflight_totals(self) -> dict[str, float]:
        if self.down:
            raise StateUnavailable("down")
        return dict(self.inflight)

    async def add_inflight(self, replica_id: str, request_id: str, predicted_s: float) -> float:
        self.added.append((replica_id, request_id, predicted_s))
        return predicted_s

    async def clear_inflight(self, replica_id: str, request_id: str) -> None:
        self.cleared.append((replica_id, request_id))


def make_router(cluster: FakeCluster | None, clock: list[float], **kw: object):
    from router.request_router import SLOAwareRequestRouter

    router = SLOAwareRequestRouter.__new__(SLOAwareRequestRouter)  # Serve's __init__ needs a controller
    router.initialize_state(cluster=cluster, cost_model=COST.to_dict(), clock=Clock(lambda: clock[0], "test"), **kw)
    return router


def replica(rid: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid))


def pending(payload: object, internal: str = "i1"):
    from ray.serve.request_router import PendingRequest

    return PendingRequest(args=[payload], kwargs={}, metadata=SimpleNamespace(request_id="rq",
                                                                             internal_request_id=internal))


def payload(deadline_in: float = 0.3, tokens: int = 1000, **kw: object) -> ReplicaRequest:
    return ReplicaRequest("rq", (1,) * tokens, arrival_s=NOW, ttft_slo_s=deadline_in,
                          sampling=SamplingParams(max_tokens=1), **kw)


def test_router_ranks_from_redis_and_records_inflight():
    states = {"A": state("A", q("long", 30.0, 2.0, "running"), q("early", 0.25, 0.2), running_s=2.0), "B": state("B")}
    cluster, clock = FakeCluster(states), [NOW]
    router = make_router(cluster, clock)
    reps = {"A": replica("A"), "B": replica("B"), "C": replica("C")}  # C: no state in Redis yet

    async def run() -> None:
        pr = pending(payload())
        tiers = await router.choose_replicas(list(reps.values()), pr)
        assert [t[0].replica_id.unique_id for t in tiers] == ["B", "C", "A"]
        router.on_request_routed(pr, reps["B"].replica_id, None)
        await asyncio.sleep(0)
        assert cluster.added == [("B", "rq", pytest.approx(0.1))]
        router.on_request_completed(reps["B"].replica_id, "i1")
        await asyncio.sleep(0)
        assert cluster.cleared == [("B", "rq")]  # a request done before B listed it leaves no phantom work

    asyncio.run(run())


def test_router_sheds_sheddable_request_through_the_future():
    from router.request_router import STATS, RequestShed

    cluster, clock = FakeCluster({"A": state("A", q("x", 0.2, 0.19))}), [NOW]
    router = make_router(cluster, clock)

    async def run() -> None:
        pr = pending(payload(0.25, sheddable=True))
        before = STATS.sheds
        tiers = await router.choose_replicas([replica("A")], pr)
        assert tiers and pr.future.done() and STATS.sheds == before + 1
        with pytest.raises(RequestShed):
            pr.future.result()

    asyncio.run(run())


def test_shed_carries_how_late_the_best_replica_is_as_the_retry_hint():
    import pickle

    from router.request_router import RequestShed

    cluster, clock = FakeCluster({"A": state("A", q("x", 0.2, 0.19))}), [NOW]
    router = make_router(cluster, clock)

    async def run() -> None:
        pr = pending(payload(0.25, tokens=30_000, sheddable=True))  # 0.19 s ahead + 3 s of its own
        await router.choose_replicas([replica("A")], pr)
        with pytest.raises(RequestShed) as info:
            pr.future.result()
        assert info.value.retry_after_s == pytest.approx(0.19 + 3.0 - 0.25)
        copy = pickle.loads(pickle.dumps(info.value))  # as it crosses from Serve's router to the ingress
        assert copy.retry_after_s == info.value.retry_after_s and str(copy) == str(info.value)

    asyncio.run(run())


def test_router_falls_back_to_local_estimates_when_redis_is_down(caplog: pytest.LogCaptureFixture):
    from router.request_router import STATS

    cluster, clock = FakeCluster({"A": state("A"), "B": state("B")}), [NOW]
    router = make_router(cluster, clock, policy="least_loaded")
    reps = [replica("A"), replica("B")]
    cluster.down = True

    async def run() -> list[str]:
        firsts = []
        for i in range(4):
            clock[0] = NOW + i * 0.01
            pr = pending(payload(5.0), internal=f"i{i}")
            tiers = await router.choose_replicas(reps, pr)
            firsts.append(tiers[0][0].replica_id.unique_id)
            router.on_request_routed(pr, tiers[0][0].replica_id, None)
        await asyncio.sleep(0)
        return firsts

    before = STATS.redis_fallbacks
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        firsts = asyncio.run(run())
    assert sorted(firsts) == ["A", "A", "B", "B"]  # spread by this router's own dispatches
    assert STATS.redis_fallbacks == before + 4 and cluster.added == []
    warnings = [r for r in caplog.records if "local estimates" in r.getMessage()]
    assert len(warnings) == 1 and "***" in warnings[0].getMessage()


def test_a_payload_that_is_no_valid_request_is_placed_least_loaded():
    from router.request_router import payload_of

    router = make_router(None, [NOW])
    assert "no request metadata" in router._decide(["A", "B"], None, {}, {}, NOW).reason
    plain = {"request_id": "y", "prompt_token_ids": [1] * 1000, "arrival_s": NOW - 0.1, "ttft_slo_s": 0.5,
             "sampling": {"max_tokens": 2}}

    async def parse() -> tuple[object, object]:  # a PendingRequest needs a running loop
        return payload_of(pending({"request_id": "x"})), payload_of(pending(plain))

    bad, parsed = asyncio.run(parse())
    assert bad is None  # not a valid request: the replica refuses it, naming the field
    # a caller with a plain dict: parsed by ReplicaRequest's one parser
    assert parsed == ReplicaRequest.from_dict(plain) and parsed.deadline == pytest.approx(NOW + 0.4)
    d = router._decide(["A"], parsed, {}, {}, NOW)  # A unknown: own cost only
    assert d.predicted_ttft["A"] == pytest.approx(0.1) and d.cost_s == pytest.approx(0.1)


def test_router_decides_from_a_stale_snapshot_while_a_refresh_runs_in_the_background():
    """Redis round trips stay off the decision path: a snapshot older than the cache TTL but within
    max_stale_s is used at once; a dispatch that landed after the snapshot still counts."""
    cluster, clock = FakeCluster({"A": state("A"), "B": state("B")}), [NOW]
    router = make_router(cluster, clock, cache_ttl_s=0.005, max_stale_s=0.25)
    reps = {"A": replica("A"), "B": replica("B")}
    gate = asyncio.Event()
    reads = []

    async def slow_read(*, skip_invalid: bool = False) -> dict:
        reads.append(clock[0])
        await gate.wait()
        return {"A": state("A"), "B": state("B")}

    async def run() -> None:
        first = pending(payload(deadline_in=5.0), internal="i1")
        await router.choose_replicas(list(reps.values()), first)  # the first read is awaited (no snapshot yet)
        router.on_request_routed(first, reps["A"].replica_id, None)
        await asyncio.sleep(0)  # add_inflight lands in Redis (after the snapshot was taken)
        cluster.read_all_replica_states = slow_read
        clock[0] = NOW + 0.1  # stale, but within max_stale_s
        second = pending(payload(deadline_in=5.0), internal="i2")
        tiers = await asyncio.wait_for(router.choose_replicas(list(reps.values()), second), 1.0)
        assert len(reads) == 1 and not gate.is_set()  # a refresh started and did not block the decision
        assert [t[0].replica_id.unique_id for t in tiers] == ["B", "A"]  # A's unreported 0.1 s still counts
        gate.set()

    asyncio.run(run())


def test_a_vllm_replica_runs_its_prefill_to_the_end_so_urgent_work_waits_there():
    """vLLM never preempts a running prefill: a busy vLLM replica is not free for urgent work."""
    busy = ReplicaQueueState("V", "vllm", "m", NOW, 1, (q("long", 30.0, 2.0, "running"), q("later", 9.0, 0.5)), 2.0)
    native = ReplicaQueueState("N", "flowprefill", "m", NOW, 1, (q("long", 30.0, 2.0, "running"),), 2.0)
    v, n = load(busy), load(native)
    assert not v.preemptive and n.preemptive
    r = req(1000, 0.5)
    assert predict_ttft(r, v, COST, NOW) == pytest.approx(2.0 + 0.1)  # behind the whole running prefill
    assert predict_ttft(r, n, COST, NOW) == pytest.approx(0.1 + PREEMPT_LATENCY_S)  # preempts it
    assert slo(r, v, n).ranked == ["N", "V"]
    # Waiting work is plain EDF: due earlier runs first, due later is displaced (harmed if pushed late).
    tight = ReplicaQueueState("T", "vllm", "m", NOW, 1, (q("due", 0.65, 0.6),), 0.0)
    place = evaluate(NOW + 0.5, 0.1, load(tight), NOW)
    assert place.ttft == pytest.approx(0.1) and place.displaces and place.harm  # 0.6 s fits 0.65 s, 0.7 s not
    assert not evaluate(NOW + 0.5, 0.01, load(tight), NOW).harm


def test_a_tie_goes_to_the_replica_with_fewer_decoding_streams():
    """A long prompt that has moved on to decode leaves its replica with nothing in prefill: the two
    replicas tie on every prefill term, and the one not decoding wins though its id sorts last."""
    from dataclasses import replace

    decoding = load_from_state(replace(state("a-replica"), decoding=1), 0.0, NOW, 5.0)
    idle = load_from_state(state("b-replica"), 0.0, NOW, 5.0)
    assert decoding.decoding == 1 and idle.decoding == 0
    d = rank_replicas("slo_aware", PlacementRequest("new", 100, NOW + 1.0, 1.0), [decoding, idle], COST, NOW)
    assert d.ranked == ["b-replica", "a-replica"]
    assert d.predicted_ttft["a-replica"] == d.predicted_ttft["b-replica"]
