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

Nothing here reads the wall clock or touches tensors: timestamps and measurements are supplied
by the caller (the engine).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

SCHEMA_VERSION = 1
DEFAULT_OUTLIER_K = 5.0  # drop a point if |rel. residual - median| > k * MAD (k=5 ~ 3.4 sigma)
_MIN_MAD = 0.01  # MAD floor (relative): points within k*1% of the fit are never dropped
_MEMO_SIZE = 1 << 16  # distinct lengths CostModel.predict remembers


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
    if name == "fit_error":
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            return f"expected an object with string keys, got {v!r}"
        bad = [k for k, x in v.items() if x is not None and not _is_num(x)]
        return f"entry {bad[0]!r} is not a finite number or null" if bad else None
    return "unknown field"


def _norm_dtype(dtype: str) -> str:
    return dtype.removeprefix("torch.")


def _norm_device(device: str) -> str:
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
            and _norm_device(self.device) == _norm_device(device)
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
        for name in names:
            if name not in data:
                raise CostModelError("missing", source=source, field=name)
            if msg := _check(name, data[name]):
                raise CostModelError(msg, source=source, field=name)
        kw = {n: data[n] for n in names}
        for n in ("a", "b", "c", "d", "floor_s"):
            kw[n] = float(kw[n])
        kw["fit_error"] = dict(kw["fit_error"])
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


