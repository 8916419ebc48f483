"""Dispatching one request through a prefill replica and then a decode replica (P/D disaggregation).

The prefill deployment's SLO-aware router places the prompt (:func:`router.dispatch.replica_outputs`,
retries included); its first token streams to the client as soon as the prefill replica has it. The
prefill replica's stream then ends with a ``handover`` row: a ticket naming the request's KV in
Ray's object store (:mod:`replicas.handover_transport`). This module passes the ticket to the decode
deployment, whose :class:`~router.decode_router.DecodeRequestRouter` picks the replica by free KV
and decode batch size, and streams the decoded tokens on.

The router holds the ticket's object reference until the decode stream ends, so the handover can
be sent again: when the chosen decode replica refuses it (no KV memory now: it never overwrites) or
dies before its first decoded token, the same KV goes to the next decode replica (after a short,
growing wait), up to ``max_attempts`` sends. A decode replica that fails after streaming tokens
ends the request with a 503, as a colocated replica does.

The handover's object lives as long as the prefill replica that put it (its owner). When that replica
dies after streaming the first token, before the handover was fetched (or before it was even sent),
the request is prefilled again on another prefill replica (:func:`again`: due one TTFT SLO from now,
never shed; the ingress's ``on_retry`` moves its journal entry back, as for any re-dispatch) and the
new handover continues from the tokens the client already has (the ticket's ``generated``): nothing
is streamed twice, and nothing accepted is lost. After ``max_reprefills`` such losses, a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import exceptions as rex

from replicas.errors import HandoverLost
from replicas.replica_request import ReplicaRequest
from router.api_errors import APIError
from router.dispatch import DEFAULT_MAX_RETRIES, is_replica_failure, replica_outputs
from state.clock import WALL_CLOCK

log = logging.getLogger("ray.serve")
DECODE_ATTEMPTS = 8
MAX_REPREFILLS = 2  # prefills of one request after the first, each when its prefill replica was lost
_BACKOFF_S = 0.1


async def pd_outputs(
    prefill: Any, decoders: Any, payload: ReplicaRequest, *,  # noqa: ANN401 (Serve DeploymentHandles)
    max_retries: int = DEFAULT_MAX_RETRIES, on_retry: Callable[[int, BaseException], None] | None = None,
    on_handover: Callable[[dict[str, Any]], None] | None = None, max_attempts: int = DECODE_ATTEMPTS,
    max_reprefills: int = MAX_REPREFILLS,
) -> AsyncIterator[dict[str, Any]]:
    """The output dicts of ``payload`` served by a prefill replica, then a decode replica; ``on_handover``
    sees each decode stream's first row (its ``handover_timing``), ``on_retry`` each re-dispatch (the
    ingress moves the journal entry back to unassigned), a re-prefill's included."""
    given: list[int] = []  # the tokens the client has from the first prefill
    for prefilled in range(max_reprefills + 1):
        request = payload if prefilled == 0 else again(payload, WALL_CLOCK())
        ticket: dict[str, Any] | None = None
        try:
            async with contextlib.aclosing(replica_outputs(prefill, request, max_retries=max_retries,
                                                           on_retry=on_retry)) as outputs:
                async for out in outputs:
                    if out.get("finish_reason") == "handover":
                        ticket = out.get("handover")
                        break
                    if prefilled:  # the client has the first token: this prefill only rebuilds the KV
                        if out.get("finish_reason") is not None:
                            raise APIError(503, f"request {payload.request_id} ended on its second prefill "
                                           f"({out['finish_reason']}) after its first prefill's replica was lost",
                                           type="server_error", headers={"Retry-After": "1"})
                        continue
                    given.extend(out.get("token_ids") or ())
                    yield out  # the first token, or a request that ended on the prefill side
        except APIError as err:
            if not (given and is_replica_failure(err.__cause__)) or prefilled >= max_reprefills:
                raise
            lost: BaseException = err.__cause__ or err
        else:
            if ticket is None:
                return
            if not isinstance(ticket, dict) or not isinstance(ticket.get("box"), list):
                raise APIError(503, "prefill replica sent a malformed handover", type="server_error")
            if prefilled:
                ticket = {**ticket, "generated": list(given)}
            try:
                async for out in decode_outputs(decoders, ticket, payload.request_id, on_handover=on_handover,
                                                max_attempts=max_attempts):
                    yield out
                return
            except HandoverLost as exc:
                if prefilled >= max_reprefills:
                    raise APIError(503, f"request {payload.request_id}: handover lost after {prefilled + 1} "
                                   f"prefills: {exc}", type="server_error", headers={"Retry-After": "1"}) from exc
                lost = exc
        log.warning("request %s: its prefill replica was lost after the first token (%s); prefilling it again "
                    "(%d of %d)", payload.request_id, lost, prefilled + 1, max_reprefills)
        if on_retry is not None:
            on_retry(prefilled + 1, lost)


def again(payload: ReplicaRequest, now: float) -> ReplicaRequest:
    """``payload`` to prefill again at ``now``: the client has its first token, so the TTFT deadline is
    past; the prefill is due one TTFT SLO from now and is never shed."""
    return dataclasses.replace(payload, arrival_s=now, sheddable=False)


async def decode_outputs(
    decoders: Any, ticket: dict[str, Any], request_id: str, *,  # noqa: ANN401
    on_handover: Callable[[dict[str, Any]], None] | None = None, max_attempts: int = DECODE_ATTEMPTS,
) -> AsyncIterator[dict[str, Any]]:
    """A decode replica's output dicts for a handover ticket, sent again (see the module docstring)."""
    box = ticket["box"]
    meta = {k: v for k, v in ticket.items() if k != "box"}
    attempt = 0
    while True:
        attempt += 1
        stream = decoders.options(stream=True).decode.remote(meta, box)
        yielded = finished = False
        why = ""
        try:
            async for out in stream:
                finished = out.get("finish_reason") is not None
                if not yielded and out.get("finish_reason") == "handover_lost":
                    raise HandoverLost(out.get("error") or f"handover of {request_id} lost")
                if not yielded and out.get("finish_reason") == "rejected":
                    why = out.get("error") or "rejected"
                    break  # refused before anything streamed: send it again (elsewhere, or later)
                if not yielded and on_handover is not None:
                    on_handover(out)
                yielded = True
                yield out
            if not why:
                return
        except HandoverLost:
            raise
        except Exception as exc:
            if not yielded and isinstance(exc, rex.ObjectLostError):  # the replica raised the fetch's error
                raise HandoverLost(f"handover of {request_id} lost: {type(exc).__name__}") from exc
            if not is_replica_failure(exc) or yielded:
                what = "while streaming" if yielded else "before decoding"
                raise APIError(503, f"decode replica failed {what}: {type(exc).__name__}", type="server_error",
                               headers={"Retry-After": "1"}) from exc
            why = f"{type(exc).__name__} before its first decoded token"
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    stream.cancel()
        if attempt >= max_attempts:
            raise APIError(503, f"no decode replica took request {request_id} after {attempt} attempts: {why}",
                           type="server_error", headers={"Retry-After": "1"})
        log.warning("request %s: decode replica did not take the handover (%s); sending it again (%d of %d)",
                    request_id, why, attempt + 1, max_attempts)
        await asyncio.sleep(_BACKOFF_S * attempt)
