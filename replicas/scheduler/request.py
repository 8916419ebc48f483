"""A request as the replica-local scheduler sees it: SLO, prompt length and prefill progress.

Only the prompt's length matters here; sampling parameters travel as an opaque object for the
engine. Progress fields are written by the :class:`~replicas.scheduler.core.Scheduler` from events;
nothing in this module reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class RequestState(StrEnum):
    """Life cycle of a request inside one replica.

    ``waiting`` (queued, no KV) -> ``running`` (its prefill batch is the one the executor runs)
    <-> ``suspended`` (its batch was preempted, or, for ``chunked``, between two chunks; KV held)
    -> ``decoding`` (prompt fully prefilled, first token out) -> ``finished``.
    ``aborted`` can happen in any live state; ``rejected`` only at arrival (admission control).
    """

    WAITING = "waiting"
    RUNNING = "running"
    SUSPENDED = "suspended"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"
    REJECTED = "rejected"


TERMINAL_STATES = frozenset({RequestState.FINISHED, RequestState.ABORTED, RequestState.REJECTED})


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(eq=False)
class Request:
    """One generation request with a TTFT deadline.

    ``priority`` follows vLLM (lower = more urgent) and only breaks ties between equal deadlines.
    ``prefilled`` counts prompt tokens whose KV is computed; ``executed_s`` is the time the
    request's prefill batches have actually been running (from the engine's start/suspend marks).

    Prefix cache (set by the engine at arrival): ``cached_tokens`` of the prompt were found in the
    cache, so ``prefilled`` starts there; ``shares_with`` names a live request whose prefill will
    publish the next ``shared_tokens`` of this prompt (the scheduler may let this one wait for it).
    """

    request_id: str
    prompt_ids: list[int]
    arrival_s: float
    ttft_slo_s: float
    tpot_slo_s: float | None = None
    priority: int = 0
    slo_class: str = "default"
    sheddable: bool = False
    sampling: object = None
    max_tokens: int = 16
    state: RequestState = RequestState.WAITING
    prefilled: int = 0
    executed_s: float = 0.0
    batch_id: int | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    reject_reason: str | None = None
    retry_after_s: float | None = None  # with reject_reason: when a retry may be admitted
    cached_tokens: int = 0
    shares_with: str | None = None
    shared_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"Request.request_id: expected a non-empty string, got {self.request_id!r}")
        if not isinstance(self.prompt_ids, list) or not self.prompt_ids:
            raise ValueError(f"Request.prompt_ids: expected a non-empty list of token ids ({self.request_id})")
        if not _finite(self.arrival_s):
            raise ValueError(f"Request.arrival_s: expected a finite number, got {self.arrival_s!r}")
        if not (_finite(self.ttft_slo_s) and self.ttft_slo_s > 0):
            raise ValueError(f"Request.ttft_slo_s: expected a finite number > 0, got {self.ttft_slo_s!r}")
        if self.tpot_slo_s is not None and not (_finite(self.tpot_slo_s) and self.tpot_slo_s > 0):
            raise ValueError(f"Request.tpot_slo_s: expected None or a number > 0, got {self.tpot_slo_s!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise ValueError(f"Request.priority: expected an integer, got {self.priority!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"Request.max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        if not 0 <= self.prefilled <= len(self.prompt_ids):
            raise ValueError(f"Request.prefilled: expected 0..{len(self.prompt_ids)}, got {self.prefilled!r}")
        if not (isinstance(self.cached_tokens, int) and 0 <= self.cached_tokens < len(self.prompt_ids)):
            raise ValueError(f"Request.cached_tokens: expected 0..{len(self.prompt_ids) - 1} (one token is always "
                             f"computed), got {self.cached_tokens!r}")
        if not (isinstance(self.shared_tokens, int) and 0 <= self.shared_tokens <= len(self.prompt_ids)
                - self.cached_tokens - 1) or (self.shares_with is None) != (self.shared_tokens == 0):
            raise ValueError("Request.shares_with / shared_tokens: a request and a positive count of tokens past the "
                             f"cached ones (leaving one to compute), or neither; got {self.shares_with!r}, "
                             f"{self.shared_tokens!r}")
        self.prefilled = max(self.prefilled, self.cached_tokens)
        if self.state.__class__ is not RequestState:
            self.state = RequestState(self.state)

    @property
    def deadline(self) -> float:
        """Absolute TTFT deadline: ``arrival_s + ttft_slo_s``."""
        return self.arrival_s + self.ttft_slo_s

    def finish_by(self, alpha: float) -> float:
        """When its prefill should be done: its deadline less the margin ``alpha * ttft_slo_s``.

        The margin is what SLO-aware batching keeps and what decode steps interleaved with its
        prefill may not spend: it covers what the replica cannot see (the ingress before the
        arrival stamp, the return path) and the cost model's error.
        """
        return self.deadline - alpha * self.ttft_slo_s

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_ids)

    @property
    def remaining_tokens(self) -> int:
        """Prompt tokens whose KV is not computed yet."""
        return len(self.prompt_ids) - self.prefilled

    @property
    def ttft_s(self) -> float | None:
        """Time to first token (None until the prefill completed)."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def is_terminal(self) -> bool:
        """Finished, aborted or rejected."""
        return self.state in TERMINAL_STATES
