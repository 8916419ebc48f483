"""The goodput search shared by the in-process benchmark and the simulator.

Goodput is the highest rate scale whose replay reaches the attainment goal.  From ``start`` the
scale steps up by 1.5x while the goal is met and down (by 1.5x, or 3x when attainment is far below
the goal, so hopeless policies cost few replays) until the goal is crossed, then the bracket is
bisected geometrically ``refine_steps`` times.
"""

from __future__ import annotations

from collections.abc import Callable

ATTAINMENT_GOAL = 0.9
FAR_BELOW = 0.75  # attainment under this steps down 3x instead of 1.5x


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
