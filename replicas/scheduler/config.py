"""Scheduler settings (one frozen dataclass), validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

POLICY_NAMES = ("flowprefill", "chunked", "fcfs")
GRANULARITIES = ("block", "op", "layer", "none")
#: Tokens per prefill pass: longer prompts run in passes of this many (the engine's programs), and the
#: cost model extrapolates beyond its span in chunks of this size.
DEFAULT_CHUNK_TOKENS = 8192


def _int_at_least(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"SchedulerConfig.{name}: expected an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Settings of the replica-local scheduler.

    Defaults follow the paper's reference code: ``alpha = 0.1`` (SLO-aware batching keeps the
    head a margin of ``alpha * ttft_slo``), short prompts are ``<= 2048`` tokens, a batch holds at
    most 8192 prompt tokens. ``chunk_tokens`` (C) is the chunk size of the ``chunked`` baseline
    (vLLM/Sarathi use 512). ``max_suspended_batches`` caps suspended work (memory held by
    suspended programs); at the cap, new work does not preempt. ``admission_control`` rejects
    sheddable requests that are predicted to miss their deadline at arrival. Overload admission
    (any class): ``late_reject_factor`` refuses a request predicted to reach its first token
    later than this multiple of its TTFT SLO (it could only be served uselessly late, taking
    capacity from requests that can still make it), and ``max_queued_work_s`` refuses arrivals
    while the replica holds more than this many predicted seconds of prefill work (a queue bound
    in time rather than count); None turns either off. ``urgent_reserve_window_s``: both refusals
    by lateness keep, for each request, the capacity that classes with tighter TTFT SLOs offered
    over this many recent seconds (:mod:`replicas.scheduler.urgent_reserve`); None keeps none.
    ``calibrate_cost`` scales every prediction
    by the measured slowdown of completed prefill programs (see
    :class:`~replicas.scheduler.calibration.CostCalibration`); off by default so that scheduling
    from an injected clock is a pure function of the events. ``granularity``
    (preemption points: ``block`` = two per layer, the paper's default, ``op``, ``layer``,
    ``none``) is only carried for the engine.
    """

    policy: str = "flowprefill"
    alpha: float = 0.1
    short_threshold: int = 2048
    batch_token_budget: int = 8192
    chunk_tokens: int = 512
    max_suspended_batches: int = 8
    admission_control: bool = False
    late_reject_factor: float | None = None
    max_queued_work_s: float | None = None
    urgent_reserve_window_s: float | None = 5.0
    calibrate_cost: bool = False
    granularity: str = "block"

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"SchedulerConfig.policy: unknown policy {self.policy!r}; expected one of {POLICY_NAMES}")
        a = self.alpha
        if not isinstance(a, int | float) or isinstance(a, bool) or not 0.0 <= a < 1.0:
            raise ValueError(f"SchedulerConfig.alpha: expected a number in [0, 1), got {a!r}")
        _int_at_least("short_threshold", self.short_threshold, 1)
        _int_at_least("batch_token_budget", self.batch_token_budget, 1)
        _int_at_least("chunk_tokens", self.chunk_tokens, 1)
        _int_at_least("max_suspended_batches", self.max_suspended_batches, 0)
        for name in ("admission_control", "calibrate_cost"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SchedulerConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("late_reject_factor", "max_queued_work_s", "urgent_reserve_window_s"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v < math.inf):
                raise ValueError(f"SchedulerConfig.{name}: expected a positive number or None, got {v!r}")
        if self.late_reject_factor is not None and self.late_reject_factor < 1.0:
            msg = f"expected >= 1 (1 refuses every predicted miss), got {self.late_reject_factor!r}"
            raise ValueError(f"SchedulerConfig.late_reject_factor: {msg}")
        if self.granularity not in GRANULARITIES:
            msg = f"unknown granularity {self.granularity!r}; expected one of {GRANULARITIES}"
            raise ValueError(f"SchedulerConfig.granularity: {msg}")
