"""The gRPC API's sampling fields and logprobs: same validation as HTTP, entries on the chunks (no server)."""

from __future__ import annotations

import json
from dataclasses import asdict

import grpc
import pytest

from replicas.engine_types import TokenLogprob
from router.api_errors import APIError
from router.grpc_gen import flowprefill_pb2 as pb
from router.grpc_service import api_error_to_grpc_status, grpc_request_body, output_to_chunk, parse_grpc_request
from router.protocol import parse_chat_request, parse_completion_request
from tests.test_grpc_service import CONFIG, MODEL, TOKENIZER

FIELDS = {"presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.5, "min_p": 0.125,
          "min_tokens": 2}


def test_fields_parse_as_the_http_body_does():
    msg = pb.GenerateRequest(model=MODEL, prompt="hello", logit_bias={7: -100.0, 9: 2.5}, logprobs=3, **FIELDS)
    got = parse_grpc_request(msg, CONFIG, TOKENIZER, now=5.0)
    body = {"model": MODEL, "prompt": "hello", "logit_bias": {"7": -100, "9": 2.5}, "logprobs": 3, **FIELDS}
    want = parse_completion_request(json.dumps(body).encode(), {}, CONFIG, tokenizer=TOKENIZER,
                                    request_id=got.request_id, now=5.0)
    assert got == want and got.sampling.logprobs == 3 and got.sampling.logit_bias == ((7, -100.0), (9, 2.5))
    chat = pb.GenerateRequest(model=MODEL, messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user",
                                                                                                content="hi")]),
                              logprobs=2)
    endpoint, raw, _ = grpc_request_body(chat)
    assert endpoint == "chat.completions" and json.loads(raw)["top_logprobs"] == 2
    chat_req = parse_grpc_request(chat, CONFIG, TOKENIZER, now=1.0)
    http = parse_chat_request(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "logprobs": True, "top_logprobs": 2}).encode(), {}, CONFIG,
                              tokenizer=TOKENIZER, request_id=chat_req.request_id, now=1.0)
    assert chat_req == http and chat_req.sampling.logprobs == 2
    assert parse_grpc_request(pb.GenerateRequest(model=MODEL, prompt="x"), CONFIG, TOKENIZER).sampling.logprobs is None


@pytest.mark.parametrize(("fields", "param"), [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_p": float("nan")}, "min_p"),
    ({"logit_bias": {500: 1.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {3: float("inf")}}, "logit_bias"),
    ({"min_tokens": 100}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"),
])
def test_bad_values_name_the_field(fields, param):
    with pytest.raises(APIError) as info:
        parse_grpc_request(pb.GenerateRequest(model=MODEL, prompt="hello", **fields), CONFIG, TOKENIZER)
    assert info.value.param == param and param in info.value.message
    assert api_error_to_grpc_status(info.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_chunks_carry_the_logprobs_of_their_tokens():
    entry = TokenLogprob(5, float("-inf"), ((6, -0.5), (5, -2.0)))
    for raw in (entry, asdict(entry)):  # an object in process, its dict after the replica's asdict
        chunk = output_to_chunk({"text": "a", "token_ids": [5], "logprobs": [raw]}, None)
        lp = chunk.logprobs[0]
        assert (lp.token_id, lp.logprob) == (5, -9999.0)
        assert [(t.token_id, t.logprob) for t in lp.top] == [(6, -0.5), (5, -2.0)]
    assert list(output_to_chunk({"text": "a", "token_ids": [5]}, None).logprobs) == []
