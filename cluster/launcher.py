"""``flowprefill serve``: Redis (if needed), a local Ray on loopback, and the Serve app.

Everything listens on 127.0.0.1 unless ``--host`` says otherwise for the HTTP proxy. With no
``REDIS_URL``, a private redis-server is started on a free loopback port and stopped on exit.
Ctrl-C (SIGINT) or SIGTERM shuts Serve, Ray and Redis down cleanly.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from state.redis_server import RedisServer, redact_url, redis_url_from_env_or_start

if TYPE_CHECKING:
    from cluster.bench_cluster import DrivenCluster

# Ray reads these when it is imported: keep its listeners on the node IP (loopback here) and
# its usage reporting off. Import this module before ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Serve runs user code and each handle's request router on event loops of their own threads by
# default; every request then crosses threads twice per hop. Our deployments never block their
# loop (the engine computes on its own thread), so one loop per process is safe and took the
# router's overhead p50 from about 21 ms to about 15 ms on the 2-core bench machine. Set for Ray's
# workers only (start_local_ray's runtime_env): a driver keeps Serve's defaults, because a handle
# without its own router loop cannot be called from synchronous code (``handle.m.remote().result()``).
SERVE_LATENCY_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "ray_config.yaml"
APP_NAME = "flowprefill"


def load_app_args(config_path: Path) -> dict[str, Any]:
    """The ``args`` of the FlowPrefill application in a Serve config file (validated shape)."""
    try:
        data = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{config_path}: cannot read the Serve config ({exc})") from exc
    apps = data.get("applications") if isinstance(data, Mapping) else None
    if not isinstance(apps, list) or not apps:
        raise ValueError(f"{config_path}: field 'applications' must be a non-empty list")
    for index, app in enumerate(apps):
        if isinstance(app, Mapping) and app.get("name") == APP_NAME:
            args = app.get("args") or {}
            if not isinstance(args, Mapping):
                raise ValueError(f"{config_path}: field 'applications[{index}].args' must be a mapping")
            return dict(args)
    raise ValueError(f"{config_path}: no application named {APP_NAME!r} under 'applications'")


def worker_runtime_env() -> dict[str, Any]:
    """The job's runtime env: Serve's gRPC binds on loopback and one event loop per worker process."""
    return {"worker_process_setup_hook": "cluster.loopback.bind_serve_to_loopback",
            "env_vars": {k: os.environ.get(k, v) for k, v in SERVE_LATENCY_ENV.items()}}


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a single-node Ray whose every listener is on loopback."""
    import ray
    from ray._private import ray_constants

    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported: a process that imported
    # ray before this module set it would start its raylet, GCS and agents on every interface.
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
             logging_level="WARNING", log_to_driver=False, runtime_env=worker_runtime_env())


