"""``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request, validated into a
:class:`ToolsRequest`: what the prompt shows the model (:mod:`router.tool_prompt`), which grammar
forces a call (:mod:`replicas.tool_grammar`), and how the reply is parsed (:mod:`router.tool_parser`).

* ``tools``: a non-empty array of ``{"type": "function", "function": {"name", "description"?,
  "parameters"?, "strict"?}}``. ``name`` matches ``^[a-zA-Z0-9_-]{1,64}$`` (OpenAI's rule) and is
  unique; ``parameters`` is a JSON schema object (default: no arguments) that compiles to a grammar.
  Errors are 400s naming the field, e.g. ``tools[0].function.name``.
* ``tool_choice``: ``"none"`` (tools left out of the prompt, the reply never parsed for calls),
  ``"auto"`` (the default with tools: the model chooses, a call it writes is parsed), ``"required"``
  (the reply is constrained to one or more calls, at most one with ``parallel_tool_calls`` false) or
  ``{"type": "function", "function": {"name"}}`` (constrained to exactly one call of that function,
  which must be in ``tools``, else a 400 naming ``tool_choice``). ``required`` or a named function
  without ``tools`` is a 400 naming ``tool_choice``.
* ``parallel_tool_calls`` false: a reply keeps only its first call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from router.api_errors import APIError
from router.request_fields import BodyFields, type_name

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
MAX_TOOLS = 128  # OpenAI's limit
ToolMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolFunction:
    """One function the model may call."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None
    strict: bool | None = None

    def definition(self) -> dict[str, Any]:
        """The tool as OpenAI (and HF chat templates) describe it: ``{"type": "function", "function": {...}}``."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolsRequest:
    """A chat request's tools and how it chose among them (see the module docstring)."""

    functions: tuple[ToolFunction, ...]
    mode: ToolMode
    named: str | None = None
    parallel: bool = True

    @property
    def names(self) -> frozenset[str]:
        """The names a parsed call may have."""
        return frozenset(f.name for f in self.functions)

    @property
    def parses(self) -> bool:
        """Whether the reply is parsed for calls (tools given and the choice is not ``none``)."""
        return bool(self.functions) and self.mode != "none"

    @property
    def forced(self) -> bool:
        """Whether the reply is constrained to calls (``required`` or a named function)."""
        return self.mode in ("required", "named")

    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The tool definitions the prompt shows the model (None for ``none`` or no tools)."""
        return [f.definition() for f in self.functions] if self.parses else None

    def grammar(self) -> str | None:
        """The Lark grammar forcing the reply's calls (None unless :attr:`forced`); a 400 naming
        ``tools`` if the functions' schemas, each usable alone, do not compile together."""
        if not self.forced:
            return None
        from replicas.json_grammar import lark_error
        from replicas.tool_grammar import MAX_FORCED_CALLS, tool_call_grammar

        chosen = [f for f in self.functions if self.mode == "required" or f.name == self.named]
        many = self.mode == "required" and self.parallel
        grammar = tool_call_grammar([(f.name, f.parameters) for f in chosen], MAX_FORCED_CALLS if many else 1)
        error = lark_error(grammar)
        if error is not None:
            raise APIError.invalid("tools", f"the tools' parameters cannot constrain a forced tool call: {error}")
        return grammar


def _parameters(value: object, param: str) -> dict[str, Any]:
    if value is None:
        return dict(NO_PARAMETERS)
    if not isinstance(value, dict):
        raise APIError.invalid(param, f"{param} must be a JSON schema object, got {type_name(value)}")
    from replicas.json_grammar import schema_error  # llguidance: loaded only for tools

    error = schema_error(json.dumps(value))
    if error is not None:
        raise APIError.invalid(param, f"{param} is not a usable JSON schema: {error}")
    return value


def _function(tool: object, where: str) -> ToolFunction:
    if not isinstance(tool, dict):
        raise APIError.invalid(where, f"{where} must be an object, got {type_name(tool)}")
    t = BodyFields(tool, f"{where}.")
    kind = t.string("type", required=True)
    if kind != "function":
        raise APIError.invalid(t.param("type"), f"{t.param('type')} must be 'function', got {kind!r}")
    t.reject_unknown(frozenset({"type", "function"}))
    spec = t.obj("function")
    if spec is None:
        raise APIError.invalid(t.param("function"), f"{t.param('function')} is required")
    f = BodyFields(spec, f"{where}.function.")
    f.reject_unknown(frozenset({"name", "description", "parameters", "strict"}))
    name = f.string("name", required=True)
    assert name is not None
    if not NAME_PATTERN.match(name):
        raise APIError.invalid(f.param("name"), f"{f.param('name')} must match {NAME_PATTERN.pattern} (letters, "
                                                f"digits, '_' and '-', at most 64), got {name!r}")
    return ToolFunction(name, _parameters(spec.get("parameters"), f.param("parameters")),
                        f.string("description"), f.boolean("strict"))


def _functions(f: BodyFields) -> tuple[ToolFunction, ...]:
    tools = f.array("tools")
    if not tools:
        return ()
    if len(tools) > MAX_TOOLS:
        raise APIError.invalid("tools", f"tools allows at most {MAX_TOOLS} functions, got {len(tools)}")
    out: list[ToolFunction] = []
    for i, tool in enumerate(tools):
        function = _function(tool, f"tools[{i}]")
        if any(g.name == function.name for g in out):
            param = f"tools[{i}].function.name"
            raise APIError.invalid(param, f"{param}: the function name {function.name!r} is already used")
        out.append(function)
    return tuple(out)


def _choice(value: object, functions: tuple[ToolFunction, ...]) -> tuple[ToolMode, str | None]:
    if value is None:
        return ("auto" if functions else "none"), None
    if value in ("none", "auto"):
        return value, None  # type: ignore[return-value]
    if value == "required" or isinstance(value, dict):
        if not functions:
            raise APIError.invalid("tool_choice", f"tool_choice {value!r} needs tools")
        if value == "required":
            return "required", None
        c = BodyFields(value, "tool_choice.")
        c.reject_unknown(frozenset({"type", "function"}))
        if c.string("type", required=True) != "function":
            raise APIError.invalid("tool_choice.type", "tool_choice.type must be 'function'")
        spec = c.obj("function")
        if spec is None:
            raise APIError.invalid("tool_choice.function", "tool_choice.function is required")
        fn = BodyFields(spec, "tool_choice.function.")
        fn.reject_unknown(frozenset({"name"}))
        name = fn.string("name", required=True)
        if name not in {f.name for f in functions}:
            raise APIError.invalid("tool_choice", f"tool_choice names the function {name!r}, which is not in tools "
                                                  f"({', '.join(f.name for f in functions)})")
        return "named", name
    shown = repr(value) if isinstance(value, str) else type_name(value)
    raise APIError.invalid("tool_choice", f"tool_choice must be 'none', 'auto', 'required' or an object naming a "
                                          f"function, got {shown}")


def parse_tools(f: BodyFields) -> ToolsRequest | None:
    """The request's :class:`ToolsRequest` (None: no ``tools`` and no tool choice that needs them)."""
    functions = _functions(f)
    mode, named = _choice(f.data.get("tool_choice"), functions)
    parallel = f.boolean("parallel_tool_calls")
    if not functions:
        return None
    return ToolsRequest(functions, mode, named, parallel is not False)
