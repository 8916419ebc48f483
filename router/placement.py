"""Replica placement: predicted TTFT per replica and the routing policies (pure: no Ray, no Redis).

TTFT model of a request ``q`` placed on replica ``r`` (seconds from ``now``)::

    ttft(q, r) = max(W_ahead - age, 0) + I_r + P_r + c(q)

* ``c(q, r) = cost_model.predict_suffix(prompt_tokens - h, h)``: the request's own prefill on ``r``,
  where ``h`` is the prefix the replica's published cache summary holds (:func:`expected_hit_tokens`:
  the leading routing names of the prompt found in the summary; 0 without one).
* ``W_ahead``: predicted remaining work that the replica's scheduler runs before ``q``.  It orders
  by ``(slack <= 0, deadline)`` (:mod:`replicas.scheduler.priority`: feasible work first, EDF,
  then late work, EDF) and preempts the running batch for more urgent work, so only work whose
  key is ``<=`` q's key counts (equal deadlines count: pessimistic).  The running batch counts as
  one unit with its most urgent member's key and the batch's remaining seconds.
* ``age = now - updated_at`` of the published state: the replica has worked that long since,
  on the most urgent work first, i.e. on the work ahead of ``q``.
* ``I_r``: seconds dispatched by routers but not yet in the state; deadlines unknown, assumed ahead.
* ``P_r``: when ``q`` preempts a running batch, the operator in flight finishes first
  (:data:`PREEMPT_LATENCY_S`).

Work with later deadlines does not delay ``q`` (it is preempted), but ``q`` delays it by ``c(q)``:
placing ``q`` *harms* ``r`` when that pushes feasible later-deadline work past its deadline, and
*displaces* work on ``r`` whenever it jumps ahead of any (a preemption of the running batch
included).  Displacing is legal but not free: the displaced work loses ``c(q)`` of its slack, a
suspended batch holds its activations, and preemption waits for the operator in flight (tens of ms
at block granularity on a CPU, more than :data:`PREEMPT_LATENCY_S`), so among replicas that meet
the deadline the ones ``q`` displaces nothing on come first.

Limits: short-request batching with the head (faster), the ``max_suspended_batches`` cap (no
preemption at the cap: slower), decode steps interleaved at operator boundaries, KV-memory stalls
and the priority tie-break are not modelled; feasibility is classified when the index is built
(drifts for a few ms in a cached index); the cost model's error carries over; requests placed by
other routers after the last state/in-flight read are unseen.

Policies (:func:`rank_replicas`): ``slo_aware`` (default: SLO first, a cache hit is cheaper work),
``round_robin``, ``least_loaded`` and ``prefix_affinity`` (the behaviour of Ray Serve LLM's
``PrefixCacheAffinityRouter``: the longest prefix match while load is balanced, a baseline that
ignores deadlines). ``pow2`` is Serve's own power-of-two router: choosing it means *not* setting
``request_router_class`` on the replica deployment, so nothing here is involved.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from itertools import accumulate

from replicas.scheduler.cost_model import CostModel
from state.schema import PrefixSummary, QueuedRequest, ReplicaQueueState

POLICIES = ("slo_aware", "round_robin", "least_loaded", "prefix_affinity")
#: prefix_affinity: above this difference in requests between the busiest and the idlest replica, balance
#: load instead of following the cache (Ray Serve LLM's ``imbalanced_threshold``)
AFFINITY_IMBALANCE = 10
#: prefix_affinity: follow the cache only when the best replica holds at least this share of the prompt
AFFINITY_MATCH_RATE = 0.1
NON_PREEMPTIVE_ENGINES = frozenset({"vllm"})  # engine kinds whose running prefill is never preempted
PREEMPT_LATENCY_S = 0.002  # finish the operator in flight before a preemption takes effect

Key = tuple[bool, float]  # the replica's priority: (late, deadline); smaller runs first


def _key(deadline: float, remaining_s: float, now: float) -> Key:
    return ((deadline - now) - remaining_s <= 0.0, deadline)


@dataclass(frozen=True)
class PlacementRequest:
    """What placement needs to know about a request (``deadline``: absolute ``time.time()`` seconds)."""

    request_id: str
    prompt_tokens: int
    deadline: float
    ttft_slo_s: float
    sheddable: bool = False
    priority: int = 0
    prefix_names: tuple[str, ...] = ()  # routing names of the prompt (replicas.prefix_hash)


@dataclass(frozen=True)
class QueueIndex:
    """A replica's reported work split by the replica's feasibility class and sorted by deadline,
    with prefix sums (O(log n) per prediction).  ``feasible_min_slack[i]`` is
    ``min(deadline[j] - prefix[j] for j >= i)`` (slack relative to the snapshot start)."""

    feasible_deadlines: tuple[float, ...] = ()
    feasible_prefix: tuple[float, ...] = ()
    feasible_min_slack: tuple[float, ...] = ()
    late_deadlines: tuple[float, ...] = ()
    late_prefix: tuple[float, ...] = ()
    running_key: Key | None = None
    total_s: float = 0.0

    @classmethod
    def build(
        cls,
        queued: Iterable[tuple[float, float]],
        running: Sequence[tuple[float, float]],
        running_remaining_s: float,
        now: float,
    ) -> QueueIndex:
        """Index ``(deadline, remaining_s)`` items; the ``running`` batch is one unit costing
        ``running_remaining_s`` (or its longest member when that is 0) under its best member's key."""
        feas: list[tuple[float, float]] = []  # (deadline, s) of the feasible items, and of the late ones
        late: list[tuple[float, float]] = []
        for d, s in queued:
            (late if (d - now) - s <= 0.0 else feas).append((d, s))  # by _key(d, s, now)[0]
        running_key = min((_key(d, s, now) for d, s in running), default=None)
        if running_key is not None:  # one unit: the batch's remaining s (or its longest member) under its best key
            unit = (running_key[1], running_remaining_s or max(s for _, s in running))
            (late if running_key[0] else feas).append(unit)
        feas.sort()  # as sorting ((late, deadline), s) items and splitting them by class
        late.sort()
        f_pre = tuple(accumulate(s for _, s in feas))
        l_pre = tuple(accumulate(s for _, s in late))
        min_slack, m = [0.0] * len(feas), math.inf
        for i in range(len(feas) - 1, -1, -1):
            m = min(m, feas[i][0] - f_pre[i])
            min_slack[i] = m
        total = (f_pre[-1] if f_pre else 0.0) + (l_pre[-1] if l_pre else 0.0)
        return cls(tuple(d for d, _ in feas), f_pre, tuple(min_slack), tuple(d for d, _ in late), l_pre,
                   running_key, total)


