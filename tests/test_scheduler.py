"""Tests for the replica-local scheduler (replicas/scheduler/): pure logic, injected times only."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scheduler_bench import bench_scheduling_pass
from replicas.decode_cadence import DecodeForecast
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.core import Scheduler
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.events import Abort, Arrival, BatchPlan, Decision, Finish, PrefillComplete
from replicas.scheduler.policies import make_policy
from replicas.scheduler.request import Request, RequestState
from replicas.scheduler.view import TokenPool

S = RequestState
MS_PER_TOKEN = CostModel.from_coefficients(0.0, 1e-3)  # predict(n) = n ms, batches add up


class StepClock:
    """Fake perf clock: every call advances 1 ms."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1e-3
        return self.t


def req(rid: str, n: int, arrival: float, slo: float, **kw) -> Request:
    return Request(rid, [7] * n, arrival_s=arrival, ttft_slo_s=slo, **kw)


def make(policy: str = "flowprefill", memory=None, **cfg) -> Scheduler:
    return Scheduler(MS_PER_TOKEN, SchedulerConfig(policy=policy, **cfg), memory=memory, perf_clock=StepClock())


def start(s: Scheduler, d: Decision, now: float) -> Decision:
    """Apply a decision like a synchronous engine: allocate KV for a new program, mark it started
    (which also closes the preempted program's running interval)."""
    if d.run is not None:
        if not d.run.resume and isinstance(s.memory, TokenPool):
            for rid, (b, e) in zip(d.run.request_ids, d.run.ranges):
                s.memory.allocate(rid, e - b)
        s.mark_started(d.run, now)
    return d


def queue_behind_blocker(s: Scheduler, reqs: list[Request], done_at: float) -> Decision:
    """Run a long low-urgency blocker, queue ``reqs`` behind it (needs ``max_suspended_batches=0``),
    complete the blocker at ``done_at`` and return that decision."""
    blocker = req("blocker", 100, 0.0, 1000.0)
    d = start(s, s.on_arrival(blocker, 0.0), 0.0)
    assert d.run is not None
    for r in reqs:
        assert s.on_arrival(r, r.arrival_s).run is None
    return start(s, s.on_prefill_complete(d.run.batch_id, done_at), done_at)


# ---------------------------------------------------------------------- flowprefill
def test_short_urgent_preempts_long_and_long_resumes():
    s = make()
    d0 = start(s, s.on_arrival(req("L", 5000, 0.0, 20.0), 0.0), 0.0)
    assert d0.run == BatchPlan(0, ("L",), ((0, 5000),), resume=False) and not d0.preempt_running
    d1 = s.on_arrival(req("S", 100, 1.0, 0.5), 1.0)
    assert d1.preempt_running and d1.run == BatchPlan(1, ("S",), ((0, 100),), resume=False)
    s.mark_suspended(0, 1.0)
    s.mark_started(d1.run, 1.0)
    long_req = s.get("L")
    assert long_req is not None and long_req.state is S.SUSPENDED and long_req.executed_s == pytest.approx(1.0)
    assert s.preemptions == 1 and s.suspended_batch_ids == (0,)
    d2 = start(s, s.on_prefill_complete(1, 1.1), 1.1)
    assert d2.prefilled == ("S",) and not d2.preempt_running
    assert d2.run == BatchPlan(0, ("L",), ((0, 5000),), resume=True)
    short = s.get("S")
    assert short is not None and short.state is S.DECODING and short.first_token_s == 1.1
    d3 = s.on_prefill_complete(0, 5.1)
    assert d3.prefilled == ("L",) and d3.run is None
    assert long_req.state is S.DECODING and long_req.executed_s == pytest.approx(5.0)


def test_infeasible_go_after_feasible_even_with_earlier_deadline():
    s = make(max_suspended_batches=0)
    x = req("X", 2000, 0.05, 2.55)  # deadline 2.6; at t=1 needs 2 s -> slack -0.4
    y = req("Y", 500, 0.1, 3.1)  # deadline 3.2; slack 1.7
    d = queue_behind_blocker(s, [x, y], 1.0)
    assert d.run is not None and d.run.request_ids == ("Y",)
    d = start(s, s.on_prefill_complete(d.run.batch_id, 1.5), 1.5)
    assert d.run is not None and d.run.request_ids == ("X",)


def test_infeasible_ones_are_edf_among_themselves():
    s = make(max_suspended_batches=0)
    late = req("late", 3000, 0.01, 2.0)  # deadline 2.01, infeasible at t=1
    early = req("early", 3000, 0.02, 1.5)  # deadline 1.52, infeasible
    d = queue_behind_blocker(s, [late, early], 1.0)
    assert d.run is not None and d.run.request_ids == ("early",)


