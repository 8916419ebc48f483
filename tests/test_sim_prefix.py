"""The simulator's prefix caches: the engine's allocator and names on synthetic prompts, the router
pricing replicas with their hits, and conversations kept where their prefix is."""

from __future__ import annotations

from bench.sim.cluster import ClusterSim, RouterConfig, SimSetup
from bench.sim.exec_model import ExecConfig
from bench.sim.workload import from_trace, prefix_names, tile_window
from bench.traces import Trace, TraceRequest
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.cost_model import CostModel

COST = CostModel.from_coefficients(0.0, 1e-3, cached_kappa=1e-7)


def conversations(n_conv: int = 9, turns: int = 4, gap_s: float = 0.5) -> Trace:
    """``n_conv`` conversations of ``turns`` turns: each turn's prompt is the last one plus a block."""
    reqs = []
    for turn in range(turns):
        for c in range(n_conv):
            ids = tuple(c * 100 + k for k in range(turn + 2))  # 64-token blocks: 128, 192, 256, 320 tokens
            reqs.append(TraceRequest(turn * gap_s * n_conv + c * gap_s, 64 * len(ids), 2, ids))
    return Trace(tuple(sorted(reqs, key=lambda r: r.arrival_s)), "conversations", 64)


def run(policy: str, trace: Trace, replicas: int = 4, cache: int = 4096):
    wl = from_trace(trace, COST.predict, span_s=trace.duration_s + 1, length_scale=1.0, max_output_tokens=2)
    setup = SimSetup(COST, SchedulerConfig(), ExecConfig(cache_blocks=cache), RouterConfig(policy=policy))
    sim = ClusterSim(setup, replicas)
    return sim.run(wl), sim


def test_a_shared_block_id_is_the_same_synthetic_tokens_everywhere():
    trace = conversations(2, 3)
    names, routing = prefix_names(trace, 16, 4)
    by_ids = {r.hash_ids: n for r, n in zip(trace.requests, names)}
    assert by_ids[(0, 1, 2)][:8] == by_ids[(0, 1)][:8]  # turn 3 starts with turn 2's 128 tokens
    assert by_ids[(100, 101)][0] != by_ids[(0, 1)][0]  # another conversation shares nothing
    assert all(len(rn) == len(n) // 4 for n, rn in zip(names, routing))
    tiled, _ = tile_window(trace, 2, seed=1)
    ids = [r.hash_ids for r in tiled.requests]
    assert len(set(ids)) == len(ids)  # every copy its own block ids


def test_the_slo_aware_router_keeps_conversations_where_their_prefix_is_cached():
    res, sim = run("slo_aware", conversations())
    hit = res.prefix_hit_tokens / res.prefix_queried_tokens
    rr, _ = run("round_robin", conversations())
    rr_hit = rr.prefix_hit_tokens / rr.prefix_queried_tokens
    # each later turn reuses its previous prompt: at most 128 + 192 + 256 of 128 + 192 + 256 + 320 tokens per
    # conversation can hit (its whole earlier prompt, one token of every prompt is always computed)
    assert 0.5 < hit <= 576 / 896 + 1e-9 and rr_hit < 0.3  # round robin (9 conversations, 4 replicas) scatters turns
    assert res.attainment == 1.0
    for rep in sim.last_router.replicas:
        rep.cache.check_invariants()
        assert rep.cache.num_free_blocks == rep.cache.num_blocks  # finished: everything freed or cached


def test_prefix_affinity_follows_the_cache_and_no_cache_means_no_hits():
    res, _ = run("prefix_affinity", conversations())
    assert res.prefix_hit_tokens / res.prefix_queried_tokens > 0.5
    cold, sim = run("slo_aware", conversations(), cache=0)
    assert cold.prefix_queried_tokens == 0 and all(rep.cache is None for rep in sim.last_router.replicas)
