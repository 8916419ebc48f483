"""Goodput searches: the one shared by the in-process benchmark and the simulator, and the
HTTP benchmark's (:func:`find_goodput`: a common grid across systems, repeats at the boundary and
a rate floor).

Goodput is the highest rate scale whose replay reaches the attainment goal.  From ``start`` the
scale steps up by 1.5x while the goal is met and down (by 1.5x, or 3x when attainment is far below
the goal, so hopeless policies cost few replays) until the goal is crossed, then the bracket is
bisected geometrically ``refine_steps`` times.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def find_goodput(measure: Callable[[float], float], start: float, *, max_runs: int = 6, refine_steps: int = 2,
                 repeats: int = 1, goal: float = ATTAINMENT_GOAL,
                 min_scale: float = 0.0) -> tuple[float, dict[float, list[float]]]:
    """Search the highest scale whose mean attainment reaches ``goal``; ``measure(scale)`` runs once
    and returns the attainment. No scale below ``min_scale`` is tried (runs there would take too
    long); if ``min_scale`` itself fails, the goodput is reported as 0.0 (below the floor).
    Returns the goodput scale (0.0 if none passed) and all runs per scale."""
    runs: dict[float, list[float]] = {}

    def mean(s: float) -> float:
        return sum(runs[s]) / len(runs[s])

    def run(s: float) -> bool:
        runs.setdefault(s, []).append(measure(s))
        return mean(s) >= goal

    start = max(start, min_scale)  # the same for every system, so they still share one grid
    good, bad, k = None, None, 0
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
    while good is not None and repeats > 0:  # confirm the boundary; fall back to the next passing scale
        for _ in range(repeats):
            run(good)
        if mean(good) >= goal:
            break
        lower = [s for s in runs if s < good and mean(s) >= goal]
        good = max(lower) if lower else None
    return (good or 0.0), runs
