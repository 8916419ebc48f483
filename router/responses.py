"""OpenAI response bodies and Server-Sent Events for completions and chat completions.

The bodies and chunks are built as the pydantic models of :mod:`router.response_models` (which
fix their JSON: key order, the nulls kept, the keys left out) and handed on as dicts (bodies, for
``JSONResponse``) or SSE bytes (chunks, :func:`sse_event`); a bad ``finish_reason`` is a ValueError.
Non-streaming bodies come from :func:`completion_body` / :func:`chat_body`. A stream is built with
:class:`StreamEncoder`: ``start()`` (chat: the assistant-role chunk), ``delta(text)`` per piece of
text, then ``finish(reason, usage)`` (the chunk carrying ``finish_reason``, the usage chunk when
``stream_options.include_usage`` was set, and ``data: [DONE]``), or ``error(err)`` if the request
fails midway: ``data: {"error": {...}}`` (the OpenAI error body) followed by ``data: [DONE]``.
With ``include_usage``, every other chunk carries ``"usage": null`` as in the OpenAI API. The
``finish_reason`` chunk may carry ``"flowprefill": {"ttft_parts": {...}}``, the request's TTFT
decomposition (:mod:`replicas.ttft_parts`), a field OpenAI clients ignore.
The response ``id`` is the request's ``request_id`` (``cmpl-...`` / ``chatcmpl-...``).

A chat request with tools (``tool_choice`` not ``none``) has each choice's text parsed for tool calls
(:mod:`router.tool_parser`): a body's message gets ``tool_calls`` and the text outside them as
``content`` (null when none); a stream sends each call, once complete, as a ``delta.tool_calls``
chunk (``index``, ``id``, ``type``, ``function.name`` and the whole ``function.arguments``) and only
the text outside calls as ``delta.content``. A choice that stopped after a call finishes with
``finish_reason`` ``"tool_calls"``.

When the request asked for log probabilities (``req.sampling.logprobs`` set) and the encoder has a
``token_text`` decoder, each chunk's ``logprobs`` holds its tokens' entries in the endpoint's format
(:mod:`router.logprobs_format`); entries of tokens whose text is still held back (a split
character, a possible stop string) wait for the next chunk that carries text, or the finishing one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ValidationError

from router.api_errors import APIError
from router.logprobs_format import LogprobEntry, LogprobsFormatter, TokenText
from router.protocol import GenerateRequest
from router.response_models import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    FinishReason,
    PromptLogprobs,
    ResponseBody,
    StreamChunk,
    Usage,
    invalid,
)
from router.tool_parser import ToolCall, ToolCallStream, parse_reply

SSE_DONE = b"data: [DONE]\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """``{"prompt_tokens", "completion_tokens", "total_tokens"}``."""
    return Usage.of(prompt_tokens, completion_tokens).model_dump()


@dataclass(frozen=True)
class Choice:
    """One finished choice of a non-streaming body: its text (with the prompt first under ``echo``;
    a chat message's content, None beside tool calls), finish reason, formatted ``logprobs`` and the
    ``tool_calls`` parsed out of it."""

    text: str | None
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None = None
    tool_calls: tuple[ToolCall, ...] = ()


def chat_choice(req: GenerateRequest, text: str, finish_reason: FinishReason,
                logprobs: dict[str, Any] | None = None) -> Choice:
    """The :class:`Choice` of a finished chat reply ``text``, parsed for tool calls when the request
    has tools (``finish_reason`` ``"tool_calls"`` when it stopped after one)."""
    if req.tools is None or not req.tools.parses or req.endpoint != "chat.completions":
        return Choice(text, finish_reason, logprobs)
    content, calls = parse_reply(text, req.tools)
    reason: FinishReason = "tool_calls" if calls and finish_reason == "stop" else finish_reason
    return Choice(content, reason, logprobs, tuple(calls))


def choices_response(req: GenerateRequest, choices: Sequence[Choice], prompt_tokens: int, completion_tokens: int,
                     prompt_logprobs: PromptLogprobs | None = None) -> ResponseBody:
    """The body model of a finished non-streaming request with ``choices`` in index order; ``usage``
    counts the prompt once and the completion tokens of every choice (as vLLM's server).
    ``prompt_logprobs`` (vLLM's field) goes on every choice for completions, once on a chat body.
    (Validated from one dict, like the chunks: cheaper than a constructor per nested model.)"""
    chat = req.endpoint == "chat.completions"
    items = []
    for index, c in enumerate(choices):
        item: dict[str, Any] = {"index": index, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
        if chat:
            calls = [call.to_dict() for call in c.tool_calls] if c.tool_calls else None
            item["message"] = {"content": c.text, "tool_calls": calls}
        else:
            item.update(text=c.text, prompt_logprobs=prompt_logprobs)
        items.append(item)
    fields: dict[str, Any] = {"id": req.request_id, "created": req.created, "model": req.model, "choices": items,
                              "usage": Usage.of(prompt_tokens, completion_tokens)}
    try:
        if chat:
            return ChatCompletionResponse.model_validate({**fields, "prompt_logprobs": prompt_logprobs})
        return CompletionResponse.model_validate(fields)
    except ValidationError as err:
        raise invalid(err) from None


def choices_body(req: GenerateRequest, choices: Sequence[Choice], prompt_tokens: int, completion_tokens: int,
                 prompt_logprobs: PromptLogprobs | None = None) -> dict[str, Any]:
    """:func:`choices_response` as the JSON-ready dict."""
    return choices_response(req, choices, prompt_tokens, completion_tokens, prompt_logprobs).model_dump()


def completion_body(
    req: GenerateRequest, text: str, finish_reason: FinishReason, prompt_tokens: int, completion_tokens: int,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``text_completion`` body of a finished non-streaming completion with one choice."""
    return choices_body(replace(req, endpoint="completions"), [Choice(text, finish_reason, logprobs)],
                        prompt_tokens, completion_tokens)


def chat_body(
    req: GenerateRequest, text: str, finish_reason: FinishReason, prompt_tokens: int, completion_tokens: int,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``chat.completion`` body of a finished non-streaming chat completion with one choice."""
    return choices_body(replace(req, endpoint="chat.completions"), [Choice(text, finish_reason, logprobs)],
                        prompt_tokens, completion_tokens)


def response_body(
    req: GenerateRequest, text: str, finish_reason: FinishReason, prompt_tokens: int, completion_tokens: int,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`completion_body` or :func:`chat_body`, by the request's endpoint (a chat reply parsed for
    tool calls when the request has tools)."""
    return choices_body(req, [chat_choice(req, text, finish_reason, logprobs)], prompt_tokens, completion_tokens)


def body_logprobs(
    req: GenerateRequest, token_text: TokenText, entries: Iterable[LogprobEntry]
) -> dict[str, Any] | None:
    """The ``logprobs`` of a non-streaming body (None unless the request asked for them)."""
    if req.sampling.logprobs is None:
        return None
    return LogprobsFormatter(token_text, req.endpoint == "chat.completions", req.sampling.logprobs).format(entries)


def _chunk_fields(req: GenerateRequest, choice: dict[str, Any], ttft_parts: Mapping[str, float] | None,
                  include_usage: bool) -> dict[str, Any]:
    """A chunk's fields for ``model_validate``: one validation of the whole chunk costs less than a
    constructor per nested model, and this runs once per streamed piece of text."""
    fields: dict[str, Any] = {"id": req.request_id, "created": req.created, "model": req.model, "choices": [choice]}
    if ttft_parts is not None:
        fields["flowprefill"] = {"ttft_parts": ttft_parts}
    if include_usage:
        fields["usage"] = None
    return fields


def completion_chunk(req: GenerateRequest, text: str, finish_reason: FinishReason | None = None,
                     logprobs: dict[str, Any] | None = None, index: int = 0, *,
                     ttft_parts: Mapping[str, float] | None = None, include_usage: bool = False) -> CompletionChunk:
    """One streamed ``text_completion`` chunk of choice ``index``; ``ttft_parts`` adds FlowPrefill's
    ``"flowprefill": {"ttft_parts": {...}}``, ``include_usage`` its ``"usage": null``."""
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    try:
        return CompletionChunk.model_validate(_chunk_fields(req, choice, ttft_parts, include_usage))
    except ValidationError as err:
        raise invalid(err) from None


def chat_chunk(
    req: GenerateRequest, content: str | None = None, finish_reason: FinishReason | None = None, *, role: bool = False,
    logprobs: dict[str, Any] | None = None, index: int = 0, tool_calls: list[dict[str, Any]] | None = None,
    ttft_parts: Mapping[str, float] | None = None, include_usage: bool = False,
) -> ChatCompletionChunk:
    """One streamed ``chat.completion.chunk`` of choice ``index``; ``role`` adds ``"role": "assistant"``
    to the delta, ``tool_calls`` its ``delta.tool_calls`` items (``ttft_parts``, ``include_usage``: as
    :func:`completion_chunk`)."""
    delta = {"role": "assistant" if role else None, "content": content, "tool_calls": tool_calls or None}
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    try:
        return ChatCompletionChunk.model_validate(_chunk_fields(req, choice, ttft_parts, include_usage))
    except ValidationError as err:
        raise invalid(err) from None


def usage_chunk(req: GenerateRequest, prompt_tokens: int, completion_tokens: int) -> StreamChunk:
    """The final usage chunk of a stream (empty ``choices``) for ``stream_options.include_usage``."""
    chunk = ChatCompletionChunk if req.endpoint == "chat.completions" else CompletionChunk
    return chunk(id=req.request_id, created=req.created, model=req.model, choices=[],
                 usage=Usage.of(prompt_tokens, completion_tokens))


def sse_event(payload: BaseModel | dict[str, Any]) -> bytes:
    """``data: <json>\\n\\n`` (compact JSON, UTF-8) of a response model or a dict: the bytes of
    ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))``, pydantic's own JSON where that is
    the same (``json_bytes()`` of a chunk without floats)."""
    if isinstance(payload, (CompletionChunk, ChatCompletionChunk)):
        fast = payload.json_bytes()
        if fast is not None:
            return b"data: " + fast + b"\n\n"
    data = payload.model_dump() if isinstance(payload, BaseModel) else payload
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8", "replace") + b"\n\n"


def sse_error(err: APIError) -> bytes:
    """The events that end a stream that failed midway: the error body, then ``[DONE]``."""
    return sse_event(err.to_body()) + SSE_DONE


@dataclass
class _ChoiceStream:
    """One choice's state in a stream: its logprobs formatter (offsets run per choice), the entries
    held back with text not yet sent, and whether its echo went out."""

    formatter: LogprobsFormatter | None
    pending: list[LogprobEntry] = field(default_factory=list)
    echoed: bool = False
    tools: ToolCallStream | None = None  # a chat request with tools: the text is parsed for calls
    calls_sent: int = 0


class StreamEncoder:
    """Encodes one request's streamed output as SSE bytes (see the module docstring); every method
    takes the choice ``index`` (``n`` > 1) its output belongs to.

    ``echo_text`` (completions' ``echo``): each choice's first chunk is the prompt text, with the prompt
    tokens' log probabilities (:meth:`set_prompt_logprobs`) when the request asked for logprobs.
    """

    def __init__(self, req: GenerateRequest, token_text: TokenText | None = None, echo_text: str | None = None) -> None:
        self.req = req
        self.chat = req.endpoint == "chat.completions"
        self.done = False
        self._usage = req.include_usage  # every chunk but the usage chunk carries "usage": null
        self._token_text = token_text if req.sampling.logprobs is not None else None
        self._echo_text = echo_text
        self._prompt_entries: list[LogprobEntry] = []
        self._choices: dict[int, _ChoiceStream] = {}

    def _choice(self, index: int) -> _ChoiceStream:
        state = self._choices.get(index)
        if state is None:
            formatter = (LogprobsFormatter(self._token_text, self.chat, self.req.sampling.logprobs or 0)
                         if self._token_text is not None else None)
            state = self._choices[index] = _ChoiceStream(formatter)
            tools = self.req.tools
            if self.chat and tools is not None and tools.parses:
                state.tools = ToolCallStream(tools)
        return state

    def _take_logprobs(self, state: _ChoiceStream, entries: Iterable[LogprobEntry] | None,
                       final: bool) -> dict[str, Any] | None:
        if state.formatter is None:
            return None
        state.pending.extend(entries or ())
        if not state.pending and not final:
            return None
        out = state.formatter.format(state.pending) if state.pending else None
        state.pending = []
        return out

    def set_prompt_logprobs(self, entries: Iterable[LogprobEntry] | None) -> None:
        """The prompt tokens' entries (the engine sends them once, with choice 0's first output)."""
        if entries:
            self._prompt_entries = list(entries)

    def _echo(self, index: int) -> bytes:
        state = self._choice(index)
        if self._echo_text is None or state.echoed:
            return b""
        state.echoed = True
        lp = state.formatter.format(self._prompt_entries) if state.formatter is not None else None
        chunk = completion_chunk(self.req, self._echo_text, logprobs=lp, index=index, include_usage=self._usage)
        return sse_event(chunk)

    def start(self) -> bytes:
        """The opening events: for chat the assistant-role chunk of every choice, with empty content;
        else nothing."""
        if not self.chat:
            return b""
        return b"".join(sse_event(chat_chunk(self.req, "", role=True, index=i, include_usage=self._usage))
                        for i in range(self.req.sampling.n))

    def delta(self, text: str, logprobs: Iterable[LogprobEntry] | None = None, index: int = 0) -> bytes:
        """A chunk carrying ``text`` and the log probabilities of the tokens so far unsent (nothing for
        empty text: its tokens' entries wait for the next chunk)."""
        echo = self._echo(index)
        state = self._choice(index)
        if not text:
            if state.formatter is not None:
                state.pending.extend(logprobs or ())
            return echo
        if state.tools is not None:
            return echo + self._tool_events(state, state.tools.feed(text), logprobs, index)
        lp = self._take_logprobs(state, logprobs, final=False)
        chunk = (chat_chunk(self.req, text, logprobs=lp, index=index, include_usage=self._usage) if self.chat
                 else completion_chunk(self.req, text, logprobs=lp, index=index, include_usage=self._usage))
        return echo + sse_event(chunk)

    def _tool_events(self, state: _ChoiceStream, events: list[str | ToolCall],
                     logprobs: Iterable[LogprobEntry] | None, index: int, final: bool = False) -> bytes:
        """Chunks of parsed content and calls; the tokens' log probabilities ride with the first one
        (and wait while the parser holds text back), or all with the finishing chunk when ``final``."""
        if state.formatter is not None:
            state.pending.extend(logprobs or ())
        out = b""
        for event in events:
            lp = None if final else self._take_logprobs(state, None, final=False)
            if isinstance(event, ToolCall):
                chunk = chat_chunk(self.req, logprobs=lp, index=index, tool_calls=[event.to_delta(state.calls_sent)],
                                   include_usage=self._usage)
                state.calls_sent += 1
            else:
                chunk = chat_chunk(self.req, event, logprobs=lp, index=index, include_usage=self._usage)
            out += sse_event(chunk)
        return out

    def finish(self, finish_reason: FinishReason, prompt_tokens: int, completion_tokens: int, text: str = "",
               logprobs: Iterable[LogprobEntry] | None = None, ttft_parts: Mapping[str, float] | None = None,
               index: int = 0, last: bool = True) -> bytes:
        """Choice ``index``'s ``finish_reason`` chunk (with any last ``text`` and log probabilities, and
        the request's TTFT decomposition as ``"flowprefill": {"ttft_parts": {...}}`` when given); when it
        is the ``last`` choice to finish, then usage (``completion_tokens``: all choices') and ``[DONE]``."""
        echo = self._echo(index)
        state = self._choice(index)
        if state.tools is not None:  # the last text's content and calls first, then the finishing chunk
            echo += self._tool_events(state, state.tools.feed(text) + state.tools.finish(), logprobs, index, final=True)
            text, logprobs = "", None
            if state.tools.calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        lp = self._take_logprobs(state, logprobs, final=True)
        extras: dict[str, Any] = {"ttft_parts": ttft_parts, "include_usage": self._usage}
        if self.chat:  # ttft_parts: an extra top-level field, OpenAI clients keep and ignore it
            chunk: StreamChunk = chat_chunk(self.req, text or None, finish_reason, logprobs=lp, index=index, **extras)
        else:
            chunk = completion_chunk(self.req, text, finish_reason, logprobs=lp, index=index, **extras)
        out = echo + sse_event(chunk)
        if not last:
            return out
        if self.req.include_usage:
            out += sse_event(usage_chunk(self.req, prompt_tokens, completion_tokens))
        self.done = True
        return out + SSE_DONE

    def error(self, err: APIError) -> bytes:
        """The events for a stream that fails midway: the error body, then ``[DONE]``."""
        self.done = True
        return sse_error(err)
