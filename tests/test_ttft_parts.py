"""The TTFT decomposition: the engine's timing of each request on a real (tiny) model, and the
typed records that carry it to the client (:mod:`replicas.ttft_parts`)."""

import json
import math

import pytest

from replicas.engine_types import RequestOutput
from replicas.sampling_params import SamplingParams
from replicas.ttft_parts import (
    PARTS,
    EngineTTFT,
    TTFTParts,
    TTFTPartsError,
    TTFTTimer,
    engine_ttft_of,
    parse_ttft_parts,
)
from tests.test_engine import _engine, _run_long_then_short

# The engine's four parts add up to its TTFT (first token minus acceptance) up to the bookkeeping
# between the marks (admission and scheduling passes while a batch runs): stated tolerance.
TOLERANCE_ABS_S = 2e-3
TOLERANCE_REL = 0.02
LONGER = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", seed=4, num_layers=6, hidden_size=128, intermediate_size=256)


def _timing(outputs: list[RequestOutput]) -> EngineTTFT:
    first = next(out for out in outputs if out.token_ids)
    assert all(out.ttft_timing is None for out in outputs if out is not first)  # only the first carries it
    assert isinstance(first.ttft_timing, EngineTTFT)
    return first.ttft_timing


def _assert_adds_up(t: EngineTTFT) -> None:
    assert min(t.queue_s, t.prefill_s, t.suspended_s, t.decode_interleave_s) >= 0
    assert t.first_token_s >= t.accepted_s
    gap = t.engine_ttft_s - t.parts_s
    assert abs(gap) <= TOLERANCE_ABS_S + TOLERANCE_REL * t.engine_ttft_s, (t, gap)


@pytest.mark.parametrize("policy, settings", [
    ("flowprefill", {"granularity": "block"}),
    ("chunked", {"granularity": "none", "policy_chunk_tokens": 256}),
])
def test_a_preempted_long_prefill_reports_its_suspension_and_every_request_adds_up(model_dir, policy, settings):
    engine = _engine(model_dir, policy=policy, **settings)
    try:
        got = _run_long_then_short(engine)
    finally:
        engine.shutdown()
    long, short = _timing(got.outputs["long"]), _timing(got.outputs["short"])
    for t in (long, short):
        _assert_adds_up(t)
    assert long.prefill_s > short.prefill_s
    assert short.suspended_s == 0.0  # started once, ran to its first token
    assert short.first_token_s < long.first_token_s
    if policy == "flowprefill":
        # the long prompt was set aside while the short one ran: at least the short one's compute
        assert long.suspended_s > 0
        assert long.suspended_s >= 0.5 * short.prefill_s
        assert long.queue_s < long.prefill_s  # it started at once
        # the short one started inside the long one's suspension
        assert long.accepted_s + long.queue_s <= short.accepted_s + short.queue_s <= long.first_token_s
    # chunked batches the short prompt with the long one's next chunk, so the long one is never set aside


def test_decode_steps_inside_a_running_prefill_are_its_decode_interleave(model_dir):
    """A decoding request's steps between operators of a long prefill count for the long one."""
    import threading

    from tests.test_engine import Collector, _request

    engine = _engine(model_dir, policy="flowprefill", granularity="block", default_tpot_slo_s=0.001)
    got = Collector()
    decoding = threading.Event()

    def on_state(_stats) -> None:
        if "first" in engine.decoder.active and not decoding.is_set():
            decoding.set()
            engine.add_request(_request("long", 1500, 60.0, engine.clock(), seed=1), LONGER, got.sink("long"))

    engine.on_state_change = on_state
    try:
        engine.add_request(_request("first", 12, 60.0, engine.clock(), seed=2),
                           SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), got.sink("first"))
        got.wait("first", "long")
    finally:
        engine.shutdown()
    long = _timing(got.outputs["long"])
    _assert_adds_up(long)
    assert engine.counters["decode_steps"] > 0
    assert long.decode_interleave_s > 0
    assert long.suspended_s == 0.0
    # the engine tells the cadence each step's size (one or two sequences here): a step of 64 is
    # predicted from those, scaled up, not as the mean of any step
    cadence = engine.decoder.cadence
    assert cadence.step_s(1) > 0 and cadence.step_s(64) > 10 * cadence.step_ema_s


