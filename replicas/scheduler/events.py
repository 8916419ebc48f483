"""Events the engine (or a simulator) feeds the scheduler, and the decision it gets back.

The scheduler reacts only to these events; each returns a :class:`Decision` that the engine
applies before delivering the next event (see :class:`~replicas.scheduler.core.Scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass

from replicas.scheduler.request import Request


@dataclass(frozen=True)
class Arrival:
    """A request reached the replica."""

    request: Request
    now: float


@dataclass(frozen=True)
class PrefillComplete:
    """The prefill program of ``batch_id`` ran to its end."""

    batch_id: int
    now: float


@dataclass(frozen=True)
class Abort:
    """The client went away or the router cancelled ``request_id`` (any state)."""

    request_id: str
    now: float


@dataclass(frozen=True)
class Finish:
    """Decoding of ``request_id`` ended (EOS or ``max_tokens``)."""

    request_id: str
    now: float


Event = Arrival | PrefillComplete | Abort | Finish


@dataclass(frozen=True)
class BatchPlan:
    """A prefill program for the executor.

    ``ranges[i] = (start, end)`` is the prompt-token range of ``request_ids[i]`` this program
    computes (``flowprefill``/``fcfs``: ``prefilled`` to the prompt end; ``chunked``: one slice).
    ``resume=True``: resume the suspended program of ``batch_id`` (its ``request_ids`` are the
    members still alive; aborted members' slots are computed and ignored); ``False``: build a new one.
    """

    batch_id: int
    request_ids: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    resume: bool = False

    def __post_init__(self) -> None:
        if len(self.request_ids) != len(self.ranges):
            raise ValueError(f"BatchPlan.ranges: {len(self.ranges)} ranges for {len(self.request_ids)} requests")
        if not self.request_ids:
            raise ValueError("BatchPlan.request_ids: a batch needs at least one request")
        for start, end in self.ranges:
            if not 0 <= start < end:
                raise ValueError(f"BatchPlan.ranges: invalid range [{start}, {end})")

    @property
    def num_tokens(self) -> int:
        """Prompt tokens this program computes."""
        return sum(end - start for start, end in self.ranges)


@dataclass(frozen=True)
class Decision:
    """What the engine must do after an event, in this order.

    1. ``dropped``: discard these programs (all their members were aborted; running or suspended).
    2. ``preempt_running``: suspend the running program at its next operator boundary and keep it.
    3. ``run``: start (``resume=False``) or resume this program; ``None`` = keep running the
       current program, if any, else stay idle. A later decision's ``run`` supersedes a plan the
       engine has not started yet.

    ``freed``: requests whose KV the scheduler released through ``MemoryView.release`` during
    this event (aborted, finished, or aborted members of a program that has now ended; a member
    aborted while its program is alive is released when that program ends); drop their other
    per-request state too.

    ``prefilled``: requests whose prompt is fully prefilled by this event (now decoding).
    ``rejected``: requests refused by admission control, or expired while waiting
    (``late_reject_factor``). ``memory_blocked``: the policy held work back because KV memory was
    short (the scheduler re-plans when a request finishes).
    """

    run: BatchPlan | None = None
    preempt_running: bool = False
    dropped: tuple[int, ...] = ()
    freed: tuple[str, ...] = ()
    prefilled: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()
    memory_blocked: bool = False


IDLE = Decision()
