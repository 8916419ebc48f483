"""Profiling the TTFT cost model: the measurement loop, its lengths, hardware names and cache files.

The engine supplies ``measure(n) -> seconds`` (:mod:`replicas.profiling` for the native engine,
:mod:`replicas.vllm_profile` for vLLM); :func:`profile_prefill` runs it with a progress bar and
fits the model (:func:`~replicas.scheduler.cost_fit.fit_cost_model`). Kept out of
:mod:`replicas.scheduler` so the scheduler and the router's placement never load tqdm.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from replicas.scheduler.cost_fit import fit_cached_kappa, fit_cost_model
from replicas.scheduler.cost_model import CostModel, norm_device


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


def cached_context_pairs(max_tokens: int) -> list[tuple[int, int]]:
    """``(new tokens, cached tokens)`` pairs to profile attention over cached KV: new 16, 1/16 and 1/4
    of ``max_tokens`` after 1/8, 1/4 and 1/2 of it cached (pairs past ``max_tokens`` left out)."""
    cached = sorted({max(1, max_tokens // k) for k in (8, 4, 2)})
    new = sorted({min(16, max_tokens), max(1, max_tokens // 16), max(1, max_tokens // 4)})
    return [(n, c) for c in cached for n in new if n + c <= max_tokens]


def profile_prefill(
    measure: Callable[[int], float],
    lengths: Sequence[int],
    *,
    repeats: int = 3,
    holdout_every: int = 4,
    warmup: int = 1,
    progress: bool = True,
    measure_cached: Callable[[int, int], float] | None = None,
    cached_pairs: Sequence[tuple[int, int]] = (),
    **fit_kw: Any,
) -> CostModel:
    """Profile ``measure(n) -> seconds`` (supplied by the engine) and fit a :class:`CostModel`.

    ``warmup`` discarded calls at the first length, then ``repeats`` calls per length (median
    kept). Every ``holdout_every``-th length (1-based; never the first or last, 0 disables) is
    held back for ``fit_error``. ``fit_kw`` go to :func:`fit_cost_model` (metadata, chunk size).
    With ``measure_cached(n, c) -> seconds`` (``n`` new tokens after ``c`` cached ones) the
    ``cached_pairs`` are measured too and fit ``cached_kappa`` (every third pair held out).
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
    model = fit_cost_model(train, held_out=held, **fit_kw)
    if measure_cached is None or not cached_pairs:
        return model
    samples: list[tuple[int, int, float]] = []
    held_cached: list[tuple[int, int, float]] = []
    with tqdm(total=len(cached_pairs) * repeats, desc="profiling cached context", disable=not progress) as bar:
        for i, (n, c) in enumerate(cached_pairs):
            times = []
            for _ in range(repeats):
                times.append(float(measure_cached(n, c)))
                bar.update(1)
            (held_cached if i % 3 == 2 else samples).append((n, c, statistics.median(times)))
    return fit_cached_kappa(model, samples, held_cached)


def profile_file_name(model: str, dtype: str, device: str, hardware: str, cpu_threads: int | None) -> str:
    """File name of a cached profile. A CPU profile depends on the compute threads it ran with, so
    their count is part of the name (a 2-thread profile would be 1.6-1.9x optimistic for 1 thread)."""
    key = f"{model}-{dtype}-{device}-{hardware}"
    if norm_device(device) == "cpu" and cpu_threads is not None:
        key += f"-t{cpu_threads}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".json"


def detect_hardware(device: str) -> str:
    """Hardware name for metadata: the CUDA device name, else the CPU model from /proc/cpuinfo."""
    if norm_device(device) == "cuda":
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
