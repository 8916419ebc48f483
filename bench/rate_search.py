"""Goodput searches: the one shared by the in-process benchmark and the simulator, and the
HTTP benchmark's (:func:`find_goodput`: a common grid across systems, medians of repeats at the
boundary, a rate floor and a time budget).

Goodput is the highest rate scale whose replay reaches the attainment goal.  From ``start`` the
scale steps up by 1.5x while the goal is met and down (by 1.5x, or 3x when attainment is far below
the goal, so hopeless policies cost few replays) until the goal is crossed, then the bracket is
bisected geometrically ``refine_steps`` times.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ATTAINMENT_GOAL = 0.9
FAR_BELOW = 0.75  # attainment under this steps down 3x instead of 1.5x
STEP = 1.5


def search_rate_scale(
    attainment_at: Callable[[float], float], start: float, *, max_steps: int, refine_steps: int,
    goal: float = ATTAINMENT_GOAL,
) -> tuple[float, float | None]:
    """``(good, bad)``: the highest scale that met ``goal`` (0.0 if none) and the lowest that did not
    (None if none); ``attainment_at(scale)`` runs one replay and returns its attainment."""
    good, bad, scale = 0.0, None, start
    for _ in range(max_steps):
        attained = attainment_at(scale)
        if attained >= goal:
            good = scale
            if bad is not None:
                break
            scale *= 1.5
        else:
            bad = scale
            if good:
                break
            scale /= 1.5 if attained >= FAR_BELOW else 3.0
    for _ in range(refine_steps if bad is not None and good else 0):
        mid = (good * bad) ** 0.5
        if attainment_at(mid) >= goal:
            good = mid
        else:
            bad = mid
    return good, bad


def grid(start: float, k: int) -> float:
    """The ``k``-th scale of the common grid (rounded, so systems share keys exactly)."""
    return float(f"{start * STEP ** k:.6g}")


@dataclass
class GoodputSearch:
    """What :func:`find_goodput` found: the goodput scale, the bracket and every run per scale.

    ``good`` is the highest scale whose median attainment reached the goal (0.0 if none) and
    ``bad`` the lowest scale above it whose median did not (None if none was tried): the true
    goodput lies in ``[good, bad)``. ``runs`` holds every attainment measured, per scale, in order;
    ``budget_spent`` says the search stopped because its time budget ran out."""

    good: float
    bad: float | None
    runs: dict[float, list[float]]
    budget_spent: bool = False

    def median(self, scale: float) -> float:
        """The median attainment of the runs at ``scale``."""
        return statistics.median(self.runs[scale])


class BudgetSpent(Exception):
    """Raised inside :func:`find_goodput` when its time budget runs out before a run."""


def find_goodput(measure: Callable[[float], float], start: float, *, max_runs: int = 6, refine_steps: int = 2,
                 repeats: int = 1, goal: float = ATTAINMENT_GOAL, min_scale: float = 0.0,
                 out_of_budget: Callable[[], bool] | None = None) -> GoodputSearch:
    """Search the highest scale whose median attainment reaches ``goal``; ``measure(scale)`` runs once
    and returns the attainment. No scale below ``min_scale`` is tried (runs there would take too
    long); if ``min_scale`` itself fails, the goodput is reported as 0.0 (below the floor).

    The search runs each scale once. Then the two scales at the boundary (the best passing and the
    lowest failing above it) are run until each has ``repeats`` runs and judged on their median: a
    boundary scale whose median flips moves the boundary (down to the next passing scale, or up to
    the next failing one) and the new boundary scale is repeated in turn. ``out_of_budget()``,
    asked before every run, stops the search where it is (``budget_spent``)."""
    runs: dict[float, list[float]] = {}

    def median(s: float) -> float:
        return statistics.median(runs[s])

    def run(s: float) -> bool:
        if out_of_budget is not None and out_of_budget():
            raise BudgetSpent
        runs.setdefault(s, []).append(measure(s))
        return median(s) >= goal

    def settled(s: float) -> bool:  # the verdict at s after `repeats` runs
        while len(runs[s]) < repeats:
            run(s)
        return median(s) >= goal

    start = max(start, min_scale)  # the same for every system, so they still share one grid
    good: float | None = None
    bad: float | None = None
    try:
        k = 0
        s = grid(start, 0)
        for _ in range(max_runs):
            if run(s):
                good = s
                if bad is not None:
                    break
                k += 1
            else:
                bad = s
                if good is not None or s <= min_scale:
                    break
                k -= 1 if runs[s][-1] >= FAR_BELOW else 2  # far below the goal: step down faster
            s = max(grid(start, k), min_scale)
        for _ in range(refine_steps if good is not None and bad is not None else 0):
            mid = float(f"{math.sqrt(good * bad):.6g}")
            if mid in runs:
                break
            if run(mid):
                good = mid
            else:
                bad = mid
        while True:  # settle the boundary on medians of `repeats` runs
            if good is not None and not settled(good):
                bad = good
                good = max((x for x in runs if x < bad and median(x) >= goal), default=None)
            elif bad is not None and settled(bad):
                good = bad
                bad = min((x for x in runs if x > good and median(x) < goal), default=None)
            else:
                break
    except BudgetSpent:
        return GoodputSearch(good or 0.0, bad, runs, budget_spent=True)
    return GoodputSearch(good or 0.0, bad, runs)


def fixed_rate(measure: Callable[[float], float], scale: float, runs: int, *,
               goal: float = ATTAINMENT_GOAL) -> GoodputSearch:
    """No search: ``runs`` identical replays at ``scale`` (their spread is the point), judged on their
    median like a searched rate (``good`` = ``scale`` when the median meets ``goal``, else ``bad``)."""
    if runs < 1:
        raise ValueError(f"need at least 1 run, got {runs}")
    attained = [measure(scale) for _ in range(runs)]
    passed = statistics.median(attained) >= goal
    return GoodputSearch(scale if passed else 0.0, None if passed else scale, {scale: attained})


def point_text(point: dict[str, Any]) -> str:
    """A measured rate for a report line: ``rate: median [min-max] xruns`` (``rate: attainment`` for one
    run), from a point with ``rate_rps``, ``attainment`` (the median), its min/max and ``repeats``."""
    runs = len(point.get("repeats") or [])
    rate = point.get("rate_rps", float("nan"))
    if runs <= 1:
        return f"{rate:.2f}: {point['attainment']:.2f}"
    return (f"{rate:.2f}: {point['attainment']:.2f} "
            f"[{point['attainment_min']:.2f}-{point['attainment_max']:.2f}] x{runs}")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run summary whose ``attainment`` is the median of ``runs`` (the lower middle for an even
    count; ``{}`` for none): the run a report shows for a repeated rate."""
    ordered = sorted(runs, key=lambda r: r.get("attainment", 0.0))
    return ordered[(len(ordered) - 1) // 2] if ordered else {}
