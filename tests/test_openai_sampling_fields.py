"""The sampling fields and log probabilities on the HTTP surface: parsing, and OpenAI's response
formats, checked with the official client's models and over a mock transport (no server)."""

from __future__ import annotations

import json
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion_choice import Logprobs

from replicas.engine_types import TokenLogprob
from replicas.replica_request import ReplicaRequest
from replicas.sampling_params import SamplingParams
from router.api_errors import APIError
from router.payload import build_payload
from router.protocol import parse_chat_request, parse_completion_request
from router.responses import StreamEncoder, body_logprobs, response_body
from tests.test_protocol import CONFIG, MODEL, FakeTokenizer, base_chat, base_completion, chat, completion, parse_sse

SAMPLING = {"presence_penalty": 0.5, "frequency_penalty": -1.25, "repetition_penalty": 1.3, "min_p": 0.05,
            "logit_bias": {"7": -100, "42": 3.5}, "min_tokens": 2}


@pytest.mark.parametrize("parse", [completion, chat])
def test_sampling_fields_reach_the_sampling_params_and_the_replica_request(parse):
    req = parse((base_chat if parse is chat else base_completion)(**SAMPLING), tokenizer=FakeTokenizer())
    s = req.sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p, s.min_tokens) == (
        0.5, -1.25, 1.3, 0.05, 2)
    assert s.logit_bias == ((7, -100.0), (42, 3.5)) and s.logprobs is None
    payload = build_payload(req, req.arrival_time)
    assert payload.sampling == s
    assert ReplicaRequest.from_dict(json.loads(json.dumps(payload.to_dict()))) == payload  # journal round trip


def test_logprobs_fields_per_endpoint():
    assert completion(base_completion(logprobs=3)).sampling.logprobs == 3
    assert completion(base_completion(logprobs=0)).sampling.logprobs == 0
    assert completion(base_completion()).sampling.logprobs is None
    assert chat(base_chat(logprobs=True)).sampling.logprobs == 0
    assert chat(base_chat(logprobs=True, top_logprobs=20)).sampling.logprobs == 20
    assert chat(base_chat(logprobs=False, top_logprobs=0)).sampling.logprobs is None


@pytest.mark.parametrize(("patch", "param", "fragment"), [
    ({"presence_penalty": -2.5}, "presence_penalty", "[-2.0, 2.0]"),
    ({"repetition_penalty": -1}, "repetition_penalty", "(0.0, inf]"),
    ({"min_p": "0.1"}, "min_p", "a number"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"3": 500}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"99": 1, "250": 1}}, "logit_bias", "vocabulary"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens", "at most max_tokens"),
])
@pytest.mark.parametrize("parse", [completion, chat])
def test_bad_values_are_400_naming_the_field(parse, patch, param, fragment):
    with pytest.raises(APIError) as info:
        parse((base_chat if parse is chat else base_completion)(**patch))
    assert (info.value.status, info.value.param) == (400, param)
    assert fragment in info.value.message and param in info.value.message


TEXTS = {10: "hel", 11: "lo", 12: " wor", 13: "ld", 14: "é"}


def _entries() -> list[TokenLogprob]:
    return [TokenLogprob(10, -0.5, ((10, -0.5), (11, -1.5))), TokenLogprob(11, -2.0, ((12, -0.25), (11, -2.0))),
            TokenLogprob(14, float("-inf"), ((13, -0.1), (12, -3.0)))]


def test_completion_body_logprobs_format():
    req = completion(base_completion(logprobs=2))
    body = response_body(req, "hello", "stop", 3, 3, body_logprobs(req, TEXTS.__getitem__, _entries()))
    lp = Completion.model_validate(body).choices[0].logprobs
    assert lp.tokens == ["hel", "lo", "é"]
    assert lp.token_logprobs == [-0.5, -2.0, -9999.0]  # -inf is not JSON: clamped as vLLM does
    assert lp.text_offset == [0, 3, 5]
    assert lp.top_logprobs[1] == {"lo": -2.0, " wor": -0.25}  # the sampled token and the top ones
    assert list(lp.top_logprobs[2]) == ["é", "ld", " wor"]
    json.dumps(body, allow_nan=False)


def test_chat_body_logprobs_format():
    req = chat(base_chat(logprobs=True, top_logprobs=2))
    body = response_body(req, "hello", "length", 3, 3, body_logprobs(req, TEXTS.__getitem__, _entries()))
    content = ChatCompletion.model_validate(body).choices[0].logprobs.content
    assert [c.token for c in content] == ["hel", "lo", "é"]
    assert content[2].bytes == [0xC3, 0xA9] and content[2].logprob == -9999.0
    assert [(t.token, t.logprob) for t in content[1].top_logprobs] == [(" wor", -0.25), ("lo", -2.0)]
    assert body_logprobs(chat(base_chat()), TEXTS.__getitem__, _entries()) is None


