"""The ingress returns each request's TTFT decomposition: a header on every answer and, in a stream,
the ``flowprefill.ttft_parts`` field of the ``finish_reason`` chunk (no Ray: a fake replica handle)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import pytest
from starlette.requests import Request

from replicas.engine_types import RequestOutput
from replicas.ttft_parts import PARTS, TTFT_PARTS_HEADER, EngineTTFT, TTFTParts, parse_ttft_parts
from router.auth import AccessPolicy
from router.ingress import RouterIngress
from router.journal import RequestJournal
from router.metrics import RouterMetrics
from router.protocol import ProtocolConfig
from tests.test_protocol import FakeTokenizer

ENGINE_S = 0.02  # the fake engine's time from acceptance to first token
PARTS_S = {"queue_s": 0.004, "prefill_s": 0.01, "suspended_s": 0.003, "decode_interleave_s": 0.002}


class FakeStream:
    """What ``handle.options(stream=True).generate.remote(payload)`` returns: the replica's outputs."""

    def __init__(self, payload: Any, timed: bool, seen: list[EngineTTFT]) -> None:  # noqa: ANN401
        self.payload, self.timed, self.seen = payload, timed, seen

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[dict[str, Any]]:
        accepted = time.time()
        await asyncio.sleep(ENGINE_S)
        first = time.time()
        timing = EngineTTFT(accepted, first, **PARTS_S) if self.timed else None
        if timing is not None:
            self.seen.append(timing)
        rid, n = self.payload.request_id, self.payload.prompt_tokens
        yield {**asdict(RequestOutput(rid, (5,), "a", None, n, 1, ttft_s=0.03, ttft_timing=timing)), "replica_id": "r1"}
        yield {**asdict(RequestOutput(rid, (6,), "b", "length", n, 2)), "replica_id": "r1"}

    def cancel(self) -> None:
        pass


class FakeHandle:
    def __init__(self, timed: bool = True) -> None:
        self.timed = timed
        self.timings: list[EngineTTFT] = []  # what the fake engine measured, per request

    def options(self, **_: Any) -> FakeHandle:  # noqa: ANN401
        return self

    @property
    def generate(self) -> FakeHandle:
        return self

    def remote(self, payload: Any) -> FakeStream:  # noqa: ANN401
        return FakeStream(payload, self.timed, self.timings)


def _ingress(timed: bool = True) -> RouterIngress:
    ingress = object.__new__(RouterIngress)  # without __init__: it asks the replicas over Ray
    ingress.replicas = FakeHandle(timed)
    ingress.model_name = "tiny"
    ingress.tokenizer = FakeTokenizer()
    ingress.protocol = ProtocolConfig(("tiny",), max_model_len=64, vocab_size=100)
    ingress.metrics = RouterMetrics()
    ingress.journal = RequestJournal.from_url(None, "test")
    ingress.access = AccessPolicy.from_sources(env={})
    return ingress


def _request(body: dict[str, Any], path: str) -> Request:
    raw = json.dumps(body).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    return Request(scope, receive)


async def _call(ingress: RouterIngress, body: dict[str, Any], chat: bool = False) -> tuple[Any, bytes, float]:
    """The response, its body, and the seconds until the response (for a stream: the client's TTFT,
    as its status line waits for the first output)."""
    started = time.time()
    if chat:
        resp = await ingress.chat_completions(_request(body, "/v1/chat/completions"))
    else:
        resp = await ingress.completions(_request(body, "/v1/completions"))
    elapsed = time.time() - started
    if hasattr(resp, "body_iterator"):
        content = b"".join([chunk async for chunk in resp.body_iterator])
    else:
        content = resp.body
    return resp, content, elapsed


def _check_parts(parts: TTFTParts | None, elapsed_s: float) -> None:
    assert parts is not None
    for name, value in PARTS_S.items():
        assert getattr(parts, name) == pytest.approx(value)
    assert parts.ingress_s >= 0 and parts.handle_s >= 0 and parts.return_s >= 0
    # the parts cover the ingress's TTFT but the engine's unattributed 1 ms (20 ms less the parts' 19)
    assert sum(PARTS_S.values()) <= parts.total_s <= elapsed_s


def _events(content: bytes) -> list[Any]:
    return [json.loads(line[6:]) for line in content.decode().split("\n\n")
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_a_non_streaming_answer_carries_the_parts_header():
    resp, content, elapsed = asyncio.run(_call(_ingress(), {"model": "tiny", "prompt": "hello", "max_tokens": 2}))
    assert resp.status_code == 200
    assert json.loads(content)["choices"][0]["text"] == "ab"
    _check_parts(parse_ttft_parts(resp.headers[TTFT_PARTS_HEADER]), elapsed)
    assert list(json.loads(resp.headers[TTFT_PARTS_HEADER])) == list(PARTS)


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_carries_the_header_and_the_parts_in_its_finish_chunk(chat):
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 2, "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hello"})
    ingress = _ingress()
    resp, content, ttft = asyncio.run(_call(ingress, body, chat=chat))
    assert resp.status_code == 200 and content.endswith(b"data: [DONE]\n\n")
    header = parse_ttft_parts(resp.headers[TTFT_PARTS_HEADER])
    _check_parts(header, ttft)
    # the parts add up to this client's TTFT but for what the fake engine left out of its parts
    # (its oversleep and 1 ms) and the ingress's own steps after the first output: at most 5 ms
    (engine,) = ingress.replicas.timings
    assert -1e-5 <= ttft - header.total_s - (engine.engine_ttft_s - engine.parts_s) <= 0.005  # -: rounding to us
    events = _events(content)
    finish = [e for e in events if e.get("choices") and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1
    assert parse_ttft_parts(finish[0]["flowprefill"]["ttft_parts"]) == header
    assert all("flowprefill" not in e for e in events if e is not finish[0])
    # an OpenAI client parses the chunk and keeps the extra field
    from openai.types import Completion
    from openai.types.chat import ChatCompletionChunk

    model = (ChatCompletionChunk if chat else Completion).model_validate(finish[0])
    assert model.choices[0].finish_reason == "length"
    assert (model.model_extra or {})["flowprefill"]["ttft_parts"] == finish[0]["flowprefill"]["ttft_parts"]


def test_no_parts_when_the_engine_does_not_time_the_request():
    ingress = _ingress(timed=False)
    resp, _, _ = asyncio.run(_call(ingress, {"model": "tiny", "prompt": "hello", "max_tokens": 2}))
    assert resp.status_code == 200 and TTFT_PARTS_HEADER not in resp.headers
    resp, content, _ = asyncio.run(_call(ingress, {"model": "tiny", "prompt": "hello", "max_tokens": 2,
                                                   "stream": True}))
    assert TTFT_PARTS_HEADER not in resp.headers
    assert all("flowprefill" not in e for e in _events(content))
