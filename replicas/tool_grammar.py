"""Tool calls as a grammar: the Lark grammar (llguidance's dialect, which vLLM's grammar backends
read too) that forces a reply made only of calls, in FlowPrefill's tool-call format, to the given
functions with arguments that validate against each function's ``parameters`` schema.

The format (Hermes-style; :mod:`router.tool_parser` parses it, :mod:`router.tool_prompt` tells the
model about it)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Several calls are separated by one newline. Torch-free: the router builds the grammar, the
engine compiles it against the vocabulary (:mod:`replicas.structured_output`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
MAX_FORCED_CALLS = 8  # calls a `required` reply may hold (with parallel_tool_calls); bounds a looping model


def _rebase_refs(node: Any, base: str) -> Any:  # noqa: ANN401 - any JSON value
    """``node`` with every local ``$ref`` (``#...``) pointing below ``base`` instead of the root."""
    if isinstance(node, dict):
        return {k: (base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else
                    _rebase_refs(v, base)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase_refs(v, base) for v in node]
    return node


def calls_schema(functions: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The JSON schema of one call's object: ``{"name": <one of the names>, "arguments": <its
    parameters>}``. Each function's ``parameters`` moves under ``$defs`` (its local ``$ref``s rebased),
    so schemas with their own ``$defs`` or recursive references keep working side by side."""
    if not functions:
        raise ValueError("a tool-call grammar needs at least one function")
    defs: dict[str, Any] = {}
    cases = []
    for i, (name, parameters) in enumerate(functions):
        key = f"tool_{i}"
        defs[key] = _rebase_refs(dict(parameters), f"#/$defs/{key}")
        properties = {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/{key}"}}
        cases.append({"type": "object", "properties": properties, "required": ["name", "arguments"],
                      "additionalProperties": False})
    # compact JSON, as response_format: flexible whitespace lets a small model loop on it
    return {"$defs": defs, "anyOf": cases, "x-guidance": {"whitespace_flexible": False}}


def tool_call_grammar(functions: Sequence[tuple[str, Mapping[str, Any]]], max_calls: int = 1) -> str:
    """The Lark grammar of a reply of 1..``max_calls`` calls to ``functions`` (name, parameters)."""
    if max_calls < 1:
        raise ValueError(f"max_calls must be at least 1, got {max_calls}")
    more = f' ("\\n" call){{0,{max_calls - 1}}}' if max_calls > 1 else ""
    return (f"start: call{more}\n"
            f"call: {json.dumps(TOOL_CALL_OPEN + chr(10))} body {json.dumps(chr(10) + TOOL_CALL_CLOSE)}\n"
            f"body: %json {json.dumps(calls_schema(functions))}\n")
