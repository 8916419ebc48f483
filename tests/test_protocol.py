"""Router protocol layer: request parsing, SLO resolution, error and response bodies (no Ray)."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import httpx2 as httpx
import jinja2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.shared import ErrorObject

from bench.slo_classes import classes_from_reference
from replicas.sampling_params import SamplingParams
from router.api_errors import APIError
from router.protocol import (
    GenerateRequest,
    ProtocolConfig,
    parse_chat_request,
    parse_completion_request,
)
from router.request_models import CHAT_FIELDS, COMPLETION_FIELDS
from router.responses import (
    SSE_DONE,
    StreamEncoder,
    chat_body,
    completion_body,
    response_body,
    sse_error,
)
from router.slo import ResolvedSLO, SLOClass, SLOConfigError, SLOPolicy

MODEL = "tiny"
CONFIG = ProtocolConfig((MODEL,), max_model_len=64, vocab_size=100)


class FakeTokenizer:
    """One token per character; BOS (1) with special tokens; chat renders ``<role>content``."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.seen: list[Any] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.seen.append((text, add_special_tokens))
        return ([1] if add_special_tokens else []) + [2 + ord(c) % 90 for c in text]

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        self.seen.append(messages)
        if self.fail:
            raise jinja2.TemplateError("Conversation roles must alternate")
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages))


def completion(body: dict[str, Any], headers: dict[str, str] | None = None, **kw: Any) -> GenerateRequest:
    return parse_completion_request(json.dumps(body).encode(), headers or {}, kw.pop("config", CONFIG), **kw)


def chat(body: dict[str, Any], headers: dict[str, str] | None = None, **kw: Any) -> GenerateRequest:
    return parse_chat_request(json.dumps(body).encode(), headers or {}, kw.pop("config", CONFIG), **kw)


def base_completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", **fields}


def base_chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def error_of(fn: Any, *args: Any, **kw: Any) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kw)
    err = info.value
    body = err.to_body()
    ErrorObject.model_validate(body["error"])
    assert body["error"]["param"] == err.param and body["error"]["message"] == err.message
    return err


# ---------------------------------------------------------------------------------------------
# Body-level errors


