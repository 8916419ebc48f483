"""TTFT cost model: predicted prefill latency (seconds) as a function of input tokens.

Within the profiled span ``S = min(chunk_tokens, max_profiled_tokens)`` the model is a cubic
``f(n) = max(floor_s, a + b*n + c*n**2 + d*n**3)`` with ``a, b, c, d >= 0``, which makes it
monotone non-decreasing for every ``n >= 0`` by construction.  Beyond ``S`` the prefill is
costed as chunks of ``S`` tokens (``n = q*S + r``), each chunk paying ``f`` for its own tokens
plus attention over the KV of earlier chunks at ``kappa`` seconds per (new token x earlier
token) pair, with ``kappa = 2c + 3dS`` (the superlinear part of the fitted marginal cost at
``S``, ``(f'(S) - b) / S``)::

    predict(n) = q*f(S) + kappa*S**2*q*(q-1)/2 + [r > 0]*(f(r) + kappa*S*q*r)

This is continuous from the left at every multiple of ``S`` (a step of about ``a``, one extra
forward pass, right after it), monotone, and ``>= (n/S) * f(S)`` (at least linear scaling).

**Cached context.** Computing ``n`` new tokens after ``c`` tokens whose KV is already in the cache
(a prefix-cache hit, or a prompt's later chunk) costs ``predict_suffix(n, c)``: with a profiled
``cached_kappa`` (seconds per new token x cached token, the attention over the cached keys) it
is ``predict(n) + cached_kappa * n * c``; without one (an older or analytic profile) it is the
whole-prompt curve's increment, ``v(c + n) - v(c)`` plus one launch overhead per pass, where
``v(x) = predict(x) - a * ceil(x / S)``. :meth:`CostModel.predict_ranges` prices a whole program
of such slices.

Nothing here reads the wall clock or touches tensors: timestamps and measurements are supplied
by the caller (the engine). Fitting a model to measurements is :mod:`replicas.scheduler.cost_fit`;
measuring them (progress bars, hardware names, cache files) is :mod:`replicas.cost_profiling`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_MEMO_SIZE = 1 << 16  # distinct lengths CostModel.predict remembers
_OPTIONAL_FIELDS = ("cached_kappa",)  # may be absent from a stored profile (it predates them)


class CostModelError(ValueError):
    """Invalid cost model data; ``source`` names the file (if any) and ``field`` the field."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        prefix = f"{source}: " if source else ""
        where = f"field {field!r}: " if field else ""
        super().__init__(f"{prefix}{where}{message}")
        self.source = source
        self.field = field


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check(name: str, v: object) -> str | None:
    """Return why ``v`` is not a valid value for field ``name`` (None when it is)."""
    if name in ("a", "b", "c", "d"):
        return None if _is_num(v) and v >= 0 else f"expected a finite number >= 0, got {v!r}"
    if name == "floor_s":
        return None if _is_num(v) and v > 0 else f"expected a finite number > 0, got {v!r}"
    if name in ("max_profiled_tokens", "chunk_tokens"):
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        return None if ok else f"expected an integer >= 1, got {v!r}"
    if name in ("model", "dtype", "device", "hardware", "created_at"):
        return None if isinstance(v, str) else f"expected a string, got {v!r}"
    if name == "cached_kappa":
        return None if v is None or (_is_num(v) and v >= 0) else f"expected null or a finite number >= 0, got {v!r}"
    if name == "fit_error":
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            return f"expected an object with string keys, got {v!r}"
        bad = [k for k, x in v.items() if x is not None and not _is_num(x)]
        return f"entry {bad[0]!r} is not a finite number or null" if bad else None
    return "unknown field"


def _norm_dtype(dtype: str) -> str:
    return dtype.removeprefix("torch.")


def norm_device(device: str) -> str:
    """The device type of a device name (``cuda:1`` -> ``cuda``)."""
    return device.split(":", 1)[0]


