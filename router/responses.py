"""OpenAI response bodies and Server-Sent Events for completions and chat completions.

Non-streaming bodies come from :func:`completion_body` / :func:`chat_body`. A stream is built with
:class:`StreamEncoder`: ``start()`` (chat: the assistant-role chunk), ``delta(text)`` per piece of
text, then ``finish(reason, usage)`` (the chunk carrying ``finish_reason``, the usage chunk when
``stream_options.include_usage`` was set, and ``data: [DONE]``), or ``error(err)`` if the request
fails midway: ``data: {"error": {...}}`` (the OpenAI error body) followed by ``data: [DONE]``.
With ``include_usage``, every other chunk carries ``"usage": null`` as in the OpenAI API. The
``finish_reason`` chunk may carry ``"flowprefill": {"ttft_parts": {...}}``, the request's TTFT
decomposition (:mod:`replicas.ttft_parts`), a field OpenAI clients ignore.
The response ``id`` is the request's ``request_id`` (``cmpl-...`` / ``chatcmpl-...``).

When the request asked for log probabilities (``req.sampling.logprobs`` set) and the encoder has a
``token_text`` decoder, each chunk's ``logprobs`` holds its tokens' entries in the endpoint's format
(:mod:`router.logprobs_format`); entries of tokens whose text is still held back (a split
character, a possible stop string) wait for the next chunk that carries text, or the finishing one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from router.api_errors import APIError
from router.logprobs_format import LogprobEntry, LogprobsFormatter, TokenText
from router.protocol import GenerateRequest

FinishReason = Literal["stop", "length"]
FINISH_REASONS = ("stop", "length")
SSE_DONE = b"data: [DONE]\n\n"
FLOWPREFILL_FIELD = "flowprefill"  # the top-level field of FlowPrefill's own additions to a chunk


def _check_reason(reason: str | None) -> None:
    if reason is not None and reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS} or None, got {reason!r}")


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """``{"prompt_tokens", "completion_tokens", "total_tokens"}``."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(req: GenerateRequest, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": req.request_id, "object": obj, "created": req.created, "model": req.model, "choices": choices}


