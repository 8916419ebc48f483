"""Request traces for the FlowPrefill benchmarks: loading, validation, windowing and scaling.

A :class:`Trace` is an immutable, arrival-sorted sequence of :class:`TraceRequest` records
(arrival time in seconds, input tokens, output tokens and, for traces that say which prompts share
a prefix, the prompt's block ids). :func:`load_trace` reads four formats:

``azure``
    The Azure LLM inference trace 2023 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``, wall-clock
    timestamps such as ``2023-11-16 18:17:03.9799600``). Arrivals are re-based so that the first
    request arrives at 0.0 s. The data set is CC-BY 4.0; cite Patel et al., "Splitwise: Efficient
    generative LLM inference using phase splitting", ISCA 2024, wherever the trace or results derived
    from it are published (see ``shared/traces/azure_llm_2023/PROVENANCE.md``).
``mooncake``
    JSON lines with ``timestamp`` (milliseconds), ``input_length``, ``output_length`` and
    ``hash_ids``; other keys are ignored. Timestamps are converted to seconds but not re-based.
    ``hash_ids`` names the prompt as a list of 512-token blocks (:data:`MOONCAKE_BLOCK_TOKENS`):
    requests whose lists start with the same ids share exactly that prompt prefix, and the last
    block may be partial, since ``input_length`` is exact (checks: :mod:`bench.trace_blocks`); a
    line without ``hash_ids`` shares no prefix. The trace is Apache-2.0; cite Qin et al., "Mooncake: A KVCache-centric
    Disaggregated Architecture for LLM Serving", FAST'25 (``shared/traces/mooncake/PROVENANCE.md``).
``csv``
    Generic CSV with header ``arrival_s,input_tokens,output_tokens`` (extra columns are ignored);
    arrivals are seconds from the trace start, taken as given.
``jsonl``
    Generic JSON lines, one object per line with the same three keys as ``csv``.

Every file must be sorted by arrival time (an unsorted file is refused, not silently sorted, since
that usually means a broken export), hold at least one request, use finite non-negative times,
non-negative integer token counts and ``input_tokens >= 1``. Violations raise
:class:`TraceFormatError` naming the file, the 1-based line and the column or field.

Blocks and length scaling: a trace with block ids carries its block size in tokens
(:attr:`Trace.block_tokens`). A request's prompt is the first ``input_tokens`` tokens of its
blocks laid end to end, ``block_tokens`` each. :meth:`Trace.scale_lengths` scales the block size
like the input lengths (rounded half up, at least 1 token: 512 x 1/16 = 32), so two requests
sharing ``k`` leading blocks share ``k x block_tokens`` scaled tokens (or all of the shorter
prompt); ids beyond the scaled length are dropped. When rounding (or the ``min_input`` clamp)
makes a scaled prompt longer than its blocks, the remaining tokens are the request's own.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from bench.trace_blocks import MOONCAKE_BLOCK_TOKENS, BlockIdChecker

FORMATS = ("azure", "mooncake", "csv", "jsonl")
_AZURE_COLS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_GENERIC_COLS = ("arrival_s", "input_tokens", "output_tokens")
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")
_TS_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?")


class TraceFormatError(ValueError):
    """A malformed trace file; the message reads ``file:line: column 'name': reason``."""

    def __init__(self, path: str | Path, line: int, field: str | None, reason: str, kind: str = "column"):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        where = f"{kind} '{field}': " if field is not None else ""
        super().__init__(f"{self.path}:{line}: {where}{reason}")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: arrival in seconds from the trace (or window) start, and its token counts.

    ``hash_ids``: the prompt's blocks (:attr:`Trace.block_tokens` tokens each), or None for a prompt
    that shares no prefix with any other.
    """

    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] | None = None


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class Trace:
    """An immutable, arrival-sorted request trace; ``source`` says where it came from.

    ``block_tokens`` is the size of the blocks the requests' ``hash_ids`` name (None when no
    request has any).
    """

    requests: tuple[TraceRequest, ...]
    source: str = ""
    block_tokens: int | None = None

    def __post_init__(self) -> None:
        reqs = tuple(self.requests)
        object.__setattr__(self, "requests", reqs)
        bt = self.block_tokens
        if bt is not None and (isinstance(bt, bool) or not isinstance(bt, int) or bt < 1):
            raise ValueError(f"block_tokens must be a positive integer or None, got {bt!r}")
        prev = 0.0
        for i, r in enumerate(reqs):
            if not (math.isfinite(r.arrival_s) and r.arrival_s >= prev):
                raise ValueError(f"request {i}: arrival {r.arrival_s!r} is not finite, >= 0 and sorted")
            if r.input_tokens < 1 or r.output_tokens < 0:
                raise ValueError(f"request {i}: needs input_tokens >= 1 and output_tokens >= 0, got {r}")
            if r.hash_ids is not None and (bt is None or not r.hash_ids):
                raise ValueError(f"request {i}: hash_ids need a non-empty list and the trace's block_tokens")
            prev = r.arrival_s

    @property
    def has_prefixes(self) -> bool:
        """Whether any request names its prompt's blocks (``hash_ids``)."""
        return any(r.hash_ids is not None for r in self.requests)

    def without_prefixes(self) -> Trace:
        """The same requests with no block ids: every prompt its own."""
        reqs = [replace(r, hash_ids=None) for r in self.requests]
        return Trace(tuple(reqs), f"{self.source}|unique", None)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    @property
    def duration_s(self) -> float:
        """Span from the first to the last arrival (0.0 for fewer than two requests)."""
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def rate_rps(self) -> float:
        """Mean arrival rate ``len / duration_s`` (as in ``stats.json``); 0.0 when the span is zero."""
        d = self.duration_s
        return len(self.requests) / d if d > 0 else 0.0

    def longest_gap(self) -> tuple[float, int]:
        """``(seconds, i)``: the longest wait between consecutive arrivals, before request ``i``
        (``(0.0, 0)`` for fewer than two requests)."""
        reqs = self.requests
        return max(((b.arrival_s - a.arrival_s, i + 1) for i, (a, b) in enumerate(zip(reqs, reqs[1:]))),
                   default=(0.0, 0))

    def _derive(self, requests: list[TraceRequest], note: str, block_tokens: int | None = None) -> Trace:
        return Trace(tuple(requests), f"{self.source}|{note}", block_tokens or self.block_tokens)

    def window(self, start_s: float, duration_s: float) -> Trace:
        """Requests arriving in ``[start_s, start_s + duration_s)``, with arrivals made relative to
        ``start_s`` (so an idle stretch at the window start is kept as a delay, not squeezed out)."""
        if not (math.isfinite(start_s) and start_s >= 0):
            raise ValueError(f"start_s must be finite and >= 0, got {start_s!r}")
        _positive("duration_s", duration_s)
        arrivals = [r.arrival_s for r in self.requests]
        lo = bisect.bisect_left(arrivals, start_s)
        hi = bisect.bisect_left(arrivals, start_s + duration_s)
        reqs = [replace(r, arrival_s=r.arrival_s - start_s) for r in self.requests[lo:hi]]
        return self._derive(reqs, f"window({start_s:g},{duration_s:g})")

    def head(self, n: int) -> Trace:
        """The first ``n`` requests (all of them if the trace is shorter)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self._derive(list(self.requests[:n]), f"head({n})")

    def scale_rate(self, factor: float) -> Trace:
        """Compress time by ``factor``: every arrival (hence every gap) is divided by it, so
        ``factor=2`` doubles the request rate. Token counts are unchanged."""
        _positive("factor", factor)
        reqs = [replace(r, arrival_s=r.arrival_s / factor) for r in self.requests]
        return self._derive(reqs, f"rate*{factor:g}")

    def scale_lengths(self, factor: float, *, min_input: int = 1, max_input: int | None = None,
                      max_output: int | None = None) -> Trace:
        """Multiply input lengths by ``factor`` (rounded half up), then clamp them to
        ``[min_input, max_input]``; output lengths are only capped at ``max_output``.
        Meant for CPU runs, where production prompt lengths are too slow to prefill.

        The block size is scaled alike (rounded half up, at least 1) and each request keeps the
        block ids its scaled prompt covers (see the module docstring)."""
        _positive("factor", factor)
        if min_input < 1 or (max_input is not None and max_input < min_input):
            raise ValueError(f"need 1 <= min_input <= max_input, got {min_input}, {max_input}")
        if max_output is not None and max_output < 0:
            raise ValueError(f"max_output must be >= 0, got {max_output}")
        hi_in = max_input if max_input is not None else math.inf
        hi_out = max_output if max_output is not None else math.inf

        def new_input(n: int) -> int:
            return int(min(max(math.floor(n * factor + 0.5), min_input), hi_in))

        bt = None if self.block_tokens is None else max(math.floor(self.block_tokens * factor + 0.5), 1)
        reqs = []
        for r in self.requests:
            n = new_input(r.input_tokens)
            ids = r.hash_ids if r.hash_ids is None or bt is None else r.hash_ids[: -(-n // bt)]
            reqs.append(TraceRequest(r.arrival_s, n, int(min(r.output_tokens, hi_out)), ids))
        return self._derive(reqs, f"len*{factor:g}", bt)

    def summary(self) -> dict[str, Any]:
        """Count, span, rate and input/output mean/min/p50/p90/p99/max (numpy linear percentiles,
        like ``stats.json``); length statistics are ``None`` for an empty trace."""

        def stats(values: list[int]) -> dict[str, float] | None:
            if not values:
                return None
            a = np.asarray(values, dtype=np.float64)
            p50, p90, p99 = np.percentile(a, [50, 90, 99])
            return {"mean": float(a.mean()), "min": float(a.min()), "p50": float(p50),
                    "p90": float(p90), "p99": float(p99), "max": float(a.max())}

        return {"source": self.source, "count": len(self), "duration_s": self.duration_s,
                "rate_rps": self.rate_rps, "input": stats([r.input_tokens for r in self.requests]),
                "output": stats([r.output_tokens for r in self.requests])}


class _Collector:
    """Accumulates validated rows; checks arrival order on the raw time value."""

    def __init__(self, path: Path, time_field: str, kind: str):
        self.path, self.time_field, self.kind = path, time_field, kind
        self.times: list[float] = []
        self.sizes: list[tuple[int, int]] = []
        self.hashes: list[tuple[int, ...] | None] = []
        self.prev_line = 0

    def add(self, line: int, t: float, inp: int, out: int, shown: str,
            hash_ids: tuple[int, ...] | None = None) -> None:
        if self.times and t < self.times[-1]:
            raise TraceFormatError(self.path, line, self.time_field,
                                   f"arrival {shown} is earlier than the previous request's (line "
                                   f"{self.prev_line}); the trace must be sorted by arrival time",
                                   self.kind)
        self.times.append(t)
        self.sizes.append((inp, out))
        self.hashes.append(hash_ids)
        self.prev_line = line

    def build(self, last_line: int, to_seconds: Callable[[float], float]) -> Trace:
        if not self.times:
            raise TraceFormatError(self.path, last_line, None, "empty trace: no requests found")
        reqs = [TraceRequest(to_seconds(t), i, o, h) for t, (i, o), h in zip(self.times, self.sizes, self.hashes)]
        blocks = MOONCAKE_BLOCK_TOKENS if any(h is not None for h in self.hashes) else None
        return Trace(tuple(reqs), str(self.path), blocks)


def _csv_int(path: Path, line: int, col: str, text: str, minimum: int) -> int:
    s = text.strip()
    if s.isascii() and s.isdigit() and int(s) >= minimum:
        return int(s)
    what = "a positive integer" if minimum > 0 else "a non-negative integer"
    raise TraceFormatError(path, line, col, f"expected {what}, got {text!r}")


def _csv_seconds(path: Path, line: int, col: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v >= 0):
        raise TraceFormatError(path, line, col, f"expected a finite number of seconds >= 0, got {text!r}")
    return v


def _azure_ns(path: Path, line: int, col: str, text: str, days: dict[str, int]) -> int:
    m = _TS_RE.fullmatch(text.strip())
    bad = f"expected a timestamp like '2023-11-16 18:17:03.9799600', got {text!r}"
    if m is None:
        raise TraceFormatError(path, line, col, bad)
    y, mo, d, h, mi, s, frac = m.groups()
    key = f"{y}-{mo}-{d}"
    if key not in days:
        try:
            days[key] = date(int(y), int(mo), int(d)).toordinal()
        except ValueError:
            raise TraceFormatError(path, line, col, bad) from None
    if int(h) > 23 or int(mi) > 59 or int(s) > 59:
        raise TraceFormatError(path, line, col, bad)
    secs = days[key] * 86400 + int(h) * 3600 + int(mi) * 60 + int(s)
    return secs * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


def _load_csv(path: Path, text: str, azure: bool) -> Trace:
    cols = _AZURE_COLS if azure else _GENERIC_COLS
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    for row in reader:
        if any(c.strip() for c in row):
            header = [c.strip() for c in row]
            break
    if header is None:
        raise TraceFormatError(path, 1, None, "empty file: no header and no requests")
    header_line = reader.line_num
    for c in cols:
        if c not in header:
            raise TraceFormatError(path, header_line, c, f"missing from header {header}")
    i_t, i_in, i_out = idx = [header.index(c) for c in cols]
    need = max(idx) + 1
    out = _Collector(path, cols[0], "column")
    days: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if len(row) < need:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            missing = next(c for c, i in zip(cols, idx) if i >= len(row))
            raise TraceFormatError(path, line, missing,
                                   f"missing value (row has {len(row)} of {len(header)} columns)")
        tt, ti, to = row[i_t], row[i_in], row[i_out]
        t = _azure_ns(path, line, cols[0], tt, days) if azure else _csv_seconds(path, line, cols[0], tt)
        inp = _csv_int(path, line, cols[1], ti, 1)
        outp = _csv_int(path, line, cols[2], to, 0)
        out.add(line, t, inp, outp, repr(tt.strip()))
    if azure and out.times:
        t0 = out.times[0]
        return out.build(reader.line_num, lambda t: (t - t0) / 1e9)
    return out.build(max(reader.line_num, header_line), float)


def _json_number(path: Path, line: int, key: str, v: object, integer: bool, minimum: float) -> float:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= minimum
    if ok and integer and not float(v).is_integer():
        ok = False
    if ok:
        return int(v) if integer else float(v)
    what = ("a positive integer" if minimum > 0 else "a non-negative integer") if integer \
        else "a finite number >= 0"
    raise TraceFormatError(path, line, key, f"expected {what}, got {json.dumps(v)}", "field")


def _json_error(path: Path, line: int, e: json.JSONDecodeError) -> TraceFormatError:
    return TraceFormatError(path, line, None, f"invalid JSON: {e.msg} (column {e.colno})")


def _load_jsonl(path: Path, text: str, mooncake: bool) -> Trace:
    keys = _MOONCAKE_KEYS if mooncake else _GENERIC_COLS
    out = _Collector(path, keys[0], "field")
    blocks = BlockIdChecker()
    line = 0
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _json_error(path, line, e) from None
        if not isinstance(obj, dict):
            raise TraceFormatError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
        for k in keys:
            if k not in obj:
                raise TraceFormatError(path, line, k, f"missing (keys present: {sorted(obj)})", "field")
        t = _json_number(path, line, keys[0], obj[keys[0]], False, 0)
        inp = int(_json_number(path, line, keys[1], obj[keys[1]], True, 1))
        outp = int(_json_number(path, line, keys[2], obj[keys[2]], True, 0))
        ids = None
        if mooncake and "hash_ids" in obj:
            try:
                ids = blocks.check(line, obj["hash_ids"], inp)
            except ValueError as exc:
                raise TraceFormatError(path, line, "hash_ids", str(exc), "field") from None
        out.add(line, t, inp, outp, json.dumps(obj[keys[0]]), ids)
    return out.build(max(line, 1), (lambda t: t / 1000.0) if mooncake else float)


def _detect(path: Path, text: str) -> str:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson") or raw.lstrip().startswith("{"):
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise _json_error(path, line, e) from None
            keys = sorted(obj) if isinstance(obj, dict) else []
            if "timestamp" in keys:
                return "mooncake"
            if "arrival_s" in keys:
                return "jsonl"
            raise TraceFormatError(path, line, None, f"cannot tell the format from keys {keys}: expected "
                                   "'timestamp' (mooncake) or 'arrival_s' (jsonl)")
        header = [c.strip() for c in next(csv.reader([raw]))]
        if "TIMESTAMP" in header or "ContextTokens" in header:
            return "azure"
        if "arrival_s" in header:
            return "csv"
        raise TraceFormatError(path, line, None, f"cannot tell the format from header {header}: expected "
                               f"{','.join(_AZURE_COLS)} (azure) or {','.join(_GENERIC_COLS)} (csv)")
    raise TraceFormatError(path, 1, None, "empty file: no header and no requests")


def load_trace(path: str | Path, fmt: str = "auto") -> Trace:
    """Load and validate a trace file; ``fmt`` is one of :data:`FORMATS` or ``"auto"`` (decided by
    extension, then by the CSV header or the first JSON object's keys). Raises
    :class:`TraceFormatError` (a ``ValueError``) on malformed content."""
    p = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; expected 'auto' or one of {FORMATS}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise TraceFormatError(p, line, None, "not UTF-8 text") from None
    kind = _detect(p, text) if fmt == "auto" else fmt
    if kind in ("azure", "csv"):
        return _load_csv(p, text, azure=kind == "azure")
    return _load_jsonl(p, text, mooncake=kind == "mooncake")
