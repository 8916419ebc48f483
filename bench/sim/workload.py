"""Workloads for the cluster simulator: trace windows tiled so that load grows with the replica count.

For ``N`` replicas the workload superimposes ``N`` copies of one trace window (the window ``bench
policies`` replays: the first ``requests_per_copy`` requests from ``window_start_s``), each copy
but the first shifted circularly in time by a seeded random offset. Every copy has the window's
request mix and burst pattern, so the load per replica is the same at every ``N`` and only the
multiplexing of ``N`` independent bursty streams changes. Large ``N`` can simulate a shorter
horizon of the tiled copies (``max_requests``): the mix and the rate stay the same.

Lengths are scaled like ``bench policies`` (``length_scale``, outputs capped at
``max_output_tokens``); SLO classes and per-request TTFT SLOs come from
:mod:`bench.slo_classes` with the same seeded, length-scaled rule as the in-process benchmark.

**Shared prefixes.** When the trace names its prompts' blocks (Mooncake ``hash_ids``, or the
multi-turn generator's), each request gets a synthetic prompt in which a block id always stands for
the same tokens, and the engine's block names of it (:func:`replicas.prefix_hash.block_names`, in
``block_size``-token blocks) plus its routing names: the simulated replicas' prefix caches and the
simulated router see exactly the sharing the trace describes. Each tiled copy gets its own block
ids (copies are independent users: they share nothing with each other).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.slo_classes import DEFAULT_REF_TOKENS, LengthRule, assign_classes, classes_for_predictor, ttft_slo_for
from bench.traces import Trace, TraceRequest
from replicas.prefix_hash import BlockName, block_names, routing_names
from replicas.prefix_tracker import ROUTING_STRIDE

SIM_SALT = "sim"  # the simulated replicas' block-name salt (one model everywhere)


@dataclass(frozen=True)
class SimWorkload:
    """Requests at rate scale 1, column-wise (arrival-sorted); ``span_s`` is the replay window."""

    arrival_s: tuple[float, ...]
    tokens: tuple[int, ...]
    max_tokens: tuple[int, ...]
    ttft_slo_s: tuple[float, ...]
    priority: tuple[int, ...]
    slo_class: tuple[str, ...]
    sheddable: tuple[bool, ...]
    cost_s: tuple[float, ...]  # predicted isolated prefill seconds
    span_s: float
    copies: int = 1
    source: str = ""
    block_names: tuple[tuple[BlockName, ...], ...] | None = None  # per request, with shared prefixes
    routing_names: tuple[tuple[str, ...], ...] | None = None
    tpot_slo_s: tuple[float | None, ...] | None = None  # per request (None: no TPOT SLO anywhere)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def rate_rps(self) -> float:
        """Requests per second at rate scale 1."""
        return len(self) / self.span_s if self.span_s > 0 else 0.0

    @property
    def work_s(self) -> float:
        """Predicted prefill seconds of all requests (isolated)."""
        return sum(self.cost_s)


def window_trace(trace: Trace, window_start_s: float, window_s: float | None, requests: int) -> Trace:
    """The base window: ``window_s`` seconds from ``window_start_s``, or (``window_s=None``) the first
    ``requests`` requests from there, as ``bench policies`` takes its window."""
    if window_s is not None:
        return trace.window(window_start_s, window_s)
    return trace.window(window_start_s, trace.duration_s - window_start_s + 1.0).head(requests)


def tile_window(window: Trace, copies: int, *, seed: int = 0, horizon_s: float | None = None) -> tuple[Trace, float]:
    """``copies`` superimposed copies of ``window``, copy ``i > 0`` shifted circularly by a seeded uniform
    offset within the window's period (its span plus one mean gap); copy 0 is the window itself.

    ``horizon_s`` (default: the period) keeps only arrivals before it. Returns the trace and its span.
    """
    if copies < 1 or len(window) == 0:
        raise ValueError(f"need copies >= 1 and a non-empty window, got {copies}, {len(window)} requests")
    reqs = window.requests
    first = reqs[0].arrival_s
    period = window.duration_s * len(reqs) / max(len(reqs) - 1, 1) if len(reqs) > 1 else 1.0
    horizon = period if horizon_s is None else min(horizon_s, period)
    rng = random.Random(seed)
    ids_per_copy = 1 + max((max(r.hash_ids) for r in reqs if r.hash_ids), default=-1)
    out: list[TraceRequest] = []
    for i in range(copies):
        shift = 0.0 if i == 0 else rng.uniform(0.0, period)
        base = i * ids_per_copy  # each copy its own block ids: independent users share nothing
        for r in reqs:
            t = (r.arrival_s - first + shift) % period
            if t < horizon:
                ids = None if r.hash_ids is None else tuple(base + h for h in r.hash_ids)
                out.append(TraceRequest(t, r.input_tokens, r.output_tokens, ids))
    out.sort(key=lambda r: r.arrival_s)
    return Trace(tuple(out), f"{window.source}|tile({copies},seed={seed},horizon={horizon:g})",
                 window.block_tokens), horizon


def block_tokens_of(block_id: int, count: int) -> list[int]:
    """The synthetic tokens a trace block id stands for (its first ``count``): the same in every prompt."""
    return [(block_id * 2_654_435_761 + j * 40_503) % 49_999 + 1 for j in range(count)]


def prefix_names(trace: Trace, block_size: int, stride: int) -> tuple[tuple[tuple[BlockName, ...], ...],
                                                                       tuple[tuple[str, ...], ...]]:
    """Every request's block names and routing names (empty for a request without block ids)."""
    bt = trace.block_tokens or 1
    names_out, routing_out = [], []
    for r in trace.requests:
        if r.hash_ids is None:
            names_out.append(())
            routing_out.append(())
            continue
        tokens: list[int] = []
        for k, h in enumerate(r.hash_ids):
            tokens.extend(block_tokens_of(h, min(bt, r.input_tokens - k * bt)))
        names = block_names(tokens[:r.input_tokens], block_size, SIM_SALT)
        names_out.append(tuple(names))
        routing_out.append(tuple(routing_names(names, stride)))
    return tuple(names_out), tuple(routing_out)


