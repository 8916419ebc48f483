"""``n`` > 1 and completions' ``echo`` through the HTTP ingress in process (FastAPI routes over an ASGI
transport, a stand-in replica handle around a real native engine on a tiny checkpoint) with the
official ``openai`` client, streaming and not: choices and their indexes, usage (prompt once,
completion tokens summed), seeded choices equal to separate requests with seed + i, echoed prompt
text and prompt log probabilities equal to a direct torch forward's log-softmax."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import httpx2 as httpx
import openai
import pytest
import torch
from fastapi import FastAPI

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig
from replicas.scheduler.cost_model import CostModel
from router.ingress import RouterIngress
from tests.test_ingress_openai_fields import MODEL, FakeHandle

Scenario = Callable[[openai.AsyncOpenAI, RouterIngress, ReplicaEngine], Awaitable[None]]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", seed=11, num_layers=2, hidden_size=64)


def _run(model_dir, scenario: Scenario, **settings: object) -> None:
    settings = {"kv_cache_bytes": 8 << 20, "block_size": 8, **settings}
    engine = ReplicaEngine(EngineConfig(model=str(model_dir), **settings),
                           cost_model=CostModel.from_coefficients(1e-3, 2e-5, max_profiled_tokens=8192))
    engine.start()

    async def main() -> None:
        ingress = RouterIngress.__new__(RouterIngress)
        await ingress.__init__(FakeHandle(engine), MODEL, model_dir=str(model_dir))
        app = FastAPI()
        app.post("/v1/completions")(ingress.completions)
        app.post("/v1/chat/completions")(ingress.chat_completions)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.test") as http:
            client = openai.AsyncOpenAI(base_url="http://router.test/v1", api_key="none", http_client=http,
                                        max_retries=0)
            await scenario(client, ingress, engine)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


MSGS = [{"role": "user", "content": "Tell me a story"}]
PROMPT = "Once upon a time there"
IGNORE_EOS = {"ignore_eos": True}


def test_n_completions_greedy_choices_equal_one_answer_and_usage_counts_the_prompt_once(model_dir):
    async def scenario(client: openai.AsyncOpenAI, ingress: RouterIngress, engine: ReplicaEngine) -> None:
        one = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                              extra_body=IGNORE_EOS)
        before = engine.stats().counters["prefill_tokens"]
        three = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, n=3,
                                                extra_body=IGNORE_EOS)
        assert engine.stats().counters["prefill_tokens"] - before == one.usage.prompt_tokens
        assert [c.index for c in three.choices] == [0, 1, 2]
        assert [c.text for c in three.choices] == [one.choices[0].text] * 3
        assert (three.usage.prompt_tokens, three.usage.completion_tokens) == (one.usage.prompt_tokens, 18)
        chunks = [c async for c in await client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, n=3, stream=True,
            stream_options={"include_usage": True}, extra_body=IGNORE_EOS)]
        texts = ["", "", ""]
        reasons: dict[int, str] = {}
        for chunk in chunks:
            for c in chunk.choices:
                texts[c.index] += c.text
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
        assert texts == [one.choices[0].text] * 3 and reasons == {0: "length", 1: "length", 2: "length"}
        assert chunks[-1].usage.completion_tokens == 18 and chunks[-1].usage.prompt_tokens == one.usage.prompt_tokens

    _run(model_dir, scenario, enable_prefix_caching=False)


def test_n_chat_seeded_choices_are_the_requests_with_seed_plus_i_streaming_and_not(model_dir):
    async def scenario(client: openai.AsyncOpenAI, ingress: RouterIngress, engine: ReplicaEngine) -> None:
        kwargs = {"model": MODEL, "messages": MSGS, "max_tokens": 8, "temperature": 1.0}
        separate = [(await client.chat.completions.create(seed=100 + i, **kwargs)).choices[0].message.content
                    for i in range(3)]
        assert len(set(separate)) > 1
        reply = await client.chat.completions.create(seed=100, n=3, logprobs=True, **kwargs)
        assert [c.message.content for c in reply.choices] == separate
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
        stream = await client.chat.completions.create(seed=100, n=3, stream=True, **kwargs)
        texts, roles = ["", "", ""], set()
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                if c.delta.role:
                    roles.add(c.index)
        assert texts == separate and roles == {0, 1, 2}

    _run(model_dir, scenario, enable_prefix_caching=False)


def test_bad_n_and_best_of_name_the_field_and_the_next_request_succeeds(model_dir):
    async def scenario(client: openai.AsyncOpenAI, ingress: RouterIngress, engine: ReplicaEngine) -> None:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=MODEL, prompt=PROMPT, n=129)
        assert bad.value.param == "n"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=MODEL, prompt=PROMPT, n=3, best_of=2)
        assert bad.value.param == "best_of"
        with pytest.raises(openai.UnprocessableEntityError) as unsupported:
            await client.completions.create(model=MODEL, prompt=PROMPT, n=2, best_of=3)
        assert unsupported.value.param == "best_of"
        ok = await client.completions.create(model=MODEL, prompt=PROMPT, n=2, best_of=2, max_tokens=2)
        assert len(ok.choices) == 2

    _run(model_dir, scenario)


def _reference_prompt_logprobs(model_dir, ids: list[int], k: int) -> list[tuple[float, dict[int, float]]]:
    """Per prompt token after the first: its log-softmax under transformers' forward of the checkpoint,
    and the k most likely tokens at that position."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=1)
    out = []
    for pos in range(1, len(ids)):
        row = logp[pos - 1]
        values, top = row.topk(k)
        out.append((float(row[ids[pos]]), dict(zip(top.tolist(), values.tolist()))))
    return out


