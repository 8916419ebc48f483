"""Tool calls without a server: ``tools`` / ``tool_choice`` validation (400s naming the field), the
reply parser (several calls, malformed blocks kept as content, streaming split at every offset
equal to the whole-reply parse), the prompt (tools rendered into the system message for a
template that ignores them; passed to a template that reads them, as transformers does), the
forcing grammar (llguidance accepts exactly valid calls), and the response bodies and chunks as
the official client's models read them."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from replicas.model.tokenizer import Tokenizer
from replicas.tool_grammar import tool_call_grammar
from replicas.vllm_fields import sampling_fields
from router.api_errors import APIError
from router.api_model import validate_body
from router.chat_models import ToolFields
from router.protocol import ProtocolConfig
from router.responses import StreamEncoder, response_body
from router.tool_calls import ToolsRequest, parse_tools
from router.tool_parser import ToolCall, ToolCallStream, parse_reply
from router.tool_prompt import TOOLS_PREAMBLE, encode_chat_request, prompt_inputs
from tests.test_protocol import MODEL, base_chat, chat, parse_sse

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
LONG = ProtocolConfig((MODEL,), max_model_len=4096)  # room for a real tokenizer's prompt with tools


def tools_of(**fields: Any) -> ToolsRequest | None:
    return parse_tools(validate_body(ToolFields, {"tools": TOOLS, **fields}))


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("patch", "param"), [
    ({"tools": [{"type": "code", "function": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": ""}}]}, "tools[1].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),  # duplicate
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "x", "extra": 1}}]}, "tools[0].function.extra"),
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tools": TOOLS, "tool_choice": {"type": "other", "function": {"name": "get_time"}}}, "tool_choice.type"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                          "function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool", "tool_call_id": "c"}]}, "messages[0].content"),
])
def test_bad_tools_and_choices_are_400_naming_the_field(patch, param):
    with pytest.raises(APIError) as info:
        chat(base_chat(**patch))
    assert (info.value.status, info.value.param) == (400, param), info.value.message


def test_choices_and_what_they_force():
    assert tools_of().mode == "auto" and tools_of().grammar() is None and tools_of().parses
    none = tools_of(tool_choice="none")
    assert not none.parses and none.prompt_tools() is None
    assert parse_tools(validate_body(ToolFields, {"tool_choice": "auto"})) is None
    named = tools_of(tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert (named.mode, named.named) == ("named", "get_time") and '"get_weather"' not in named.grammar()
    required = tools_of(tool_choice="required")
    assert '"get_weather"' in required.grammar() and '"get_time"' in required.grammar()
    assert "{0,7}" in required.grammar() and "{0," not in tools_of(tool_choice="required",
                                                                  parallel_tool_calls=False).grammar()
    req = chat(base_chat(tools=TOOLS, tool_choice="required"))
    assert req.sampling.grammar == required.grammar() and req.sampling.json_schema is None
    assert sampling_fields(req.sampling)["structured_outputs"] == {"grammar": req.sampling.grammar}  # vLLM
    assert chat(base_chat(tools=TOOLS)).sampling.grammar is None
    assert tools_of(tools=[{"type": "function", "function": {"name": "ping"}}]).functions[0].parameters == {
        "type": "object", "properties": {}}


# ------------------------------------------------------------------------------------- the parser
CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
CALL_B = '<tool_call>\n{"name":"get_time","arguments":"{\\"zone\\": 2}"}\n</tool_call>'


def _calls(calls: list[ToolCall]) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_parser_reads_several_calls_and_the_text_around_them():
    content, calls = parse_reply(f"Let me check.\n{CALL_A}\n{CALL_B}\n", tools_of())
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"zone": 2})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert parse_reply(f"{CALL_A}\n{CALL_B}", tools_of()) [0] is None
    content, calls = parse_reply(f"{CALL_A}{CALL_B}", tools_of(parallel_tool_calls=False))
    assert content is None and _calls(calls) == [("get_weather", {"city": "Paris", "unit": "c"})]
    assert parse_reply("just words", tools_of()) == ("just words", [])


@pytest.mark.parametrize("bad", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',  # malformed JSON
    '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # not one of the tools
    '<tool_call>\n["get_weather"]\n</tool_call>',
    '<tool_call>\n{"name": "get_time", "arguments": [2]}\n</tool_call>',
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}',  # never closed
])
def test_malformed_blocks_stay_content_and_do_not_stop_later_calls(bad):
    content, calls = parse_reply(f"{bad} then {CALL_B}", tools_of())
    if bad.endswith("</tool_call>"):
        assert content == f"{bad} then" and _calls(calls) == [("get_time", {"zone": 2})]
    else:  # an unclosed block swallows the rest of the reply, which stays text
        assert content == f"{bad} then {CALL_B}" and calls == []


@pytest.mark.parametrize("text", [
    f"Let me check.\n{CALL_A}\n{CALL_B}\n", f"  {CALL_A} and <tool_ then <tool_call> {CALL_B}  ",
    "plain <tool text < with a lone < and no calls\n\n", f"{CALL_A}", f"a\n{CALL_A}\nb \n{CALL_B}\n c",
])
def test_streaming_split_anywhere_equals_the_whole_reply(text):
    tools = tools_of()
    whole_content, whole_calls = parse_reply(text, tools)
    for cut in [1, 2, 3, 5, 7]:
        stream = ToolCallStream(tools)
        events = []
        for i in range(0, len(text), cut):
            events += stream.feed(text[i:i + cut])
        events += stream.finish()
        content = "".join(e for e in events if isinstance(e, str))
        assert (content or None) == whole_content
        assert _calls([e for e in events if isinstance(e, ToolCall)]) == _calls(whole_calls)
        assert all("<tool_call>" not in e for e in events if isinstance(e, str)) or "then <tool_call>" in text


# ------------------------------------------------------------------------------------- the prompt
def _tokenizer(tiny_checkpoint_factory, template: str | None = None) -> Tokenizer:
    tok = Tokenizer.from_dir(tiny_checkpoint_factory("llama", seed=5, num_layers=1, hidden_size=32))
    if template is not None:
        tok = Tokenizer(tok._tok, chat_template=template, eos_token="<|im_end|>")
    return tok


CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_x", "content": "?"},
]


def test_a_template_that_ignores_tools_gets_them_in_the_system_message(tiny_checkpoint_factory):
    tok = _tokenizer(tiny_checkpoint_factory)
    assert not tok.template_uses_tools
    req = chat(base_chat(messages=CONVERSATION, tools=TOOLS), tokenizer=tok, config=LONG)
    text = tok.decode(req.prompt_token_ids, skip_special_tokens=False)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n" + TOOLS_PREAMBLE + "\n<tools>\n")
    assert json.dumps(WEATHER) in system and json.dumps(CLOCK) in system and "</tools>" in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>') in text
    assert ('<|im_start|>user\n<tool_response>\n{"name": "get_weather", "content": "18 C"}\n</tool_response>\n'
            '<tool_response>\n{"content": "?"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n') in text
    none = chat(base_chat(messages=CONVERSATION, tools=TOOLS, tool_choice="none"), tokenizer=tok, config=LONG)
    assert TOOLS_PREAMBLE not in tok.decode(none.prompt_token_ids, skip_special_tokens=False)
    with_system, _ = prompt_inputs([{"role": "system", "content": "Be brief."}, CONVERSATION[0]], tools_of(), False)
    assert with_system[0]["content"].startswith("Be brief.\n\n" + TOOLS_PREAMBLE) and len(with_system) == 2


# a template that reads tools and tool messages the HF way (written for this test)
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}={{ t | tojson }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
    "{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_reads_tools_gets_them_as_transformers_passes_them(tiny_checkpoint_factory, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = _tokenizer(tiny_checkpoint_factory, TOOL_TEMPLATE)
    assert tok.template_uses_tools
    req = chat(base_chat(messages=CONVERSATION, tools=TOOLS), tokenizer=tok, config=LONG)
    ours = tok.decode(req.prompt_token_ids, skip_special_tokens=False)
    directory = tiny_checkpoint_factory("llama", seed=5, num_layers=1, hidden_size=32)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    hf_messages = [dict(m) for m in CONVERSATION]
    hf_messages[1] = {**hf_messages[1], "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]}
    expected = ref.apply_chat_template(hf_messages, tools=TOOLS, chat_template=TOOL_TEMPLATE, tokenize=False,
                                       add_generation_prompt=True)
    assert ours == expected
    assert '[call get_weather {"city": "Paris"}]' in ours and "(for call_1)" in ours
    assert list(req.prompt_token_ids) == encode_chat_request(tok, chat(base_chat(messages=CONVERSATION)).messages,
                                                             tools_of())


# ------------------------------------------------------------------------------------- the grammar
def test_the_forcing_grammar_accepts_valid_calls_only(tiny_checkpoint_factory):
    tok = _tokenizer(tiny_checkpoint_factory)
    ll = llguidance.LLTokenizer(tok.to_json(), n_vocab=tok.vocab_size, eos_token=list(tok.eos_token_ids))
    functions = [(t["function"]["name"], t["function"]["parameters"]) for t in TOOLS]

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar))
        ids = tok.encode(text)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    one, several = tool_call_grammar(functions), tool_call_grammar(functions, 3)
    good = '<tool_call>\n{"name":"get_time","arguments":{"zone":-3}}\n</tool_call>'
    assert accepts(one, good) and accepts(several, good + "\n" + good)
    assert not accepts(one, good + "\n" + good)
    assert not accepts(one, good.replace("-3", "13"))  # out of the schema's range
    assert not accepts(one, good.replace("get_time", "get_weather"))  # get_weather's arguments differ
    assert not accepts(one, "Sure! " + good)
    assert not accepts(one, good.replace('{"name"', '{ "name"'))  # compact JSON only
    nested = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
              "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                              "additionalProperties": False}}, "additionalProperties": False}
    refs = tool_call_grammar([("f", nested), ("g", nested)])
    assert accepts(refs, '<tool_call>\n{"name":"g","arguments":{"p":{"x":1}}}\n</tool_call>')
    assert not accepts(refs, '<tool_call>\n{"name":"g","arguments":{"p":{"y":1}}}\n</tool_call>')


# ------------------------------------------------------------------------------------- the bodies
def test_body_and_chunks_carry_tool_calls_in_openais_shapes():
    req = chat(base_chat(tools=TOOLS))
    body = ChatCompletion.model_validate(response_body(req, f"ok\n{CALL_A}", "stop", 3, 9))
    choice = body.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "ok"
    call = choice.message.tool_calls[0]
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function", "get_weather", {"city": "Paris", "unit": "c"})
    cut = ChatCompletion.model_validate(response_body(req, CALL_A, "length", 3, 9)).choices[0]
    assert cut.finish_reason == "length" and cut.message.content is None and len(cut.message.tool_calls) == 1
    plain = ChatCompletion.model_validate(response_body(chat(base_chat(tools=TOOLS, tool_choice="none")), CALL_A,
                                                        "stop", 3, 9)).choices[0]
    assert plain.finish_reason == "stop" and plain.message.content == CALL_A and plain.message.tool_calls is None

    enc = StreamEncoder(chat(base_chat(tools=TOOLS, stream=True)))
    raw = enc.start() + b"".join(enc.delta(CALL_A[i:i + 4]) for i in range(0, len(CALL_A), 4))
    raw += enc.delta("\n" + CALL_B[:10]) + enc.finish("stop", 3, 9, CALL_B[10:])
    chunks = [ChatCompletionChunk.model_validate(c) for c in parse_sse(raw)[:-1]]
    deltas = [d.tool_calls[0] for c in chunks for d in [c.choices[0].delta] if d.tool_calls]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather"), (1, "get_time")]
    assert all(d.id.startswith("call_") and d.type == "function" for d in deltas)
    assert all(not c.choices[0].delta.content for c in chunks)  # no markup leaks into content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
