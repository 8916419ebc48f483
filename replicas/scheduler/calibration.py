"""Online correction of the profiled cost model: how much slower prefill runs than predicted.

The cost model is profiled on an idle replica. Under load the same prefill computes more slowly:
HTTP handling, the router and Ray share the CPU, a GPU shares its memory bandwidth with decode.
A scheduler that trusts the idle profile admits work it cannot finish in time and every admitted
request misses its deadline together. :class:`CostCalibration` learns the slowdown from each
completed prefill program (the executor's time on it over the idle prediction for the same
tokens) as an exponentially weighted mean in log space, and the scheduler scales every prediction
by it. Decode steps interleaved with a program are not part of its measured time: an urgent
prefill skips them, so counting them would make urgent requests look later than they are.
Nothing here reads a clock: the scheduler passes both durations in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class CostCalibration:
    """EWMA of ``log(measured / predicted)`` over completed prefill programs.

    ``weight`` is the share of a new sample; ``low``/``high`` clamp the factor (a clock glitch or
    one stalled program must not make the replica refuse everything); programs predicted to take
    less than ``min_predicted_s`` are ignored (timer granularity and per-pass overhead dominate
    them). :meth:`observe` returns a new factor only when it moved by more than ``hysteresis``
    (relative) from the one in use, so predictions are rescaled rarely.
    """

    weight: float = 0.2
    low: float = 0.5
    high: float = 4.0
    hysteresis: float = 0.05
    min_predicted_s: float = 0.005
    samples: int = 0
    factor: float = 1.0  # the factor in use
    _log_ratio: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"CostCalibration.weight: expected a number in (0, 1], got {self.weight!r}")
        if not 0.0 < self.low <= 1.0 <= self.high < math.inf:
            msg = f"expected 0 < low <= 1 <= high, got {self.low!r}, {self.high!r}"
            raise ValueError(f"CostCalibration.low/high: {msg}")
        if not 0.0 <= self.hysteresis < 1.0:
            raise ValueError(f"CostCalibration.hysteresis: expected a number in [0, 1), got {self.hysteresis!r}")

    @property
    def estimate(self) -> float:
        """The current (clamped) slowdown estimate, applied or not."""
        return min(max(math.exp(self._log_ratio), self.low), self.high)

    def observe(self, predicted_s: float, measured_s: float) -> float | None:
        """Take one program's idle prediction and measured running time; the new factor or None."""
        if not (predicted_s >= self.min_predicted_s and 0.0 < measured_s < math.inf):
            return None
        ratio = min(max(measured_s / predicted_s, self.low), self.high)
        self._log_ratio += self.weight * (math.log(ratio) - self._log_ratio)
        self.samples += 1
        new = self.estimate
        if abs(new / self.factor - 1.0) <= self.hysteresis:
            return None
        self.factor = new
        return new
