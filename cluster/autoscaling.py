"""SLO-driven autoscaling of the replica deployment: a Ray Serve custom autoscaling policy.

Each replica reports, through Serve's ``record_autoscaling_stats`` hook
(:mod:`replicas.autoscaling_stats`), its predicted prefill load (seconds of prefill work per
second, from its TTFT cost model: recent arrivals plus the queued backlog) and the fraction of its
recent requests whose TTFT met the SLO. Serve averages each over ``look_back_period_s`` and calls
the policy on every control-loop tick with an ``AutoscalingContext`` whose ``aggregated_metrics``
maps metric -> replica -> value. :class:`SLOAutoscaler` decides, as pure logic:

1. **Load.** ``needed = ceil(total load / target_utilization)``; above the current target, scale
   up to it at once.
2. **SLO.** If the recent attainment (over at least ``min_samples`` requests) is below
   ``attainment_goal``, add a replica at once, unless a replica was added less than
   ``upscale_cooldown_s`` ago (it is still starting, or still draining the backlog).
3. **Slow decay.** Remove ``downscale_step`` replicas only when the load fits the smaller count at
   ``target_utilization * (1 - hysteresis)``, attainment is at its goal and no replica is still
   starting, and all of that held for ``downscale_delay_s`` without a break; the delay starts
   again after each step. The gap between the up and down thresholds keeps a load near a
   threshold from flapping.
4. Bounds: Serve's ``min_replicas`` / ``max_replicas`` (capacity-adjusted), narrowed by the
   policy's own ``min_replicas`` / ``max_replicas`` when set.

:func:`serve_autoscaling_config` turns ``args.autoscaling`` of ``ray_config.yaml`` into Serve's
``autoscaling_config`` with this policy by default, and zeroes Serve's own up/down delays (which
would otherwise delay every decision by 30 s / 600 s) so these knobs decide.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from replicas.autoscaling_stats import METRIC_ATTAINMENT, METRIC_LOAD, METRIC_SAMPLES
from replicas.engine_config import EngineConfigError
from state.config_model import config_dataclass, parse_config
from state.fields import FieldError

POLICY_PATH = "cluster.autoscaling:SLOAutoscalingPolicy"
_STATE_UP = "fp_last_upscale_s"
_STATE_BELOW = "fp_below_since_s"
_EPS = 1e-9


class SLOScalingConfigError(FieldError):
    """A bad policy knob; ``field`` names it."""


@config_dataclass(SLOScalingConfigError)
class SLOScalingConfig:
    """The policy's knobs (``policy_kwargs``); every one is documented in ``ray_config.yaml``."""

    target_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.7
    attainment_goal: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    min_samples: PositiveInt = 5
    upscale_cooldown_s: NonNegativeFloat = 30.0
    downscale_delay_s: NonNegativeFloat = 60.0
    downscale_step: PositiveInt = 1
    hysteresis: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    min_replicas: NonNegativeInt | None = None
    max_replicas: PositiveInt | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SLOScalingConfig:
        """Build from ``policy_kwargs``; unknown keys are errors that list the known ones."""
        return parse_config(cls, data, SLOScalingConfigError, "")


class _ServePolicy(BaseModel):
    """``autoscaling.policy`` as far as this module reads it (Serve validates the whole config)."""

    model_config = ConfigDict(strict=True, extra="allow")
    policy_function: Any = POLICY_PATH  # noqa: ANN401 (a path, or a callable given from Python)
    policy_kwargs: dict[str, Any] | None = None


class _ServeAutoscaling(BaseModel):
    """``args.autoscaling`` as far as this module reads it: Serve's ``autoscaling_config``."""

    model_config = ConfigDict(strict=True, extra="allow")
    policy: _ServePolicy | None = None


@dataclass(frozen=True)
class ScalingSignals:
    """What one decision looks at (built from Serve's context by :func:`signals_from_context`)."""

    target: int  # the current target replica count
    running: int  # replicas running now (fewer than ``target`` while some start)
    load: float  # total predicted prefill load of the reporting replicas (1.0 = one busy replica)
    attainment: float | None  # recent TTFT attainment, None when fewer than min_samples requests
    samples: float = 0.0
    reporting: int = 0  # replicas whose metrics the controller has


@dataclass(frozen=True)
class ScalingDecision:
    """The new target, why, and the policy state to keep for the next tick."""

    replicas: int
    reason: str
    state: dict[str, Any]


