"""Prefill/decode disaggregation in the cluster simulator (bench/sim/pd.py): virtual time, analytic costs."""

from __future__ import annotations

import random

import pytest

from bench.sim.cluster import ClusterSim, RouterConfig, SimSetup, meets_slos
from bench.sim.exec_model import ExecConfig
from bench.sim.kv_transfer import KVTransferCost, kv_bytes_per_token, model_kv_bytes_per_token
from bench.sim.pd import DecodeRouter, PDConfig, parse_ratio, split_replicas
from bench.sim.workload import explicit_workload
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.cost_model import CostModel

MS_PER_TOKEN = CostModel.from_coefficients(0.0, 1e-3)  # predict(n) = n ms
STEP_S = 0.01  # every decode step, whatever its batch
FREE = KVTransferCost(bytes_per_token=0, bandwidth_bytes_per_s=1.0, latency_s=0.0)


def setup(pd: PDConfig | None = None, policy: str = "flowprefill", router: str = "round_robin") -> SimSetup:
    sched = SchedulerConfig(policy=policy, granularity="block" if policy == "flowprefill" else "none")
    return SimSetup(MS_PER_TOKEN, sched, ExecConfig(boundary_delay_s=0.002, decode_step_s=STEP_S),
                    RouterConfig(policy=router), pd)


def test_a_pd_request_pays_the_transfer_in_ttft_or_in_tpot_by_where_the_first_token_streams():
    # 100 tokens: prefill 0.1 s; transfer 0.05 s + 100 x 1000 B at 1 MB/s = 0.15 s; two decode steps of 10 ms
    cost = KVTransferCost(bytes_per_token=1000, bandwidth_bytes_per_s=1e6, latency_s=0.05)
    assert cost.seconds(100) == pytest.approx(0.15) and cost.nbytes(100) == 100_000
    wl = explicit_workload([0.0], [100], [10.0], MS_PER_TOKEN.predict, max_tokens=[3], tpot_slo_s=[1.0])

    at_decode = ClusterSim(setup(PDConfig(1, 1, cost, first_token="decode")), 2).run(wl)
    assert at_decode.ttft_s[0] == pytest.approx(0.1 + 0.15)  # TTFT includes the transfer
    assert at_decode.tpot_s[0] == pytest.approx(STEP_S)
    assert at_decode.handovers == 1 and at_decode.decode_steps == 2 and at_decode.ends == [1]

    at_prefill = ClusterSim(setup(PDConfig(1, 1, cost, first_token="prefill")), 2).run(wl)
    assert at_prefill.ttft_s[0] == pytest.approx(0.1)  # FlowPrefill streams the first token from the prefill side
    assert at_prefill.tpot_s[0] == pytest.approx((0.15 + 2 * STEP_S) / 2)  # the transfer shows between tokens 1 and 2

    colocated = ClusterSim(setup(), 2).run(wl)
    assert colocated.ttft_s[0] == pytest.approx(0.1) and colocated.tpot_s[0] == pytest.approx(STEP_S)
    assert colocated.handovers == 0


def test_a_one_token_request_ends_on_the_prefill_replica_without_a_handover():
    wl = explicit_workload([0.0, 0.5], [50, 50], [1.0, 1.0], MS_PER_TOKEN.predict, max_tokens=[1, 2])
    run = ClusterSim(setup(PDConfig(1, 1, FREE)), 2).run(wl)
    assert run.handovers == 1 and run.ends == [1, 1]
    assert run.tpot_s[0] is None and run.tpot_s[1] == pytest.approx(STEP_S)


@pytest.mark.parametrize("pd", [None, (1, 1), (1, 3), (3, 1)], ids=["colocated", "1:1", "1:3", "3:1"])
def test_every_request_ends_exactly_once_under_overload(pd: tuple[int, int] | None):
    rng = random.Random(7)
    n = 400
    arrivals = sorted(rng.uniform(0.0, 4.0) for _ in range(n))  # ~100 req/s on 4 replicas: far past capacity
    tokens = [rng.choice([20, 80, 400]) for _ in range(n)]
    max_tokens = [rng.choice([1, 2, 8, 30]) for _ in range(n)]
    wl = explicit_workload(arrivals, tokens, [0.3 if t < 100 else 3.0 for t in tokens], MS_PER_TOKEN.predict,
                           max_tokens=max_tokens, sheddable=[t >= 400 for t in tokens], priority=[0] * n,
                           tpot_slo_s=[0.05] * n)
    cfg = None if pd is None else PDConfig(*split_replicas(4, pd), KVTransferCost(latency_s=0.02))
    run = ClusterSim(setup(cfg, router="slo_aware"), 4).run(wl)
    assert run.ends == [1] * n  # finished, refused or shed: each exactly once
    assert run.shed > 0 and not run.stopped_early
    never = sum(v is None for v in run.ttft_s)
    assert never >= run.shed  # shed and refused requests have no TTFT
    if cfg is not None:  # every prefilled request with more to say went to a decode replica
        assert run.handovers == sum(1 for k, v in zip(max_tokens, run.ttft_s) if v is not None and k > 1)


def _interference_workload():
    # two short interactive streams (10 tokens, 5 outputs, TPOT SLO 50 ms) and two long one-token prefills
    # (1000 tokens: 1 s, TTFT SLO 10 s) arriving while the streams decode
    return explicit_workload([0.0, 0.001, 0.02, 0.021], [10, 10, 1000, 1000], [1.0, 1.0, 10.0, 10.0],
                             MS_PER_TOKEN.predict, max_tokens=[5, 5, 1, 1], tpot_slo_s=[0.05] * 4)


