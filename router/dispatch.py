"""Dispatching one request to the replica deployment, with retries when a replica dies.

A request that has produced no output yet is sent again (the request router then picks among the
live replicas) when its replica fails: the actor died or became unreachable.  A request whose
stream is already under way cannot be replayed transparently (the client has tokens), so it ends
with a 503 :class:`~router.api_errors.APIError` naming the failure, never a hang.  A request the
router shed becomes a 429; closing the stream early cancels the replica call, which aborts the
request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from replicas.engine_types import ends_request
from replicas.replica_request import ReplicaRequest
from router.api_errors import APIError
from router.routing_stats import RequestShed

log = logging.getLogger("ray.serve")
DEFAULT_MAX_RETRIES = 3
_BACKOFF_S = 0.1  # grows linearly per retry: Serve needs a moment to drop a dead replica


def is_replica_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the replica (its actor or node) failed, not the request."""
    from ray import exceptions as rex

    return isinstance(exc, rex.RayActorError | rex.NodeDiedError | rex.WorkerCrashedError | rex.OwnerDiedError)


async def replica_outputs(
    handle: Any,  # noqa: ANN401 (a Serve DeploymentHandle)
    payload: ReplicaRequest,
    *,
    max_retries: int = DEFAULT_MAX_RETRIES,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The replica's output dicts for ``payload``; see the module docstring for failures."""
    attempt = 0
    while True:
        stream = handle.options(stream=True).generate.remote(payload)
        yielded = finished = False
        try:
            async for out in stream:
                finished = ends_request(out)
                yielded = True
                yield out
            return
        except RequestShed as exc:
            raise APIError.shed(str(exc) or "no replica can meet this request's TTFT SLO",
                                retry_after_s=exc.retry_after_s) from exc
        except Exception as exc:
            if not is_replica_failure(exc):
                raise
            if yielded or attempt >= max_retries:
                what = "while streaming" if yielded else f"after {attempt + 1} attempts"
                raise APIError(503, f"replica failed {what}: {type(exc).__name__}", type="server_error",
                               headers={"Retry-After": "1"}) from exc
            attempt += 1
            log.warning("request %s: replica failed before its first output (%s); retry %d of %d",
                        payload.request_id, type(exc).__name__, attempt, max_retries)
            if on_retry is not None:
                on_retry(attempt, exc)
            await asyncio.sleep(_BACKOFF_S * attempt)
        finally:
            if not finished:  # client went away or the stream failed: the replica aborts and frees KV
                with contextlib.suppress(Exception):  # a failed or shed call re-raises on cancel
                    stream.cancel()