@dataclass(frozen=True)
class ReplicaLoad:
    """What the router knows about one replica: queued (waiting/suspended) and running requests as
    ``(deadline, predicted remaining s)``, in-flight seconds, snapshot age; ``known=False`` when the
    replica published no state (then only ``inflight_s`` is known); stale loads are used as unknown."""

    replica_id: str
    queued: tuple[tuple[float, float], ...] = ()
    running: tuple[tuple[float, float], ...] = ()
    running_remaining_s: float = 0.0
    inflight_s: float = 0.0
    age_s: float = 0.0
    stale: bool = False
    known: bool = True
    index: QueueIndex | None = field(default=None, compare=False, repr=False)
    preemptive: bool = True  # False (vLLM): a running prefill finishes first, the queue is plain EDF
    cached: AbstractSet[str] = field(default=frozenset(), compare=False, repr=False)  # its cache summary's names
    cache_block_tokens: int = 0  # tokens per routing name in ``cached``
    decoding: int = 0  # sequences in its decode batch (their steps interleave with a new prefill)

    @property
    def usable(self) -> bool:
        """Whether the queue state is trusted (known and fresh)."""
        return self.known and not self.stale

    def get_index(self, now: float) -> QueueIndex:
        """The :class:`QueueIndex` (built on first use, classified at ``now``, then cached)."""
        if self.index is None:
            idx = QueueIndex.build(self.queued, self.running, self.running_remaining_s, now)
            object.__setattr__(self, "index", idx)
            return idx
        return self.index

    def pending_s(self, now: float) -> float:
        """Predicted seconds of all work on the replica (age-decayed state plus in flight)."""
        if not self.usable:
            return self.inflight_s
        return max(self.get_index(now).total_s - self.age_s, 0.0) + self.inflight_s


