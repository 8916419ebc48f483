"""Multi-turn chat traffic for traces that do not say which prompts share a prefix (Azure).

:func:`multiturn_trace` keeps every request of a trace as it is (arrival time, input and output
length) and decides only what its prompt shares with earlier ones, as Mooncake block ids
(:data:`bench.traces.MOONCAKE_BLOCK_TOKENS`-token blocks), so the same prompt builder and the
same length scaling serve both (:meth:`bench.traces.Trace.scale_lengths`).

The model:

* One system prompt of ``system_prompt_tokens`` tokens (a whole number of blocks) opens every
  conversation, so all conversations share it.
* A conversation is one token stream: system prompt, user message 1, answer 1, user message 2,
  answer 2, ... Turn ``t`` sends the stream up to the end of user message ``t``, so each turn's
  prompt is exactly the previous turn's prompt, the previous answer (``output_tokens`` of the
  previous request) and the new user message. Answers are the trace's lengths filled with the
  generator's tokens, not what a server generated: a server's cache can hold the previous prompt,
  never the answer, just as in Mooncake's ``hash_ids``.

Assignment rule, request by request in arrival order, seeded (``random.Random(seed)``, one draw
per request, so a seed gives the same conversations on every run):

1. A request is *eligible* for an open conversation when its input is at least that
   conversation's previous prompt + previous answer + ``min_user_tokens``; a conversation is open
   while its last turn arrived at most ``max_idle_s`` earlier.
2. With probability ``continue_probability``, if any conversation is eligible, the request is the
   next turn of one of them, picked uniformly; its user message is the rest of its input.
3. Otherwise, if its input holds the system prompt plus ``min_user_tokens``, it opens a new
   conversation; else it is a standalone prompt that shares nothing (too short for the system
   prompt).

Input lengths are kept exactly, so the trace's length distribution, arrival times and SLO classes
are unchanged; what the rule decides is the reusable share, and it is modest because a trace's
lengths were not drawn as growing conversations (a turn must be longer than the one before it
plus its answer). Measured with the defaults (a 1024-token system prompt, continue probability
0.5, 16-token minimum user message, 600 s idle limit) and an unbounded cache, the same at full
length and at 1/16 (:func:`reuse_summary`): over the whole Azure LLM inference 2023 conversation
trace 44% of prompt tokens are a prefix an earlier request already had (10% of requests continue a
conversation, 36% open one, 54% are too short for the system prompt and stand alone); over the
code trace 44% (29% / 32% / 39%); in ``bench serve``'s default window (48 code-trace requests from
29 s) 36%. For comparison, Mooncake's own ``hash_ids`` give 65%. The Azure trace is CC-BY 4.0;
cite Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

from bench.traces import MOONCAKE_BLOCK_TOKENS, Trace

BLOCK = MOONCAKE_BLOCK_TOKENS


@dataclass(frozen=True)
class MultiTurnConfig:
    """How trace requests become conversations (see the module docstring)."""

    system_prompt_tokens: int = 2 * BLOCK  # full-length tokens, a whole number of blocks (0: none)
    continue_probability: float = 0.5
    min_user_tokens: int = 16
    max_idle_s: float = 600.0  # a conversation idle longer than this takes no more turns
    seed: int = 0

    def __post_init__(self) -> None:
        s = self.system_prompt_tokens
        if isinstance(s, bool) or not isinstance(s, int) or s < 0 or s % BLOCK:
            raise ValueError(f"system_prompt_tokens must be a non-negative multiple of {BLOCK} (whole blocks), "
                             f"got {s!r}")
        p = self.continue_probability
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"continue_probability must be in [0, 1], got {p!r}")
        if isinstance(self.min_user_tokens, bool) or not isinstance(self.min_user_tokens, int) \
                or self.min_user_tokens < 1:
            raise ValueError(f"min_user_tokens must be a positive integer, got {self.min_user_tokens!r}")
        if not (isinstance(self.max_idle_s, int | float) and self.max_idle_s > 0 and not math.isnan(self.max_idle_s)):
            raise ValueError(f"max_idle_s must be a positive number of seconds, got {self.max_idle_s!r}")


@dataclass(frozen=True)
class Turn:
    """What one request of a generated trace is: turn ``turn`` (1-based) of ``conversation``, or a
    standalone prompt (``conversation`` None, ``turn`` 0). ``history_tokens`` come before its user
    message: the system prompt, and every earlier turn's user message and answer."""

    conversation: int | None
    turn: int
    history_tokens: int
    user_tokens: int


