"""Benchmark SLO classes (hardware-relative) and their seeded, deterministic assignment to trace requests.

The classes are :class:`router.slo.SLOClass`, the serving path's one definition. Used by both the
in-process benchmark and the HTTP benchmark, so that the same trace, rule and seed
give every request the same class (and hence the same TTFT SLO and priority) in both.

**Hardware-relative SLOs.** Class TTFT SLOs are multiples of a *reference latency*: the predicted
isolated prefill latency of a ``DEFAULT_REF_TOKENS`` (512) token prompt on the machine under test.
One config therefore puts the same pressure on a laptop CPU and on an H200. The default classes
(:data:`DEFAULT_CLASS_SPEC`):

=============  ===============  ========  ==========
class          TTFT SLO         priority  sheddable
=============  ===============  ========  ==========
interactive    3 x reference    0         no
standard       10 x reference   1         no
batch          30 x reference   2         yes
=============  ===============  ========  ==========

Priorities follow vLLM: a lower number is more urgent.

**Assignment rule** (:class:`LengthRule`, after the FlowPrefill setup of short latency-sensitive
prompts mixed with long document-style ones): a request goes to ``class_names[i]`` for the first
``i`` with ``input_tokens <= thresholds[i]``, else to the last class. The default splits at 1024
input tokens into ``interactive`` and ``batch``; :data:`THREE_TIER_RULE` also uses ``standard``.
Thresholds apply to the lengths in the trace as given, i.e. *after* any
:meth:`~bench.traces.Trace.scale_lengths`; use :meth:`LengthRule.scaled` to scale them alike.
Optionally a seeded fraction of requests (``move_fraction``, default 0) is moved to a different
class chosen uniformly among the others, so that class and length are not perfectly correlated.

The Azure LLM inference traces used with this module are CC-BY 4.0: cite Patel et al., "Splitwise:
Efficient generative LLM inference using phase splitting", ISCA 2024.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.traces import Trace
from router.slo import SLOClass

#: (name, multiple of the reference latency, priority, sheddable)
ClassSpec = tuple[str, float, int, bool]

DEFAULT_REF_TOKENS = 512
DEFAULT_CLASS_SPEC: tuple[ClassSpec, ...] = (
    ("interactive", 3.0, 0, False),
    ("standard", 10.0, 1, False),
    ("batch", 30.0, 2, True),
)
#: A request's TTFT SLO is never below this multiple of its own predicted isolated latency.
DEFAULT_SLACK = 2.0


def classes_from_reference(ref_latency_s: float, spec: Sequence[ClassSpec] = DEFAULT_CLASS_SPEC, *,
                           tpot_slo_s: float | None = None) -> tuple[SLOClass, ...]:
    """Build classes whose TTFT SLO is ``multiple * ref_latency_s``; ``tpot_slo_s`` (if any) is
    shared by all classes. Names must be distinct."""
    if not (math.isfinite(ref_latency_s) and ref_latency_s > 0):
        raise ValueError(f"ref_latency_s must be finite and > 0, got {ref_latency_s!r}")
    names = [s[0] for s in spec]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"class names must be distinct and non-empty, got {names}")
    return tuple(SLOClass(name, mult * ref_latency_s, tpot_slo_s, prio, shed)
                 for name, mult, prio, shed in spec)


def classes_for_predictor(predict: Callable[[int], float], spec: Sequence[ClassSpec] = DEFAULT_CLASS_SPEC,
                          *, ref_tokens: int = DEFAULT_REF_TOKENS,
                          tpot_slo_s: float | None = None) -> tuple[SLOClass, ...]:
    """:func:`classes_from_reference` with the reference latency ``predict(ref_tokens)``."""
    return classes_from_reference(predict(ref_tokens), spec, tpot_slo_s=tpot_slo_s)


@dataclass(frozen=True)
class LengthRule:
    """Assign by input length: the first ``class_names[i]`` with ``input <= thresholds[i]``, else
    the last name; then move ``move_fraction`` of the requests (seeded) to another class."""

    thresholds: tuple[int, ...] = (1024,)
    class_names: tuple[str, ...] = ("interactive", "batch")
    move_fraction: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(self.thresholds))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if len(self.class_names) != len(self.thresholds) + 1:
            raise ValueError("need exactly one more class name than thresholds")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class names must be distinct, got {self.class_names}")
        t = self.thresholds
        if any(x < 1 for x in t) or any(a >= b for a, b in zip(t, t[1:])):
            raise ValueError(f"thresholds must be >= 1 and strictly increasing, got {t}")
        if not 0.0 <= self.move_fraction <= 1.0:
            raise ValueError(f"move_fraction must be in [0, 1], got {self.move_fraction!r}")

    def base_class(self, input_tokens: int) -> str:
        """The class a request of ``input_tokens`` gets before any seeded moves."""
        return self.class_names[bisect.bisect_left(self.thresholds, input_tokens)]

    def scaled(self, factor: float) -> LengthRule:
        """The same rule with thresholds multiplied by ``factor`` (rounded half up, at least 1), to
        match a trace whose lengths were scaled by the same factor."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be finite and > 0, got {factor!r}")
        t = tuple(max(1, math.floor(x * factor + 0.5)) for x in self.thresholds)
        return LengthRule(t, self.class_names, self.move_fraction)


