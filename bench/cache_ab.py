"""Prefix cache on against off, replayed interleaved on one machine state (``bench cache-ab``).

``flowprefill bench cache-ab --trace PATH [--prefix-mode trace|multiturn] [--rounds N] [--quick]``

Why a command of its own: a goodput search runs one configuration after the other, and on a shared
VM the machine's own speed drifts by up to 1.34x between minutes (README, "Where the run-to-run
spread comes from"), more than a 20-30% prefix hit saves. Here both engines, ``flowprefill`` and
``flowprefill-nocache`` (the same settings with ``enable_prefix_caching`` off), share one loaded
model and one cost model, and every rate of a fixed geometric grid is replayed in rounds of one
replay each, the order alternating (on-off, off-on, ...), so drift hits both alike. Replays in
round ``k`` send both engines the same prompts (namespace ``k`` of the trace's sharing), new ones
every round, so a cache never keeps anything from a replay before. Before each round the idle
engine's prefill time of a fixed uncached prompt (the probe) records the machine's speed.

Goodput per configuration: the highest grid rate whose median attainment meets 90% with every
lower grid rate meeting it too; the true goodput lies between it and the next grid rate, which
gives the on/off ratio's interval. The grid starts at half the cold engine's predicted capacity,
steps down while either configuration misses 90% at its lowest rate, then climbs until both
configurations' medians are below ``stop_below`` (:func:`next_rate_index`). Each rate also counts
the rounds in which on beat, tied or lost to off, and the
cache's hit rate per replay is the engine's own counters (hit tokens over queried tokens), so the
hit rate under load is read at every rate, not only at the goodput.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.policy_bench import NOCACHE, PolicyBenchConfig, build_workload, policy_configs
from bench.replay import replay
from bench.shared_prefix import resolve_prefix_mode, reusable_fraction
from bench.traces import load_trace
from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig

CONFIGS = ("flowprefill", NOCACHE)
GOAL = 0.9  # attainment that counts as meeting the SLOs (DistServe's goodput)


@dataclass
class CacheABConfig:
    """What to replay and how densely (``bench`` settings plus the grid)."""

    bench: PolicyBenchConfig
    rounds: int = 3  # replays per configuration at each grid rate
    step: float = 1.25  # grid ratio between neighbouring rates
    start_utilisation: float = 0.5  # grid index 0: this share of the cold engine's predicted capacity
    max_rates: int = 9
    stop_below: float = 0.5  # stop climbing once both medians are under this

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"--rounds: need at least 1, got {self.rounds}")
        if not self.step > 1.0:
            raise ValueError(f"--step: the grid ratio must be above 1, got {self.step}")
        if not 0.0 < self.start_utilisation <= 2.0:
            raise ValueError(f"--start-utilisation: expected (0, 2], got {self.start_utilisation}")
        if self.max_rates < 1:
            raise ValueError(f"--max-rates: need at least 1, got {self.max_rates}")


def round_orders(rounds: int, rate_index: int) -> list[tuple[str, str]]:
    """Which configuration replays first in each round: alternating by round and by rate, so over the
    grid each goes first equally often and a drift within a pair favours neither."""
    on, off = CONFIGS
    return [(on, off) if (r + rate_index) % 2 == 0 else (off, on) for r in range(rounds)]


def next_rate_index(medians: dict[int, dict[str, float]], stop_below: float, max_rates: int,
                    goal: float = GOAL, max_down: int = 3) -> int | None:
    """The next grid index to replay (index ``k`` is ``start x step**k``), None when done: first 0;
    down while either configuration misses ``goal`` at the lowest rate (at most ``max_down`` below 0),
    so both goodputs lie on the grid; then up until both medians are under ``stop_below``."""
    if not medians:
        return 0
    if len(medians) >= max_rates:
        return None
    lo, hi = min(medians), max(medians)
    if lo > -max_down and any(m < goal for m in medians[lo].values()):
        return lo - 1
    if all(m < stop_below for m in medians[hi].values()):
        return None
    return hi + 1


def goodput_on_grid(medians: list[tuple[float, float]], goal: float = GOAL) -> tuple[float, float | None]:
    """``(good, bad)`` from ``(rate, median attainment)`` in ascending rate: the highest rate meeting
    ``goal`` with every lower one meeting it (0.0 if the first fails) and the first rate that fails
    (None: none failed)."""
    good = 0.0
    for rate, attained in medians:
        if attained < goal:
            return good, rate
        good = rate
    return good, None


def ratio_interval(on: tuple[float, float | None], off: tuple[float, float | None]) -> dict[str, float | None]:
    """On/off goodput ratio at the grid and the interval the grid allows (each true goodput lies in
    ``[good, bad)``; None where a bound is open)."""
    (on_good, on_bad), (off_good, off_bad) = on, off
    return {"ratio": on_good / off_good if off_good else None,
            "low": on_good / off_bad if off_bad else None,
            "high": on_bad / off_good if on_bad and off_good else None}


def paired_tally(on_runs: list[float], off_runs: list[float]) -> dict[str, int]:
    """Rounds in which on's attainment was above, equal to or below off's."""
    pairs = list(zip(on_runs, off_runs))
    return {"on_better": sum(a > b for a, b in pairs), "tie": sum(a == b for a, b in pairs),
            "off_better": sum(a < b for a, b in pairs)}


def sign_test_p(better: int, worse: int) -> float:
    """Two-sided sign test over the rounds that were not tied: the chance of a split at least this
    uneven if on and off were equally likely to win a round."""
    n, k = better + worse, max(better, worse)
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2.0 ** n)


def _hit_rate(summary: dict[str, Any]) -> float | None:
    c = summary.get("prefix_cache")
    return None if not c else c.get("hit_rate")


def run_cache_ab(cfg: CacheABConfig, model_dir: Path | None = None) -> dict[str, Any]:
    """Replay the grid interleaved and return the JSON report (every replay kept under ``runs``)."""
    from bench.policy_bench import Replays, RunPrompts, load_model_and_cost
    from bench.spread import engine_probe_ms
    from replicas.model.default_model import prepare_default_model
    from replicas.model.tokenizer import Tokenizer

    b = cfg.bench
    mode = resolve_prefix_mode(b.prefix_mode, load_trace(b.trace))
    if mode == "unique":
        raise ValueError("--prefix-mode unique: with unique prompts a prefix cache has nothing to hit; "
                         "use trace (Mooncake) or multiturn (Azure)")
    model_dir = model_dir or prepare_default_model()
    base = EngineConfig(model=str(model_dir), **b.engine)
    tokenizer = Tokenizer.from_dir(model_dir)
    settings = policy_configs(replace(b, policies=CONFIGS), nocache=True)

    model, cost = load_model_and_cost(model_dir, base)
    requests, built = build_workload(b, tokenizer, cost.predict)
    prompts_for = RunPrompts(tokenizer, built, b.seed, [r.prompt_ids for r in requests])

    span = max(requests[-1].arrival_s, 1e-9)
    base_rate = len(requests) / span
    work_s = sum(cost.predict(len(r.prompt_ids)) for r in requests)
    start = cfg.start_utilisation * span / max(work_s, 1e-9)
    engines = {name: ReplicaEngine(replace(base, **settings[name]), model=model, tokenizer=tokenizer,
                                   cost_model=cost) for name in CONFIGS}
    report: dict[str, Any] = {
        "trace": b.trace, "prefix_mode": mode, "window_requests": len(requests), "base_rate_rps": base_rate,
        "length_scale": b.length_scale, "block_tokens": built.block_tokens,
        "reusable_token_fraction": reusable_fraction(built), "config": asdict(cfg), "rates": [],
    }
    for engine in engines.values():
        engine.start()
    try:
        for name, engine in engines.items():  # first-call costs, on run 0's prompts
            warm = [replace(r, arrival_s=r.arrival_s / 100.0) for r in requests[:3]]
            replay(engine, warm, drain_s=60, tag=f"warmup-{name}")
        replays = {name: Replays(engine, requests, prompts_for) for name, engine in engines.items()}
        run_no = 0
        medians: dict[int, dict[str, float]] = {}
        rows: dict[int, dict[str, Any]] = {}
        with tqdm(total=cfg.max_rates * cfg.rounds * 2, desc="bench cache-ab", unit="replay") as bar:
            while (k := next_rate_index(medians, cfg.stop_below, cfg.max_rates)) is not None:
                scale = start * cfg.step ** k
                rows[k] = _replay_rate(k, scale, base_rate, cfg.rounds, replays, run_no, bar,
                                       lambda r: engine_probe_ms(engines["flowprefill"], tokenizer,
                                                                 requests[0].slo_class, r))
                medians[k] = {name: rows[k][name]["median"] for name in CONFIGS}
                run_no += cfg.rounds
            bar.total = bar.n
        report["rates"] = [rows[k] for k in sorted(rows)]
    finally:
        for engine in engines.values():
            engine.shutdown()
    _decide(report)
    print_report(report)
    return report


def _replay_rate(k: int, scale: float, base_rate: float, rounds: int, replays: dict[str, Any], run_no: int,
                 bar: tqdm, probe: Callable[[int], float]) -> dict[str, Any]:
    """Every round at one grid rate: the probe, then both configurations in this round's order."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    probes: list[float] = []
    for r, order in enumerate(round_orders(rounds, k)):
        probes.append(probe(run_no + r + 1))
        for name in order:
            rp = replays[name]
            rp.count = run_no + r  # both engines replay namespace run_no + r + 1: the same prompts
            summary = rp(scale, f"ab{k}.{r}.{name}")
            summary["first_in_round"] = name == order[0]
            runs[name].append(summary)
            bar.update(1)
            bar.set_postfix(rate=f"{scale * base_rate:.3g}", **{name[-7:]: f"{summary['attainment']:.2f}"})
    row: dict[str, Any] = {"rate_rps": scale * base_rate, "scale": scale, "grid_index": k, "probe_ms": probes}
    for name in CONFIGS:
        att = [s["attainment"] for s in runs[name]]
        hits = [h for h in (_hit_rate(s) for s in runs[name]) if h is not None]
        p50 = [s["ttft_p50_s"] for s in runs[name] if s["ttft_p50_s"] is not None]
        row[name] = {"median": statistics.median(att), "min": min(att), "max": max(att),
                     "hit_rate": statistics.median(hits) if hits else None,
                     "ttft_p50_s": statistics.median(p50) if p50 else None, "runs": runs[name]}
    row["tally"] = paired_tally([s["attainment"] for s in runs[CONFIGS[0]]],
                                [s["attainment"] for s in runs[CONFIGS[1]]])
    return row


