"""The vLLM engine's TTFT cost model: prefill latency measured through the vLLM server itself.

The same procedure as the native profiler (:mod:`replicas.profiling`): prompts of geometrically
spaced lengths (:func:`~replicas.cost_profiling.default_profile_lengths`), each timed as one
request with ``max_tokens=1`` (the time to the first token, HTTP included: what a client of the
replica sees), fitted by :func:`~replicas.cost_profiling.profile_prefill` (monotone cubic,
outliers dropped, held-out error in ``fit_error``).  Cached under
``$FLOWPREFILL_CACHE/profiles/<model>-<dtype>-vllm-b<budget>-t<threads>-<hardware>.json``: the
chunk budget and the thread count change vLLM's prefill speed as much as the hardware does.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from replicas.cost_profiling import default_profile_lengths, detect_hardware, profile_prefill
from replicas.scheduler.cost_model import CostModel, CostModelError

DEVICE = "cpu"  # vLLM's CPU build; the cache key says "vllm"


def profile_path(model: str, dtype: str, budget: int, threads: int, hardware: str | None = None,
                 cache_dir: Path | None = None) -> Path:
    """Where the vLLM profile of ``model`` with this chunk budget and thread count is cached."""
    root = cache_dir or Path(os.environ.get("FLOWPREFILL_CACHE", Path.home() / ".cache" / "flowprefill"))
    key = f"{model}-{dtype}-vllm-b{budget}-t{threads}-{hardware or detect_hardware(DEVICE)}"
    return root / "profiles" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".json")


def completion_timer(url: str, served_name: str, vocab_size: int, *, seed: int = 0,
                     timeout_s: float = 600.0) -> Callable[[int], float]:
    """``measure(n) -> seconds``: one ``max_tokens=1`` completion of ``n`` random token ids on ``url``."""
    rng = random.Random(seed)
    low = min(100, vocab_size // 2)  # skip the special tokens at the start of most vocabularies

    def measure(n: int) -> float:
        body = {"model": served_name, "prompt": [rng.randrange(low, vocab_size) for _ in range(n)],
                "max_tokens": 1, "temperature": 0.0, "ignore_eos": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - loopback only
                resp.read()
        except urllib.error.HTTPError as err:
            raise CostModelError(f"profiling request of {n} tokens failed: HTTP {err.code} "
                                 f"{err.read()[:300].decode(errors='replace')}", source=url) from None
        return time.perf_counter() - start

    return measure


def profile_vllm(url: str, served_name: str, vocab_size: int, *, model: str, dtype: str, max_tokens: int,
                 repeats: int = 1, progress: bool = False) -> CostModel:
    """Measure TTFT over prompt lengths up to ``max_tokens`` on the server at ``url`` and fit a cost model
    (after one discarded request at the longest length: the first batches of a new shape are slow)."""
    measure = completion_timer(url, served_name, vocab_size)
    measure(max_tokens)
    return profile_prefill(
        measure, default_profile_lengths(max_tokens), repeats=repeats,
        progress=progress, model=model, dtype=dtype, device=DEVICE, hardware=detect_hardware(DEVICE),
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def load_or_profile_vllm(url: str, served_name: str, vocab_size: int, *, model: str, dtype: str, budget: int,
                         threads: int, max_tokens: int, path: str | Path | None = None,
                         cache_dir: Path | None = None) -> CostModel:
    """The profile at ``path`` (must be for this model, dtype and hardware), else the cached one,
    else profile the running server now and cache it."""
    hardware = detect_hardware(DEVICE)
    if path is not None:
        cost = CostModel.load(path)
        if not cost.matches(model, dtype, DEVICE, hardware):
            raise CostModelError(f"profile is for {cost.model}/{cost.dtype} on {cost.hardware!r}, this replica runs "
                                 f"{model}/{dtype} on {hardware!r}", source=str(path), field="model")
        return cost
    cached = profile_path(model, dtype, budget, threads, hardware, cache_dir)
    if cached.is_file():
        try:
            cost = CostModel.load(cached)
            if cost.matches(model, dtype, DEVICE, hardware):
                return cost
        except CostModelError:
            pass  # a damaged cache entry is replaced below
    cost = profile_vllm(url, served_name, vocab_size, model=model, dtype=dtype, max_tokens=max_tokens)
    cost.save(cached)
    return cost
