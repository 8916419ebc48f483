"""Validation of OpenAI chat ``messages``: roles, string or text-part content, flattened to strings.

A message is ``{"role", "content", "name"?}``. ``content`` is a string or a list of
``{"type": "text", "text": ...}`` parts, joined with ``"\\n"`` (as vLLM does). ``developer`` is the
newer OpenAI name of ``system`` and is mapped to it. Valid OpenAI values this server does not
implement (``tool``/``function`` roles, image/audio/file parts, non-empty ``tool_calls``) are 422;
anything else malformed is 400. Errors name the path, e.g. ``messages[1].content[0].text``.
"""

from __future__ import annotations

from typing import Any

from replicas.model.tokenizer import validate_messages
from router.api_errors import APIError
from router.request_fields import BodyFields, check_text, type_name

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED_ROLES = frozenset({"tool", "function"})
UNSUPPORTED_PARTS = frozenset({"image_url", "input_audio", "file", "refusal", "input_image", "audio"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "refusal"})
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


def parse_messages(value: object, param: str = "messages") -> list[dict[str, str]]:
    """Validate chat messages and return them as ``[{"role", "content"}]`` with string content."""
    if not isinstance(value, list) or not value:
        got = type_name(value) if not isinstance(value, list) else "an empty array"
        raise APIError.invalid(param, f"{param} must be a non-empty array of messages, got {got}")
    out: list[dict[str, str]] = []
    for i, message in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise APIError.invalid(where, f"{where} must be an object, got {type_name(message)}")
        f = BodyFields(message, f"{where}.")
        role = f.string("role", required=True)
        if role in UNSUPPORTED_ROLES:
            raise APIError.unsupported(f"{where}.role", f"messages with role {role!r} are not supported")
        if role not in ROLE_ALIASES:
            raise APIError.invalid(f"{where}.role", f"{where}.role must be one of {sorted(ROLE_ALIASES)}, got {role!r}")
        f.reject_unknown(MESSAGE_KEYS)
        f.string("name")
        tool_calls = f.array("tool_calls")
        if tool_calls:
            raise APIError.unsupported(f"{where}.tool_calls", "tool calls are not supported")
        f.string("refusal")
        if not f.given("content"):
            raise APIError.invalid(f"{where}.content", f"{where}.content is required")
        content = message["content"]
        if isinstance(content, list):
            text = _flatten_parts(content, f"{where}.content")
        elif isinstance(content, str):
            text = check_text(content, f"{where}.content")
        else:
            expected = "a string or an array of content parts"
            raise APIError.invalid(f"{where}.content", f"{where}.content must be {expected}, got {type_name(content)}")
        out.append({"role": ROLE_ALIASES[role], "content": text})
    try:
        return validate_messages(out)
    except ValueError as exc:  # pragma: no cover - the checks above are stricter
        text = str(exc)
        raise APIError.invalid(text.split(":", 1)[0], text) from None
