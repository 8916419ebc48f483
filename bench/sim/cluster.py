"""N simulated replicas behind a router, one heapq event loop in virtual time.

The router (:mod:`bench.sim.router`) uses the serving router's own placement logic; each replica
(:mod:`bench.sim.replica`) drives the real scheduler with the cost model as its executor. A run
can stop as soon as more than ``1 - goal`` of the requests have missed their deadline (the
goodput search only needs to know that the goal is missed).
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from bench.sim.replica import INF, ExecConfig, SimReplica, SimRequest
from bench.sim.router import INDEX_TTL_S, ROUTER_POLICIES, Router, RouterConfig
from bench.sim.workload import SimWorkload
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request

__all__ = ["INDEX_TTL_S", "ROUTER_POLICIES", "ClusterSim", "Router", "RouterConfig", "RunResult", "SimSetup"]


@dataclass
class SimSetup:
    """Everything but the workload and the replica count: cost model and the three configs."""

    cost: CostModel
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    exec: ExecConfig = field(default_factory=ExecConfig)
    router: RouterConfig = field(default_factory=RouterConfig)


@dataclass
class RunResult:
    """Outcome of one simulated replay: per-request TTFTs (None: never, rejected or shed)."""

    ttft_s: list[float | None]
    attainment: float
    stopped_early: bool
    shed: int
    preemptions: int
    prefill_batches: int
    decode_steps: int
    events: int
    simulated: int  # arrivals processed (fewer than the workload when stopped early)
    wall_s: float
    prefix_hit_tokens: int = 0  # the replicas' prefix caches: prompt tokens found cached ...
    prefix_queried_tokens: int = 0  # ... of those looked up


class ClusterSim:
    """Simulate ``workload`` (arrivals divided by ``scale``) on ``n_replicas`` replicas."""

    def __init__(self, setup: SimSetup, n_replicas: int) -> None:
        if n_replicas < 1:
            raise ValueError(f"replicas: need at least 1, got {n_replicas}")
        self.setup = setup
        self.n_replicas = n_replicas
        self._prompts: dict[int, list[int]] = {}
        self.last_router: Router | None = None  # the router of the last run (diagnostics, tests)

    def _prompt(self, n: int) -> list[int]:
        """A token list of length ``n`` (shared: the scheduler only reads its length)."""
        p = self._prompts.get(n)
        if p is None:
            p = self._prompts[n] = [0] * n
        return p

    def run(self, workload: SimWorkload, scale: float = 1.0, *, stop_below: float | None = None) -> RunResult:
        """One open-loop replay; ``stop_below``: stop once attainment is sure to end below it."""
        t_wall = time.perf_counter()
        setup, n = self.setup, len(workload)
        heap: list[tuple[float, int, int]] = []
        counter = itertools.count()
        ttft: list[float | None] = [None] * n

        def schedule(rep: SimReplica, at: float) -> None:
            rep.ver = next(counter)
            if at < INF:
                heapq.heappush(heap, (at, rep.ver, rep.index))

        def record(idx: int, value: float | None) -> None:
            ttft[idx] = value

        width = len(str(self.n_replicas - 1))
        replicas = [SimReplica(i, f"r{i:0{width}d}", setup.cost, setup.sched, setup.exec, schedule, record)
                    for i in range(self.n_replicas)]
        router = self.last_router = Router(replicas, setup.cost, setup.router)
        arrivals, slos, tokens = workload.arrival_s, workload.ttft_slo_s, workload.tokens
        max_tokens, prio, cls, shed_ok = workload.max_tokens, workload.priority, workload.slo_class, workload.sheddable
        costs = workload.cost_s
        names, routing = workload.block_names, workload.routing_names
        deadlines: list[tuple[float, int]] = []  # (deadline, idx) of requests not yet known met or missed
        misses = shed = events = 0
        stopped = False
        inv = 1.0 / scale
        i = 0
        pop, push = heapq.heappop, heapq.heappush
        while True:
            t_next = arrivals[i] * inv if i < n else INF
            if heap and heap[0][0] <= t_next:
                at, ver, idx = pop(heap)
                rep = replicas[idx]
                if ver == rep.ver:
                    events += 1
                    rep.wake_at = INF
                    rep.wake(at)
                continue
            if i >= n:
                break
            t = t_next
            req = Request(str(i), self._prompt(tokens[i]), arrival_s=t, ttft_slo_s=slos[i], priority=prio[i],
                          slo_class=cls[i], sheddable=shed_ok[i], max_tokens=max_tokens[i])
            sr = SimRequest(i, req, costs[i]) if names is None else SimRequest(i, req, costs[i], names[i], routing[i])
            rep = router.choose(sr, t)
            if rep is None:
                shed += 1
            else:
                rep.deliver(t, sr)
            i += 1
            if stop_below is not None:
                push(deadlines, (t + slos[i - 1], i - 1))
                while deadlines and deadlines[0][0] < t:
                    d_idx = pop(deadlines)[1]
                    if ttft[d_idx] is None:
                        misses += 1
                if (n - misses) / n < stop_below:  # the best attainment still possible misses the goal
                    stopped = True
                    break
        met = sum(1 for v, s in zip(ttft, slos) if v is not None and v <= s)
        return RunResult(
            ttft_s=ttft, attainment=(n - misses) / n if stopped else met / n, stopped_early=stopped, shed=shed,
            preemptions=sum(r.preemptions for r in replicas), prefill_batches=sum(r.prefill_batches for r in replicas),
            decode_steps=sum(r.decode_steps for r in replicas), events=events, simulated=i,
            wall_s=time.perf_counter() - t_wall,
            prefix_hit_tokens=sum(r.cache.hit_tokens for r in replicas if r.cache is not None),
            prefix_queried_tokens=sum(r.cache.queried_tokens for r in replicas if r.cache is not None),
        )
