"""Per-class outcome rows of a load run (``bench overload`` per phase, ``bench soak`` for the whole run).

A row counts requests, completions, TTFT SLOs met, 429 refusals (with how many carried
``Retry-After``, their reasons with numbers blanked, and a few examples), cancellations and other
errors; :func:`finish_rows` adds the attainment.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bench.loadgen import RequestResult

MAX_EXAMPLES = 3


def new_row() -> dict[str, Any]:
    """An empty outcome row."""
    return {"requests": 0, "completed": 0, "met": 0, "rejected_429": 0, "retry_after": 0, "other_errors": 0,
            "cancelled": 0}


def tally(rows: dict[str, dict[str, Any]], r: RequestResult) -> None:
    """Count ``r`` in its class's row and in ``all``."""
    for key in (r.slo_class, "all"):
        row = rows.get(key)
        if row is None:
            row = rows[key] = new_row()
        row["requests"] += 1
        row["met"] += r.met
        if r.error is None:
            row["completed"] += 1
        elif r.status == 429:
            row["rejected_429"] += 1
            row["retry_after"] += r.retry_after is not None
            reasons = row.setdefault("refusal_reasons", {})
            reason = refusal_kind(r.error)
            reasons[reason] = reasons.get(reason, 0) + 1
            examples = row.setdefault("refusal_examples", [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(r.error)
        elif r.error.startswith("cancelled"):
            row["cancelled"] += 1
        else:
            row["other_errors"] += 1


def finish_rows(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add each row's attainment (SLOs met over requests); returns ``rows``."""
    for row in rows.values():
        row["attainment"] = round(row["met"] / row["requests"], 3) if row["requests"] else None
    return rows


def class_outcomes(results: list[RequestResult]) -> dict[str, dict[str, Any]]:
    """One row per SLO class and ``all`` over every result."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        tally(rows, r)
    return finish_rows(rows)


def refusal_kind(error: str) -> str:
    """A refusal's message (from its OpenAI error body when there is one) with numbers and ids
    blanked, so that like refusals count together."""
    text = error.removeprefix("HTTP 429: ")
    try:
        text = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    text = re.sub(r"'[^']*'", "'…'", text)
    return re.sub(r"[\w.-]*\d[\w.-]*", "#", text)[:120]
