"""SLO-driven autoscaling: the policy on synthetic Serve contexts, and the replica-side accounting."""

import asyncio
import math
from dataclasses import dataclass

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingContext

from cluster.app import AppConfig
from cluster.autoscaling import (
    POLICY_PATH,
    ScalingSignals,
    SLOAutoscaler,
    SLOAutoscalingPolicy,
    SLOScalingConfig,
    serve_autoscaling_config,
)
from replicas.autoscaling_stats import (
    METRIC_ATTAINMENT,
    METRIC_LOAD,
    METRIC_PENDING,
    METRIC_SAMPLES,
    AutoscalingStats,
)
from replicas.engine_config import EngineConfigError
from replicas.scheduler.request import Request
from state.clock import Clock as StateClock

DEP = DeploymentID(name="FlowPrefillReplica", app_name="flowprefill")


def context(target: int, loads: list[float], *, attainment: float = 1.0, samples: float = 0.0,
            running: int | None = None, state: dict | None = None, now: float = 0.0, lo: int = 1,
            hi: int = 8) -> AutoscalingContext:
    """A Serve context whose replicas report ``loads`` (one entry per running replica)."""
    ids = [f"replica-{i}" for i in range(len(loads))]
    metrics = {METRIC_LOAD: dict(zip(ids, loads)), METRIC_ATTAINMENT: dict.fromkeys(ids, attainment),
               METRIC_SAMPLES: dict.fromkeys(ids, samples / max(len(ids), 1))}
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name,
        current_num_replicas=len(loads) if running is None else running, target_num_replicas=target,
        running_replicas=ids, total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics=metrics,
        raw_metrics={}, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
        policy_state=dict(state or {}), last_scale_up_time=None, last_scale_down_time=None, current_time=now,
        config=None,
    )


@dataclass
class Sim:
    """Drives the policy tick by tick; new replicas run at once and share the total load evenly."""

    policy: SLOAutoscalingPolicy
    target: int = 1
    state: dict | None = None

    def tick(self, now: float, total_load: float, attainment: float = 1.0, samples: float = 0.0) -> int:
        loads = [total_load / self.target] * self.target
        ctx = context(self.target, loads, attainment=attainment, samples=samples, state=self.state, now=now,
                      lo=1, hi=5)
        self.target, self.state = self.policy(ctx)
        return self.target


def test_ramp_up_follows_the_predicted_load_at_once():
    sim = Sim(SLOAutoscalingPolicy(target_utilization=0.7))
    targets = []
    for t in range(121):
        load = 0.2 + 2.3 * t / 120
        targets.append(sim.tick(float(t), load))
        assert targets[-1] == min(5, math.ceil(load / 0.7 - 1e-9)), f"t={t} load={load:.2f}"
    assert targets == sorted(targets) and targets[0] == 1 and targets[-1] == 4


def test_burst_of_slo_misses_adds_a_replica_immediately_then_waits_for_the_cooldown():
    sim = Sim(SLOAutoscalingPolicy(target_utilization=0.7, attainment_goal=0.9, upscale_cooldown_s=20))
    assert sim.tick(0.0, 0.3, attainment=1.0, samples=30) == 1
    assert sim.tick(1.0, 0.3, attainment=0.5, samples=30) == 2  # the very first tick that sees the misses
    assert [sim.tick(1.0 + t, 0.3, attainment=0.5, samples=30) for t in range(1, 20)] == [2] * 19
    assert sim.tick(21.0, 0.3, attainment=0.5, samples=30) == 3  # still missing after the cooldown


def test_too_few_samples_do_not_trigger_an_upscale():
    sim = Sim(SLOAutoscalingPolicy(min_samples=10))
    assert sim.tick(0.0, 0.2, attainment=0.0, samples=4) == 1


def test_slow_decay_removes_one_replica_per_delay_down_to_the_minimum():
    policy = SLOAutoscalingPolicy(target_utilization=0.7, downscale_delay_s=60, downscale_step=1)
    sim = Sim(policy, target=4)
    history = {t: sim.tick(float(t), 0.1) for t in range(0, 241)}
    assert history[59] == 4 and history[60] == 3
    assert history[119] == 3 and history[120] == 2
    assert history[179] == 2 and history[180] == 1
    assert history[240] == 1  # min_replicas
    changes = [t for t in range(1, 241) if history[t] != history[t - 1]]
    assert changes == [60, 120, 180]


