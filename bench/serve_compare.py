"""FlowPrefill's goodput against vLLM and against its own baselines, from ``bench serve`` entries.

The own baselines are FlowPrefill's engine with the ``fcfs`` policy and with ``chunked`` prefill
at every chunk size measured (``chunked-N``); "best chunked" and "best own baseline" are the
highest goodputs among them. A system whose search failed even at the slowest rate tried has
goodput 0 and a ``min_rate_rps``: its goodput is below that rate, so a ratio against it is a
lower bound (``ratio_is_lower_bound``). A system that errored or was skipped has no goodput and
is left out of every comparison. ``flowprefill-nocache`` (FlowPrefill with its prefix cache off),
when measured, gives the ratio of what the cache adds; it is no baseline of the other ratios.
``flowprefill-pd`` (1 prefill + 1 decode replica) against ``flowprefill-x2`` (2 colocated replicas
on the same cores) is P/D disaggregation's ratio, best judged with ``--slos both``.
"""

from __future__ import annotations

from typing import Any

from bench.servers import CHUNKED_PREFIX, NOCACHE

FLOWPREFILL = "flowprefill"
VLLM = "vllm"
PD, COLOCATED_X2 = "flowprefill-pd", "flowprefill-x2"


def _measured(entry: dict[str, Any]) -> bool:
    return entry.get("goodput") is not None


def _best(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    measured = [e for e in entries if _measured(e)]
    return max(measured, key=lambda e: e["goodput"]) if measured else None


def _ratio(numerator: dict[str, Any] | None, denominator: dict[str, Any] | None) -> dict[str, Any] | None:
    """``numerator / denominator`` goodput; against a goodput of 0, the ratio to the rate floor."""
    if numerator is None or denominator is None:
        return None
    num, den = float(numerator["goodput"]), float(denominator["goodput"])
    lower_bound = False
    if den <= 0:
        floor = denominator.get("min_rate_rps")
        if not floor:
            return None
        den, lower_bound = float(floor), True
    return {"of": denominator["system"], "ratio": num / den, "ratio_is_lower_bound": lower_bound,
            "interval": _interval(numerator, denominator, den, lower_bound)}


def _interval(numerator: dict[str, Any], denominator: dict[str, Any], den: float,
              lower_bound: bool) -> list[float | None]:
    """The ratio's range the search grid allows: each goodput lies between its best passing rate and
    the next rate that failed on the median of its repeats (``next_failing_rate_rps``); an upper
    end is None where it is unbounded (a numerator that passed every rate tried, a denominator
    below the rate floor); a lower end is None where the denominator passed every rate tried."""
    num = float(numerator["goodput"])
    num_hi, den_hi = numerator.get("next_failing_rate_rps"), denominator.get("next_failing_rate_rps")
    if lower_bound:  # the denominator is below the floor `den`: the ratio is above num / den
        return [num / den, None]
    return [num / den_hi if den_hi else None, num_hi / den if num_hi else None]


def goodput_comparison(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Best chunked, best own baseline, and FlowPrefill's ratios to vLLM and to that baseline."""
    by_name = {e["system"]: e for e in entries if _measured(e)}
    chunked = _best([e for e in entries if e["system"].startswith(CHUNKED_PREFIX)])
    own = _best([e for e in entries if e["system"] == "fcfs" or e["system"].startswith(CHUNKED_PREFIX)])
    fp, vllm = by_name.get(FLOWPREFILL), by_name.get(VLLM)

    def pick(e: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if e is None else {"system": e["system"], "goodput": e["goodput"]}

    return {
        "flowprefill": pick(fp), "vllm": pick(vllm), "best_chunked": pick(chunked), "best_own_baseline": pick(own),
        "flowprefill_vs_vllm": _ratio(fp, vllm), "flowprefill_vs_best_own_baseline": _ratio(fp, own),
        "flowprefill_vs_nocache": _ratio(fp, by_name.get(NOCACHE)),
        "pd_vs_colocated_x2": _ratio(by_name.get(PD), by_name.get(COLOCATED_X2)),
    }


def format_comparison(cmp: dict[str, Any]) -> list[str]:
    """The comparison as report lines (empty when FlowPrefill was not measured)."""
    lines = []
    for key, what in (("best_chunked", "best chunked"), ("best_own_baseline", "best own baseline")):
        if cmp.get(key):
            lines.append(f"{what}: {cmp[key]['system']} ({cmp[key]['goodput']:.3f} req/s)")
    for key, what in (("flowprefill_vs_vllm", "FlowPrefill goodput / vLLM"),
                      ("flowprefill_vs_best_own_baseline", "FlowPrefill goodput / best own baseline"),
                      ("flowprefill_vs_nocache", "FlowPrefill goodput / its prefix cache off"),
                      ("pd_vs_colocated_x2", "P/D (1 prefill + 1 decode) goodput / 2 colocated replicas")):
        r = cmp.get(key)
        if r:
            bound = ">= " if r["ratio_is_lower_bound"] else ""
            low, high = r.get("interval") or (None, None)
            span = "" if r["ratio_is_lower_bound"] or (low is None and high is None) else \
                f"  (grid interval {_end(low)}-{_end(high)}x, medians of repeats)"
            lines.append(f"{what} ({r['of']}): {bound}{r['ratio']:.2f}x{span}")
    return lines


def _end(v: float | None) -> str:
    return "?" if v is None else f"{v:.2f}"
