"""The HTTP ingress in process, end to end: :class:`router.ingress.RouterIngress`'s FastAPI routes over
an ASGI transport (no port is bound, no Ray), a stand-in replica handle around a real native engine
on a tiny checkpoint, and the official ``openai`` client sending the sampling fields and reading
logprobs, streaming and not; ``/tokenize``, ``/detokenize`` and ``/v1/models`` too."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import httpx2 as httpx
import openai
import pytest
from fastapi import FastAPI

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig
from replicas.replica_request import ReplicaRequest
from replicas.scheduler.cost_model import CostModel
from router.ingress import RouterIngress

MODEL = "tiny-model"


class _Stream:
    """What ``handle.options(stream=True).generate.remote(payload)`` returns: an async iterator of the
    replica's output dicts, with ``cancel()``."""

    def __init__(self, engine: ReplicaEngine, payload: ReplicaRequest) -> None:
        self._gen = engine.generate(payload.to_engine_request(), payload.sampling)

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        out = await self._gen.__anext__()
        return {**asdict(out), "replica_id": "replica-0"}

    def cancel(self) -> None:
        asyncio.ensure_future(self._gen.aclose())


class _Remote:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.remote = fn


class FakeHandle:
    """The replica deployment's handle, as far as the ingress uses it."""

    def __init__(self, engine: ReplicaEngine) -> None:
        self.engine = engine

        async def info() -> dict[str, Any]:
            return {"model": MODEL, "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
                    "prefix": None}

        self.tokenizer_info = _Remote(info)
        self.generate = _Remote(lambda payload: _Stream(engine, payload))

    def options(self, **_: Any) -> FakeHandle:
        return self


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", seed=7, num_layers=2, hidden_size=64)


Scenario = Callable[[openai.AsyncOpenAI, httpx.AsyncClient, RouterIngress], Awaitable[None]]


def _run(model_dir, scenario: Scenario) -> None:
    engine = ReplicaEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=8 << 20),
                           cost_model=CostModel.from_coefficients(1e-3, 2e-5, max_profiled_tokens=8192))
    engine.start()

    async def main() -> None:
        ingress = RouterIngress.__new__(RouterIngress)
        await ingress.__init__(FakeHandle(engine), MODEL, model_dir=str(model_dir))
        app = FastAPI()
        app.post("/v1/completions")(ingress.completions)
        app.post("/v1/chat/completions")(ingress.chat_completions)
        app.post("/tokenize")(ingress.tokenize)
        app.post("/detokenize")(ingress.detokenize)
        app.get("/v1/models")(ingress.models)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.test") as http:
            client = openai.AsyncOpenAI(base_url="http://router.test/v1", api_key="none", http_client=http,
                                        max_retries=0)
            await scenario(client, http, ingress)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


MSGS = [{"role": "user", "content": "Say something"}]
GREEDY = {"temperature": 0.0, "max_tokens": 6}


def test_chat_logprobs_streaming_and_not(model_dir):
    async def scenario(client: openai.AsyncOpenAI, http: httpx.AsyncClient, ingress: RouterIngress) -> None:
        reply = await client.chat.completions.create(model=MODEL, messages=MSGS, logprobs=True, top_logprobs=3,
                                                     extra_body={"ignore_eos": True}, **GREEDY)
        content = reply.choices[0].logprobs.content
        assert len(content) == reply.usage.completion_tokens == 6
        for item in content:
            assert len(item.top_logprobs) == 3 and item.bytes == list(item.token.encode("utf-8"))
            values = [t.logprob for t in item.top_logprobs]
            assert values == sorted(values, reverse=True)
            assert item.logprob == pytest.approx(values[0])  # greedy, unpenalised: the argmax
        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, logprobs=True, stream=True,
                                                      extra_body={"ignore_eos": True}, **GREEDY)
        streamed = [t async for c in stream if c.choices and c.choices[0].logprobs
                    for t in c.choices[0].logprobs.content]
        assert [(t.token, t.logprob) for t in streamed] == [(t.token, pytest.approx(t.logprob)) for t in content]
        assert all(t.top_logprobs == [] for t in streamed)
        plain = await client.chat.completions.create(model=MODEL, messages=MSGS, **GREEDY)
        assert plain.choices[0].logprobs is None

    _run(model_dir, scenario)


