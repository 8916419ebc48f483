"""Builds the FlowPrefill Serve application from its config (``ray_config.yaml``'s ``args``).

``serve run ray_config.yaml`` imports :func:`build` with the application's ``args``;
``flowprefill serve`` calls it too after starting Redis. The replica deployment carries the
SLO-aware request router (``request_router_config``), so every handle to it, the ingress's
included, places requests by predicted TTFT.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from replicas.engine_api import ENGINE_KINDS
from replicas.engine_config import EngineConfig, EngineConfigError
from state.config_model import ConfigModel, config_dataclass, located, parse_config

ROUTER_POLICIES = ("slo_aware", "round_robin", "least_loaded", "prefix_affinity", "pow2")
REQUEST_ROUTER_CLASS = "router.request_router.SLOAwareRequestRouter"
DECODE_ROUTER_CLASS = "router.decode_router.DecodeRequestRouter"
NonEmpty = Annotated[str, Field(min_length=1)]


def _custom_only(resources: dict[str, float]) -> dict[str, float]:
    if {"CPU", "GPU", "memory"} & set(resources):
        raise ValueError("CPU, GPU and memory are replica_cpus / replica_gpus, not custom resources")
    return resources


#: Ray custom resources and the amount asked for ({flowprefill_worker: 1}).
CustomResources = Annotated[dict[NonEmpty, PositiveFloat], AfterValidator(_custom_only)]


class DecodeSettings(ConfigModel):
    """``args.decode``: the decode deployment of a P/D app (resources default to the replicas' own)."""

    num_replicas: PositiveInt = 1
    replica_cpus: NonNegativeFloat | None = None
    replica_gpus: NonNegativeFloat | None = None
    engine: dict[str, Any] | None = None  # settings over args.engine; the role is decode


@dataclass(frozen=True)
class DecodePool:
    """The decode deployment of a P/D app (``args.decode``): its replicas and their engine settings
    (``args.engine`` with ``args.decode.engine`` over it, role ``decode``)."""

    num_replicas: int
    replica_cpus: float
    replica_gpus: float
    engine: dict[str, Any]


@config_dataclass(EngineConfigError)
class AppConfig:
    """The application's settings, validated (errors name the field under ``args``)."""

    model_name: NonEmpty = "SmolLM2-135M-Instruct"
    engine_kind: Literal[ENGINE_KINDS] = "flowprefill"
    engine: dict[str, Any] = field(default_factory=dict)  # checked by the kind's own settings class
    num_replicas: PositiveInt = 1
    replica_cpus: NonNegativeFloat = 1.0
    replica_gpus: NonNegativeFloat = 0.0
    router_policy: Literal[ROUTER_POLICIES] = "slo_aware"
    slo: dict[str, Any] | None = None  # router/slo.py
    redis_url: str | None = None
    namespace: NonEmpty = "flowprefill"
    max_body_bytes: PositiveInt = 1 << 20
    api_keys_file: str | None = None  # API keys (router/auth.py); FLOWPREFILL_API_KEYS adds more
    protect_metrics: bool = False  # /metrics needs an API key too
    autoscaling: dict[str, Any] | None = None  # cluster/autoscaling.py
    # P/D disaggregation (replicas/handover.py): a mapping starts a second deployment of decode replicas;
    # the replicas above then run engine.role prefill. null: colocated replicas (the default).
    decode: DecodeSettings | None = None
    # Placement on a multi-node cluster (cluster/multinode.py): Ray custom resources each replica /
    # the router ingress asks for (e.g. {flowprefill_worker: 1}: one replica per worker node), and
    # Serve's cap on replicas per node (1: one per GPU node; null: no cap).
    replica_resources: CustomResources | None = None
    router_resources: CustomResources | None = None
    max_replicas_per_node: PositiveInt | None = None

    @model_validator(mode="after")
    def _roles_fit_the_decode_pool(self) -> AppConfig:
        role = self.engine.get("role", "colocated")
        if self.decode is None:
            if role != "colocated":
                raise located(("engine", "role"), f"{role} needs a decode pool (args.decode); "
                              "without one replicas run colocated", role)
            return self
        if self.engine_kind != "flowprefill":
            raise located(("engine_kind",), "P/D (args.decode) needs the flowprefill engine", self.engine_kind)
        if role != "prefill":
            raise located(("engine", "role"), f"must be prefill with a decode pool (args.decode), got {role!r}", role)
        decode_role = (self.decode.engine or {}).get("role", "decode")
        if decode_role != "decode":
            raise located(("decode", "engine", "role"), f"must be decode, got {decode_role!r}", decode_role)
        return self

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> AppConfig:
        """Parse ``args``; ``REDIS_URL`` from the environment fills ``redis_url`` when unset."""
        if isinstance(args, Mapping):
            args = {"redis_url": os.environ.get("REDIS_URL"), **args}
        config = parse_config(cls, args, EngineConfigError, "args")
        config.engine_limits()  # validate the engine settings early, with their path
        config.decode_pool()
        if config.api_keys_file is not None:  # refuse a bad key file at start, naming its field
            from router.auth import AccessConfigError, AccessPolicy

            try:
                AccessPolicy.from_sources(keys_file=config.api_keys_file)
            except AccessConfigError as exc:
                raise EngineConfigError("args.api_keys_file", str(exc)) from None
        if config.slo is not None:
            from router.slo import SLOPolicy

            SLOPolicy.from_dict(config.slo, path="args.slo")
        if config.autoscaling is not None:  # SLO-driven autoscaling (cluster/autoscaling.py)
            from cluster.autoscaling import serve_autoscaling_config

            serve_autoscaling_config(config.autoscaling, path="args.autoscaling")
        return config

    def decode_pool(self) -> DecodePool | None:
        """The decode deployment's settings under P/D, or None (colocated); its engine validated."""
        if self.decode is None:
            return None
        engine = {**self.engine, **(self.decode.engine or {}), "role": "decode"}
        EngineConfig.from_dict(engine, prefix="args.decode.engine")
        cpus, gpus = self.decode.replica_cpus, self.decode.replica_gpus
        return DecodePool(self.decode.num_replicas, self.replica_cpus if cpus is None else cpus,
                          self.replica_gpus if gpus is None else gpus, engine)

    def engine_limits(self) -> tuple[str | None, int]:
        """The engine's model directory (None: the default) and its bound on requests in progress."""
        if self.engine_kind == "flowprefill":
            engine = EngineConfig.from_dict(self.engine, prefix="args.engine")
            return engine.model, engine.max_waiting + engine.max_decoding
        if self.engine_kind == "echo":
            from replicas.echo_engine import EchoConfig

            return EchoConfig.from_dict(self.engine, prefix="args.engine").model, 4096
        if self.engine_kind == "vllm":
            from replicas.vllm_engine import MAX_ONGOING, VLLMConfig

            return VLLMConfig.from_dict(self.engine, prefix="args.engine").model, MAX_ONGOING
        raise AssertionError(f"engine_kind {self.engine_kind!r} passed validation")  # Literal[ENGINE_KINDS]


def build(args: Mapping[str, Any]) -> Any:  # noqa: ANN401 (a Serve Application)
    """The Serve application: the router ingress bound to the replica deployment.

    Built by Serve's controller from a config (``serve deploy`` / ``serve run CONFIG``), it needs a
    reachable ``REDIS_URL`` and keeps the replicas' listeners on loopback (cluster/deployed.py).
    """
    from cluster.deployed import built_by_serve, deployed_redis_url, deployment_env_vars
    from replicas.deployment import ReplicaServer

    config = AppConfig.from_args(args)
    if not built_by_serve():  # a driver (flowprefill serve, tests) brings its own Redis and setup hook
        return build_app(config, ReplicaServer)
    config = replace(config, redis_url=deployed_redis_url(config.redis_url))
    return build_app(config, ReplicaServer, env_vars=deployment_env_vars())


def build_app(config: AppConfig, replica_cls: type,  # noqa: ANN401 (a Serve Application)
              env_vars: Mapping[str, str] | None = None) -> Any:
    """The router ingress bound to a ``replica_cls`` deployment (the engine, or a model-free echo
    replica for router benchmarks: any class with the same ``generate``/``tokenizer_info`` methods).

    ``env_vars`` go into every deployment's runtime env (over the application's own)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from router.ingress import build_ingress_class

    model_dir, max_ongoing = config.engine_limits()
    runtime_env = {"runtime_env": {"env_vars": dict(env_vars)}} if env_vars else {}
    options: dict[str, Any] = {
        "name": "FlowPrefillReplica",
        "ray_actor_options": {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus,
                              **({"resources": dict(config.replica_resources)} if config.replica_resources else {}),
                              **runtime_env},
        "max_ongoing_requests": max_ongoing,
        "health_check_period_s": 5,
        # Serve's per-request access log costs CPU on the request path; /metrics counts requests.
        "logging_config": {"enable_access_log": False},
    }
    if config.autoscaling:
        from cluster.autoscaling import serve_autoscaling_config

        options["autoscaling_config"] = serve_autoscaling_config(config.autoscaling)  # FlowPrefill's policy by default
    else:
        options["num_replicas"] = config.num_replicas
    if config.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = config.max_replicas_per_node
    if config.router_policy != "pow2":  # pow2 is Serve's own default router, the baseline
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=REQUEST_ROUTER_CLASS,
            request_router_kwargs={"redis_url": config.redis_url, "namespace": config.namespace,
                                   "policy": config.router_policy},
        )
    replica = serve.deployment(replica_cls).options(**options)
    replicas = replica.bind(engine=config.engine, redis_url=config.redis_url, namespace=config.namespace,
                            engine_kind=config.engine_kind)
    decoders = None
    if (pool := config.decode_pool()) is not None:  # P/D: one deployment per role
        decode = serve.deployment(replica_cls).options(
            name="FlowPrefillDecode", num_replicas=pool.num_replicas,
            ray_actor_options={"num_cpus": pool.replica_cpus, "num_gpus": pool.replica_gpus,  # same nodes rule
                               **({"resources": dict(config.replica_resources)} if config.replica_resources else {}),
                               **runtime_env},
            **({"max_replicas_per_node": config.max_replicas_per_node} if config.max_replicas_per_node else {}),
            max_ongoing_requests=EngineConfig.from_dict(pool.engine).max_decoding * 2,
            health_check_period_s=5, logging_config={"enable_access_log": False},
            request_router_config=RequestRouterConfig(
                request_router_class=DECODE_ROUTER_CLASS,
                request_router_kwargs={"redis_url": config.redis_url, "namespace": config.namespace}))
        decoders = decode.bind(engine=pool.engine, redis_url=config.redis_url, namespace=config.namespace,
                               engine_kind=config.engine_kind)
    # The ingress only awaits replica streams: its concurrency bound must not be where requests
    # queue (Serve's default is 5 ongoing requests, which queued everything else FIFO in the proxy,
    # out of the replicas' EDF schedulers' sight). Replicas bound their own queues (max_waiting).
    replica_slots = max_ongoing * max(config.num_replicas, int((config.autoscaling or {}).get("max_replicas", 1)))
    ingress = serve.deployment(build_ingress_class()).options(
        name="FlowPrefillRouter", num_replicas=1,
        ray_actor_options={"num_cpus": 0.25, **runtime_env,
                           **({"resources": dict(config.router_resources)} if config.router_resources else {})},
        max_ongoing_requests=max(4096, replica_slots), logging_config={"enable_access_log": False})
    access = {"keys_file": config.api_keys_file, "protect_metrics": config.protect_metrics}
    return ingress.bind(replicas, config.model_name, model_dir, config.slo, config.max_body_bytes, access,
                        redis_url=config.redis_url, namespace=config.namespace, decoders=decoders)
