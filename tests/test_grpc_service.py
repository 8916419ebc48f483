"""gRPC API pieces (no Ray): stub generation, proto conversion, HTTP validation parity, streaming."""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicas.replica_request import ReplicaRequest
from router.api_errors import APIError
from router.grpc_build import (
    PROTO_PATH,
    STAMP_NAME,
    StubGenerationError,
    add_servicer_to_server,
    ensure_stubs,
    stubs_current,
)
from router.grpc_gen import flowprefill_pb2 as pb
from router.grpc_gen import flowprefill_pb2_grpc as pb_grpc
from router.grpc_service import (
    api_error_to_grpc_status,
    generate_stream,
    grpc_request_body,
    health_reply,
    output_to_chunk,
    parse_grpc_request,
)
from router.payload import build_payload
from router.protocol import ProtocolConfig, parse_chat_request, parse_completion_request

MODEL = "tiny"
CONFIG = ProtocolConfig((MODEL,), max_model_len=64, vocab_size=100)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CLEAN_ERRORS = {INVALID, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


class FakeTokenizer:
    """One token per character, BOS (1) with special tokens; chat renders ``<role>content``."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([1] if add_special_tokens else []) + [2 + ord(c) % 90 for c in text]

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages))


TOKENIZER = FakeTokenizer()


class FakeContext:
    """The part of a gRPC servicer context that ``generate_stream`` uses."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def out(text: str, ids: list[int], n: int, reason: str | None = None, error: str | None = None) -> dict[str, Any]:
    return {"request_id": "r", "token_ids": ids, "text": text, "finish_reason": reason, "prompt_tokens": 0,
            "completion_tokens": n, "ttft_s": None, "error": error, "replica_id": "replica-0"}


def fake_replica_stream(outputs: list[dict[str, Any] | Exception], seen: list[Any] | None = None) -> Any:
    """A ``send`` returning a fake replica output stream; records payloads and whether it was closed."""
    seen = [] if seen is None else seen

    def send(payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        seen.append(payload)

        async def stream() -> AsyncIterator[dict[str, Any]]:
            try:
                for item in outputs:
                    if isinstance(item, Exception):
                        raise item
                    yield item
                    await asyncio.sleep(0)
            finally:
                seen.append("closed")
        return stream()
    return send


HELLO = [out("He", [10], 1), out("llo", [11], 2), out("!", [12], 3, "stop")]


def run_stream(msg: pb.GenerateRequest, outputs: list[Any] = HELLO, *, grpc_context: Any = None,
               **kw: Any) -> tuple[list[Any], FakeContext]:
    ctx = FakeContext() if grpc_context is None else grpc_context

    async def main() -> list[Any]:
        gen = generate_stream(msg, config=CONFIG, tokenizer=TOKENIZER, send=fake_replica_stream(outputs),
                              grpc_context=ctx, **kw)
        return [c async for c in gen]
    return asyncio.run(main()), ctx


# ------------------------------------------------------------------------------------------ stubs
def test_stubs_generate_once_import_and_regenerate_on_change(tmp_path: Path) -> None:
    out_dir = tmp_path / "fpgen_copy"
    ensure_stubs(PROTO_PATH, out_dir)
    assert stubs_current(PROTO_PATH, out_dir)
    grpc_module = out_dir / "flowprefill_pb2_grpc.py"
    assert "from . import flowprefill_pb2 as" in grpc_module.read_text()
    before = grpc_module.stat().st_mtime_ns
    ensure_stubs(PROTO_PATH, out_dir)  # up to date: nothing rewritten
    assert grpc_module.stat().st_mtime_ns == before
    # A fresh interpreter: this one's descriptor pool already holds flowprefill.v1 from router.grpc_gen.
    check = ("import fpgen_copy.flowprefill_pb2_grpc as g, fpgen_copy.flowprefill_pb2 as pb; "
             "assert g.FlowPrefillStub and g.add_FlowPrefillServicer_to_server; "
             "assert pb.GenerateRequest.__module__ == 'fpgen_copy.flowprefill_pb2'")
    subprocess.run([sys.executable, "-c", check], cwd=tmp_path, check=True, timeout=60)
    changed = tmp_path / "flowprefill.proto"
    changed.write_text(PROTO_PATH.read_text() + "\n// a comment changes the hash\n")
    assert not stubs_current(changed, out_dir)
    stamp = (out_dir / STAMP_NAME).read_text()
    ensure_stubs(changed, out_dir)
    assert stubs_current(changed, out_dir) and (out_dir / STAMP_NAME).read_text() != stamp
    changed.write_text("syntax = \"proto3\"; message {")
    with pytest.raises(StubGenerationError, match="protoc failed"):
        ensure_stubs(changed, out_dir)


def test_repository_stubs_are_current_and_importable() -> None:
    assert stubs_current()
    assert pb.DESCRIPTOR.package == "flowprefill.v1"
    service = pb.DESCRIPTOR.services_by_name["FlowPrefill"]
    generate = service.methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    assert not service.methods_by_name["Health"].server_streaming
    # Serve's proxy pickles the request message for the ingress replica: it needs a qualified __module__.
    msg = pb.GenerateRequest(model=MODEL, prompt="hi", max_tokens=2)
    assert type(msg).__module__ == "router.grpc_gen.flowprefill_pb2"
    assert pickle.loads(pickle.dumps(msg)) == msg


def test_proto_round_trip() -> None:
    msg = pb.GenerateRequest(
        model=MODEL, messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
        max_tokens=5, temperature=0.0, top_p=0.5, top_k=3, seed=7, stop=["\n"], slo_class="interactive",
        ttft_slo_ms=250.0, tpot_slo_ms=50.0, priority=-1, request_id="abc")
    back = pb.GenerateRequest.FromString(msg.SerializeToString())
    assert back == msg and back.WhichOneof("input") == "messages"
    assert back.HasField("temperature") and back.temperature == 0.0  # explicit zero survives
    assert not pb.GenerateRequest(model=MODEL, prompt="x").HasField("max_tokens")
    chunk = output_to_chunk(out("ok", [5, 6], 2, "length"), (4, 2), request_id="abc")
    back_chunk = pb.GenerateChunk.FromString(chunk.SerializeToString())
    assert back_chunk == chunk and back_chunk.HasField("usage") and back_chunk.usage.prompt_tokens == 4
    assert not output_to_chunk(out("x", [1], 1), None).HasField("usage")
    assert health_reply([MODEL]) == pb.HealthReply(status="SERVING", models=[MODEL])


# ------------------------------------------------------------------------------------------ validation parity
def test_valid_request_matches_http_parse() -> None:
    msg = pb.GenerateRequest(model=MODEL, prompt="hello", max_tokens=4, temperature=0.5, seed=3, stop=["x"],
                             slo_class="batch", ttft_slo_ms=2500.0, priority=5, request_id="req-1")
    endpoint, body, headers = grpc_request_body(msg)
    assert endpoint == "completions" and headers == {"x-slo-ttft-ms": "2500.0"}
    grpc_req = parse_grpc_request(msg, CONFIG, TOKENIZER, now=100.0)
    http_body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0.5, "seed": 3, "stop": ["x"],
                 "slo_class": "batch", "priority": 5}
    http_req = parse_completion_request(json.dumps(http_body).encode(), {"x-slo-ttft-ms": "2500"}, CONFIG,
                                        tokenizer=TOKENIZER, request_id="req-1", now=100.0)
    assert grpc_req == http_req
    assert grpc_req.slo.ttft_slo_s == 2.5 and grpc_req.slo.priority == 5 and grpc_req.slo.class_name == "batch"
    chat = pb.GenerateRequest(model=MODEL, messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user",
                                                                                                content="hi")]))
    chat_req = parse_grpc_request(chat, CONFIG, TOKENIZER, now=1.0)
    http_chat = parse_chat_request(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
                                   .encode(), {}, CONFIG, tokenizer=TOKENIZER, request_id=chat_req.request_id, now=1.0)
    assert chat_req == http_chat and chat_req.request_id.startswith("chatcmpl-")


