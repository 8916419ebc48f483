"""Fault injection for the real-Ray P/D tests (tests/test_pd_faults.py): a replica deployment that can
hold one handover in the window a test kills a replica in.

:class:`HoldingReplicaServer` is the real :class:`~replicas.deployment.ReplicaServer`; its ``decode``
only adds a hold, armed through files in ``$FLOWPREFILL_PD_FAULT_DIR`` (Ray's workers inherit the
test's environment). The first ``decode`` call on any replica that finds ``mode`` claims the hold by
creating ``claimed`` (exclusively, so exactly one call holds) and writes its process id and replica
id there; every later call runs as the real one does.

* ``mode`` = ``decode``: the decode replica fetched and admitted the handover (its KV blocks are
  allocated there, its first decoded token is made) and holds that token back for two minutes: the
  test kills the replica before the client sees a decoded token.
* ``mode`` = ``fetch``: the decode replica holds before it fetches the handover from the object
  store until ``release`` exists: the test kills the prefill replica (the object's owner) meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from replicas.deployment import ReplicaServer

FAULT_DIR_ENV = "FLOWPREFILL_PD_FAULT_DIR"
HOLD_S = 120.0


def _claim(replica_id: str) -> str | None:
    """The armed mode if this call claims the hold, else None."""
    root = os.environ.get(FAULT_DIR_ENV)
    if not root or not (Path(root) / "mode").exists():
        return None
    try:
        fd = os.open(Path(root) / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "replica_id": replica_id}, f)
    return (Path(root) / "mode").read_text().strip()


class HoldingReplicaServer(ReplicaServer):
    """The replica deployment with a fault-injection hold in ``decode`` (see the module docstring)."""

    async def decode(self, ticket: dict[str, Any], box: list[Any]) -> AsyncIterator[dict[str, Any]]:
        """:meth:`ReplicaServer.decode`, held once where the armed mode says."""
        mode = _claim(self.replica_id)
        if mode == "fetch":
            release = Path(os.environ[FAULT_DIR_ENV]) / "release"
            while not release.exists():
                await asyncio.sleep(0.05)
        async for row in super().decode(ticket, box):
            if mode == "decode":
                await asyncio.sleep(HOLD_S)  # killed meanwhile
                mode = None
            yield row
