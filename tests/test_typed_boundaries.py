"""The records that cross process boundaries (the replica request, engine stats) and the one clock:
each has one parser that names the bad field, and a mismatched clock cannot be constructed."""

from __future__ import annotations

import time

import pytest

from replicas.engine_stats import EngineStats, StatsError
from replicas.errors import InvalidRequestError
from replicas.replica_request import ReplicaRequest
from replicas.sampling_params import SamplingParams
from replicas.scheduler.stats import QueueEntry
from state.clock import WALL_CLOCK, Clock, ManualClock, require_clock

REQ = ReplicaRequest("r1", (1, 2, 3), arrival_s=1000.0, ttft_slo_s=0.5, tpot_slo_s=0.1, priority=-1,
                     slo_class="interactive", sheddable=True,
                     sampling=SamplingParams(max_tokens=7, temperature=0.3, top_k=4, seed=9, stop=("x",)))


def test_the_replica_request_round_trips_and_becomes_the_schedulers_request():
    assert ReplicaRequest.from_dict(REQ.to_dict()) == REQ
    assert REQ.deadline == 1000.5 and REQ.prompt_tokens == 3
    engine = REQ.to_engine_request()
    assert (engine.request_id, engine.prompt_ids, engine.deadline, engine.max_tokens, engine.priority) == (
        "r1", [1, 2, 3], 1000.5, 7, -1)
    assert engine.slo_class == "interactive" and engine.sheddable and engine.tpot_slo_s == 0.1


@pytest.mark.parametrize(("change", "field"), [
    ({"request_id": ""}, "payload.request_id"),
    ({"prompt_token_ids": []}, "payload.prompt_token_ids"),
    ({"prompt_token_ids": [1, -2]}, "payload.prompt_token_ids"),
    ({"arrival_s": "now"}, "payload.arrival_s"),
    ({"ttft_slo_s": 0}, "payload.ttft_slo_s"),
    ({"tpot_slo_s": float("nan")}, "payload.tpot_slo_s"),
    ({"priority": 1.5}, "payload.priority"),
    ({"sheddable": "yes"}, "payload.sheddable"),
    ({"sampling": {"max_tokens": 2, "top_p": 1.5}}, "payload.sampling.top_p"),
    ({"sampling": {"max_tokens": 2, "wat": 1}}, "payload.sampling.wat"),
    ({"sampling": None}, "payload.sampling"),
])
def test_a_malformed_replica_request_names_its_field(change, field):
    with pytest.raises(InvalidRequestError) as err:
        ReplicaRequest.from_dict({**REQ.to_dict(), **change})
    assert err.value.field == field and str(err.value).startswith(field)


def test_engine_stats_round_trip_build_the_queue_state_and_name_a_bad_field():
    stats = EngineStats("m", 2000.0, policy="flowprefill",
                        waiting=(QueueEntry("w", 2001.0, 0.2, 40, 0.8),),
                        running=(QueueEntry("r", 2000.5, 0.1, 16),), suspended=(QueueEntry("s", 2003.0, 0.5, 9),),
                        running_remaining_s=0.1, pending_work_s=0.8, kv_free_tokens=64, kv_total_tokens=128,
                        decoding=2, preemptions=3, cost_scale=1.5, counters={"decode_steps": 4},
                        details={"vllm_pid": 7})
    assert EngineStats.from_dict(stats.to_dict()) == stats
    assert stats.to_dict()["counts"] == {"waiting": 1, "running": 1, "suspended": 1, "decoding": 2}
    state = stats.queue_state("rep-1", "flowprefill", seq=5, updated_at=2000.25)
    assert [(q.request_id, q.status) for q in state.requests] == [("r", "running"), ("s", "suspended"),
                                                                 ("w", "waiting")]
    assert (state.preemptions, state.cost_scale, state.kv_free_tokens, state.seq) == (3, 1.5, 64, 5)
    bad = stats.to_dict()
    bad["running"][0]["deadline"] = None
    with pytest.raises(StatsError, match=r"^stats\.running\[0\]\.deadline: expected a finite number"):
        EngineStats.from_dict(bad)
    with pytest.raises(StatsError, match=r"^stats\.counters\.decode_steps"):
        EngineStats.from_dict({**stats.to_dict(), "counters": {"decode_steps": "4"}})


def test_a_bare_callable_is_not_a_clock():
    assert require_clock(WALL_CLOCK, "x") is WALL_CLOCK and abs(WALL_CLOCK() - time.time()) < 60
    manual = ManualClock(50.0)
    assert manual() == 50.0 and manual.advance(2.5) == 52.5 and require_clock(manual, "x") is manual
    for wrong in (time.monotonic, time.time, lambda: 0.0):
        with pytest.raises(TypeError, match="engine: clock must be a state.clock.Clock"):
            require_clock(wrong, "engine")
    assert Clock(lambda: 3.0, "fixed")() == 3.0


def test_the_engines_and_the_router_refuse_a_monotonic_clock(tiny_checkpoint_factory):
    from replicas.autoscaling_stats import AutoscalingStats
    from replicas.echo_engine import EchoConfig, EchoEngine

    with pytest.raises(TypeError, match="EchoEngine: clock"):
        EchoEngine(EchoConfig(model=str(tiny_checkpoint_factory())), clock=time.monotonic)
    with pytest.raises(TypeError, match="AutoscalingStats: clock"):
        AutoscalingStats(lambda n: 0.0, clock=time.monotonic)
