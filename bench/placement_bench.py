"""Offline timing of the router's placement decision (:func:`router.placement.rank_replicas`).

``flowprefill bench router`` prints it beside the decision times measured in the serving path, so
the cost of the ranking itself can be told apart from the Redis read and Serve's hops around it.
"""

from __future__ import annotations

import random
import statistics
import time

from replicas.scheduler.cost_model import CostModel
from router.placement import PlacementRequest, load_from_state, rank_replicas
from state.schema import QueuedRequest, ReplicaQueueState


def bench_placement(n_replicas: int = 8, n_queued: int = 100, iterations: int = 2000, seed: int = 0) -> dict:
    """Time :func:`rank_replicas` (``slo_aware``, prebuilt indices, as the router caches them per
    state) and the index build: ``median_s``, ``p99_s``, ``build_median_s`` (one replica), and how
    many decisions ranked every replica (``fully_ranked``: all of them, one Serve tier each)."""
    rng = random.Random(seed)
    now = time.time()
    cost = CostModel.from_coefficients(2e-3, 5e-5, 1e-9)
    loads, builds = [], []
    for r in range(n_replicas):
        reqs = tuple(
            QueuedRequest(f"r{r}-{i}", "running" if i == 0 else "waiting", now + rng.uniform(-0.5, 5.0),
                          rng.uniform(0.001, 0.2), rng.randint(16, 4096))
            for i in range(n_queued)
        )
        state = ReplicaQueueState(f"rep{r}", "flowprefill", "m", now - 0.01, 1, reqs, 0.05)
        t0 = time.perf_counter()
        load = load_from_state(state, rng.uniform(0, 0.1), now, 5.0)
        load.get_index(now)
        builds.append(time.perf_counter() - t0)
        loads.append(load)
    times, ranked = [], 0
    for i in range(iterations):
        req = PlacementRequest(f"q{i}", rng.randint(16, 2048), now + rng.uniform(0.05, 3.0), 1.0, bool(i % 2))
        t0 = time.perf_counter()
        decision = rank_replicas("slo_aware", req, loads, cost, now)
        times.append(time.perf_counter() - t0)
        ranked += len(decision.ranked) == n_replicas
    times.sort()
    return {
        "n_replicas": n_replicas, "n_queued": n_queued, "iterations": iterations,
        "median_s": statistics.median(times), "p99_s": times[min(len(times) - 1, int(0.99 * len(times)))],
        "build_median_s": statistics.median(builds), "fully_ranked": ranked,
    }