def completion_body(
    req: GenerateRequest, text: str, finish_reason: FinishReason, prompt_tokens: int, completion_tokens: int,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``text_completion`` body of a finished non-streaming completion."""
    _check_reason(finish_reason)
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    body = _envelope(req, "text_completion", [choice])
    body["usage"] = usage_dict(prompt_tokens, completion_tokens)
    return body


def chat_body(
    req: GenerateRequest, text: str, finish_reason: FinishReason, prompt_tokens: int, completion_tokens: int,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``chat.completion`` body of a finished non-streaming chat completion."""
    _check_reason(finish_reason)
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    body = _envelope(req, "chat.completion", [choice])
    body["usage"] = usage_dict(prompt_tokens, completion_tokens)
    return body


def response_body(
    req: GenerateRequest, text: str, finish_reason: FinishReason, prompt_tokens: int, completion_tokens: int,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`completion_body` or :func:`chat_body`, by the request's endpoint."""
    build = chat_body if req.endpoint == "chat.completions" else completion_body
    return build(req, text, finish_reason, prompt_tokens, completion_tokens, logprobs)


def body_logprobs(
    req: GenerateRequest, token_text: TokenText, entries: Iterable[LogprobEntry]
) -> dict[str, Any] | None:
    """The ``logprobs`` of a non-streaming body (None unless the request asked for them)."""
    if req.sampling.logprobs is None:
        return None
    return LogprobsFormatter(token_text, req.endpoint == "chat.completions", req.sampling.logprobs).format(entries)


def completion_chunk(req: GenerateRequest, text: str, finish_reason: FinishReason | None = None,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk."""
    _check_reason(finish_reason)
    return _envelope(req, "text_completion", [
        {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    ])


def chat_chunk(
    req: GenerateRequest, content: str | None = None, finish_reason: FinishReason | None = None, *, role: bool = False,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk``; ``role`` adds ``"role": "assistant"`` to the delta."""
    _check_reason(finish_reason)
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    return _envelope(req, "chat.completion.chunk", [
        {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    ])


def usage_chunk(req: GenerateRequest, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The final usage chunk of a stream (empty ``choices``) for ``stream_options.include_usage``."""
    obj = "chat.completion.chunk" if req.endpoint == "chat.completions" else "text_completion"
    body = _envelope(req, obj, [])
    body["usage"] = usage_dict(prompt_tokens, completion_tokens)
    return body


def sse_event(payload: dict[str, Any]) -> bytes:
    """``data: <json>\\n\\n`` (compact JSON, UTF-8)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8", "replace") + b"\n\n"


def sse_error(err: APIError) -> bytes:
    """The events that end a stream that failed midway: the error body, then ``[DONE]``."""
    return sse_event(err.to_body()) + SSE_DONE


class StreamEncoder:
    """Encodes one request's streamed output as SSE bytes (see the module docstring)."""

    def __init__(self, req: GenerateRequest, token_text: TokenText | None = None) -> None:
        self.req = req
        self.chat = req.endpoint == "chat.completions"
        self.done = False
        wanted = req.sampling.logprobs is not None and token_text is not None
        top_n = req.sampling.logprobs or 0
        self._formatter = LogprobsFormatter(token_text, self.chat, top_n) if wanted and token_text else None
        self._pending: list[LogprobEntry] = []

    def _event(self, payload: dict[str, Any]) -> bytes:
        if self.req.include_usage:
            payload["usage"] = None
        return sse_event(payload)

    def _take_logprobs(self, entries: Iterable[LogprobEntry] | None, final: bool) -> dict[str, Any] | None:
        if self._formatter is None:
            return None
        self._pending.extend(entries or ())
        if not self._pending and not final:
            return None
        out = self._formatter.format(self._pending) if self._pending else None
        self._pending = []
        return out

    def start(self) -> bytes:
        """The opening event: for chat the assistant-role chunk with empty content; else nothing."""
        return self._event(chat_chunk(self.req, "", role=True)) if self.chat else b""

    def delta(self, text: str, logprobs: Iterable[LogprobEntry] | None = None) -> bytes:
        """A chunk carrying ``text`` and the log probabilities of the tokens so far unsent (nothing for
        empty text: its tokens' entries wait for the next chunk)."""
        if not text:
            if self._formatter is not None:
                self._pending.extend(logprobs or ())
            return b""
        lp = self._take_logprobs(logprobs, final=False)
        chunk = chat_chunk(self.req, text, logprobs=lp) if self.chat else completion_chunk(self.req, text, logprobs=lp)
        return self._event(chunk)

    def finish(self, finish_reason: FinishReason, prompt_tokens: int, completion_tokens: int, text: str = "",
               logprobs: Iterable[LogprobEntry] | None = None, ttft_parts: Mapping[str, float] | None = None) -> bytes:
        """The closing events: the ``finish_reason`` chunk (with any last ``text`` and log probabilities,
        and the request's TTFT decomposition as ``"flowprefill": {"ttft_parts": {...}}`` when given),
        usage, ``[DONE]``."""
        lp = self._take_logprobs(logprobs, final=True)
        if self.chat:
            chunk = chat_chunk(self.req, text or None, finish_reason, logprobs=lp)
        else:
            chunk = completion_chunk(self.req, text, finish_reason, logprobs=lp)
        if ttft_parts is not None:  # an extra top-level field: OpenAI clients keep and ignore it
            chunk[FLOWPREFILL_FIELD] = {"ttft_parts": dict(ttft_parts)}
        out = self._event(chunk)
        if self.req.include_usage:
            out += sse_event(usage_chunk(self.req, prompt_tokens, completion_tokens))
        self.done = True
        return out + SSE_DONE

    def error(self, err: APIError) -> bytes:
        """The events for a stream that fails midway: the error body, then ``[DONE]``."""
        self.done = True
        return sse_error(err)