def ensure_profile(args: dict[str, Any]) -> dict[str, Any]:
    """Profile the replica model once here (cached) so replicas do not each profile at start-up.

    Replicas started from here share this one machine: unless ``cpu_threads`` is set, its usable
    cores are split between the most replicas the app may run (``num_replicas``, or autoscaling's
    ``max_replicas``), so they do not oversubscribe the cores, and the profile is measured with
    that many threads.
    """
    import torch

    from replicas.engine_config import EngineConfig, usable_cores
    from replicas.model.decoder import DecoderModel
    from replicas.model.default_model import prepare_default_model
    from replicas.profiling import load_or_profile, profile_cache_path

    if args.get("engine_kind") == "vllm":  # profiled through vLLM by the replica itself (cached on disk)
        from replicas.vllm_engine import VLLMConfig

        VLLMConfig.from_dict(args.get("engine") or {}, prefix="args.engine").check_environment("args.engine")
        return args
    if args.get("engine_kind", "flowprefill") != "flowprefill":  # only the native engine has a cost profile here
        return args
    engine = EngineConfig.from_dict(args.get("engine") or {}, prefix="args.engine")
    if engine.profile is not None or engine.device != "cpu":  # GPU replicas profile on their own device
        return args
    model_dir = engine.model or str(prepare_default_model())
    most = max(int(args.get("num_replicas", 1)), int((args.get("autoscaling") or {}).get("max_replicas", 1)))
    most += int((args.get("decode") or {}).get("num_replicas", 1)) if args.get("decode") else 0  # P/D
    compute_threads = engine.cpu_threads or max(1, usable_cores() // most)
    threads = torch.get_num_threads()
    torch.set_num_threads(compute_threads)  # the replicas' threads: the profile holds for them only
    try:
        model = DecoderModel.load(model_dir, dtype=engine.dtype, device=engine.device)
        load_or_profile(model, max_tokens=engine.profile_max_tokens)
        profile = str(profile_cache_path(model))
    finally:
        torch.set_num_threads(threads)
    return {**args, "engine": {**(args.get("engine") or {}), "model": model_dir, "cpu_threads": compute_threads,
                               "profile": profile}}


def run_app(args: Mapping[str, Any], host: str, port: int, redis_url: str | None, grpc_port: int = 9000) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and gRPC proxy on ``grpc_port``, deploy the app; returns its URL."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.app import build
    from router.grpc_build import ensure_stubs

    ensure_stubs()
    grpc = gRPCOptions(port=grpc_port, grpc_servicer_functions=["router.grpc_build.add_servicer_to_server"])
    # Proxies on the head only: on a multi-node cluster every node's proxy would take the same port
    # (one machine in `flowprefill cluster up`), and the router ingress runs there anyway.
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port}, grpc_options=grpc)
    app_args = {**args}
    if redis_url:
        app_args["redis_url"] = redis_url
    serve.run(build(app_args), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


class LocalStack:
    """:class:`bench.stack.ServingStack` for benchmarks: this launcher's single-node Ray on loopback."""

    default_config = DEFAULT_CONFIG

    def app_args(self, config_path: Path | None = None) -> dict[str, Any]:
        """See :func:`load_app_args` (the default config when None)."""
        return load_app_args(config_path or DEFAULT_CONFIG)

    def prepare(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """See :func:`ensure_profile`."""
        return ensure_profile(dict(args))

    def start_ray(self, num_cpus: int | None = None) -> None:
        """See :func:`start_local_ray`."""
        start_local_ray(num_cpus)

    def deploy(self, args: Mapping[str, Any], host: str, port: int, redis_url: str | None, grpc_port: int) -> str:
        """See :func:`run_app`."""
        return run_app(args, host, port, redis_url, grpc_port)

    def start_cluster(self, nodes: int, head_cpus: float = 2.0, worker_cpus: float = 1.0) -> DrivenCluster:
        """See :meth:`cluster.bench_cluster.DrivenCluster.start` (a :class:`bench.stack.NodeCluster`)."""
        from cluster.bench_cluster import DrivenCluster

        return DrivenCluster.start(nodes, head_cpus, worker_cpus)


LOCAL_STACK = LocalStack()


def serve_main(config_path: Path, overrides: Mapping[str, Any], host: str, port: int,
               num_cpus: int | None = None, grpc_port: int = 9000, address: str | None = None) -> int:
    """Run until interrupted; returns the process exit code.

    Without ``address`` (and no ``RAY_ADDRESS``) a local single-node Ray is started and shut down
    on exit. With one, this process joins that cluster (cluster/join.py), spreads the replicas one
    per FlowPrefill worker node when the cluster has them (cluster/multinode.py) and on exit removes
    only the application it deployed.
    """
    from cluster.join import resolve_address

    address, setting = resolve_address(address)
    if address and num_cpus is not None:
        raise ValueError("--num-cpus sizes a local Ray: the cluster at --address has its own CPUs")
    args = {**load_app_args(config_path), **overrides}
    redis: RedisServer | None = None
    stop = threading.Event()
    started_serve = deployed = False
    try:
        if address:  # join first: a wrong address fails before anything is started
            from cluster.join import connect_ray

            connect_ray(address, setting, worker_runtime_env())
        redis_url, redis = redis_url_from_env_or_start()
        print(f"redis: {redact_url(redis_url)}{' (private)' if redis else ''}", file=sys.stderr)
        os.environ["REDIS_URL"] = redis_url
        if address:
            import ray

            from cluster.join import check_redis_from_nodes, serve_running
            from cluster.multinode import placement_args

            nodes = check_redis_from_nodes(redis_url)
            placed = placement_args(ray.cluster_resources())
            args = {**args, **placed, **overrides}  # an explicit --replicas still wins
            print(f"ray: joined {address} ({nodes} nodes; replicas: {args.get('num_replicas', 1)}"
                  f"{', one per worker node' if placed else ''})", file=sys.stderr)
            started_serve = not serve_running()
        else:
            start_local_ray(num_cpus)
        args = ensure_profile(args)
        started = threading.Event()

        def on_signal(*_: object) -> None:
            stop.set()
            if not started.is_set():  # still deploying: stop waiting for it (the finally cleans up)
                raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
            signal.signal(sig, on_signal)
        deployed = True
        url = run_app(args, host, port, redis_url, grpc_port)
        started.set()
        print(f"FlowPrefill is serving the OpenAI API at {url}/v1 and gRPC at 127.0.0.1:{grpc_port} "
              "(Ctrl-C to stop)", flush=True)
        stop.wait()
        print("shutting down", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted while starting; shutting down", file=sys.stderr)
        return 130
    finally:
        _stop_serving(bool(address), deployed, started_serve)
        if redis is not None:
            redis.close()


def _stop_serving(joined: bool, deployed: bool, started_serve: bool) -> None:
    """Remove what ``serve_main`` started: on a joined cluster only its app, else Serve and Ray."""
    import ray

    try:
        if joined:
            if deployed and ray.is_initialized():
                from cluster.join import remove_app

                remove_app(APP_NAME, started_serve)
        else:
            from ray import serve

            serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - best effort while exiting
        print(f"while removing the app: {type(exc).__name__}: {exc}", file=sys.stderr)
    if ray.is_initialized():
        ray.shutdown()