@pytest.mark.parametrize("parse", [parse_completion_request, parse_chat_request])
@pytest.mark.parametrize(
    ("raw", "status", "fragment"),
    [
        (b"{", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b'{"model": "tiny"} x', 400, "not valid JSON"),
        (b"\xff\xfe{}", 400, "UTF-8"),
        (b'{"model": "\xc3("}', 400, "UTF-8"),
        (b"[1, 2]", 400, "must be a JSON object, got array"),
        (b'"text"', 400, "got string"),
        (b"null", 400, "got null"),
        (b'{"model": NaN}', 400, "NaN"),
        (b'{"max_tokens": Infinity}', 400, "Infinity"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
        (b'{"seed": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
        (b"{" + b" " * (1 << 20) + b"}", 413, "over the limit"),
    ],
)
def test_body_errors(parse, raw, status, fragment):
    err = error_of(parse, raw, {}, CONFIG)
    assert err.status == status
    assert err.param == "body"
    assert fragment in err.message


def test_body_limit_is_configurable():
    small = ProtocolConfig((MODEL,), max_body_bytes=40)
    assert error_of(completion, base_completion(prompt="x" * 40), config=small).status == 413
    assert completion(base_completion(prompt="x"), config=small).prompt == "x"


def test_lone_surrogate_in_text_is_rejected():
    raw = b'{"model": "tiny", "prompt": "a\\ud800b"}'
    err = error_of(parse_completion_request, raw, {}, CONFIG)
    assert (err.status, err.param) == (400, "prompt")
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'
    assert error_of(parse_chat_request, raw, {}, CONFIG).param == "messages[0].content[0].text"


# ---------------------------------------------------------------------------------------------
# Field errors: every path names its param and status

COMPLETION_CASES: list[tuple[dict[str, Any], int, str]] = [
    ({"model": None}, 400, "model"),
    ({"model": 5}, 400, "model"),
    ({"model": "gpt-4"}, 404, "model"),
    ({"prompt": None}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 422, "prompt"),
    ({"prompt": [[1], [2]]}, 422, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": [1, True]}, 400, "prompt"),
    ({"prompt": [100]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": {"text": "a"}}, 400, "prompt"),
    ({"max_tokens": "10"}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 1.5}, 400, "max_tokens"),
    ({"max_tokens": 2.0}, 400, "max_tokens"),
    ({"max_tokens": True}, 400, "max_tokens"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"temperature": -0.1}, 400, "temperature"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.1}, 400, "top_p"),
    ({"top_k": -2}, 400, "top_k"),
    ({"top_k": 1.5}, 400, "top_k"),
    ({"seed": -1}, 400, "seed"),
    ({"seed": 2**63}, 400, "seed"),
    ({"seed": "1"}, 400, "seed"),
    ({"stop": 5}, 400, "stop"),
    ({"stop": [1]}, 400, "stop"),
    ({"stop": [""]}, 400, "stop"),
    ({"stop": ["x"] * 17}, 400, "stop"),
    ({"stop_token_ids": [100]}, 400, "stop_token_ids"),
    ({"stop_token_ids": 3}, 400, "stop_token_ids"),
    ({"ignore_eos": "yes"}, 400, "ignore_eos"),
    ({"stream": "true"}, 400, "stream"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"stream": True, "stream_options": 1}, 400, "stream_options"),
    ({"stream": True, "stream_options": {"foo": 1}}, 400, "stream_options.foo"),
    ({"stream": True, "stream_options": {"include_usage": "y"}}, 400, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, 422,
     "stream_options.continuous_usage_stats"),
    ({"n": 129}, 400, "n"),
    ({"n": 0}, 400, "n"),
    ({"best_of": 3}, 422, "best_of"),
    ({"n": 3, "best_of": 2}, 400, "best_of"),
    ({"echo": 1}, 400, "echo"),
    ({"logprobs": 21}, 400, "logprobs"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"presence_penalty": 3}, 400, "presence_penalty"),
    ({"frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ({"repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"min_p": 1.1}, 400, "min_p"),
    ({"logit_bias": [1]}, 400, "logit_bias"),
    ({"logit_bias": {"100": 5}}, 400, "logit_bias"),  # CONFIG's vocabulary has 100 tokens
    ({"logit_bias": {"1": 101}}, 400, "logit_bias"),
    ({"min_tokens": 17}, 400, "min_tokens"),  # more than the default max_tokens (16)
    ({"suffix": "end"}, 422, "suffix"),
    ({"foo": 1}, 400, "foo"),
    ({"messages": []}, 400, "messages"),
    ({"priority": "high"}, 400, "priority"),
    ({"priority": 1.5}, 400, "priority"),
    ({"slo_class": 3}, 400, "slo_class"),
    ({"slo_class": "gold"}, 400, "slo_class"),
    ({"user": 5}, 400, "user"),
]


@pytest.mark.parametrize(("patch", "status", "param"), COMPLETION_CASES)
def test_completion_field_errors(patch, status, param):
    err = error_of(completion, base_completion(**patch))
    assert (err.status, err.param) == (status, param), err.message
    assert param in err.message or status == 404
    assert err.type == ("not_found_error" if status == 404 else "invalid_request_error")
    if status == 422:
        assert err.code == "unsupported_parameter"