def test_timer_marks_by_hand():
    timer = TTFTTimer(accepted_s=100.0)
    timer.computed(5.0)  # not running yet: ignored
    timer.started(100.5)  # queue 0.5
    timer.computed(0.25)
    timer.interleaved(0.125)
    timer.stopped(101.0)
    timer.interleaved(9.0)  # suspended: a decode step then is not its interleave
    timer.started(101.75)  # suspended 0.75
    timer.started(101.8)  # already running: no-op
    timer.computed(0.5)
    t = timer.finished(prefill_end_s=102.5, first_token_s=102.625)
    assert (t.queue_s, t.prefill_s, t.suspended_s, t.decode_interleave_s) == (0.5, 0.875, 0.75, 0.125)
    assert t.engine_ttft_s == pytest.approx(2.625) and t.parts_s == pytest.approx(2.25)
    assert EngineTTFT.from_dict(t.to_dict()) == t


def test_parts_assemble_from_the_ingress_and_engine_marks():
    engine = EngineTTFT(accepted_s=10.25, first_token_s=11.5, queue_s=0.25, prefill_s=0.5, suspended_s=0.375,
                        decode_interleave_s=0.125)
    parts = TTFTParts.assemble(arrival_s=10.0, dispatched_s=10.125, engine=engine, received_s=11.625)
    assert parts.to_dict() == {"ingress_s": 0.125, "handle_s": 0.125, "queue_s": 0.25, "prefill_s": 0.5,
                               "suspended_s": 0.375, "decode_interleave_s": 0.125, "return_s": 0.125}
    assert parts.total_s == pytest.approx(11.625 - 10.0)
    assert tuple(parts.to_dict()) == PARTS
    assert TTFTParts.from_dict(json.loads(parts.to_header())) == parts
    assert parse_ttft_parts(parts.to_header()) == parts
    assert parse_ttft_parts(parts.to_header().encode()) == parts
    # a clock skew between the ingress's and the replica's machine may make a cross-process part negative
    skewed = TTFTParts.from_dict({**parts.to_dict(), "handle_s": -0.001})
    assert skewed.handle_s == -0.001


@pytest.mark.parametrize("bad, field", [
    ({"queue_s": -0.1}, "ttft_parts.queue_s"),
    ({"prefill_s": "0.1"}, "ttft_parts.prefill_s"),
    ({"return_s": math.inf}, "ttft_parts.return_s"),
    ({"ingress_s": True}, "ttft_parts.ingress_s"),
])
def test_parts_validation_names_the_field(bad, field):
    good = dict.fromkeys(PARTS, 0.01)
    with pytest.raises(TTFTPartsError) as exc:
        TTFTParts.from_dict({**good, **bad})
    assert exc.value.field == field
    missing = {k: v for k, v in good.items() if k != "suspended_s"}
    with pytest.raises(TTFTPartsError, match="suspended_s"):
        TTFTParts.from_dict(missing)


@pytest.mark.parametrize("value", [
    None, "", "not json", b"\xff\xfe", "[1, 2]", "3", '{"queue_s": 0.1}', {"queue_s": "x"},
    json.dumps({**dict.fromkeys(PARTS, 0.01), "prefill_s": -1}), ["ingress_s"], 42,
    '{"ingress_s": NaN, "handle_s": 0, "queue_s": 0, "prefill_s": 0, "suspended_s": 0, '
    '"decode_interleave_s": 0, "return_s": 0}',
])
def test_malformed_parts_parse_to_none(value):
    assert parse_ttft_parts(value) is None


def test_engine_timing_of_an_output_field():
    t = EngineTTFT(1.0, 2.0, 0.1, 0.2, 0.3, 0.4)
    assert engine_ttft_of(t) is t
    assert engine_ttft_of(t.to_dict()) == t
    assert engine_ttft_of(None) is None
    assert engine_ttft_of({"accepted_s": 1.0}) is None
    assert engine_ttft_of("garbage") is None