def test_a_brief_dip_does_not_downscale_and_restarts_the_delay():
    sim = Sim(SLOAutoscalingPolicy(target_utilization=0.7, downscale_delay_s=60), target=2)
    for t in range(50):
        assert sim.tick(float(t), 0.2) == 2
    assert sim.tick(50.0, 1.2) == 2  # load back: the pending downscale is forgotten
    assert all(sim.tick(float(t), 0.2) == 2 for t in range(51, 110))
    assert sim.tick(111.0, 0.2) == 1


def test_load_oscillating_around_a_threshold_does_not_flap():
    sim = Sim(SLOAutoscalingPolicy(target_utilization=0.7, hysteresis=0.2, downscale_delay_s=30))
    targets = [sim.tick(float(t), 0.75 if t % 2 else 0.65) for t in range(600)]
    assert targets[-1] == 2 and sum(a != b for a, b in zip(targets, targets[1:])) == 1
    # a slower wave, high for 20 s and low for 20 s (shorter than the downscale delay)
    sim = Sim(SLOAutoscalingPolicy(target_utilization=0.7, hysteresis=0.2, downscale_delay_s=30))
    targets = [sim.tick(float(t), 1.3 if (t // 20) % 2 else 0.3) for t in range(600)]
    assert sum(a != b for a, b in zip(targets, targets[1:])) == 1 and targets[-1] == 2


def test_bounds_from_serve_and_from_the_policy():
    policy = SLOAutoscalingPolicy(target_utilization=0.5)
    assert policy(context(2, [50.0, 50.0], lo=1, hi=6))[0] == 6
    assert policy(context(6, [0.0] * 6, lo=3, hi=6, now=1e6, state={"fp_below_since_s": 0.0}))[0] == 5
    assert policy(context(1, [0.0], lo=2, hi=6))[0] == 2  # below Serve's minimum: raised at once
    narrowed = SLOAutoscalingPolicy(min_replicas=2, max_replicas=3)
    assert narrowed(context(2, [40.0, 40.0], lo=1, hi=8))[0] == 3
    assert narrowed(context(1, [0.0], lo=1, hi=8))[0] == 2
    scaler = SLOAutoscaler(SLOScalingConfig(max_replicas=3))
    decision = scaler.decide(0.0, ScalingSignals(3, 3, 9.0, 0.2, 50, 3), 1, 8)
    assert decision.replicas == 3 and "capped" in decision.reason


def test_no_metrics_holds_and_misses_block_downscale_and_starting_replicas_block_downscale():
    policy = SLOAutoscalingPolicy(downscale_delay_s=0)
    ctx = context(3, [], running=3)
    assert policy(ctx)[0] == 3
    assert policy(context(3, [0.0] * 3, attainment=0.5, samples=100, state={"fp_last_upscale_s": 0.0}))[0] == 3
    state = {"fp_below_since_s": -100.0}
    assert policy(context(3, [0.0, 0.0], running=2, state=state))[0] == 3  # one still starting
    assert policy(context(3, [0.0] * 3, state=state))[0] == 2


def test_policy_through_serve_config_and_wrapper_acts_without_serve_delays():
    """Serve cloudpickles the class by value, instantiates it with policy_kwargs and wraps it."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig

    spec = serve_autoscaling_config({"min_replicas": 1, "max_replicas": 4,
                                     "policy": {"policy_kwargs": {"target_utilization": 0.5}}})
    assert spec["policy"]["policy_function"] == POLICY_PATH
    assert spec["upscale_delay_s"] == 0.0 and spec["downscale_delay_s"] == 0.0
    config = AutoscalingConfig(**spec)
    policy = _apply_autoscaling_config(_resolve_policy_callable(config.policy))
    ctx = context(1, [1.6], now=100.0, hi=4)
    ctx.config = config
    replicas, state = policy(ctx)
    assert replicas == 4 and state["fp_last_upscale_s"] == 100.0


def test_serve_autoscaling_config_validates_knobs_with_their_path():
    assert serve_autoscaling_config({"upscale_delay_s": 5})["upscale_delay_s"] == 5
    other = serve_autoscaling_config({"policy": {"policy_function": "ray.serve.autoscaling_policy:"
                                                                    "default_autoscaling_policy"}})
    assert "upscale_delay_s" not in other  # Serve's defaults stay for other policies
    with pytest.raises(EngineConfigError, match=r"args\.autoscaling\.policy\.policy_kwargs\.target_util: unknown"):
        serve_autoscaling_config({"policy": {"policy_kwargs": {"target_util": 0.5}}})
    with pytest.raises(EngineConfigError, match=r"policy_kwargs\.hysteresis: Input should be less than 1, got 1\.5"):
        serve_autoscaling_config({"policy": {"policy_kwargs": {"hysteresis": 1.5}}})
    with pytest.raises(EngineConfigError, match=r"^args\.autoscaling: max_replicas \(2\) must be greater than"):
        serve_autoscaling_config({"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(EngineConfigError, match=r"^args\.autoscaling: Input should be a mapping of settings, got list"):
        AppConfig.from_args({"autoscaling": [1]})
    assert AppConfig.from_args({"autoscaling": None}).autoscaling is None
    assert AppConfig.from_args({"autoscaling": {"max_replicas": 3}}).autoscaling == {"max_replicas": 3}


# ---------------------------------------------------------------------- replica-side accounting
class Clock(StateClock):
    """A test clock whose time is the attribute ``t`` (epoch seconds)."""

    def __init__(self) -> None:
        super().__init__(lambda: self.t, "test")
        self.t = 1000.0


@dataclass
class Out:
    ttft_s: float | None
    finish_reason: str | None = None


def test_stats_report_arrival_work_backlog_and_attainment_over_a_sliding_window():
    clock = Clock()
    stats = AutoscalingStats(lambda n: n / 1000, clock=clock, window_s=10.0, drain_horizon_s=5.0)
    clock.t += 20  # older than the window: rates use the full window
    for _ in range(4):
        stats.on_arrival(500)  # 0.5 s of predicted prefill each
    stats.on_first_token(0.2, 1.0)
    stats.on_first_token(1.5, 1.0)
    stats.on_refused()
    snap = stats.snapshot(pending_work_s=2.5)
    assert snap[METRIC_LOAD] == pytest.approx(2.0 / 10 + 2.5 / 5)
    assert snap[METRIC_PENDING] == 2.5
    assert snap[METRIC_ATTAINMENT] == pytest.approx(1 / 3) and snap[METRIC_SAMPLES] == 3.0
    assert all(isinstance(v, float) for v in snap.values())
    clock.t += 10.5
    snap = stats.snapshot()
    assert snap[METRIC_LOAD] == 0.0 and snap[METRIC_ATTAINMENT] == 1.0 and snap[METRIC_SAMPLES] == 0.0


def test_a_young_replica_divides_by_its_age():
    clock = Clock()
    stats = AutoscalingStats(lambda n: 1.0, clock=clock, window_s=30.0)
    clock.t += 3
    stats.on_arrival(10)
    assert stats.snapshot()[METRIC_LOAD] == pytest.approx(1 / 3)


def test_observe_records_the_stream_and_closes_the_engine_stream():
    clock = Clock()
    stats = AutoscalingStats(lambda n: 0.1, clock=clock)
    closed = []

    async def engine(outs):
        try:
            for out in outs:
                yield out
        finally:
            closed.append(True)

    async def consume(outs, take=None):
        request = Request("r", [1, 2, 3], arrival_s=clock.t, ttft_slo_s=1.0)
        stream = stats.observe(request, engine(outs))
        got = []
        async for out in stream:
            got.append(out)
            if take is not None and len(got) == take:
                break
        await stream.aclose()
        return got

    assert len(asyncio.run(consume([Out(0.4), Out(None), Out(None, "stop")]))) == 3
    asyncio.run(consume([Out(None, "rejected")]))
    asyncio.run(consume([Out(None, "abort")]))  # the client went away: not an SLO outcome
    asyncio.run(consume([Out(2.0), Out(None), Out(None, "stop")], take=1))
    assert closed == [True] * 4
    snap = stats.snapshot()
    assert snap[METRIC_SAMPLES] == 3.0 and snap[METRIC_ATTAINMENT] == pytest.approx(1 / 3)


def test_the_knobs_documented_in_ray_config_yaml_are_the_real_ones_with_their_defaults():
    """The commented ``autoscaling:`` example in ray_config.yaml, uncommented, is valid and shows the defaults."""
    from dataclasses import fields
    from pathlib import Path

    import yaml

    lines = (Path(__file__).resolve().parents[1] / "ray_config.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# autoscaling:")
    block = []
    for line in lines[start:]:
        if not line.lstrip().startswith("#"):
            break
        block.append(line.lstrip()[2:])
    spec = yaml.safe_load("\n".join(block))["autoscaling"]
    kwargs = spec["policy"]["policy_kwargs"]
    assert kwargs == {f.name: f.default for f in fields(SLOScalingConfig)}
    assert spec["policy"]["policy_function"] == POLICY_PATH
    assert AppConfig.from_args({"autoscaling": spec}).autoscaling == spec