def test_batching_stops_at_the_margin():
    s = make(max_suspended_batches=0)
    now = 1.0
    head = req("H", 100, now - 0.05, 1.0)  # limit = deadline - 0.1 = now + 0.85; 0.1 + 0.2k <= 0.85 -> k = 3
    # six 200-token companions, deadlines in an order different from arrival order
    others = [req(f"o{i}", 200, 0.01 * (i + 1), 10.0 + (5 - i)) for i in range(6)]
    d = queue_behind_blocker(s, [*others, head], now)
    assert d.run is not None
    assert d.run.request_ids == ("H", "o5", "o4", "o3")  # earliest deadlines first
    assert d.run.ranges == ((0, 100), (0, 200), (0, 200), (0, 200))


def test_batching_counts_the_decode_steps_the_engine_will_force_into_the_batch():
    """Same queue as above, but requests are decoding: a 0.2 s step is forced 0.4 s from now and
    every 0.5 s after one ends. The head and three companions (0.7 s) plus that step would end at
    now + 0.9, past the head's limit (now + 0.85), so only two fit (0.5 s + the step = 0.7 s)."""
    s = make(max_suspended_batches=0)
    now = 1.0
    s.decode_forecast = lambda: DecodeForecast(next_forced_s=now + 0.4, max_gap_s=0.5, step_s=0.2)
    head = req("H", 100, now - 0.05, 1.0)
    others = [req(f"o{i}", 200, 0.01 * (i + 1), 10.0 + (5 - i)) for i in range(6)]
    d = queue_behind_blocker(s, [*others, head], now)
    assert d.run is not None and d.run.request_ids == ("H", "o5", "o4")


def test_batching_stops_at_token_budget_and_long_head_alone():
    s = make(max_suspended_batches=0, batch_token_budget=500)
    head = req("H", 100, 0.5, 5.0)
    others = [req(f"o{i}", 200, 0.01 * (i + 1), 10.0 + i) for i in range(4)]
    d = queue_behind_blocker(s, [*others, head], 1.0)
    assert d.run is not None and d.run.request_ids == ("H", "o0", "o1")  # 100 + 200 + 200 = 500

    s = make(max_suspended_batches=0)
    long_head = req("LH", 3000, 0.5, 50.0)  # > short_threshold: never batched
    others = [req(f"o{i}", 200, 0.01 * (i + 1), 60.0 + i) for i in range(4)]
    d = queue_behind_blocker(s, [*others, long_head], 1.0)
    assert d.run is not None and d.run.request_ids == ("LH",)


def test_urgent_head_is_not_batched():
    s = make(max_suspended_batches=0)
    head = req("H", 100, 0.91, 0.2)  # slack at t=1: 0.11 - 0.1 = 0.01 < alpha * ttft_slo = 0.02
    others = [req(f"o{i}", 10, 0.01 * (i + 1), 10.0) for i in range(3)]
    d = queue_behind_blocker(s, [*others, head], 1.0)
    assert d.run is not None and d.run.request_ids == ("H",)


def test_suspended_batch_is_not_starved_but_earlier_deadlines_go_first():
    s = make()
    start(s, s.on_arrival(req("L", 1000, 0.0, 10.0), 0.0), 0.0)  # deadline 10
    d = start(s, s.on_arrival(req("S", 100, 0.1, 1.9), 0.1), 0.1)  # deadline 2: preempts L
    assert d.preempt_running and d.run is not None and d.run.request_ids == ("S",)
    assert s.on_arrival(req("W", 3000, 0.15, 19.85), 0.15).run is None  # deadline 20: waits
    assert s.on_arrival(req("E", 2500, 0.2, 4.8), 0.2).run is None  # deadline 5: waits (S runs)
    d = start(s, s.on_prefill_complete(1, 0.2), 0.2)
    assert d.run is not None and d.run.request_ids == ("E",) and not d.run.resume  # earlier than L
    d = start(s, s.on_prefill_complete(d.run.batch_id, 2.7), 2.7)
    assert d.run == BatchPlan(0, ("L",), ((0, 1000),), resume=True)  # L (deadline 10) before W (20)
    d = start(s, s.on_prefill_complete(0, 3.6), 3.6)
    assert d.run is not None and d.run.request_ids == ("W",)


def test_memory_short_resumes_best_suspended_then_admits_after_finish():
    mem = TokenPool(capacity_tokens=1500, block_size=1)
    s = make(memory=mem)
    start(s, s.on_arrival(req("L", 1000, 0.0, 100.0), 0.0), 0.0)
    d = start(s, s.on_arrival(req("S", 100, 0.1, 0.9), 0.1), 0.1)  # preempts L
    assert d.preempt_running and mem.free_tokens == 400
    assert s.on_arrival(req("N", 500, 0.15, 1.85), 0.15).run is None  # deadline 2, waits behind S
    d = start(s, s.on_prefill_complete(1, 0.2), 0.2)  # N is the head but 500 > 400 free
    assert d.memory_blocked and d.run == BatchPlan(0, ("L",), ((0, 1000),), resume=True)
    d = start(s, s.on_finish("S", 0.3), 0.3)  # S's KV is released before the re-plan
    assert d.freed == ("S",) and d.preempt_running and d.run is not None and d.run.request_ids == ("N",)
    assert mem.tokens == {"L": 1000, "N": 500}


