"""The simulated executor's settings and prices: :class:`ExecConfig` (what the engine does that
the scheduler does not see) and the seconds a prefill program or a decode step costs."""

from __future__ import annotations

from dataclasses import dataclass

from replicas.scheduler.cost_model import CostModel


@dataclass(frozen=True)
class ExecConfig:
    """How the simulated executor behaves (the engine's settings that the scheduler does not see).

    ``boundary_delay_s``: mean wait from an arrival (or a due decode step) to the running
    program's next preemption point, i.e. the operator-boundary preemption latency.
    ``decode_step_s``: a fixed decode step time; None derives it from ``decode_curve``, else from the
    cost model. ``decode_curve``: ``(batch size, seconds)`` points of a measured decode step, in
    absolute seconds (``exec_time_scale`` does not apply to them).
    ``exec_time_scale``: execution runs this many times slower than the cost model predicts (the
    scheduler still plans with the cost model, as the engine does), e.g. a machine under load.
    ``seq_overhead_s``: extra seconds per sequence beyond the first in a prefill program or decode
    step (per-sequence operator launches that ``predict_batch`` does not charge).
    ``cache_blocks``: model the engine's prefix cache (the engine's own
    :class:`~replicas.kv_blocks.BlockAllocator` and :class:`~replicas.prefix_tracker.PrefixTracker`)
    in a pool of this many ``block_size``-token blocks, for requests that carry block names.
    """

    boundary_delay_s: float = 0.002
    default_tpot_slo_s: float = 0.5
    max_decoding: int = 64
    decode_step_s: float | None = None
    exec_time_scale: float = 1.0
    seq_overhead_s: float = 0.0
    decode_curve: tuple[tuple[int, float], ...] = ()
    cache_blocks: int = 0  # the replica's KV pool in blocks, with prefix caching (0: no prefix cache)
    block_size: int = 16
    cache_share: float = 1.0  # EngineConfig.prefix_cache_share

    def __post_init__(self) -> None:
        sizes = [k for k, _ in self.decode_curve]
        if sizes != sorted(set(sizes)) or any(k < 1 or s < 0 for k, s in self.decode_curve):
            raise ValueError(f"decode_curve: need increasing batch sizes >= 1 and seconds >= 0, got "
                             f"{self.decode_curve}")


def program_seconds(cost: CostModel, ranges: tuple[tuple[int, int], ...]) -> float:
    """Execution time of a prefill program computing these prompt slices: the scheduler's own price
    (:meth:`CostModel.predict_ranges`; a slice starting at ``s > 0`` attends to the KV before it)."""
    return cost.predict_ranges(ranges)


def decode_token_seconds(cost: CostModel, context: int) -> float:
    """Marginal cost of one more token at ``context`` tokens (what a decode step adds per sequence)."""
    return max(cost.predict_suffix(1, context) - cost.a, 0.0)


def decode_curve_seconds(curve: tuple[tuple[int, float], ...], batch: int) -> float:
    """A decode step of ``batch`` sequences on a measured curve: linear between its points, the first
    point's time below it, and the last segment's slope (never negative) beyond the last point."""
    if batch <= curve[0][0]:
        return curve[0][1]
    for (k0, s0), (k1, s1) in zip(curve, curve[1:]):
        if batch <= k1:
            return s0 + (s1 - s0) * (batch - k0) / (k1 - k0)
    if len(curve) == 1:
        return curve[0][1]
    (k0, s0), (k1, s1) = curve[-2], curve[-1]
    return s1 + max(s1 - s0, 0.0) * (batch - k1) / (k1 - k0)
