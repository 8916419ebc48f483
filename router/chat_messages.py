"""Validation of OpenAI chat ``messages``: roles, string or text-part content, flattened to strings.

A message is ``{"role", "content", "name"?}``. ``content`` is a string or a list of
``{"type": "text", "text": ...}`` parts, joined with ``"\\n"`` (as vLLM does). ``developer`` is the
newer OpenAI name of ``system`` and is mapped to it. Tool use:

* an ``assistant`` message may carry ``tool_calls`` (``[{"id", "type": "function", "function":
  {"name", "arguments"}}]``, ``arguments`` a JSON object as text) and then a null or absent
  ``content``; a call comes back as ``{"id", "type", "function": {"name", "arguments": <dict>}}``
  (what HF chat templates expect), the message's content as ``""``;
* a ``tool`` message answers a call: ``{"role": "tool", "tool_call_id", "content"}``.

Valid OpenAI values this server does not implement (the ``function`` role, image/audio/file parts)
are 422; anything else malformed is 400. Errors name the path, e.g. ``messages[1].content[0].text``.
"""

from __future__ import annotations

import json
from typing import Any

from replicas.model.tokenizer import validate_messages
from router.api_errors import APIError
from router.request_fields import BodyFields, check_text, type_name

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
UNSUPPORTED_ROLES = frozenset({"function"})
UNSUPPORTED_PARTS = frozenset({"image_url", "input_audio", "file", "refusal", "input_image", "audio"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "refusal", "tool_call_id"})
PART_JOINER = "\n"


def _flatten_parts(parts: list[Any], param: str) -> str:
    if not parts:
        raise APIError.invalid(param, f"{param} must be a string or a non-empty array of content parts")
    texts: list[str] = []
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise APIError.invalid(where, f"{where} must be an object, got {type_name(part)}")
        f = BodyFields(part, f"{where}.")
        kind = f.string("type", required=True)
        if kind in UNSUPPORTED_PARTS:
            raise APIError.unsupported(f"{where}.type", f"content parts of type {kind!r} are not supported")
        if kind != "text":
            raise APIError.invalid(f"{where}.type", f"{where}.type must be 'text', got {kind!r}")
        f.reject_unknown(frozenset({"type", "text"}))
        text = f.string("text", required=True)
        assert text is not None
        texts.append(text)
    return PART_JOINER.join(texts)


def _tool_call(call: object, where: str) -> dict[str, Any]:
    """One call of an assistant message, its ``arguments`` decoded."""
    if not isinstance(call, dict):
        raise APIError.invalid(where, f"{where} must be an object, got {type_name(call)}")
    c = BodyFields(call, f"{where}.")
    c.reject_unknown(frozenset({"id", "type", "function"}))
    call_id = c.string("id", required=True, non_empty=True)
    if c.string("type", required=True) != "function":
        raise APIError.invalid(c.param("type"), f"{c.param('type')} must be 'function'")
    spec = c.obj("function")
    if spec is None:
        raise APIError.invalid(c.param("function"), f"{c.param('function')} is required")
    f = BodyFields(spec, f"{where}.function.")
    f.reject_unknown(frozenset({"name", "arguments"}))
    name = f.string("name", required=True, non_empty=True)
    text = f.string("arguments", required=True)
    assert text is not None
    try:
        arguments = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise APIError.invalid(f.param("arguments"), f"{f.param('arguments')} is not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise APIError.invalid(f.param("arguments"), f"{f.param('arguments')} must be a JSON object, got "
                                                     f"{type_name(arguments)}")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _content(message: dict[str, Any], where: str, optional: bool) -> str:
    if message.get("content") is None:
        if optional:
            return ""
        raise APIError.invalid(f"{where}.content", f"{where}.content is required")
    content = message["content"]
    if isinstance(content, list):
        return _flatten_parts(content, f"{where}.content")
    if isinstance(content, str):
        return check_text(content, f"{where}.content")
    expected = "a string or an array of content parts"
    raise APIError.invalid(f"{where}.content", f"{where}.content must be {expected}, got {type_name(content)}")


def parse_messages(value: object, param: str = "messages") -> list[dict[str, Any]]:
    """Validate chat messages and return them as ``[{"role", "content", ...}]`` with string content
    (plus ``tool_calls`` on assistant messages that have them, ``tool_call_id`` on tool messages)."""
    if not isinstance(value, list) or not value:
        got = type_name(value) if not isinstance(value, list) else "an empty array"
        raise APIError.invalid(param, f"{param} must be a non-empty array of messages, got {got}")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise APIError.invalid(where, f"{where} must be an object, got {type_name(message)}")
        f = BodyFields(message, f"{where}.")
        role = f.string("role", required=True)
        if role in UNSUPPORTED_ROLES:
            raise APIError.unsupported(f"{where}.role", f"messages with role {role!r} are not supported: use 'tool'")
        if role not in ROLE_ALIASES:
            raise APIError.invalid(f"{where}.role", f"{where}.role must be one of {sorted(ROLE_ALIASES)}, got {role!r}")
        f.reject_unknown(MESSAGE_KEYS)
        f.string("name")
        f.string("refusal")
        calls = f.array("tool_calls")
        if calls is not None and role != "assistant":
            raise APIError.invalid(f"{where}.tool_calls", f"{where}.tool_calls is only allowed on assistant messages")
        call_id = f.string("tool_call_id", required=role == "tool", non_empty=True)
        if call_id is not None and role != "tool":
            raise APIError.invalid(f"{where}.tool_call_id", f"{where}.tool_call_id is only allowed on tool messages")
        entry: dict[str, Any] = {"role": ROLE_ALIASES[role], "content": _content(message, where, bool(calls))}
        if calls:
            entry["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        if call_id is not None:
            entry["tool_call_id"] = call_id
        out.append(entry)
    try:
        return validate_messages(out)
    except ValueError as exc:  # pragma: no cover - the checks above are stricter
        text = str(exc)
        raise APIError.invalid(text.split(":", 1)[0], text) from None