class SLOAutoscaler:
    """Pure decision logic (no Ray, no clock): see the module docstring for the rules."""

    def __init__(self, config: SLOScalingConfig | None = None) -> None:
        self.config = config or SLOScalingConfig()

    def bounds(self, serve_min: int, serve_max: int) -> tuple[int, int]:
        """Serve's bounds narrowed by the policy's own ``min_replicas`` / ``max_replicas``."""
        c = self.config
        upper = serve_max if c.max_replicas is None else min(serve_max, c.max_replicas)
        lower = serve_min if c.min_replicas is None else max(serve_min, c.min_replicas)
        return min(lower, upper), upper

    def decide(self, now: float, s: ScalingSignals, serve_min: int, serve_max: int,
               state: Mapping[str, Any] | None = None) -> ScalingDecision:
        """The target replica count at ``now`` given the signals and the previous state."""
        c = self.config
        st = dict(state or {})
        lower, upper = self.bounds(serve_min, serve_max)
        n = s.target
        clamp = min(max(n, lower), upper)
        if s.reporting == 0:  # nothing measured yet (start-up): only enforce the bounds
            st[_STATE_BELOW] = None
            return ScalingDecision(clamp, "no metrics yet", st)
        needed = max(1, math.ceil(s.load / c.target_utilization - _EPS))
        slo_low = s.attainment is not None and s.samples >= c.min_samples and s.attainment < c.attainment_goal
        last_up = st.get(_STATE_UP)
        target, reason = n, "steady"
        if needed > n:
            target, reason = needed, f"load {s.load:.2f} needs {needed} at {c.target_utilization:.0%}"
        if slo_low and (last_up is None or now - last_up >= c.upscale_cooldown_s) and n + 1 > target:
            target, reason = n + 1, f"attainment {s.attainment:.2f} < goal {c.attainment_goal:.2f}"
        target = min(max(target, lower), upper)
        if target > n:
            st[_STATE_UP], st[_STATE_BELOW] = now, None
            return ScalingDecision(target, reason, st)
        relaxed = c.target_utilization * (1.0 - c.hysteresis)
        fits = max(1, math.ceil(s.load / relaxed - _EPS))
        candidate = max(fits, n - c.downscale_step, lower)
        if candidate < n and not slo_low and s.running >= n:
            since = st.get(_STATE_BELOW)
            if since is None:
                st[_STATE_BELOW] = now
            elif now - since >= c.downscale_delay_s:
                st[_STATE_BELOW] = now  # the next step waits a full delay again: slow decay
                reason = f"load {s.load:.2f} fits {candidate} for {c.downscale_delay_s:g}s"
                return ScalingDecision(candidate, reason, st)
            return ScalingDecision(clamp, "below target, waiting", st)
        st[_STATE_BELOW] = None
        if clamp != n:
            return ScalingDecision(clamp, "bounds", st)
        if n >= upper and (needed > n or slo_low):
            reason = f"wants more, capped at max_replicas {upper}"
        elif slo_low:
            reason = "attainment low, cooling down"
        return ScalingDecision(n, reason, st)


def signals_from_context(ctx: Any) -> ScalingSignals:  # noqa: ANN401 (ray.serve.config.AutoscalingContext)
    """Sum the replicas' load and weigh their attainment by their sample counts."""
    metrics = ctx.aggregated_metrics or {}
    loads: Mapping[Any, float] = metrics.get(METRIC_LOAD, {})
    attainment: Mapping[Any, float] = metrics.get(METRIC_ATTAINMENT, {})
    samples: Mapping[Any, float] = metrics.get(METRIC_SAMPLES, {})
    total = sum(samples.get(r, 0.0) for r in attainment)
    weighted = sum(value * samples.get(r, 0.0) for r, value in attainment.items())
    return ScalingSignals(
        target=int(ctx.target_num_replicas), running=int(ctx.current_num_replicas),
        load=float(sum(loads.values())), attainment=weighted / total if total > 0 else None,
        samples=float(total), reporting=len(loads),
    )


class SLOAutoscalingPolicy:
    """Ray Serve custom autoscaling policy (``policy_function`` = :data:`POLICY_PATH`).

    Serve instantiates it once per deployment with ``policy_kwargs`` (the :class:`SLOScalingConfig`
    knobs) and calls it with an ``AutoscalingContext`` every tick; it returns the target replica
    count and the policy state Serve hands back on the next call.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.scaler = SLOAutoscaler(SLOScalingConfig.from_dict(kwargs))

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:  # noqa: ANN401 (an AutoscalingContext)
        now = ctx.current_time if ctx.current_time is not None else time.time()
        decision = self.scaler.decide(now, signals_from_context(ctx), ctx.capacity_adjusted_min_replicas,
                                      ctx.capacity_adjusted_max_replicas, ctx.policy_state)
        return decision.replicas, decision.state


def serve_autoscaling_config(spec: Any, path: str = "args.autoscaling") -> dict[str, Any]:  # noqa: ANN401
    """Serve's ``autoscaling_config`` for ``args.autoscaling`` (validated; errors name the field).

    ``policy`` defaults to this module's policy; with it, ``policy.policy_kwargs`` are checked
    against :class:`SLOScalingConfig` and Serve's ``upscale_delay_s`` / ``downscale_delay_s``
    default to 0 (the policy applies its own delays).
    """
    outer = parse_config(_ServeAutoscaling, spec, EngineConfigError, path)
    policy = (outer.policy or _ServePolicy()).model_dump()
    config = {**spec, "policy": policy}
    if policy["policy_function"] == POLICY_PATH:
        policy["policy_kwargs"] = policy["policy_kwargs"] or {}
        parse_config(SLOScalingConfig, policy["policy_kwargs"], EngineConfigError, f"{path}.policy.policy_kwargs")
        config.setdefault("upscale_delay_s", 0.0)
        config.setdefault("downscale_delay_s", 0.0)
    elif policy["policy_kwargs"] is None:
        del policy["policy_kwargs"]  # Serve's own default
    from ray.serve.config import AutoscalingConfig

    with warnings.catch_warnings():  # metrics_interval_s is "deprecated" but still the push period in 2.60
        warnings.simplefilter("ignore", DeprecationWarning)
        parse_config(AutoscalingConfig, config, EngineConfigError, path)
    return config
