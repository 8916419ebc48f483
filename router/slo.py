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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, model_validator

from router.api_errors import APIError
from state.config_model import ConfigModel, config_dataclass, located, parse_config

HEADER_CLASS = "x-slo-class"
HEADER_TTFT = "x-slo-ttft-ms"
HEADER_TPOT = "x-slo-tpot-ms"

_DECIMAL = re.compile(r"^(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
ClassName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Positive = Annotated[float, Field(gt=0.0)]  # and finite: the config models refuse NaN and infinity


class SLOConfigError(ValueError):
    """The SLO configuration is invalid; ``path`` names the field (``slo.classes[1].ttft_slo_ms``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@config_dataclass(SLOConfigError)
class SLOClass:
    """One service class: TTFT SLO, optional TPOT SLO (seconds), priority (lower = more urgent), sheddable.

    The one definition of a class, for the router and the benchmarks alike; configuration files
    write the SLOs in milliseconds (:class:`SLOClassConfig`, :meth:`to_dict`).
    """

    name: ClassName
    ttft_slo_s: Positive
    tpot_slo_s: Positive | None = None
    priority: int = 0
    sheddable: bool = False

    @property
    def ttft_slo_ms(self) -> float:
        """The TTFT SLO in milliseconds."""
        return self.ttft_slo_s * 1000.0

    @property
    def tpot_slo_ms(self) -> float | None:
        """The TPOT SLO in milliseconds (None: no TPOT SLO)."""
        return None if self.tpot_slo_s is None else self.tpot_slo_s * 1000.0

    def to_dict(self) -> dict[str, Any]:
        """The config dict (SLOs in ms) this class parses from."""
        return {"name": self.name, "ttft_slo_ms": self.ttft_slo_ms, "tpot_slo_ms": self.tpot_slo_ms,
                "priority": self.priority, "sheddable": self.sheddable}


class SLOClassConfig(ConfigModel):
    """One class as configuration files write it: SLOs in milliseconds."""

    name: ClassName
    ttft_slo_ms: Positive
    tpot_slo_ms: Positive | None = None  # None: no TPOT SLO
    priority: int
    sheddable: bool = False

    def to_class(self) -> SLOClass:
        """The :class:`SLOClass` (SLOs in seconds)."""
        tpot = None if self.tpot_slo_ms is None else self.tpot_slo_ms / 1000.0
        return SLOClass(self.name, self.ttft_slo_ms / 1000.0, tpot, self.priority, self.sheddable)


class SLOPolicyConfig(ConfigModel):
    """The policy as configuration files write it (class names and the default are checked by
    :class:`SLOPolicy`)."""

    classes: Annotated[list[SLOClassConfig], Field(min_length=1)]
    default_class: str


@dataclass(frozen=True)
class ResolvedSLO:
    """A request's SLO after resolution: class name, TTFT/TPOT SLOs in seconds, priority, sheddable."""

    class_name: str
    ttft_slo_s: float
    tpot_slo_s: float | None
    priority: int
    sheddable: bool


@config_dataclass(SLOConfigError)
class SLOPolicy:
    """The configured SLO classes and the default one; resolves requests to a :class:`ResolvedSLO`."""

    classes: Annotated[tuple[SLOClass, ...], Field(min_length=1, strict=False)]
    default_class: str

    @model_validator(mode="after")
    def _names(self) -> SLOPolicy:
        names = [c.name for c in self.classes]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise located(("classes", i, "name"), f"duplicate class name {name!r}", name)
        if self.default_class not in names:
            raise located(("default_class",), f"must name one of the classes {sorted(names)}", self.default_class)
        return self

    @classmethod
    def from_dict(cls, data: object, path: str = "slo") -> SLOPolicy:
        """Parse ``{"default_class": ..., "classes": [...]}``; errors name the path (``slo.classes[1].name``)."""
        config = parse_config(SLOPolicyConfig, data, SLOConfigError, path)
        classes = tuple(c.to_class() for c in config.classes)
        return parse_config(cls, {"classes": classes, "default_class": config.default_class}, SLOConfigError, path)

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
