"""Where the TTFT of a load run went, per SLO class: the mean and p90 of each part of the server's
TTFT decomposition (:mod:`replicas.ttft_parts`) and of what the client saw beyond it.

A request counts when it had its first token and the server sent its parts (FlowPrefill does,
vLLM does not). Columns, in seconds in the JSON and milliseconds in the table: the parts in the
order a request lives them (``ingress``, ``handle``, ``queue``, ``prefill``, ``suspended``,
``decode`` interleave, ``return`` to the ingress), then ``unattributed``, the client's TTFT less the
parts' sum (the proxy's hops between client and ingress both ways, the client itself, and the
engine's bookkeeping between its marks), and the client's ``ttft``. Each class has a row over its
requests and, where some missed their TTFT SLO, a row over the missed ones only: that row says
what a miss was made of. The p90 is each column's own (p90s do not add up; means do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.loadgen import RequestResult
from replicas.ttft_parts import PARTS

#: The columns of a breakdown: the parts, then the client's remainder and its TTFT.
COLUMNS = (*PARTS, "unattributed_s", "ttft_s")
_HEADINGS = {"ingress_s": "ingress", "handle_s": "handle", "queue_s": "queue", "prefill_s": "prefill",
             "suspended_s": "suspended", "decode_interleave_s": "decode", "return_s": "return",
             "unattributed_s": "unattrib", "ttft_s": "ttft"}


def _values(r: RequestResult) -> dict[str, float]:
    assert r.ttft_parts is not None and r.ttft_s is not None
    row = r.ttft_parts.to_dict()
    row["unattributed_s"] = r.ttft_s - r.ttft_parts.total_s
    row["ttft_s"] = r.ttft_s
    return row


def _row(rows: list[dict[str, float]]) -> dict[str, Any]:
    table = np.asarray([[row[c] for c in COLUMNS] for row in rows], dtype=np.float64)
    means, p90s = table.mean(axis=0), np.percentile(table, 90, axis=0)
    return {"requests": len(rows), "mean": {c: float(v) for c, v in zip(COLUMNS, means)},
            "p90": {c: float(v) for c, v in zip(COLUMNS, p90s)}}


def ttft_breakdown(results: Sequence[RequestResult]) -> dict[str, Any]:
    """Per class (and ``all``): the requests with parts (``all`` row, ``missed`` row or None), and how
    many had a first token but no parts (``without_parts``) or no first token at all (``no_first_token``)."""
    classes: dict[str, dict[str, Any]] = {}
    for name in [*sorted({r.slo_class for r in results}), "all"]:
        rows = [r for r in results if name == "all" or r.slo_class == name]
        timed = [r for r in rows if r.ttft_s is not None and r.ttft_parts is not None]
        missed = [r for r in timed if not r.met]
        classes[name] = {
            "all": _row([_values(r) for r in timed]) if timed else None,
            "missed": _row([_values(r) for r in missed]) if missed else None,
            "without_parts": sum(r.ttft_s is not None and r.ttft_parts is None for r in rows),
            "no_first_token": sum(r.ttft_s is None for r in rows),
        }
    return {"columns": list(COLUMNS), "classes": classes,
            "timed": sum(r.ttft_s is not None and r.ttft_parts is not None for r in results)}


def format_breakdown(breakdown: dict[str, Any] | None, indent: str = "  ") -> list[str]:
    """The table of :func:`ttft_breakdown`'s result: one line per class (and missed rows), each cell
    ``mean/p90`` in milliseconds; one line saying so when no request came with parts."""
    if not breakdown or not breakdown.get("timed"):
        return [f"{indent}no TTFT decomposition (the server sent no x-flowprefill-ttft-parts)"]
    columns = breakdown["columns"]
    width = 15
    lines = [f"{indent}{'class':<18} {'n':>5} " + " ".join(f"{_HEADINGS.get(c, c):>{width}}" for c in columns),
             f"{indent}{'':<18} {'':>5} " + " ".join(f"{'mean/p90 ms':>{width}}" for _ in columns)]
    for name, entry in breakdown["classes"].items():
        for kind in ("all", "missed"):
            row = entry.get(kind)
            if row is None:
                continue
            label = name if kind == "all" else f"{name} missed"
            cells = " ".join(f"{row['mean'][c] * 1e3:.1f}/{row['p90'][c] * 1e3:.1f}".rjust(width) for c in columns)
            lines.append(f"{indent}{label:<18} {row['requests']:>5} {cells}")
    untimed = {name: e["without_parts"] for name, e in breakdown["classes"].items()
               if name != "all" and e["without_parts"]}
    if untimed:
        lines.append(f"{indent}first token but no parts: {untimed}")
    return lines
