"""Fitting the TTFT cost model to measured ``(tokens, seconds)`` samples (numpy; no clock, no I/O).

A non-negative cubic fitted on relative residuals with iteratively reweighted least squares and
outlier rejection; :func:`fit_error_report` measures a model on held-out points. The model and its
formulas are :mod:`replicas.scheduler.cost_model`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields

import numpy as np

from replicas.scheduler.cost_model import CostModel, CostModelError

DEFAULT_OUTLIER_K = 5.0  # drop a point if |rel. residual - median| > k * MAD (k=5 ~ 3.4 sigma)
_MIN_MAD = 0.01  # MAD floor (relative): points within k*1% of the fit are never dropped


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


def fit_cached_kappa(model: CostModel, samples: Sequence[tuple[int, int, float]],
                     held_out: Sequence[tuple[int, int, float]] = ()) -> CostModel:
    """``model`` with ``cached_kappa`` fitted to ``(new tokens, cached tokens, seconds)`` samples.

    The residual ``y - predict(n)`` of each sample is the attention over its ``c`` cached tokens,
    modelled as ``kappa * n * c``; ``kappa >= 0`` minimises the squared residuals relative to ``y``
    (closed form). ``fit_error`` gains ``cached_median_rel`` / ``cached_p90_rel`` on ``held_out``
    (``|predict_suffix - y| / y``) and ``cached_samples``.
    """
    pts = [(int(n), int(c), float(y)) for n, c, y in samples]
    for n, c, y in [*pts, *held_out]:
        if n < 1 or c < 1 or not (math.isfinite(y) and y > 0):
            raise CostModelError(f"invalid cached-context sample ({n!r}, {c!r}, {y!r}): "
                                 "need n, c >= 1 and seconds > 0")
    if not pts:
        raise CostModelError("need at least one cached-context sample")
    x = np.array([n * c for n, c, _ in pts], dtype=np.float64)
    y = np.array([yy for _, _, yy in pts], dtype=np.float64)
    base = np.array([model.predict(n) for n, _, _ in pts], dtype=np.float64)
    w = 1.0 / y**2
    kappa = max(float(np.sum(w * x * (y - base)) / np.sum(w * x * x)), 0.0)
    kw = {f.name: getattr(model, f.name) for f in fields(model) if f.init}
    fitted = CostModel(**{**kw, "cached_kappa": kappa})
    errs = [abs(fitted.predict_suffix(n, c) - yy) / yy for n, c, yy in held_out]
    report = dict(model.fit_error)
    report.update(cached_median_rel=float(np.median(errs)) if errs else None,
                  cached_p90_rel=float(np.percentile(errs, 90)) if errs else None, cached_samples=len(pts))
    return CostModel(**{**kw, "cached_kappa": kappa, "fit_error": report})
