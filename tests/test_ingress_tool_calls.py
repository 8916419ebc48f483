"""Tool calls through the HTTP ingress in process (FastAPI routes over an ASGI transport, a stand-in
replica handle around a real native engine) with the official ``openai`` client, streaming and not:
a named or ``required`` tool choice gives a parsed call whose arguments validate against the
tool's schema, even from a tiny random-weight model (the grammar forces it); the call and a
``tool`` message go back and a final answer comes; bad tools are 400s naming the field and the next
request succeeds. The slow test does the same on SmolLM2 with ``auto``."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from replicas.engine import ReplicaEngine
from router.ingress import RouterIngress
from tests.test_ingress_n_echo import _run
from tests.test_ingress_openai_fields import MODEL

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a UTC offset",
    "parameters": {"type": "object", "properties": {"offset": {"type": "integer", "minimum": -12, "maximum": 14}},
                   "required": ["offset"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSGS: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", seed=13, num_layers=2, hidden_size=64)


def _valid(name: str, arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


async def _streamed_calls(stream: Any) -> tuple[list[dict[str, str]], str, str | None]:
    """A stream's calls (accumulated by index as OpenAI documents), its content and finish reason."""
    calls: dict[int, dict[str, str]] = {}
    content, reason = "", None
    async for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or ():
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += d.id or ""
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        reason = choice.finish_reason or reason
    return [calls[i] for i in sorted(calls)], content, reason


def test_forced_calls_round_trip_streaming_and_not(model_dir):
    async def scenario(client: openai.AsyncOpenAI, ingress: RouterIngress, engine: ReplicaEngine) -> None:
        sampling = {"max_tokens": 200, "temperature": 1.0, "seed": 5}
        reply = await client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice=NAMED,
                                                     **sampling)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        _valid(call.function.name, call.function.arguments)

        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice=NAMED,
                                                      stream=True, **sampling)
        calls, content, reason = await _streamed_calls(stream)
        assert reason == "tool_calls" and content == ""  # no markup in delta.content
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]  # seeded

        # the call and its result go back; the model answers (the tiny model writes only newlines here, so a
        # logit bias makes it write a word: auto parses text without calls as content)
        history = [*MSGS, choice.message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
        answer = {"max_tokens": 8, "temperature": 0, "logit_bias": {str(ingress.tokenizer.encode("sun")[0]): 100},
                  "extra_body": {"ignore_eos": True}}
        final = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, **answer)
        assert final.choices[0].finish_reason == "length" and final.choices[0].message.tool_calls is None
        word = ingress.tokenizer.decode(ingress.tokenizer.encode("sun")[:1])
        assert final.choices[0].message.content == (word * 8).strip()
        assert final.usage.prompt_tokens > reply.usage.prompt_tokens  # the call and its result are in the prompt
        streamed = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, stream=True,
                                                        **answer)
        calls, content, reason = await _streamed_calls(streamed)
        assert (calls, content, reason) == ([], final.choices[0].message.content, "length")

    _run(model_dir, scenario)


def test_required_gives_valid_calls_for_every_choice_and_none_gives_none(model_dir):
    async def scenario(client: openai.AsyncOpenAI, ingress: RouterIngress, engine: ReplicaEngine) -> None:
        reply = await client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required",
                                                     max_tokens=600, temperature=1.0, seed=2, n=4)
        for choice in reply.choices:  # a call cut by max_tokens would stay content: every parsed one is whole
            assert choice.message.tool_calls and choice.finish_reason in ("tool_calls", "length")
            for call in choice.message.tool_calls:
                _valid(call.function.name, call.function.arguments)
        assert len({c.message.tool_calls[0].function.arguments for c in reply.choices}) > 1  # sampled, not fixed
        single = await client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required",
                                                      parallel_tool_calls=False, max_tokens=200, temperature=1.0,
                                                      seed=9, stream=True)
        calls, content, reason = await _streamed_calls(single)
        assert reason == "tool_calls" and content == "" and len(calls) == 1
        _valid(calls[0]["name"], calls[0]["arguments"])
        none = await client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="none",
                                                    max_tokens=6, temperature=0)
        assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
        assert none.usage.prompt_tokens < reply.usage.prompt_tokens  # tools left out of the prompt

    _run(model_dir, scenario)


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "18"}]}, "messages[0].tool_call_id"),
]


def test_bad_tool_fields_are_400_naming_the_field_and_the_next_request_succeeds(model_dir):
    async def scenario(client: openai.AsyncOpenAI, ingress: RouterIngress, engine: ReplicaEngine) -> None:
        for patch, param in BAD:
            body = {"messages": MSGS, **patch}
            messages = body.pop("messages")
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body=body)
            assert bad.value.status_code == 400 and bad.value.param == param
            ok = await client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice=NAMED,
                                                      max_tokens=200, stream=True)
            assert (await _streamed_calls(ok))[2] == "tool_calls"

    _run(model_dir, scenario)


@pytest.mark.slow
def test_smollm2_calls_a_tool_and_answers_with_its_result(default_model_dir):
    async def scenario(client: openai.AsyncOpenAI, ingress: RouterIngress, engine: ReplicaEngine) -> None:
        reply = await client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required",
                                                     max_tokens=80, temperature=0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        args = _valid(call.function.name, call.function.arguments)
        history = [*MSGS, choice.message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"args": args, "result": "sunny"})}]
        final = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=40,
                                                     temperature=0)
        message = final.choices[0].message
        assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert message.content or message.tool_calls  # an answer (auto: text, or another valid call)
        for c in message.tool_calls or ():
            _valid(c.function.name, c.function.arguments)

    _run(default_model_dir, scenario, kv_cache_bytes=128 << 20)  # SmolLM2's KV: ~46 KB a token in float32
