"""Typed, validated field access over decoded JSON-like data: one style of error for every record.

:class:`FieldReader` reads the fields of a mapping and raises the caller's error, naming the field
by its path (``requests[2].deadline``). The Redis schema (:mod:`state.schema`) and the typed records
that cross process boundaries (the replica request payload, engine stats) all validate through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

MISSING: Any = object()


class FieldError(ValueError):
    """A bad value in a record or setting; ``field`` names it by its path (``engine.dtype``)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
#: Builds the error for ``(field path or None, message)``.
ErrorFactory = Callable[[str | None, str], Exception]


class FieldReader:
    """Fields of ``data`` (a mapping), each checked for its type; errors come from ``error``."""

    def __init__(self, data: object, error: ErrorFactory, path: str = "") -> None:
        self.error, self.path = error, path
        if not isinstance(data, Mapping):
            raise error(path.rstrip(".") or None, f"expected a JSON object, got {type(data).__name__}")
        self.data: Mapping[str, Any] = data

    def fail(self, name: str, message: str) -> Exception:
        """The error for field ``name`` (under this reader's path)."""
        return self.error(self.path + name, message)

    def nested(self, name: str) -> FieldReader:
        """A reader over the object at field ``name``."""
        return FieldReader(self._get(name, MISSING), self.error, f"{self.path}{name}.")

    def item(self, name: str, index: int, value: object) -> FieldReader:
        """A reader over element ``index`` (an object) of the list at field ``name``."""
        return FieldReader(value, self.error, f"{self.path}{name}[{index}].")

    def _get(self, name: str, default: Any) -> Any:
        if name in self.data:
            return self.data[name]
        if default is MISSING:
            raise self.fail(name, "missing")
        return default

    def text(self, name: str, default: Any = MISSING, *, choices: tuple[str, ...] = (),
             non_empty: bool = False) -> Any:
        """A string (``None`` allowed when the default is None)."""
        v = self._get(name, default)
        if v is None and default is None:
            return None
        if not isinstance(v, str):
            raise self.fail(name, f"expected a string, got {v!r}")
        if non_empty and not v:
            raise self.fail(name, "expected a non-empty string")
        if choices and v not in choices:
            raise self.fail(name, f"expected one of {list(choices)}, got {v!r}")
        return v

    def number(self, name: str, default: Any = MISSING, *, minimum: float | None = None,
               positive: bool = False) -> Any:
        """A finite number as a float (``None`` allowed when the default is None)."""
        v = self._get(name, default)
        if v is None and default is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(name, f"expected a finite number, got {v!r}")
        if minimum is not None and v < minimum:
            raise self.fail(name, f"expected a number >= {minimum}, got {v!r}")
        if positive and v <= 0:
            raise self.fail(name, f"expected a number > 0, got {v!r}")
        return float(v)

    def integer(self, name: str, default: Any = MISSING, *, minimum: int | None = None) -> int:
        """An integer (not a bool)."""
        v = self._get(name, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(name, f"expected an integer, got {v!r}")
        if minimum is not None and v < minimum:
            raise self.fail(name, f"expected an integer >= {minimum}, got {v!r}")
        return v

    def boolean(self, name: str, default: Any = MISSING) -> bool:
        """``true`` or ``false``."""
        v = self._get(name, default)
        if not isinstance(v, bool):
            raise self.fail(name, f"expected true or false, got {v!r}")
        return v

    def array(self, name: str, default: Any = MISSING) -> Any:
        """A list or tuple (``None`` allowed when the default is None)."""
        v = self._get(name, default)
        if v is None and default is None:
            return None
        if not isinstance(v, list | tuple):
            raise self.fail(name, f"expected a list, got {type(v).__name__}")
        return v

    def integers(self, name: str, default: Any = MISSING, *, minimum: int = 0, non_empty: bool = False) -> Any:
        """A list of integers ``>= minimum`` as a tuple (``None`` allowed when the default is None)."""
        v = self.array(name, default)
        if v is None:
            return None
        if non_empty and not v:
            raise self.fail(name, "expected a non-empty list")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= minimum for t in v):
            raise self.fail(name, f"expected a list of integers >= {minimum}")
        return tuple(v)

    def obj(self, name: str, default: Any = MISSING) -> dict[str, Any]:
        """A JSON object, as a dict."""
        v = self._get(name, default)
        if not isinstance(v, Mapping):
            raise self.fail(name, f"expected a JSON object, got {type(v).__name__}")
        return dict(v)