def test_memory_short_and_nothing_suspended_stays_idle():
    mem = TokenPool(capacity_tokens=120, block_size=16)  # 7 blocks = 112 tokens
    s = make(memory=mem)
    start(s, s.on_arrival(req("A", 10, 0.0, 1.0), 0.0), 0.0)
    assert s.on_prefill_complete(0, 0.01).prefilled == ("A",)  # A decodes, holding one block
    d = s.on_arrival(req("B", 100, 0.02, 1.0), 0.02)  # needs 7 blocks, 6 free
    assert d.run is None and d.memory_blocked and s.waiting_ids == ("B",)
    d = s.on_finish("A", 0.1)
    assert d.freed == ("A",) and d.run is not None and d.run.request_ids == ("B",)


def test_max_suspended_batches_respected():
    s = make(max_suspended_batches=1)
    start(s, s.on_arrival(req("L", 1000, 0.0, 100.0), 0.0), 0.0)
    d = start(s, s.on_arrival(req("S1", 100, 0.1, 2.0), 0.1), 0.1)
    assert d.preempt_running and s.suspended_batch_ids == (0,)
    d = s.on_arrival(req("S2", 100, 0.12, 1.0), 0.12)  # more urgent, but one batch is suspended already
    assert d == Decision() and s.waiting_ids == ("S2",)
    d = start(s, s.on_prefill_complete(1, 0.2), 0.2)
    assert d.run is not None and d.run.request_ids == ("S2",) and not d.preempt_running
    assert s.preemptions == 1


def test_unstarted_plan_is_superseded_and_requeued():
    s = make()
    start(s, s.on_arrival(req("L", 1000, 0.0, 100.0), 0.0), 0.0)
    d1 = s.on_arrival(req("S1", 100, 0.1, 2.0), 0.1)  # the engine has not started it yet
    assert d1.preempt_running and d1.run is not None
    d2 = s.on_arrival(req("S2", 100, 0.11, 0.5), 0.11)
    assert not d2.preempt_running and d2.run is not None and d2.run.request_ids == ("S2",)
    assert s.waiting_ids == ("S1",) and s.get("S1").state is S.WAITING  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="stale"):
        s.mark_started(d1.run, 0.11)
    s.mark_started(d2.run, 0.11)
    assert s.preemptions == 1


def test_prefill_completes_after_preemption_was_decided():
    s = make()
    start(s, s.on_arrival(req("L", 1000, 0.0, 100.0), 0.0), 0.0)
    d = start(s, s.on_arrival(req("S", 100, 0.9, 1.0), 0.9), 0.9)
    assert d.preempt_running
    d = s.on_prefill_complete(0, 1.0)  # L finished its last operator before the boundary
    assert d.prefilled == ("L",) and s.suspended_batch_ids == ()
    assert s.get("L").executed_s == pytest.approx(0.9)  # type: ignore[union-attr]


# ---------------------------------------------------------------------- chunked
def test_chunked_priority_order_chunk_size_and_no_preemption():
    s = make("chunked", chunk_tokens=512)
    d = start(s, s.on_arrival(req("A", 1000, 0.0, 10.0), 0.0), 0.0)
    assert d.run == BatchPlan(0, ("A",), ((0, 512),))
    d = s.on_arrival(req("B", 300, 0.01, 5.0), 0.01)
    assert d == Decision()
    d = s.on_arrival(req("U", 10, 0.02, 0.01), 0.02)  # hopelessly urgent: still no preemption
    assert d == Decision()
    d = start(s, s.on_prefill_complete(0, 0.5), 0.5)
    a = s.get("A")
    assert a is not None and a.prefilled == 512 and a.state is S.RUNNING  # straight into the next chunk
    # B (deadline 5.01) first, then A (10.0) fills the chunk; U (infeasible) would come last
    assert d.run == BatchPlan(1, ("B", "A"), ((0, 300), (512, 724)))
    d = start(s, s.on_prefill_complete(1, 1.0), 1.0)
    assert d.prefilled == ("B",) and a.prefilled == 724
    assert d.run == BatchPlan(2, ("A", "U"), ((724, 1000), (0, 10)))
    d = s.on_prefill_complete(2, 1.3)
    assert set(d.prefilled) == {"A", "U"} and d.run is None and a.state is S.DECODING
    assert a.executed_s == pytest.approx(0.5 + 0.5 + 0.3)


def test_chunked_partial_requests_wait_suspended_between_chunks():
    s = make("chunked", chunk_tokens=100)
    d = start(s, s.on_arrival(req("A", 150, 0.0, 1.0), 0.0), 0.0)
    s.on_arrival(req("B", 100, 0.01, 0.5), 0.01)  # earlier deadline: takes the whole next chunk
    d = start(s, s.on_prefill_complete(0, 0.1), 0.1)
    a = s.get("A")
    assert d.run == BatchPlan(1, ("B",), ((0, 100),))
    assert a is not None and a.state is S.SUSPENDED and a.prefilled == 100 and s.partial_ids == ("A",)