DEFAULT_RULE = LengthRule()
THREE_TIER_RULE = LengthRule((1024, 4096), ("interactive", "standard", "batch"))


def assign_classes(trace: Trace, classes: Sequence[SLOClass], *, seed: int,
                   rule: LengthRule = DEFAULT_RULE) -> list[str]:
    """Return one class name per request of ``trace`` (in order), following ``rule``.

    Exactly ``round(move_fraction * len(trace))`` requests, drawn without replacement by
    ``random.Random(seed)``, are moved to another of the rule's classes chosen uniformly. The
    result depends only on the trace lengths, the rule and the seed (``random.Random`` with an
    integer seed is reproducible across platforms and Python versions)."""
    known = {c.name for c in classes}
    unknown = [n for n in rule.class_names if n not in known]
    if unknown:
        raise ValueError(f"rule uses classes {unknown} not in the given classes {sorted(known)}")
    out = [rule.base_class(r.input_tokens) for r in trace]
    k = math.floor(rule.move_fraction * len(out) + 0.5)
    if k and len(rule.class_names) > 1:
        rng = random.Random(seed)
        for i in sorted(rng.sample(range(len(out)), k)):
            out[i] = rng.choice([n for n in rule.class_names if n != out[i]])
    return out


def ttft_slo_for(input_tokens: int, cls: SLOClass, predict: Callable[[int], float], *,
                 slack: float = DEFAULT_SLACK) -> float:
    """Per-request TTFT SLO: ``max(cls.ttft_slo_s, slack * predict(input_tokens))``, so that a long
    prompt is never given an SLO it could not meet even on an idle server."""
    if not (math.isfinite(slack) and slack > 0):
        raise ValueError(f"slack must be finite and > 0, got {slack!r}")
    return max(cls.ttft_slo_s, slack * predict(input_tokens))


def request_ttft_slos(trace: Trace, assignment: Sequence[str], classes: Sequence[SLOClass],
                      predict: Callable[[int], float], *, slack: float = DEFAULT_SLACK) -> list[float]:
    """:func:`ttft_slo_for` for every request of ``trace`` given its assigned class name."""
    if len(assignment) != len(trace):
        raise ValueError(f"assignment has {len(assignment)} names for {len(trace)} requests")
    by_name = {c.name: c for c in classes}
    return [ttft_slo_for(r.input_tokens, by_name[n], predict, slack=slack)
            for r, n in zip(trace, assignment)]
