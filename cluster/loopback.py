"""Keep every Ray Serve listener on loopback.

Ray itself listens on the node IP (127.0.0.1 when the launcher starts it), but Ray Serve 2.60
binds two gRPC servers to all interfaces: each replica's inter-deployment server (``[::]:0``)
and the gRPC proxy (``[::]:port``). The launcher installs :func:`bind_serve_to_loopback` as Ray's
``worker_process_setup_hook``, so in every worker those addresses are rewritten to 127.0.0.1
before the servers start. ``tests/test_serving.py`` checks the result with ``ss -ltnp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"


def to_loopback(address: str) -> str:
    """``[::]:N`` / ``0.0.0.0:N`` -> ``127.0.0.1:N``; other addresses unchanged."""
    for wildcard in ("[::]", "0.0.0.0"):
        if address.startswith(wildcard + ":"):
            return LOOPBACK + address[len(wildcard):]
    return address


def _wrap(fn: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    def bind(server: Any, address: str) -> Any:  # noqa: ANN401
        return fn(server, to_loopback(address))

    bind.__wrapped__ = fn  # type: ignore[attr-defined]
    return bind


def bind_serve_to_loopback() -> None:
    """Ray ``worker_process_setup_hook``: patch Serve's gRPC binds to loopback (idempotent)."""
    import ray.serve._private.default_impl as default_impl
    import ray.serve._private.replica as replica

    if not hasattr(replica.add_port_to_grpc_server, "__wrapped__"):
        replica.add_port_to_grpc_server = _wrap(replica.add_port_to_grpc_server)
    if not hasattr(default_impl.add_grpc_address, "__wrapped__"):
        default_impl.add_grpc_address = _wrap(default_impl.add_grpc_address)