# ---------------------------------------------------------------------- fcfs
def test_fcfs_arrival_order_batching_and_no_preemption():
    s = make("fcfs", batch_token_budget=700)
    d = start(s, s.on_arrival(req("A", 900, 0.0, 10.0), 0.0), 0.0)
    assert d.run == BatchPlan(0, ("A",), ((0, 900),))  # over the budget alone: still runs
    for i, (rid, n) in enumerate([("B", 300), ("C", 300), ("D", 200)]):
        d = s.on_arrival(req(rid, n, 0.1 + i * 0.01, 0.05), 0.1 + i * 0.01)  # urgent, still no preemption
        assert d == Decision()
    d = start(s, s.on_prefill_complete(0, 0.9), 0.9)
    assert d.run is not None and d.run.request_ids == ("B", "C")  # D would exceed 700
    d = start(s, s.on_prefill_complete(1, 1.5), 1.5)
    assert d.run is not None and d.run.request_ids == ("D",)
    assert s.preemptions == 0


# ---------------------------------------------------------------------- abort
def test_abort_waiting_running_suspended_decoding():
    s = make(max_suspended_batches=1)
    start(s, s.on_arrival(req("L", 1000, 0.0, 100.0), 0.0), 0.0)
    start(s, s.on_arrival(req("S", 100, 0.1, 1.0), 0.1), 0.1)  # L suspended, S running
    s.on_arrival(req("W", 100, 0.12, 0.5), 0.12)  # cap reached: W waits
    assert s.waiting_ids == ("W",)

    d = s.on_abort("W", 0.13)  # waiting
    assert d.freed == ("W",) and d.dropped == () and s.waiting_ids == ()
    d = start(s, s.on_abort("L", 0.14), 0.14)  # suspended, only member
    assert d.dropped == (0,) and d.freed == ("L",) and s.suspended_batch_ids == ()
    d = start(s, s.on_prefill_complete(1, 0.2), 0.2)
    assert d.prefilled == ("S",)
    d = s.on_abort("S", 0.3)  # decoding
    assert d.freed == ("S",) and s.get("S") is None

    start(s, s.on_arrival(req("R", 100, 0.4, 1.0), 0.4), 0.4)
    start(s, s.on_arrival(req("Q", 100, 0.41, 10.0), 0.41), 0.41)  # queued behind R
    d = start(s, s.on_abort("R", 0.45), 0.45)  # running, only member: dropped, Q starts
    assert d.dropped == (2,) and d.freed == ("R",) and not d.preempt_running
    assert d.run is not None and d.run.request_ids == ("Q",)
    assert s.terminal_counts[S.ABORTED] == 4 and s.on_abort("R", 0.5) == Decision()


def test_abort_member_of_live_batch_frees_kv_when_program_ends():
    s = make(max_suspended_batches=0)
    d = queue_behind_blocker(s, [req("A", 100, 0.1, 5.0), req("B", 100, 0.2, 6.0)], 1.0)
    assert d.run is not None and d.run.request_ids == ("A", "B")
    d = s.on_abort("B", 1.05)
    assert d.freed == () and d.dropped == ()
    assert s.running == BatchPlan(1, ("A",), ((0, 100),), resume=True)
    d = s.on_prefill_complete(1, 1.2)
    assert d.prefilled == ("A",) and d.freed == ("B",)


# ---------------------------------------------------------------------- admission control
@pytest.mark.parametrize("enabled", [True, False])
def test_admission_control(enabled):
    s = make(admission_control=enabled)
    start(s, s.on_arrival(req("L", 5000, 0.0, 100.0), 0.0), 0.0)
    start(s, s.on_arrival(req("E", 3000, 0.0, 4.0), 0.0), 0.0)  # 3 s of work due at 4
    x = req("X", 2000, 0.0, 4.5, sheddable=True)  # 3 + 2 = 5 > 4.5
    d = s.on_arrival(x, 0.0)
    if enabled:
        assert d.rejected == ("X",) and x.state is S.REJECTED and s.get("X") is None
        assert x.reject_reason is not None and "TTFT SLO" in x.reject_reason
    else:
        assert d.rejected == () and x.state is S.WAITING
    keep = req("K", 2000, 0.0, 4.5)  # same, not sheddable: kept
    assert s.on_arrival(keep, 0.0).rejected == () and keep.state is S.WAITING
    ok = req("OK", 100, 0.0, 50.0, sheddable=True)  # L's later deadline does not count ahead
    assert s.on_arrival(ok, 0.0).rejected == ()


