"""The scheduler with a prefix cache: cached tokens change predictions, plans and admission, and a
request whose next blocks another one is computing waits for it only while its SLO allows."""

from __future__ import annotations

import pytest

from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.core import Scheduler
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request, RequestState
from tests.test_scheduler import req, start

S = RequestState
# 1 ms per new token, plus 1 us per (new token x cached token): attention over cached KV is not free
COST = CostModel.from_coefficients(0.0, 1e-3, cached_kappa=1e-6)


def make(**cfg: object) -> Scheduler:
    return Scheduler(COST, SchedulerConfig(**cfg), perf_clock=lambda: 0.0)


def test_a_cached_prefix_is_not_planned_and_is_priced_as_context():
    s = make()
    r = req("hit", 1000, 0.0, 5.0, cached_tokens=800)
    assert r.prefilled == 800 and r.remaining_tokens == 200
    d = s.on_arrival(r, 0.0)
    assert d.run is not None and d.run.ranges == ((800, 1000),)  # only the uncached tail runs
    (entry,) = s.stats(0.0).running
    assert entry.predicted_remaining_s == pytest.approx(0.2 + 1e-6 * 200 * 800)
    assert COST.predict_ranges([(800, 1000)]) == pytest.approx(entry.predicted_remaining_s)


def test_a_hit_turns_an_infeasible_request_feasible_and_it_is_admitted():
    cold, warm = make(late_reject_factor=1.0), make(late_reject_factor=1.0)
    assert cold.on_arrival(req("r", 2000, 0.0, 1.0), 0.0).rejected == ("r",)  # 2 s of prefill for a 1 s SLO
    d = warm.on_arrival(req("r", 2000, 0.0, 1.0, cached_tokens=1600), 0.0)  # 0.4 s + 0.64 s context: still late
    assert d.rejected == ("r",)
    d = warm.on_arrival(req("r2", 2000, 0.0, 1.0, cached_tokens=1900), 0.0)  # 0.1 s + 0.19 s: admitted
    assert d.rejected == () and d.run is not None and d.run.ranges == ((1900, 2000),)


def test_a_request_waits_for_the_one_computing_its_shared_prefix_then_starts_after_it():
    s = make()
    a = start(s, s.on_arrival(req("A", 600, 0.0, 10.0), 0.0), 0.0)  # computes blocks B needs
    b = req("B", 700, 0.01, 10.0, shares_with="A", shared_tokens=592)
    d = s.on_arrival(b, 0.01)
    assert s.is_deferred("B") and d.run is None and not d.preempt_running
    assert [e.request_id for e in s.stats(0.01).waiting] == ["B"]  # still reported to the router as queued
    s.set_cached("B", 592)  # A's prefill published them (the engine attached them to B)
    done = start(s, s.on_prefill_complete(a.run.batch_id, 0.6), 0.6)
    assert not s.is_deferred("B") and done.run is not None and done.run.ranges == ((592, 700),)
    assert b.cached_tokens == 592 and b.shares_with is None


def test_a_tight_deadline_does_not_wait_and_computes_the_shared_blocks_itself():
    s = make()
    start(s, s.on_arrival(req("A", 3000, 0.0, 60.0), 0.0), 0.0)  # 3 s of prefill ahead of the shared blocks
    d = s.on_arrival(req("B", 3100, 0.01, 3.2, shares_with="A", shared_tokens=2992), 0.01)
    assert not s.is_deferred("B")
    assert d.run is not None and d.run.request_ids == ("B",) and d.preempt_running  # EDF: B's deadline first


def test_a_waiter_is_released_when_the_request_it_waits_for_goes_away():
    s = make()
    start(s, s.on_arrival(req("A", 600, 0.0, 10.0), 0.0), 0.0)
    s.on_arrival(req("B", 700, 0.01, 10.0, shares_with="A", shared_tokens=592), 0.01)
    d = s.on_abort("A", 0.2)
    assert not s.is_deferred("B") and d.run is not None and d.run.ranges == ((0, 700),)
    with pytest.raises(ValueError, match="not waiting"):
        s.set_cached("B", 100)


def test_a_waiter_that_can_no_longer_wait_is_released_at_the_next_event():
    s = make(max_suspended_batches=0)
    start(s, s.on_arrival(req("A", 600, 0.0, 10.0), 0.0), 0.0)
    s.on_arrival(req("B", 700, 0.01, 1.0, shares_with="A", shared_tokens=592), 0.01)
    assert s.is_deferred("B")  # A done by 0.6 s, B's rest by 0.78 s: within 1 s minus the margin
    s.on_arrival(req("C", 300, 0.05, 0.4), 0.05)  # urgent work jumps ahead of A: waiting no longer fits
    assert not s.is_deferred("B")


def test_cached_and_shared_tokens_are_validated():
    with pytest.raises(ValueError, match="cached_tokens"):
        Request("x", [1, 2, 3], arrival_s=0.0, ttft_slo_s=1.0, cached_tokens=3)  # one token is always computed
    with pytest.raises(ValueError, match="shares_with"):
        Request("x", [1] * 10, arrival_s=0.0, ttft_slo_s=1.0, shares_with="y")
    with pytest.raises(ValueError, match="shares_with"):
        Request("x", [1] * 10, arrival_s=0.0, ttft_slo_s=1.0, cached_tokens=5, shares_with="y", shared_tokens=5)
    assert Request("x", [1] * 10, arrival_s=0.0, ttft_slo_s=1.0, cached_tokens=4).state is S.WAITING