def test_streamed_logprobs_follow_their_text():
    req = chat(base_chat(logprobs=True, top_logprobs=1, stream=True))
    enc = StreamEncoder(req, TEXTS.__getitem__)
    e = _entries()
    raw = enc.start() + enc.delta("hel", [e[0]]) + enc.delta("", [e[1]]) + enc.delta("lo", []) + enc.finish(
        "stop", 3, 3, "é", [e[2]])
    chunks = [ChatCompletionChunk.model_validate(x) for x in parse_sse(raw)[:-1]]
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    got = [[c.token for c in ch.choices[0].logprobs.content] for ch in chunks[1:]]
    assert got == [["hel"], ["lo"], ["é"]]  # the held-back token's entry rides with the next text
    assert all(len(c.top_logprobs) == 1 for ch in chunks[1:] for c in ch.choices[0].logprobs.content)

    req = completion(base_completion(logprobs=1, stream=True))
    enc = StreamEncoder(req, TEXTS.__getitem__)
    raw = enc.delta("hel", [e[0]]) + enc.delta("lo", [e[1]]) + enc.finish("stop", 3, 3, "é", [e[2]])
    parts = [CompletionChoice.model_construct(**x["choices"][0]).logprobs for x in parse_sse(raw)[:-1]]
    parts = [Logprobs.model_validate(p) for p in parts]
    assert [p.text_offset for p in parts] == [[0], [3], [5]]  # offsets run across chunks
    plain = StreamEncoder(completion(base_completion(stream=True)), TEXTS.__getitem__)
    assert json.loads(plain.delta("x", [e[0]])[6:])["choices"][0]["logprobs"] is None


# ---------------------------------------------------------------------------------------------
# The official client over a mock transport: the fields are sent and the logprobs parsed

_TOKENS = [10, 11, 12, 13]


def _fake_server(request: httpx.Request) -> httpx.Response:
    parse = parse_chat_request if request.url.path.endswith("/chat/completions") else parse_completion_request
    try:
        req = parse(request.content, request.headers, CONFIG, tokenizer=FakeTokenizer())
    except APIError as err:
        return httpx.Response(err.status, json=err.to_body(), headers=err.headers)
    n = req.sampling.logprobs or 0
    entries = [TokenLogprob(t, -0.1 * i, tuple((a, -0.2 * j) for j, a in enumerate(_TOKENS[:n])))
               for i, t in enumerate(_TOKENS)]
    if not req.stream:
        body = response_body(req, "hello world", "stop", 4, 4, body_logprobs(req, TEXTS.__getitem__, entries))
        body["echo_sampling"] = req.sampling.to_dict()
        return httpx.Response(200, json=body)
    enc = StreamEncoder(req, TEXTS.__getitem__)
    raw = enc.start()
    for entry in entries[:-1]:
        raw += enc.delta(TEXTS[entry.token_id], [entry])
    raw += enc.finish("stop", 4, 4, TEXTS[entries[-1].token_id], [entries[-1]])
    return httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"})


@pytest.fixture()
def client() -> openai.OpenAI:
    http = httpx.Client(transport=httpx.MockTransport(_fake_server))
    return openai.OpenAI(base_url="http://router.test/v1", api_key="none", http_client=http, max_retries=0)


def test_openai_client_sends_the_fields_and_reads_logprobs(client):
    msgs = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model=MODEL, messages=msgs, logprobs=True, top_logprobs=2,
                                           presence_penalty=1.0, frequency_penalty=0.5, logit_bias={"3": 2},
                                           extra_body={"min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1})
    sent: dict[str, Any] = reply.model_extra["echo_sampling"]
    assert (sent["presence_penalty"], sent["frequency_penalty"], sent["logit_bias"]) == (1.0, 0.5, {"3": 2.0})
    assert (sent["min_p"], sent["repetition_penalty"], sent["min_tokens"], sent["logprobs"]) == (0.1, 1.1, 1, 2)
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == ["hel", "lo", " wor", "ld"]
    assert all(len(c.top_logprobs) == 2 for c in content)
    out = client.completions.create(model=MODEL, prompt="abc", logprobs=3)
    assert out.choices[0].logprobs.tokens == ["hel", "lo", " wor", "ld"]
    assert out.choices[0].logprobs.text_offset == [0, 3, 5, 9]
    streamed = [c for c in client.chat.completions.create(model=MODEL, messages=msgs, stream=True, logprobs=True)
                if c.choices and c.choices[0].logprobs]
    assert [t.token for c in streamed for t in c.choices[0].logprobs.content] == ["hel", "lo", " wor", "ld"]
    chunks = list(client.completions.create(model=MODEL, prompt="abc", stream=True, logprobs=1))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == ["hel", "lo", " wor", "ld"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=msgs, presence_penalty=3)
    assert bad.value.param == "presence_penalty"
    assert SamplingParams.from_dict(sent) == SamplingParams.from_dict(sent)