# ---------------------------------------------------------------------- fitting
def _nnls_relative(n: np.ndarray, y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cubic coefficients ``>= 0`` minimizing ``sum(((f(n) - y) / ref)**2)``.

    Exact NNLS by enumerating the 16 supports: the optimum is the unconstrained least-squares
    solution on its own support, and some optimum has linearly independent support columns.
    Lengths are scaled by their maximum for conditioning.
    """
    scale = float(n.max())
    x = n / scale
    design = np.stack([np.ones_like(x), x, x**2, x**3], axis=1) / ref[:, None]
    target = y / ref
    best, best_res = np.zeros(4), float(np.sum(target**2))
    for mask in range(1, 16):
        cols = [i for i in range(4) if mask >> i & 1]
        sol, *_ = np.linalg.lstsq(design[:, cols], target, rcond=None)
        if np.any(sol < -1e-12):
            continue
        coef = np.zeros(4)
        coef[cols] = np.maximum(sol, 0.0)
        res = float(np.sum((design @ coef - target) ** 2))
        if res < best_res:
            best, best_res = coef, res
    return best / scale ** np.arange(4)


def fit_error_report(model: CostModel, held_out: Sequence[tuple[int, float]]) -> dict[str, float | int | None]:
    """``{"median_rel", "p90_rel", "n_heldout"}`` of ``|pred - y| / y`` (p90 linearly interpolated);
    the errors are None when there are no held-out points."""
    errs = [abs(model.predict(n) - y) / y for n, y in held_out]
    if not errs:
        return {"median_rel": None, "p90_rel": None, "n_heldout": 0}
    return {
        "median_rel": float(np.median(errs)),
        "p90_rel": float(np.percentile(errs, 90)),
        "n_heldout": len(errs),
    }


def fit_cost_model(
    samples: Sequence[tuple[int, float]],
    *,
    held_out: Sequence[tuple[int, float]] = (),
    chunk_tokens: int = 8192,
    outlier_k: float = DEFAULT_OUTLIER_K,
    floor_s: float = 1e-6,
    model: str = "",
    dtype: str = "",
    device: str = "",
    hardware: str = "",
    created_at: str = "",
) -> CostModel:
    """Fit a :class:`CostModel` to ``(n_tokens, seconds)`` samples.

    Non-negative cubic least squares on residuals relative to the fit (weights ``1/y``, then
    three IRLS rounds with weights ``1/f(n)`` so that low and high outliers pull alike). Outlier
    rejection: while more than 5 points remain and under 20% were dropped, the worst point is
    dropped and the fit redone if its relative residual deviates from the median residual by
    more than ``outlier_k * max(MAD, 1%)``. ``max_profiled_tokens`` is the largest kept length.
    ``fit_error`` is :func:`fit_error_report` on ``held_out`` (never fitted on) plus
    ``n_outliers``. ``created_at`` comes from the caller (this package never reads the clock).
    """
    pts = [(int(n), float(y)) for n, y in samples]
    for n, y in [*pts, *held_out]:
        if n < 1 or not (math.isfinite(y) and y > 0):
            raise CostModelError(f"invalid sample ({n!r}, {y!r}): need n >= 1 and seconds > 0")
    if len({n for n, _ in pts}) < 2:
        raise CostModelError("need samples at at least 2 distinct lengths")
    ns = np.array([n for n, _ in pts], dtype=np.float64)
    ys = np.array([y for _, y in pts], dtype=np.float64)
    keep = np.ones(len(pts), dtype=bool)
    max_drops = int(0.2 * len(pts))
    while True:
        coef = _nnls_relative(ns[keep], ys[keep], ys[keep])
        for _ in range(3):  # IRLS: relative to the fit, so low outliers do not get extra weight
            ref = np.maximum(np.polynomial.polynomial.polyval(ns, coef), floor_s)
            coef = _nnls_relative(ns[keep], ys[keep], ref[keep])
        if keep.sum() <= 5 or (~keep).sum() >= max_drops:
            break
        pred = np.maximum(np.polynomial.polynomial.polyval(ns, coef), floor_s)
        rel = (ys - pred) / pred
        dev = np.abs(rel - np.median(rel[keep]))
        mad = max(float(np.median(dev[keep])), _MIN_MAD)
        worst = int(np.argmax(np.where(keep, dev, -1.0)))
        if dev[worst] <= outlier_k * mad:
            break
        keep[worst] = False
    fitted = CostModel(
        a=float(coef[0]), b=float(coef[1]), c=float(coef[2]), d=float(coef[3]),
        max_profiled_tokens=int(ns[keep].max()), chunk_tokens=chunk_tokens, floor_s=floor_s,
        model=model, dtype=dtype, device=device, hardware=hardware, created_at=created_at,
    )  # fmt: skip
    report = fit_error_report(fitted, [(int(n), float(y)) for n, y in held_out])
    report["n_outliers"] = int((~keep).sum())
    return CostModel(**{**{f.name: getattr(fitted, f.name) for f in fields(fitted) if f.init}, "fit_error": report})


def default_profile_lengths(max_tokens: int) -> list[int]:
    """Geometric spacing from 16 (or ``max_tokens`` if smaller) to ``max_tokens``: 12-20 points,
    about two per doubling, rounded to multiples of 8 above 64; always ends at ``max_tokens``."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lo = min(16, max_tokens)
    count = min(20, max(12, 2 * math.ceil(math.log2(max_tokens / lo)) + 1))
    out: set[int] = set()
    for v in np.geomspace(lo, max_tokens, count):
        iv = int(round(v))
        out.add(iv if iv <= 64 else int(round(v / 8)) * 8)
    out.add(max_tokens)
    return sorted(v for v in out if 1 <= v <= max_tokens)


def profile_prefill(
    measure: Callable[[int], float],
    lengths: Sequence[int],
    *,
    repeats: int = 3,
    holdout_every: int = 4,
    warmup: int = 1,
    progress: bool = True,
    **fit_kw: Any,
) -> CostModel:
    """Profile ``measure(n) -> seconds`` (supplied by the engine) and fit a :class:`CostModel`.

    ``warmup`` discarded calls at the first length, then ``repeats`` calls per length (median
    kept). Every ``holdout_every``-th length (1-based; never the first or last, 0 disables) is
    held back for ``fit_error``. ``fit_kw`` go to :func:`fit_cost_model` (metadata, chunk size).
    """
    lens = sorted({int(n) for n in lengths})
    if repeats < 1 or not lens or lens[0] < 1:
        raise ValueError("need repeats >= 1 and at least one length >= 1")
    for _ in range(warmup):
        measure(lens[0])
    train: list[tuple[int, float]] = []
    held: list[tuple[int, float]] = []
    with tqdm(total=len(lens) * repeats, desc="profiling prefill", disable=not progress) as bar:
        for i, n in enumerate(lens):
            times = []
            for _ in range(repeats):
                times.append(float(measure(n)))
                bar.update(1)
            hold = holdout_every > 0 and 0 < i < len(lens) - 1 and (i + 1) % holdout_every == 0
            (held if hold else train).append((n, statistics.median(times)))
    return fit_cost_model(train, held_out=held, **fit_kw)


def profile_file_name(model: str, dtype: str, device: str, hardware: str, cpu_threads: int | None) -> str:
    """File name of a cached profile. A CPU profile depends on the compute threads it ran with, so
    their count is part of the name (a 2-thread profile would be 1.6-1.9x optimistic for 1 thread)."""
    key = f"{model}-{dtype}-{device}-{hardware}"
    if _norm_device(device) == "cpu" and cpu_threads is not None:
        key += f"-t{cpu_threads}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".json"


def detect_hardware(device: str) -> str:
    """Hardware name for metadata: the CUDA device name, else the CPU model from /proc/cpuinfo."""
    if _norm_device(device) == "cuda":
        import torch  # lazy: only the device name is read, no tensors

        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown-cpu"
