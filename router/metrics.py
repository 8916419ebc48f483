"""Prometheus metrics of the router ingress (served at ``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

from router.routing_stats import ReplicaGauges

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _PrefixCacheCounters:
    """The replicas' prefix-cache running totals, from their latest queue states, as Prometheus counters
    (``flowprefill_prefix_cache_{hit_tokens,queried_tokens,evictions}_total`` per replica)."""

    def __init__(self) -> None:
        self.gauges: Mapping[str, ReplicaGauges] = {}

    def collect(self) -> Iterator[Metric]:
        """The counter families (prometheus_client's collector hook)."""
        hit = CounterMetricFamily("flowprefill_prefix_cache_hit_tokens", "Prompt tokens found in a replica's "
                                  "prefix cache (KV reused, not computed)", labels=["replica"])
        queried = CounterMetricFamily("flowprefill_prefix_cache_queried_tokens",
                                      "Prompt tokens looked up in a replica's prefix cache", labels=["replica"])
        evictions = CounterMetricFamily("flowprefill_prefix_cache_evictions",
                                        "Cached prefix blocks a replica evicted for other content", labels=["replica"])
        for rid, g in sorted(self.gauges.items()):
            hit.add_metric([rid], g.prefix_hit_tokens)
            queried.add_metric([rid], g.prefix_queried_tokens)
            evictions.add_metric([rid], g.prefix_evictions)
        yield hit
        yield queried
        yield evictions


class RouterMetrics:
    """TTFT/TPOT per SLO class, SLO outcomes, rejections, queue depth, routing time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._replicas: set[str] = set()
        r = self.registry
        self.ttft = Histogram("flowprefill_ttft_seconds", "Time to first token, per SLO class", ["slo_class"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("flowprefill_tpot_seconds", "Time per output token after the first, per SLO class",
                              ["slo_class"], buckets=_LATENCY_BUCKETS, registry=r)
        self.slo_met = Counter("flowprefill_ttft_slo_met_total", "Requests whose first token met the TTFT SLO",
                               ["slo_class"], registry=r)
        self.slo_violated = Counter("flowprefill_ttft_slo_violated_total",
                                    "Requests whose first token missed the TTFT SLO", ["slo_class"], registry=r)
        self.requests = Counter("flowprefill_requests_total", "Requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.rejections = Counter("flowprefill_rejections_total", "Requests refused, by HTTP status",
                                  ["status"], registry=r)
        self.queue_depth = Gauge("flowprefill_replica_queue_depth", "Requests queued or prefilling per replica",
                                 ["replica"], registry=r)
        self.preemptions = Gauge("flowprefill_replica_preemptions", "Preemptions so far per replica",
                                 ["replica"], registry=r)
        self.cost_scale = Gauge("flowprefill_replica_cost_scale",
                                "Measured prefill time over the profiled prediction per replica (1 = as profiled)",
                                ["replica"], registry=r)
        self.routing_ms = Histogram("flowprefill_routing_decision_ms", "Placement decision time (ms)",
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 50), registry=r)
        self.redis_fallbacks = Counter("flowprefill_redis_fallbacks_total",
                                       "Decisions made from local estimates because Redis was unavailable",
                                       registry=r)
        self.prefix_cache = _PrefixCacheCounters()
        r.register(self.prefix_cache)
        self.retries = Counter("flowprefill_replica_retries_total",
                               "Requests sent again because their replica failed before the first output",
                               ["error"], registry=r)
        self.handover_ms = Histogram("flowprefill_handover_ms", "P/D handover: prefill KV ready to fetched by the "
                                     "decode replica (ms)", buckets=(1, 2, 5, 10, 25, 50, 100, 250, 1000), registry=r)
        self.handover_bytes = Counter("flowprefill_handover_bytes_total", "KV bytes handed from prefill to decode "
                                      "replicas", registry=r)

    def observe_handover(self, timing: Mapping[str, float]) -> None:
        """Record one handover's transfer time and bytes (``handover_timing`` of a decode stream's first row)."""
        ms, nbytes = timing.get("transfer_ms"), timing.get("bytes")
        if isinstance(ms, int | float) and ms >= 0:
            self.handover_ms.observe(ms)
        if isinstance(nbytes, int | float) and nbytes > 0:
            self.handover_bytes.inc(nbytes)

    def set_replicas(self, gauges: Mapping[str, ReplicaGauges]) -> None:
        """Per-replica gauges (depth, preemptions, cost scale, prefix-cache totals) from the latest queue
        states; replicas that left are dropped."""
        for rid in self._replicas - set(gauges):
            for gauge in (self.queue_depth, self.preemptions, self.cost_scale):
                gauge.remove(rid)
        for rid, g in gauges.items():
            self.queue_depth.labels(rid).set(g.depth)
            self.preemptions.labels(rid).set(g.preemptions)
            self.cost_scale.labels(rid).set(g.cost_scale)
        self.prefix_cache.gauges = dict(gauges)
        self._replicas = set(gauges)

    def observe_ttft(self, slo_class: str, ttft_s: float, slo_s: float) -> None:
        """Record a first token and whether it met its SLO."""
        self.ttft.labels(slo_class).observe(ttft_s)
        (self.slo_met if ttft_s <= slo_s else self.slo_violated).labels(slo_class).inc()

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
