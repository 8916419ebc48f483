"""N simulated replicas behind a router, one heapq event loop in virtual time.

Routing uses the serving router's own logic: ``slo_aware`` and ``least_loaded`` call
:func:`router.placement.rank_replicas` on :class:`~router.placement.ReplicaLoad` values built the
way :class:`~router.request_router.SLOAwareRequestRouter` builds them from the published queue
state (``(deadline, predicted remaining s)`` of waiting/suspended and running requests, the
running batch's remaining seconds, ``age = now - updated_at`` with the replica's heartbeat
re-publishing every ``heartbeat_s``, in-flight seconds of requests not yet in that state, the
queue index re-classified after 50 ms). ``staleness_s`` delays every published state.
``round_robin`` is ``rank_replicas``' rotation over the sorted ids (computed directly: ids are
zero-padded indices); ``pow2`` is Ray Serve's default router: two distinct replicas drawn at
random (seeded), the one with fewer ongoing requests (tie: the first drawn).

Speed: a replica's load is rebuilt only when it published a new state; replicas with an empty
queue and nothing in flight are identical to the router except for their id, so only the
lowest-id one is ranked (``rank_replicas`` breaks ties by id: the same choice). A run can stop
as soon as more than ``1 - goal`` of the requests have missed their deadline (the goodput search
only needs to know that the goal is missed).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench.sim.replica import INF, ExecConfig, SimReplica, SimRequest
from bench.sim.workload import SimWorkload
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from router.placement import PREEMPT_LATENCY_S, PlacementRequest, QueueIndex, ReplicaLoad, rank_replicas

ROUTER_POLICIES = ("slo_aware", "round_robin", "least_loaded", "pow2")
INDEX_TTL_S = 0.05  # router.request_router._INDEX_TTL_S (not imported: that module imports Ray)


@dataclass(frozen=True)
class RouterConfig:
    """The router's settings (``SLOAwareRequestRouter.initialize_state`` defaults) plus staleness."""

    policy: str = "slo_aware"
    staleness_s: float = 0.0  # a published state reaches the router this much later
    heartbeat_s: float = 5.0 / 3.0  # the replica republishes its last state this often (state_ttl_s / 3)
    max_state_age_s: float = 5.0
    slack_margin_frac: float = 1.0
    shed: bool = True
    preempt_latency_s: float = PREEMPT_LATENCY_S
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in ROUTER_POLICIES:
            raise ValueError(f"router policy: unknown {self.policy!r}; expected one of {ROUTER_POLICIES}")
        if not (self.staleness_s >= 0 and self.heartbeat_s > 0):
            raise ValueError("router: need staleness_s >= 0 and heartbeat_s > 0")


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


class _Published:
    """What the router holds about one replica: the state it last saw and the index built from it."""

    __slots__ = ("seq", "t_pub", "queued", "running", "running_s", "index", "built_at", "updated_at", "history")

    def __init__(self) -> None:
        self.seq = -1
        self.t_pub = 0.0  # replicas publish an empty state when they start
        self.queued: tuple[tuple[float, float], ...] = ()
        self.running: tuple[tuple[float, float], ...] = ()
        self.running_s = 0.0
        self.index: QueueIndex | None = None
        self.built_at = -INF
        self.updated_at = -INF
        self.history: deque[tuple[float, int, tuple]] = deque()  # staleness: (t_pub, seq, snapshot)


