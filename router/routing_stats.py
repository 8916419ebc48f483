"""Routing counters and the shed exception, in a module of their own.

Serve pickles the request router's module *by value* into every process that routes
(``RequestRouterConfig`` registers it with ``cloudpickle.register_pickle_by_value``), so a global
defined there would be a private copy per deserialization: the ingress would never see the
router's decisions.  This module is pickled by reference; the router reads
``routing_stats.STATS`` through it at call time (an object imported by name would be copied with
the router's globals), so the router and the ingress in one process share the same counters.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ray.serve")
_DECISION_MS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0]


class RequestShed(Exception):
    """A sheddable request that no replica is predicted to serve before its deadline (HTTP 429);
    ``retry_after_s``: how late the best replica was predicted, as the client's retry hint."""

    def __init__(self, message: str = "", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[str, float]]:  # crosses Ray process boundaries intact
        return (RequestShed, (str(self), self.retry_after_s))


@dataclass(frozen=True)
class ReplicaGauges:
    """One replica's numbers from its latest queue state, for ``/metrics`` and ``/v1/router/stats``."""

    depth: int = 0
    preemptions: int = 0
    cost_scale: float = 1.0
    prefix_hit_tokens: int = 0
    prefix_queried_tokens: int = 0
    prefix_evictions: int = 0

    @classmethod
    def of(cls, state: Any) -> ReplicaGauges:  # noqa: ANN401 (a state.schema.ReplicaQueueState)
        """The gauges of a queue state."""
        return cls(len(state.requests), state.preemptions, state.cost_scale, state.prefix_hit_tokens,
                   state.prefix_queried_tokens, state.prefix_evictions)


class RouterStats:
    """Process-wide routing metrics: counters, the last decision times (ms) and optional hooks
    ``hook(event, value)`` with events ``"decision_ms"``, ``"redis_fallback"`` and ``"shed"``
    (e.g. to feed the ingress's Prometheus metrics).  Ray Serve metrics are recorded too when Ray
    is initialized."""

    def __init__(self, history: int = 4096) -> None:
        self.decisions = 0
        self.redis_fallbacks = 0
        self.sheds = 0
        self.decision_ms: deque[float] = deque(maxlen=history)
        self.replicas: dict[str, ReplicaGauges] = {}
        self.hooks: list[Callable[[str, float], None]] = []
        self._ray: tuple[Any, Any] | None = None

    def _emit(self, event: str, value: float) -> None:
        for hook in list(self.hooks):
            try:
                hook(event, value)
            except Exception:  # a metrics hook must never break routing
                log.exception("routing metrics hook failed")
        if self._ray is None:
            try:
                import ray
                from ray.serve.metrics import Counter, Histogram

                if not ray.is_initialized():
                    return
                self._ray = (
                    Histogram("flowprefill_routing_decision_ms", "Placement decision time (ms)", _DECISION_MS_BUCKETS),
                    Counter("flowprefill_redis_fallbacks", "Routing decisions made without Redis"),
                )
            except Exception:
                return
        try:
            if event == "decision_ms":
                self._ray[0].observe(value)
            elif event == "redis_fallback":
                self._ray[1].inc()
        except Exception:
            log.debug("recording a Ray metric failed", exc_info=True)

    def summary(self) -> dict[str, Any]:
        """Counters and the recent decision times' percentiles (ms), for ``GET /v1/router/stats``."""
        times = sorted(self.decision_ms)

        def pct(q: float) -> float | None:
            return times[min(len(times) - 1, int(q * len(times)))] if times else None

        hits = sum(g.prefix_hit_tokens for g in self.replicas.values())
        queried = sum(g.prefix_queried_tokens for g in self.replicas.values())
        return {"decisions": self.decisions, "redis_fallbacks": self.redis_fallbacks, "sheds": self.sheds,
                "decision_ms": {"n": len(times), "p50": pct(0.5), "p99": pct(0.99),
                                "max": times[-1] if times else None},
                "prefix_cache": {"hit_tokens": hits, "queried_tokens": queried,
                                 "hit_rate": hits / queried if queried else None,
                                 "replicas": {rid: {"hit_tokens": g.prefix_hit_tokens,
                                                    "queried_tokens": g.prefix_queried_tokens,
                                                    "evictions": g.prefix_evictions}
                                              for rid, g in sorted(self.replicas.items())}}}

    def replica_states(self, gauges: dict[str, ReplicaGauges]) -> None:
        """The replicas' queue depth, preemption totals, cost scale and prefix-cache totals from the
        latest Redis read (hooks get ``("replicas", 0.0)`` and read :attr:`replicas`)."""
        self.replicas = dict(gauges)
        self._emit("replicas", 0.0)

    def decision(self, ms: float) -> None:
        """Record one decision's duration."""
        self.decisions += 1
        self.decision_ms.append(ms)
        self._emit("decision_ms", ms)

    def fallback(self) -> None:
        """Record a decision made from local estimates because Redis was unavailable."""
        self.redis_fallbacks += 1
        self._emit("redis_fallback", 1.0)

    def shed(self) -> None:
        """Record a shed request."""
        self.sheds += 1
        self._emit("shed", 1.0)


STATS = RouterStats()
