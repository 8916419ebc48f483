"""The goodput search shared by bench policies and bench sim (bench.rate_search)."""

from __future__ import annotations

import pytest

from bench.rate_search import search_rate_scale


def _capacity(limit: float, tried: list[float]):
    def attainment_at(scale: float) -> float:
        tried.append(scale)
        return 1.0 if scale <= limit else (0.8 if scale <= 2 * limit else 0.1)
    return attainment_at


def test_steps_up_until_the_goal_is_missed_then_bisects():
    tried: list[float] = []
    good, bad = search_rate_scale(_capacity(3.0, tried), 1.0, max_steps=8, refine_steps=3)
    assert tried[:4] == [1.0, 1.5, 2.25, pytest.approx(3.375)]
    assert good <= 3.0 < bad and bad / good < 1.1  # three geometric bisections of [2.25, 3.375]


def test_steps_down_fast_when_far_below_the_goal():
    tried: list[float] = []
    good, bad = search_rate_scale(_capacity(0.1, tried), 9.0, max_steps=8, refine_steps=0)
    assert tried[:3] == [9.0, 3.0, 1.0]  # attainment 0.1: 3x steps
    # ... down to 1/9 (attainment 0.8: near the goal), then one 1.5x step to a scale that meets it.
    assert good == pytest.approx(1 / 9 / 1.5) and bad == pytest.approx(1 / 9)


def test_no_scale_meets_the_goal():
    good, bad = search_rate_scale(lambda s: 0.0, 1.0, max_steps=4, refine_steps=2)
    assert good == 0.0 and bad == pytest.approx(1 / 27)
