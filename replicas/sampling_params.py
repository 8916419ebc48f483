"""Sampling parameters and their validation (no torch: the router and every engine kind use them).

The batched sampler that applies them to logits is :mod:`replicas.sampling`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from replicas.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1
# Temperatures below this are treated as greedy: dividing logits by them overflows float32.
MIN_TEMPERATURE = 1e-5


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type_name(value: object) -> str:
    return type(value).__name__


def _normalise_stop(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, list | tuple):
        raise InvalidRequestError("stop", f"stop must be a string or a list of strings, got {_type_name(value)}")
    if len(value) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", f"stop allows at most {MAX_STOP_STRINGS} strings, got {len(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s:
            raise InvalidRequestError("stop", f"stop[{i}] must be a non-empty string, got {s!r}")
    return tuple(value)


def _normalise_stop_token_ids(value: object) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidRequestError(
            "stop_token_ids", f"stop_token_ids must be a list of integers, got {_type_name(value)}"
        )
    for i, t in enumerate(value):
        if not _is_int(t) or t < 0:
            raise InvalidRequestError(
                "stop_token_ids", f"stop_token_ids[{i}] must be a non-negative integer, got {t!r}"
            )
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    ``temperature`` 0 means greedy; ``top_k`` 0 or -1 disables top-k (stored as 0); ``stop`` also
    accepts a single string or a list and is stored as a tuple. Invalid values raise
    :class:`InvalidRequestError` naming the field.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidRequestError("temperature", f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not _is_number(p) or not math.isfinite(p) or not 0 < p <= 1:
            raise InvalidRequestError("top_p", f"top_p must be in (0, 1], got {p!r}")
        k = self.top_k
        if not _is_int(k) or k < -1:
            raise InvalidRequestError("top_k", f"top_k must be -1, 0 (disabled) or an integer >= 1, got {k!r}")
        s = self.seed
        if s is not None and (not _is_int(s) or not 0 <= s <= MAX_SEED):
            raise InvalidRequestError("seed", f"seed must be an integer in [0, 2**63 - 1] or null, got {s!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "top_k", max(k, 0))
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SamplingParams:
        """Build from a request body; unknown keys are rejected, ``None`` values mean "use the default"."""
        if not isinstance(data, Mapping):
            raise InvalidRequestError("sampling_params", f"sampling_params must be an object, got {_type_name(data)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            names = ", ".join(repr(key) for key in unknown)
            raise InvalidRequestError(unknown[0], f"unknown sampling parameter(s): {names}")
        return cls(**{key: value for key, value in data.items() if value is not None})

    @property
    def is_greedy(self) -> bool:
        """True when the argmax token is always chosen (temperature ~0 or top_k == 1)."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def needs_filter(self) -> bool:
        """True when sampling must restrict the vocabulary (top-k or top-p active)."""
        return self.top_k > 0 or self.top_p < 1.0
