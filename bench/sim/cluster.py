"""N simulated replicas behind a router, one heapq event loop in virtual time.

The router (:mod:`bench.sim.router`) uses the serving router's own placement logic; each replica
(:mod:`bench.sim.replica`) drives the real scheduler with the cost model as its executor. With
``SimSetup.pd`` the replicas form a prefill and a decode pool and finished prefills are handed over
(:mod:`bench.sim.pd`): the router places prompts on the prefill pool, the handover's KV transfer is a
third kind of event beside arrivals and replica wake-ups.

A request meets its SLOs when its TTFT is within its TTFT SLO and, when it has a TPOT SLO and more
than one output token, its TPOT (``(last token - first token) / (tokens - 1)``, as ``bench.loadgen``
measures it) is within that; attainment is the fraction that does. A run can stop as soon as more
than ``1 - goal`` of the requests are sure misses (the goodput search only needs to know that the
goal is missed).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from bench.sim.exec_model import ExecConfig
from bench.sim.pd import DecodeRouter, PDConfig, SimDecodeReplica, SimPrefillReplica
from bench.sim.replica import INF, SimReplica, SimRequest
from bench.sim.router import INDEX_TTL_S, ROUTER_POLICIES, Router, RouterConfig
from bench.sim.workload import SimWorkload
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request

__all__ = ["INDEX_TTL_S", "ROUTER_POLICIES", "ClusterSim", "PDConfig", "Router", "RouterConfig", "RunResult",
           "SimSetup", "meets_slos"]


@dataclass
class SimSetup:
    """Everything but the workload and the replica count: cost model and the three configs."""

    cost: CostModel
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    exec: ExecConfig = field(default_factory=ExecConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    pd: PDConfig | None = None  # None: colocated replicas


@dataclass
class RunResult:
    """Outcome of one simulated replay: per-request TTFTs (None: never, rejected or shed), TPOTs
    (None: one output token, or never finished) and how often each request ended (finished,
    refused or shed: exactly once in a run that was not stopped early)."""

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
    tpot_s: list[float | None] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    handovers: int = 0  # P/D: requests handed from a prefill to a decode replica


class ClusterSim:
    """Simulate ``workload`` (arrivals divided by ``scale``) on ``n_replicas`` replicas."""

    def __init__(self, setup: SimSetup, n_replicas: int) -> None:
        if n_replicas < 1:
            raise ValueError(f"replicas: need at least 1, got {n_replicas}")
        if setup.pd is not None and setup.pd.replicas != n_replicas:
            raise ValueError(f"replicas: {n_replicas} given, but the P/D split {setup.pd.label} has "
                             f"{setup.pd.replicas}")
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

    def _replicas(self, schedule: Callable[[SimReplica, float], None],
                  record: Callable[[int, float | None], None]) -> list[SimReplica]:
        """Colocated replicas ``r0..``, or the prefill pool ``r0..`` then the decode pool ``d0..``."""
        setup, pd = self.setup, self.setup.pd
        cfg = (setup.cost, setup.sched, setup.exec, schedule, record)
        if pd is None:
            width = len(str(self.n_replicas - 1))
            return [SimReplica(i, f"r{i:0{width}d}", *cfg) for i in range(self.n_replicas)]
        pw, dw = len(str(pd.prefill - 1)), len(str(pd.decode - 1))
        no_cache = replace(setup.exec, cache_blocks=0)  # decode replicas never look prompts up
        prefill: list[SimReplica] = [SimPrefillReplica(i, f"r{i:0{pw}d}", *cfg) for i in range(pd.prefill)]
        decode: list[SimReplica] = [SimDecodeReplica(pd.prefill + j, f"d{j:0{dw}d}", setup.cost, setup.sched,
                                                     no_cache, schedule, record) for j in range(pd.decode)]
        return prefill + decode

    def run(self, workload: SimWorkload, scale: float = 1.0, *, stop_below: float | None = None) -> RunResult:
        """One open-loop replay; ``stop_below``: stop once attainment is sure to end below it."""
        t_wall = time.perf_counter()
        setup, n, pd = self.setup, len(workload), self.setup.pd
        heap: list[tuple[float, int, int]] = []
        transfers: list[tuple[float, int, int, SimRequest]] = []  # (KV arrives, seq, decode replica, request)
        counter = itertools.count()
        ttft: list[float | None] = [None] * n
        tpot: list[float | None] = [None] * n
        ends = [0] * n
        arrivals, slos, tokens = workload.arrival_s, workload.ttft_slo_s, workload.tokens
        tpot_slos = workload.tpot_slo_s or (None,) * n
        inv = 1.0 / scale
        sure_misses = [0]  # TPOT misses of requests that met their TTFT (known at their last token)

        def schedule(rep: SimReplica, at: float) -> None:
            rep.ver = next(counter)
            if at < INF:
                heapq.heappush(heap, (at, rep.ver, rep.index))

        def record(idx: int, value: float | None) -> None:
            ttft[idx] = value
            if value is None:
                ends[idx] += 1  # refused at admission or expired

        def done(sr: SimRequest, t: float) -> None:
            idx, k = sr.idx, sr.request.max_tokens
            ends[idx] += 1
            first = ttft[idx]
            if k > 1 and first is not None:
                tpot[idx] = v = (t - sr.request.arrival_s - first) / (k - 1)
                limit = tpot_slos[idx]
                if limit is not None and v > limit and first <= slos[idx]:
                    sure_misses[0] += 1

        replicas = self._replicas(schedule, record)
        for rep in replicas:
            rep.done_hook = done
        pool = replicas if pd is None else replicas[:pd.prefill]
        router = self.last_router = Router(pool, setup.cost, setup.router)
        handovers = 0
        first_at_decode = False
        if pd is not None:
            decode_router = DecodeRouter(replicas[pd.prefill:])  # type: ignore[arg-type]
            transfer, first_at_decode = pd.transfer, pd.first_token == "decode"

            def handoff(_: SimPrefillReplica, sr: SimRequest, t: float) -> None:
                nonlocal handovers
                handovers += 1
                target = decode_router.choose()
                target.on_the_way += 1
                heapq.heappush(transfers, (t + transfer.seconds(sr.request.num_prompt_tokens), next(counter),
                                           target.index, sr))

            for rep in pool:
                assert isinstance(rep, SimPrefillReplica)
                rep.handoff = handoff
        max_tokens, prio, cls, shed_ok = workload.max_tokens, workload.priority, workload.slo_class, workload.sheddable
        costs = workload.cost_s
        names, routing = workload.block_names, workload.routing_names
        deadlines: list[tuple[float, int]] = []  # (deadline, idx) of requests not yet known met or missed
        misses = shed = events = 0
        stopped = False
        i = 0
        pop, push = heapq.heappop, heapq.heappush
        while True:
            t_next = arrivals[i] * inv if i < n else INF
            t_transfer = transfers[0][0] if transfers else INF
            if heap and heap[0][0] <= t_next and heap[0][0] <= t_transfer:
                at, ver, idx = pop(heap)
                rep = replicas[idx]
                if ver == rep.ver:
                    events += 1
                    rep.wake_at = INF
                    rep.wake(at)
                continue
            if t_transfer <= t_next and transfers:
                at, _, idx, sr = pop(transfers)
                target = replicas[idx]
                target.on_the_way -= 1  # type: ignore[attr-defined]
                if first_at_decode:
                    ttft[sr.idx] = at - sr.request.arrival_s
                target.accept(at, sr)  # type: ignore[attr-defined]
                continue
            if i >= n:
                break
            t = t_next
            req = Request(str(i), self._prompt(tokens[i]), arrival_s=t, ttft_slo_s=slos[i], priority=prio[i],
                          slo_class=cls[i], sheddable=shed_ok[i], max_tokens=max_tokens[i], tpot_slo_s=tpot_slos[i])
            sr = SimRequest(i, req, costs[i]) if names is None else SimRequest(i, req, costs[i], names[i], routing[i])
            rep = router.choose(sr, t)
            if rep is None:
                shed += 1
                ends[i] += 1
            else:
                rep.deliver(t, sr)
            i += 1
            if stop_below is not None:
                push(deadlines, (t + slos[i - 1], i - 1))
                while deadlines and deadlines[0][0] < t:
                    d_idx = pop(deadlines)[1]
                    if ttft[d_idx] is None:
                        misses += 1
                if (n - misses - sure_misses[0]) / n < stop_below:  # the best still possible misses the goal
                    stopped = True
                    break
        met = sum(1 for k in range(n) if meets_slos(ttft[k], slos[k], tpot[k], tpot_slos[k], max_tokens[k]))
        return RunResult(
            ttft_s=ttft, attainment=(n - misses - sure_misses[0]) / n if stopped else met / n, stopped_early=stopped,
            shed=shed, preemptions=sum(r.preemptions for r in replicas),
            prefill_batches=sum(r.prefill_batches for r in replicas),
            decode_steps=sum(r.decode_steps for r in replicas), events=events, simulated=i,
            wall_s=time.perf_counter() - t_wall,
            prefix_hit_tokens=sum(r.cache.hit_tokens for r in replicas if r.cache is not None),
            prefix_queried_tokens=sum(r.cache.queried_tokens for r in replicas if r.cache is not None),
            tpot_s=tpot, ends=ends, handovers=handovers,
        )


def meets_slos(ttft_s: float | None, ttft_slo_s: float, tpot_s: float | None, tpot_slo_s: float | None,
               max_tokens: int) -> bool:
    """Whether one request met its TTFT SLO and (with a TPOT SLO and more than one token) its TPOT SLO."""
    if ttft_s is None or ttft_s > ttft_slo_s:
        return False
    if tpot_slo_s is None or max_tokens <= 1:
        return True
    return tpot_s is not None and tpot_s <= tpot_slo_s