@dataclass(frozen=True)
class PlacementDecision:
    """Replica ids in preference order (one per Serve tier), predicted TTFTs, and the verdict."""

    ranked: list[str]
    predicted_ttft: dict[str, float]
    shed: bool
    reason: str
    cost_s: float = 0.0  # the request's own predicted prefill seconds (what goes in flight)
    late_by_s: float = 0.0  # when shed: how late the best replica is predicted


def expected_hit_tokens(req: PlacementRequest, load: ReplicaLoad) -> int:
    """Prompt tokens the replica's cache summary holds: its leading routing names found there, as the
    engine would attach them (never the whole prompt: one token is always computed)."""
    if not load.cached or not req.prefix_names:
        return 0
    count = 0
    for name in req.prefix_names:
        if name not in load.cached:
            break
        count += 1
    block = load.cache_block_tokens
    return min(count * block, (req.prompt_tokens - 1) // block * block)


def own_cost(req: PlacementRequest, load: ReplicaLoad, cost_model: CostModel) -> float:
    """The request's predicted prefill on ``load``'s replica, its expected cache hit included."""
    hit = expected_hit_tokens(req, load)
    return cost_model.predict_suffix(req.prompt_tokens - hit, hit)


def load_from_state(
    state: ReplicaQueueState, inflight_s: float, now: float, max_age_s: float, index: QueueIndex | None = None,
    prefix: PrefixSummary | None = None,
) -> ReplicaLoad:
    """A :class:`ReplicaLoad` from a published state (``index``: a cached one for this state;
    ``prefix``: the replica's cache summary, if the router has one)."""
    reqs: Sequence[QueuedRequest] = state.requests
    age = max(now - state.updated_at, 0.0)
    return ReplicaLoad(
        replica_id=state.replica_id,
        queued=tuple((q.deadline, q.predicted_remaining_s) for q in reqs if q.status != "running"),
        running=tuple((q.deadline, q.predicted_remaining_s) for q in reqs if q.status == "running"),
        running_remaining_s=state.running_remaining_s,
        inflight_s=max(inflight_s, 0.0),
        age_s=age,
        stale=age > max_age_s,
        index=index,
        preemptive=state.engine_kind not in NON_PREEMPTIVE_ENGINES,
        cached=frozenset(prefix.names) if prefix is not None else frozenset(),
        cache_block_tokens=prefix.block_tokens if prefix is not None else 0,
        decoding=state.decoding,
    )


@dataclass(frozen=True)
class Placement:
    """How a request would fare on one replica: predicted TTFT (s from now), whether it pushes
    feasible later work past its deadline (``harm``) and whether it jumps ahead of any reported
    work, preempting or delaying it (``displaces``)."""

    ttft: float
    harm: bool = False
    displaces: bool = False


def evaluate(
    deadline: float, cost_s: float, load: ReplicaLoad, now: float, preempt_latency_s: float = PREEMPT_LATENCY_S
) -> Placement:
    """The :class:`Placement` of a request with ``deadline`` and own cost ``cost_s`` on ``load``."""
    if not load.usable:
        return Placement(load.inflight_s + cost_s)
    if not load.preemptive:
        return _evaluate_non_preemptive(deadline, cost_s, load, now)
    idx = load.get_index(now)
    own: Key = (deadline - now - cost_s <= 0.0, deadline)
    harm = False
    if not own[0]:
        k = bisect_right(idx.feasible_deadlines, deadline)
        ahead = idx.feasible_prefix[k - 1] if k else 0.0
        displaces = k < len(idx.feasible_deadlines) or bool(idx.late_deadlines)
        if k < len(idx.feasible_deadlines):  # feasible later-deadline work that q delays by cost_s
            slack = idx.feasible_min_slack[k] - (now - load.age_s + load.inflight_s)
            harm = slack >= 0.0 and slack - cost_s < 0.0
    else:  # q is late already: every feasible request runs first, then late ones EDF
        k = bisect_right(idx.late_deadlines, deadline)
        ahead = (idx.feasible_prefix[-1] if idx.feasible_prefix else 0.0) + (idx.late_prefix[k - 1] if k else 0.0)
        displaces = k < len(idx.late_deadlines)
    ttft = max(ahead - load.age_s, 0.0) + load.inflight_s + cost_s
    if idx.running_key is not None and idx.running_key > own:
        ttft += preempt_latency_s
    return Placement(ttft, harm, displaces)


def _evaluate_non_preemptive(deadline: float, cost_s: float, load: ReplicaLoad, now: float) -> Placement:
    """An engine that never preempts a running prefill and orders its waiting queue by deadline
    (vLLM with deadline-derived priorities): everything running and every waiting request due no
    later than ``deadline`` comes first; ``q`` displaces the waiting requests due after it, and
    harms one that would meet its deadline without ``q`` but not with it."""
    running = load.running_remaining_s or max((s for _, s in load.running), default=0.0)
    queued = sorted(load.queued)
    ahead = running + sum(s for d, s in queued if d <= deadline)
    ttft = max(ahead - load.age_s, 0.0) + load.inflight_s + cost_s
    harm, finish, displaces = False, ttft, False
    for d, s in queued:
        if d <= deadline:
            continue
        displaces, finish = True, finish + s
        if finish - cost_s <= d - now < finish:
            harm = True
            break
    return Placement(ttft, harm, displaces)


def predict_ttft(
    req: PlacementRequest, load: ReplicaLoad, cost_model: CostModel, now: float,
    preempt_latency_s: float = PREEMPT_LATENCY_S,
) -> float:
    """Predicted TTFT (seconds from ``now``) of ``req`` on ``load`` (model: module docstring)."""
    return evaluate(req.deadline, own_cost(req, load, cost_model), load, now, preempt_latency_s).ttft


def rank_replicas(
    policy: str,
    req: PlacementRequest | None,
    loads: Sequence[ReplicaLoad],
    cost_model: CostModel,
    now: float,
    rr_counter: int = 0,
    *,
    margin_s: float = 0.0,
    allow_shed: bool = True,
    preempt_latency_s: float = PREEMPT_LATENCY_S,
) -> PlacementDecision:
    """Rank ``loads`` under ``policy`` (``req=None``: no metadata, falls back to least-loaded).

    The request's own cost is per replica: a replica whose cache summary holds a prefix of the
    prompt charges only the rest (:func:`own_cost`). ``slo_aware`` tiers: (1) replicas meeting the
    deadline with ``margin_s`` to spare, ones that harm no later work first, then ones where it
    displaces nothing, then the least work for it (a cache hit), then least slack (bin packing
    keeps idle headroom for urgent work), then the least pending work, fewer decoding streams
    breaking a tie (their steps interleave with the new prefill; a long prompt that has moved on to
    decode leaves its replica looking idle in prefill terms);
    (2) meeting it with less than ``margin_s``, ones that harm no later work first, then most
    slack (spreading: a ``margin_s`` of the whole TTFT SLO puts every feasible replica here; a
    hit leaves more slack);
    (3) replicas without a usable state (no state or stale), by predicted TTFT; (4) late ones,
    least late first.  ``shed`` when ``req`` is sheddable, ``allow_shed`` and no replica is
    predicted to meet the deadline. ``cost_s`` of the decision is the request's cost on the first
    replica (what goes in flight there).
    """
    if not loads:
        return PlacementDecision([], {}, False, "no candidate replicas")
    costs = {ld.replica_id: own_cost(req, ld, cost_model) for ld in loads} if req is not None else {}
    if policy == "round_robin":
        ids = sorted(ld.replica_id for ld in loads)
        start = rr_counter % len(ids)
        ids = ids[start:] + ids[:start]
        return PlacementDecision(ids, {}, False, "round robin", costs.get(ids[0], 0.0))
    if policy == "least_loaded" or req is None:
        order = sorted(loads, key=lambda ld: (ld.pending_s(now), ld.replica_id))
        why = "least loaded" if req is not None else "no request metadata: least loaded"
        return PlacementDecision([ld.replica_id for ld in order], {}, False, why, costs.get(order[0].replica_id, 0.0))
    if policy == "prefix_affinity":
        return _prefix_affinity(req, loads, costs, now)
    if policy != "slo_aware":
        raise ValueError(f"unknown placement policy {policy!r}; expected one of {POLICIES}")
    ttfts: dict[str, float] = {}
    ranked: list[tuple[tuple[int, float, float, float, float, float, int, str], str]] = []
    budget = req.deadline - now
    for ld in loads:
        cost = costs[ld.replica_id]
        place = evaluate(req.deadline, cost, ld, now, preempt_latency_s)
        ttft = ttfts[ld.replica_id] = place.ttft
        slack = budget - ttft
        if not ld.usable:
            key = (2, ttft, 0.0, 0.0, 0.0, 0.0, ld.decoding, ld.replica_id)
        elif slack < 0.0:
            key = (3, -slack, 0.0, 0.0, 0.0, 0.0, ld.decoding, ld.replica_id)
        elif slack < margin_s:
            key = (1, float(place.harm), -slack, 0.0, 0.0, 0.0, ld.decoding, ld.replica_id)
        else:
            key = (0, float(place.harm), float(place.displaces), cost, slack, ld.pending_s(now), ld.decoding,
                   ld.replica_id)
        ranked.append((key, ld.replica_id))
    ranked.sort()
    best_key, best = ranked[0]
    feasible = any(ttfts[r] <= budget for _, r in ranked)
    shed = req.sheddable and allow_shed and not feasible
    late_by = ttfts[best] - budget if shed else 0.0
    if shed:
        reason = f"shed: no replica meets the deadline (best {best} late by {late_by:.4f}s)"
    elif best_key[0] == 0:
        reason = f"packed on {best}: {best_key[4]:.4f}s to spare" + (
            " (harms later work)" if best_key[1] else " (displaces later work)" if best_key[2] else "")
    elif best_key[0] == 1:
        reason = f"spread to {best}: {budget - ttfts[best]:.4f}s to spare" + (
            " (harms later work)" if best_key[1] else "")
    elif best_key[0] == 2:
        reason = f"no usable state for {best}: predicted {ttfts[best]:.4f}s"
    else:
        reason = f"none meets the deadline: least late {best} by {ttfts[best] - budget:.4f}s"
    return PlacementDecision([r for _, r in ranked], ttfts, shed, reason, costs[best], late_by)


def _prefix_affinity(req: PlacementRequest, loads: Sequence[ReplicaLoad], costs: dict[str, float],
                     now: float) -> PlacementDecision:
    """Ray Serve LLM's prefix-cache affinity, by its three rules: while the busiest replica holds at
    most :data:`AFFINITY_IMBALANCE` more requests than the idlest, the replicas holding the largest
    share of the prompt (at least :data:`AFFINITY_MATCH_RATE`) first; below that share, the replicas
    with the smallest caches; when imbalanced, the least loaded. Deadlines play no part."""
    order, why = affinity_order([len(ld.queued) + len(ld.running) for ld in loads],
                                [ld.pending_s(now) for ld in loads],
                                [expected_hit_tokens(req, ld) / max(req.prompt_tokens, 1) for ld in loads],
                                [len(ld.cached) for ld in loads], [ld.replica_id for ld in loads])
    ids = [loads[i].replica_id for i in order]
    return PlacementDecision(ids, {}, False, why, costs[ids[0]])


def affinity_order(depths: Sequence[int], pending_s: Sequence[float], match_rates: Sequence[float],
                   cache_sizes: Sequence[int], ids: Sequence[str]) -> tuple[list[int], str]:
    """``prefix_affinity``'s ranking of replicas ``0..n-1`` (requests queued, pending seconds, share of
    the prompt cached, names cached, id), and why: the rules of :func:`_prefix_affinity`."""
    n = range(len(ids))
    if max(depths) - min(depths) > AFFINITY_IMBALANCE:
        return sorted(n, key=lambda i: (pending_s[i], ids[i])), "prefix affinity: load imbalanced, least loaded"
    best = max(match_rates)
    if best >= AFFINITY_MATCH_RATE:
        order = sorted(n, key=lambda i: (-match_rates[i], pending_s[i], ids[i]))
        return order, f"prefix affinity: {best:.0%} of the prompt cached"
    return sorted(n, key=lambda i: (cache_sizes[i], pending_s[i], ids[i])), "prefix affinity: no match, smallest cache"
