"""Tool calls parsed out of a chat reply, whole (:func:`parse_reply`) or as it streams
(:class:`ToolCallStream`).

A call is a ``<tool_call>`` ... ``</tool_call>`` block (:mod:`replicas.tool_grammar`) holding a JSON
object ``{"name": <a function of the request's tools>, "arguments": <object>}`` (``arguments`` may
also be a JSON object encoded as a string, or absent for none). A block that is not that (malformed
JSON, an unknown name, no closing tag before the reply ends) stays in the reply's text, as content.
With ``parallel_tool_calls`` false only the first call is kept. The content is the text outside
the calls with leading and trailing whitespace removed, None when nothing is left; a stream's
content deltas add up to exactly that text, and never carry the markup of a call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from replicas.tool_grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from router.tool_calls import ToolsRequest


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: ``arguments`` is the JSON text of the arguments object."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's ``tool_calls`` item."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def to_delta(self, index: int) -> dict[str, Any]:
        """OpenAI's streamed ``delta.tool_calls`` item for the call at ``index`` of its choice."""
        return {"index": index, **self.to_dict()}


def parse_call(body: str, names: frozenset[str]) -> ToolCall | None:
    """The call in one block's inner text, or None when it is not a valid call to one of ``names``."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or data["name"] not in names:
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False))


def _prefix_hold(text: str) -> int:
    """How many characters at the end of ``text`` could start an opening tag."""
    for size in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-size:]):
            return size
    return 0


class ToolCallStream:
    """Splits a reply, fed piece by piece, into content text and calls (see the module docstring).

    :meth:`feed` and :meth:`finish` return events in order: ``str`` (content to send) or
    :class:`ToolCall`. Text that may still become a call (an opening tag or a prefix of one) and
    whitespace that may turn out to be trailing are held back until they are decided.
    """

    def __init__(self, tools: ToolsRequest) -> None:
        self.names = tools.names
        self.parallel = tools.parallel
        self.calls: list[ToolCall] = []
        self._buffer = ""  # undecided text
        self._space = ""  # whitespace after the last content sent (sent only if more content follows)
        self._started = False  # some content was sent

    def _content(self, text: str) -> list[str | ToolCall]:
        if not self._started:
            text = text.lstrip()
        if not text:
            return []
        body = text.rstrip()
        if not body:
            self._space += text
            return []
        out = self._space + body
        self._space = text[len(body):]
        self._started = True
        return [out]

    def _call(self, block: str) -> list[str | ToolCall]:
        call = parse_call(block[len(TOOL_CALL_OPEN):-len(TOOL_CALL_CLOSE)], self.names)
        if call is None:
            return self._content(block)
        if self.parallel or not self.calls:
            self.calls.append(call)
            return [call]
        return []

    def feed(self, text: str) -> list[str | ToolCall]:
        """The events that ``text`` (the next piece of the reply) decides."""
        self._buffer += text
        events: list[str | ToolCall] = []
        while self._buffer:
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start < 0:
                hold = _prefix_hold(self._buffer)
                events += self._content(self._buffer[:len(self._buffer) - hold])
                self._buffer = self._buffer[len(self._buffer) - hold:]
                break
            if start > 0:
                events += self._content(self._buffer[:start])
                self._buffer = self._buffer[start:]
            end = self._buffer.find(TOOL_CALL_CLOSE)
            if end < 0:
                break  # inside a call: wait for its closing tag
            end += len(TOOL_CALL_CLOSE)
            events += self._call(self._buffer[:end])
            self._buffer = self._buffer[end:]
        return events

    def finish(self) -> list[str | ToolCall]:
        """The events of the text still held when the reply ends (an unclosed call is content)."""
        rest, self._buffer = self._buffer, ""
        events = self._content(rest) if rest else []
        self._space = ""
        return events


def parse_reply(text: str, tools: ToolsRequest) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's content (None when empty) and calls."""
    stream = ToolCallStream(tools)
    events = stream.feed(text) + stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content or None, stream.calls
