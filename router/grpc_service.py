"""The gRPC API (``proto/flowprefill.proto``) as plain functions: conversion, validation, streaming.

No Ray here: the Serve ingress deployment exposes ``Generate`` / ``Health`` methods that call
:func:`generate_stream` and :func:`health_reply` (Serve's gRPC proxy routes ``/flowprefill.v1.
FlowPrefill/<Method>`` to the ingress method of that name).

A ``GenerateRequest`` is validated exactly like the HTTP API: :func:`grpc_request_body` builds the
equivalent OpenAI JSON body and headers (``prompt`` -> ``/v1/completions``, ``messages`` ->
``/v1/chat/completions``; ``ttft_slo_ms`` / ``tpot_slo_ms`` -> the ``x-slo-ttft-ms`` /
``x-slo-tpot-ms`` headers; unset optional fields are left out) and :func:`parse_grpc_request`
runs the HTTP parser on it. Errors name the proto field (header names are mapped back).

Status codes (:func:`api_error_to_grpc_status`): 400/422 -> INVALID_ARGUMENT, 404 -> NOT_FOUND,
413 -> RESOURCE_EXHAUSTED (what gRPC itself answers for an over-size message), 429 ->
RESOURCE_EXHAUSTED, 503 -> UNAVAILABLE, anything else -> INTERNAL.

Importing this module generates the stubs first if they are missing or stale.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from functools import lru_cache
from typing import Any, Protocol

import grpc

from router.grpc_build import ensure_stubs

ensure_stubs()

from replicas.replica_request import ReplicaRequest  # noqa: E402
from router.api_errors import RATE_LIMIT, SERVER_ERROR, APIError  # noqa: E402
from router.grpc_gen import flowprefill_pb2 as pb  # noqa: E402
from router.logprobs_format import MIN_LOGPROB, clamp_logprob, entry_fields  # noqa: E402
from router.payload import build_payload  # noqa: E402
from router.protocol import (  # noqa: E402
    GenerateRequest,
    PromptTokenizer,
    ProtocolConfig,
    parse_chat_request,
    parse_completion_request,
)
from router.slo import HEADER_TPOT, HEADER_TTFT  # noqa: E402
from state.clock import WALL_CLOCK  # noqa: E402

log = logging.getLogger("flowprefill.router.grpc")

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
_HEADER_FIELDS = {HEADER_TTFT: "ttft_slo_ms", HEADER_TPOT: "tpot_slo_ms"}
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
_FAILED_REASONS = {"rejected": 429, "error": 503, "abort": 503}
# Proto -> JSON can grow a string up to 6x (``\u0001`` escapes); the proto size is checked first.
_JSON_GROWTH = 6
SERVING = "SERVING"

Send = Callable[[ReplicaRequest], AsyncIterator[dict[str, Any]]]


class StatusContext(Protocol):
    """What :func:`generate_stream` needs of a gRPC context (``grpc.aio.ServicerContext`` or Serve's
    ``RayServegRPCContext``)."""

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...


# ---------------------------------------------------------------------------------------------- errors
def api_error_to_grpc_status(err: APIError) -> grpc.StatusCode:
    """The gRPC status code for an HTTP-style :class:`APIError` (see the module docstring)."""
    return _STATUS.get(err.status, grpc.StatusCode.INTERNAL)


def error_details(err: APIError) -> str:
    """The status details: the message, prefixed with ``param: `` unless it already starts with it."""
    if err.param and not err.message.startswith(err.param):
        return f"{err.param}: {err.message}"
    return err.message


def set_error(grpc_context: StatusContext, err: APIError) -> str:
    """Set ``err``'s code and details on ``grpc_context``; returns the details."""
    details = error_details(err)
    grpc_context.set_code(api_error_to_grpc_status(err))
    grpc_context.set_details(details)
    return details


def _proto_names(err: APIError) -> APIError:
    """``err`` with the SLO header names the HTTP parser reports replaced by the proto field names."""
    field = _HEADER_FIELDS.get(err.param or "")
    if field is None:
        return err
    return APIError(err.status, err.message.replace(err.param or "", field), param=field, type=err.type,
                    code=err.code, headers=err.headers)


