"""Plots of a ``flowprefill bench serve`` report (matplotlib, PNG).

* ``attainment.png``: TTFT SLO attainment against request rate, one line per system;
* ``ttft_cdf.png``: TTFT CDF per SLO class at the common rate (every system measured it), one
  curve per system, with the class SLO marked;
* ``ttft_timeline.png``: each request's TTFT against its arrival time at the common rate, one panel
  per system, coloured by class (requests with no first token drawn at the top as misses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CLASS_COLOURS = {"interactive": "tab:red", "standard": "tab:blue", "batch": "tab:green"}


def _plt() -> Any:  # noqa: ANN401 - the pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(axis: Any) -> None:  # noqa: ANN401 - a matplotlib Axis
    """Label a log axis with plain numbers: every decade, and minor ticks at 2x and 5x."""
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter

    def minor(value: float, _pos: int) -> str:
        lead = f"{value:e}"[0]
        return f"{value:g}" if lead in "25" else ""

    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _results_at(entry: dict[str, Any], scale: float | None) -> list[dict[str, Any]]:
    point = next((p for p in entry["points"] if p["scale"] == scale), None)
    return point["results"][0] if point and point.get("results") else []


def plot_attainment(report: dict[str, Any], path: str | Path) -> None:
    """Attainment against rate (log scale) per system, with the goal line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in report["systems"]:
        pts = sorted(e["points"], key=lambda p: p["rate_rps"])
        if not pts:
            continue
        hit = e.get("prefix_hit_rate")
        ax.plot([p["rate_rps"] for p in pts], [p["attainment"] for p in pts], marker="o",
                label=f"{e['system']} (goodput {e['goodput'] or 0:.2f} r/s"
                      + (f", prefix hits {hit:.0%})" if hit is not None else ")"))
    ax.axhline(report.get("goal", 0.9), color="grey", linestyle="--", linewidth=1, label="goal")
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis)
    ax.set_xlabel("request rate (req/s, log scale)")
    ax.set_ylabel("TTFT SLO attainment")
    ax.set_ylim(0, 1.02)
    mode = f", prefixes: {report['prefix_mode']}" if report.get("prefix_mode") else ""
    ax.set_title(f"{Path(report['trace']).name}: {report['requests']} requests over HTTP, "
                 f"lengths x{report['length_scale']:g}{mode}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft_cdf(report: dict[str, Any], path: str | Path) -> None:
    """One panel per class: the TTFT CDF of every system at the common scale (misses at infinity)."""
    plt = _plt()
    classes = report["slo_classes"]
    scale = report.get("common_scale")
    fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.8), squeeze=False)
    for ax, c in zip(axes[0], classes):
        for e in report["systems"]:
            rows = [r for r in _results_at(e, scale) if r["slo_class"] == c["name"]]
            if not rows:
                continue
            ttfts = sorted(r["ttft_s"] for r in rows if r["ttft_s"] is not None)
            if not ttfts:
                continue
            ys = [(i + 1) / len(rows) for i in range(len(ttfts))]  # misses never reach 1
            ax.step([ttfts[0], *ttfts], [0.0, *ys], where="post", label=e["system"])
        ax.axvline(c["ttft_slo_s"], color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{c['name']} (SLO {c['ttft_slo_s']:g} s)", fontsize=9)
        ax.set_xlabel("TTFT (s, log scale)")
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][-1].legend(fontsize=8)
    rate = scale * report["base_rate_rps"] if scale else float("nan")
    fig.suptitle(f"TTFT CDF per class at {rate:.2f} req/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft_timeline(report: dict[str, Any], path: str | Path) -> None:
    """One panel per system: TTFT against arrival time at the common scale, coloured by class."""
    plt = _plt()
    scale = report.get("common_scale")
    entries = [e for e in report["systems"] if _results_at(e, scale)]
    if not entries:
        return
    slo = {c["name"]: c["ttft_slo_s"] for c in report["slo_classes"]}
    fig, axes = plt.subplots(len(entries), 1, figsize=(8, 2.4 * len(entries)), sharex=True, squeeze=False)
    for ax, e in zip(axes[:, 0], entries):
        rows = _results_at(e, scale)
        top = max([r["ttft_s"] for r in rows if r["ttft_s"] is not None] + list(slo.values())) * 1.5
        for name in slo:
            mine = [r for r in rows if r["slo_class"] == name]
            if not mine:
                continue
            colour = CLASS_COLOURS.get(name)
            ax.scatter([r["arrival_s"] for r in mine], [r["ttft_s"] if r["ttft_s"] is not None else top for r in mine],
                       s=12, color=colour, label=name)
            ax.axhline(slo[name], color=colour, linestyle=":", linewidth=1)
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
        ax.set_ylabel("TTFT (s)")
        ax.set_title(e["system"], fontsize=9)
    axes[-1, 0].set_xlabel("arrival time (s)")
    axes[0, 0].legend(fontsize=8, loc="upper left")
    rate = scale * report["base_rate_rps"] if scale else float("nan")
    fig.suptitle(f"TTFT over time at {rate:.2f} req/s (misses drawn at the top)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """All three plots into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "attainment.png", out / "ttft_cdf.png", out / "ttft_timeline.png"]
    plot_attainment(report, paths[0])
    plot_ttft_cdf(report, paths[1])
    plot_ttft_timeline(report, paths[2])
    return [p for p in paths if p.exists()]