def test_build_payload_carries_the_slo_and_sampling_the_replica_needs() -> None:
    req = parse_grpc_request(pb.GenerateRequest(model=MODEL, prompt="hey", top_k=2, tpot_slo_ms=30.0), CONFIG,
                             TOKENIZER)
    payload = build_payload(req, 12.5)  # the HTTP ingress sends exactly this to the replicas
    assert payload.deadline == 12.5 + req.slo.ttft_slo_s and payload.tpot_slo_s == 0.03
    assert payload.prompt_token_ids == tuple(req.prompt_token_ids) and payload.prompt_tokens == len(
        req.prompt_token_ids)
    assert payload.sampling == req.sampling and payload.sampling.top_k == 2
    assert ReplicaRequest.from_dict(payload.to_dict()) == payload  # its wire form parses back to the same record


MSG = [pb.ChatMessage(role="user", content="hi")]
# (proto fields, equivalent HTTP body fields, HTTP headers, expected gRPC code, field the details must name)
BAD_INPUTS = [
    ({"prompt": ""}, {"prompt": ""}, {}, INVALID, "prompt"),
    ({"prompt": "hi", "max_tokens": -1}, {"prompt": "hi", "max_tokens": -1}, {}, INVALID, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, {"prompt": "hi", "max_tokens": 0}, {}, INVALID, "max_tokens"),
    ({"prompt": "hi", "model": "nope"}, {"prompt": "hi", "model": "nope"}, {}, grpc.StatusCode.NOT_FOUND, "model"),
    ({"prompt": "hi", "slo_class": "gold"}, {"prompt": "hi", "slo_class": "gold"}, {}, INVALID, "slo_class"),
    ({"prompt": "hi", "ttft_slo_ms": -5.0}, {"prompt": "hi"}, {"x-slo-ttft-ms": "-5.0"}, INVALID, "ttft_slo_ms"),
    ({"prompt": "hi", "ttft_slo_ms": 0.0}, {"prompt": "hi"}, {"x-slo-ttft-ms": "0.0"}, INVALID, "ttft_slo_ms"),
    ({"prompt": "hi", "ttft_slo_ms": float("nan")}, {"prompt": "hi"}, {"x-slo-ttft-ms": "nan"}, INVALID,
     "ttft_slo_ms"),
    ({"prompt": "hi", "tpot_slo_ms": float("inf")}, {"prompt": "hi"}, {"x-slo-tpot-ms": "inf"}, INVALID,
     "tpot_slo_ms"),
    ({"prompt": "hi", "temperature": 2.5}, {"prompt": "hi", "temperature": 2.5}, {}, INVALID, "temperature"),
    ({"prompt": "hi", "temperature": -0.1}, {"prompt": "hi", "temperature": -0.1}, {}, INVALID, "temperature"),
    ({"prompt": "hi", "top_p": 0.0}, {"prompt": "hi", "top_p": 0.0}, {}, INVALID, "top_p"),
    ({"prompt": "hi", "seed": -1}, {"prompt": "hi", "seed": -1}, {}, INVALID, "seed"),
    ({"prompt": "hi", "stop": [""]}, {"prompt": "hi", "stop": [""]}, {}, INVALID, "stop"),
    ({"prompt": "x" * 70}, {"prompt": "x" * 70}, {}, INVALID, "prompt"),  # over max_model_len
    ({"messages": pb.ChatMessages()}, {"messages": []}, {}, INVALID, "messages"),
    ({"messages": pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])},
     {"messages": [{"role": "robot", "content": "x"}]}, {}, INVALID, "messages[0].role"),
    ({"messages": pb.ChatMessages(messages=MSG), "max_tokens": 1000},
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}, {}, INVALID, "max_tokens"),
]