def test_overload_admission_refuses_any_class_predicted_far_past_its_slo():
    """late_reject_factor applies to every class; the refusal carries the excess as a retry hint."""
    s = make(late_reject_factor=1.5)
    start(s, s.on_arrival(req("E", 3000, 0.0, 4.0), 0.0), 0.0)  # 3 s of work due at 4
    within = req("W", 2000, 0.0, 4.0)  # E ahead (equal deadlines count): 3 + 2 = 5 <= 1.5 x 4
    assert s.on_arrival(within, 0.0).rejected == () and within.state is S.WAITING
    late = req("LATE", 2000, 0.0, 4.5)  # E 3 + W 2 + 2 = 7 > 1.5 x 4.5 = 6.75; not sheddable
    d = s.on_arrival(late, 0.0)
    assert d.rejected == ("LATE",) and late.state is S.REJECTED and s.get("LATE") is None
    assert late.reject_reason is not None and "1.5 x the 4.500s TTFT SLO" in late.reject_reason
    assert late.retry_after_s == pytest.approx(0.25)
    urgent = req("U", 500, 0.0, 1.0)  # earliest deadline: nothing ahead of it
    assert s.on_arrival(urgent, 0.0).rejected == ()
    assert s.terminal_counts[S.REJECTED] == 1


def test_admission_does_not_count_work_already_past_hope_as_ahead():
    """The scheduler runs late work after feasible work, so admission must not count it ahead: after
    an overload a backlog of late requests must not turn every new feasible request away."""
    s = make(late_reject_factor=1.0, max_suspended_batches=8)
    start(s, s.on_arrival(req("old", 5000, 0.0, 1.0), 0.0), 0.0)  # 5 s of work due at 1 s: late at once
    fresh = req("F", 500, 2.0, 1.0)  # due at 3 s; old's deadline (1 s) is earlier but old is late
    d = s.on_arrival(fresh, 2.0)
    assert d.rejected == () and fresh.state is not S.REJECTED
    assert d.run is not None and d.run.request_ids == ("F",)  # and the scheduler runs it first


def test_waiting_requests_older_than_the_late_factor_expire_at_the_next_event():
    """A waiting request (no prefill started) that is already older than late_reject_factor x its
    SLO is refused at the next scheduling event, so a backlog left by a burst clears itself."""
    s = make(late_reject_factor=1.5, max_suspended_batches=0)
    start(s, s.on_arrival(req("long", 4000, 0.0, 100.0), 0.0), 0.0)  # runs 4 s; no preemption allowed
    stuck = req("stuck", 100, 0.1, 1.0)  # waits behind it: hopeless once older than 1.5 s
    assert s.on_arrival(stuck, 0.1).rejected == ()
    d = s.on_arrival(req("other", 100, 1.0, 10.0), 1.0)  # age 0.9 s: still waiting
    assert d.rejected == () and stuck.state is S.WAITING
    d = s.on_arrival(req("later", 100, 1.7, 10.0), 1.7)  # age 1.6 s > 1.5 s
    assert d.rejected == ("stuck",) and stuck.state is S.REJECTED and s.get("stuck") is None
    assert stuck.reject_reason is not None and stuck.reject_reason.startswith("expired")
    assert stuck.retry_after_s == pytest.approx(1.5)
    assert s.stats(1.7).counts["waiting"] == 2  # other, later


def test_hopeless_suspended_batches_expire_so_urgent_work_can_preempt_again():
    """After a burst, late programs stay suspended (slack-gated EDF runs feasible work first); at
    ``max_suspended_batches`` of them no urgent arrival could preempt. Once every member is older
    than late_reject_factor x its SLO the batch is dropped, its KV freed and its members refused."""
    mem = TokenPool(capacity_tokens=10_000, block_size=1)
    s = make(late_reject_factor=1.5, max_suspended_batches=1, memory=mem)
    late = req("late", 1400, 0.0, 1.0)
    d = start(s, s.on_arrival(late, 0.0), 0.0)  # 1.4 s of work, 1 s SLO: late at once
    assert d.run is not None and mem.tokens == {"late": 1400}
    d = start(s, s.on_arrival(req("u1", 100, 0.1, 5.0), 0.1), 0.1)  # preempts it: the one suspended slot
    assert d.preempt_running and s.suspended_batch_ids == (0,)
    d = start(s, s.on_arrival(req("u2", 100, 0.15, 0.5), 0.15), 0.15)  # at the cap: waits for u1
    assert d.run is None and s.running is not None and s.running.request_ids == ("u1",)
    d = start(s, s.on_prefill_complete(1, 0.2), 0.2)  # u1 done: u2 runs, not the late one
    assert d.run is not None and d.run.request_ids == ("u2",)
    d = start(s, s.on_prefill_complete(2, 0.3), 0.3)  # only late work left: it resumes
    assert d.run is not None and d.run.resume and d.run.request_ids == ("late",)
    d = start(s, s.on_arrival(req("u3", 100, 0.4, 5.0), 0.4), 0.4)  # and is preempted again
    assert d.preempt_running and s.suspended_batch_ids == (0,)
    # 1.6 s after its arrival (> 1.5 x 1 s) the next event expires the suspended program
    d = start(s, s.on_arrival(req("u4", 100, 1.6, 0.5), 1.6), 1.6)
    assert d.rejected == ("late",) and d.dropped == (0,)
    assert "late" not in mem.tokens and s.get("late") is None and late.state is S.REJECTED
    assert late.reject_reason is not None and late.reject_reason.startswith(
        "expired: prefill not finished within 1.5 x the 1.000s TTFT SLO (waited 1.600s)")
    assert d.run is not None and d.run.request_ids == ("u4",) and d.preempt_running  # preemption works again
    assert s.suspended_batch_ids == (3,)  # u3, preempted by u4