def test_echo_with_logprobs_gives_the_prompt_and_its_logprobs_from_a_torch_forward(model_dir):
    async def scenario(client: openai.AsyncOpenAI, ingress: RouterIngress, engine: ReplicaEngine) -> None:
        ids = ingress.tokenizer.encode(PROMPT, add_special_tokens=True)
        want = _reference_prompt_logprobs(model_dir, ids, 2)
        plain = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                                logprobs=2, extra_body=IGNORE_EOS)
        out = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                              echo=True, extra_body=IGNORE_EOS)
        choice = out.choices[0]
        assert choice.text == PROMPT + plain.choices[0].text
        lp = choice.logprobs
        assert lp.tokens == [ingress.token_text(t) for t in ids] + plain.choices[0].logprobs.tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for pos, ((value, top), got, got_top) in enumerate(zip(want, lp.token_logprobs[1:], lp.top_logprobs[1:]), 1):
            assert got == pytest.approx(value, abs=1e-4)
            assert got_top[lp.tokens[pos]] == pytest.approx(value, abs=1e-4)  # the prompt token is listed too
            for t, v in top.items():
                assert got_top[ingress.token_text(t)] == pytest.approx(v, abs=1e-4)
        assert lp.token_logprobs[len(ids):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 4
        chunks = [c async for c in await client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True, stream=True, n=2,
            extra_body=IGNORE_EOS)]
        for index in (0, 1):
            mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
            assert "".join(c.text for c in mine) == choice.text
            tokens = [t for c in mine if c.logprobs for t in c.logprobs.tokens]
            values = [v for c in mine if c.logprobs for v in c.logprobs.token_logprobs]
            assert tokens == lp.tokens and values[0] is None
            assert values[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
        echo_only = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True)
        assert echo_only.choices[0].text.startswith(PROMPT) and echo_only.choices[0].logprobs is None

    _run(model_dir, scenario)


def test_vllms_prompt_logprobs_field_with_ranks_on_both_endpoints(model_dir):
    async def scenario(client: openai.AsyncOpenAI, ingress: RouterIngress, engine: ReplicaEngine) -> None:
        ids = ingress.tokenizer.encode(PROMPT, add_special_tokens=True)
        transformers = pytest.importorskip("transformers")
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), dim=1)
        out = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=2,
                                              extra_body={"prompt_logprobs": 2})
        scored = out.choices[0].model_extra["prompt_logprobs"]
        assert out.choices[1].model_extra["prompt_logprobs"] == scored and out.choices[0].logprobs is None
        assert len(scored) == len(ids) and scored[0] is None
        for pos in range(1, len(ids)):
            row = logp[pos - 1]
            mine = scored[pos][str(ids[pos])]
            assert mine["logprob"] == pytest.approx(float(row[ids[pos]]), abs=1e-4)
            assert mine["rank"] == int((row > row[ids[pos]]).sum()) + 1
            assert mine["decoded_token"] == ingress.token_text(ids[pos])
            top = row.topk(2).indices.tolist()
            assert {str(t) for t in top} <= set(scored[pos]) and len(scored[pos]) <= 3
        chat_ids = ingress.tokenizer.encode_chat(MSGS)
        reply = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2,
                                                     extra_body={"prompt_logprobs": 0})
        chat_scored = reply.model_extra["prompt_logprobs"]
        assert len(chat_scored) == len(chat_ids) and chat_scored[0] is None
        assert all(list(item) == [str(t)] for item, t in zip(chat_scored[1:], chat_ids[1:]))
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"prompt_logprobs": 21})
        assert bad.value.param == "prompt_logprobs"

    _run(model_dir, scenario)


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_response_format_json_schema_and_json_object_streaming_and_not(model_dir):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    async def scenario(client: openai.AsyncOpenAI, ingress: RouterIngress, engine: ReplicaEngine) -> None:
        reply = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=80, temperature=1.0,
                                                     seed=1, n=20, response_format=fmt)
        assert len(reply.choices) == 20 and {c.finish_reason for c in reply.choices} == {"stop"}
        for c in reply.choices:
            jsonschema.validate(json.loads(c.message.content), PERSON)
        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=80, temperature=1.0,
                                                      seed=1, response_format=fmt, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert streamed == reply.choices[0].message.content
        out = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=80, temperature=0,
                                              extra_body={"response_format": {"type": "json_object"}})
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(out.choices[0].text), dict)
        else:
            assert out.choices[0].text.startswith("{")
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model=MODEL, messages=MSGS, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
        assert bad.value.param == "response_format.json_schema.schema"
        ok = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length")

    _run(model_dir, scenario)
