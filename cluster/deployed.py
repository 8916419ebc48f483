"""The rules for an app that Serve's controller builds from a config file, and configs to deploy.

``serve deploy CONFIG`` (through the head's dashboard) and ``serve run CONFIG`` hand the config to
Serve's controller, which runs ``cluster.app:build`` in a Ray task on the cluster. No
``flowprefill serve`` process is there to start a private Redis or to give the job Ray's
``worker_process_setup_hook``, so :func:`cluster.app.build` applies :func:`deployed_redis_url`
and :func:`deployment_env_vars` itself when it runs inside Ray (:func:`built_by_serve`):

* Redis: ``args.redis_url`` or ``REDIS_URL`` (the application's ``runtime_env.env_vars`` or the
  node's environment) must be set and answer a PING within :data:`REDIS_CHECK_TIMEOUT_S`, else the
  build fails with a message naming ``REDIS_URL``: Serve reports the app ``DEPLOY_FAILED`` with it
  (``serve status``) instead of replicas that never share their queue state.
* Loopback: on a node whose address is loopback (``flowprefill cluster up``) each deployment's
  runtime env names :func:`cluster.loopback.bind_serve_to_loopback` as its worker setup hook, so
  the replicas' gRPC servers listen on 127.0.0.1 as they do under ``flowprefill serve``.

:func:`render_deploy_config` writes ``ray_config.yaml`` for one such cluster
(``flowprefill cluster deploy-config``): ``REDIS_URL`` in the runtime env, the HTTP proxy on
127.0.0.1, and one replica per worker node with the router on the head.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REDIS_URL_ENV = "REDIS_URL"
REDIS_CHECK_TIMEOUT_S = 3.0  # connect and PING: a closed port fails at once, a black hole within this
SETUP_HOOK = "cluster.loopback.bind_serve_to_loopback"
APP_NAME = "flowprefill"


class DeployConfigError(ValueError):
    """A deployed app's Redis or a deploy config is unusable (the message names the setting)."""


def built_by_serve() -> bool:
    """Whether this process is a Ray worker (Serve's controller building an app from a config),
    not a driver such as ``flowprefill serve``, which brings its own Redis and setup hook."""
    import ray

    if not ray.is_initialized():
        return False
    from ray._private.worker import WORKER_MODE, global_worker

    return global_worker.mode == WORKER_MODE


def deployed_redis_url(redis_url: str | None, timeout_s: float = REDIS_CHECK_TIMEOUT_S) -> str:
    """``redis_url`` once it answered a PING; :class:`DeployConfigError` naming ``REDIS_URL`` when it
    is unset or does not answer within ``timeout_s``."""
    from state.redis_server import redact_url

    if not redis_url:
        raise DeployConfigError(
            f"{REDIS_URL_ENV} is not set: an app deployed from a config (serve deploy / serve run CONFIG) "
            "shares its queue state through Redis and cannot start a private one; set "
            f"applications[].runtime_env.env_vars.{REDIS_URL_ENV} (`flowprefill cluster deploy-config` "
            "writes it) or args.redis_url")
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means the replicas could not share state
        raise DeployConfigError(f"{REDIS_URL_ENV}={redact_url(redis_url)}: Redis does not answer from this node "
                                f"({type(exc).__name__}: {exc}; waited at most {timeout_s:g} s)") from None
    return redis_url


def deployment_env_vars() -> dict[str, str]:
    """``env_vars`` every deployment's runtime env carries when Serve's controller builds the app:
    the loopback setup hook on a loopback node, and the one-event-loop settings of
    :data:`cluster.launcher.SERVE_LATENCY_ENV` (the app's own ``env_vars`` win)."""
    import ray
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    from cluster.join import is_loopback
    from cluster.launcher import SERVE_LATENCY_ENV

    env = {k: os.environ.get(k, v) for k, v in SERVE_LATENCY_ENV.items()}
    if is_loopback(ray.util.get_node_ip_address()) and not os.environ.get(WORKER_PROCESS_SETUP_HOOK_ENV_VAR):
        env[WORKER_PROCESS_SETUP_HOOK_ENV_VAR] = SETUP_HOOK  # what ray.init(runtime_env=...) turns the hook into
    return env


def render_deploy_config(config_path: Path, redis_url: str, placement: Mapping[str, Any],
                         http_port: int = 8000) -> dict[str, Any]:
    """``config_path`` (a Serve config with the ``flowprefill`` app) made deployable onto a cluster:
    ``REDIS_URL`` in the app's runtime env, Serve's HTTP proxy on 127.0.0.1:``http_port`` on the
    head only, and ``placement`` (:func:`cluster.multinode.placement_args`) over the app's args."""
    if not redis_url:
        raise DeployConfigError(f"{REDIS_URL_ENV}: give --redis-url or set {REDIS_URL_ENV} (Redis every node reaches)")
    try:
        data = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DeployConfigError(f"{config_path}: cannot read the Serve config ({exc})") from exc
    apps = data.get("applications") if isinstance(data, dict) else None
    app = next((a for a in apps or [] if isinstance(a, dict) and a.get("name") == APP_NAME), None)
    if app is None:
        raise DeployConfigError(f"{config_path}: no application named {APP_NAME!r} under 'applications'")
    app["args"] = {**(app.get("args") or {}), **placement}
    runtime_env = dict(app.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), REDIS_URL_ENV: redis_url}
    app["runtime_env"] = runtime_env
    data["proxy_location"] = "HeadOnly"  # one machine: every node's proxy would take the same port
    data["http_options"] = {**(data.get("http_options") or {}), "host": "127.0.0.1", "port": http_port}
    return data


def write_deploy_config(data: Mapping[str, Any], out: Path) -> None:
    """Write a rendered config (it holds ``REDIS_URL``, maybe with a password: owner-only)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Generated by `flowprefill cluster deploy-config` for one local cluster; deploy it with\n"
              "#   RAY_AUTH_MODE=token serve deploy THIS_FILE --address <the dashboard address>\n")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(header + yaml.safe_dump(dict(data), sort_keys=False))