def from_trace(trace: Trace, predict: Callable[[int], float], *, span_s: float, length_scale: float = 1 / 16,
               max_output_tokens: int | None = 4, seed: int = 0, copies: int = 1, block_size: int = 16,
               stride: int = ROUTING_STRIDE, tpot_slo_s: float | None = None) -> SimWorkload:
    """Scale lengths and assign SLO classes exactly as ``bench.policy_bench.build_workload`` does
    (and name shared prefixes, see the module docstring); ``tpot_slo_s``: every class's TPOT SLO
    (:func:`~bench.slo_classes.classes_for_predictor`'s), None for none."""
    if tpot_slo_s is not None and not (math.isfinite(tpot_slo_s) and tpot_slo_s > 0):
        raise ValueError(f"tpot_slo_s: must be a positive number of seconds, got {tpot_slo_s!r}")
    trace = trace.scale_lengths(length_scale, max_output=max_output_tokens)
    if len(trace) == 0:
        raise ValueError("the workload window holds no requests; widen --window-s")
    ref_tokens = max(int(DEFAULT_REF_TOKENS * length_scale), 1)
    classes = classes_for_predictor(predict, ref_tokens=ref_tokens, tpot_slo_s=tpot_slo_s)
    by_name = {c.name: c for c in classes}
    names = assign_classes(trace, classes, seed=seed, rule=LengthRule().scaled(length_scale))
    reqs = trace.requests
    return SimWorkload(
        arrival_s=tuple(r.arrival_s for r in reqs),
        tokens=tuple(r.input_tokens for r in reqs),
        max_tokens=tuple(max(r.output_tokens, 1) for r in reqs),
        ttft_slo_s=tuple(ttft_slo_for(r.input_tokens, by_name[n], predict) for r, n in zip(reqs, names)),
        priority=tuple(by_name[n].priority for n in names),
        slo_class=tuple(names),
        sheddable=tuple(by_name[n].sheddable for n in names),
        cost_s=tuple(predict(r.input_tokens) for r in reqs),
        span_s=span_s, copies=copies, source=trace.source,
        tpot_slo_s=None if tpot_slo_s is None else tuple(by_name[n].tpot_slo_s for n in names),
        **(dict(zip(("block_names", "routing_names"), prefix_names(trace, block_size, stride)))
           if trace.has_prefixes else {}),
    )


def cluster_workload(trace: Trace, predict: Callable[[int], float], copies: int, *, window_start_s: float = 0.0,
                     window_s: float | None = None, requests_per_copy: int = 60, max_requests: int | None = None,
                     seed: int = 0, **kw: Any) -> SimWorkload:
    """The tiled workload for ``copies`` replicas. When ``copies`` times the window's requests exceed
    ``max_requests``, a shorter horizon of the tiled copies is simulated (same mix, same load)."""
    window = window_trace(trace, window_start_s, window_s, requests_per_copy)
    if len(window) < 2:
        raise ValueError(f"trace window holds {len(window)} requests; widen --window-s")
    horizon = None
    if max_requests is not None and copies * len(window) > max_requests:
        horizon = window.duration_s * max_requests / (copies * len(window))
    tiled, span = tile_window(window, copies, seed=seed, horizon_s=horizon)
    return from_trace(tiled, predict, span_s=span, copies=copies, seed=seed, **kw)


def explicit_workload(arrival_s: Sequence[float], tokens: Sequence[int], ttft_slo_s: Sequence[float],
                      predict: Callable[[int], float], *, max_tokens: Sequence[int] | None = None,
                      priority: Sequence[int] | None = None, slo_class: Sequence[str] | None = None,
                      sheddable: Sequence[bool] | None = None, span_s: float | None = None,
                      tpot_slo_s: Sequence[float | None] | None = None) -> SimWorkload:
    """A workload from columns (tests, validation); defaults: one output token, priority 0, not
    sheddable, no TPOT SLO."""
    n = len(arrival_s)
    if not (len(tokens) == len(ttft_slo_s) == n) or n == 0:
        raise ValueError("explicit_workload: columns must be non-empty and of equal length")
    if tpot_slo_s is not None and len(tpot_slo_s) != n:
        raise ValueError(f"explicit_workload: tpot_slo_s has {len(tpot_slo_s)} values for {n} requests")
    order = sorted(range(n), key=lambda i: arrival_s[i])

    def col(values: Sequence | None, default: object) -> tuple:
        return tuple(values[i] for i in order) if values is not None else (default,) * n

    arr = col(arrival_s, 0.0)
    span = span_s if span_s is not None else max(arr[-1] - arr[0], 1e-9)
    return SimWorkload(arr, col(tokens, 1), col(max_tokens, 1), col(ttft_slo_s, 1.0), col(priority, 0),
                       col(slo_class, "default"), col(sheddable, False),
                       tuple(predict(tokens[i]) for i in order), span_s=span if math.isfinite(span) else 1.0,
                       tpot_slo_s=None if tpot_slo_s is None else col(tpot_slo_s, None))
