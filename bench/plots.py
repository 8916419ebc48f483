"""Plots for the benchmarks (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_attainment(report: dict[str, Any], path: str | Path) -> None:
    """TTFT SLO attainment against request rate, one line per policy, with the 90% goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in report["policies"]:
        pts = sorted(row["points"].values(), key=lambda p: p["rate_rps"])
        hit = row.get("prefix_hit_rate")
        ax.plot([p["rate_rps"] for p in pts], [p["attainment"] for p in pts], marker="o",
                label=f"{row['policy']} (goodput {row['goodput']:.2f} r/s"
                      + (f", prefix hits {hit:.0%})" if hit is not None else ")"))
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="90% goal")
    ax.set_xscale("log")
    ax.set_xlabel("request rate (req/s, log scale)")
    ax.set_ylabel("TTFT SLO attainment")
    ax.set_ylim(0, 1.02)
    mode = f", prefixes: {report['prefix_mode']}" if report.get("prefix_mode") else ""
    ax.set_title(f"{Path(report['trace']).name}: {report['window_requests']} requests, "
                 f"lengths x{report['length_scale']:g}{mode}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