def test_pd_beats_colocated_when_long_prefills_stall_decode():
    wl = _interference_workload()
    # colocated, fcfs (no operator boundaries), round robin: each replica gets a stream, then a long prefill
    # that runs 1 s to its end while the stream waits for its next decode step: both streams miss TPOT
    colocated = ClusterSim(setup(policy="fcfs"), 2).run(wl)
    assert colocated.tpot_s[0] > 0.2 and colocated.tpot_s[1] > 0.2
    assert colocated.attainment == 0.5
    # 1 prefill + 1 decode: the decode replica steps every 10 ms whatever the prefill replica does;
    # the second long prefill waits for the first (TTFT 2 s, within 10 s)
    pd = ClusterSim(setup(PDConfig(1, 1, FREE), policy="fcfs"), 2).run(wl)
    assert pd.tpot_s[0] == pytest.approx(STEP_S)
    # the second stream's KV lands at 0.02, as a step starts: it joins the one after (first decoded token at
    # 0.04, the last at 0.07): (0.07 - 0.02) / 4
    assert pd.tpot_s[1] == pytest.approx(0.0125)
    assert pd.ttft_s[3] == pytest.approx(1.01 + 1.0 - 0.001, abs=0.02)
    assert pd.attainment == 1.0


def test_colocated_beats_pd_when_the_transfer_exceeds_the_tpot_budget():
    # light load, 2 output tokens, TPOT SLO 50 ms: the 0.2 s handover lands between tokens 1 and 2
    wl = explicit_workload([0.0, 1.0, 2.0, 3.0], [50] * 4, [1.0] * 4, MS_PER_TOKEN.predict, max_tokens=[2] * 4,
                           tpot_slo_s=[0.05] * 4)
    slow = KVTransferCost(bytes_per_token=0, bandwidth_bytes_per_s=1.0, latency_s=0.2)
    colocated = ClusterSim(setup(), 2).run(wl)
    pd = ClusterSim(setup(PDConfig(1, 1, slow)), 2).run(wl)
    assert colocated.attainment == 1.0 and pd.attainment == 0.0
    assert all(v == pytest.approx(0.2 + STEP_S) for v in pd.tpot_s)


def test_decode_router_balances_by_decode_load_and_rotates_ties():
    sim = ClusterSim(setup(PDConfig(1, 3, FREE)), 4)
    replicas = sim._replicas(lambda rep, at: None, lambda idx, v: None)  # noqa: SLF001 - the pools it builds
    router = DecodeRouter(replicas[1:])  # type: ignore[arg-type]
    picks = [router.choose().replica_id for _ in range(3)]
    assert picks == ["d0", "d1", "d2"]  # all idle: the start rotates
    replicas[1].on_the_way = 2  # type: ignore[attr-defined]
    replicas[3].on_the_way = 1  # type: ignore[attr-defined]
    assert router.choose().replica_id == "d1"


def test_slo_check_counts_tpot_only_for_multi_token_requests_with_a_tpot_slo():
    assert meets_slos(0.1, 0.2, None, 0.05, 1)
    assert meets_slos(0.1, 0.2, 0.04, 0.05, 3) and not meets_slos(0.1, 0.2, 0.06, 0.05, 3)
    assert meets_slos(0.1, 0.2, 9.0, None, 3) and not meets_slos(0.3, 0.2, 0.01, 0.05, 3)
    assert not meets_slos(None, 0.2, None, None, 1)


def test_kv_bytes_per_token_from_the_model_config():
    from replicas.model.default_model import prepare_default_model

    # SmolLM2-135M: 30 layers, 3 KV heads of 64, fp32: bench handover's 2048 tokens = 94,371,840 B
    assert model_kv_bytes_per_token(prepare_default_model(), "float32") == 46_080
    assert model_kv_bytes_per_token(prepare_default_model(), "torch.bfloat16") == 23_040
    assert kv_bytes_per_token(32, 8, 128, "bfloat16") == 131_072  # Llama-3.1-8B: 128 KiB per token
    with pytest.raises(ValueError, match="dtype"):
        kv_bytes_per_token(30, 3, 64, "int3")
    with pytest.raises(ValueError, match="kv_heads"):
        kv_bytes_per_token(30, 0, 64)


def test_bad_pd_settings_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="bandwidth"):
        KVTransferCost(bandwidth_bytes_per_s=0.0)
    with pytest.raises(ValueError, match="latency"):
        KVTransferCost(latency_s=-1.0)
    with pytest.raises(ValueError, match="first-token"):
        PDConfig(1, 1, first_token="client")
    with pytest.raises(ValueError, match="at least one prefill"):
        PDConfig(0, 2)
    with pytest.raises(ValueError, match="pd-ratios"):
        parse_ratio("1-3")
    with pytest.raises(ValueError, match="pd-ratios"):
        parse_ratio("0:3")
    with pytest.raises(ValueError, match="replicas"):
        split_replicas(1, (1, 1))
    with pytest.raises(ValueError, match="P/D split"):
        ClusterSim(setup(PDConfig(1, 1)), 3)
    assert parse_ratio(" 1:3") == (1, 3)
    assert split_replicas(16, (1, 3)) == (4, 12) and split_replicas(64, (3, 1)) == (48, 16)
    assert split_replicas(4, (1, 7)) == (1, 3)  # at least one of each
