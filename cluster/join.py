"""``flowprefill serve --address``: deploy onto a Ray cluster that is already running.

The address is the head's GCS ``HOST:PORT`` (what ``ray start --head`` and
``flowprefill cluster up`` print); ``RAY_ADDRESS`` is read when ``--address`` is not given.
Before ``ray.init`` (which retries an unreachable head for a long time) the head is probed
with a plain TCP connect, so a wrong address fails within seconds, naming the setting.

Redis must be reachable from every node (replicas publish their queue state there, routers read
it): a loopback ``REDIS_URL`` is refused outright when the cluster's nodes are not on loopback,
and :func:`check_redis_from_nodes` pings Redis from a zero-CPU task pinned to each alive node,
with a bound on the whole check. On exit :func:`remove_app` deletes only the application this
command deployed; the cluster and any other application on it stay, and Serve itself is shut
down only when this command started it and nothing else runs on it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

ADDRESS_ENV = "RAY_ADDRESS"
CONNECT_TIMEOUT_S = 5.0
REDIS_CHECK_TIMEOUT_S = 120.0  # a node starts a Python worker for the check: slow on a loaded 2-core machine


class AddressError(ValueError):
    """A cluster or Redis address is malformed or unreachable (the message names the setting)."""


def resolve_address(address: str | None) -> tuple[str | None, str]:
    """``(address, setting)``: ``--address``, else ``$RAY_ADDRESS``, else ``(None, "")`` (start a local Ray)."""
    if address:
        return address.strip(), "--address"
    env = os.environ.get(ADDRESS_ENV, "").strip()
    if env and env not in ("local", "auto"):
        return env, ADDRESS_ENV
    return None, ""


def split_address(address: str, setting: str = "--address") -> tuple[str, int]:
    """``HOST:PORT`` (``ray://`` is refused: Serve needs a driver on a node, not Ray Client)."""
    if "://" in address:
        raise AddressError(f"{setting}={address!r}: give the head's GCS address HOST:PORT (as `ray start --head` "
                           "or `flowprefill cluster up` print it), not a URL")
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"{setting}={address!r}: expected HOST:PORT, e.g. 127.0.0.1:6379")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def probe(host: str, port: int, what: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """TCP-connect to ``host:port`` within ``timeout_s`` or raise :class:`AddressError` naming ``what``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise AddressError(f"{what}: nothing answers at {host}:{port} ({reason} within {timeout_s:g} s)") from None


def use_local_token() -> None:
    """Authenticate to the cluster with this user's Ray token (``~/.ray/auth_token``) when
    ``RAY_AUTH_MODE`` is unset: ``ray start`` enables token auth when a token exists, but
    ``ray.init`` with an explicit address only uses it when told to."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect_ray(address: str, setting: str, runtime_env: dict[str, Any]) -> None:
    """Probe the head, then attach this process to the cluster as a driver."""
    import ray

    host, port = split_address(address, setting)
    probe(host, port, f"{setting}={address} (the Ray head's GCS)")
    use_local_token()
    ray.init(address=f"{host}:{port}", logging_level="WARNING", log_to_driver=False, runtime_env=runtime_env)


def check_redis_url(redis_url: str, node_hosts: list[str], setting: str = "REDIS_URL") -> None:
    """Refuse a loopback Redis when some node is on another host: it could not reach it."""
    host = urlsplit(redis_url).hostname or "localhost"
    remote = sorted({h for h in node_hosts if not is_loopback(h)})
    if is_loopback(host) and remote:
        raise AddressError(f"{setting}: Redis at {host} is this machine's loopback, which nodes {', '.join(remote)} "
                           "cannot reach; set REDIS_URL to an address every node can reach")


def _ping(redis_url: str) -> str | None:
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=3).ping()
        return None
    except Exception as exc:  # noqa: BLE001 - reported to the caller with the node
        return f"{type(exc).__name__}: {exc}"


def check_redis_from_nodes(redis_url: str, setting: str = "REDIS_URL",
                           timeout_s: float = REDIS_CHECK_TIMEOUT_S) -> int:
    """Ping Redis from every alive node (zero-CPU tasks pinned to each); returns how many answered.

    Raises :class:`AddressError` naming ``setting`` and the nodes that could not reach Redis, or that
    did not report within ``timeout_s``.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from state.redis_server import redact_url

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check_redis_url(redis_url, [n["NodeManagerAddress"] for n in nodes], setting)
    ping = ray.remote(num_cpus=0, max_retries=0)(_ping)
    refs = {ping.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(redis_url): n for n in nodes}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    failed = [f"{refs[r]['NodeManagerAddress']} ({refs[r]['NodeID'][:8]}): {err}"
              for r, err in zip(ready, ray.get(ready)) if err is not None]
    failed += [f"{refs[r]['NodeManagerAddress']} ({refs[r]['NodeID'][:8]}): no answer within {timeout_s:g} s"
               for r in pending]
    for ref in pending:
        ray.cancel(ref, force=True)
    if failed:
        raise AddressError(f"{setting}={redact_url(redis_url)}: not reachable from every node: " + "; ".join(failed))
    return len(nodes)


def serve_running() -> bool:
    """Whether a Serve controller already runs on the connected cluster."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def remove_app(app_name: str, started_serve: bool, timeout_s: float = 60.0) -> None:
    """Delete ``app_name`` only; shut Serve down too when this process started it and no app is left."""
    from ray import serve

    serve.delete(app_name, _blocking=True)
    if not started_serve:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        if app_name not in apps:
            break
        time.sleep(0.2)
    if not serve.status().applications:
        serve.shutdown()
