"""The base of the OpenAI request models (pydantic v2) and how their errors become OpenAI error bodies.

Every request body is decoded by :func:`decode_json_object` (UTF-8, JSON without NaN/Infinity, an
object, at most the configured size: else a 400/413 naming ``body``) and validated into an
:class:`APIModel` by :func:`validate_body`. The models are strict (``"4"`` is not 4, ``true`` is not 1,
``1.0`` is not an integer), refuse unknown fields and treat a JSON ``null`` as "not given" for every
optional field, as the OpenAI API does.

A ``ValidationError`` becomes one :class:`~router.api_errors.APIError`:

* ``param`` is the path rendered from pydantic's ``loc`` (``messages[1].content[0].text``); tagged-union
  tags (``<parts>``) are left out;
* unknown fields are a 400 ``unknown_parameter`` naming all of them (the first, sorted, is the param);
* :func:`unsupported` errors (a valid OpenAI value this server does not implement) are a 422
  ``unsupported_parameter``; every other error is a 400;
* the message starts with the param, then says what was expected and what came.

Rules across fields raise :func:`located` from a ``model_validator``, naming their field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from router.api_errors import APIError
from state.config_model import field_path

M = TypeVar("M", bound=BaseModel)

INVALID = "invalid_value"
UNSUPPORTED = "unsupported_parameter"
_EXPECTED = {"string_type": "a string", "int_type": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "bool_type": "a boolean", "list_type": "an array", "dict_type": "an object",
             "model_type": "an object", "model_attributes_type": "an object"}
_PREDICATES = frozenset({"must", "is", "contains", "cannot"})  # "<param> must be ..." reads as a sentence


class APIModel(BaseModel):
    """A request body or one of its objects: strict, unknown fields refused, frozen."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


def type_name(value: object) -> str:
    """The JSON type name of a decoded value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names = {str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def shown(value: object) -> str:
    """A value as an error message shows it: scalars by value, containers by JSON type."""
    return repr(value) if isinstance(value, int | float | bool | str) and len(repr(value)) <= 80 else type_name(value)


def invalid(message: str) -> PydanticCustomError:
    """A 400 for the field being validated (raise it from a field validator)."""
    return PydanticCustomError(INVALID, message)


def unsupported(message: str) -> PydanticCustomError:
    """A 422 ``unsupported_parameter`` for the field being validated."""
    return PydanticCustomError(UNSUPPORTED, message)


def located(loc: tuple[str | int, ...], message: str, value: object = None, *, kind: str = INVALID) -> ValidationError:
    """An error at ``loc`` relative to the model: raise it from a ``model_validator`` for a rule
    across fields (``kind`` :data:`UNSUPPORTED` for a 422)."""
    return ValidationError.from_exception_data("request", [InitErrorDetails(
        type=PydanticCustomError(kind, message), loc=loc, input=value)])


def number_in(lo: float, hi: float, *, open_lo: bool = False) -> Any:  # noqa: ANN401 (a typing form)
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``); integers are numbers."""
    shown_range = f"{'(' if open_lo else '['}{float(lo)}, {float(hi)}]"

    def check(value: float) -> float:
        if not (lo < value if open_lo else lo <= value) or value > hi:
            raise invalid(f"must be a number in {shown_range}, got {value!r}")
        return value

    return Annotated[float, AfterValidator(check)]


def integer_in(lo: int, hi: int) -> Any:  # noqa: ANN401 (a typing form)
    """An integer in ``[lo, hi]`` (``1.0`` and ``true`` are not integers)."""

    def check(value: int) -> int:
        if not lo <= value <= hi:
            raise invalid(f"must be an integer in [{lo}, {hi}], got {value!r}")
        return value

    return Annotated[int, AfterValidator(check)]


def check_utf8(value: str) -> str:
    """``value`` if it can be encoded as UTF-8, else a 400 naming the first unpaired surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"contains an unpaired surrogate escape at index {exc.start}") from None
    return value


#: A string that can be encoded as UTF-8 (no lone surrogates from ``\\ud800`` escapes).
Text = Annotated[str, AfterValidator(check_utf8)]


def param_path(loc: Sequence[str | int], prefix: str = "") -> str:
    """``("messages", 1, "content", "<parts>", 0, "text")`` -> ``messages[1].content[0].text``."""
    return field_path(prefix, [p for p in loc if not (isinstance(p, str) and p.startswith("<"))])


def _message(err: Any, param: str) -> str:  # noqa: ANN401 (pydantic's ErrorDetails)
    kind, text = err["type"], err["msg"]
    if kind == "missing":
        return f"{param} is required"
    if kind in _EXPECTED:
        return f"{param} must be {_EXPECTED[kind]}, got {shown(err['input'])}"
    if kind in (INVALID, UNSUPPORTED):
        if text.startswith(param):
            return text
        return f"{param} {text}" if text.split(" ", 1)[0] in _PREDICATES else f"{param}: {text}"
    return f"{param}: {text}, got {shown(err['input'])}"


def api_error(exc: ValidationError, prefix: str = "") -> APIError:
    """The :class:`APIError` of pydantic's ``exc`` (see the module docstring)."""
    errors = exc.errors(include_url=False)
    unknown = sorted(param_path(e["loc"], prefix) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        return APIError.invalid(unknown[0], f"unrecognized field(s): {names}", "unknown_parameter")
    first = errors[0]
    param = param_path(first["loc"], prefix) or "body"
    message = _message(first, param)
    if first["type"] == UNSUPPORTED:
        return APIError.unsupported(param, message)
    return APIError.invalid(param, message)


def validate_body(model: type[M], data: object, prefix: str = "") -> M:
    """``model`` from decoded JSON ``data``; raises :class:`APIError` naming the offending field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise api_error(exc, prefix) from None


def _reject_constant(name: str) -> Any:  # noqa: ANN401
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
