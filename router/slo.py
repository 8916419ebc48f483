"""SLO classes as router configuration, and resolving a request's SLO from headers and body.

The policy is read from a dict (the router deployment's ``user_config``/args in ``ray_config.yaml``)::

    {"default_class": "standard",
     "classes": [{"name": "interactive", "ttft_slo_ms": 300, "tpot_slo_ms": 100,
                  "priority": 0, "sheddable": false}, ...]}

``name``, ``ttft_slo_ms`` and ``priority`` are required; ``tpot_slo_ms`` defaults to null (no TPOT
SLO) and ``sheddable`` to false. Errors name the field path, e.g. ``slo.classes[1].ttft_slo_ms``.
Priorities follow vLLM: a lower number is more urgent. :class:`SLOClass` is the one definition
of a class (SLOs in seconds); the benchmarks build theirs from it too (:mod:`bench.slo_classes`).

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


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class SLOClass:
    """One service class: TTFT SLO, optional TPOT SLO (seconds), priority (lower = more urgent), sheddable.

    The one definition of a class, for the router and the benchmarks alike; configuration files
    write the SLOs in milliseconds (:meth:`from_dict`, :meth:`to_dict`).
    """

    name: str
    ttft_slo_s: float
    tpot_slo_s: float | None = None
    priority: int = 0
    sheddable: bool = False

    def __post_init__(self) -> None:
        self._check("", "_s", 1.0)

    def _check(self, path: str, unit: str, scale: float) -> None:
        if not isinstance(self.name, str) or not _CLASS_NAME.match(self.name):
            raise SLOConfigError(f"{path}name", f"must be 1-64 characters of [A-Za-z0-9_.-], got {self.name!r}")
        if not _positive(self.ttft_slo_s):
            raise SLOConfigError(f"{path}ttft_slo{unit}",
                                 f"must be a finite number > 0, got {self.ttft_slo_s * scale!r}")
        if self.tpot_slo_s is not None and not _positive(self.tpot_slo_s):
            raise SLOConfigError(f"{path}tpot_slo{unit}",
                                 f"must be null or a finite number > 0, got {self.tpot_slo_s * scale!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise SLOConfigError(f"{path}priority", f"must be an integer, got {self.priority!r}")
        if not isinstance(self.sheddable, bool):
            raise SLOConfigError(f"{path}sheddable", f"must be a boolean, got {self.sheddable!r}")

    @property
    def ttft_slo_ms(self) -> float:
        """The TTFT SLO in milliseconds."""
        return self.ttft_slo_s * 1000.0

    @property
    def tpot_slo_ms(self) -> float | None:
        """The TPOT SLO in milliseconds (None: no TPOT SLO)."""
        return None if self.tpot_slo_s is None else self.tpot_slo_s * 1000.0

    @classmethod
    def from_dict(cls, data: object, path: str = "class") -> SLOClass:
        """Parse one class of the config form (SLOs in ms, see the module docstring); errors name
        ``{path}.{field}``."""
        if not isinstance(data, Mapping):
            raise SLOConfigError(path, f"must be an object, got {type(data).__name__}")
        for key in data:
            if key not in _CLASS_KEYS:
                raise SLOConfigError(f"{path}.{key}", f"unknown field; expected one of {list(_CLASS_KEYS)}")
        for key in ("name", "ttft_slo_ms", "priority"):
            if key not in data:
                raise SLOConfigError(f"{path}.{key}", "is required")
        ttft, tpot = data["ttft_slo_ms"], data.get("tpot_slo_ms")
        for key, value in (("ttft_slo_ms", ttft), ("tpot_slo_ms", tpot)):
            if value is not None and not _positive(value):  # before converting: name the ms field and value
                raise SLOConfigError(f"{path}.{key}", f"must be {'null or ' if key == 'tpot_slo_ms' else ''}"
                                     f"a finite number > 0, got {value!r}")
        if ttft is None:
            raise SLOConfigError(f"{path}.ttft_slo_ms", "must be a finite number > 0, got None")
        obj = object.__new__(cls)
        for key, value in (("name", data["name"]), ("ttft_slo_s", ttft / 1000.0),
                           ("tpot_slo_s", None if tpot is None else tpot / 1000.0),
                           ("priority", data["priority"]), ("sheddable", data.get("sheddable", False))):
            object.__setattr__(obj, key, value)
        obj._check(f"{path}.", "_ms", 1000.0)
        return obj

    def to_dict(self) -> dict[str, Any]:
        """The config dict (SLOs in ms) this class parses from."""
        return {"name": self.name, "ttft_slo_ms": self.ttft_slo_ms, "tpot_slo_ms": self.tpot_slo_ms,
                "priority": self.priority, "sheddable": self.sheddable}


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

    classes: tuple[SLOClass, ...]
    default_class: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        self._check("slo")

    def _check(self, path: str) -> None:
        if not self.classes:
            raise SLOConfigError(f"{path}.classes", "must be a non-empty list")
        seen: set[str] = set()
        for i, c in enumerate(self.classes):
            if not isinstance(c, SLOClass):
                raise SLOConfigError(f"{path}.classes[{i}]", f"must be an SLOClass, got {type(c).__name__}")
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
        classes = tuple(SLOClass.from_dict(c, f"{path}.classes[{i}]") for i, c in enumerate(raw))
        if "default_class" not in data:
            raise SLOConfigError(f"{path}.default_class", "is required")
        obj = object.__new__(cls)
        object.__setattr__(obj, "classes", classes)
        object.__setattr__(obj, "default_class", data["default_class"])
        obj._check(path)
        return obj

    @classmethod
    def default(cls) -> SLOPolicy:
        """interactive (300 ms TTFT, 100 ms TPOT, priority 0), standard (1 s, 200 ms, 1) and
        batch (10 s, no TPOT SLO, 2, sheddable); the default class is ``standard``."""
        return cls(
            (
                SLOClass("interactive", 0.3, 0.1, 0, False),
                SLOClass("standard", 1.0, 0.2, 1, False),
                SLOClass("batch", 10.0, None, 2, True),
            ),
            "standard",
        )

    def to_dict(self) -> dict[str, Any]:
        """The config dict this policy parses from."""
        return {"default_class": self.default_class, "classes": [c.to_dict() for c in self.classes]}

    def get(self, name: str) -> SLOClass | None:
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
        ttft_s, tpot_s = cls.ttft_slo_s, cls.tpot_slo_s
        if HEADER_TTFT in lowered:
            ttft_s = _header_ms(lowered[HEADER_TTFT], HEADER_TTFT) / 1000.0
        if HEADER_TPOT in lowered:
            tpot_s = _header_ms(lowered[HEADER_TPOT], HEADER_TPOT) / 1000.0
        priority = cls.priority
        if body_priority is not None:
            if not isinstance(body_priority, int) or isinstance(body_priority, bool):
                raise APIError.invalid("priority", f"priority must be an integer, got {body_priority!r}")
            priority = body_priority
        return ResolvedSLO(cls.name, ttft_s, tpot_s, priority, cls.sheddable)


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