def test_queue_bound_in_predicted_seconds_refuses_arrivals_until_work_drains():
    s = make(max_queued_work_s=5.0)
    start(s, s.on_arrival(req("A", 3000, 0.0, 100.0), 0.0), 0.0)
    assert s.on_arrival(req("B", 1500, 0.0, 100.0), 0.0).rejected == ()  # 4.5 s queued
    c = req("C", 1000, 0.0, 100.0)
    assert s.on_arrival(c, 0.0).rejected == ("C",)  # 4.5 + 1 > 5
    assert c.reject_reason is not None and "max_queued_work_s 5" in c.reject_reason
    assert c.retry_after_s == pytest.approx(0.5)
    # two seconds later A has run for 2 s: 2.5 s queued, so the same prompt fits
    assert s.on_arrival(req("C2", 1000, 2.0, 100.0), 2.0).rejected == ()


def test_calibration_scales_predictions_by_the_measured_slowdown():
    """Programs that run 2x slower than profiled teach the scheduler to predict 2x: admission then
    refuses what the idle profile would have accepted, and queued predictions are rescaled."""
    s = make(calibrate_cost=True, late_reject_factor=1.0)
    now = 0.0
    for i in range(20):  # 1000-token programs predicted at 1 s that take 2 s
        d = start(s, s.on_arrival(req(f"r{i}", 1000, now, 100.0), now), now)
        assert d.run is not None
        now += 2.0
        s.on_prefill_complete(d.run.batch_id, now)
        s.on_finish(f"r{i}", now)
    assert s.calibration.samples == 20
    assert s.cost_model.predict(1000) == pytest.approx(2.0, rel=0.05)
    assert s.base_cost_model.predict(1000) == pytest.approx(1.0)
    assert s.stats(now, per_request=False).cost_scale == pytest.approx(2.0, rel=0.05)
    # 1.5 s by the profile, 3 s as measured: refused against a 2 s SLO
    late = req("late", 1500, now, 2.0)
    assert s.on_arrival(late, now).rejected == ("late",)
    assert late.reject_reason is not None and late.reject_reason.endswith(
        f"(prefill runs at {s.calibration.factor:.2f}x its profiled time now)")
    queued = req("q", 500, now, 100.0)
    start(s, s.on_arrival(queued, now), now)
    assert s.stats(now).running[0].predicted_remaining_s == pytest.approx(1.0, rel=0.05)


def test_calibration_learns_from_compute_time_when_the_engine_reports_it():
    """Programs that stay running 3 s (decode steps interleaved) but compute for 1 s, as predicted:
    no slowdown is learned, because an urgent prefill would not wait for those decode steps."""
    s = make(calibrate_cost=True)
    for i in range(10):
        now = 3.0 * i
        d = start(s, s.on_arrival(req(f"r{i}", 1000, now, 100.0), now), now)
        s.on_prefill_complete(d.run.batch_id, now + 3.0, compute_s=1.0)  # type: ignore[union-attr]
        s.on_finish(f"r{i}", now + 3.0)
    assert s.calibration.samples == 10 and s.calibration.factor == 1.0 and s.cost_model is s.base_cost_model


def test_calibration_costs_a_later_chunk_with_its_attention_over_earlier_chunks():
    """The chunked policy runs a 2000-token prompt as two 1000-token programs. With attention in the
    profile (predict(1000) = 2 s, predict(2000) = 6 s) the second chunk takes 4 s; that is the
    profile's own increment, not a slowdown, so nothing is learned."""
    cost = CostModel.from_coefficients(0.0, 1e-3, 1e-6)
    s = Scheduler(cost, SchedulerConfig(policy="chunked", chunk_tokens=1000, calibrate_cost=True),
                  perf_clock=StepClock())
    d = start(s, s.on_arrival(req("long", 2000, 0.0, 100.0), 0.0), 0.0)
    assert d.run is not None and d.run.ranges == ((0, 1000),)
    d = start(s, s.on_prefill_complete(d.run.batch_id, 2.0, compute_s=2.0), 2.0)
    assert d.run is not None and d.run.ranges == ((1000, 2000),)
    s.on_prefill_complete(d.run.batch_id, 6.0, compute_s=4.0)
    assert s.calibration.samples == 2 and s.calibration.estimate == pytest.approx(1.0)