CHAT_CASES: list[tuple[dict[str, Any], int, str]] = [
    ({"messages": None}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [5]}, 400, "messages[0]"),
    ({"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}]}, 400,
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "function", "content": "x"}]}, 422, "messages[1].role"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": []}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, 400, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 422,
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"text": "a"}]}]}, 400, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, 400,
     "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]}, 400,
     "messages[0].content[0].x"),
    ({"messages": [{"role": "user", "content": "a", "weight": 1}]}, 400, "messages[0].weight"),
    ({"messages": [{"role": "user", "content": "a", "name": 1}]}, 400, "messages[0].name"),
    ({"messages": [{"role": "assistant", "content": "a", "tool_calls": [{"id": "1"}]}]}, 400,
     "messages[0].tool_calls[0].type"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, 400, "max_completion_tokens"),
    ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"tools": [{"type": "function"}]}, 400, "tools[0].function"),
    ({"tool_choice": "required"}, 400, "tool_choice"),  # needs tools
    ({"tool_choice": "maybe"}, 400, "tool_choice"),
    ({"response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, 400,
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, 400,
     "response_format.json_schema.schema"),
    ({"response_format": {}}, 400, "response_format.type"),
    ({"logprobs": 1}, 400, "logprobs"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),  # needs logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"store": True}, 422, "store"),
    ({"modalities": ["text", "audio"]}, 422, "modalities"),
    ({"prompt": "x"}, 400, "prompt"),
    ({"echo": True}, 422, "echo"),  # vLLM's chat echo: accepted at its default (false) only
    ({"n": 1.5}, 400, "n"),
    ({"model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize(("patch", "status", "param"), CHAT_CASES)
def test_chat_field_errors(patch, status, param):
    err = error_of(chat, base_chat(**patch))
    assert (err.status, err.param) == (status, param), err.message


def test_unknown_fields_are_all_named():
    err = error_of(completion, base_completion(zeta=1, alpha=2))
    assert err.param == "alpha" and "'alpha', 'zeta'" in err.message


def test_neutral_values_are_accepted():
    neutral = {
        "n": 1, "best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0,
        "repetition_penalty": 1, "min_p": 0, "logit_bias": {}, "suffix": "", "user": "u1", "service_tier": "auto",
    }
    req = completion(base_completion(**neutral))
    assert req.sampling == SamplingParams() and req.user == "u1"
    chat_neutral = {
        "logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"}, "tools": [],
        "tool_choice": "none", "parallel_tool_calls": True, "store": False, "metadata": {"k": "v"},
        "modalities": ["text"], "function_call": "auto", "functions": None,
    }
    assert chat(base_chat(**chat_neutral)).sampling == SamplingParams()


def test_single_prompt_in_a_list_is_one_prompt():
    assert completion(base_completion(prompt=["abc"])).prompt == "abc"
    assert completion(base_completion(prompt=[[3, 4]])).prompt_token_ids == (3, 4)
    req = completion(base_completion(prompt=[5, 6, 7]))
    assert req.prompt is None and req.prompt_token_ids == (5, 6, 7) and req.num_prompt_tokens == 3


# ---------------------------------------------------------------------------------------------
# Tokenization, context length, max_tokens defaults


def test_completion_text_is_tokenized_with_special_tokens():
    tok = FakeTokenizer()
    req = completion(base_completion(prompt="abc"), tokenizer=tok)
    assert tok.seen == [("abc", True)]
    assert req.prompt == "abc" and req.prompt_token_ids == (1, *[2 + ord(c) % 90 for c in "abc"])
    assert completion(base_completion(prompt="abc")).prompt_token_ids is None


def test_chat_is_tokenized_from_flattened_messages():
    tok = FakeTokenizer()
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    req = chat(base_chat(messages=messages), tokenizer=tok)
    flat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    assert tok.seen[0] == flat and req.messages == tuple(flat)
    assert req.num_prompt_tokens == len("<system>be brief<user>a\nb")


def test_chat_template_error_is_400_messages():
    err = error_of(chat, base_chat(), tokenizer=FakeTokenizer(fail=True))
    assert (err.status, err.param) == (400, "messages") and "alternate" in err.message


@pytest.mark.parametrize(
    ("prompt_len", "fields", "param"),
    [
        (64, {}, "prompt"),
        (70, {"max_tokens": 1}, "prompt"),
        (60, {"max_tokens": 10}, "max_tokens"),
        (50, {}, "prompt"),  # the default 16 does not fit: the prompt is what the client sent
    ],
)
def test_context_length_exceeded(prompt_len, fields, param):
    err = error_of(completion, base_completion(prompt=[3] * prompt_len, **fields))
    assert (err.status, err.param, err.code) == (400, param, "context_length_exceeded")
    assert "64" in err.message


def test_context_length_fits_exactly():
    assert completion(base_completion(prompt=[3] * 60, max_tokens=4)).sampling.max_tokens == 4
    tokenized = completion(base_completion(prompt="x" * 61, max_tokens=2), tokenizer=FakeTokenizer())
    assert tokenized.num_prompt_tokens == 62


def test_chat_context_errors_name_the_field_used():
    long = base_chat(messages=[{"role": "user", "content": "x" * 70}])
    assert error_of(chat, long, tokenizer=FakeTokenizer()).param == "messages"
    body = base_chat(max_completion_tokens=60)
    assert error_of(chat, body, tokenizer=FakeTokenizer()).param == "max_completion_tokens"


def test_max_tokens_defaults_and_limit():
    tok = FakeTokenizer()
    assert completion(base_completion()).sampling.max_tokens == 16
    req = chat(base_chat(), tokenizer=tok)  # "<user>hi" is 8 tokens: the rest of the context
    assert req.sampling.max_tokens == 64 - 8
    assert chat(base_chat()).sampling.max_tokens == 16  # prompt length unknown
    assert chat(base_chat(max_completion_tokens=7)).sampling.max_tokens == 7
    assert chat(base_chat(max_tokens=7, max_completion_tokens=7)).sampling.max_tokens == 7
    capped = ProtocolConfig((MODEL,), max_model_len=64, max_tokens_limit=10, default_max_tokens=12)
    assert chat(base_chat(), tokenizer=tok, config=capped).sampling.max_tokens == 10
    assert completion(base_completion(), config=capped).sampling.max_tokens == 10
    err = error_of(completion, base_completion(max_tokens=11), config=capped)
    assert (err.status, err.param) == (400, "max_tokens")


def test_protocol_config_validation():
    with pytest.raises(ValueError, match="served_models"):
        ProtocolConfig(())
    with pytest.raises(ValueError, match="max_model_len"):
        ProtocolConfig((MODEL,), max_model_len=0)


def test_request_ids_and_clock():
    req = completion(base_completion(), now=1234.5)
    assert req.request_id.startswith("cmpl-") and req.created == 1234 and req.arrival_time == 1234.5
    assert chat(base_chat()).request_id.startswith("chatcmpl-")
    assert completion(base_completion(), request_id="abc").request_id == "abc"
    assert completion(base_completion()).request_id != completion(base_completion()).request_id


# ---------------------------------------------------------------------------------------------
# SLO classes and resolution

EXAMPLE_POLICY = {
    "default_class": "standard",
    "classes": [
        {"name": "interactive", "ttft_slo_ms": 300, "tpot_slo_ms": 100, "priority": 0, "sheddable": False},
        {"name": "standard", "ttft_slo_ms": 1000, "priority": 1},
        {"name": "batch", "ttft_slo_ms": 20000.5, "tpot_slo_ms": None, "priority": 5, "sheddable": True},
    ],
}


def test_policy_from_dict_round_trip():
    policy = SLOPolicy.from_dict(EXAMPLE_POLICY)
    assert [c.name for c in policy.classes] == ["interactive", "standard", "batch"]
    assert policy.get("standard") == SLOClass("standard", 1.0, None, 1, False)
    assert policy.get("nope") is None
    assert SLOPolicy.from_dict(policy.to_dict()) == policy


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(EXAMPLE_POLICY))
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("classes", 1, "ttft_slo_ms"), "fast", "slo.classes[1].ttft_slo_ms"),
        (("classes", 1, "ttft_slo_ms"), 0, "slo.classes[1].ttft_slo_ms"),
        (("classes", 1, "ttft_slo_ms"), -5, "slo.classes[1].ttft_slo_ms"),
        (("classes", 1, "ttft_slo_ms"), True, "slo.classes[1].ttft_slo_ms"),
        (("classes", 1, "ttft_slo_ms"), math.inf, "slo.classes[1].ttft_slo_ms"),
        (("classes", 1, "ttft_slo_ms"), KeyError, "slo.classes[1].ttft_slo_ms"),
        (("classes", 0, "tpot_slo_ms"), 0, "slo.classes[0].tpot_slo_ms"),
        (("classes", 0, "priority"), 1.5, "slo.classes[0].priority"),
        (("classes", 0, "priority"), KeyError, "slo.classes[0].priority"),
        (("classes", 0, "sheddable"), "no", "slo.classes[0].sheddable"),
        (("classes", 0, "name"), "", "slo.classes[0].name"),
        (("classes", 0, "name"), "has space", "slo.classes[0].name"),
        (("classes", 0, "name"), KeyError, "slo.classes[0].name"),
        (("classes", 2, "name"), "standard", "slo.classes[2].name"),
        (("classes", 0, "deadline"), 1, "slo.classes[0].deadline"),
        (("classes", 0), "interactive", "slo.classes[0]"),
        (("classes",), [], "slo.classes"),
        (("classes",), {"a": 1}, "slo.classes"),
        (("default_class",), "gold", "slo.default_class"),
        (("default_class",), KeyError, "slo.default_class"),
        (("extra",), 1, "slo.extra"),
    ],
)
def test_policy_errors_name_the_path(path, value, where):
    with pytest.raises(SLOConfigError) as info:
        SLOPolicy.from_dict(_with(path, value))
    assert info.value.path == where and str(info.value).startswith(where + ":")


