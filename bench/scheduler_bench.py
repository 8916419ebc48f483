"""Micro-benchmark of one scheduling pass (``flowprefill bench policies`` reports it)."""

from __future__ import annotations

import random

from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.core import Scheduler
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from replicas.scheduler.stats import pass_summary


def bench_scheduling_pass(
    n_waiting: int = 1000, *, policy: str = "flowprefill", rounds: int = 200, seed: int = 0
) -> dict[str, float | int | str]:
    """Median/p99 seconds of a scheduling pass with ``n_waiting`` queued requests.

    Setup: a long prefill runs, ``n_waiting`` requests of 16..4096 tokens with mixed SLOs wait.
    Each round delivers an arrival (one pass over ``n_waiting + 1`` requests, possibly preempting
    and batching) and then aborts that request (another pass); both passes are measured.
    For ``chunked`` and ``fcfs`` these passes are trivial (a running program is never preempted),
    so only ``flowprefill`` numbers are meaningful here.
    """
    rng = random.Random(seed)
    cost = CostModel.from_coefficients(2e-3, 5e-5, 1e-9)
    sched = Scheduler(cost, SchedulerConfig(policy=policy))
    now = 0.0
    long_req = Request("long", [0] * 16_000, arrival_s=now, ttft_slo_s=60.0)
    plan = sched.on_arrival(long_req, now).run
    assert plan is not None
    sched.mark_started(plan, now)
    for i in range(n_waiting):
        now += 1e-4
        n = rng.choice((16, 64, 256, 1024, 2048, 4096))
        req = Request(f"w{i}", [0] * n, arrival_s=now, ttft_slo_s=rng.choice((0.5, 2.0, 10.0, 30.0)))
        decision = sched.on_arrival(req, now)
        if decision.run is not None:
            sched.mark_started(decision.run, now)
    sched.pass_durations.clear()
    for i in range(rounds):
        now += 1e-4
        req = Request(f"probe{i}", [0] * rng.choice((32, 512)), arrival_s=now, ttft_slo_s=rng.choice((0.05, 5.0)))
        decision = sched.on_arrival(req, now)
        if decision.run is not None:
            sched.mark_started(decision.run, now)
        decision = sched.on_abort(req.request_id, now)
        if decision.run is not None:
            sched.mark_started(decision.run, now)
    summary = pass_summary(sched.pass_durations)
    return {"policy": policy, "n_waiting": n_waiting, **summary}
