"""What a benchmark needs from the launcher to run FlowPrefill in its own process.

``bench/`` sits below ``cluster/`` in the package layers (state, replicas, router, bench,
cluster; ``scripts/import_layers.py`` checks it), so it never imports the launcher. The
``flowprefill`` CLI (``cluster/cli.py``) hands every bench command that starts Ray, deploys the
Serve app or reads the Serve config a :class:`ServingStack`: ``cluster.launcher.LOCAL_STACK``,
a single-node Ray on loopback, which can also start a local multi-node cluster
(:meth:`ServingStack.start_cluster`, ``cluster.multinode.LocalCluster`` behind a
:class:`NodeCluster`) and connect this process to it as the driver. Benchmarks that run servers as child processes
(``bench/servers.py``) start ``python -m cluster.cli serve`` instead and need none of this.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class NodeCluster(Protocol):
    """A local multi-node Ray cluster this process drives (implemented in ``cluster.bench_cluster``)."""

    @property
    def address(self) -> str:
        """The head's GCS address, ``127.0.0.1:PORT``."""

    @property
    def worker_nodes(self) -> list[int]:
        """Indices of the worker nodes (1..N-1; 0 is the head)."""

    def placement_args(self) -> dict[str, Any]:
        """App ``args`` that put one replica on each worker node and the router on the head."""

    def kill_node(self, index: int) -> None:
        """SIGKILL worker node ``index`` and everything it runs (a lost machine)."""

    def close(self) -> None:
        """Disconnect this driver and stop every node (safe to call twice)."""


class ServingStack(Protocol):
    """Starts and configures a local FlowPrefill deployment (implemented in ``cluster.launcher``)."""

    @property
    def default_config(self) -> Path:
        """The Serve config file used when none is given (``ray_config.yaml``)."""

    def app_args(self, config_path: Path | None = None) -> dict[str, Any]:
        """The FlowPrefill application's ``args`` in a Serve config (the default one when None)."""

    def prepare(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """``args`` with what replicas need filled in before they start (the profiled cost model)."""

    def start_ray(self, num_cpus: int | None = None) -> None:
        """Start a single-node Ray whose listeners are all on loopback."""

    def deploy(self, args: Mapping[str, Any], host: str, port: int, redis_url: str | None, grpc_port: int) -> str:
        """Deploy the Serve app with ``args`` (HTTP on ``host:port``, gRPC on ``grpc_port``); returns its URL."""

    def start_cluster(self, nodes: int, head_cpus: float = 2.0, worker_cpus: float = 1.0) -> NodeCluster:
        """Start a local ``nodes``-node cluster on loopback and connect this process to it as a driver."""
