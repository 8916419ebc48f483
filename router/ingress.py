"""The router ingress: the OpenAI-compatible HTTP API as a Ray Serve deployment.

Per request: parse and validate (:mod:`router.protocol`), tokenize, resolve the SLO class into a
deadline, shed sheddable requests that no replica can serve in time (429), then send the
request through the replica deployment's handle. Placement (which replica) is decided by the
SLO-aware ``RequestRouter`` configured on the replica deployment; ordering (when) happens in
the replica's scheduler. Outputs stream back as SSE or are collected into one JSON body.

Every answered request carries its TTFT decomposition (:mod:`replicas.ttft_parts`): the
``x-flowprefill-ttft-parts`` header (streams too: their status line waits for the first output)
and, in a stream, the ``flowprefill.ttft_parts`` field of the ``finish_reason`` chunk. It is
absent when the engine did not time the request (vLLM).
"""


import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from replicas.engine_types import ends_request
from replicas.prefix_hash import PrefixNaming
from replicas.replica_request import ReplicaRequest
from replicas.ttft_parts import TTFT_PARTS_HEADER, TTFTParts, engine_ttft_of
from router.api_errors import APIError
from router.auth import AccessPolicy
from router.choices import ChoiceCollector, echo_text
from router.dispatch import replica_outputs
from router.journal import RequestJournal
from router.metrics import RouterMetrics
from router.payload import build_payload
from router.pd_dispatch import pd_outputs
from router.protocol import GenerateRequest, ProtocolConfig, parse_chat_request, parse_completion_request
from router.responses import StreamEncoder
from router.slo import SLOPolicy
from router.tokenize_api import detokenize, models_list, tokenize
from state.clock import WALL_CLOCK
from state.schema import DEFAULT_NAMESPACE

log = logging.getLogger("flowprefill.router")

app = FastAPI(title="FlowPrefill", description="SLO-aware LLM serving (OpenAI-compatible API)")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.to_body(), status_code=err.status, headers=err.headers or None)


