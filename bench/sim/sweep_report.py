"""The report of ``flowprefill bench sim``: the goodput table, the simulator's speed, and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def series_of(result: dict[str, Any]) -> str:
    """A result's column: its router policy, or its deployment in a P/D sweep (``colocated``, ``P:D 1:3``)."""
    return result.get("series") or result["router_policy"]


def speeds(results: list[dict[str, Any]]) -> dict[str, float]:
    """Simulated requests per second of run wall time, per column."""
    out: dict[str, list[float]] = {}
    for r in results:
        acc = out.setdefault(series_of(r), [0.0, 0.0])
        acc[0] += sum(p["simulated"] for p in r["points"])
        acc[1] += sum(p["wall_s"] for p in r["points"])
    return {k: n / max(s, 1e-9) for k, (n, s) in out.items()}


def print_table(report: dict[str, Any]) -> None:
    """Goodput per replica (req/s) per replica count and router policy (a P/D sweep: per deployment),
    then the simulator's speed."""
    rows = report["results"]
    policies = list(dict.fromkeys(series_of(r) for r in rows))
    counts = list(dict.fromkeys(r["replicas"] for r in rows))
    cell = {(r["replicas"], series_of(r)): r for r in rows}
    cfg = report["config"]
    print(f"\n{Path(report['trace']).name}: policy {cfg['policy']}, lengths x{cfg['length_scale']:g}, "
          f"profile {report['cost_model']['model']} on {report['cost_model']['hardware']}")
    pd = report.get("pd")
    if pd:
        print(f"P/D sweep, router {pd['router_policy']} on the prefill (or colocated) pool: goodput counts a request "
              f"when TTFT and TPOT (SLO {pd['tpot_slo_s'] * 1e3:.0f} ms) are both met; outputs up to "
              f"{cfg['max_output_tokens']} tokens; decode step {pd['decode_model']}; handover {pd['transfer']}, "
              f"first token streamed from the {pd['first_token']} replica")
    if report.get("prefix_mode") not in (None, "unique"):
        print(f"prefix mode {report['prefix_mode']}: {report['reusable_fraction']:.0%} of prompt tokens reusable "
              f"(unbounded cache); replicas' KV pools of {cfg['kv_cache_tokens']:,} tokens each. Prefix-cache hit rate "
              "at the goodput point in brackets")
    print(f"goodput per {'replica (GPU)' if pd else 'replica'}, req/s (cluster goodput in parentheses)")
    print(f"{'replicas':>8} {'requests':>9} " + " ".join(f"{p:>22}" for p in policies))
    for n in counts:
        reqs = next(cell[(n, p)]["requests"] for p in policies if (n, p) in cell)
        vals = []
        for p in policies:
            r = cell.get((n, p))
            hit = _hit_at_goodput(r) if r else None
            text = f"{r['goodput_per_replica']:>9.3f} ({r['goodput']:>9.2f})" if r else "-"
            vals.append(text + (f" [{hit:.0%}]" if hit is not None else ""))
        width = 28 if report.get("prefix_mode") not in (None, "unique") else 22
        print(f"{n:>8} {reqs:>9} " + " ".join(f"{v:>{width}}" for v in vals))
    brackets = [r["bracket"] for r in rows if r.get("bracket")]
    if brackets:
        print(f"search resolution: each goodput is within {max(brackets) - 1:.1%} below the lowest failing rate, "
              f"so goodputs that close are ties")
    per = " ".join(f"{k}={v:,.0f}" for k, v in report["speed_by_router_policy"].items())
    print(f"simulated {report['simulated_requests']:,} requests in {report['wall_s']:.1f} s wall on "
          f"{report.get('jobs', 1)} process(es) ({report['cpu_s']:.1f} s CPU): "
          f"{report['simulated_requests_per_s']:,.0f} req/s "
          f"({report['simulated_requests_per_cpu_s']:,.0f} per CPU s); per column (runs only): {per}; "
          f"load average {report['load_average'][0]:.1f} -> {report['load_average'][1]:.1f}")
    floor = report.get("scheduler_floor_requests_per_s")
    if floor:
        print(f"the real scheduler alone, one request at a time on an idle replica (bench.sim.floor): {floor:,.0f} "
              f"req/s per process, a bound on this simulator's speed per process")


def _hit_at_goodput(result: dict[str, Any]) -> float | None:
    """The prefix-cache hit rate of the run at the goodput scale (None without a cache)."""
    at = [p for p in result["points"] if p["scale"] == result["goodput_scale"]]
    return at[0].get("prefix_hit_rate") if at else None


def plot_goodput(report: dict[str, Any], path: str | Path) -> None:
    """Goodput per replica against the replica count, one line per router policy (or P/D deployment)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_policy: dict[str, list[tuple[int, float]]] = {}
    for r in report["results"]:
        by_policy.setdefault(series_of(r), []).append((r["replicas"], r["goodput_per_replica"]))
    for name, pts in by_policy.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("replicas")
    ax.set_ylabel("goodput per replica (req/s, >= 90% " + ("TTFT+TPOT" if report.get("pd") else "TTFT")
                  + " attainment)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{Path(report['trace']).name}: simulated, policy {report['config']['policy']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
