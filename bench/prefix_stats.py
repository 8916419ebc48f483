"""Prefix-cache hit rates of the systems under test, from their own counters.

* vLLM's ``/metrics``: ``vllm:prefix_cache_queries`` and ``vllm:prefix_cache_hits``, counters of
  prompt tokens looked up in and found in its prefix cache (the Prometheus client exposes them
  as ``..._total``; a bare name is read too), summed over engines;
* FlowPrefill's router ``/metrics``: ``flowprefill_prefix_cache_queried_tokens_total``,
  ``flowprefill_prefix_cache_hit_tokens_total`` and ``flowprefill_prefix_cache_evictions_total``,
  summed over the ``replica`` label;
* an in-process engine's ``stats().counters``: ``prefix_queried_tokens``, ``prefix_hit_tokens``,
  ``prefix_evictions``.

A system that exports none of these (a server without a prefix cache, an older build) has no
counters: its hit rate is unknown (None), never a crash. Counters only grow, so a run's hit rate
is ``(hits after - hits before) / (queried after - queried before)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bench.servers import metric_values

FLOWPREFILL_METRICS = ("flowprefill_prefix_cache_queried_tokens_total", "flowprefill_prefix_cache_hit_tokens_total",
                       "flowprefill_prefix_cache_evictions_total")
VLLM_METRICS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")
ENGINE_COUNTERS = ("prefix_queried_tokens", "prefix_hit_tokens", "prefix_evictions")


@dataclass(frozen=True)
class PrefixCounters:
    """Prompt tokens looked up in a prefix cache and found there; evictions where counted."""

    queried_tokens: float
    hit_tokens: float
    evictions: float | None = None

    def since(self, before: PrefixCounters | None) -> PrefixCounters:
        """The counts between ``before`` and these (all of these when ``before`` is None)."""
        if before is None:
            return self
        ev = None if self.evictions is None or before.evictions is None else self.evictions - before.evictions
        return PrefixCounters(self.queried_tokens - before.queried_tokens, self.hit_tokens - before.hit_tokens, ev)

    @property
    def hit_rate(self) -> float | None:
        """Hit tokens over queried tokens; None when nothing was queried."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the hit rate."""
        return {"queried_tokens": self.queried_tokens, "hit_tokens": self.hit_tokens, "evictions": self.evictions,
                "hit_rate": self.hit_rate}


def _sum(text: str, *names: str) -> float | None:
    """The sum over label sets of the first of ``names`` that ``text`` has samples of."""
    for name in names:
        values = metric_values(text, name)
        if values:
            return sum(values)
    return None


def vllm_prefix_counters(text: str) -> PrefixCounters | None:
    """vLLM's prefix-cache counters in its Prometheus text, None when it has none."""
    queries, hits = (_sum(text, f"{name}_total", name) for name in VLLM_METRICS)
    return None if queries is None else PrefixCounters(queries, hits or 0.0)


def flowprefill_prefix_counters(text: str) -> PrefixCounters | None:
    """FlowPrefill's prefix-cache counters (all replicas) in the router's Prometheus text, None when absent."""
    queried, hits, evictions = (_sum(text, name) for name in FLOWPREFILL_METRICS)
    return None if queried is None else PrefixCounters(queried, hits or 0.0, evictions)


def prefix_counters_from_metrics(text: str) -> PrefixCounters | None:
    """FlowPrefill's counters if the page has them, else vLLM's, else None."""
    return flowprefill_prefix_counters(text) or vllm_prefix_counters(text)


def engine_prefix_counters(counters: Mapping[str, Any]) -> PrefixCounters | None:
    """An engine's prefix-cache counters from ``stats().counters``, None when it keeps none."""
    queried, hits, evictions = (counters.get(k) for k in ENGINE_COUNTERS)
    if queried is None:
        return None
    return PrefixCounters(float(queried), float(hits or 0), None if evictions is None else float(evictions))


def total(runs: Iterable[PrefixCounters | None]) -> PrefixCounters | None:
    """The sum of several runs' counts; None when any run's are unknown (or there are none)."""
    out: PrefixCounters | None = None
    for r in runs:
        if r is None:
            return None
        if out is None:
            out = r
            continue
        ev = None if out.evictions is None or r.evictions is None else out.evictions + r.evictions
        out = PrefixCounters(out.queried_tokens + r.queried_tokens, out.hit_tokens + r.hit_tokens, ev)
    return out


def format_hit_rate(rate: float | None, width: int = 6) -> str:
    """``"64.9%"`` right-aligned, ``"-"`` when unknown."""
    return f"{'-' if rate is None else format(rate, '.1%'):>{width}}"