# ---------------------------------------------------------------------------------------------- requests
def _finite(msg: pb.GenerateRequest, name: str) -> float | None:
    if not msg.HasField(name):
        return None
    value = getattr(msg, name)
    if not math.isfinite(value):
        raise APIError.invalid(name, f"{name} must be a number, got {value!r}")
    return value


def grpc_request_body(msg: pb.GenerateRequest) -> tuple[str, bytes, dict[str, str]]:
    """The equivalent HTTP request: (endpoint ``completions`` | ``chat.completions``, JSON body, headers).

    Raises :class:`APIError` for what JSON cannot carry (a non-finite float) or no input at all.
    """
    body: dict[str, Any] = {"model": msg.model}
    kind = msg.WhichOneof("input")
    if kind == "messages":
        endpoint = "chat.completions"
        body["messages"] = [{"role": m.role, "content": m.content} for m in msg.messages.messages]
    elif kind == "prompt":
        endpoint = "completions"
        body["prompt"] = msg.prompt
    else:
        raise APIError.invalid("prompt", "prompt or messages is required")
    for name in ("max_tokens", "top_k", "seed", "priority"):
        if msg.HasField(name):
            body[name] = getattr(msg, name)
    for name in ("min_tokens",):
        if msg.HasField(name):
            body[name] = getattr(msg, name)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        value = _finite(msg, name)
        if value is not None:
            body[name] = value
    if msg.logit_bias:
        body["logit_bias"] = {str(t): (b if math.isfinite(b) else repr(b)) for t, b in msg.logit_bias.items()}
    if msg.HasField("logprobs"):
        if endpoint == "chat.completions":
            body["logprobs"], body["top_logprobs"] = True, msg.logprobs
        else:
            body["logprobs"] = msg.logprobs
    if msg.stop:
        body["stop"] = list(msg.stop)
    if msg.slo_class:
        body["slo_class"] = msg.slo_class
    headers: dict[str, str] = {}
    for header, name in _HEADER_FIELDS.items():
        if msg.HasField(name):
            headers[header] = repr(getattr(msg, name))  # nan/inf/negatives fail the header check
    return endpoint, json.dumps(body).encode("ascii"), headers


@lru_cache(maxsize=8)
def _json_config(config: ProtocolConfig) -> ProtocolConfig:
    """``config`` with room for JSON's escaping overhead (the proto size is checked against the limit)."""
    return replace(config, max_body_bytes=config.max_body_bytes * _JSON_GROWTH + 65536)


def parse_grpc_request(
    msg: pb.GenerateRequest,
    config: ProtocolConfig,
    tokenizer: PromptTokenizer | None = None,
    *,
    now: float | None = None,
) -> GenerateRequest:
    """Validate ``msg`` exactly as the HTTP API would; raises :class:`APIError` naming the proto field.

    An over-size message (``config.max_body_bytes``) is a 413 with param ``request``.
    """
    size = msg.ByteSize()
    if size > config.max_body_bytes:
        err = APIError.body_too_large(size, config.max_body_bytes)
        raise APIError(413, err.message.replace("request body", "request message"), param="request", code=err.code)
    if msg.request_id and not _REQUEST_ID.match(msg.request_id):
        raise APIError.invalid("request_id", "request_id must be 1-128 printable ASCII characters without spaces")
    endpoint, body, headers = grpc_request_body(msg)
    parse = parse_chat_request if endpoint == "chat.completions" else parse_completion_request
    try:
        return parse(body, headers, _json_config(config), tokenizer=tokenizer, request_id=msg.request_id or None,
                     now=now)
    except APIError as err:
        raise _proto_names(err) from None


# ---------------------------------------------------------------------------------------------- responses
def output_to_chunk(
    out: dict[str, Any], final_usage: tuple[int, int] | None, *, request_id: str = ""
) -> pb.GenerateChunk:
    """One replica output dict as a chunk; ``final_usage`` (prompt, completion tokens) on the last one.

    ``request_id`` defaults to the output's own ``request_id``.
    """
    chunk = pb.GenerateChunk(
        text=out.get("text") or "", token_ids=list(out.get("token_ids") or ()),
        finish_reason=out.get("finish_reason") or "", error=out.get("error") or "",
        request_id=request_id or str(out.get("request_id") or ""), replica_id=out.get("replica_id") or "",
    )
    for entry in out.get("logprobs") or ():
        token_id, logprob, top = entry_fields(entry)
        chunk.logprobs.append(pb.TokenLogprob(
            token_id=token_id, logprob=clamp_logprob(MIN_LOGPROB if logprob is None else logprob),
            top=[pb.TopLogprob(token_id=t, logprob=clamp_logprob(v)) for t, v in top]))
    if final_usage is not None:
        chunk.usage.prompt_tokens, chunk.usage.completion_tokens = final_usage
    return chunk


