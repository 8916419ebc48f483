"""How a chat request's tools, tool calls and tool results reach the prompt.

A checkpoint whose chat template reads ``tools`` (the HF convention) gets the messages and the tool
definitions as they are: ``apply_chat_template(messages, tools=[...])``, assistant ``tool_calls``
with their arguments as objects, ``tool`` messages with their ``tool_call_id``.

A template that ignores tools (SmolLM2's and the tiny checkpoints' ChatML templates) gets the
request lowered to plain ``system`` / ``user`` / ``assistant`` messages, always the same way:

* the tool definitions go at the end of the first system message (after a blank line), or into a
  new first system message, as :data:`TOOLS_PREAMBLE` followed by one JSON object per tool between
  ``<tools>`` and ``</tools>`` and :data:`TOOLS_FORMAT` (the call format :mod:`router.tool_parser`
  reads and :mod:`replicas.tool_grammar` forces);
* an assistant message's calls follow its content, one ``<tool_call>\\n{"name": ..., "arguments":
  {...}}\\n</tool_call>`` block per call, newline-separated;
* a run of ``tool`` messages becomes one ``user`` message of ``<tool_response>\\n{"name": ...,
  "content": ...}\\n</tool_response>`` blocks, newline-separated (``name``: the function of the
  earlier call with that ``tool_call_id``, left out when no earlier message made such a call).

JSON here is ``json.dumps`` with its default separators and non-ASCII kept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from replicas.tool_grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from router.tool_calls import ToolsRequest

TOOLS_PREAMBLE = ("# Tools\n\nYou may call the functions described below, one JSON object per line, "
                  "between <tools> and </tools>:")
TOOLS_FORMAT = ("To call a function, reply with a block like the one below for each call, the arguments "
                "being a JSON object that matches the function's parameters:\n"
                f'{TOOL_CALL_OPEN}\n{{"name": "<function name>", "arguments": {{...}}}}\n{TOOL_CALL_CLOSE}')
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


class ChatEncoder(Protocol):
    """What prompt building needs of :class:`replicas.model.tokenizer.Tokenizer`."""

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]: ...


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def tools_system_text(tools: Sequence[dict[str, Any]]) -> str:
    """The system-message text that describes ``tools`` (OpenAI tool definitions)."""
    lines = "\n".join(_dumps(t) for t in tools)
    return f"{TOOLS_PREAMBLE}\n<tools>\n{lines}\n</tools>\n\n{TOOLS_FORMAT}"


def call_block(name: str, arguments: object) -> str:
    """One call in the tool-call format."""
    return f"{TOOL_CALL_OPEN}\n{_dumps({'name': name, 'arguments': arguments})}\n{TOOL_CALL_CLOSE}"


def _lowered(messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant calls
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = []
            for call in m["tool_calls"]:
                names[call["id"]] = call["function"]["name"]
                blocks.append(call_block(call["function"]["name"], call["function"]["arguments"]))
            content = "\n".join([m["content"], *blocks] if m["content"] else blocks)
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            result: dict[str, Any] = {"content": m["content"]}
            if m["tool_call_id"] in names:
                result = {"name": names[m["tool_call_id"]], **result}
            block = f"{RESPONSE_OPEN}\n{_dumps(result)}\n{RESPONSE_CLOSE}"
            if out and out[-1].get("from_tools"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "from_tools": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if tools:
        text = tools_system_text(tools)
        if out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def prompt_inputs(messages: Sequence[dict[str, Any]], tools: ToolsRequest | None,
                  template_uses_tools: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tool definitions to render the chat template with (see the module docstring)."""
    definitions = tools.prompt_tools() if tools is not None else None
    if template_uses_tools:
        return list(messages), definitions
    return _lowered(messages, definitions), None


def encode_chat_request(tokenizer: ChatEncoder, messages: Sequence[dict[str, Any]],
                        tools: ToolsRequest | None, add_generation_prompt: bool = True) -> list[int]:
    """The prompt's token ids: the chat template over :func:`prompt_inputs`."""
    rendered, definitions = prompt_inputs(messages, tools, bool(getattr(tokenizer, "template_uses_tools", False)))
    if definitions:
        return tokenizer.encode_chat(rendered, add_generation_prompt, tools=definitions)
    return tokenizer.encode_chat(rendered, add_generation_prompt)