class Router:
    """Places each request on a replica (or sheds it) as the serving router would."""

    def __init__(self, replicas: Sequence[SimReplica], cost: CostModel, cfg: RouterConfig) -> None:
        self.replicas, self.cost, self.cfg = list(replicas), cost, cfg
        self.by_id = {r.replica_id: r for r in self.replicas}
        self.rng = random.Random(cfg.seed)
        self.rr = 0
        self.pub = [_Published() for _ in self.replicas]
        self.dispatched: list[deque[tuple[float, float]]] = [deque() for _ in self.replicas]  # (t, seconds)
        self.idle = [True] * len(self.replicas)  # nothing in the queue state and nothing in flight
        self.busy: set[int] = set()
        self.idle_heap = list(range(len(self.replicas)))  # lowest idle index on top (lazy deletion)
        for r in self.replicas:
            if cfg.staleness_s > 0:
                r.publish_hook = self._record_state
            elif cfg.policy in ("slo_aware", "least_loaded"):
                r.publish_hook = r.deliver_hook = self._watch
                self._watch(r, 0.0)

    def _record_state(self, rep: SimReplica, t: float) -> None:
        self.pub[rep.index].history.append((t, rep.seq, rep.queue_snapshot()))

    def _watch(self, rep: SimReplica, t: float) -> None:
        """Track which replicas the router sees as idle (zero staleness: the state it sees is current)."""
        idle = not rep.inbox and not rep.has_prefill_work
        i = rep.index
        if idle != self.idle[i]:
            self.idle[i] = idle
            if idle:
                self.busy.discard(i)
                heapq.heappush(self.idle_heap, i)
            else:
                self.busy.add(i)

    def choose(self, sr: SimRequest, now: float) -> SimReplica | None:
        """The replica for ``sr`` at ``now``; None when the router sheds it."""
        policy = self.cfg.policy
        n = len(self.replicas)
        if policy == "round_robin":
            rep = self.replicas[self.rr % n]
            self.rr += 1
            return rep
        if policy == "pow2":
            if n == 1:
                return self.replicas[0]
            a, b = self.rng.sample(self.replicas, 2)
            return b if len(b.live) < len(a.live) else a
        loads = self._loads(now)
        r = sr.request
        req = PlacementRequest(r.request_id, r.num_prompt_tokens, r.deadline, r.ttft_slo_s, r.sheddable, r.priority)
        cfg = self.cfg
        decision = rank_replicas(policy, req, loads, self.cost, now, self.rr,
                                 margin_s=cfg.slack_margin_frac * r.ttft_slo_s, allow_shed=cfg.shed,
                                 preempt_latency_s=cfg.preempt_latency_s)
        self.rr += 1
        if decision.shed:
            return None
        rep = self.by_id[decision.ranked[0]]
        if cfg.staleness_s > 0:
            self.dispatched[rep.index].append((now, sr.cost_s))
        return rep

    def _loads(self, now: float) -> list[ReplicaLoad]:
        cfg, stale_mode = self.cfg, self.cfg.staleness_s > 0
        hb, max_age, lag = cfg.heartbeat_s, cfg.max_state_age_s, cfg.staleness_s
        if stale_mode:
            candidates: Iterable[int] = range(len(self.replicas))
        else:  # busy replicas and the lowest-id idle one: the other idle ones rank exactly like it
            heap, idle = self.idle_heap, self.idle
            while heap and not idle[heap[0]]:
                heapq.heappop(heap)
            candidates = [*self.busy, heap[0]] if heap else self.busy
        loads: list[ReplicaLoad] = []
        idle_seen = False
        for i in candidates:
            rep, pub = self.replicas[i], self.pub[i]
            if stale_mode:
                inflight = self._visible_stale(rep, pub, now)
                if not pub.queued and not pub.running and inflight == 0.0:
                    if idle_seen:
                        continue  # the same load as the lower-id idle replica already listed
                    idle_seen = True
            else:
                inflight = rep.inbox_cost_s
                if rep.seq != pub.seq:
                    pub.seq, pub.t_pub = rep.seq, rep.event_at
                    if rep.has_prefill_work:
                        pub.queued, pub.running, pub.running_s = rep.queue_snapshot()
                    else:
                        pub.queued, pub.running, pub.running_s = (), (), 0.0
                    pub.index = None
            # updated_at: the last (re)publication of this state the router can see (heartbeats)
            since = now - lag - pub.t_pub
            updated = pub.t_pub if since < hb else pub.t_pub + math.floor(since / hb) * hb
            age = now - updated if now > updated else 0.0
            if pub.index is None or updated != pub.updated_at or now - pub.built_at > INDEX_TTL_S:
                pub.updated_at = updated
                pub.index = QueueIndex.build(pub.queued, pub.running, pub.running_s, now)
                pub.built_at = now
            loads.append(ReplicaLoad(rep.replica_id, pub.queued, pub.running, pub.running_s, inflight, age,
                                     age > max_age, True, pub.index))
        return loads

    def _visible_stale(self, rep: SimReplica, pub: _Published, now: float) -> float:
        """Advance to the newest state published at least ``staleness_s`` ago; in-flight seconds since."""
        horizon = now - self.cfg.staleness_s
        hist = pub.history
        while hist and hist[0][0] <= horizon:
            t_pub, seq, snap = hist.popleft()
            if seq != pub.seq:
                pub.seq, pub.t_pub = seq, t_pub
                pub.queued, pub.running, pub.running_s = snap
                pub.index = None
        sent = self.dispatched[rep.index]
        while sent and sent[0][0] <= pub.t_pub:
            sent.popleft()
        return sum(s for _, s in sent)


class ClusterSim:
    """Simulate ``workload`` (arrivals divided by ``scale``) on ``n_replicas`` replicas."""

    def __init__(self, setup: SimSetup, n_replicas: int) -> None:
        if n_replicas < 1:
            raise ValueError(f"replicas: need at least 1, got {n_replicas}")
        self.setup = setup
        self.n_replicas = n_replicas
        self._prompts: dict[int, list[int]] = {}

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
        router = Router(replicas, setup.cost, setup.router)
        arrivals, slos, tokens = workload.arrival_s, workload.ttft_slo_s, workload.tokens
        max_tokens, prio, cls, shed_ok = workload.max_tokens, workload.priority, workload.slo_class, workload.sheddable
        costs = workload.cost_s
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
            sr = SimRequest(i, req, costs[i])
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
        )