def health_reply(models: Sequence[str] = ()) -> pb.HealthReply:
    """The ``Health`` answer: the ingress is serving (and, if given, which models)."""
    return pb.HealthReply(status=SERVING, models=list(models))


def _replica_failure(out: dict[str, Any]) -> APIError:
    reason = out["finish_reason"]
    status = _FAILED_REASONS[reason]
    return APIError(status, out.get("error") or f"request {reason}",
                    type=RATE_LIMIT if status == 429 else SERVER_ERROR)


async def _close(stream: AsyncIterator[dict[str, Any]]) -> None:
    """Stop an unfinished replica stream: ``cancel()`` (Serve's response generator) or ``aclose()``."""
    cancel = getattr(stream, "cancel", None)
    if callable(cancel):
        cancel()
        return
    aclose = getattr(stream, "aclose", None)
    if callable(aclose):
        await aclose()


def _failed(grpc_context: StatusContext, err: APIError, error_chunk: bool, request_id: str) -> list[pb.GenerateChunk]:
    details = set_error(grpc_context, err)
    return [pb.GenerateChunk(error=details, finish_reason="error", request_id=request_id)] if error_chunk else []


async def generate_stream(
    msg: pb.GenerateRequest,
    *,
    config: ProtocolConfig,
    tokenizer: PromptTokenizer | None,
    send: Send,
    grpc_context: StatusContext,
    error_chunk: bool = False,
    authenticate: Callable[[], object] | None = None,
    authorize: Callable[[object, str], None] | None = None,
) -> AsyncIterator[pb.GenerateChunk]:
    """The body of ``Generate``: validate, ``send(payload)`` to the replicas, yield chunks.

    Text chunks carry the deltas; the last chunk has ``finish_reason`` and ``usage``. On failure
    (validation, a refusal such as finish_reason ``rejected``, an :class:`APIError` raised by
    ``send``'s stream, a crashed replica) the code and details are set on ``grpc_context`` and the
    stream ends; with ``error_chunk`` one last chunk with ``error`` set follows, which Ray Serve's
    gRPC proxy needs to carry the code to the client (it copies the context along with messages).
    An unfinished replica stream is cancelled when the client goes away.  ``authenticate()`` runs
    before validation and ``authorize(key, slo_class)`` after it (API keys, :mod:`router.auth`).
    """
    arrival = WALL_CLOCK()
    try:
        key = authenticate() if authenticate is not None else None
        req = parse_grpc_request(msg, config, tokenizer, now=arrival)
        if authorize is not None:
            authorize(key, req.slo.class_name)
    except APIError as err:
        for chunk in _failed(grpc_context, err, error_chunk, msg.request_id):
            yield chunk
        return
    payload = build_payload(req, arrival, config.prefix_naming)
    usage_prompt = payload.prompt_tokens
    stream = send(payload)
    finished = False
    completion = 0
    failure: APIError | None = None
    try:
        async for out in stream:
            reason = out.get("finish_reason")
            if reason in _FAILED_REASONS:
                finished, failure = True, _replica_failure(out)
                break
            completion = out.get("completion_tokens") or completion
            if reason is not None:
                finished = True
                yield output_to_chunk(out, (usage_prompt, completion), request_id=req.request_id)
                return
            if out.get("text") or out.get("token_ids"):
                yield output_to_chunk(out, None, request_id=req.request_id)
        else:
            finished = True
            failure = APIError(503, "the replica stream ended without a finish reason", type=SERVER_ERROR)
    except APIError as err:
        failure = err
    except Exception as exc:  # a replica died mid-stream: end with a clear status, as the HTTP stream does
        log.exception("gRPC stream %s failed", req.request_id)
        failure = APIError(503, f"replica failed while streaming: {type(exc).__name__}", type=SERVER_ERROR)
    finally:
        if not finished:
            await _close(stream)
    if failure is not None:
        for chunk in _failed(grpc_context, failure, error_chunk, req.request_id):
            yield chunk
