"""The model-free echo engine and the engine factory (replicas.engine_api), without Ray."""

from __future__ import annotations

import asyncio

import pytest

from replicas.echo_engine import EchoConfig, EchoEngine
from replicas.engine_api import ENGINE_KINDS, make_engine
from replicas.engine_config import EngineConfigError
from replicas.sampling_params import SamplingParams
from replicas.scheduler.request import Request
from state.clock import ManualClock


def Clock() -> ManualClock:  # noqa: N802 - reads like the class it stands for
    return ManualClock(100.0)


def test_echo_streams_the_prompt_back_and_reports_queue_state(tiny_checkpoint_factory):
    clock, states = Clock(), []
    engine = make_engine("echo", {"model": str(tiny_checkpoint_factory()), "prefill_s_per_1k_tokens": 0.0},
                         clock=clock, on_state_change=states.append)
    assert isinstance(engine, EchoEngine) and engine.kind == "echo"
    engine.start()
    assert engine.is_alive() and engine.policy_name == "echo" and engine.cost_model.predict(4000) < 1e-5
    ids = engine.tokenizer.encode("hello echo world")
    request = Request("r1", list(ids), arrival_s=99.5, ttft_slo_s=1.0)

    async def run() -> list:
        return [out async for out in engine.generate(request, SamplingParams(max_tokens=2))]

    outs = asyncio.run(run())
    assert [o.token_ids for o in outs] == [(ids[0],), (ids[1],)]
    assert [o.finish_reason for o in outs] == [None, "length"] and outs[-1].completion_tokens == 2
    assert outs[0].ttft_s == pytest.approx(0.5) and outs[1].ttft_s is None
    assert "".join(o.text for o in outs) == engine.tokenizer.decode(ids[:2])
    # While it ran the request was reported as running (deadline from the request), then gone.
    running = [s for s in states if s.running]
    assert running and running[0].running[0].deadline == pytest.approx(100.5)
    assert states[-1].running == () and states[-1].pending_work_s == 0.0

    async def run_n() -> list:
        return [out async for out in engine.generate(request, SamplingParams(max_tokens=2, n=2))]

    outs = asyncio.run(run_n())  # every choice echoes the prompt; the last choice's finish ends the request
    assert [(o.index, o.token_ids) for o in outs] == [(0, (ids[0],)), (1, (ids[0],)), (0, (ids[1],)), (1, (ids[1],))]
    assert [(o.finish_reason, o.choices_left) for o in outs[2:]] == [("length", 1), ("length", 0)]
    assert sum(o.ttft_s is not None for o in outs) == 1
    engine.shutdown()
    assert not engine.is_alive()


def test_echo_takes_the_configured_time_and_closing_the_stream_drops_the_request(tiny_checkpoint_factory):
    engine = EchoEngine(EchoConfig(model=str(tiny_checkpoint_factory()), prefill_s_per_1k_tokens=1.0))
    ids = engine.tokenizer.encode("a few words here")
    assert engine.cost_model.predict(len(ids)) == pytest.approx(len(ids) / 1000.0)

    async def first_then_close() -> int:
        gen = engine.generate(Request("r2", list(ids), arrival_s=0.0, ttft_slo_s=1.0), SamplingParams(max_tokens=8))
        await gen.__anext__()
        live_before = len(engine.stats().running)
        await gen.aclose()
        return live_before

    assert asyncio.run(first_then_close()) == 0  # left the running list at its first token
    assert engine.stats().running == ()


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"decode_step_s": -1}, "engine.decode_step_s"),
        ({"prefill_s_per_1k_tokens": "fast"}, "engine.prefill_s_per_1k_tokens"),
        ({"max_model_len": 0}, "engine.max_model_len"),
        ({"temperature": 1}, "engine.temperature"),
    ],
)
def test_bad_echo_settings_name_the_field(settings, field):
    with pytest.raises(EngineConfigError) as err:
        make_engine("echo", settings, clock=Clock(), on_state_change=None)
    assert err.value.field == field


def test_unknown_engine_kind_is_refused():
    with pytest.raises(EngineConfigError) as err:
        make_engine("tensorrt", {}, clock=Clock(), on_state_change=None)
    assert err.value.field == "engine_kind" and all(k in str(err.value) for k in ENGINE_KINDS)
