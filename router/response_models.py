"""Pydantic models of the OpenAI response bodies and stream chunks the router sends.

One model per shape of the OpenAI API (and vLLM's additions): the non-streaming bodies
(:class:`CompletionResponse`, ``"text_completion"``; :class:`ChatCompletionResponse`,
``"chat.completion"``) and the SSE stream chunks (:class:`CompletionChunk`, ``"text_completion"``;
:class:`ChatCompletionChunk`, ``"chat.completion.chunk"``). Field order is the order of the JSON.

What a dump (``model_dump()`` / ``model_dump_json()``) holds:

* every choice has ``logprobs`` and ``finish_reason``, null included;
* a chat ``delta`` only the keys that are set (``role``, ``content``, ``tool_calls``), a chat
  ``message`` its ``tool_calls`` only when there are calls;
* completions' per-choice and chat's body-level ``prompt_logprobs`` (vLLM's field) only when given;
* a chunk's ``usage`` only when it was set, ``null`` included: the stream of a request with
  ``stream_options.include_usage`` has ``"usage": null`` on every chunk but the usage chunk;
* a chunk's ``flowprefill`` (FlowPrefill's own additions, e.g. ``{"ttft_parts": {...}}``) only when
  given: OpenAI clients keep and ignore the extra top-level field.

``finish_reason`` is one of :data:`FINISH_REASONS` or None; anything else fails validation
(:func:`invalid` turns the :class:`pydantic.ValidationError` into a plain :class:`ValueError`).
``logprobs`` objects are kept as the dicts :mod:`router.logprobs_format` builds (not re-validated:
a long reply's entries would cost more to validate than to build).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer
from pydantic_core import PydanticSerializationError

FinishReason = Literal["stop", "length", "tool_calls"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)
Logprobs = dict[str, Any]  # a choice's ``logprobs`` object, in the endpoint's format
PromptLogprobs = list[dict[str, Any] | None]  # vLLM's ``prompt_logprobs``: per prompt token, None first


def _is_none(value: object) -> bool:
    return value is None


def invalid(err: ValidationError) -> ValueError:
    """A plain :class:`ValueError` for a failed response model: a bad ``finish_reason`` reads as
    ``finish_reason must be one of (...) or None, got 'abort'``, anything else as pydantic's message."""
    for item in err.errors():
        if item["loc"] and item["loc"][-1] == "finish_reason":
            return ValueError(f"finish_reason must be one of {FINISH_REASONS} or None, got {item['input']!r}")
    return ValueError(f"invalid {err.title}: {err}")


class Usage(BaseModel):
    """Token counts of a request: the prompt once, the completion tokens of every choice."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """The usage with ``total_tokens`` their sum."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class FunctionCallOut(BaseModel):
    """The ``function`` of a tool call: its name and its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCallOut(BaseModel):
    """An item of a chat message's ``tool_calls``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ToolCallDelta(BaseModel):
    """An item of a streamed ``delta.tool_calls``: a whole call, ``index`` its position in the choice."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


# ------------------------------------------------------------------------------------------- bodies
class CompletionChoice(BaseModel):
    """A choice of a ``text_completion`` body."""

    index: int
    text: str | None
    logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_is_none)


class CompletionResponse(BaseModel):
    """The body of a finished non-streaming completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessageOut(BaseModel):
    """The assistant message of a chat choice: ``content`` is null beside tool calls that left no text."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=_is_none)


class ChatChoice(BaseModel):
    """A choice of a ``chat.completion`` body."""

    index: int
    message: ChatMessageOut
    logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    """The body of a finished non-streaming chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_is_none)


ResponseBody = CompletionResponse | ChatCompletionResponse


# ------------------------------------------------------------------------------------------- chunks
class FlowPrefillExtra(BaseModel):
    """FlowPrefill's own top-level field of a chunk: the request's TTFT decomposition
    (:mod:`replicas.ttft_parts`), on the chunk that finishes a choice."""

    ttft_parts: dict[str, int | float]


class _Chunk(BaseModel):
    """A stream chunk's fields, in JSON order (a subclass narrows ``object`` and ``choices`` in place):
    ``usage`` is dumped only when it was set (null included)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    flowprefill: FlowPrefillExtra | None = Field(default=None, exclude_if=_is_none)
    usage: Usage | None = None

    def json_bytes(self) -> bytes | None:
        """The compact JSON when it is byte-identical to ``json.dumps(self.model_dump(),
        ensure_ascii=False, separators=(",", ":"))``, else None: pydantic writes some floats
        differently (``1e-05`` as ``0.00001``, ``1e-07`` as ``1e-7``), so a chunk with logprobs or
        ``flowprefill`` gets None, as does text that cannot be UTF-8 (a lone surrogate)."""
        if self.flowprefill is not None or any(c.logprobs is not None for c in self.choices):
            return None
        try:
            return self.__pydantic_serializer__.to_json(self)
        except PydanticSerializationError:
            return None

    @model_serializer(mode="wrap")
    def _usage_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if "usage" not in self.model_fields_set:
            data.pop("usage", None)
        return data


class CompletionStreamChoice(BaseModel):
    """A choice of a streamed ``text_completion`` chunk."""

    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(_Chunk):
    """One event of a completion stream (the usage chunk: empty ``choices`` and ``usage``)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionStreamChoice]


class ChatDelta(BaseModel):
    """The ``delta`` of a chat chunk: only the keys set (not None) are dumped."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    content: str | None = Field(default=None, exclude_if=_is_none)
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=_is_none)


class ChatStreamChoice(BaseModel):
    """A choice of a ``chat.completion.chunk``."""

    index: int
    delta: ChatDelta
    logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Chunk):
    """One event of a chat completion stream (the usage chunk: empty ``choices`` and ``usage``)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]


StreamChunk = CompletionChunk | ChatCompletionChunk
