"""``/tokenize``, ``/detokenize`` and ``/v1/models`` (router/tokenize_api.py) on a tiny checkpoint's tokenizer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from replicas.model.tokenizer import Tokenizer
from router.api_errors import APIError
from router.protocol import ProtocolConfig, parse_chat_request
from router.tokenize_api import detokenize, models_list, tokenize

MODEL = "tiny"


@pytest.fixture(scope="module")
def tok(tiny_checkpoint_factory) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoint_factory("llama", seed=3))


@pytest.fixture(scope="module")
def config(tok) -> ProtocolConfig:
    return ProtocolConfig((MODEL,), max_model_len=2048, vocab_size=tok.vocab_size)


def _call(fn: Any, body: dict[str, Any], config: ProtocolConfig, tok: Tokenizer) -> dict[str, Any]:
    return fn(json.dumps(body).encode(), config, tok)


def test_tokenize_a_prompt(tok, config):
    out = _call(tokenize, {"model": MODEL, "prompt": "hello world"}, config, tok)
    assert out["tokens"] == tok.encode("hello world", add_special_tokens=True)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 2048 and out["token_strs"] is None
    bare = _call(tokenize, {"prompt": "hello world", "add_special_tokens": False, "return_token_strs": True},
                 config, tok)
    assert bare["tokens"] == tok.encode("hello world")
    assert bare["token_strs"] == [tok.id_to_token(t) for t in bare["tokens"]]


def test_tokenize_messages_matches_what_chat_requests_send(tok, config):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = _call(tokenize, {"model": MODEL, "messages": msgs}, config, tok)
    req = parse_chat_request(json.dumps({"model": MODEL, "messages": msgs}).encode(), {}, config, tokenizer=tok)
    assert tuple(out["tokens"]) == req.prompt_token_ids and out["count"] == len(out["tokens"])
    no_prompt = _call(tokenize, {"messages": msgs, "add_generation_prompt": False}, config, tok)
    assert no_prompt["tokens"] == tok.encode(tok.apply_chat_template(msgs, False))


def test_detokenize_round_trip(tok, config):
    ids = tok.encode("the quick brown fox")
    assert _call(detokenize, {"model": MODEL, "tokens": ids}, config, tok) == {"prompt": "the quick brown fox"}
    assert _call(detokenize, {"tokens": []}, config, tok) == {"prompt": ""}


@pytest.mark.parametrize(("fn", "body", "status", "param"), [
    (tokenize, {}, 400, "prompt"),
    (tokenize, {"prompt": 5}, 400, "prompt"),
    (tokenize, {"prompt": "x", "messages": []}, 400, "prompt"),
    (tokenize, {"messages": "hi"}, 400, "messages"),
    (tokenize, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (tokenize, {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    (tokenize, {"prompt": "x", "add_generation_prompt": True}, 400, "add_generation_prompt"),
    (tokenize, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    (tokenize, {"prompt": "x", "temperature": 1}, 400, "temperature"),
    (detokenize, {}, 400, "tokens"),
    (detokenize, {"tokens": "abc"}, 400, "tokens"),
    (detokenize, {"tokens": [1, -2]}, 400, "tokens"),
    (detokenize, {"tokens": [1, 10**9]}, 400, "tokens"),
    (detokenize, {"tokens": [1.5]}, 400, "tokens"),
    (detokenize, {"tokens": [1], "model": "nope"}, 404, "model"),
])
def test_bad_input_names_the_field(tok, config, fn, body, status, param):
    with pytest.raises(APIError) as info:
        _call(fn, body, config, tok)
    assert (info.value.status, info.value.param) == (status, param)
    with pytest.raises(APIError) as raw:
        fn(b"[1]", config, tok)
    assert raw.value.param == "body"


def test_models_list_has_creation_time_and_context_length(config):
    from openai.types import Model

    out = models_list(config, created=1_764_700_000)
    card = out["data"][0]
    assert out["object"] == "list" and card["id"] == MODEL and card["max_model_len"] == 2048
    assert Model.model_validate(card).created == 1_764_700_000