@dataclass(frozen=True)
class CostModel:
    """Monotone prefill-latency model; see the module docstring for the formulas."""

    a: float
    b: float
    c: float
    d: float
    max_profiled_tokens: int
    chunk_tokens: int = 8192
    floor_s: float = 1e-6
    model: str = ""
    dtype: str = ""
    device: str = ""
    hardware: str = ""
    created_at: str = ""
    fit_error: dict[str, float | int | None] = field(default_factory=dict)
    cached_kappa: float | None = None  # s per (new token x cached token); None: not profiled
    # Derived constants for the hot path (not serialized, not compared).
    _span: int = field(init=False, repr=False, compare=False)
    _f_span: float = field(init=False, repr=False, compare=False)
    _kappa_s: float = field(init=False, repr=False, compare=False)
    _memo: dict[int, float] = field(init=False, repr=False, compare=False, default_factory=dict)  # predict(n)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.init and (msg := _check(f.name, getattr(self, f.name))):
                raise CostModelError(msg, field=f.name)
        span = min(self.chunk_tokens, self.max_profiled_tokens)
        object.__setattr__(self, "_span", span)
        object.__setattr__(self, "_f_span", self._poly(span))
        object.__setattr__(self, "_kappa_s", (2.0 * self.c + 3.0 * self.d * span) * span)

    @classmethod
    def from_coefficients(cls, a: float, b: float, c: float = 0.0, d: float = 0.0, **kw: Any) -> CostModel:
        """Build a model from known coefficients (no profiling); ``kw`` sets the other fields."""
        kw.setdefault("max_profiled_tokens", kw.get("chunk_tokens", 8192))
        kw.setdefault("model", "analytic")
        return cls(a=float(a), b=float(b), c=float(c), d=float(d), **kw)

    def scaled(self, factor: float) -> CostModel:
        """This model with every prediction multiplied by ``factor`` (all coefficients scale).

        The profile fields (model, hardware, fit error) are kept: it is the same profile,
        corrected for how much slower (or faster) the replica runs now than when it was measured.
        """
        if not (_is_num(factor) and factor > 0):
            raise CostModelError(f"expected a finite number > 0, got {factor!r}", field="factor")
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        for name in ("a", "b", "c", "d", "floor_s"):
            kw[name] = kw[name] * factor
        if kw["cached_kappa"] is not None:
            kw["cached_kappa"] *= factor
        return CostModel(**kw)

    # ------------------------------------------------------------------ prediction
    def _poly(self, n: float) -> float:
        v = self.a + n * (self.b + n * (self.c + n * self.d))
        return v if v > self.floor_s else self.floor_s

    def predict(self, n_tokens: int) -> float:
        """Predicted prefill latency (s) of one sequence of ``n_tokens``; 0.0 for ``n <= 0`` (memoised)."""
        v = self._memo.get(n_tokens)
        if v is None:
            v = self._predict(n_tokens)
            if len(self._memo) < _MEMO_SIZE:
                self._memo[n_tokens] = v
        return v

    def _predict(self, n_tokens: int) -> float:
        if n_tokens <= 0:
            return 0.0
        span = self._span
        if n_tokens <= span:
            return self._poly(n_tokens)
        q, r = divmod(n_tokens, span)
        t = q * self._f_span + 0.5 * self._kappa_s * span * q * (q - 1)
        if r:
            t += self._poly(r) + self._kappa_s * q * r
        return t

    def predict_batch(self, lengths: Sequence[int]) -> float:
        """Predicted latency of prefilling several sequences in one batch.

        Model: the launch overhead ``a`` is paid once per forward pass of the whole batch
        (``ceil(total / span)`` passes) and every sequence adds its own variable cost
        ``v(n) = predict(n) - a*ceil(n/span)`` (GEMMs linear in tokens, attention per sequence).
        Within one pass this is ``a + b*sum(n) + sum(c*n**2 + d*n**3)``; one sequence gives
        exactly ``predict(n)``.
        """
        ns = [n for n in lengths if n > 0]
        if len(ns) <= 1:
            return self.predict(ns[0]) if ns else 0.0
        span, a = self._span, self.a
        var = sum(self.predict(n) - a * -(-n // span) for n in ns)
        return max(self.floor_s, a * -(-sum(ns) // span) + var)

    def _variable(self, n: int) -> float:
        """``predict(n)`` without its per-pass launch overhead."""
        return self.predict(n) - self.a * -(-n // self._span) if n > 0 else 0.0

    def predict_suffix(self, n_tokens: int, cached_tokens: int) -> float:
        """Predicted latency of computing ``n_tokens`` new tokens after ``cached_tokens`` tokens whose KV
        is already cached (module docstring); ``predict(n)`` when nothing is cached."""
        if n_tokens <= 0:
            return 0.0
        if cached_tokens <= 0:
            return self.predict(n_tokens)
        if self.cached_kappa is not None:
            return self.predict(n_tokens) + self.cached_kappa * n_tokens * cached_tokens
        span = self._span
        increment = self._variable(cached_tokens + n_tokens) - self._variable(cached_tokens)
        return max(self.floor_s, self.a * -(-n_tokens // span) + increment)

    def predict_ranges(self, ranges: Sequence[tuple[int, int]]) -> float:
        """Predicted latency of one prefill program computing prompt slices ``[start, end)`` of several
        sequences (``start``: tokens already in the KV cache): :meth:`predict_batch` of fresh prompts,
        and with cached context the launch overhead once per pass of the whole program plus each
        slice's own :meth:`predict_suffix` without its overhead."""
        items = [(s, e) for s, e in ranges if e > s]
        if all(s <= 0 for s, _ in items):
            return self.predict_batch([e for _, e in items])
        span, a = self._span, self.a
        total = sum(e - s for s, e in items)
        var = sum(self.predict_suffix(e - s, s) - a * -(-(e - s) // span) for s, e in items)
        return max(self.floor_s, a * -(-total // span) + var)

    def predict_remaining(self, n_tokens: int, done_fraction: float) -> float:
        """Remaining latency of a prefill whose ``done_fraction`` of work (e.g. layers or operators
        completed / total) is finished: ``(1 - f) * predict(n)``, with ``f`` clamped to [0, 1]."""
        f = 0.0 if done_fraction < 0.0 else 1.0 if done_fraction > 1.0 else done_fraction
        return (1.0 - f) * self.predict(n_tokens)

    def matches(self, model: str, dtype: str, device: str, hardware: str) -> bool:
        """Whether this profile fits an engine: same model, dtype (``torch.`` prefix ignored),
        device type (index ignored: ``cuda:1`` matches ``cuda``) and hardware name."""
        return (
            self.model == model
            and _norm_dtype(self.dtype) == _norm_dtype(dtype)
            and norm_device(self.device) == norm_device(device)
            and self.hardware.strip() == hardware.strip()
        )

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including ``schema_version``."""
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for f in fields(self):
            if f.init:
                v = getattr(self, f.name)
                out[f.name] = dict(v) if isinstance(v, dict) else v
        return out

    def to_json(self) -> str:
        """Serialize to a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> CostModel:
        """Validate and build; raises :class:`CostModelError` naming ``source`` and the field."""
        if not isinstance(data, Mapping):
            raise CostModelError(f"expected a JSON object, got {type(data).__name__}", source=source)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            msg = f"unsupported schema version {version!r} (expected {SCHEMA_VERSION})"
            raise CostModelError(msg, source=source, field="schema_version")
        names = [f.name for f in fields(cls) if f.init]
        for key in data:
            if key != "schema_version" and key not in names:
                raise CostModelError("unknown field", source=source, field=str(key))
        data = {**{name: None for name in _OPTIONAL_FIELDS}, **data}  # profiles written before these existed
        for name in names:
            if name not in data:
                raise CostModelError("missing", source=source, field=name)
            if msg := _check(name, data[name]):
                raise CostModelError(msg, source=source, field=name)
        kw = {n: data[n] for n in names}
        for n in ("a", "b", "c", "d", "floor_s"):
            kw[n] = float(kw[n])
        kw["fit_error"] = dict(kw["fit_error"])
        if kw["cached_kappa"] is not None:
            kw["cached_kappa"] = float(kw["cached_kappa"])
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<json>") -> CostModel:
        """Parse a JSON string produced by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CostModelError(f"invalid JSON: {exc}", source=source) from exc
        return cls.from_dict(data, source=source)

    def save(self, path: str | Path) -> None:
        """Write the model as JSON to ``path`` (parent directories are created)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """Read and validate a model saved by :meth:`save`."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise CostModelError(f"cannot read: {exc}", source=str(p)) from exc
        return cls.from_json(text, source=str(p))


def analytic_cost_model(a: float, b: float, c: float = 0.0, d: float = 0.0, **kw: Any) -> CostModel:
    """Convenience for tests and simulations: :meth:`CostModel.from_coefficients`."""
    return CostModel.from_coefficients(a, b, c, d, **kw)
