"""bench.sim.placement_table (the vectorised first choice equals rank_replicas') and QueueIndex.build."""

from __future__ import annotations

import math
import random
from itertools import accumulate

import numpy as np
import pytest

from bench.sim.placement_table import PlacementTable, reclassify_after
from replicas.scheduler.cost_model import CostModel
from router.placement import PlacementRequest, QueueIndex, ReplicaLoad, evaluate, own_cost, rank_replicas

COST = CostModel.from_coefficients(2e-3, 1e-4)
NOW = 1000.0


def random_load(rng: random.Random, rid: str, usable_only: bool = False) -> ReplicaLoad:
    kind = rng.random()
    if kind < 0.15:  # idle
        return ReplicaLoad(rid, inflight_s=rng.choice([0.0, 0.0, 0.01]), age_s=rng.uniform(0, 2))
    if kind < 0.2 and not usable_only:  # no state
        return ReplicaLoad(rid, inflight_s=rng.choice([0.0, 0.05]), known=False)

    def item() -> tuple[float, float]:
        # deadlines on a coarse grid so that ties with the request's deadline happen
        return NOW + rng.choice([-0.2, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, rng.uniform(-0.5, 2.0)]), rng.uniform(0.0, 0.4)

    queued = tuple(item() for _ in range(rng.randint(0, 12)))
    running = tuple(item() for _ in range(rng.randint(0, 3)))
    age = rng.choice([0.0, rng.uniform(0, 0.5), rng.uniform(4, 4.99 if usable_only else 6)])
    return ReplicaLoad(rid, queued, running, rng.choice([0.0, rng.uniform(0, 0.5)]),
                       rng.choice([0.0, 0.0, rng.uniform(0, 0.2)]), age, age > 5.0)