def test_completion_logprobs_and_sampling_fields_reach_the_engine(model_dir):
    async def scenario(client: openai.AsyncOpenAI, http: httpx.AsyncClient, ingress: RouterIngress) -> None:
        forced = ingress.tokenizer.encode("a")[0]
        out = await client.completions.create(model=MODEL, prompt="hello there", logprobs=2,
                                              logit_bias={str(forced): 100}, presence_penalty=1.5,
                                              frequency_penalty=0.5,
                                              extra_body={"repetition_penalty": 1.2, "min_p": 0.05,
                                                          "ignore_eos": True}, **GREEDY)
        lp = out.choices[0].logprobs
        assert lp.tokens == [ingress.token_text(forced)] * 6  # the bias beats every penalty
        assert lp.text_offset == [i * len(lp.tokens[0]) for i in range(6)]
        assert all(len(top) <= 3 for top in lp.top_logprobs) and len(lp.token_logprobs) == 6
        chunks = [c async for c in await client.completions.create(
            model=MODEL, prompt="hello there", logprobs=1, stream=True, logit_bias={str(forced): 100},
            extra_body={"ignore_eos": True}, **GREEDY)]
        tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        assert tokens == lp.tokens
        eos = ingress.tokenizer.eos_token_ids[0]
        early = await client.completions.create(model=MODEL, prompt="hi", logit_bias={str(eos): 100},
                                                extra_body={"min_tokens": 3}, **GREEDY)
        assert early.usage.completion_tokens == 4 and early.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=MODEL, prompt="hi", logit_bias={"999999": 1})
        assert bad.value.param == "logit_bias"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model=MODEL, messages=MSGS, top_logprobs=2)
        assert bad.value.param == "top_logprobs"

    _run(model_dir, scenario)


def test_tokenize_detokenize_and_models(model_dir):
    async def scenario(client: openai.AsyncOpenAI, http: httpx.AsyncClient, ingress: RouterIngress) -> None:
        tok = (await http.post("/tokenize", json={"model": MODEL, "prompt": "hello world"})).json()
        assert tok["tokens"] == ingress.tokenizer.encode("hello world", add_special_tokens=True)
        assert tok["max_model_len"] == ingress.protocol.max_model_len and tok["count"] == len(tok["tokens"])
        chat = (await http.post("/tokenize", json={"model": MODEL, "messages": MSGS})).json()
        assert chat["tokens"] == ingress.tokenizer.encode_chat(MSGS)
        text = (await http.post("/detokenize", json={"model": MODEL, "tokens": tok["tokens"]})).json()
        assert "hello world" in text["prompt"]
        bad = await http.post("/detokenize", json={"tokens": [-1]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        models = await client.models.list()
        card = models.data[0]
        assert card.id == MODEL and card.created == ingress.created > 1_700_000_000
        assert card.model_extra["max_model_len"] == ingress.protocol.max_model_len

    _run(model_dir, scenario)


def test_vllm_extras_through_the_client(model_dir):
    """vLLM's fields that work change the output as in vLLM; one held at its default is a 422 that says why."""

    async def scenario(client: openai.AsyncOpenAI, http: httpx.AsyncClient, ingress: RouterIngress) -> None:
        forced = ingress.tokenizer.encode("a")[0]
        stop = ingress.token_text(forced)
        common = {"model": MODEL, "prompt": "hello there", "logit_bias": {str(forced): 100}, **GREEDY}
        cut = await client.completions.create(stop=[stop], **common)
        kept = await client.completions.create(stop=[stop], extra_body={"include_stop_str_in_output": True},
                                               **common)
        assert (cut.choices[0].text, kept.choices[0].text) == ("", stop)
        assert kept.choices[0].finish_reason == cut.choices[0].finish_reason == "stop"
        streamed = [c.choices[0].text async for c in await client.completions.create(
            stop=[stop], stream=True, extra_body={"include_stop_str_in_output": True}, **common)]
        assert "".join(streamed) == stop
        eos = ingress.tokenizer.eos_token_ids[0]
        eos_text = ingress.tokenizer.decode([eos], skip_special_tokens=False)
        shown = await client.completions.create(
            model=MODEL, prompt="hi", logit_bias={str(eos): 100}, **GREEDY,
            extra_body={"ignore_eos": True, "skip_special_tokens": False})
        hidden = await client.completions.create(model=MODEL, prompt="hi", logit_bias={str(eos): 100}, **GREEDY,
                                                 extra_body={"ignore_eos": True})
        assert eos_text and (shown.choices[0].text, hidden.choices[0].text) == (eos_text * 6, "")
        allowed = [ingress.tokenizer.encode(w)[0] for w in ("b", "c")]
        only = await client.completions.create(model=MODEL, prompt="hi", logprobs=0, **GREEDY,
                                               extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
        assert set(only.choices[0].logprobs.tokens) <= {ingress.token_text(t) for t in allowed}
        bare = await client.completions.create(model=MODEL, prompt="hi", **GREEDY,
                                               extra_body={"add_special_tokens": False})
        assert bare.usage.prompt_tokens == len(ingress.tokenizer.encode("hi", add_special_tokens=False))
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            await client.chat.completions.create(model=MODEL, messages=MSGS, extra_body={"use_beam_search": True})
        assert refused.value.param == "use_beam_search" and "beam search is not implemented" in refused.value.message
        ok = await client.chat.completions.create(model=MODEL, messages=MSGS, **GREEDY,
                                                  extra_body={"use_beam_search": False, "length_penalty": 1.0})
        assert ok.choices[0].message.role == "assistant"

    _run(model_dir, scenario)
