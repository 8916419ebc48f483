"""Open-loop replay of a trace against an in-process replica engine.

Each request is submitted at its (rate-scaled) arrival time whether or not earlier ones have
finished; its TTFT is measured by the engine from submission to first token. Requests still
unfinished when the drain limit passes count as SLO misses.

Idle gaps are skipped: when the engine holds no request at all and the next arrival is more than
``IDLE_SKIP_S`` away, the schedule is shifted forward to that arrival. An empty engine is in the
same state however long it has been idle, so no TTFT changes; bursty traces (the Azure code
trace has idle gaps of minutes) replay in their busy time only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from replicas.engine import ReplicaEngine
from replicas.engine_types import RequestOutput
from replicas.sampling_params import SamplingParams
from replicas.scheduler.request import Request
from router.slo import SLOClass

IDLE_SKIP_S = 0.5

#: English text tiled into prompts so that they are real token sequences for the tokenizer.
_CORPUS = (
    "The committee reviewed the quarterly report and noted that revenue grew in every region, "
    "while costs in logistics rose faster than expected. Engineers proposed caching the most "
    "frequent queries, batching small writes, and moving the analytics jobs to off-peak hours. "
    "A short summary of the discussion follows, with the actions each team agreed to take. "
)


def make_prompts(tokenizer: object, lengths: Sequence[int]) -> list[list[int]]:
    """Prompts of exactly the requested token counts, cut from tiled English text."""
    base = tokenizer.encode(_CORPUS)  # type: ignore[attr-defined]
    tiled = base * (max(lengths, default=1) // len(base) + 2)
    offsets = [(7 * i) % len(base) for i in range(len(lengths))]  # distinct prompts, no shared prefix
    return [tiled[off : off + n] for off, n in zip(offsets, lengths)]


def fresh_prompts(tokenizer: object, prompts: Sequence[list[int]], run: int) -> list[list[int]]:
    """:func:`make_prompts`'s prompts for replay ``run``: as they are for run 0; for a later run each
    one's first token is replaced by a marker of that run, so no two runs share a prefix (a prefix
    cache keeps nothing from one replay that the next could hit) and lengths stay the same.

    Markers are distinct tokens that start no run-0 prompt: the corpus's tokens first, then the
    vocabulary's ids in order.
    """
    if run == 0:
        return [list(p) for p in prompts]
    seen = {p[0] for p in prompts if p}  # run 0's first tokens, then each marker taken
    count = 0
    for t in chain(tokenizer.encode(_CORPUS), range(int(getattr(tokenizer, "vocab_size", 0)))):  # type: ignore[attr-defined]
        if t in seen:
            continue
        seen.add(t)
        count += 1
        if count == run:
            return [[t, *p[1:]] for p in prompts]
    raise ValueError(f"no marker token left for replay {run}")


@dataclass(frozen=True)
class ReplayRequest:
    """One request of a replay: when, what, and its SLO."""

    arrival_s: float
    prompt_ids: list[int]
    max_tokens: int
    slo_class: SLOClass
    ttft_slo_s: float


@dataclass(frozen=True)
class ReplayResult:
    """Per-request outcome of a replay."""

    slo_class: str
    input_tokens: int
    ttft_slo_s: float
    ttft_s: float | None  # None: no first token before the drain limit (or rejected)
    arrival_s: float
    finish_reason: str | None

    @property
    def met(self) -> bool:
        """Whether the first token came within the TTFT SLO."""
        return self.ttft_s is not None and self.ttft_s <= self.ttft_slo_s


def replay(engine: ReplicaEngine, requests: Sequence[ReplayRequest], *, drain_s: float = 60.0,
           tag: str = "r") -> list[ReplayResult]:
    """Submit ``requests`` at their arrival offsets (open loop) and collect their TTFTs."""
    firsts: dict[int, float] = {}
    reasons: dict[int, str] = {}
    done = [threading.Event() for _ in requests]

    def sink(i: int):  # noqa: ANN202
        def push(out: RequestOutput) -> None:
            if i not in firsts and out.ttft_s is not None:
                firsts[i] = out.ttft_s
            if out.finish_reason is not None:
                reasons[i] = out.finish_reason
                done[i].set()
        return push

    start = time.monotonic()
    for i, r in enumerate(requests):
        while (delay := start + r.arrival_s - time.monotonic()) > 0:
            if delay > IDLE_SKIP_S and all(ev.is_set() for ev in done[:i]) and not engine.live:
                start -= delay - IDLE_SKIP_S  # nothing in flight: skip the idle stretch
                continue
            time.sleep(min(delay, 0.05))
        req = Request(f"{tag}-{i}", r.prompt_ids, arrival_s=engine.clock(), ttft_slo_s=r.ttft_slo_s,
                      priority=r.slo_class.priority, slo_class=r.slo_class.name, sheddable=r.slo_class.sheddable,
                      max_tokens=r.max_tokens)
        engine.add_request(req, SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True), sink(i))
    limit = time.monotonic() + drain_s
    for i, ev in enumerate(done):
        if not ev.wait(max(limit - time.monotonic(), 0.0)):
            engine.abort(f"{tag}-{i}")
    for ev in done:
        ev.wait(10.0)
    return [
        ReplayResult(r.slo_class.name, len(r.prompt_ids), r.ttft_slo_s, firsts.get(i), r.arrival_s, reasons.get(i))
        for i, r in enumerate(requests)
    ]


def summarize(results: Sequence[ReplayResult]) -> dict[str, object]:
    """Attainment overall and per class, TTFT percentiles."""
    ttfts = np.array([r.ttft_s if r.ttft_s is not None else np.inf for r in results])
    finite = ttfts[np.isfinite(ttfts)]
    per_class: dict[str, float] = {}
    for name in sorted({r.slo_class for r in results}):
        rows = [r for r in results if r.slo_class == name]
        per_class[name] = sum(r.met for r in rows) / len(rows)
    return {
        "requests": len(results),
        "attainment": sum(r.met for r in results) / max(len(results), 1),
        "attainment_per_class": per_class,
        "ttft_p50_s": float(np.percentile(finite, 50)) if finite.size else None,
        "ttft_p99_s": float(np.percentile(finite, 99)) if finite.size else None,
        "unfinished": int((~np.isfinite(ttfts)).sum()),
    }
