"""``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request (validated by
:class:`router.chat_models.ToolFields`) as a :class:`ToolsRequest`: what the prompt shows the model
(:mod:`router.tool_prompt`), which grammar forces a call (:mod:`replicas.tool_grammar`), and how the
reply is parsed (:mod:`router.tool_parser`).

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

from dataclasses import dataclass
from typing import Any, Literal

from router.api_errors import APIError
from router.chat_models import NO_PARAMETERS, NamedToolChoice, ToolFields

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


def parse_tools(fields: ToolFields) -> ToolsRequest | None:
    """The request's :class:`ToolsRequest` (None: no ``tools``); a 400 naming ``tool_choice`` when it
    needs tools there are none of, or names a function not in ``tools``."""
    functions = tuple(
        ToolFunction(t.function.name, dict(NO_PARAMETERS) if t.function.parameters is None else t.function.parameters,
                     t.function.description, t.function.strict)
        for t in fields.tools or ())
    choice = fields.tool_choice
    mode: ToolMode
    named = None
    if choice is None:
        mode = "auto" if functions else "none"
    elif isinstance(choice, NamedToolChoice):
        mode, named = "named", choice.function.name
    else:
        mode = choice
    if mode in ("required", "named") and not functions:
        shown = repr(choice) if isinstance(choice, str) else repr(choice.model_dump())  # type: ignore[union-attr]
        raise APIError.invalid("tool_choice", f"tool_choice {shown} needs tools")
    if named is not None and named not in {f.name for f in functions}:
        raise APIError.invalid("tool_choice", f"tool_choice names the function {named!r}, which is not in tools "
                                              f"({', '.join(f.name for f in functions)})")
    if not functions:
        return None
    return ToolsRequest(functions, mode, named, fields.parallel_tool_calls is not False)