def test_calibration_is_off_by_default_and_ignores_bad_samples():
    s = make()
    d = start(s, s.on_arrival(req("a", 1000, 0.0, 100.0), 0.0), 0.0)
    s.on_prefill_complete(d.run.batch_id, 5.0)  # type: ignore[union-attr]
    assert s.cost_model is s.base_cost_model and s.calibration.samples == 0
    from replicas.scheduler.calibration import CostCalibration

    c = CostCalibration()
    assert c.observe(0.001, 1.0) is None and c.samples == 0  # too short to measure
    assert c.observe(1.0, 0.0) is None and c.observe(1.0, float("inf")) is None
    for _ in range(50):
        c.observe(1.0, 1000.0)  # a stalled clock: clamped
    assert c.estimate == pytest.approx(c.high, rel=1e-3) and c.factor == pytest.approx(c.high, rel=c.hysteresis)
    c2 = CostCalibration()
    assert c2.observe(1.0, 1.01) is None and c2.factor == 1.0  # inside the hysteresis: no rescale
    with pytest.raises(ValueError, match="CostCalibration.weight"):
        CostCalibration(weight=0.0)


@pytest.mark.parametrize(("field", "value"), [("late_reject_factor", 0.5), ("late_reject_factor", True),
                                               ("max_queued_work_s", 0), ("max_queued_work_s", float("inf"))])
def test_overload_admission_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=f"SchedulerConfig.{field}"):
        SchedulerConfig(**{field: value})


# ---------------------------------------------------------------------- stats and bookkeeping
def test_stats_for_constructed_state():
    s = make()
    start(s, s.on_arrival(req("L", 1000, 0.0, 10.0), 0.0), 0.0)
    d = s.on_arrival(req("S", 100, 0.5, 1.0), 0.5)
    s.mark_suspended(0, 0.5)
    s.mark_started(d.run, 0.5)  # type: ignore[arg-type]
    assert s.on_arrival(req("W", 200, 0.52, 10.0), 0.52).run is None
    st = s.stats(0.55)
    json.dumps(st.to_dict())
    assert st.counts == {"waiting": 1, "running": 1, "suspended": 1, "decoding": 0}
    assert st.running_batch_id == 1 and [e.request_id for e in st.running] == ["S"]
    assert st.running_remaining_s == pytest.approx(0.05)
    assert st.pending_work_s == pytest.approx(0.05 + 0.5 + 0.2)
    (w,) = st.waiting
    assert w.request_id == "W" and w.deadline == pytest.approx(10.52) and w.remaining_tokens == 200
    assert w.predicted_remaining_s == pytest.approx(0.2) and w.slack_s == pytest.approx(10.52 - 0.55 - 0.2)
    (sus,) = st.suspended
    assert sus.request_id == "L" and sus.predicted_remaining_s == pytest.approx(0.5)
    assert st.scheduling_passes == 3 and st.preemptions == 1 and st.policy == "flowprefill"
    brief = s.stats(0.55, per_request=False)
    assert brief.waiting == () and brief.pending_work_s == st.pending_work_s
    ps = s.pass_stats()
    assert ps["passes"] == 3 and ps["median_s"] == pytest.approx(1e-3)


def test_handle_dispatches_events_and_errors():
    s = make()
    d = s.handle(Arrival(req("A", 10, 0.0, 1.0), 0.0))
    assert d.run is not None
    s.mark_started(d.run, 0.0)
    assert s.handle(PrefillComplete(0, 0.01)).prefilled == ("A",)
    assert s.handle(Finish("A", 0.02)).freed == ("A",)
    assert s.handle(Abort("A", 0.03)) == Decision()
    with pytest.raises(KeyError, match="batch_id"):
        s.on_prefill_complete(99, 0.04)
    s.on_arrival(req("B", 10, 0.05, 1.0), 0.05)
    with pytest.raises(ValueError, match="request_id"):
        s.on_arrival(req("B", 10, 0.05, 1.0), 0.05)
    with pytest.raises(ValueError, match="not decoding"):
        s.on_finish("B", 0.06)


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="ttft_slo_s"):
        req("A", 10, 0.0, 0.0)
    with pytest.raises(ValueError, match="prompt_ids"):
        Request("A", [], 0.0, 1.0)
    for kw, name in [
        ({"alpha": 1.5}, "alpha"),
        ({"policy": "sjf"}, "policy"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"max_suspended_batches": -1}, "max_suspended_batches"),
        ({"granularity": "thread"}, "granularity"),
    ]:
        with pytest.raises(ValueError, match=name):
            SchedulerConfig(**kw)
    with pytest.raises(ValueError, match="policy"):
        make_policy("sjf", SchedulerConfig())
    assert make_policy("chunked", SchedulerConfig()).name == "chunked"


