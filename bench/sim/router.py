"""The simulated router: the serving router's placement logic on the simulated replicas' published states.

``slo_aware`` and ``least_loaded`` rank :class:`~router.placement.ReplicaLoad` values built the way
:class:`~router.request_router.SLOAwareRequestRouter` builds them from the published queue state
(``(deadline, predicted remaining s)`` of waiting/suspended and running requests, the running
batch's remaining seconds, ``age = now - updated_at`` with the replica's heartbeat re-publishing
every ``heartbeat_s``, in-flight seconds of requests not yet in that state, the
:class:`~router.placement.QueueIndex` re-classified after 50 ms). ``staleness_s`` delays every
published state. ``round_robin`` is ``rank_replicas``' rotation over the sorted ids (computed
directly: ids are zero-padded indices); ``pow2`` is Ray Serve's default router: two distinct
replicas drawn at random (seeded), the one with fewer ongoing requests (tie: the first drawn).

Two equivalent ways to rank (``RouterConfig.vectorized``; ``tests/test_sim.py`` checks that whole
runs agree bit for bit):

* **vectorized** (fresh states, the default): every replica's index lives in a
  :class:`~bench.sim.placement_table.PlacementTable` row kept up to date by
  :class:`~bench.sim.router_table.FreshStates`; the table picks ``rank_replicas``' first choice
  (and shed verdict) in a fixed number of numpy operations.
* **per decision** (``staleness_s > 0``, or ``vectorized=False``): ``rank_replicas`` over
  ``ReplicaLoad`` values; a replica's load is rebuilt only when it published a new state, and
  of the replicas with an empty queue and nothing in flight (identical to the router except for
  their id) only the lowest-id one is ranked (``rank_replicas`` breaks ties by id: the same choice).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bench.sim.replica import INF, SimReplica, SimRequest
from bench.sim.router_table import FreshStates
from replicas.scheduler.cost_model import CostModel
from router.placement import (
    PREEMPT_LATENCY_S,
    PlacementRequest,
    QueueIndex,
    ReplicaLoad,
    affinity_order,
    rank_replicas,
)

ROUTER_POLICIES = ("slo_aware", "round_robin", "least_loaded", "pow2", "prefix_affinity")
INDEX_TTL_S = 0.05  # router.request_router._INDEX_TTL_S (not imported: that module imports Ray)
_EMPTY: frozenset[int] = frozenset()


@dataclass(frozen=True)
class RouterConfig:
    """The router's settings (``SLOAwareRequestRouter.initialize_state`` defaults) plus staleness.

    ``vectorized``: rank with a :class:`~bench.sim.placement_table.PlacementTable` when the states are
    fresh (the same choices as ``rank_replicas``, see the module docstring); False: always per decision.
    """

    policy: str = "slo_aware"
    staleness_s: float = 0.0  # a published state reaches the router this much later
    heartbeat_s: float = 5.0 / 3.0  # the replica republishes its last state this often (state_ttl_s / 3)
    max_state_age_s: float = 5.0
    slack_margin_frac: float = 1.0
    shed: bool = True
    preempt_latency_s: float = PREEMPT_LATENCY_S
    seed: int = 0
    vectorized: bool = True

    def __post_init__(self) -> None:
        if self.policy not in ROUTER_POLICIES:
            raise ValueError(f"router policy: unknown {self.policy!r}; expected one of {ROUTER_POLICIES}")
        if not (self.staleness_s >= 0 and self.heartbeat_s > 0):
            raise ValueError("router: need staleness_s >= 0 and heartbeat_s > 0")

    @property
    def uses_table(self) -> bool:
        """Whether :class:`Router` ranks with a table: a ranking policy, fresh states that are never
        too old to use (the heartbeat republishes them well within ``max_state_age_s``)."""
        return (self.vectorized and self.policy in ("slo_aware", "least_loaded") and self.staleness_s == 0
                and self.heartbeat_s * (1 + 1e-9) < self.max_state_age_s)


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
    """Places each request on a replica (or sheds it) as the serving router would.

    With prefix caching modelled, each replica's cache summary is exact and current (the router
    keeps, per routing name, the replicas holding it, updated as they publish and evict): a
    request's cost on a replica is priced with its expected hit, as ``rank_replicas`` does with the
    summaries replicas publish (bounded to 512 names, which a default-sized cache never exceeds).
    """

    def __init__(self, replicas: Sequence[SimReplica], cost: CostModel, cfg: RouterConfig) -> None:
        self.replicas, self.cost, self.cfg = list(replicas), cost, cfg
        self.by_id = {r.replica_id: r for r in self.replicas}
        self.rng = random.Random(cfg.seed)
        self.rr = 0
        n = len(self.replicas)
        self.holders: dict[str, set[int]] = {}  # routing name -> replicas whose cache holds it
        self.cached: list[set[str]] = [set() for _ in self.replicas]
        for rep in self.replicas:
            if rep.cache is not None and rep.prefix is not None:
                rep.cache.on_change = self._cache_hook(rep.index, rep.prefix.stride)
        self.block_tokens = self.replicas[0].prefix.routing_block_tokens if self.replicas[0].prefix else 0
        self.fresh: FreshStates | None = None
        if cfg.uses_table:
            self.fresh = FreshStates(self.replicas, cfg.heartbeat_s, INDEX_TTL_S)
            return
        self.pub = [_Published() for _ in self.replicas]
        self.dispatched: list[deque[tuple[float, float]]] = [deque() for _ in self.replicas]  # (t, seconds)
        self.idle = [True] * n  # nothing in the queue state and nothing in flight
        self.busy: set[int] = set()
        self.idle_heap = list(range(n))  # lowest idle index on top (lazy deletion)
        for r in self.replicas:
            if cfg.staleness_s > 0:
                r.publish_hook = self._record_state
            elif cfg.policy in ("slo_aware", "least_loaded"):
                r.publish_hook = r.deliver_hook = self._watch
                self._watch(r, 0.0)

    def _cache_hook(self, i: int, stride: int) -> Callable[[bytes, int, bool], None]:
        def changed(name: bytes, index: int, published: bool) -> None:
            if index % stride != stride - 1:
                return
            rname = name[:4].hex()
            if published:
                self.holders.setdefault(rname, set()).add(i)
                self.cached[i].add(rname)
            else:
                self.cached[i].discard(rname)
                rows = self.holders.get(rname)
                if rows is not None:
                    rows.discard(i)
                    if not rows:
                        del self.holders[rname]
        return changed

    def hits(self, sr: SimRequest) -> dict[int, int]:
        """Expected hit tokens per replica holding a prefix of ``sr``'s prompt (``expected_hit_tokens``)."""
        names = sr.routing
        rows = self.holders.get(names[0]) if names else None
        if not rows:
            return {}
        count = dict.fromkeys(rows, 1)
        for name in names[1:]:
            rows = rows & self.holders.get(name, _EMPTY)
            if not rows:
                break
            for i in rows:
                count[i] += 1
        bt = self.block_tokens
        cap = (sr.request.num_prompt_tokens - 1) // bt * bt
        return {i: min(c * bt, cap) for i, c in count.items()}

    def _costs(self, sr: SimRequest, hits: dict[int, int]) -> float | np.ndarray:
        """The request's prefill on every replica: one number without a hit anywhere, else one per replica."""
        n, cost = sr.request.num_prompt_tokens, self.cost
        base = cost.predict(n)
        if not hits:
            return base
        out = np.full(len(self.replicas), base)
        for i, h in hits.items():
            out[i] = cost.predict_suffix(n - h, h)
        return out

    # ------------------------------------------------------------------ choice
    def choose(self, sr: SimRequest, now: float) -> SimReplica | None:
        """The replica for ``sr`` at ``now``; None when the router sheds it (``sr.cost_s`` becomes its
        predicted prefill on the chosen replica)."""
        policy = self.cfg.policy
        n = len(self.replicas)
        if policy == "prefix_affinity":
            return self._affinity(sr, now)
        if policy == "round_robin":
            rep = self.replicas[self.rr % n]
            self.rr += 1
            return rep
        if policy == "pow2":
            if n == 1:
                return self.replicas[0]
            a, b = self.rng.sample(self.replicas, 2)
            return b if len(b.live) < len(a.live) else a
        r = sr.request
        cfg = self.cfg
        if self.fresh is not None:  # rows are indices: the zero-padded ids sort alike (rank_replicas' tie-break)
            table = self.fresh.refresh(now)
            costs = self._costs(sr, self.hits(sr)) if sr.routing else self.cost.predict(r.num_prompt_tokens)
            row, shed = table.choose(policy, r.deadline, costs, now,
                                     sheddable=r.sheddable, margin_s=cfg.slack_margin_frac * r.ttft_slo_s,
                                     allow_shed=cfg.shed, preempt_latency_s=cfg.preempt_latency_s, all_usable=True)
            self.rr += 1
            sr.cost_s = float(costs[row]) if isinstance(costs, np.ndarray) else costs
            return None if shed else self.replicas[row]
        loads = self._loads(now, bool(sr.routing))
        req = PlacementRequest(r.request_id, r.num_prompt_tokens, r.deadline, r.ttft_slo_s, r.sheddable, r.priority,
                               sr.routing)
        decision = rank_replicas(policy, req, loads, self.cost, now, self.rr,
                                 margin_s=cfg.slack_margin_frac * r.ttft_slo_s, allow_shed=cfg.shed,
                                 preempt_latency_s=cfg.preempt_latency_s)
        self.rr += 1
        if decision.shed:
            return None
        rep = self.by_id[decision.ranked[0]]
        sr.cost_s = decision.cost_s
        if cfg.staleness_s > 0:
            self.dispatched[rep.index].append((now, sr.cost_s))
        return rep

    # ------------------------------------------------------------------ per decision
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

    def _affinity(self, sr: SimRequest, now: float) -> SimReplica:
        """Ray Serve LLM's prefix-cache affinity (``router.placement.affinity_order``) on the replicas'
        current queues and caches."""
        reps = self.replicas
        hits = self.hits(sr)
        n = max(sr.request.num_prompt_tokens, 1)
        order, _ = affinity_order([len(r.live) - len(r.decoding) for r in reps],
                                  [r.queued_work_s() for r in reps], [hits.get(i, 0) / n for i in range(len(reps))],
                                  [len(c) for c in self.cached], [r.replica_id for r in reps])
        costs = self._costs(sr, hits)
        sr.cost_s = float(costs[order[0]]) if isinstance(costs, np.ndarray) else costs
        return reps[order[0]]

    def _loads(self, now: float, with_caches: bool = False) -> list[ReplicaLoad]:
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
                                     age > max_age, True, pub.index,
                                     cached=self.cached[i] if with_caches else frozenset(),
                                     cache_block_tokens=self.block_tokens))
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
