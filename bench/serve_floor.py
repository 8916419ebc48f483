"""Ray Serve's own latency floor for the router's request path, measured beside the router.

The router's overhead (client latency minus the replica's TTFT) includes what Ray Serve costs
before any FlowPrefill code runs: the HTTP proxy, one hop to the ingress replica, one streaming
handle call to a downstream replica and the way back. This module deploys the smallest app with
exactly those hops (a FastAPI ingress that awaits the first item of a downstream streaming
deployment) in the same Ray session, so ``bench router`` can report how much of the overhead is
Serve's floor on this machine and how much the router adds.
"""

# No ``from __future__ import annotations`` here: the FastAPI endpoint below is pickled to the
# Serve replica, and a string annotation ('Request') would not resolve there.
import json
import time
import urllib.request
from typing import Any

from fastapi import FastAPI, Request

FLOOR_APP = "serve-floor"
FLOOR_ROUTE = "/serve-floor"


def deploy_floor_app() -> None:
    """Deploy the two-hop reference app under :data:`FLOOR_ROUTE` (Serve must be running)."""
    from ray import serve

    api = FastAPI()
    quiet: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0}, "logging_config": {"enable_access_log": False}}

    @serve.deployment(name="FloorReplica", **quiet)
    class FloorReplica:
        async def generate(self, body: dict[str, Any]) -> Any:  # noqa: ANN401 (an async generator)
            yield {"text": "x", "received": len(body)}

    @serve.deployment(name="FloorIngress", **quiet)
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, replica: Any) -> None:  # noqa: ANN401 (a DeploymentHandle)
            self.replica = replica.options(stream=True)

        @api.post("/")
        async def complete(self, request: Request) -> dict[str, Any]:
            body = json.loads(await request.body())
            async for item in self.replica.generate.remote(body):
                return item
            return {}

    serve.run(FloorIngress.bind(FloorReplica.bind()), name=FLOOR_APP, route_prefix=FLOOR_ROUTE)


def measure_floor(port: int, body: bytes, n: int) -> list[float]:
    """Client latency (ms) of ``n`` sequential POSTs to the floor app."""
    url = f"http://127.0.0.1:{port}{FLOOR_ROUTE}/"
    out = []
    for _ in range(n):
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out