class RouterIngress:
    """FastAPI ingress; ``replicas`` is the handle of the replica deployment (under P/D, of the prefill
    replicas, and ``decoders`` of the decode replicas)."""

    decoders: Any = None  # colocated unless __init__ is given a decode deployment

    async def __init__(self, replicas: Any, model_name: str, model_dir: str | None = None,  # noqa: ANN401
                       slo: dict[str, Any] | None = None, max_body_bytes: int = 1 << 20,
                       access: dict[str, Any] | None = None, redis_url: str | None = None,
                       namespace: str = DEFAULT_NAMESPACE, decoders: Any = None) -> None:  # noqa: ANN401
        from replicas.model.default_model import prepare_default_model
        from replicas.model.tokenizer import Tokenizer

        self.replicas = replicas
        self.decoders = decoders  # the decode deployment's handle under P/D (router/pd_dispatch.py), else None
        self.model_name = model_name
        directory = model_dir or str(prepare_default_model())
        self.tokenizer = Tokenizer.from_dir(directory)
        info = await replicas.tokenizer_info.remote()
        self.protocol = ProtocolConfig(
            served_models=(model_name,), slo_policy=SLOPolicy.from_dict(slo) if slo else SLOPolicy.default(),
            max_body_bytes=max_body_bytes, max_model_len=info["max_model_len"], vocab_size=info["vocab_size"],
            prefix_naming=PrefixNaming.from_dict(info.get("prefix")),
        )
        self.created = int(WALL_CLOCK())  # when this ingress started serving the model (/v1/models)
        self.metrics = RouterMetrics()
        self.journal = RequestJournal.from_url(redis_url, namespace)
        self.access = AccessPolicy.from_sources(**(access or {}))
        if self.access.enabled:
            log.info("API keys required: %d configured (metrics %s)", len(self.access.keys),
                     "protected" if self.access.protect_metrics else "open")
        from router.routing_stats import STATS

        STATS.hooks.append(self._on_routing_event)

    def _on_retry(self, attempt: int, exc: BaseException) -> None:
        """A replica failed before a request's first output; it is being sent again."""
        self.metrics.retries.labels(type(exc).__name__).inc()

    def _on_handover(self, out: dict[str, Any]) -> None:
        """A decode replica took a handed-over request: record what the handover cost."""
        timing = out.get("handover_timing")
        if isinstance(timing, dict):
            self.metrics.observe_handover(timing)

    def _on_routing_event(self, event: str, value: float) -> None:
        """Feed the request router's decisions (same process as this ingress) into /metrics."""
        if event == "decision_ms":
            self.metrics.routing_ms.observe(value)
        elif event == "redis_fallback":
            self.metrics.redis_fallbacks.inc()
        elif event == "replicas":
            from router.routing_stats import STATS

            self.metrics.set_replicas(STATS.replicas)

    # ------------------------------------------------------------------ endpoints
    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        return await self._handle(request, parse_completion_request, "completions")

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        return await self._handle(request, parse_chat_request, "chat.completions")

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the served model, when this ingress started serving it, its context length."""
        return models_list(self.protocol, self.created)

    async def tokenize(self, request: Request) -> Response:
        """``POST /tokenize`` (vLLM's): a prompt or chat messages to token ids."""
        return await self._utility(request, tokenize)

    async def detokenize(self, request: Request) -> Response:
        """``POST /detokenize`` (vLLM's): token ids to text."""
        return await self._utility(request, detokenize)

    async def _utility(self, request: Request, handler: Any) -> Response:  # noqa: ANN401
        try:
            self.access.authenticate(request.headers.get("authorization"))
            return JSONResponse(handler(await request.body(), self.protocol, self.tokenizer))
        except APIError as err:
            return _error_response(err)

    def health(self) -> dict[str, str]:
        """``GET /health``: the ingress is up (replica health is Serve's job)."""
        return {"status": "ok"}

    def router_stats(self) -> dict[str, Any]:
        """``GET /v1/router/stats``: this ingress's routing counters and recent decision times (ms)."""
        from router.routing_stats import STATS

        return {**STATS.summary(), "journal": self.journal.stats()}

    def metrics_text(self, authorization: str | None = None) -> Response:
        """``GET /metrics`` in Prometheus text format (a key is needed when ``protect_metrics``)."""
        if self.access.protect_metrics:
            try:
                self.access.authenticate(authorization)
            except APIError as err:
                return _error_response(err)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def Generate(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: N802, ANN401
        """gRPC ``flowprefill.v1.FlowPrefill/Generate`` (server streaming), same validation as HTTP."""
        from router.grpc_service import generate_stream

        def authenticate() -> object:
            metadata = dict(grpc_context.invocation_metadata() or ()) if self.access.enabled else {}
            return self.access.authenticate(metadata.get("authorization"))

        async for chunk in generate_stream(request, config=self.protocol, tokenizer=self.tokenizer,
                                           send=self._outputs, grpc_context=grpc_context, error_chunk=True,
                                           authenticate=authenticate, authorize=self.access.authorize):
            yield chunk

    def Health(self, request: Any) -> Any:  # noqa: N802, ANN401
        """gRPC ``flowprefill.v1.FlowPrefill/Health``."""
        from router.grpc_service import health_reply

        return health_reply([self.model_name])

    def token_text(self, token_id: int) -> str:
        """One token's text for log probabilities: the id decoded alone, special tokens included."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ------------------------------------------------------------------ request path
    async def _handle(self, request: Request, parse: Any, endpoint: str) -> Response:  # noqa: ANN401
        arrival = WALL_CLOCK()
        try:
            key = self.access.authenticate(request.headers.get("authorization"))
            try:
                length = int(request.headers.get("content-length") or 0)
            except ValueError:
                raise APIError(400, "content-length must be an integer", param="content-length") from None
            if length > self.protocol.max_body_bytes:
                raise APIError.body_too_large(length, self.protocol.max_body_bytes)
            body = await request.body()
            req = parse(body, request.headers, self.protocol, tokenizer=self.tokenizer, now=arrival)
            self.access.authorize(key, req.slo.class_name)
        except APIError as err:
            self.metrics.rejections.labels(str(err.status)).inc()
            self.metrics.requests.labels(endpoint, "rejected").inc()
            return _error_response(err)
        payload = build_payload(req, arrival, self.protocol.prefix_naming)
        if req.stream:
            # The status line waits for the first output, so a refusal (shed, replica queue full, no
            # replica) is an HTTP 429/503 with Retry-After that clients retry on, not a 200 whose
            # stream holds an error. Failures after the first output end the stream with an error event.
            outputs = self._outputs(payload)
            try:
                first = await anext(outputs)
            except APIError as err:
                self.metrics.rejections.labels(str(err.status)).inc()
                self.metrics.requests.labels(endpoint, "failed").inc()
                return _error_response(err)
            except StopAsyncIteration:
                first = None
            except Exception as exc:  # a failure that is not a refusal, before any output
                log.exception("request %s failed before its first output", req.request_id)
                self.metrics.requests.labels(endpoint, "failed").inc()
                return _error_response(APIError(503, f"request failed: {type(exc).__name__}", type="server_error",
                                                headers={"Retry-After": "1"}))
            headers = {"x-flowprefill-request-id": req.request_id}
            parts = first.get("ttft_parts") if first is not None else None
            if isinstance(parts, TTFTParts):
                headers[TTFT_PARTS_HEADER] = parts.to_header()
            return StreamingResponse(self._stream(req, payload, endpoint, first, outputs),
                                     media_type="text/event-stream", headers=headers)
        return await self._collect(req, payload, endpoint)

    async def _journalled(self, payload: ReplicaRequest, marks: dict[str, float]) -> AsyncIterator[dict[str, Any]]:
        """The replica's raw outputs, with the request's journal entry kept (router/journal.py);
        ``marks["dispatched_s"]`` is when the replica handle was first called."""
        record = self.journal.open(payload)

        def on_retry(attempt: int, exc: BaseException) -> None:
            self._on_retry(attempt, exc)
            record.retrying()

        marks["dispatched_s"] = WALL_CLOCK()  # the ingress's part of the TTFT ends here
        try:
            outputs = replica_outputs(self.replicas, payload, on_retry=on_retry) if self.decoders is None else \
                pd_outputs(self.replicas, self.decoders, payload, on_retry=on_retry, on_handover=self._on_handover)
            async for out in outputs:
                record.assigned(out.get("replica_id", ""))
                yield out  # refusals and errors are mapped by _outputs
        finally:  # answered, failed, or the client went away: the entry leaves the journal
            record.close()

    async def _outputs(self, payload: ReplicaRequest) -> AsyncIterator[dict[str, Any]]:
        """The replica's outputs, with TTFT/TPOT metrics; raises APIError for refusals and failures.
        The first output with tokens gets ``ttft_parts`` (:class:`TTFTParts`) where the engine timed it."""
        first_at: float | None = None
        tokens = 0
        marks: dict[str, float] = {}
        async for out in self._journalled(payload, marks):
            if out.get("finish_reason") in ("rejected", "error", "abort"):
                message = out.get("error") or f"request {out['finish_reason']}"
                if out["finish_reason"] == "rejected":  # APIError clamps the hint to 1-60 s
                    raise APIError.shed(message, retry_after_s=out.get("retry_after_s") or 1.0)
                raise APIError(503, message, type="server_error", headers={"Retry-After": "1"})
            if out["token_ids"] and first_at is None:
                first_at = WALL_CLOCK()
                ttft = first_at - payload.arrival_s
                self.metrics.observe_ttft(payload.slo_class, ttft, payload.ttft_slo_s)
                out["ttft_parts"] = _ttft_parts(payload, marks, out, first_at)
            tokens += len(out["token_ids"])
            yield out
        if first_at is not None and tokens > 1:
            self.metrics.tpot.labels(payload.slo_class).observe((WALL_CLOCK() - first_at) / (tokens - 1))

    async def _collect(self, req: GenerateRequest, payload: ReplicaRequest, endpoint: str) -> Response:
        replica, headers = "", {}
        collector = ChoiceCollector(req, self.token_text, echo_text(req, self.tokenizer))
        try:
            async for out in self._outputs(payload):
                replica = out.get("replica_id", replica)
                if out.get("replica_ttft_s") is not None:  # lets clients split TTFT into router and engine
                    headers["x-flowprefill-replica-ttft-ms"] = f"{out['replica_ttft_s'] * 1000:.3f}"
                if isinstance(out.get("ttft_parts"), TTFTParts):
                    headers[TTFT_PARTS_HEADER] = out["ttft_parts"].to_header()
                collector.add(out)
        except APIError as err:
            self.metrics.rejections.labels(str(err.status)).inc()
            self.metrics.requests.labels(endpoint, "failed").inc()
            return _error_response(err)
        self.metrics.requests.labels(endpoint, "ok").inc()
        body = collector.body(payload.prompt_tokens)
        return JSONResponse(body, headers={"x-flowprefill-replica": replica, **headers})

    async def _stream(self, req: GenerateRequest, payload: ReplicaRequest, endpoint: str,
                      first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
        enc = StreamEncoder(req, self.token_text, echo_text(req, self.tokenizer))
        opening = enc.start()
        if opening:
            yield opening
        completion: dict[int, int] = {}  # generated tokens per choice
        parts = first.get("ttft_parts") if first is not None else None
        ttft_parts = parts.to_dict() if isinstance(parts, TTFTParts) else None

        async def outputs() -> AsyncIterator[dict[str, Any]]:
            if first is not None:
                yield first
            async for out in rest:
                yield out

        try:
            async for out in outputs():
                index = out.get("index") or 0
                completion[index] = out["completion_tokens"] or completion.get(index, 0)
                enc.set_prompt_logprobs(out.get("prompt_logprobs"))
                if out["finish_reason"] is not None:
                    last = ends_request(out)
                    yield enc.finish(out["finish_reason"], payload.prompt_tokens, sum(completion.values()),
                                     out["text"], out.get("logprobs"), ttft_parts=ttft_parts if last else None,
                                     index=index, last=last)
                    if last:
                        self.metrics.requests.labels(endpoint, "ok").inc()
                        return
                    continue
                chunk = enc.delta(out["text"], out.get("logprobs"), index=index)
                if chunk:
                    yield chunk
        except APIError as err:
            self.metrics.requests.labels(endpoint, "failed").inc()
            yield enc.error(err)
        except Exception as exc:  # a replica died mid-stream: end the stream with a clear error event
            log.exception("stream %s failed", req.request_id)
            self.metrics.requests.labels(endpoint, "failed").inc()
            yield enc.error(APIError(503, f"replica failed while streaming: {type(exc).__name__}",
                                     type="server_error"))
        finally:  # finished, failed or the client went away: the replica call and journal entry end now
            await rest.aclose()


def _ttft_parts(payload: ReplicaRequest, marks: dict[str, float], out: dict[str, Any],
                received_s: float) -> TTFTParts | None:
    """The TTFT decomposition of a request whose first output ``out`` reached the ingress at
    ``received_s``; None when the engine did not time it (or its timing is malformed)."""
    engine = engine_ttft_of(out.get("ttft_timing"))
    if engine is None or "dispatched_s" not in marks:
        return None
    try:
        return TTFTParts.assemble(payload.arrival_s, marks["dispatched_s"], engine, received_s)
    except ValueError:  # a non-finite value: diagnostics must not fail the request
        return None


def build_ingress_class() -> type:
    """The Serve ingress class with the FastAPI routes bound (import-time Ray not required)."""
    from ray import serve

    @serve.ingress(app)
    class FlowPrefillRouter(RouterIngress):
        @app.post("/v1/completions")
        async def _completions(self, request: Request) -> Response:
            return await self.completions(request)

        @app.post("/v1/chat/completions")
        async def _chat(self, request: Request) -> Response:
            return await self.chat_completions(request)

        @app.post("/tokenize")
        async def _tokenize(self, request: Request) -> Response:
            return await self.tokenize(request)

        @app.post("/detokenize")
        async def _detokenize(self, request: Request) -> Response:
            return await self.detokenize(request)

        @app.get("/v1/models")
        def _models(self) -> dict[str, Any]:
            return self.models()

        @app.get("/health")
        def _health(self) -> dict[str, str]:
            return self.health()

        @app.get("/v1/router/stats")
        def _router_stats(self) -> dict[str, Any]:
            return self.router_stats()

        @app.get("/metrics")
        def _metrics(self, request: Request) -> Response:
            return self.metrics_text(request.headers.get("authorization"))

    return FlowPrefillRouter
