"""A local multi-node cluster driven by a benchmark process (:class:`bench.stack.NodeCluster`).

``bench router --nodes N`` and ``bench faults --kill node`` run the app on a
:class:`~cluster.multinode.LocalCluster` the way tests/test_multinode.py does: head + worker
raylets on loopback, this process connected as the driver (the user's Ray token, the launcher's
worker runtime env), replicas one per worker node and the router on the head
(:func:`~cluster.multinode.placement_args`). The cluster's state file is private to the run, so a
cluster started by ``flowprefill cluster up`` is never touched.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from cluster.multinode import LocalCluster, placement_args


class DrivenCluster:
    """A :class:`LocalCluster` plus this process as its Ray driver; :meth:`close` undoes both."""

    def __init__(self, cluster: LocalCluster, state_dir: Path) -> None:
        self._cluster = cluster
        self._state_dir = state_dir
        self._closed = False

    @classmethod
    def start(cls, nodes: int, head_cpus: float = 2.0, worker_cpus: float = 1.0) -> DrivenCluster:
        """Start ``nodes`` nodes (head included) and connect; everything is stopped if connecting fails."""
        import ray

        from cluster.join import use_local_token
        from cluster.launcher import worker_runtime_env

        if nodes < 2:
            raise ValueError(f"--nodes: a multi-node cluster needs the head and at least one worker, got {nodes}")
        state_dir = Path(tempfile.mkdtemp(prefix="fp-bench-cluster-"))
        try:  # LocalCluster.up stops what it started when it fails
            cluster = LocalCluster.up(nodes, head_cpus=head_cpus, worker_cpus=worker_cpus,
                                      state_file=state_dir / "cluster.json")
        except BaseException:
            shutil.rmtree(state_dir, ignore_errors=True)
            raise
        driven = cls(cluster, state_dir)
        try:
            use_local_token()
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False,
                     runtime_env=worker_runtime_env())
        except BaseException:
            driven.close()
            raise
        return driven

    @property
    def address(self) -> str:
        """The head's GCS address."""
        return self._cluster.address

    @property
    def worker_nodes(self) -> list[int]:
        """Indices of the worker nodes."""
        return sorted(n.index for n in self._cluster.nodes if n.index != 0)

    def placement_args(self) -> dict[str, Any]:
        """See :func:`cluster.multinode.placement_args` (read from the connected cluster)."""
        import ray

        return placement_args(ray.cluster_resources())

    def kill_node(self, index: int) -> None:
        """See :meth:`LocalCluster.kill_node`."""
        self._cluster.kill_node(index)

    def close(self) -> None:
        """``ray.shutdown()`` then stop every node and remove the private state."""
        if self._closed:
            return
        self._closed = True
        import ray

        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            self._cluster.down()
            shutil.rmtree(self._state_dir, ignore_errors=True)