# ---------------------------------------------------------------------- randomized runs
def _simulate(policy: str, seed: int) -> None:
    """Drive the scheduler like an engine that applies decisions at once; check invariants.

    KV is modelled too: a new program allocates its ranges' tokens, ``freed`` returns a request's
    KV; admission must never overcommit and every request's KV must be freed exactly once.
    """
    rng = random.Random(seed)
    capacity = rng.choice([10**9, 6000, 3000])
    mem = TokenPool(capacity_tokens=capacity, block_size=rng.choice([1, 16]))
    s = make(policy, mem, max_suspended_batches=rng.choice([0, 1, 8]), chunk_tokens=rng.choice([64, 512]))
    now, arrivals = 0.0, []
    for i in range(40):
        now += rng.expovariate(20.0)
        arrivals.append(req(f"r{i}", rng.choice([5, 50, 400, 2500]), now, rng.choice([0.05, 0.5, 3.0])))
    all_ids = [r.request_id for r in arrivals]
    freed_once: set[str] = set()
    left: dict[int, float] = {}  # predicted work left per program
    running: BatchPlan | None = None
    since = now = 0.0

    def apply(d: Decision) -> None:
        nonlocal running, since
        for bid in d.dropped:
            left.pop(bid, None)
            running = None if running is not None and running.batch_id == bid else running
        batches = [*s._q.suspended.values(), *([s._q.running] if s._q.running else [])]
        live_members = {r.request_id for b in batches if b.started for r in b.requests}
        for rid in d.freed:  # released exactly once, never while a live program writes it
            assert rid not in freed_once and rid not in live_members and rid not in mem.tokens
            freed_once.add(rid)
        if d.preempt_running:
            assert running is not None
            left[running.batch_id] -= now - since
            s.mark_suspended(running.batch_id, now)
            running = None
        if d.run is not None:
            assert running is None
            if not d.run.resume:
                left[d.run.batch_id] = MS_PER_TOKEN.predict_batch([e - b for b, e in d.run.ranges])
            start(s, d, now)  # allocates: raises MemoryError on overcommit
            running, since = d.run, now
        for rid in d.prefilled:
            apply(s.on_finish(rid, now))

    while arrivals or running is not None:
        done_at = since + left[running.batch_id] if running is not None else float("inf")
        if arrivals and arrivals[0].arrival_s < done_at:
            r = arrivals.pop(0)
            now = r.arrival_s
            apply(s.on_arrival(r, now))
            if rng.random() < 0.15:
                apply(s.on_abort(rng.choice(all_ids), now))
        else:
            assert running is not None
            now, bid = done_at, running.batch_id
            running = None
            left.pop(bid)
            apply(s.on_prefill_complete(bid, now))
        live = [s.get(i) for i in all_ids if s.get(i) is not None]
        places = s.waiting_ids + s.partial_ids + (s.running.request_ids if s.running else ())
        places += tuple(r.request_id for b in s._q.suspended.values() for r in b.requests)
        assert len(places) == len(set(places)) == sum(r.state is not S.DECODING for r in live)
        assert len(s.suspended_batch_ids) <= max(s.config.max_suspended_batches, 1)
    assert s.waiting_ids == s.partial_ids == s.suspended_batch_ids == () and s.running is None
    assert s.terminal_counts[S.FINISHED] + s.terminal_counts[S.ABORTED] == len(all_ids)
    assert mem.tokens == {} and mem.free_tokens == capacity // mem.block_size * mem.block_size
    assert freed_once == set(all_ids)


@pytest.mark.parametrize("policy", ["flowprefill", "chunked", "fcfs"])
@pytest.mark.parametrize("seed", range(8))
def test_randomized_runs_keep_invariants(policy, seed):
    _simulate(policy, seed)


def test_scheduler_and_placement_are_pure_logic():
    """The scheduler package (every module) and the router's placement load no tensors, no Ray, no
    Redis and no progress bars: they are pure logic the simulator drives too."""
    code = (
        "import sys, pkgutil, importlib, replicas.scheduler as p, router.placement; "
        "[importlib.import_module(m.name) for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]; "
        "bad = {'torch', 'ray', 'redis', 'tqdm'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_kv_tokens_round_per_request_blocks():
    pool = TokenPool(capacity_tokens=64, block_size=16)
    s = make(memory=pool)
    view = s._view(0.0)
    partial = req("P", 40, 0.0, 1.0, prefilled=10)
    assert view.kv_tokens(partial, 6) == 0 and view.kv_tokens(partial, 7) == 16 and view.kv_tokens(partial, 30) == 32
    pool.allocate("x", 17)  # two blocks
    assert pool.free_tokens == 32 and not pool.can_admit(33) and pool.can_admit(32)
    pool.release(["x", "unknown"])
    assert pool.free_tokens == 64 and pool.tokens == {}
    with pytest.raises(MemoryError):
        pool.allocate("y", 65)


def test_scheduling_pass_bench_reports_both_passes_of_every_round():
    out = bench_scheduling_pass(50, rounds=5)
    assert out["passes"] == 10 and 0.0 < out["median_s"] <= out["p99_s"] <= out["max_s"]
