"""vLLM's extra request fields (router/vllm_extras.py, router/request_models.py): every field of vLLM
0.32's ``CompletionRequest`` and ``ChatCompletionRequest`` is known here; those FlowPrefill does not
implement are served at vLLM's default and refused otherwise with a 422 saying why; ``add_special_tokens``
(completions) and ``add_generation_prompt`` (chat) work, on a tiny checkpoint's real tokenizer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from replicas.model.tokenizer import Tokenizer
from replicas.vllm_fields import sampling_fields
from router.api_errors import APIError
from router.protocol import GenerateRequest, ProtocolConfig, parse_chat_request, parse_completion_request
from router.request_models import CHAT_FIELDS, COMPLETION_FIELDS
from router.vllm_extras import CHAT_NEUTRAL, COMMON_NEUTRAL, COMPLETION_NEUTRAL

MODEL = "tiny"

# vLLM 0.32's request fields (``model_fields`` of vllm.entrypoints.openai.{completion,chat_completion}.protocol),
# written out because vLLM lives in its own environment (.venv-vllm), not the one the tests run in.
VLLM_COMPLETION_FIELDS = (
    "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty",
    "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user", "use_beam_search",
    "top_k", "min_p", "repetition_penalty", "watermarking", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "truncation_side", "allowed_token_ids",
    "prompt_logprobs", "logprob_token_ids", "bad_words", "prompt_embeds", "add_special_tokens", "response_format",
    "structured_outputs", "priority", "request_id", "session_id", "return_tokens_as_token_ids", "return_token_ids",
    "routed_experts_prompt_start", "return_token_offsets", "mm_payload", "return_mm_kwargs", "cache_salt",
    "kv_transfer_params", "ec_transfer_params", "vllm_xargs", "repetition_detection", "thinking_token_budget",
    "stream_interval",
)
VLLM_CHAT_FIELDS = (
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
    "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop", "stream", "stream_options",
    "temperature", "top_p", "tools", "tool_choice", "reasoning_effort", "thinking_token_budget",
    "include_reasoning", "parallel_tool_calls", "user", "use_beam_search", "top_k", "min_p", "repetition_penalty",
    "watermarking", "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "truncation_side",
    "prompt_logprobs", "logprob_token_ids", "allowed_token_ids", "bad_words", "echo", "add_generation_prompt",
    "continue_final_message", "add_special_tokens", "documents", "chat_template", "chat_template_kwargs",
    "media_io_kwargs", "mm_processor_kwargs", "structured_outputs", "priority", "request_id", "session_id",
    "return_tokens_as_token_ids", "return_token_ids", "routed_experts_prompt_start", "return_token_offsets",
    "return_prompt_text", "mm_payload", "return_mm_kwargs", "cache_salt", "kv_transfer_params",
    "ec_transfer_params", "vllm_xargs", "repetition_detection", "stream_interval",
)


@pytest.fixture(scope="module")
def tok(tiny_checkpoint_factory) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoint_factory("llama", seed=3))


@pytest.fixture(scope="module")
def config(tok) -> ProtocolConfig:
    return ProtocolConfig((MODEL,), max_model_len=2048, vocab_size=tok.vocab_size)


def _completion(config: ProtocolConfig, tok: Tokenizer | None = None, **fields: Any) -> GenerateRequest:
    body = json.dumps({"model": MODEL, "prompt": "hello world", **fields}).encode()
    return parse_completion_request(body, {}, config, tokenizer=tok, request_id="r", now=1.0)


def _chat(config: ProtocolConfig, tok: Tokenizer | None = None, **fields: Any) -> GenerateRequest:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}], **fields}
    return parse_chat_request(json.dumps(body).encode(), {}, config, tokenizer=tok, request_id="r", now=1.0)


def test_every_vllm_field_is_known():
    assert set(VLLM_COMPLETION_FIELDS) <= COMPLETION_FIELDS, set(VLLM_COMPLETION_FIELDS) - COMPLETION_FIELDS
    assert set(VLLM_CHAT_FIELDS) <= CHAT_FIELDS, set(VLLM_CHAT_FIELDS) - CHAT_FIELDS


def _cases(table: dict[str, tuple[tuple[object, ...], str]]) -> list[tuple[str, object]]:
    return [(name, value) for name, (accepted, _) in table.items() for value in (*accepted, None)]


@pytest.mark.parametrize(("name", "value"), _cases({**COMMON_NEUTRAL, **COMPLETION_NEUTRAL}))
def test_completion_extras_at_vllm_defaults_change_nothing(config, name, value):
    assert _completion(config, **{name: value}) == _completion(config)


@pytest.mark.parametrize(("name", "value"), _cases({**COMMON_NEUTRAL, **CHAT_NEUTRAL}))
def test_chat_extras_at_vllm_defaults_change_nothing(config, name, value):
    assert _chat(config, **{name: value}) == _chat(config)


OTHER_VALUES: dict[str, object] = {
    "use_beam_search": True,
    "length_penalty": 0.8, "bad_words": ["foo"],
    "cache_salt": "tenant-a", "kv_transfer_params": {"do_remote_decode": True}, "structured_outputs": {"json": {}},
    "request_id": "abc", "mm_payload": "none", "routed_experts_prompt_start": 3, "vllm_xargs": {"k": 1},
}


@pytest.mark.parametrize(("name", "value"), sorted(OTHER_VALUES.items()))
@pytest.mark.parametrize("endpoint", ["completion", "chat"])
def test_other_values_are_422_saying_why(config, endpoint, name, value):
    parse = _completion if endpoint == "completion" else _chat
    with pytest.raises(APIError) as info:
        parse(config, **{name: value})
    err = info.value
    assert (err.status, err.param, err.code) == (422, name, "unsupported_parameter")
    reason = COMMON_NEUTRAL[name][1]
    assert err.message.startswith(f"{name} is accepted only at vLLM's default") and reason in err.message
    assert parse(config).sampling.max_tokens == 16  # the next request is served


@pytest.mark.parametrize(("endpoint", "name", "value", "param"), [
    ("completion", "skip_special_tokens", "yes", "skip_special_tokens"),
    ("chat", "include_stop_str_in_output", 1, "include_stop_str_in_output"),
    ("chat", "spaces_between_special_tokens", "no", "spaces_between_special_tokens"),
    ("completion", "length_penalty", True, "length_penalty"),
    ("completion", "add_special_tokens", 1, "add_special_tokens"),
    ("chat", "add_generation_prompt", "no", "add_generation_prompt"),
    ("chat", "continue_final_message", 0, "continue_final_message"),
])
def test_wrong_types_are_400(config, endpoint, name, value, param):
    with pytest.raises(APIError) as info:
        (_completion if endpoint == "completion" else _chat)(config, **{name: value})
    assert (info.value.status, info.value.param) == (400, param), info.value.message


def test_chat_only_extras_are_unknown_to_completions(config):
    with pytest.raises(APIError) as info:
        _completion(config, continue_final_message=False)
    assert (info.value.status, info.value.code) == (400, "unknown_parameter")


def test_add_special_tokens_and_add_generation_prompt_shape_the_prompt(config, tok):
    assert _completion(config, tok).prompt_token_ids == tuple(tok.encode("hello world", add_special_tokens=True))
    bare = _completion(config, tok, add_special_tokens=False).prompt_token_ids
    assert bare == tuple(tok.encode("hello world", add_special_tokens=False))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompted = _chat(config, tok).prompt_token_ids
    assert prompted == tuple(tok.encode_chat(messages, True))
    unprompted = _chat(config, tok, add_generation_prompt=False).prompt_token_ids
    assert unprompted == tuple(tok.encode_chat(messages, False)) and unprompted != prompted
    assert _chat(config, tok, add_generation_prompt=True).prompt_token_ids == prompted


def test_special_tokens_and_stop_strings_reach_the_sampling_params(config):
    default = _completion(config).sampling
    assert (default.skip_special_tokens, default.include_stop_str_in_output) == (True, False)
    s = _chat(config, skip_special_tokens=False, include_stop_str_in_output=True, stop=["."]).sampling
    assert (s.skip_special_tokens, s.include_stop_str_in_output, s.stop) == (False, True, (".",))
    assert sampling_fields(s) == {"skip_special_tokens": False, "include_stop_str_in_output": True}  # to vLLM
    allowed = _completion(config, allowed_token_ids=[3, 4]).sampling
    assert allowed.allowed_token_ids == (3, 4) and sampling_fields(allowed) == {"allowed_token_ids": [3, 4]}
    for bad in ([], [config.vocab_size], [-1], [True], "3"):
        with pytest.raises(APIError) as info:
            _completion(config, allowed_token_ids=bad)
        assert (info.value.status, info.value.param) == (400, "allowed_token_ids"), info.value.message


def test_truncate_prompt_tokens_keeps_the_last_tokens_or_the_first(config, tok):
    ids = tuple(tok.encode("hello world", add_special_tokens=True))
    assert len(ids) > 3
    left = _completion(config, tok, truncate_prompt_tokens=3, echo=True)
    assert left.prompt_token_ids == ids[-3:] and left.prompt is None  # echo decodes what was kept
    right = _completion(config, tok, truncate_prompt_tokens=3, truncation_side="right")
    assert right.prompt_token_ids == ids[:3]
    assert _completion(config, tok, truncate_prompt_tokens=len(ids) + 5).prompt_token_ids == ids
    assert _completion(config, tok, truncate_prompt_tokens=len(ids)).prompt == "hello world"  # nothing cut
    prompted = _chat(config, tok).prompt_token_ids
    assert _chat(config, tok, truncate_prompt_tokens=4).prompt_token_ids == prompted[-4:]
    small = ProtocolConfig((MODEL,), max_model_len=len(ids) - 1, vocab_size=tok.vocab_size)
    with pytest.raises(APIError) as info:  # -1: the context length, which then leaves no room to generate
        _completion(small, tok, truncate_prompt_tokens=-1, max_tokens=1)
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")
    long = ProtocolConfig((MODEL,), max_model_len=len(ids) + 16, vocab_size=tok.vocab_size)
    assert _completion(long, tok, truncate_prompt_tokens=-1).prompt_token_ids == ids


@pytest.mark.parametrize(("fields", "status", "param"), [
    ({"truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": "3"}, 400, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 3, "truncation_side": "middle"}, 400, "truncation_side"),
    ({"truncation_side": "left"}, 400, "truncation_side"),
])
def test_bad_truncation_is_400_naming_the_field(config, tok, fields, status, param):
    with pytest.raises(APIError) as info:
        _completion(config, tok, **fields)
    assert (info.value.status, info.value.param) == (status, param), info.value.message


def test_truncation_without_token_ids_says_why(config):
    with pytest.raises(APIError) as info:  # no tokenizer: a text prompt has no ids to cut
        _completion(config, truncate_prompt_tokens=2)
    assert (info.value.status, info.value.param) == (422, "truncate_prompt_tokens")