@dataclass
class _Conversation:
    index: int
    blocks: list[int]  # the stream's block ids so far
    prompt_tokens: int  # the last turn's prompt
    answer_tokens: int  # the last turn's answer
    last_arrival_s: float
    turns: int = 1


class _Ids:
    """Fresh block ids, counted up from ``start``."""

    def __init__(self, start: int) -> None:
        self.next = start

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK)


def multiturn_trace(trace: Trace, cfg: MultiTurnConfig | None = None) -> tuple[Trace, tuple[Turn, ...]]:
    """``trace`` with block ids from conversations (any ids it had are replaced), and what each
    request became; arrival times and token counts are unchanged."""
    cfg = cfg or MultiTurnConfig()
    rng = random.Random(cfg.seed)
    system = list(range(cfg.system_prompt_tokens // BLOCK))
    ids = _Ids(len(system))
    open_: list[_Conversation] = []
    count = 0
    requests, turns = [], []
    for r in trace.requests:
        draw = rng.random()
        open_ = [c for c in open_ if r.arrival_s - c.last_arrival_s <= cfg.max_idle_s]
        eligible = [c for c in open_ if c.prompt_tokens + c.answer_tokens + cfg.min_user_tokens <= r.input_tokens]
        n = r.input_tokens
        if eligible and draw < cfg.continue_probability:
            conv = eligible[int(draw / cfg.continue_probability * len(eligible))]  # uniform, same draw
            history = conv.prompt_tokens + conv.answer_tokens
            conv.turns += 1
            turn = Turn(conv.index, conv.turns, history, n - history)
        elif n >= cfg.system_prompt_tokens + cfg.min_user_tokens:
            conv = _Conversation(count, list(system), 0, 0, r.arrival_s)
            count += 1
            open_.append(conv)
            turn = Turn(conv.index, 1, cfg.system_prompt_tokens, n - cfg.system_prompt_tokens)
        else:
            requests.append(replace(r, hash_ids=tuple(ids.take(_blocks(n)))))
            turns.append(Turn(None, 0, 0, n))
            continue
        conv.blocks += ids.take(max(_blocks(n) - len(conv.blocks), 0))
        conv.prompt_tokens, conv.answer_tokens, conv.last_arrival_s = n, r.output_tokens, r.arrival_s
        requests.append(replace(r, hash_ids=tuple(conv.blocks[: _blocks(n)])))
        turns.append(turn)
    source = (f"{trace.source}|multiturn(system={cfg.system_prompt_tokens},p={cfg.continue_probability:g},"
              f"seed={cfg.seed})")
    return Trace(tuple(requests), source, BLOCK), tuple(turns)


def reuse_summary(trace: Trace, turns: tuple[Turn, ...]) -> dict[str, Any]:
    """The reusable token fraction of a generated trace and how its requests were assigned."""
    from bench.shared_prefix import reusable_tokens

    reusable, total = reusable_tokens(trace)
    n = max(len(turns), 1)
    return {"reusable_token_fraction": reusable / total if total else 0.0,
            "continued": sum(t.turn > 1 for t in turns) / n, "opened": sum(t.turn == 1 for t in turns) / n,
            "standalone": sum(t.conversation is None for t in turns) / n,
            "conversations": len({t.conversation for t in turns if t.conversation is not None})}