def test_policy_not_a_mapping_and_custom_path():
    with pytest.raises(SLOConfigError, match=r"^router\.slo: Input should be a mapping of settings, got list"):
        SLOPolicy.from_dict([1], path="router.slo")


def test_default_policy_and_bench_compatibility():
    policy = SLOPolicy.default()
    assert policy.default_class == "standard"
    by_name = {c.name: c for c in policy.classes}
    # lower priority number = more urgent, as in vLLM
    assert by_name["interactive"].priority < by_name["standard"].priority < by_name["batch"].priority
    assert by_name["batch"].sheddable and not by_name["interactive"].sheddable
    assert policy.classes[0] == SLOClass("interactive", 0.3, 0.1, 0, False)
    assert policy.classes[0].to_dict() == {"name": "interactive", "ttft_slo_ms": 300.0, "tpot_slo_ms": 100.0,
                                           "priority": 0, "sheddable": False}
    relative = SLOPolicy(classes_from_reference(0.05), "interactive")  # the benchmarks' classes are the same type
    assert relative.get("batch").ttft_slo_ms == pytest.approx(1500.0)


POLICY = SLOPolicy.from_dict(EXAMPLE_POLICY)


def test_resolve_precedence():
    assert POLICY.resolve({}) == ResolvedSLO("standard", 1.0, None, 1, False)
    assert POLICY.resolve({}, "interactive") == ResolvedSLO("interactive", 0.3, 0.1, 0, False)
    assert POLICY.resolve({"X-SLO-Class": "batch"}, "interactive").class_name == "batch"  # header wins
    assert POLICY.resolve({"x-slo-class": " batch "}).class_name == "batch"
    over = POLICY.resolve({"x-slo-class": "batch", "X-Slo-Ttft-Ms": "250", "x-slo-tpot-ms": "1.5e1"})
    assert over == ResolvedSLO("batch", 0.25, 0.015, 5, True)
    assert POLICY.resolve({}, "batch", -3).priority == -3
    assert POLICY.resolve({}, "batch", 0).sheddable


