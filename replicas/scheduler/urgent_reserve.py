"""Capacity kept for more urgent SLO classes when admitting a request under overload.

Slack-gated EDF runs the most urgent feasible work first, but admission decides on the work
*already* queued. Under a burst that is not enough: a standard request admitted now, with seconds
of slack, is overtaken by every interactive request that arrives before its deadline, so it
either misses after using capacity, or (admitted early enough) fills the queue with feasible work
that then sits ahead of interactive requests whose deadlines fall later. Either way the urgent
class gets less than the capacity allows. In the simulator (tests/test_urgent_reserve.py)
interactive requests offered at 0.6 of a replica beside 1.2 of standard work got 0.47-0.54 of
their SLOs without the reserve and 0.94-0.97 with it.

:class:`UrgentReserve` records the predicted prefill seconds *offered* per TTFT SLO over the last
``window_s`` seconds (refused arrivals included: an urgent request refused now still wants that
capacity). For a request of class ``c`` with TTFT SLO ``s`` the reserved share ``u`` is the offered
work per second of the arrivals of *other* classes with an SLO below ``s`` (requests of one class
carry SLOs of their own, so a tighter one of the same class is not "more urgent": within a class
EDF decides, as before). While it waits, such work keeps arriving and runs
first, so the request's predicted finish becomes ``now + (ahead + own) / (1 - u)`` (a fluid
model: a server giving share ``u`` to others serves the rest at rate ``1 - u``). With ``u`` at
:data:`MAX_SHARE` or more, the urgent classes alone fill the replica and the request is refused.
The most urgent class has nothing reserved against it, so it is admitted exactly as before.

The offered work is averaged over a horizon as long as the request's own TTFT SLO, never shorter
than ``window_s`` nor longer than :data:`MAX_HORIZON_S` (and no longer than the history the
replica has): a burst of urgent work shorter than a request's SLO passes while it waits. Averaged
over 5 s alone, urgent bursts of a multi-turn window at FlowPrefill's goodput offered 99-132% of
the replica and refused batch requests whose 60 s SLO they could have met (2026-12-04: 4 of 25
batch requests in every replay, `bench serve --fixed-rate 2.2`). And a burst that has stopped no
longer arrives: the share is the smaller of that mean and the mean over the last ``window_s``, so
the urgent work a burst left in the queue counts (as work ahead) but its arrivals do not, once
``window_s`` has passed without them. Over the horizon alone, `bench overload` refused every batch
request of the 30 s after a 10x burst (0 of 18).
"""

from __future__ import annotations

import math
from collections import deque

MAX_SHARE = 0.95  # reserved share at which a less urgent request can no longer be predicted to finish
MAX_HORIZON_S = 60.0  # the longest horizon the offered work is averaged over (and kept for)


class UrgentReserve:
    """Offered prefill work per TTFT SLO over a sliding window (times from the scheduler's clock)."""

    def __init__(self, window_s: float = 5.0) -> None:
        if isinstance(window_s, bool) or not isinstance(window_s, int | float) or not 0 < window_s < math.inf:
            raise ValueError(f"urgent_reserve_window_s: expected a finite number of seconds > 0, got {window_s!r}")
        self.window_s = float(window_s)
        self.keep_s = max(self.window_s, MAX_HORIZON_S)
        self._offered: deque[tuple[float, str, float, float]] = deque()  # (arrival, class, ttft_slo_s, predicted_s)
        self._since: float | None = None  # the first arrival recorded: the history there is

    def record(self, slo_class: str, ttft_slo_s: float, predicted_s: float, now: float) -> None:
        """An arrival of ``slo_class`` offering ``predicted_s`` of prefill with TTFT SLO ``ttft_slo_s``."""
        self._offered.append((now, slo_class, ttft_slo_s, max(predicted_s, 0.0)))
        if self._since is None:
            self._since = now
        self._expire(now)

    def horizon_s(self, ttft_slo_s: float, now: float) -> float:
        """The seconds of history averaged for a request with TTFT SLO ``ttft_slo_s``: its SLO,
        clamped to [``window_s``, :data:`MAX_HORIZON_S`], and no more than recorded (but ``window_s``)."""
        horizon = min(max(ttft_slo_s, self.window_s), self.keep_s)
        history = now - self._since if self._since is not None else 0.0
        return max(min(horizon, history), self.window_s)

    def share_above(self, slo_class: str, ttft_slo_s: float, now: float) -> float:
        """Offered work per second of other classes' arrivals with an SLO tighter than ``ttft_slo_s``:
        the smaller of its mean over :meth:`horizon_s` and over the last ``window_s`` (module docstring)."""
        self._expire(now)
        horizon = self.horizon_s(ttft_slo_s, now)
        start, recent_start = now - horizon, now - self.window_s
        offered = recent = 0.0
        for at, c, slo, p in reversed(self._offered):
            if at < start:
                break
            if slo < ttft_slo_s and c != slo_class:
                offered += p
                if at >= recent_start:
                    recent += p
        return min(offered / horizon, recent / self.window_s)

    def _expire(self, now: float) -> None:
        horizon = now - self.keep_s
        while self._offered and self._offered[0][0] < horizon:
            self._offered.popleft()
