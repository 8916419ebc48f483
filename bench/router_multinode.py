"""``flowprefill bench router --nodes N``: the router's cost on one node and across nodes, in one run.

The single-node figures of :mod:`bench.router_bench` are measured first (a single-node Ray, as
``bench router`` without ``--nodes``); that Ray is shut down and the same measurements run again
on a local N-node cluster (``ServingStack.start_cluster``: head + N-1 worker raylets on loopback)
with one replica on each worker node and the router on the head, as tests/test_multinode.py
deploys it. Every request then crosses from the head's raylet to a worker's: the difference
between the two columns is what replicas on other nodes cost the router.
"""

from __future__ import annotations

from typing import Any

from bench.router_bench import RouterBenchConfig, app_args, measure, run_router_bench
from bench.stack import ServingStack

# (label, report key, percentile): the rows of the side-by-side table
ROWS = (
    ("routing decision p50 (idle)", "routing_decision_ms", "p50"),
    ("routing decision p99 (idle)", "routing_decision_ms", "p99"),
    ("routing decision p50 (all)", "routing_decision_under_load_ms", "p50"),
    ("routing decision p99 (all)", "routing_decision_under_load_ms", "p99"),
    ("router overhead p50", "router_overhead_ms", "p50"),
    ("router overhead p99", "router_overhead_ms", "p99"),
    ("client TTFT p50", "client_ttft_ms", "p50"),
    ("client TTFT p99", "client_ttft_ms", "p99"),
    ("Serve floor p50", "serve_floor_ms", "p50"),
)


def check_router_nodes(nodes: int, engine: str) -> None:
    """Refuse a ``--nodes`` that cannot be run: 1 (single node only) or >= 2 with the echo engine."""
    if nodes < 1:
        raise ValueError(f"--nodes: at least 1, got {nodes}")
    if nodes > 1 and engine != "echo":
        raise ValueError(f"--nodes {nodes}: the multi-node comparison runs the echo engine only "
                         f"(worker nodes get one CPU each), not --engine {engine}")


def compare(single: dict[str, Any], multi: dict[str, Any]) -> dict[str, Any]:
    """Side by side: per row the single-node and multi-node value (ms) and multi minus single."""
    rows = []
    for label, key, q in ROWS:
        a, b = single[key][q], multi[key][q]
        rows.append({"metric": label, "single_ms": a, "multi_ms": b,
                     "diff_ms": None if a is None or b is None else b - a})
    return {"rows": rows,
            "decisions": {"single": single["routing_decision_ms"]["n"], "multi": multi["routing_decision_ms"]["n"]},
            "max_rps": {"single": single["max_rps"], "multi": multi["max_rps"]}}


def run_router_compare(cfg: RouterBenchConfig, stack: ServingStack, nodes: int) -> dict[str, Any]:
    """Measure on one node, then on an ``nodes``-node cluster; returns both reports and the comparison."""
    from state.redis_server import RedisServer

    check_router_nodes(nodes, cfg.engine)
    single = run_router_bench(cfg, stack)
    redis = RedisServer()
    redis.start()
    try:
        cluster = stack.start_cluster(nodes)
        try:
            placed = cluster.placement_args()
            if not placed:
                raise RuntimeError(f"the {nodes}-node cluster at {cluster.address} shows no FlowPrefill worker node")
            multi = measure(cfg, stack, {**app_args(cfg), **placed}, redis.url)
            multi["cluster"] = {"nodes": nodes, "address": cluster.address, "placement": placed}
        finally:
            cluster.close()
    finally:
        redis.stop()
    return {"single_node": single, "multi_node": multi, "comparison": compare(single, multi)}


def format_comparison(report: dict[str, Any]) -> str:
    """The side-by-side table as plain text (one line per row)."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    comp, multi = report["comparison"], report["multi_node"]
    nodes = multi.get("cluster", {}).get("nodes", "?")
    lines = [f"{'':<30} {'1 node':>9} {f'{nodes} nodes':>9} {'diff':>9}   (ms; {nodes} nodes: router on the head, "
             f"{multi.get('replicas_deployed')} replicas on the workers)"]
    for row in comp["rows"]:
        diff = "-" if row["diff_ms"] is None else f"{row['diff_ms']:+.2f}"
        lines.append(f"{row['metric']:<30} {ms(row['single_ms']):>9} {ms(row['multi_ms']):>9} {diff:>9}")
    d, r = comp["decisions"], comp["max_rps"]
    lines.append(f"{'decisions in the idle figures':<30} {d['single']:>9} {d['multi']:>9}")
    lines.append(f"{'max sustained rps':<30} {r['single']:>9g} {r['multi']:>9g}")
    return "\n".join(lines)
