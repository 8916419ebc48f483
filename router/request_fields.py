"""Typed access to the fields of a decoded JSON request body, with errors that name the field.

A JSON ``null`` counts as "not given" for every optional field, as in the OpenAI API. Integers must
be JSON integers (``1.0`` is not an integer, ``true`` is not a number).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from router.api_errors import APIError

MAX_INT = 2**63 - 1


def type_name(value: object) -> str:
    """The JSON type name of a decoded value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def is_int(value: object) -> bool:
    """True for a JSON integer (not a boolean, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_text(value: str, param: str) -> str:
    """``value`` if it can be encoded as UTF-8 (no lone surrogates from ``\\ud800`` escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError.invalid(param, f"{param} contains an unpaired surrogate escape at index {exc.start}") from None
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json_object(body: bytes, max_bytes: int) -> dict[str, Any]:
    """Decode a request body that must be a UTF-8 JSON object of at most ``max_bytes`` bytes."""
    if len(body) > max_bytes:
        raise APIError.body_too_large(len(body), max_bytes)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError.invalid("body", f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError.invalid("body", "request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers over the digit limit
        raise APIError.invalid("body", f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError.invalid("body", f"request body must be a JSON object, got {type_name(data)}")
    return data


class BodyFields:
    """Read fields of a JSON object by name; every accessor raises a 400 :class:`APIError` naming
    ``{prefix}{key}`` on a wrong type or range. ``unknown(allowed)`` reports fields not allowed."""

    def __init__(self, data: Mapping[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix

    def param(self, key: str) -> str:
        """The full name of ``key`` for error messages."""
        return f"{self.prefix}{key}"

    def _bad(self, key: str, expected: str) -> APIError:
        value = self.data[key]
        shown = repr(value) if isinstance(value, int | float | bool) else type_name(value)
        return APIError.invalid(self.param(key), f"{self.param(key)} must be {expected}, got {shown}")

    def given(self, key: str) -> bool:
        """True when ``key`` is present and not null."""
        return self.data.get(key) is not None

    def reject_unknown(self, allowed: frozenset[str]) -> None:
        """400 naming the unknown fields (the first one is the ``param``)."""
        unknown = sorted(k for k in self.data if k not in allowed)
        if unknown:
            names = ", ".join(repr(self.param(k)) for k in unknown)
            raise APIError.invalid(self.param(unknown[0]), f"unrecognized field(s): {names}", "unknown_parameter")

    def string(self, key: str, *, required: bool = False, non_empty: bool = False) -> str | None:
        """A string field."""
        if not self.given(key):
            if required:
                raise APIError.invalid(self.param(key), f"{self.param(key)} is required")
            return None
        value = self.data[key]
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        if non_empty and not value:
            raise APIError.invalid(self.param(key), f"{self.param(key)} must not be empty")
        return check_text(value, self.param(key))

    def boolean(self, key: str) -> bool | None:
        """A boolean field."""
        if not self.given(key):
            return None
        value = self.data[key]
        if not isinstance(value, bool):
            raise self._bad(key, "a boolean")
        return value

    def integer(self, key: str, lo: int = -MAX_INT - 1, hi: int = MAX_INT) -> int | None:
        """An integer field in ``[lo, hi]``."""
        if not self.given(key):
            return None
        value = self.data[key]
        if not is_int(value) or not lo <= value <= hi:
            raise self._bad(key, f"an integer in [{lo}, {hi}]")
        return value

    def number(self, key: str, lo: float, hi: float, *, open_lo: bool = False) -> float | None:
        """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
        if not self.given(key):
            return None
        value = self.data[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise self._bad(key, "a number")
        if not (lo < value if open_lo else lo <= value) or value > hi:
            raise self._bad(key, f"a number in {'(' if open_lo else '['}{lo}, {hi}]")
        return float(value)

    def obj(self, key: str) -> dict[str, Any] | None:
        """An object field."""
        if not self.given(key):
            return None
        value = self.data[key]
        if not isinstance(value, dict):
            raise self._bad(key, "an object")
        return value

    def array(self, key: str) -> list[Any] | None:
        """An array field."""
        if not self.given(key):
            return None
        value = self.data[key]
        if not isinstance(value, list):
            raise self._bad(key, "an array")
        return value
