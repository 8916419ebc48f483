"""FlowPrefill's goodput against vLLM and against its own baselines, from ``bench serve`` entries.

The own baselines are FlowPrefill's engine with the ``fcfs`` policy and with ``chunked`` prefill
at every chunk size measured (``chunked-N``); "best chunked" and "best own baseline" are the
highest goodputs among them. A system whose search failed even at the slowest rate tried has
goodput 0 and a ``min_rate_rps``: its goodput is below that rate, so a ratio against it is a
lower bound (``ratio_is_lower_bound``). A system that errored or was skipped has no goodput and
is left out of every comparison. ``flowprefill-nocache`` (FlowPrefill with its prefix cache off),
when measured, gives the ratio of what the cache adds; it is no baseline of the other ratios.
"""

from __future__ import annotations

from typing import Any

from bench.servers import CHUNKED_PREFIX, NOCACHE

FLOWPREFILL = "flowprefill"
VLLM = "vllm"


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
    return {"of": denominator["system"], "ratio": num / den, "ratio_is_lower_bound": lower_bound}


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
    }


def format_comparison(cmp: dict[str, Any]) -> list[str]:
    """The comparison as report lines (empty when FlowPrefill was not measured)."""
    lines = []
    for key, what in (("best_chunked", "best chunked"), ("best_own_baseline", "best own baseline")):
        if cmp.get(key):
            lines.append(f"{what}: {cmp[key]['system']} ({cmp[key]['goodput']:.3f} req/s)")
    for key, what in (("flowprefill_vs_vllm", "vLLM"), ("flowprefill_vs_best_own_baseline", "best own baseline"),
                      ("flowprefill_vs_nocache", "its prefix cache off")):
        r = cmp.get(key)
        if r:
            bound = ">= " if r["ratio_is_lower_bound"] else ""
            lines.append(f"FlowPrefill goodput / {what} ({r['of']}): {bound}{r['ratio']:.2f}x")
    return lines
