"""Replica-side accounting for SLO-driven autoscaling, reported through Serve's ``record_autoscaling_stats``.

Each replica keeps two sliding windows of ``window_s`` seconds and reports, as plain floats:

* ``fp_prefill_load``: predicted seconds of prefill work per second of wall time that this
  replica is asked to do: the predicted prefill cost (the replica's TTFT cost model) of the
  requests that arrived in the window, divided by the window, plus the predicted work still
  queued (``pending_work_s``: waiting, running and suspended prefills) spread over
  ``drain_horizon_s``. 1.0 means one replica fully busy prefilling; above 1.0 the queue grows.
* ``fp_arrival_work_rate`` and ``fp_pending_work_s``: the two parts of the load, for dashboards.
* ``fp_ttft_attainment``: the fraction of requests that got their first token (or were refused)
  in the window whose TTFT met their SLO. A refused request (rejected, error) counts as a miss;
  a request the client aborted before its first token is not counted. 1.0 when there are none.
* ``fp_ttft_samples``: how many requests that fraction covers (the policy ignores small samples).

Serve averages each metric over its ``look_back_period_s`` and hands the per-replica values to the
policy (:mod:`cluster.autoscaling`). Nothing here imports Ray; the clock is injected.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from replicas.scheduler.request import Request
from state.clock import WALL_CLOCK, Clock, require_clock

METRIC_LOAD = "fp_prefill_load"
METRIC_ARRIVAL_RATE = "fp_arrival_work_rate"
METRIC_PENDING = "fp_pending_work_s"
METRIC_ATTAINMENT = "fp_ttft_attainment"
METRIC_SAMPLES = "fp_ttft_samples"

_REFUSED = ("rejected", "error")


class AutoscalingStats:
    """Sliding-window arrival work and TTFT attainment of one replica (thread-safe).

    ``predict(n)`` is the predicted prefill seconds of an ``n``-token prompt (the engine's cost
    model). ``window_s`` is the averaging window; until the replica is that old, rates use its age
    (at least one second) so a new replica does not under-report.
    """

    def __init__(self, predict: Callable[[int], float], *, clock: Clock = WALL_CLOCK,
                 window_s: float = 15.0, drain_horizon_s: float = 10.0) -> None:
        if window_s <= 0 or drain_horizon_s <= 0:
            raise ValueError("AutoscalingStats: window_s and drain_horizon_s must be > 0")
        self.predict = predict
        self.clock = require_clock(clock, "AutoscalingStats")
        self.window_s = window_s
        self.drain_horizon_s = drain_horizon_s
        self.started_at = clock()
        self._arrivals: deque[tuple[float, float]] = deque()  # (time, predicted prefill seconds)
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, TTFT met)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ events
    def on_arrival(self, num_prompt_tokens: int) -> None:
        """A request reached this replica: count its predicted prefill cost."""
        cost = self.predict(num_prompt_tokens)
        with self._lock:
            self._arrivals.append((self.clock(), cost))

    def on_first_token(self, ttft_s: float, ttft_slo_s: float) -> None:
        """The request's first token went out after ``ttft_s`` (SLO ``ttft_slo_s``)."""
        with self._lock:
            self._outcomes.append((self.clock(), ttft_s <= ttft_slo_s))

    def on_refused(self) -> None:
        """The request ended without a first token through no fault of the client: an SLO miss."""
        with self._lock:
            self._outcomes.append((self.clock(), False))

    async def observe(self, request: Request, outputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Pass ``outputs`` (the engine's :class:`~replicas.engine_types.RequestOutput` stream) through,
        recording the arrival, the first token's TTFT against ``request.ttft_slo_s`` and refusals."""
        self.on_arrival(request.num_prompt_tokens)
        first = True
        try:
            async for out in outputs:
                if first and out.ttft_s is not None:
                    first = False
                    self.on_first_token(out.ttft_s, request.ttft_slo_s)
                elif first and out.finish_reason in _REFUSED:
                    first = False
                    self.on_refused()
                yield out
        finally:  # closing this stream early closes the engine's too (which aborts the request)
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                await aclose()

    # ------------------------------------------------------------------ report
    def snapshot(self, pending_work_s: float = 0.0) -> dict[str, float]:
        """The metrics for Serve (every value a float); ``pending_work_s`` is the queued prefill work."""
        now = self.clock()
        horizon = now - self.window_s
        with self._lock:
            while self._arrivals and self._arrivals[0][0] < horizon:
                self._arrivals.popleft()
            while self._outcomes and self._outcomes[0][0] < horizon:
                self._outcomes.popleft()
            arrived_s = sum(cost for _, cost in self._arrivals)
            samples = len(self._outcomes)
            met = sum(ok for _, ok in self._outcomes)
        span = min(self.window_s, max(now - self.started_at, 1.0))
        rate = arrived_s / span
        pending = max(float(pending_work_s), 0.0)
        return {
            METRIC_LOAD: rate + pending / self.drain_horizon_s,
            METRIC_ARRIVAL_RATE: rate,
            METRIC_PENDING: pending,
            METRIC_ATTAINMENT: met / samples if samples else 1.0,
            METRIC_SAMPLES: float(samples),
        }
