"""Which prompts of a benchmark share a prefix: the ``--prefix-mode`` of ``bench serve`` and
``bench policies``, and how much of a workload a prefix cache could reuse.

Modes (:data:`PREFIX_MODES`):

``unique``
    Every prompt is its own from its first token (today's comparison: vLLM runs with prefix
    caching off). Block ids the trace has are dropped.
``trace``
    The trace's own block ids (Mooncake ``hash_ids``): requests that share leading ids share
    exactly that prompt prefix. Refused for a trace without them.
``multiturn``
    The multi-turn chat generator (:mod:`bench.multiturn`) assigns the trace's requests to
    conversations that share a system prompt and their earlier turns; for Azure and other traces
    without block ids (on Mooncake it replaces the trace's ids).

No mode given (``None``): ``trace`` when the trace has block ids, else ``unique``. In a shared-prefix
mode (``trace``, ``multiturn``) vLLM runs at its defaults, prefix caching on.

Mooncake's sharing is long-range: a request's prefix was last seen a median 225 requests (55 s)
earlier, so a short window shares almost nothing (the first 48 requests: 0%, the first 500: 9%,
the whole trace: 65%). :func:`sample_prefix_groups` (``--prefix-groups F``) keeps the structure at
a size a CPU can replay: it keeps a seeded fraction ``F`` of the prefix groups (requests with the
same first block; every sharing relation lies within one) over the whole trace, with their
arrival times, and drops the rest; the rate search then compresses time as usual. With ``F =
1/32`` and seeds 0-4 that leaves 98-141 requests over about 1000 s, of which 54-75% of prompt
tokens are reusable (seed 0: 105 requests, 62%; the same at 1/16 length).

Traces: Mooncake (Apache-2.0), Qin et al., FAST'25; Azure LLM inference 2023 (CC-BY 4.0), Patel
et al., "Splitwise", ISCA 2024.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from bench.multiturn import MultiTurnConfig, multiturn_trace
from bench.traces import Trace

PREFIX_MODES = ("unique", "trace", "multiturn")
SHARED_MODES = ("trace", "multiturn")


def check_prefix_flags(mode: str | None, multiturn: Callable[[], MultiTurnConfig]) -> None:
    """Validate ``--prefix-mode`` (None: decided from the trace) and the ``--multiturn-*`` settings
    (``multiturn`` builds their :class:`MultiTurnConfig`); ValueError naming the flag."""
    if mode is not None and mode not in PREFIX_MODES:
        raise ValueError(f"--prefix-mode: expected one of {', '.join(PREFIX_MODES)}, got {mode!r}")
    try:
        multiturn()
    except ValueError as exc:
        raise ValueError(f"--multiturn-*: {exc}") from None


def resolve_prefix_mode(mode: str | None, trace: Trace) -> str:
    """The mode a run uses: ``mode`` checked against the trace, or the default for it.

    Raises ValueError naming ``--prefix-mode`` for an unknown mode, or ``trace`` on a trace
    without block ids.
    """
    if mode is None:
        return "trace" if trace.has_prefixes else "unique"
    if mode not in PREFIX_MODES:
        raise ValueError(f"--prefix-mode: expected one of {', '.join(PREFIX_MODES)}, got {mode!r}")
    if mode == "trace" and not trace.has_prefixes:
        raise ValueError(f"--prefix-mode trace: {trace.source or 'the trace'} has no block ids (hash_ids); "
                         "use --prefix-mode multiturn for generated conversations, or unique")
    return mode


def apply_prefix_mode(trace: Trace, mode: str, multiturn: MultiTurnConfig | None = None) -> Trace:
    """The trace as the mode replays it (a resolved mode, see :func:`resolve_prefix_mode`)."""
    if mode == "unique":
        return trace.without_prefixes() if trace.has_prefixes else trace
    if mode == "multiturn":
        return multiturn_trace(trace, multiturn)[0]
    if mode == "trace":
        return trace
    raise ValueError(f"--prefix-mode: expected one of {', '.join(PREFIX_MODES)}, got {mode!r}")


def sample_prefix_groups(trace: Trace, fraction: float, seed: int = 0) -> Trace:
    """The requests of a seeded ``fraction`` of the prefix groups (same first block id; a request
    without ids is a group of its own), arrival times unchanged. ``fraction`` 1 keeps the trace."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--prefix-groups: expected a fraction in (0, 1], got {fraction!r}")
    if fraction == 1.0:
        return trace
    if not trace.has_prefixes:
        raise ValueError("--prefix-groups: the trace has no block ids (hash_ids) to group by")

    def kept(i: int, root: int | None) -> bool:
        key = f"{seed}:root:{root}" if root is not None else f"{seed}:request:{i}"
        return random.Random(key).random() < fraction

    reqs = [r for i, r in enumerate(trace.requests) if kept(i, r.hash_ids[0] if r.hash_ids else None)]
    return Trace(tuple(reqs), f"{trace.source}|groups({fraction:g},seed={seed})", trace.block_tokens)


def reusable_tokens(trace: Trace) -> tuple[int, int]:
    """``(reusable, total)`` prompt tokens: a token is reusable when an earlier request's prompt
    had the same prefix up to it (an unbounded cache with one-token blocks would hold it).

    Works on block ids: a request reuses its leading blocks that an earlier request had after the
    same ids, each up to the most tokens of it an earlier prompt held; tokens past the request's
    blocks (its own tail) and prompts without ids are never reusable.
    """
    bt = trace.block_tokens
    nodes: dict[tuple[int, int], int] = {}  # (parent node, block id) -> node
    most: list[int] = []  # node -> the most tokens of its block an earlier prompt held
    reusable = total = 0
    for r in trace.requests:
        total += r.input_tokens
        if r.hash_ids is None or bt is None:
            continue
        parent, reusing = -1, True
        for k, h in enumerate(r.hash_ids):
            held = min(bt, r.input_tokens - k * bt)
            if held <= 0:
                break
            node = nodes.get((parent, h))
            if node is None:
                node = nodes[(parent, h)] = len(most)
                most.append(0)
            if reusing:
                reusable += min(held, most[node])
                reusing = most[node] >= held
            most[node] = max(most[node], held)
            parent = node
    return reusable, total


def reusable_fraction(trace: Trace) -> float:
    """:func:`reusable_tokens` as a fraction of all prompt tokens (0.0 for an empty trace)."""
    reusable, total = reusable_tokens(trace)
    return reusable / total if total else 0.0
