"""The pydantic response models (router/response_models.py) behind router/responses.py: the exact JSON
bytes of chunks and bodies (key order, nulls, non-ASCII text, json.dumps' floats), a bad finish_reason
as a ValueError, and the official ``openai`` client's types reading what they produce."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from router.choices import ChoiceCollector
from router.response_models import ChatCompletionChunk as ChunkModel
from router.response_models import (
    ChatDelta,
    ChatStreamChoice,
    CompletionChunk,
    CompletionStreamChoice,
    Usage,
)
from router.responses import (
    StreamEncoder,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    response_body,
    sse_event,
)
from tests.test_protocol import base_chat, base_completion, chat, completion, parse_sse
from tests.test_tool_calls import CALL_A, TOOLS

NOW = 1700000000.5
HEAD = '"object":"chat.completion.chunk","created":1700000000,"model":"tiny"'


def _compact(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def test_chat_stream_bytes_are_exactly_the_openai_chunks():
    req = chat(base_chat(stream=True, stream_options={"include_usage": True}), request_id="chatcmpl-t1", now=NOW)
    enc = StreamEncoder(req)
    parts = {"queue_s": 0.25, "prefill_s": 1e-05}
    raw = enc.start() + enc.delta("héllo ☃") + enc.finish("stop", 3, 2, ttft_parts=parts)
    expected = (
        'data: {"id":"chatcmpl-t1",' + HEAD + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        '"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
        'data: {"id":"chatcmpl-t1",' + HEAD + ',"choices":[{"index":0,"delta":{"content":"héllo ☃"},'
        '"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
        'data: {"id":"chatcmpl-t1",' + HEAD + ',"choices":[{"index":0,"delta":{},"logprobs":null,'
        '"finish_reason":"stop"}],"flowprefill":{"ttft_parts":{"queue_s":0.25,"prefill_s":1e-05}},"usage":null}\n\n'
        'data: {"id":"chatcmpl-t1",' + HEAD + ',"choices":[],'
        '"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
        "data: [DONE]\n\n"
    )
    assert raw.decode("utf-8") == expected
    for event in parse_sse(raw)[:-1]:
        ChatCompletionChunk.model_validate(event)


def test_chunks_without_include_usage_have_no_usage_key():
    req = chat(base_chat(stream=True), request_id="chatcmpl-t3", now=NOW)
    enc = StreamEncoder(req)
    events = parse_sse(enc.start() + enc.delta("a") + enc.finish("length", 1, 1))
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    assert [list(e["choices"][0]["delta"]) for e in events[:-1]] == [["role", "content"], ["content"], []]


def test_completion_body_bytes_keep_key_order_and_json_dumps_floats():
    req = completion(base_completion(), request_id="cmpl-t2", now=NOW)
    body = completion_body(req, "out ☃", "length", 5, 16, {"tokens": ["o"], "token_logprobs": [-1e-05]})
    assert _compact(body) == (
        '{"id":"cmpl-t2","object":"text_completion","created":1700000000,"model":"tiny","choices":[{"index":0,'
        '"text":"out ☃","logprobs":{"tokens":["o"],"token_logprobs":[-1e-05]},"finish_reason":"length"}],'
        '"usage":{"prompt_tokens":5,"completion_tokens":16,"total_tokens":21}}'
    )
    Completion.model_validate(body)


def test_chat_body_with_tool_calls_reads_as_the_openai_type():
    req = chat(base_chat(tools=TOOLS), request_id="chatcmpl-t4", now=NOW)
    body = response_body(req, f"ok\n{CALL_A}", "stop", 3, 9)
    message = body["choices"][0]["message"]
    assert list(message) == ["role", "content", "tool_calls"] and body["choices"][0]["finish_reason"] == "tool_calls"
    assert list(message["tool_calls"][0]) == ["id", "type", "function"]
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.tool_calls[0].function.name == "get_weather"
    plain = chat_body(req, "hi", "stop", 1, 1)
    assert _compact(plain["choices"][0]) == (
        '{"index":0,"message":{"role":"assistant","content":"hi"},"logprobs":null,"finish_reason":"stop"}')
    assert list(plain) == ["id", "object", "created", "model", "choices", "usage"]
    ChatCompletion.model_validate(plain)


def test_tool_call_delta_chunk_reads_as_the_openai_type():
    req = chat(base_chat(tools=TOOLS, stream=True), request_id="chatcmpl-t5", now=NOW)
    enc = StreamEncoder(req)
    events = parse_sse(enc.start() + enc.delta(CALL_A) + enc.finish("stop", 3, 9))
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    call = chunks[1].choices[0].delta.tool_calls[0]
    assert call.index == 0 and call.function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert list(events[1]["choices"][0]["delta"]) == ["tool_calls"]


@pytest.mark.parametrize("build", [
    lambda: completion_body(completion(base_completion()), "x", "abort", 1, 1),  # type: ignore[arg-type]
    lambda: chat_body(chat(base_chat()), "x", "eos", 1, 1),  # type: ignore[arg-type]
    lambda: completion_chunk(completion(base_completion()), "x", "abort"),  # type: ignore[arg-type]
    lambda: chat_chunk(chat(base_chat()), "x", "cancelled"),  # type: ignore[arg-type]
])
def test_a_bad_finish_reason_is_a_plain_value_error(build):
    with pytest.raises(ValueError, match=r"finish_reason must be one of \('stop', 'length', 'tool_calls'\)") as info:
        build()
    assert not isinstance(info.value, ValidationError)
    with pytest.raises(ValidationError):  # the model itself: pydantic's error (also a ValueError)
        CompletionStreamChoice(index=0, text="x", finish_reason="abort")  # type: ignore[arg-type]


def test_prompt_logprobs_per_completion_choice_and_once_on_a_chat_body():
    outputs = {"index": 0, "text": "b", "completion_tokens": 1, "finish_reason": "stop",
               "prompt_logprobs": [{"token_id": 1, "logprob": None, "top": []},
                                   {"token_id": 2, "logprob": -0.5, "top": [(3, -0.25)], "rank": 2}]}
    scored = [None, {"2": {"logprob": -0.5, "rank": 2, "decoded_token": "t2"},
                     "3": {"logprob": -0.25, "rank": 1, "decoded_token": "t3"}}]
    for req in (completion(base_completion(prompt_logprobs=1, n=2)), chat(base_chat(prompt_logprobs=1))):
        collector = ChoiceCollector(req, lambda t: f"t{t}")
        for index in range(req.sampling.n):
            collector.add({**outputs, "index": index})
        body = collector.body(2)
        if req.endpoint == "chat.completions":
            assert list(body)[-1] == "prompt_logprobs" and body["prompt_logprobs"] == scored
            assert "prompt_logprobs" not in body["choices"][0]
            ChatCompletion.model_validate(body)
        else:
            assert [c["prompt_logprobs"] for c in body["choices"]] == [scored, scored]
            assert list(body["choices"][0])[-1] == "prompt_logprobs" and "prompt_logprobs" not in body
            Completion.model_validate(body)


def test_models_dump_only_what_is_set():
    assert ChatDelta().model_dump() == {} and ChatDelta(content="").model_dump() == {"content": ""}
    base = {"id": "c", "created": 1, "model": "m"}
    chunk = ChunkModel(**base, choices=[ChatStreamChoice(index=0, delta=ChatDelta(content="a"))])
    assert "usage" not in chunk.model_dump() and "flowprefill" not in chunk.model_dump()
    assert ChunkModel(**base, choices=[], usage=None).model_dump()["usage"] is None
    assert CompletionChunk(**base, choices=[], usage=Usage.of(2, 3)).model_dump()["usage"]["total_tokens"] == 5


def test_pydantic_json_is_used_only_where_it_equals_json_dumps():
    base = {"id": "c", "created": 1, "model": "m"}
    plain = CompletionChunk(**base, choices=[CompletionStreamChoice(index=0, text="é\u2028\x00\"")], usage=None)
    assert plain.json_bytes() == _compact(plain.model_dump()).encode()
    floats = CompletionChunk(**base, choices=[CompletionStreamChoice(index=0, text="x", logprobs={"v": [-1e-05]})])
    assert floats.json_bytes() is None  # pydantic would write 0.00001
    assert b'"v":[-1e-05]' in sse_event(floats)
    lone = CompletionChunk(**base, choices=[CompletionStreamChoice(index=0, text="a\ud800")])
    assert lone.json_bytes() is None  # json.dumps' text, encoded with "replace", as before
    assert sse_event(lone).endswith(b'"text":"a?","logprobs":null,"finish_reason":null}]}\n\n')
