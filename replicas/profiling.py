"""Profiling this replica's prefill latency into a TTFT cost model, and finding a stored one.

The scheduler's :mod:`~replicas.scheduler.cost_model` holds the maths; this module supplies the
measurement (a real prefill through the model, KV cache and executor) and the profile cache:
``$FLOWPREFILL_CACHE/profiles/<model>-<dtype>-<device>-<hardware>.json``.
"""

from __future__ import annotations

import datetime
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from replicas.cost_profiling import (
    cached_context_pairs,
    default_profile_lengths,
    detect_hardware,
    profile_file_name,
    profile_prefill,
)
from replicas.executor import PreemptibleExecutor
from replicas.kv_cache import PagedKVCache
from replicas.model.decoder import DecoderModel
from replicas.programs import PrefillItem, prefill_program
from replicas.scheduler.config import DEFAULT_CHUNK_TOKENS
from replicas.scheduler.cost_model import CostModel, CostModelError


def prefill_timer(model: DecoderModel, max_tokens: int, seed: int = 0) -> Callable[[int], float]:
    """``measure(n) -> seconds`` for one uninterrupted prefill of ``n`` random tokens."""
    spec = model.kv_spec()
    kv = PagedKVCache(spec, -(-max_tokens // spec.block_size) + 1, model.device)
    executor = PreemptibleExecutor("none", device=model.device)
    rng = random.Random(seed)

    def measure(n: int) -> float:
        ids = [rng.randrange(model.config.vocab_size) for _ in range(n)]
        kv.allocator.ensure_capacity(0, n)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        executor.run_to_completion(prefill_program(model, kv, [PrefillItem(0, ids, want_logits=True)]))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        elapsed = time.perf_counter() - start
        kv.allocator.free(0)
        return elapsed

    return measure


def cached_prefill_timer(model: DecoderModel, max_tokens: int, seed: int = 1) -> Callable[[int, int], float]:
    """``measure(n, c) -> seconds`` for prefilling ``n`` new tokens after ``c`` tokens whose KV is
    already cached (the context is prefilled first, untimed)."""
    spec = model.kv_spec()
    kv = PagedKVCache(spec, -(-max_tokens // spec.block_size) + 1, model.device)
    executor = PreemptibleExecutor("none", device=model.device)
    rng = random.Random(seed)

    def measure(n: int, c: int) -> float:
        ids = [rng.randrange(model.config.vocab_size) for _ in range(n + c)]
        kv.allocator.ensure_capacity(0, n + c)
        executor.run_to_completion(prefill_program(model, kv, [PrefillItem(0, ids, 0, c, want_logits=False)]))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        executor.run_to_completion(prefill_program(model, kv, [PrefillItem(0, ids, c, c + n, want_logits=True)]))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        elapsed = time.perf_counter() - start
        kv.allocator.free(0)
        return elapsed

    return measure


def profile_model(
    model: DecoderModel, *, max_tokens: int = 4096, repeats: int = 2, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
) -> CostModel:
    """Measure prefill latency over input lengths up to ``max_tokens`` (alone, and after cached
    context) and fit a cost model."""
    device = str(model.device)
    return profile_prefill(
        prefill_timer(model, max_tokens), default_profile_lengths(max_tokens), repeats=repeats,
        progress=progress, measure_cached=cached_prefill_timer(model, max_tokens),
        cached_pairs=cached_context_pairs(max_tokens), chunk_tokens=chunk_tokens, model=model.name,
        dtype=_dtype_name(model), device=device, hardware=detect_hardware(device),
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def _dtype_name(model: DecoderModel) -> str:
    return str(model.dtype).removeprefix("torch.")


def profile_cache_path(model: DecoderModel, cache_dir: Path | None = None) -> Path:
    """Where a profile of ``model`` on this hardware is stored."""
    root = cache_dir or Path(os.environ.get("FLOWPREFILL_CACHE", Path.home() / ".cache" / "flowprefill"))
    threads = torch.get_num_threads() if model.device.type == "cpu" else None
    return root / "profiles" / profile_file_name(model.name, _dtype_name(model), model.device.type,
                                                 detect_hardware(str(model.device)), threads)


def load_or_profile(
    model: DecoderModel, path: str | Path | None = None, *, max_tokens: int = 2048, repeats: int = 1,
    progress: bool = True,
) -> CostModel:
    """The cost model at ``path`` (must match this model and hardware), else a cached one, else profile now.

    An explicit ``path`` that does not match is an error; a stale cache entry is re-profiled.
    """
    device = str(model.device)
    hardware = detect_hardware(device)
    if path is not None:
        cost = CostModel.load(path)
        if not cost.matches(model.name, _dtype_name(model), device, hardware):
            raise CostModelError(
                f"profile is for {cost.model}/{cost.dtype}/{cost.device} on {cost.hardware!r}, this replica runs "
                f"{model.name}/{_dtype_name(model)}/{device} on {hardware!r}", source=str(path), field="model",
            )
        return cost
    cached = profile_cache_path(model)
    if cached.is_file():
        try:
            cost = CostModel.load(cached)
            # a profile from before cached-context profiling prices prefix-cache hits coarsely: measure again
            if cost.matches(model.name, _dtype_name(model), device, hardware) and cost.cached_kappa is not None:
                return cost
        except CostModelError:
            pass  # a damaged cache entry is replaced below
    cost = profile_model(model, max_tokens=max_tokens, repeats=repeats, progress=progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cost.save(cached)
    return cost
