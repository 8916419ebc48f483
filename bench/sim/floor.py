"""How fast the real scheduler alone can go: an upper bound on the simulator's speed.

The simulator drives the replica's own :class:`~replicas.scheduler.core.Scheduler`, so no
simulated request can cost less wall time than that scheduler spends on it. The cheapest path a
request can take is measured here: it arrives at an idle replica, its prefill is started, it
completes, it finishes (``on_arrival``, ``mark_started``, ``on_prefill_complete``, ``on_finish``:
three scheduling passes over a one-request queue), with nothing else in the system (no router,
no event heap, no decode). Real runs add queues, preemptions, routing and the event loop on top,
so ``bench sim`` cannot simulate more requests per second per process than this.
"""

from __future__ import annotations

import time
from typing import Any

from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.core import Scheduler
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request


def scheduler_floor(cost: CostModel, config: SchedulerConfig, *, requests: int = 5000, prompt_tokens: int = 64,
                    repeats: int = 3) -> dict[str, Any]:
    """Requests per second of wall time the real scheduler handles one at a time (see the module
    docstring): the best of ``repeats`` rounds of ``requests`` requests, each on a fresh scheduler
    (a bound, so the least disturbed round counts)."""
    if requests < 1 or prompt_tokens < 1 or repeats < 1:
        raise ValueError(f"need requests, prompt_tokens and repeats >= 1, got {requests}, {prompt_tokens}, {repeats}")
    rounds = [_one_round(cost, config, requests, prompt_tokens) for _ in range(repeats)]
    best = min(rounds, key=lambda r: r["wall_s"])
    return {**best, "requests_per_s_rounds": [r["requests_per_s"] for r in rounds]}


def _one_round(cost: CostModel, config: SchedulerConfig, requests: int, prompt_tokens: int) -> dict[str, Any]:
    sched = Scheduler(cost, config, perf_clock=float, max_pass_samples=1)  # as bench.sim.replica builds it
    prompt = [0] * prompt_tokens
    prefill_s = cost.predict(prompt_tokens)
    t = 0.0
    started = time.perf_counter()
    for i in range(requests):
        rid = str(i)
        d = sched.on_arrival(Request(rid, prompt, arrival_s=t, ttft_slo_s=1.0, max_tokens=2), t)
        if d.run is None:
            raise RuntimeError(f"the scheduler did not start request {rid} on an idle replica: {d}")
        sched.mark_started(d.run, t)
        t += prefill_s
        done = sched.on_prefill_complete(d.run.batch_id, t)
        if done.prefilled != (rid,):
            raise RuntimeError(f"request {rid}: expected its prefill to complete, got {done}")
        sched.on_finish(rid, t)
        t += 0.001
    wall = time.perf_counter() - started
    return {"requests": requests, "prompt_tokens": prompt_tokens, "wall_s": wall,
            "requests_per_s": requests / wall, "finished": sched.terminal_counts.get("finished", 0)}