@pytest.mark.parametrize(("fields", "http_fields", "http_headers", "code", "field"), BAD_INPUTS)
def test_bad_input_same_status_as_http_and_details_name_field(
    fields: dict[str, Any], http_fields: dict[str, Any], http_headers: dict[str, str], code: grpc.StatusCode,
    field: str,
) -> None:
    msg = pb.GenerateRequest(**{"model": MODEL, **fields})
    chunks, ctx = run_stream(msg)
    assert chunks == [] and ctx.code == code and ctx.details.startswith(field)
    with pytest.raises(APIError) as grpc_err:
        parse_grpc_request(msg, CONFIG, TOKENIZER)
    body = {"model": MODEL, **http_fields}
    parse = parse_chat_request if "messages" in body else parse_completion_request
    with pytest.raises(APIError) as http_err:
        parse(json.dumps(body).encode(), http_headers, CONFIG, tokenizer=TOKENIZER)
    assert grpc_err.value.status == http_err.value.status
    assert grpc_err.value.param == {"x-slo-ttft-ms": "ttft_slo_ms", "x-slo-tpot-ms": "tpot_slo_ms"}.get(
        http_err.value.param or "", http_err.value.param)


def test_grpc_only_checks_name_their_field() -> None:
    for msg, field in [
        (pb.GenerateRequest(model=MODEL), "prompt"),
        (pb.GenerateRequest(model=MODEL, prompt="hi", request_id="has space"), "request_id"),
        (pb.GenerateRequest(model=MODEL, prompt="hi", top_p=float("nan")), "top_p"),
    ]:
        chunks, ctx = run_stream(msg)
        assert chunks == [] and ctx.code == INVALID and ctx.details.startswith(field), (msg, ctx.details)
    big = ProtocolConfig((MODEL,), max_body_bytes=64)
    with pytest.raises(APIError) as err:
        parse_grpc_request(pb.GenerateRequest(model=MODEL, prompt="y" * 100), big)
    assert err.value.param == "request" and api_error_to_grpc_status(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_status_mapping() -> None:
    expected = {400: INVALID, 422: INVALID, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
                500: grpc.StatusCode.INTERNAL, 418: grpc.StatusCode.INTERNAL}
    for status, code in expected.items():
        assert api_error_to_grpc_status(APIError(status, "m")) == code


optional_int64 = st.none() | st.integers(-(2**63), 2**63 - 1)
optional_double = st.none() | st.floats() | st.sampled_from([0.0, 0.5, 1.0, 300.0])
chat_messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "x", ""]),
                                   content=st.text(max_size=20)), max_size=3)


