"""The sampling fields the vLLM engine kind sends to vLLM, and the logprobs it reads back (no server)."""

from __future__ import annotations

from replicas.engine_types import TokenLogprob
from replicas.sampling_params import SamplingParams
from replicas.vllm_fields import parse_logprobs, sampling_fields


def test_neutral_params_add_nothing():
    assert sampling_fields(SamplingParams(temperature=0.5, top_k=3)) == {}


def test_every_new_field_is_passed_through():
    params = SamplingParams(max_tokens=8, presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.2,
                            min_p=0.1, logit_bias={"5": -100, 9: 2}, min_tokens=3, logprobs=2)
    assert sampling_fields(params) == {
        "presence_penalty": 0.5, "frequency_penalty": -1.0, "repetition_penalty": 1.2, "min_p": 0.1,
        "min_tokens": 3, "logit_bias": {"5": -100.0, "9": 2.0}, "logprobs": 2, "return_tokens_as_token_ids": True,
    }
    assert sampling_fields(SamplingParams(logprobs=0))["logprobs"] == 0
    body = sampling_fields(SamplingParams(n=3, json_schema='{"type": "object"}'))
    assert body == {"n": 3, "response_format": {"type": "json_schema",
                                                "json_schema": {"name": "response", "schema": {"type": "object"}}}}


def test_logprobs_are_read_back_with_token_ids():
    choice = {"text": "ab", "token_ids": [7, 8], "logprobs": {
        "tokens": ["token_id:7", "token_id:8"], "token_logprobs": [-0.5, None],
        "top_logprobs": [{"token_id:7": -0.5, "token_id:3": -0.25, "token_id:4": -2.0},
                         {"token_id:8": -3.0, "token_id:1": -0.1, "token_id:2": -0.2}],
        "text_offset": [0, 1]}}
    got = parse_logprobs(choice, [7, 8], 2)
    assert got == (TokenLogprob(7, -0.5, ((3, -0.25), (7, -0.5))),
                   TokenLogprob(8, float("-inf"), ((1, -0.1), (2, -0.2))))
    assert parse_logprobs(choice, [7, 8], None) is None
    assert parse_logprobs({"text": "x"}, [7], 2) is None
    assert parse_logprobs(choice, [7, 8], 0)[0].top == ()
