"""When a decode step interleaves with a running prefill: the engine's rule, shared with the simulator.

Torch-free: :class:`~replicas.engine_decode.DecodeBatcher` (the native engine) asks :meth:`DecodeCadence.due`
at operator boundaries, and the cluster simulator (``bench/sim/replica.py``) asks
:meth:`DecodeCadence.due_at` when that predicate first turns true, so both follow one implementation.

The rule: a step runs as late as the TPOT target allows (the gap since the last step plus one
step's time reaches the target) and not while the running prefill is urgent (a step now would
push its predicted end past the earliest finish-by time of its members: their deadlines less the
batching margin, :meth:`~replicas.scheduler.request.Request.finish_by`), unless decoding has
already waited :data:`MAX_DECODE_GAP_FACTOR` times its target: TTFT first, TPOT bounded. Steps
may not spend the margin: SLO-aware batching packs a batch up to it, so a step that did would
leave nothing for the cost model's error and the return path, and the batch's interactive
members reached their client just after their deadline (``bench serve --fixed-rate`` replays: most
misses under 150 ms late, README's "Where the run-to-run spread comes from").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Decode never waits longer than this multiple of the TPOT target, however urgent prefill is.
MAX_DECODE_GAP_FACTOR = 2.0
#: Weight of the newest step in the smoothed step time.
STEP_EMA_WEIGHT = 0.2


@dataclass(frozen=True)
class DecodeForecast:
    """The decode steps the cadence will force into urgent prefill from now on.

    A step is forced at ``next_forced_s`` and then every ``max_gap_s`` after the previous one
    ended, each taking ``step_s``, however urgent the prefill: SLO-aware batching counts them so
    that a batch packed up to its head's margin still makes it (README: Where the run-to-run spread
    comes from).
    """

    next_forced_s: float
    max_gap_s: float
    step_s: float

    def seconds_within(self, start: float, work_s: float) -> float:
        """Seconds of forced steps inside ``work_s`` seconds of prefill that runs from ``start``."""
        if self.step_s <= 0.0:
            return 0.0
        total, at, end = 0.0, max(self.next_forced_s, start), start + work_s
        while at < end:  # each step pushes the prefill's end out by its own length
            total += self.step_s
            end += self.step_s
            at += self.step_s + self.max_gap_s
        return total


def _smoothed(mean: float, sample: float) -> float:
    return sample if mean == 0 else (1 - STEP_EMA_WEIGHT) * mean + STEP_EMA_WEIGHT * sample


class DecodeCadence:
    """The last decode step's end and the smoothed step time, and the rule that reads them."""

    def __init__(self) -> None:
        self.last_step_end = -math.inf
        self.step_ema_s = 0.0  # smoothed duration of a decode step (0 until the first one)
        self._by_size: dict[int, float] = {}  # sequences in a step -> smoothed duration of such steps

    def record_step(self, started: float, ended: float, sequences: int = 0) -> None:
        """A decode step of ``sequences`` sequences (0: not said) ran from ``started`` to ``ended``."""
        took = ended - started
        self.last_step_end = ended
        self.step_ema_s = _smoothed(self.step_ema_s, took)
        if sequences > 0:
            self._by_size[sequences] = _smoothed(self._by_size.get(sequences, 0.0), took)

    def step_s(self, sequences: int = 0) -> float:
        """The next step's predicted time for ``sequences`` sequences: the smoothed time of steps of
        that size, interpolated between the sizes seen, beyond the largest proportionally (a step
        grows less than linearly), below the smallest as the smallest; 0 (or no sizes seen): the
        smoothed time of any step. A burst that doubles the decoding batch makes the next step
        longer at once, where the overall mean follows it only over several steps."""
        known = self._by_size
        if sequences <= 0 or not known:
            return self.step_ema_s
        if sequences in known:
            return known[sequences]
        below = max((n for n in known if n < sequences), default=None)
        above = min((n for n in known if n > sequences), default=None)
        if above is None:
            return known[below] * sequences / below  # type: ignore[index,operator]
        if below is None:
            return known[above]
        w = (sequences - below) / (above - below)
        return (1.0 - w) * known[below] + w * known[above]

    def forecast(self, tpot_target_s: float, sequences: int = 0) -> DecodeForecast:
        """The steps this cadence forces into urgent prefill while ``sequences`` decode at this target."""
        gap = MAX_DECODE_GAP_FACTOR * tpot_target_s
        return DecodeForecast(self.last_step_end + gap, gap, self.step_s(sequences))

    def urgent_after(self, finish_by: float, remaining_s: float, sequences: int = 0) -> float:
        """The time after which a running prefill with this earliest ``finish_by`` and ``remaining_s``
        predicted seconds is urgent: one more step of ``sequences`` would make it late (``inf``: never)."""
        return finish_by - remaining_s - self.step_s(sequences)

    def prefill_urgent(self, now: float, finish_by: float, remaining_s: float, sequences: int = 0) -> bool:
        """Whether a decode step of ``sequences`` at ``now`` would push that prefill past ``finish_by``."""
        return now > self.urgent_after(finish_by, remaining_s, sequences)

    def due(self, now: float, tpot_target_s: float, prefill_urgent: bool) -> bool:
        """Whether a step should interleave with the running prefill at ``now`` (module docstring)."""
        gap = now - self.last_step_end
        if gap >= MAX_DECODE_GAP_FACTOR * tpot_target_s:
            return True
        return gap + self.step_ema_s >= tpot_target_s and not prefill_urgent

    def due_at(self, tpot_target_s: float, urgent_after: float = math.inf, not_before: float = -math.inf) -> float:
        """The first time from ``not_before`` on at which :meth:`due` is true, for a prefill that turns
        urgent after ``urgent_after``: urgency only grows with time, so either the earliest time the
        cadence allows is not urgent yet, or decoding waits for the longest gap."""
        latest = self.last_step_end + MAX_DECODE_GAP_FACTOR * tpot_target_s
        early = max(self.last_step_end + tpot_target_s - self.step_ema_s, not_before)
        if early < latest:
            if early <= urgent_after:
                return early
            # `early` may round just past a tie with the urgency instant, where the prefill is not urgent yet
            if not_before <= urgent_after < latest and self.due(urgent_after, tpot_target_s, prefill_urgent=False):
                return urgent_after
        return max(latest, not_before)