@st.composite
def grpc_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    fields: dict[str, Any] = {
        "model": draw(st.sampled_from([MODEL, "", "other"])),
        "stop": draw(st.lists(st.text(max_size=3), max_size=3)),
        "slo_class": draw(st.sampled_from(["", "interactive", "batch", "nope"])),
        "request_id": draw(st.sampled_from(["", "id-1"]) | st.text(max_size=5)),
    }
    kind = draw(st.sampled_from(["prompt", "messages", None]))
    if kind == "prompt":
        fields["prompt"] = draw(st.text(max_size=40))
    elif kind == "messages":
        fields["messages"] = pb.ChatMessages(messages=draw(chat_messages))
    for name, strategy in [("max_tokens", optional_int64), ("top_k", optional_int64), ("seed", optional_int64),
                           ("priority", st.none() | st.integers(-(2**31), 2**31 - 1)),
                           ("temperature", optional_double), ("top_p", optional_double),
                           ("ttft_slo_ms", optional_double), ("tpot_slo_ms", optional_double)]:
        value = draw(strategy)
        if value is not None:
            fields[name] = value
    return pb.GenerateRequest(**fields)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grpc_requests())
def test_random_messages_end_in_chunks_or_a_clean_status(msg: pb.GenerateRequest) -> None:
    chunks, ctx = run_stream(msg)
    if ctx.code is None:
        assert chunks[-1].finish_reason == "stop" and chunks[-1].HasField("usage")
    else:
        assert chunks == [] and ctx.code in CLEAN_ERRORS and ctx.details


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=60))
def test_random_wire_bytes_never_crash_validation(data: bytes) -> None:
    try:
        msg = pb.GenerateRequest.FromString(data)
    except Exception:  # undecodable bytes are grpc's to reject before any servicer runs
        return
    chunks, ctx = run_stream(msg)
    assert (ctx.code is None and chunks) or (ctx.code in CLEAN_ERRORS and not chunks)


