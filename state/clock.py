"""The serving path's one clock: Unix epoch seconds, as a type.

A request's timestamps cross processes and machines: the ingress stamps its arrival, the replica's
scheduler orders it by ``arrival + TTFT SLO``, routers compare that deadline with replica states
in Redis written by other processes, the journal keeps it for re-dispatch. Only a clock that every
process reads alike can carry that, so every timestamp from ingress to engine is **Unix epoch
seconds** (``time.time()``). ``time.monotonic`` counts from an arbitrary point per machine (per
boot): mixed with epoch times it put deadlines decades away or in the past.

So a component that stamps or compares timestamps takes a :class:`Clock`, not a bare callable:
:data:`WALL_CLOCK` in production, a :class:`ManualClock` in deterministic tests, and
:func:`require_clock` refuses anything else (``time.monotonic`` included) at construction.
Durations (profiling, scheduling-pass timings, decode step times) are measured with
``time.perf_counter`` and never compared with timestamps. The scheduler itself takes the
timestamps it is given (``now`` in every event) and reads no clock at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Clock:
    """A source of epoch-second timestamps; call it for "now"."""

    __slots__ = ("_read", "name")

    def __init__(self, read: Callable[[], float], name: str) -> None:
        self._read = read
        self.name = name

    def __call__(self) -> float:
        return self._read()

    def __repr__(self) -> str:
        return f"Clock({self.name})"


#: The production clock: ``time.time()``.
WALL_CLOCK = Clock(time.time, "wall")


class ManualClock(Clock):
    """A clock that moves only when told (tests); it starts at ``start`` epoch seconds."""

    __slots__ = ("now",)

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        super().__init__(lambda: self.now, "manual")
        self.now = float(start)

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds``; returns the new time."""
        if seconds < 0:
            raise ValueError(f"ManualClock.advance: seconds must be >= 0, got {seconds!r}")
        self.now += seconds
        return self.now

    def set(self, now: float) -> None:
        """Jump to ``now`` (forward or back: a test may replay the same instant)."""
        self.now = float(now)


def require_clock(clock: object, where: str) -> Clock:
    """``clock`` if it is a :class:`Clock`; otherwise a TypeError naming ``where`` (e.g. a bare
    ``time.monotonic``, whose timestamps would not compare with the ingress's epoch times)."""
    if not isinstance(clock, Clock):
        raise TypeError(f"{where}: clock must be a state.clock.Clock of epoch seconds (WALL_CLOCK, or a ManualClock "
                        f"in tests), got {clock!r}")
    return clock
