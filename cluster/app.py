"""Builds the FlowPrefill Serve application from its config (``ray_config.yaml``'s ``args``).

``serve run ray_config.yaml`` imports :func:`build` with the application's ``args``;
``flowprefill serve`` calls it too after starting Redis. The replica deployment carries the
SLO-aware request router (``request_router_config``), so every handle to it, the ingress's
included, places requests by predicted TTFT.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from replicas.engine_config import EngineConfig, EngineConfigError

ROUTER_POLICIES = ("slo_aware", "round_robin", "least_loaded", "pow2")


@dataclass(frozen=True)
class AppConfig:
    """The application's settings, validated (errors name the field under ``args``)."""

    model_name: str = "SmolLM2-135M-Instruct"
    engine: dict[str, Any] = field(default_factory=dict)
    num_replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    router_policy: str = "slo_aware"
    slo: dict[str, Any] | None = None
    redis_url: str | None = None
    namespace: str = "flowprefill"
    max_body_bytes: int = 1 << 20
    autoscaling: dict[str, Any] | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> AppConfig:
        """Parse ``args``; ``REDIS_URL`` from the environment fills ``redis_url`` when unset."""
        if not isinstance(args, Mapping):
            raise EngineConfigError("args", "must be a mapping")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(args) - known)
        if unknown:
            raise EngineConfigError(f"args.{unknown[0]}", f"unknown setting (known: {', '.join(sorted(known))})")
        values = dict(args)
        values.setdefault("redis_url", os.environ.get("REDIS_URL"))
        config = cls(**values)
        EngineConfig.from_dict(config.engine, prefix="args.engine")  # validate early, with the path
        if config.router_policy not in ROUTER_POLICIES:
            raise EngineConfigError("args.router_policy", f"must be one of {', '.join(ROUTER_POLICIES)}")
        if not isinstance(config.num_replicas, int) or config.num_replicas < 1:
            raise EngineConfigError("args.num_replicas", "must be a positive integer")
        if config.slo is not None:
            from router.slo import SLOPolicy

            SLOPolicy.from_dict(config.slo, path="args.slo")
        return config


def build(args: Mapping[str, Any]) -> Any:  # noqa: ANN401 (a Serve Application)
    """The Serve application: the router ingress bound to the replica deployment."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from replicas.deployment import ReplicaServer
    from router.ingress import build_ingress_class

    config = AppConfig.from_args(args)
    engine = EngineConfig.from_dict(config.engine, prefix="args.engine")
    options: dict[str, Any] = {
        "name": "FlowPrefillReplica",
        "ray_actor_options": {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        "max_ongoing_requests": engine.max_waiting + engine.max_decoding,
        "health_check_period_s": 5,
    }
    if config.autoscaling:
        options["autoscaling_config"] = config.autoscaling
    else:
        options["num_replicas"] = config.num_replicas
    if config.router_policy != "pow2":  # pow2 is Serve's own default router, the baseline
        options["request_router_config"] = RequestRouterConfig(
            request_router_class="router.request_router.SLOAwareRequestRouter",
            request_router_kwargs={"redis_url": config.redis_url, "namespace": config.namespace,
                                   "policy": config.router_policy},
        )
    replica = serve.deployment(ReplicaServer).options(**options)
    replicas = replica.bind(engine=config.engine, redis_url=config.redis_url, namespace=config.namespace)
    ingress = serve.deployment(build_ingress_class()).options(name="FlowPrefillRouter", num_replicas=1,
                                                               ray_actor_options={"num_cpus": 0.25})
    return ingress.bind(replicas, config.model_name, engine.model, config.slo, config.max_body_bytes)