@pytest.mark.parametrize("header", ["x-slo-ttft-ms", "x-slo-tpot-ms"])
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "Infinity", "abc", "", "1e999", "1_000", "0x10"])
def test_bad_slo_headers_name_the_header(header, value):
    err = error_of(POLICY.resolve, {header.upper(): value})
    assert (err.status, err.param) == (400, header)


def test_unknown_class_names_its_source():
    assert error_of(POLICY.resolve, {}, "gold").param == "slo_class"
    err = error_of(POLICY.resolve, {"x-slo-class": "gold"}, "standard")
    assert (err.status, err.param, err.code) == (400, "x-slo-class", "unknown_slo_class")


def test_request_slo_from_headers_and_body():
    req = completion(base_completion(slo_class="interactive", priority=7), {"x-slo-ttft-ms": "50"})
    assert req.slo == ResolvedSLO("interactive", 0.05, 0.1, 7, False)
    req = chat(base_chat(), {"x-slo-class": "batch"})
    assert req.slo.class_name == "batch" and req.slo.sheddable and req.slo.priority == 2
    custom = ProtocolConfig((MODEL,), slo_policy=POLICY)
    assert completion(base_completion(), config=custom).slo.class_name == "standard"
    assert error_of(chat, base_chat(), {"x-slo-tpot-ms": "-1"}).param == "x-slo-tpot-ms"

