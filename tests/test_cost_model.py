"""Tests for the TTFT cost model (replicas/scheduler/cost_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from replicas.cost_profiling import default_profile_lengths, profile_prefill
from replicas.scheduler.cost_fit import fit_cost_model
from replicas.scheduler.cost_model import SCHEMA_VERSION, CostModel, CostModelError, analytic_cost_model

TRUE = (0.012, 2.5e-5, 1.5e-9, 4e-14)  # a, b, c, d: 0.012 s at n=0, ~0.27 s at n=8192


def truth(n: float) -> float:
    a, b, c, d = TRUE
    return a + b * n + c * n**2 + d * n**3


def noisy_samples(seed: int = 0, noise: float = 0.01, repeats: int = 3) -> list[tuple[int, float]]:
    rng = np.random.default_rng(seed)
    return [
        (n, truth(n) * (1.0 + noise * rng.standard_normal()))
        for n in default_profile_lengths(8192)
        for _ in range(repeats)
    ]


def dense_grid(hi: int) -> np.ndarray:
    return np.unique(np.concatenate([np.arange(1, 600), np.linspace(1, hi, 4000).astype(int)]))


def test_fit_recovers_known_cubic() -> None:
    m = fit_cost_model(noisy_samples())
    for n in [16, 100, 500, 1000, 2000, 4000, 6000, 8192]:
        assert m.predict(n) == pytest.approx(truth(n), rel=0.03)
    assert m.max_profiled_tokens == 8192 and min(m.a, m.b, m.c, m.d) >= 0


@pytest.mark.parametrize("factor,pos", [(4.0, 2048), (0.25, 2048), (4.0, 8192), (0.2, 64)])
def test_gross_outlier_dropped(factor: float, pos: int) -> None:
    samples = noisy_samples(seed=1, repeats=1)
    idx = next(i for i, (n, _) in enumerate(samples) if n == pos)
    samples[idx] = (pos, truth(pos) * factor)
    m = fit_cost_model(samples)
    assert m.fit_error["n_outliers"] == 1
    for n in [pos, 64, 1024, 4096, 8192]:
        assert m.predict(n) == pytest.approx(truth(n), rel=0.05)
    # without rejection the outlier would visibly bend the fit
    assert fit_cost_model(samples, outlier_k=1e9).predict(pos) != pytest.approx(truth(pos), rel=0.05)


def test_monotone_with_dip_in_data() -> None:
    pts = [(n, truth(n)) for n in default_profile_lengths(8192)]
    pts = [(n, y * (0.6 if n in (2048, 2896) else 1.0)) for n, y in pts]  # a pronounced dip
    m = fit_cost_model(pts, outlier_k=1e9)  # keep the dip in the fit
    preds = np.array([m.predict(int(n)) for n in dense_grid(8192)])
    assert np.all(np.diff(preds) >= 0.0)
    assert preds.min() >= m.floor_s > 0


def test_floor_applies_when_intercept_is_zero() -> None:
    m = analytic_cost_model(0.0, 1e-9, floor_s=1e-4)
    assert m.predict(1) == 1e-4 and m.predict(0) == 0.0


@pytest.mark.parametrize("max_profiled,chunk", [(8192, 8192), (4096, 8192), (8192, 2048)])
def test_extrapolation_monotone_and_superlinear(max_profiled: int, chunk: int) -> None:
    m = analytic_cost_model(*TRUE, max_profiled_tokens=max_profiled, chunk_tokens=chunk)
    span = min(max_profiled, chunk)
    grid = np.unique(np.concatenate([np.linspace(1, 12 * span, 6000).astype(int), [span, span + 1]]))
    preds = np.array([m.predict(int(n)) for n in grid])
    assert np.all(np.diff(preds) >= 0.0)
    per_token = m.predict(span) / span
    assert np.all(preds[grid > span] >= per_token * grid[grid > span] * (1 - 1e-12))
    # continuous from the left at chunk boundaries
    for q in (2, 3, 7):
        assert m.predict(q * span - 1) == pytest.approx(m.predict(q * span), rel=1e-3)


def test_extrapolation_formula_matches_quadratic() -> None:
    # With d = 0 the chunked cost equals a per chunk plus the single-pass b*n + c*n^2.
    m = analytic_cost_model(0.01, 2e-5, 1e-9, 0.0, max_profiled_tokens=1000, chunk_tokens=1000)
    n = 3500
    assert m.predict(n) == pytest.approx(4 * 0.01 + 2e-5 * n + 1e-9 * n * n, rel=1e-12)


def test_predict_batch() -> None:
    m = analytic_cost_model(*TRUE)
    for n in (1, 37, 8192, 20000):
        assert m.predict_batch([n]) == m.predict(n)
    assert m.predict_batch([]) == 0.0
    lens = [100, 200, 300]
    a, b, c, d = TRUE
    expect = a + b * 600 + sum(c * x**2 + d * x**3 for x in lens)
    assert m.predict_batch(lens) == pytest.approx(expect, rel=1e-12)
    assert max(m.predict(x) for x in lens) <= m.predict_batch(lens) <= m.predict(600)


def test_predict_memo_returns_what_it_computes() -> None:
    model = analytic_cost_model(*TRUE, max_profiled_tokens=4096, chunk_tokens=2048)
    fresh = analytic_cost_model(*TRUE, max_profiled_tokens=4096, chunk_tokens=2048)
    lengths = [-3, 0, 1, 7, 2048, 2049, 4096, 9000, 7, 9000, 1]
    first = [model.predict(n) for n in lengths]
    again = [model.predict(n) for n in lengths]
    assert first == again == [fresh._predict(n) for n in lengths]  # bit for bit, cached or not
    assert model == fresh and "_memo" not in model.to_dict() and "_memo" not in repr(model)
    assert CostModel.from_dict(model.to_dict()).predict(9000) == first[-2]


def test_predict_remaining() -> None:
    m = analytic_cost_model(*TRUE)
    assert m.predict_remaining(1000, 0.0) == m.predict(1000)
    assert m.predict_remaining(1000, 0.25) == pytest.approx(0.75 * m.predict(1000))
    assert m.predict_remaining(1000, 1.5) == 0.0


def test_save_load_round_trip(tmp_path: Path) -> None:
    m = fit_cost_model(
        noisy_samples(),
        held_out=[(3000, truth(3000))],
        model="smollm2-135m",
        dtype="bfloat16",
        device="cuda:0",
        hardware="NVIDIA H200",
        created_at="2025-01-01T00:00:00Z",
    )
    path = tmp_path / "sub" / "cost.json"
    m.save(path)
    loaded = CostModel.load(path)
    assert loaded == m
    assert loaded.predict(5000) == m.predict(5000)
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert CostModel.from_json(m.to_json()) == m
    assert loaded.matches("smollm2-135m", "torch.bfloat16", "cuda", "NVIDIA H200")
    assert not loaded.matches("smollm2-135m", "float16", "cuda", "NVIDIA H200")
    assert not loaded.matches("smollm2-135m", "bfloat16", "cpu", "NVIDIA H200")


@pytest.mark.parametrize(
    "field,value",
    [("b", None), ("b", "fast"), ("c", -1.0), ("chunk_tokens", 8.5), ("chunk_tokens", True),
     ("model", 3), ("fit_error", [1]), ("fit_error", {"median_rel": "x"}), ("schema_version", 99)],
)  # fmt: skip
def test_load_rejects_bad_field(tmp_path: Path, field: str, value: object) -> None:
    data = analytic_cost_model(*TRUE).to_dict()
    data[field] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CostModelError, match=field) as info:
        CostModel.load(path)
    assert str(path) in str(info.value) and info.value.field == field


@pytest.mark.parametrize("field", ["a", "max_profiled_tokens", "hardware", "fit_error"])
def test_load_rejects_missing_field(tmp_path: Path, field: str) -> None:
    data = analytic_cost_model(*TRUE).to_dict()
    del data[field]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CostModelError, match=f"'{field}'") as info:
        CostModel.load(path)
    assert str(path) in str(info.value)


def test_load_rejects_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(CostModelError, match="x.json"):
        CostModel.load(path)
    with pytest.raises(ValueError):
        CostModel.load(tmp_path / "absent.json")


def test_fit_error_matches_hand_computation() -> None:
    held = [(300, truth(300) * 1.10), (1500, truth(1500) * 0.95), (3000, truth(3000)), (5000, 0.5)]
    m = fit_cost_model(noisy_samples(), held_out=held)
    errs = sorted(abs(m.predict(n) - y) / y for n, y in held)
    median = (errs[1] + errs[2]) / 2
    p90 = errs[2] + 0.7 * (errs[3] - errs[2])  # linear interpolation at rank 0.9 * (4 - 1) = 2.7
    assert m.fit_error["n_heldout"] == 4
    assert m.fit_error["median_rel"] == pytest.approx(median, rel=1e-12)
    assert m.fit_error["p90_rel"] == pytest.approx(p90, rel=1e-12)
    no_heldout = {"median_rel": None, "p90_rel": None, "n_heldout": 0, "n_outliers": 0}
    assert fit_cost_model(noisy_samples()).fit_error == no_heldout


def test_profile_prefill_holdout_and_median() -> None:
    calls: list[int] = []
    rng = np.random.default_rng(3)

    def measure(n: int) -> float:
        calls.append(n)
        return truth(n) * (1.0 + 0.005 * rng.standard_normal())

    lengths = default_profile_lengths(8192)
    m = profile_prefill(measure, lengths, repeats=3, holdout_every=4, progress=False, model="m", hardware="h")
    assert len(calls) == 1 + 3 * len(lengths)  # one warm-up call
    assert m.fit_error["n_heldout"] == len([i for i in range(1, len(lengths) - 1) if (i + 1) % 4 == 0])
    assert m.fit_error["p90_rel"] < 0.03
    assert m.max_profiled_tokens == 8192 and m.model == "m" and m.hardware == "h"


def test_default_profile_lengths() -> None:
    for hi in (512, 2048, 8192, 32768):
        lens = default_profile_lengths(hi)
        assert 12 <= len(lens) <= 20 and lens[0] == 16 and lens[-1] == hi
        assert lens == sorted(set(lens))
    assert default_profile_lengths(10) == [10]


def test_invalid_inputs() -> None:
    with pytest.raises(CostModelError):
        fit_cost_model([(100, 0.1)])
    with pytest.raises(CostModelError):
        fit_cost_model([(100, 0.1), (200, -1.0)])
    with pytest.raises(CostModelError, match="chunk_tokens"):
        analytic_cost_model(*TRUE, max_profiled_tokens=8192, chunk_tokens=0)
