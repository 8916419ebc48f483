"""P/D disaggregation's configuration, Redis fields and decode placement (no Ray cluster)."""

from __future__ import annotations

import pytest

from cluster.app import AppConfig
from replicas.engine_config import EngineConfigError
from replicas.handover import HandoverError
from replicas.handover_transport import HandoverStats, check_ticket
from router.decode_router import DecodeDemand, rank_decoders
from state.schema import ReplicaQueueState, SchemaError


def _state(rid: str, *, free: int, decoding: int, max_decoding: int = 64, at: float = 100.0,
           interval_s: float = 0.0) -> ReplicaQueueState:
    return ReplicaQueueState(rid, "flowprefill", "m", at, 1, kv_free_tokens=free, role="decode", decoding=decoding,
                             kv_total_tokens=10_000, max_decoding=max_decoding, decode_step_interval_s=interval_s)


def test_decode_placement_skips_replicas_without_room_for_the_kv_then_fewest_decoding_then_most_free_kv():
    """Equal TPOT headroom (no pace measured yet): the batch sizes and free KV decide
    (tests/test_pd_placement.py has the headroom cases)."""
    states = {"full": _state("full", free=100, decoding=0), "busy": _state("busy", free=5000, decoding=9),
              "idle": _state("idle", free=3000, decoding=1), "roomy": _state("roomy", free=4000, decoding=1),
              "stale": _state("stale", free=9000, decoding=0, at=50.0)}
    order = rank_decoders(["full", "busy", "idle", "roomy", "stale", "unknown"], states, DecodeDemand(600), 101.0)
    assert order == ["roomy", "idle", "busy", "stale", "unknown"]  # "full" has no room for 600 tokens
    # this router's own unfinished dispatches count until the replica's state shows them
    assert rank_decoders(["idle", "roomy"], states, DecodeDemand(600), 101.0, local={"roomy": 5}) == ["idle", "roomy"]
    # a replica whose decode batch is full gives a new stream a second round per token: less headroom
    states["small"] = _state("small", free=5000, decoding=2, max_decoding=2, interval_s=0.01)
    states["busy"] = _state("busy", free=5000, decoding=9, interval_s=0.01)
    assert rank_decoders(["small", "busy"], states, DecodeDemand(600), 101.0) == ["busy", "small"]


def test_replica_state_round_trips_the_decode_fields_and_refuses_a_bad_role():
    st = _state("d1", free=123, decoding=4)
    back = ReplicaQueueState.from_json(st.to_json())
    assert (back.role, back.decoding, back.kv_total_tokens, back.max_decoding) == ("decode", 4, 10_000, 64)
    paced = ReplicaQueueState.from_json(ReplicaQueueState("d", "flowprefill", "m", 1.0, 1, decoding=3,
                                                          decode_step_interval_s=0.02, tpot_s=0.02,
                                                          tpot_target_s=0.1).to_json())
    assert (paced.decode_step_interval_s, paced.tpot_s, paced.tpot_target_s) == (0.02, 0.02, 0.1)
    old = ReplicaQueueState.from_json(ReplicaQueueState("r", "echo", "m", 1.0, 1).to_json())
    assert old.role == "colocated"
    with pytest.raises(SchemaError, match="role"):
        ReplicaQueueState.from_json(st.to_json().replace('"decode"', '"both"'))
    import json

    with pytest.raises(SchemaError, match="decoding"):
        ReplicaQueueState.from_json(json.dumps({**json.loads(st.to_json()), "decoding": -1}))
    with pytest.raises(SchemaError, match="tpot_s"):
        ReplicaQueueState.from_json(json.dumps({**json.loads(st.to_json()), "tpot_s": -0.1}))


def test_app_config_builds_a_decode_pool_over_the_prefill_engine_settings():
    config = AppConfig.from_args({"engine": {"role": "prefill", "kv_cache_bytes": 1 << 28},
                                  "decode": {"num_replicas": 2, "engine": {"max_decoding": 8}}})
    pool = config.decode_pool()
    assert pool is not None and pool.num_replicas == 2 and pool.replica_cpus == 1.0
    assert pool.engine == {"role": "decode", "kv_cache_bytes": 1 << 28, "max_decoding": 8}
    assert AppConfig.from_args({}).decode_pool() is None


@pytest.mark.parametrize(("args", "field"), [
    ({"engine": {"role": "prefill"}}, "args.engine.role"),  # a prefill role needs a decode pool
    ({"decode": {"num_replicas": 1}}, "args.engine.role"),  # a decode pool needs prefill replicas
    ({"engine": {"role": "prefill"}, "decode": {"num_replicas": 0}}, "args.decode.num_replicas"),
    ({"engine": {"role": "prefill"}, "decode": {"replicas": 1}}, "args.decode.replicas"),
    ({"engine": {"role": "prefill"}, "decode": {"engine": {"role": "prefill"}}}, "args.decode.engine.role"),
    ({"engine": {"role": "prefill"}, "decode": {"engine": {"max_decoding": 0}}}, "args.decode.engine.max_decoding"),
    ({"engine": {"role": "prefill"}, "decode": {"replica_cpus": -1}}, "args.decode.replica_cpus"),
    ({"engine": {"role": "both"}}, "args.engine.role"),
])
def test_bad_pd_settings_name_the_field(args, field):
    with pytest.raises(EngineConfigError, match=field.replace(".", r"\.")):
        AppConfig.from_args(args)


def test_the_example_pd_config_is_valid():
    from pathlib import Path

    from cluster.launcher import load_app_args

    args = load_app_args(Path(__file__).resolve().parents[1] / "deploy" / "examples" / "pd.yaml")
    pool = AppConfig.from_args(args).decode_pool()
    assert pool is not None and pool.num_replicas == 1 and pool.engine["role"] == "decode"


def test_a_handover_ticket_is_validated_field_by_field():
    good = {"request_id": "r", "bytes": 10, "kv_tokens": 3, "ready_at": 1.0, "box": []}
    assert "box" not in check_ticket(good)
    assert check_ticket({**good, "tpot_slo_s": 0.2, "generated": [5]})["generated"] == [5]
    for name, bad in (("request_id", ""), ("bytes", 0), ("kv_tokens", True), ("ready_at", "now"),
                      ("tpot_slo_s", 0), ("tpot_slo_s", float("nan")), ("generated", []), ("generated", [-1]),
                      ("generated", "5")):
        with pytest.raises(HandoverError, match=f"ticket.{name}"):
            check_ticket({**good, name: bad})
    stats = HandoverStats()
    stats.record(put_ms=1.0)
    stats.record(put_ms=3.0)
    assert stats.summary()["put_ms"]["n"] == 2