def _decide(report: dict[str, Any]) -> None:
    rates = report["rates"]
    found = {name: goodput_on_grid([(row["rate_rps"], row[name]["median"]) for row in rates]) for name in CONFIGS}
    report["goodput"] = {name: {"goodput_rps": g, "next_failing_rps": bad} for name, (g, bad) in found.items()}
    report["ratio"] = ratio_interval(found[CONFIGS[0]], found[CONFIGS[1]])
    tallies = [row["tally"] for row in rates]
    report["tally"] = {key: sum(t[key] for t in tallies) for key in ("on_better", "tie", "off_better")}
    report["sign_test_p"] = sign_test_p(report["tally"]["on_better"], report["tally"]["off_better"])


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(report: dict[str, Any]) -> None:
    """The grid table (median [min-max] per configuration, paired tally, hit rate, probe) and the goodputs."""
    on, off = CONFIGS
    print(f"\n{report['trace']} ({report['prefix_mode']}): {report['window_requests']} requests, lengths "
          f"x{report['length_scale']:g}, {report['reusable_token_fraction']:.1%} of prompt tokens reusable")
    print(f"{'rate r/s':>9} {'cache on':>18} {'cache off':>18} {'on>off =  <':>12} {'hit %':>6} "
          f"{'p50 on s':>9} {'p50 off s':>9} {'probe ms':>14}")
    for row in report["rates"]:
        a, b, t = row[on], row[off], row["tally"]
        hit = "-" if a["hit_rate"] is None else f"{a['hit_rate']:.0%}"
        probe = f"{min(row['probe_ms']):.0f}-{max(row['probe_ms']):.0f}"
        print(f"{row['rate_rps']:>9.3f} {a['median']:>6.2f} [{a['min']:.2f}-{a['max']:.2f}] "
              f"{b['median']:>6.2f} [{b['min']:.2f}-{b['max']:.2f}] "
              f"{t['on_better']:>5} {t['tie']:>2} {t['off_better']:>2} {hit:>6} {_fmt(a['ttft_p50_s'], '.3f'):>9} "
              f"{_fmt(b['ttft_p50_s'], '.3f'):>9} {probe:>14}")
    g, r, t = report["goodput"], report["ratio"], report["tally"]
    print(f"goodput (median >= 0.9 at this and every lower rate): on {g[on]['goodput_rps']:.3f} r/s, "
          f"off {g[off]['goodput_rps']:.3f} r/s; on/off {_fmt(r['ratio'])}x, interval "
          f"[{_fmt(r['low'])}, {_fmt(r['high'])}]; rounds on better {t['on_better']}, tied {t['tie']}, "
          f"off better {t['off_better']} (sign test p = {report['sign_test_p']:.2g})")


def plot_cache_ab(report: dict[str, Any], path: str | Path) -> None:
    """PNG: median attainment against rate for both configurations, min-max as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in CONFIGS:
        xs = [row["rate_rps"] for row in report["rates"]]
        med = [row[name]["median"] for row in report["rates"]]
        err = [[m - row[name]["min"] for m, row in zip(med, report["rates"])],
               [row[name]["max"] - m for m, row in zip(med, report["rates"])]]
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=name)
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("TTFT SLO attainment (median, min-max)")
    ax.set_title(f"prefix cache on vs off, interleaved ({report['prefix_mode']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