# ---------------------------------------------------------------------------------------------
# Property tests

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(sorted(COMPLETION_FIELDS | CHAT_FIELDS)) | st.text(max_size=8)
header_names = st.sampled_from(["x-slo-class", "X-SLO-TTFT-MS", "x-slo-tpot-ms", "x-other"])


def _check_api_error(err: APIError) -> None:
    assert err.status in (400, 404, 413, 422)
    assert err.param is None or isinstance(err.param, str)
    body = json.loads(json.dumps(err.to_body()))
    ErrorObject.model_validate(body["error"])


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from([{}, base_completion(), base_chat()]),
    patch=st.dictionaries(field_names, json_values, max_size=6),
    headers=st.dictionaries(header_names, st.text(max_size=8), max_size=3),
    endpoint=st.sampled_from([parse_completion_request, parse_chat_request]),
)
def test_random_bodies_only_raise_api_errors(base, patch, headers, endpoint):
    raw = json.dumps({**base, **patch}).encode()
    try:
        req = endpoint(raw, headers, CONFIG, tokenizer=FakeTokenizer())
    except APIError as err:
        _check_api_error(err)
    else:
        assert isinstance(req.sampling, SamplingParams) and isinstance(req.slo, ResolvedSLO)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_random_bytes_only_raise_api_errors(raw):
    for endpoint in (parse_completion_request, parse_chat_request):
        try:
            endpoint(raw, {}, CONFIG)
        except APIError as err:
            _check_api_error(err)


optional = st.none().__or__
sampling_fields = st.fixed_dictionaries({
    "max_tokens": optional(st.integers(1, 48)),
    "temperature": optional(st.floats(0.0, 2.0)),
    "top_p": optional(st.floats(0.0, 1.0, exclude_min=True)),
    "top_k": optional(st.integers(-1, 10**6)),
    "seed": optional(st.integers(0, 2**63 - 1)),
    "stop": optional(st.text(min_size=1, max_size=5) | st.lists(st.text(min_size=1, max_size=5), max_size=16)),
    "stop_token_ids": optional(st.lists(st.integers(0, 99), max_size=5)),
    "ignore_eos": optional(st.booleans()),
})


@settings(max_examples=150, deadline=None)
@given(fields=sampling_fields, drop_nulls=st.booleans(), use_chat=st.booleans(), prompt_len=st.integers(1, 16))
def test_valid_bodies_parse_to_the_given_sampling_params(fields, drop_nulls, use_chat, prompt_len):
    given_fields = {k: v for k, v in fields.items() if v is not None or not drop_nulls}
    if use_chat:
        req = chat(base_chat(**given_fields))
    else:
        req = completion(base_completion(prompt=[3] * prompt_len, **given_fields))
    expected = SamplingParams(**{"max_tokens": 16, **{k: v for k, v in fields.items() if v is not None}})
    assert req.sampling == expected
    if fields["stop"] is not None:
        assert req.sampling.stop == ((fields["stop"],) if isinstance(fields["stop"], str) else tuple(fields["stop"]))


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(max_size=10), min_size=1, max_size=5), role=st.sampled_from(["user", "assistant"]))
def test_chat_content_parts_flatten(texts, role):
    parts = [{"type": "text", "text": t} for t in texts]
    req = chat(base_chat(messages=[{"role": role, "content": parts}]))
    assert req.messages == ({"role": role, "content": "\n".join(texts)},)


