"""``python -m cluster.raynode start ...``: Ray's ``ray start``, with a worker node allowed on loopback.

Ray 2.60 has one switch for two things: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps
``--node-ip-address 127.0.0.1`` as given (with 1 Ray swaps a loopback address for the machine's
routable IP, and every listener follows it), but the same switch makes ``ray start --address``
refuse to start a worker node. :mod:`cluster.multinode` runs every node through this wrapper: the
environment says 0, so the node and every process it spawns resolve to loopback, and only here,
in the ``ray start`` process, are worker nodes allowed and a loopback node address kept as given.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    """Run ``ray <argv>`` (e.g. ``start --block --address ...``) with the loopback rules above."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray reads its constants
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main as ray_main

    resolve = services.resolve_ip_for_localhost

    def keep_loopback(host: str) -> str:
        return host if services.is_localhost(host) else resolve(host)

    services.resolve_ip_for_localhost = keep_loopback
    ray_constants.ENABLE_RAY_CLUSTER = True  # read by `ray start` when a worker node joins
    sys.argv = ["ray", *argv]
    try:
        ray_main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