@pytest.mark.parametrize("seed", range(6))
def test_table_choice_equals_rank_replicas(seed):
    rng = random.Random(seed)
    for trial in range(150):
        n = rng.choice([1, 2, 3, 8, 30])
        usable_only = trial % 2 == 0  # the fast path (every state usable) and the general one
        loads = [random_load(rng, f"r{i:02d}", usable_only) for i in range(n)]
        table = PlacementTable(n, width=2)  # small: rows grow the columns
        for i, ld in enumerate(loads):
            if ld.usable:
                table.set_index(i, ld.get_index(NOW))
            table.age[i], table.inflight[i], table.usable[i] = ld.age_s, ld.inflight_s, ld.usable
        if trial % 3 == 0:  # rows are rewritten in place: shrink some, clear others
            for i in rng.sample(range(n), k=n // 2):
                if loads[i].usable and rng.random() < 0.5:
                    table.clear(i)
                    loads[i] = ReplicaLoad(loads[i].replica_id, inflight_s=loads[i].inflight_s, age_s=loads[i].age_s)
        for _ in range(10):
            slo = rng.choice([0.05, 0.1, 0.3, 1.0, rng.uniform(0.01, 2.0)])
            req = PlacementRequest("q", rng.randint(1, 3000), NOW + slo, slo, sheddable=rng.random() < 0.5)
            margin = rng.choice([slo, 0.0, 0.5 * slo])
            cost = COST.predict(req.prompt_tokens)
            for policy in ("slo_aware", "least_loaded"):
                want = rank_replicas(policy, req, loads, COST, NOW, margin_s=margin)
                got, shed = table.choose(policy, req.deadline, cost, NOW, sheddable=req.sheddable, margin_s=margin)
                assert loads[got].replica_id == want.ranked[0] and shed == want.shed, (policy, want.reason)
            ttft, harm, displaces = table.ttft(req.deadline, cost, NOW)
            places = [evaluate(req.deadline, cost, ld, NOW) for ld in loads]
            assert ttft.tolist() == [p.ttft for p in places]  # bit for bit
            assert harm.tolist() == [p.harm for p in places] and displaces.tolist() == [p.displaces for p in places]


@pytest.mark.parametrize("seed", range(4))
def test_table_choice_with_a_cost_per_row_equals_rank_replicas_with_prefix_hits(seed):
    """A prefix-cache hit makes the request cheaper on some replicas: the table takes one cost per row
    and still picks what rank_replicas picks (its own key then differs per row, late or not)."""
    rng = random.Random(100 + seed)
    cost_model = CostModel.from_coefficients(2e-3, 1e-4, cached_kappa=1e-8)
    names = tuple(f"{i:08x}" for i in range(40))
    for trial in range(150):
        n = rng.choice([2, 3, 8, 30])
        usable_only = trial % 2 == 0
        loads = []
        for i in range(n):
            ld = random_load(rng, f"r{i:02d}", usable_only)
            held = frozenset(names[:rng.choice([0, 0, 1, 5, 20, 40])])
            loads.append(ReplicaLoad(ld.replica_id, ld.queued, ld.running, ld.running_remaining_s, ld.inflight_s,
                                     ld.age_s, ld.stale, ld.known, cached=held, cache_block_tokens=64))
        table = PlacementTable(n, width=2)
        for i, ld in enumerate(loads):
            if ld.usable:
                table.set_index(i, ld.get_index(NOW))
            table.age[i], table.inflight[i], table.usable[i] = ld.age_s, ld.inflight_s, ld.usable
        for _ in range(10):
            slo = rng.choice([0.05, 0.1, 0.3, 1.0, rng.uniform(0.01, 2.0)])
            req = PlacementRequest("q", rng.randint(65, 3000), NOW + slo, slo, sheddable=rng.random() < 0.5,
                                   prefix_names=names)
            margin = rng.choice([slo, 0.0, 0.5 * slo])
            costs = np.array([own_cost(req, ld, cost_model) for ld in loads])
            want = rank_replicas("slo_aware", req, loads, cost_model, NOW, margin_s=margin)
            got, shed = table.choose("slo_aware", req.deadline, costs, NOW, sheddable=req.sheddable, margin_s=margin)
            assert loads[got].replica_id == want.ranked[0] and shed == want.shed, want.reason
            ttft, harm, displaces = table.ttft(req.deadline, costs, NOW)
            places = [evaluate(req.deadline, c, ld, NOW) for c, ld in zip(costs.tolist(), loads)]
            assert ttft.tolist() == [p.ttft for p in places]
            assert harm.tolist() == [p.harm for p in places] and displaces.tolist() == [p.displaces for p in places]


def test_table_rejects_what_it_does_not_model():
    with pytest.raises(ValueError):
        PlacementTable(0)
    with pytest.raises(ValueError, match="unsupported"):
        PlacementTable(2).choose("round_robin", NOW + 1, 0.1, NOW)
    assert np.all(PlacementTable(3).pending() == 0.0)


def reference_build(queued, running, running_s, now) -> QueueIndex:
    """QueueIndex.build as first written (sort (key, s) items, split by class), to pin the faster one."""
    key = lambda d, s: ((d - now) - s <= 0.0, d)  # noqa: E731
    items = [(key(d, s), s) for d, s in queued]
    running_key = None
    if running:
        running_key = min(key(d, s) for d, s in running)
        items.append((running_key, running_s or max(s for _, s in running)))
    items.sort()
    feas = [(k[1], s) for k, s in items if not k[0]]
    late = [(k[1], s) for k, s in items if k[0]]
    f_pre = tuple(accumulate(s for _, s in feas))
    l_pre = tuple(accumulate(s for _, s in late))
    min_slack, m = [0.0] * len(feas), math.inf
    for i in range(len(feas) - 1, -1, -1):
        m = min(m, feas[i][0] - f_pre[i])
        min_slack[i] = m
    total = (f_pre[-1] if f_pre else 0.0) + (l_pre[-1] if l_pre else 0.0)
    return QueueIndex(tuple(d for d, _ in feas), f_pre, tuple(min_slack), tuple(d for d, _ in late), l_pre,
                      running_key, total)


def random_items(rng: random.Random, k: int) -> tuple[tuple[float, float], ...]:
    return tuple((NOW + rng.choice([0.1, 0.5, rng.uniform(-1.0, 3.0)]), rng.choice([0.1, rng.uniform(0.0, 1.0)]))
                 for _ in range(k))


def test_queue_index_build_is_unchanged_and_reclassify_after_is_safe():
    rng = random.Random(7)
    for _ in range(3000):
        queued, running = random_items(rng, rng.randint(0, 10)), random_items(rng, rng.randint(0, 3))
        running_s = rng.choice([0.0, rng.uniform(0.0, 1.0)])
        assert QueueIndex.build(queued, running, running_s, NOW) == reference_build(queued, running, running_s, NOW)
        flip = reclassify_after(queued, running, NOW)
        built = QueueIndex.build(queued, running, running_s, NOW)
        for t in (NOW, NOW + 1e-7, (NOW + flip) / 2, flip - 1e-6, np.nextafter(flip, -np.inf)):
            if NOW <= t < flip:  # before the flip time a rebuild is the same index
                assert QueueIndex.build(queued, running, running_s, t) == built
        if flip == math.inf:  # nothing can turn late: the index is the same at any later time
            assert QueueIndex.build(queued, running, running_s, NOW + 1e6) == built
    # an item right at its turning point: the flip is not later than it
    d, s = NOW + 1.0, 0.25
    assert reclassify_after([(d, s)], [], NOW) <= d - s
    assert QueueIndex.build([(d, s)], [], 0.0, d - s).late_deadlines == (d,)