@settings(max_examples=100, deadline=None)
@given(
    ttft=st.floats(1e-3, 1e9), tpot=st.floats(1e-3, 1e9), cls=st.sampled_from(["interactive", "standard", "batch"]),
    priority=optional(st.integers(-(2**63), 2**63 - 1)),
)
def test_headers_and_priority_override_the_class(ttft, tpot, cls, priority):
    headers = {"x-slo-class": cls, "x-slo-ttft-ms": repr(ttft), "X-Slo-Tpot-Ms": repr(tpot)}
    req = completion(base_completion(priority=priority), headers)
    klass = SLOPolicy.default().get(cls)
    assert req.slo.class_name == cls and req.slo.sheddable == klass.sheddable
    assert req.slo.ttft_slo_s == ttft / 1000.0 and req.slo.tpot_slo_s == tpot / 1000.0
    assert req.slo.priority == (klass.priority if priority is None else priority)


# ---------------------------------------------------------------------------------------------
# Response bodies and SSE validate with the official client's types


class _ChunkChoice(CompletionChoice):
    # The client's Completion type (also used for stream chunks) omits the null finish_reason that
    # the OpenAI API sends on all but the last chunk; the client builds chunks without validating.
    finish_reason: Literal["stop", "length", "content_filter"] | None = None  # type: ignore[assignment]


class CompletionChunk(Completion):
    choices: list[_ChunkChoice]  # type: ignore[assignment]


