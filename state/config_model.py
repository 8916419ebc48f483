"""Settings from configuration files, validated by pydantic v2 models with one style of error.

The settings files feed (``ray_config.yaml``'s ``args``, engine and autoscaling settings, SLO
classes, API-key files) are pydantic dataclasses (:func:`config_dataclass`: the runtime value,
built by keyword or position, ``dataclasses.replace`` re-validates) or, for sections that nest,
:class:`ConfigModel` models. Both are strict (:data:`STRICT`): no unknown keys, no coercion
(``"4"`` is not 4, ``true`` is not 1), no NaN or infinity.

A bad value is refused by the caller's own exception type (an :data:`ErrorFactory`, so the
service and the CLI catch what they caught before), built from pydantic's ``ValidationError``:
its field is the path rendered from pydantic's ``loc`` under the caller's prefix
(``slo.classes[1].ttft_slo_ms``), its message says what was expected and what came instead::

    slo.classes[1].ttft_slo_ms: Input should be greater than 0, got -5
    engine.kv_cache_byte: unknown field (known: alpha, batch_token_budget, ...)

Cross-field rules live in the models' ``model_validator``\\ s and name their field with
:func:`located`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.dataclasses import is_pydantic_dataclass
from pydantic_core import InitErrorDetails, PydanticCustomError

T = TypeVar("T")

#: Builds the caller's exception for ``(field path, message)``.
ErrorFactory = Callable[[str, str], Exception]

#: Every settings model: unknown keys refused, no type coercion, finite numbers only.
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

_MAPPING_ERRORS = frozenset({"model_type", "model_attributes_type", "dataclass_type", "dataclass_exact_type",
                             "dict_type"})
_LIST_ERRORS = frozenset({"list_type", "tuple_type"})
_UNKNOWN_ERRORS = frozenset({"extra_forbidden", "unexpected_keyword_argument"})
_MISSING_ERRORS = frozenset({"missing", "missing_argument", "missing_keyword_only_argument"})
_RULE = "config_rule"  # a located() error: its message says what came
_VALIDATED_INIT: dict[type, Callable[..., None]] = {}


class ConfigModel(BaseModel):
    """A nested section of a settings file (a mapping inside a mapping): strict and frozen."""

    model_config = ConfigDict(**STRICT, frozen=True)


def config_dataclass(error: ErrorFactory) -> Callable[[type[T]], type[T]]:
    """Make ``cls`` a frozen, :data:`STRICT` pydantic dataclass whose constructor raises
    ``error(field, message)`` (not pydantic's ``ValidationError``) for a bad value."""

    def wrap(cls: type[T]) -> type[T]:
        built = pydantic_dataclass(frozen=True, config=STRICT)(cls)
        validated_init = built.__init__
        names = [f.name for f in dataclasses.fields(built) if f.init]

        @functools.wraps(validated_init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
            if len(args) <= len(names) and not set(kwargs) & set(names[:len(args)]):
                kwargs = {**dict(zip(names, args)), **kwargs}  # errors then name the field, not the position
                args = ()
            try:
                validated_init(self, *args, **kwargs)
            except ValidationError as exc:
                raise config_error(exc, error, "", built) from None

        built.__init__ = __init__  # type: ignore[method-assign]
        _VALIDATED_INIT[built] = validated_init
        return built

    return wrap


def parse_config(schema: type[T], data: object, error: ErrorFactory, prefix: str, *,
          hide: frozenset[str] = frozenset()) -> T:
    """``schema`` (a :func:`config_dataclass`, a :class:`ConfigModel` or any type pydantic
    validates, e.g. ``list[Entry]``) from a settings file's ``data``; errors name ``prefix.field``
    and never show the value of a field named in ``hide``."""
    try:
        if is_pydantic_dataclass(schema) and schema in _VALIDATED_INIT:
            if not isinstance(data, Mapping):
                raise ValidationError.from_exception_data(schema.__name__, [InitErrorDetails(
                    type="dataclass_type", loc=(), input=data, ctx={"class_name": schema.__name__})])
            bad_key = next((k for k in data if not isinstance(k, str)), None)
            if bad_key is not None:
                raise located((bad_key,), "a field name must be a string", bad_key)
            obj = object.__new__(schema)
            _VALIDATED_INIT[schema](obj, **data)
            return obj
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(data)
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as exc:
        raise config_error(exc, error, prefix, schema, hide) from None


def located(loc: tuple[str | int, ...], message: str, value: object) -> ValidationError:
    """A validation error at ``loc`` (relative to the model): raise it from a ``model_validator``
    for a rule across fields, and the error names that field."""
    return ValidationError.from_exception_data("config", [InitErrorDetails(
        type=PydanticCustomError(_RULE, message), loc=loc, input=value)])


def field_path(prefix: str, loc: Sequence[str | int]) -> str:
    """``("classes", 1, "ttft_slo_ms")`` under ``slo`` -> ``slo.classes[1].ttft_slo_ms`` (``""``: the root)."""
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def config_error(exc: ValidationError, error: ErrorFactory, prefix: str, schema: object = None,
                 hide: frozenset[str] = frozenset()) -> Exception:
    """``error(field, message)`` for pydantic's ``exc``: the first error's field, and every error's
    message (``a.b: ...; a.c: ...``)."""
    parts = [(field_path(prefix, err["loc"]), _describe(err, schema, hide)) for err in exc.errors()]
    first, message = parts[0]
    rest = "".join(f"; {path}: {text}" for path, text in parts[1:])
    return error(first, message + rest)


def _describe(err: Any, schema: object, hide: frozenset[str]) -> str:  # noqa: ANN401 (pydantic ErrorDetails)
    kind, loc, value = err["type"], tuple(err["loc"]), err["input"]
    if kind in _UNKNOWN_ERRORS:
        known = _field_names(schema, loc[:-1])
        return "unknown field" + (f" (known: {', '.join(known)})" if known else "")
    if kind in _MISSING_ERRORS:
        return "required field is missing"
    if kind in _MAPPING_ERRORS and not isinstance(value, Mapping):
        return f"Input should be a mapping of settings, got {type(value).__name__}"
    if kind in _LIST_ERRORS:  # a tuple field reads a YAML/JSON list
        return f"Input should be a list, got {type(value).__name__}"
    message = str(err["ctx"]["error"]) if kind == "value_error" else err["msg"]
    if kind == _RULE or any(part in hide for part in loc if isinstance(part, str)):
        return message
    shown = repr(value)
    return f"{message}, got {shown if len(shown) <= 80 else shown[:77] + '...'}"


def _field_names(schema: object, loc: tuple[str | int, ...]) -> list[str]:
    """The field names of the model at ``loc`` under ``schema`` (empty when it is not a model)."""
    node: object = schema
    for part in loc:
        node = _unwrap(node)
        if isinstance(part, int):
            args = [a for a in get_args(node) if a is not Ellipsis]
            node = args[0] if args else None
        else:
            node = _fields(node).get(part)
    return sorted(_fields(_unwrap(node)))


def _fields(node: object) -> dict[str, object]:
    if isinstance(node, type) and issubclass(node, BaseModel):
        return {name: info.annotation for name, info in node.model_fields.items()}
    if is_pydantic_dataclass(node):
        return {name: info.annotation for name, info in node.__pydantic_fields__.items()}
    return {}


def _unwrap(node: object) -> object:
    """``Annotated[X, ...]`` and ``X | None`` -> ``X``."""
    while True:
        if get_origin(node) is Annotated:
            node = get_args(node)[0]
        elif get_origin(node) in (Union, types.UnionType):
            options = [a for a in get_args(node) if a is not type(None)]
            if len(options) != 1:
                return node
            node = options[0]
        else:
            return node
