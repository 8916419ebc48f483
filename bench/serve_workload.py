"""The requests ``bench serve`` replays: a trace window, scaled, with prompts, classes and SLOs.

:func:`build_workload` loads the trace, takes the window, decides which prompts share a prefix
(``--prefix-mode``, :mod:`bench.shared_prefix`; the multi-turn generator runs on the window at
full length), scales the lengths and assigns SLO classes (seeded). :meth:`ServeWorkload.requests`
builds the prompts of one run:

* ``unique``: :meth:`bench.prompts.PromptBuilder.build` of index ``run * len + i``, so run 0 is
  exactly the prompts every earlier version of the bench sent, and every run's are new;
* ``trace`` / ``multiturn``: :meth:`bench.prompts.PromptBuilder.build_shared` in namespace
  ``run``: the same sharing in every run, new words in each.

Fresh prompts per run matter once a server caches prefixes: a search replays the window many
times on one server, and without them the second run would hit everything the first left cached.
The bench uses run 0 for warm-up and the start-scale probe and runs 1, 2, ... for measurements.

Traces: Azure LLM inference 2023 (CC-BY 4.0), Patel et al., "Splitwise", ISCA 2024; Mooncake
(Apache-2.0), Qin et al., FAST'25.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.loadgen import LoadRequest
from bench.prompts import PromptBuilder, max_tokens_for
from bench.shared_prefix import (
    SHARED_MODES,
    apply_prefix_mode,
    resolve_prefix_mode,
    reusable_fraction,
    sample_prefix_groups,
)
from bench.slo_classes import THREE_TIER_RULE, assign_classes
from bench.traces import Trace, load_trace
from router.slo import SLOClass

if TYPE_CHECKING:
    from bench.serve_config import ServeBenchConfig

IDLE_GAP_FRACTION = 0.25  # an idle gap longer than this share of the window ...
IDLE_GAP_VS_MEDIAN = 10.0  # ... and this many median gaps gets a warning


@dataclass
class ServeWorkload:
    """The scaled window as replayed (block ids per the prefix mode) and each request's class."""

    trace: Trace
    mode: str
    classes: tuple[SLOClass, ...]  # one per request
    builder: PromptBuilder
    prompt_format: str = "text"
    max_output_tokens: int | None = None
    judge_tpot: bool = False  # each request carries its class's TPOT SLO too (bench serve --slos both)

    @property
    def shared(self) -> bool:
        """Whether prompts share prefixes (a ``trace`` or ``multiturn`` run)."""
        return self.mode in SHARED_MODES

    @property
    def reusable_fraction(self) -> float:
        """Of the window's prompt tokens, the share an unbounded cache could reuse within one run."""
        return reusable_fraction(self.trace)

    def requests(self, run: int = 0) -> list[LoadRequest]:
        """The requests of run ``run`` at rate scale 1 (arrivals from 0), prompts new for each run."""
        if run < 0:
            raise ValueError(f"run must be >= 0, got {run}")
        reqs = self.trace.requests
        first = reqs[0].arrival_s
        out = []
        for i, (r, c) in enumerate(zip(reqs, self.classes)):
            n = max(r.input_tokens, self.builder.special + 1)
            if self.shared:
                p = self.builder.build_shared(i, n, r.hash_ids, self.trace.block_tokens, namespace=run)
            else:
                p = self.builder.build(run * len(reqs) + i, n)
            prompt: str | tuple[int, ...] = p.text if self.prompt_format == "text" else p.token_ids
            out.append(LoadRequest(r.arrival_s - first, prompt, p.num_tokens,
                                   max_tokens_for(r.output_tokens, self.max_output_tokens), c.name, c.priority,
                                   c.ttft_slo_s, c.tpot_slo_s if self.judge_tpot else None))
        return out

    def describe(self) -> dict[str, Any]:
        """The report's account of the prefix sharing."""
        return {"prefix_mode": self.mode, "block_tokens": self.trace.block_tokens,
                "reusable_token_fraction": self.reusable_fraction}


# --quick on a trace with block ids keeps 1/64 of its prefix groups: requests sharing a prefix are a median
# of over 200 requests apart in the Mooncake trace, so 32 consecutive ones share nothing; sampled whole groups keep
# the trace's sharing structure (30% of the quick window's prompt tokens reusable)
QUICK_PREFIX_GROUPS = 1 / 64


def prefix_groups(cfg: ServeBenchConfig, mode: str) -> float:
    """The fraction of the trace's prefix groups replayed: ``--prefix-groups``, else all of them, except
    with ``--quick`` in trace mode (:data:`QUICK_PREFIX_GROUPS`), where a short window
    of consecutive requests would share no prefix at all."""
    if cfg.prefix_groups is not None:
        return cfg.prefix_groups
    return QUICK_PREFIX_GROUPS if cfg.quick and mode == "trace" else 1.0


def window_trace(cfg: ServeBenchConfig) -> tuple[Trace, str]:
    """The configured window of the trace, at full length, with the resolved prefix mode's block ids."""
    trace = load_trace(cfg.trace)
    mode = resolve_prefix_mode(cfg.prefix_mode, trace)
    groups = prefix_groups(cfg, mode)
    trace = sample_prefix_groups(trace, groups, cfg.seed) if groups < 1 else trace
    if cfg.window_start_s or cfg.window_s is not None:
        span = cfg.window_s if cfg.window_s is not None else math.inf
        trace = trace.window(cfg.window_start_s, span if math.isfinite(span) else 1e12)
    return apply_prefix_mode(trace.head(cfg.max_requests), mode, cfg.multiturn()), mode


def build_workload(cfg: ServeBenchConfig, tokenizer: Any, classes: tuple[SLOClass, ...]) -> ServeWorkload:  # noqa: ANN401
    """The trace window, scaled, with its prefix mode and per-request classes (seeded, deterministic)."""
    trace, mode = window_trace(cfg)
    trace = trace.scale_lengths(cfg.length_scale)
    if len(trace) < 2:
        raise ValueError(f"the trace window holds {len(trace)} requests; move or widen it")
    warning = idle_gap_warning(trace)
    if warning:
        print(f"bench serve: WARNING: {warning}", file=sys.stderr, flush=True)
    names = assign_classes(trace, classes, seed=cfg.seed, rule=THREE_TIER_RULE.scaled(cfg.length_scale))
    by_name = {c.name: c for c in classes}
    return ServeWorkload(trace, mode, tuple(by_name[n] for n in names), PromptBuilder(tokenizer, cfg.seed),
                         cfg.prompt_format, cfg.max_output_tokens, judge_tpot=cfg.slos == "both")


def idle_gap_warning(trace: Trace, max_fraction: float = IDLE_GAP_FRACTION,
                     vs_median: float = IDLE_GAP_VS_MEDIAN) -> str | None:
    """A warning when one idle gap takes more than ``max_fraction`` of the window and is over
    ``vs_median`` times the median gap: rates are then averages over the gap, and the bursts on
    either side arrive far faster than the rate says."""
    gap, i = trace.longest_gap()
    span = trace.duration_s
    arrivals = [r.arrival_s for r in trace.requests]
    typical = statistics.median(b - a for a, b in zip(arrivals, arrivals[1:])) if len(arrivals) > 1 else 0.0
    if span <= 0 or gap <= max_fraction * span or gap <= vs_median * typical:
        return None
    return (f"the window has an idle gap of {gap:.1f} s before request {i} ({gap / span:.0%} of its {span:.1f} s): "
            f"request rates average over it; pick a window without it (--max-requests {i}, --window-start-s, "
            f"--window-s)")