def parse_sse(data: bytes) -> list[Any]:
    text = data.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ")
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_non_streaming_bodies_validate():
    req = completion(base_completion())
    body = completion_body(req, "out", "length", 5, 16)
    parsed = Completion.model_validate(body)
    assert parsed.id == req.request_id and parsed.choices[0].text == "out"
    assert parsed.choices[0].finish_reason == "length" and parsed.usage.total_tokens == 21
    creq = chat(base_chat())
    cbody = chat_body(creq, "hello", "stop", 3, 1)
    cparsed = ChatCompletion.model_validate(cbody)
    assert cparsed.choices[0].message.content == "hello" and cparsed.choices[0].message.role == "assistant"
    assert cparsed.object == "chat.completion" and cparsed.usage.completion_tokens == 1
    assert response_body(creq, "hello", "stop", 3, 1) == cbody
    assert response_body(req, "out", "length", 5, 16) == body
    with pytest.raises(ValueError, match="finish_reason"):
        completion_body(req, "x", "abort", 1, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_stream_validates(include_usage):
    req = completion(base_completion(stream=True, stream_options={"include_usage": include_usage}))
    enc = StreamEncoder(req)
    raw = enc.start() + enc.delta("Hel") + enc.delta("") + enc.delta("lo") + enc.finish("stop", 5, 2, text="!")
    events = parse_sse(raw)
    assert events[-1] == "[DONE]" and enc.done
    chunks = [CompletionChunk.model_validate(e) for e in events[:-1]]
    Completion.model_validate(events[-3 if include_usage else -2])  # the finishing chunk is a full Completion
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == "Hello!"
    assert [c.choices[0].finish_reason for c in text_chunks] == [None, None, "stop"]
    assert all(c.id == req.request_id for c in chunks)
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7
        assert all("usage" in e and e["usage"] is None for e in events[:-2])
    else:
        assert all("usage" not in e for e in events[:-1])


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_validates(include_usage):
    req = chat(base_chat(stream=True, stream_options={"include_usage": include_usage}))
    enc = StreamEncoder(req)
    events = parse_sse(enc.start() + enc.delta("Hi") + enc.delta(" there") + enc.finish("length", 4, 2))
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == "Hi there"
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert with_choices[-1].choices[0].delta.content is None
    assert (chunks[-1].usage is not None) == include_usage


def test_stream_error_event():
    req = chat(base_chat(stream=True))
    enc = StreamEncoder(req)
    err = APIError.internal("replica died")
    raw = enc.delta("partial") + enc.error(err)
    events = parse_sse(raw)
    assert events[-1] == "[DONE]" and events[-2] == err.to_body()
    assert ErrorObject.model_validate(events[-2]["error"]).type == "server_error"
    assert sse_error(err) == raw[len(enc.delta("partial")):]
    assert sse_error(err).endswith(SSE_DONE)


def test_error_constructors():
    shed = APIError.shed("SLO unattainable", retry_after_s=2.4)
    assert (shed.status, shed.type, shed.code, shed.headers) == (429, "rate_limit_error", "rate_limit_exceeded",
                                                                 {"Retry-After": "2"})
    # every hint (a replica's refusal, a router shed) is clamped to 1-60 whole seconds in one place
    assert APIError.shed("late", retry_after_s=500.0).headers == {"Retry-After": "60"}
    assert APIError.shed("late", retry_after_s=0.2).headers == {"Retry-After": "1"}
    busy = APIError.overloaded("no replica")
    assert (busy.status, busy.type, busy.headers) == (503, "server_error", {})
    assert APIError.internal().status == 500
    big = APIError.body_too_large(10, 5)
    assert (big.status, big.param) == (413, "body") and "413" in repr(big)


# ---------------------------------------------------------------------------------------------
# End to end with the official client over a mock transport


def _fake_server(request: httpx.Request) -> httpx.Response:
    parse = parse_chat_request if request.url.path.endswith("/chat/completions") else parse_completion_request
    try:
        req = parse(request.content, request.headers, CONFIG, tokenizer=FakeTokenizer())
    except APIError as err:
        return httpx.Response(err.status, json=err.to_body(), headers=err.headers)
    n_prompt = req.num_prompt_tokens or 0
    if not req.stream:
        return httpx.Response(200, json=response_body(req, "hello world", "stop", n_prompt, 2))
    enc = StreamEncoder(req)
    raw = enc.start() + enc.delta("hello") + enc.delta(" world")
    if req.slo.class_name == "batch":  # the test's way to make the stream fail midway
        raw += enc.error(APIError.internal("replica died"))
    else:
        raw += enc.finish("stop", n_prompt, 2)
    return httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"})


@pytest.fixture()
def client() -> openai.OpenAI:
    http = httpx.Client(transport=httpx.MockTransport(_fake_server))
    return openai.OpenAI(base_url="http://router.test/v1", api_key="none", http_client=http, max_retries=0)


def test_openai_client_round_trip(client):
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=5)
    assert out.choices[0].text == "hello world" and out.usage.prompt_tokens == 4
    stream = client.completions.create(model=MODEL, prompt="abc", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "hello world"
    assert chunks[-1].usage.completion_tokens == 2
    msgs = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model=MODEL, messages=msgs)
    assert reply.choices[0].message.content == "hello world"
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=msgs, stream=True) if c.choices]
    assert "".join(parts) == "hello world"


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="abc", max_tokens=0)
    assert bad.value.param == "max_tokens" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="abc")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as unsupported:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], store=True)
    assert unsupported.value.param == "store"
    with pytest.raises(openai.BadRequestError) as header:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"x-slo-ttft-ms": "soon"})
    assert header.value.param == "x-slo-ttft-ms"
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                                            extra_body={"slo_class": "batch"})
    with pytest.raises(openai.APIError, match="replica died"):
        list(stream)


def test_real_tokenizer_on_tiny_checkpoint(tiny_checkpoint_factory):
    from replicas.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_checkpoint_factory("llama"))
    config = ProtocolConfig((MODEL,), max_model_len=4096, vocab_size=tok.vocab_size)
    req = completion(base_completion(prompt="hello world"), config=config, tokenizer=tok)
    assert req.prompt_token_ids == tuple(tok.encode("hello world", add_special_tokens=True))
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    creq = chat(base_chat(messages=messages), config=config, tokenizer=tok)
    flat = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert creq.prompt_token_ids == tuple(tok.encode_chat(flat))
    assert creq.sampling.max_tokens == 4096 - len(creq.prompt_token_ids)