# ------------------------------------------------------------------------------------------ streaming
def test_generate_stream_with_fake_replica_stream_yields_text_then_usage() -> None:
    seen: list[Any] = []
    ctx = FakeContext()
    msg = pb.GenerateRequest(model=MODEL, prompt="hi", max_tokens=3, request_id="r-1")

    async def main() -> list[pb.GenerateChunk]:
        gen = generate_stream(msg, config=CONFIG, tokenizer=TOKENIZER, send=fake_replica_stream(HELLO, seen),
                              grpc_context=ctx)
        return [c async for c in gen]
    chunks = asyncio.run(main())
    assert ctx.code is None
    assert [c.text for c in chunks] == ["He", "llo", "!"] and [list(c.token_ids) for c in chunks] == [[10], [11], [12]]
    assert [c.finish_reason for c in chunks] == ["", "", "stop"]
    assert not any(c.HasField("usage") for c in chunks[:-1])
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 3)  # BOS + "hi"
    assert {c.request_id for c in chunks} == {"r-1"} and chunks[0].replica_id == "replica-0"
    payload = seen[0]
    assert payload.request_id == "r-1" and list(payload.prompt_token_ids) == TOKENIZER.encode("hi", True)
    assert payload.sampling.max_tokens == 3 and payload.slo_class == "standard"


@pytest.mark.parametrize(("outputs", "code", "text"), [
    ([out("", [], 0, "rejected", "shed: SLO cannot be met")], grpc.StatusCode.RESOURCE_EXHAUSTED, "shed"),
    ([out("a", [3], 1), out("", [], 1, "error", "engine failed")], grpc.StatusCode.UNAVAILABLE, "engine failed"),
    ([out("a", [3], 1), APIError.overloaded("no replica")], grpc.StatusCode.UNAVAILABLE, "no replica"),
    ([out("a", [3], 1), RuntimeError("actor died")], grpc.StatusCode.UNAVAILABLE, "RuntimeError"),
    ([out("a", [3], 1)], grpc.StatusCode.UNAVAILABLE, "without a finish reason"),
])
def test_generate_stream_with_fake_replica_stream_failures_set_status(
    outputs: list[Any], code: grpc.StatusCode, text: str
) -> None:
    chunks, ctx = run_stream(pb.GenerateRequest(model=MODEL, prompt="hi"), outputs)
    assert ctx.code == code and text in ctx.details
    assert all(c.text == "a" for c in chunks)  # only the deltas produced before the failure
    chunks, ctx = run_stream(pb.GenerateRequest(model=MODEL, prompt="hi"), outputs, error_chunk=True)
    assert chunks[-1].finish_reason == "error" and text in chunks[-1].error and ctx.code == code


