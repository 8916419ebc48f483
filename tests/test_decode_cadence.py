"""The decode cadence rule (replicas/decode_cadence.py) that the engine and the simulator share."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicas.decode_cadence import MAX_DECODE_GAP_FACTOR, DecodeCadence, DecodeForecast


def _cadence(last: float, ema: float) -> DecodeCadence:
    c = DecodeCadence()
    c.record_step(last - ema, last)  # the first step sets the EMA to its own duration
    assert c.step_ema_s == pytest.approx(ema) and c.last_step_end == last
    return c


@settings(max_examples=300, deadline=None)
@given(last=st.floats(0, 100), ema=st.floats(0, 0.5), tpot=st.floats(0.01, 1.0),
       urgent_in=st.one_of(st.just(math.inf), st.floats(-1.0, 3.0)))
def test_due_at_is_the_first_instant_the_engine_predicate_turns_true(last, ema, tpot, urgent_in):
    """What the simulator schedules (due_at) is when the engine's check at every boundary (due) first says yes."""
    c = _cadence(last, ema)
    urgent_after = last + urgent_in
    at = c.due_at(tpot, urgent_after, not_before=last)  # the engine asks only after the last step
    assert at <= last + MAX_DECODE_GAP_FACTOR * tpot + 1e-9
    # due at that instant (its gap read a rounding step later: ties are equal up to floating point) ...
    assert c.due(at + 1e-9 * max(1.0, at), tpot, at > urgent_after)
    step = tpot / 200
    t = last
    while t < at - 2 * step:  # ... and at no boundary before it
        assert not c.due(t, tpot, t > urgent_after), (t, at)
        t += step


def test_due_at_keeps_a_floating_point_tie_with_the_urgency_instant():
    """last + tpot - ema can round just past `last` when ema == tpot; the engine is due at `last` itself."""
    last, ema = 0.4066380448357444, 0.322133830425029
    c = _cadence(last, ema)
    assert c.due(last, ema, prefill_urgent=False)
    assert c.due_at(ema, urgent_after=last, not_before=last) == last


def test_an_urgent_prefill_delays_decode_to_twice_the_target_and_never_longer():
    c = _cadence(10.0, 0.05)
    assert c.due_at(0.5) == pytest.approx(10.45)  # as late as the target allows: gap + one step = target
    assert c.due_at(0.5, urgent_after=10.2) == pytest.approx(11.0)  # urgent from before then: 2 x target
    assert c.prefill_urgent(10.3, finish_by=10.6, remaining_s=0.28) and not c.prefill_urgent(10.2, 10.6, 0.28)
    assert c.due(11.0, 0.5, prefill_urgent=True) and not c.due(10.9, 0.5, prefill_urgent=True)


def test_the_step_time_is_smoothed_after_the_first_step():
    c = DecodeCadence()
    assert c.due(0.0, 0.5, prefill_urgent=True)  # never stepped: due at once
    c.record_step(0.0, 0.1)
    c.record_step(1.0, 1.2)
    assert c.step_ema_s == pytest.approx(0.8 * 0.1 + 0.2 * 0.2) and c.last_step_end == 1.2


def test_the_forecast_counts_each_forced_step_and_the_time_it_adds():
    f = DecodeForecast(next_forced_s=1.0, max_gap_s=1.0, step_s=0.1)
    assert f.seconds_within(0.0, 0.5) == 0.0  # done before the first forced step
    assert f.seconds_within(0.0, 1.5) == pytest.approx(0.1)  # one step at 1.0; the next is due at 2.1
    assert f.seconds_within(0.0, 2.05) == pytest.approx(0.2)  # the first step pushed the end past 2.1
    assert f.seconds_within(5.0, 0.5) == pytest.approx(0.1)  # overdue: a step right at the start
    assert DecodeForecast(1.0, 1.0, 0.0).seconds_within(0.0, 10.0) == 0.0  # no step measured yet


def test_the_cadence_forecasts_its_longest_gap_and_smoothed_step():
    c = _cadence(10.0, 0.05)
    assert c.forecast(0.5) == DecodeForecast(next_forced_s=10.0 + MAX_DECODE_GAP_FACTOR * 0.5,
                                             max_gap_s=MAX_DECODE_GAP_FACTOR * 0.5, step_s=pytest.approx(0.05))


def test_the_step_time_is_kept_per_batch_size_and_a_larger_batch_is_predicted_longer():
    c = DecodeCadence()
    assert c.step_s(4) == 0.0  # nothing measured
    c.record_step(0.0, 0.05, sequences=1)
    c.record_step(1.0, 1.15, sequences=5)
    assert c.step_s(1) == pytest.approx(0.05) and c.step_s(5) == pytest.approx(0.15)
    assert c.step_s(3) == pytest.approx(0.10)  # between two sizes seen: interpolated
    assert c.step_s(10) == pytest.approx(0.30)  # past the largest: proportionally, an upper bound
    assert c.step_s(0) == pytest.approx(c.step_ema_s)  # size not said: any step's mean
    # the burst case: the mean still remembers the small steps, the size table does not
    assert c.step_ema_s < c.step_s(5)
    assert c.urgent_after(10.0, 1.0, sequences=5) == pytest.approx(10.0 - 1.0 - 0.15)
    assert c.forecast(0.5, sequences=10).step_s == pytest.approx(0.30)
