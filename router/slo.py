"""SLO classes as router configuration, and resolving a request's SLO from headers and body.

The policy is read from a dict (the router deployment's ``user_config``/args in ``ray_config.yaml``)::

    {"default_class": "standard",
     "classes": [{"name": "interactive", "ttft_slo_ms": 300, "tpot_slo_ms": 100,
                  "priority": 0, "sheddable": false}, ...]}

``name``, ``ttft_slo_ms`` and ``priority`` are required; ``tpot_slo_ms`` defaults to null (no TPOT
SLO) and ``sheddable`` to false. Errors name the field path, e.g. ``slo.classes[1].ttft_slo_ms``.
Priorities follow vLLM: a lower number is more urgent. The classes convert to and from
:class:`bench.slo_classes.SLOClass` (same fields, seconds instead of milliseconds).

Resolution (:meth:`SLOPolicy.resolve`), each step overriding the previous:

1. the default class;
2. the class named by the body field ``slo_class``;
3. the class named by the ``x-slo-class`` header (a gateway-set header wins over the body);
4. ``x-slo-ttft-ms`` / ``x-slo-tpot-ms`` headers replace the class's SLOs (positive finite numbers);
5. the OpenAI body field ``priority`` replaces the class priority.

An unknown class is a 400 whose ``param`` names where it came from (``slo_class`` or
``x-slo-class``); a bad SLO header is a 400 naming the header.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.slo_classes import SLOClass
from router.api_errors import APIError

HEADER_CLASS = "x-slo-class"
HEADER_TTFT = "x-slo-ttft-ms"
HEADER_TPOT = "x-slo-tpot-ms"

_CLASS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DECIMAL = re.compile(r"^(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_CLASS_KEYS = ("name", "ttft_slo_ms", "tpot_slo_ms", "priority", "sheddable")


class SLOConfigError(ValueError):
    """The SLO configuration is invalid; ``path`` names the field (``slo.classes[1].ttft_slo_ms``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def _positive_ms(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class SLOClassConfig:
    """One service class: TTFT SLO, optional TPOT SLO (both ms), priority (lower = more urgent), sheddable."""

    name: str
    ttft_slo_ms: float
    tpot_slo_ms: float | None = None
    priority: int = 0
    sheddable: bool = False

    def __post_init__(self) -> None:
        self._check("")

    def _check(self, path: str) -> None:
        if not isinstance(self.name, str) or not _CLASS_NAME.match(self.name):
            raise SLOConfigError(f"{path}name", f"must be 1-64 characters of [A-Za-z0-9_.-], got {self.name!r}")
        if not _positive_ms(self.ttft_slo_ms):
            raise SLOConfigError(f"{path}ttft_slo_ms", f"must be a finite number > 0, got {self.ttft_slo_ms!r}")
        if self.tpot_slo_ms is not None and not _positive_ms(self.tpot_slo_ms):
            raise SLOConfigError(f"{path}tpot_slo_ms", f"must be null or a finite number > 0, got {self.tpot_slo_ms!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise SLOConfigError(f"{path}priority", f"must be an integer, got {self.priority!r}")
        if not isinstance(self.sheddable, bool):
            raise SLOConfigError(f"{path}sheddable", f"must be a boolean, got {self.sheddable!r}")

    @classmethod
    def from_dict(cls, data: object, path: str = "class") -> SLOClassConfig:
        """Parse one class; errors name ``{path}.{field}``."""
        if not isinstance(data, Mapping):
            raise SLOConfigError(path, f"must be an object, got {type(data).__name__}")
        for key in data:
            if key not in _CLASS_KEYS:
                raise SLOConfigError(f"{path}.{key}", f"unknown field; expected one of {list(_CLASS_KEYS)}")
        for key in ("name", "ttft_slo_ms", "priority"):
            if key not in data:
                raise SLOConfigError(f"{path}.{key}", "is required")
        obj = object.__new__(cls)
        for key in _CLASS_KEYS:
            default = {"tpot_slo_ms": None, "sheddable": False}.get(key)
            object.__setattr__(obj, key, data.get(key, default))
        obj._check(f"{path}.")
        return obj

    def to_dict(self) -> dict[str, Any]:
        """The config dict this class parses from."""
        return {key: getattr(self, key) for key in _CLASS_KEYS}

    def to_slo_class(self) -> SLOClass:
        """The equivalent :class:`bench.slo_classes.SLOClass` (seconds)."""
        tpot = None if self.tpot_slo_ms is None else self.tpot_slo_ms / 1000.0
        return SLOClass(self.name, self.ttft_slo_ms / 1000.0, tpot, self.priority, self.sheddable)

    @classmethod
    def from_slo_class(cls, c: SLOClass) -> SLOClassConfig:
        """From a :class:`bench.slo_classes.SLOClass` (seconds -> milliseconds)."""
        tpot = None if c.tpot_slo_s is None else c.tpot_slo_s * 1000.0
        return cls(c.name, c.ttft_slo_s * 1000.0, tpot, c.priority, c.sheddable)


@dataclass(frozen=True)
class ResolvedSLO:
    """A request's SLO after resolution: class name, TTFT/TPOT SLOs in seconds, priority, sheddable."""

    class_name: str
    ttft_slo_s: float
    tpot_slo_s: float | None
    priority: int
    sheddable: bool


@dataclass(frozen=True)
class SLOPolicy:
    """The configured SLO classes and the default one; resolves requests to a :class:`ResolvedSLO`."""

    classes: tuple[SLOClassConfig, ...]
    default_class: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        self._check("slo")

    def _check(self, path: str) -> None:
        if not self.classes:
            raise SLOConfigError(f"{path}.classes", "must be a non-empty list")
        seen: set[str] = set()
        for i, c in enumerate(self.classes):
            if not isinstance(c, SLOClassConfig):
                raise SLOConfigError(f"{path}.classes[{i}]", f"must be an SLOClassConfig, got {type(c).__name__}")
            if c.name in seen:
                raise SLOConfigError(f"{path}.classes[{i}].name", f"duplicate class name {c.name!r}")
            seen.add(c.name)
        if not isinstance(self.default_class, str) or self.default_class not in seen:
            raise SLOConfigError(
                f"{path}.default_class", f"must name one of the classes {sorted(seen)}, got {self.default_class!r}"
            )

    @classmethod
    def from_dict(cls, data: object, path: str = "slo") -> SLOPolicy:
        """Parse ``{"default_class": ..., "classes": [...]}``; errors name the path (``slo.classes[1].name``)."""
        if not isinstance(data, Mapping):
            raise SLOConfigError(path, f"must be an object, got {type(data).__name__}")
        for key in data:
            if key not in ("classes", "default_class"):
                raise SLOConfigError(f"{path}.{key}", "unknown field; expected 'classes' and 'default_class'")
        raw = data.get("classes")
        if not isinstance(raw, Sequence) or isinstance(raw, str | bytes) or not raw:
            raise SLOConfigError(f"{path}.classes", f"must be a non-empty list, got {raw!r}")
        classes = tuple(SLOClassConfig.from_dict(c, f"{path}.classes[{i}]") for i, c in enumerate(raw))
        if "default_class" not in data:
            raise SLOConfigError(f"{path}.default_class", "is required")
        obj = object.__new__(cls)
        object.__setattr__(obj, "classes", classes)
        object.__setattr__(obj, "default_class", data["default_class"])
        obj._check(path)
        return obj

    @classmethod
    def from_slo_classes(cls, classes: Sequence[SLOClass], default_class: str) -> SLOPolicy:
        """From :class:`bench.slo_classes.SLOClass` objects (e.g. hardware-relative bench classes)."""
        return cls(tuple(SLOClassConfig.from_slo_class(c) for c in classes), default_class)

    @classmethod
    def default(cls) -> SLOPolicy:
        """interactive (300 ms TTFT, 100 ms TPOT, priority 0), standard (1 s, 200 ms, 1) and
        batch (10 s, no TPOT SLO, 2, sheddable); the default class is ``standard``."""
        return cls(
            (
                SLOClassConfig("interactive", 300.0, 100.0, 0, False),
                SLOClassConfig("standard", 1000.0, 200.0, 1, False),
                SLOClassConfig("batch", 10000.0, None, 2, True),
            ),
            "standard",
        )

    def to_dict(self) -> dict[str, Any]:
        """The config dict this policy parses from."""
        return {"default_class": self.default_class, "classes": [c.to_dict() for c in self.classes]}

    def to_slo_classes(self) -> tuple[SLOClass, ...]:
        """The classes as :class:`bench.slo_classes.SLOClass` (seconds)."""
        return tuple(c.to_slo_class() for c in self.classes)

    def get(self, name: str) -> SLOClassConfig | None:
        """The class called ``name``, or None."""
        return next((c for c in self.classes if c.name == name), None)

    def resolve(
        self, headers: Mapping[str, str], body_class: str | None = None, body_priority: int | None = None
    ) -> ResolvedSLO:
        """Resolve a request's SLO (see the module docstring); raises :class:`APIError` (400)."""
        lowered = _lower_headers(headers)
        name, param = self.default_class, "slo_class"
        if body_class is not None:
            name = body_class
        if HEADER_CLASS in lowered:
            name, param = lowered[HEADER_CLASS].strip(), HEADER_CLASS
        cls = self.get(name)
        if cls is None:
            known = [c.name for c in self.classes]
            message = f"{param}: unknown SLO class {name!r}; known classes: {known}"
            raise APIError.invalid(param, message, "unknown_slo_class")
        ttft_ms: float = cls.ttft_slo_ms
        tpot_ms = cls.tpot_slo_ms
        if HEADER_TTFT in lowered:
            ttft_ms = _header_ms(lowered[HEADER_TTFT], HEADER_TTFT)
        if HEADER_TPOT in lowered:
            tpot_ms = _header_ms(lowered[HEADER_TPOT], HEADER_TPOT)
        priority = cls.priority
        if body_priority is not None:
            if not isinstance(body_priority, int) or isinstance(body_priority, bool):
                raise APIError.invalid("priority", f"priority must be an integer, got {body_priority!r}")
            priority = body_priority
        tpot_s = None if tpot_ms is None else tpot_ms / 1000.0
        return ResolvedSLO(cls.name, ttft_ms / 1000.0, tpot_s, priority, cls.sheddable)


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names lower-cased; the first value wins when a name repeats in different cases."""
    out: dict[str, str] = {}
    for key, value in headers.items():
        out.setdefault(key.lower(), value)
    return out


def _header_ms(raw: str, header: str) -> float:
    text = raw.strip()
    value = float(text) if _DECIMAL.match(text) else math.nan
    if not (math.isfinite(value) and value > 0):
        raise APIError.invalid(header, f"{header} must be a positive finite number of milliseconds, got {raw!r}")
    return value