def test_generate_stream_closing_early_cancels_the_fake_replica_stream() -> None:
    seen: list[Any] = []

    async def main() -> None:
        gen = generate_stream(pb.GenerateRequest(model=MODEL, prompt="hi"), config=CONFIG, tokenizer=TOKENIZER,
                              send=fake_replica_stream(HELLO, seen), grpc_context=FakeContext())
        assert (await gen.__anext__()).text == "He"
        await gen.aclose()  # the client went away
    asyncio.run(main())
    assert seen[-1] == "closed"


# ------------------------------------------------------------------------------------------ real gRPC server
class TinyServicer(pb_grpc.FlowPrefillServicer):
    """Delegates to the service functions, as the Serve ingress will (``error_chunk`` as under Serve)."""

    def __init__(self, error_chunk: bool = False) -> None:
        self.error_chunk = error_chunk

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateChunk]:
        async for chunk in generate_stream(request, config=CONFIG, tokenizer=TOKENIZER,
                                           send=fake_replica_stream(HELLO), grpc_context=context,
                                           error_chunk=self.error_chunk):
            yield chunk

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthReply:
        return health_reply([MODEL])


async def _call_server(error_chunk: bool) -> dict[str, Any]:
    server = grpc.aio.server()
    add_servicer_to_server(TinyServicer(error_chunk), server)  # the grpc_servicer_functions entry
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    result: dict[str, Any] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FlowPrefillStub(channel)
            result["health"] = await stub.Health(pb.HealthRequest(), timeout=10)
            result["chunks"] = [c async for c in stub.Generate(pb.GenerateRequest(model=MODEL, prompt="hi"),
                                                                 timeout=10)]
            bad: list[pb.GenerateChunk] = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for c in stub.Generate(pb.GenerateRequest(model=MODEL, prompt="hi", temperature=9.0),
                                             timeout=10):
                    bad.append(c)
            result["bad"], result["error"] = bad, err.value
    finally:
        await server.stop(None)
    return result


@pytest.mark.parametrize("error_chunk", [False, True])
def test_real_grpc_server_streams_tokens_and_rejects_bad_input(error_chunk: bool) -> None:
    result = asyncio.run(_call_server(error_chunk))
    assert result["health"].status == "SERVING" and list(result["health"].models) == [MODEL]
    chunks = result["chunks"]
    assert "".join(c.text for c in chunks) == "Hello!" and chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 3
    err = result["error"]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("temperature")
    assert len(result["bad"]) == (1 if error_chunk else 0)


# ------------------------------------------------------------------------------------------ Ray Serve's context
class ProxySideContext:
    """The proxy's real grpc context, as far as ``RayServegRPCContext`` reads and writes it."""

    def __init__(self) -> None:
        self.set: dict[str, Any] = {}

    def auth_context(self) -> dict[str, Any]:
        return {}

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("request_id", "abc")]

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5"

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def trailing_metadata(self) -> list[tuple[str, str]]:
        return []

    def set_code(self, code: grpc.StatusCode) -> None:
        self.set["code"] = code

    def set_details(self, details: str) -> None:
        self.set["details"] = details

    def set_trailing_metadata(self, metadata: list[tuple[str, str]]) -> None:
        self.set["trailing"] = metadata


@pytest.mark.parametrize("error_chunk", [False, True])
def test_serve_context_reaches_the_proxy_only_with_a_chunk(error_chunk: bool) -> None:
    """Serve's proxy copies the replica's context onto the real one per yielded message (no Ray started)."""
    from ray.serve.grpc_util import RayServegRPCContext

    proxy = ProxySideContext()
    ctx = pickle.loads(pickle.dumps(RayServegRPCContext(proxy)))  # the replica gets a copy
    chunks, _ = run_stream(pb.GenerateRequest(model=MODEL, prompt=""), grpc_context=ctx, error_chunk=error_chunk)
    assert ctx.code() == INVALID and ctx.details().startswith("prompt")
    for _chunk in chunks:  # what the proxy does with each (context, message) pair
        ctx._set_on_grpc_context(proxy)
    assert proxy.set.get("code") == (INVALID if error_chunk else None)
