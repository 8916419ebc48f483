"""Chat request objects as pydantic models: ``messages`` and ``tools`` / ``tool_choice``.

A message is ``{"role", "content", "name"?}``. ``content`` is a string or a list of
``{"type": "text", "text": ...}`` parts, joined with ``"\\n"`` (as vLLM does). ``developer`` is the
newer OpenAI name of ``system`` and is mapped to it. Tool use:

* an ``assistant`` message may carry ``tool_calls`` (``[{"id", "type": "function", "function":
  {"name", "arguments"}}]``, ``arguments`` a JSON object as text) and then a null or absent
  ``content``; :meth:`ChatMessage.template_dict` gives a call as ``{"id", "type", "function": {"name",
  "arguments": <dict>}}`` (what HF chat templates expect) and the message's content as ``""``;
* a ``tool`` message answers a call: ``{"role": "tool", "tool_call_id", "content"}``.

Valid OpenAI values this server does not implement (the ``function`` role, image/audio/file parts)
are 422; anything else malformed is 400, naming the path (``messages[1].content[0].text``).

``tools`` is a list of :class:`ToolDef` (``{"type": "function", "function": {"name", "description"?,
"parameters"?, "strict"?}}``, the name matching OpenAI's ``^[a-zA-Z0-9_-]{1,64}$``, the parameters a
JSON schema that compiles to a grammar); ``tool_choice`` is ``"none"``, ``"auto"``, ``"required"`` or a
:class:`NamedToolChoice`. What they mean for the prompt and the grammar: :mod:`router.tool_calls`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from router.api_model import UNSUPPORTED, APIModel, Text, invalid, located, type_name, unsupported

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
UNSUPPORTED_ROLES = frozenset({"function"})
UNSUPPORTED_PARTS = frozenset({"image_url", "input_audio", "file", "refusal", "input_image", "audio"})
PART_JOINER = "\n"
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_TOOLS = 128  # OpenAI's limit
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def _tag(kinds: dict[type, str], what: str) -> Discriminator:
    """A callable discriminator choosing a union member by the JSON type (a 400 for any other)."""

    def kind(value: object) -> str | None:
        return kinds.get(type(value))

    return Discriminator(kind, custom_error_type="invalid_value", custom_error_message=f"must be {what}")


class ContentPart(APIModel):
    """One ``{"type": "text", "text"}`` part of a message's content."""

    type: Literal["text"]
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _known_type(cls, data: Any) -> Any:  # noqa: ANN401
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind in UNSUPPORTED_PARTS:
            raise located(("type",), f"content parts of type {kind!r} are not supported", kind, kind=UNSUPPORTED)
        return data


MessageContent = Annotated[
    Annotated[Text, Tag("<text>")] | Annotated[list[ContentPart], Tag("<parts>"), Field(min_length=1)],
    _tag({str: "<text>", list: "<parts>"}, "a string or a non-empty array of content parts"),
]


class CalledFunction(APIModel):
    """The function of a call in an assistant message: its name and JSON-object arguments as text."""

    name: Annotated[Text, Field(min_length=1)]
    arguments: Text

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, text: str) -> str:
        try:
            value = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise invalid(f"is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise invalid(f"must be a JSON object, got {type_name(value)}")
        return text

    def decoded(self) -> dict[str, Any]:
        """``arguments`` as a dict (validated to be one)."""
        return json.loads(self.arguments) if self.arguments.strip() else {}


class MessageToolCall(APIModel):
    """One call of an assistant message."""

    id: Annotated[Text, Field(min_length=1)]
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(APIModel):
    """One chat message (see the module docstring)."""

    role: str
    content: MessageContent | None = None
    name: Text | None = None
    refusal: Text | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: Annotated[Text, Field(min_length=1)] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role in UNSUPPORTED_ROLES:
            raise unsupported(f"messages with role {role!r} are not supported: use 'tool'")
        if role not in ROLE_ALIASES:
            raise invalid(f"must be one of {sorted(ROLE_ALIASES)}, got {role!r}")
        return role

    @model_validator(mode="after")
    def _role_rules(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise located(("tool_calls",), "is only allowed on assistant messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise located(("tool_call_id",), "is required on tool messages")
        if self.tool_call_id is not None and self.role != "tool":
            raise located(("tool_call_id",), "is only allowed on tool messages")
        if self.content is None and not self.tool_calls:
            raise located(("content",), "is required")
        return self

    def text(self) -> str:
        """The content as one string (parts joined; ``""`` beside tool calls)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return PART_JOINER.join(part.text for part in self.content)

    def template_dict(self) -> dict[str, Any]:
        """``{"role", "content", "tool_calls"?, "tool_call_id"?}`` as HF chat templates take it."""
        entry: dict[str, Any] = {"role": ROLE_ALIASES[self.role], "content": self.text()}
        if self.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": c.function.decoded()}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            entry["tool_call_id"] = self.tool_call_id
        return entry


class FunctionDef(APIModel):
    """A function the model may call."""

    name: Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _usable_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        from replicas.json_grammar import schema_error  # llguidance: loaded only for tools

        error = schema_error(json.dumps(schema))
        if error is not None:
            raise invalid(f"is not a usable JSON schema: {error}")
        return schema


class ToolDef(APIModel):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(APIModel):
    """``tool_choice.function``: the name of the function the reply must call."""

    name: Text


class NamedToolChoice(APIModel):
    """``tool_choice`` naming one function."""

    type: Literal["function"]
    function: ChosenFunction


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("<mode>")] | Annotated[NamedToolChoice, Tag("<named>")],
    _tag({str: "<mode>", dict: "<named>"}, "'none', 'auto', 'required' or an object naming a function"),
]


class ToolFields(APIModel):
    """The tool fields of a chat (or chat ``/tokenize``) request."""

    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> ToolFields:
        seen: set[str] = set()
        for i, tool in enumerate(self.tools or ()):
            name = tool.function.name
            if name in seen:
                raise located(("tools", i, "function", "name"), f"the function name {name!r} is already used", name)
            seen.add(name)
        return self
