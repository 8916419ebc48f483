"""Optional API keys: who may call, which SLO classes each key may use, and how fast.

Off unless configured.  Keys come from ``FLOWPREFILL_API_KEYS`` (comma-separated keys: every
class, no rate limit) and/or a file named by ``FLOWPREFILL_API_KEYS_FILE`` (or the app's
``api_keys_file`` setting), a JSON or YAML list of entries::

    - name: web-frontend        # shown in logs and errors instead of the key
      key: sk-...               # the Bearer token (or key_env: NAME to read it from the environment)
      allowed_classes: [interactive, standard]   # omitted: every class
      rate_limit_rps: 20        # omitted: unlimited; a token bucket per key and ingress replica
      burst: 40                 # bucket size (default: 2 s worth of the rate, at least 1)

Clients send ``Authorization: Bearer <key>`` (HTTP) or the ``authorization`` metadata (gRPC).
A missing or unknown key is a 401, a class the key may not use a 403, a key over its rate a 429
with ``Retry-After``.  Keys are compared in constant time (``hmac.compare_digest`` against every
configured key, so the time does not tell which one nearly matched) and never logged.
``/health`` stays open; ``/metrics`` needs a key when ``protect_metrics`` is set.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, PositiveFloat, model_validator

from router.api_errors import APIError
from state.config_model import ConfigModel, located, parse_config

ENV_KEYS = "FLOWPREFILL_API_KEYS"
ENV_KEYS_FILE = "FLOWPREFILL_API_KEYS_FILE"


class AccessConfigError(ValueError):
    """A bad API-key file or setting; the message names the file and the field."""


@dataclass
class APIKey:
    """One key with its allowed SLO classes (None: all) and token bucket."""

    name: str
    secret: bytes = field(repr=False)
    allowed_classes: frozenset[str] | None = None
    rate_limit_rps: float | None = None
    burst: float = 1.0
    _tokens: float = field(default=0.0, repr=False)
    _updated: float | None = field(default=None, repr=False)

    def take(self, now: float) -> float:
        """Spend one request from the bucket; returns 0.0, or the seconds until one is available."""
        if self.rate_limit_rps is None:
            return 0.0
        if self._updated is None:
            self._tokens, self._updated = self.burst, now
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_limit_rps)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_limit_rps


class AccessPolicy:
    """The configured keys (empty: access control off)."""

    def __init__(self, keys: list[APIKey], protect_metrics: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = keys
        self.protect_metrics = protect_metrics
        self.clock = clock

    @property
    def enabled(self) -> bool:
        """Whether any key is configured."""
        return bool(self.keys)

    @classmethod
    def from_sources(cls, env: Mapping[str, str] | None = None, keys_file: str | None = None,
                     protect_metrics: bool = False) -> AccessPolicy:
        """Keys from the environment variable and the file (the setting, else the file env var)."""
        env = os.environ if env is None else env
        keys: list[APIKey] = []
        for i, raw in enumerate(k.strip() for k in env.get(ENV_KEYS, "").split(",")):
            if raw:
                keys.append(APIKey(f"{ENV_KEYS}[{i}]", raw.encode()))
        path = keys_file or env.get(ENV_KEYS_FILE)
        if path:
            keys.extend(_load_file(Path(path), env))
        names = [k.name for k in keys]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise AccessConfigError(f"{path or ENV_KEYS}: API key name {dup!r} is used twice")
        return cls(keys, protect_metrics)

    def authenticate(self, authorization: str | None) -> APIKey | None:
        """The key of an ``Authorization`` value (None when access control is off); 401 otherwise."""
        if not self.keys:
            return None
        token = b""
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer":
                token = value.strip().encode()
        if not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", param="authorization",
                           type="authentication_error", code="invalid_api_key")
        match = None
        for key in self.keys:  # compare against every key: the time does not depend on which matched
            if hmac.compare_digest(key.secret, token) and match is None:
                match = key
        if match is None:
            raise APIError(401, "invalid API key", param="authorization", type="authentication_error",
                           code="invalid_api_key")
        return match

    def authorize(self, key: APIKey | None, slo_class: str) -> None:
        """403 when ``key`` may not use ``slo_class``; 429 when it is over its rate."""
        if key is None:
            return
        if key.allowed_classes is not None and slo_class not in key.allowed_classes:
            allowed = ", ".join(sorted(key.allowed_classes))
            raise APIError(403, f"API key {key.name!r} may not use SLO class {slo_class!r} (allowed: {allowed})",
                           param="x-slo-class", type="permission_error", code="slo_class_not_allowed")
        wait = key.take(self.clock())
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise APIError(429, f"API key {key.name!r} is over its rate limit of {key.rate_limit_rps:g} requests/s",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})


class APIKeyEntry(ConfigModel):
    """One entry of the API-key file (see the module docstring)."""

    name: Annotated[str, Field(min_length=1)]
    key: Annotated[str, Field(min_length=8)] | None = None
    key_env: Annotated[str, Field(min_length=1)] | None = None
    allowed_classes: list[str] | None = None
    rate_limit_rps: PositiveFloat | None = None
    burst: Annotated[float, Field(ge=1.0)] | None = None  # None: 2 s worth of the rate, at least 1

    @model_validator(mode="after")
    def _one_secret(self) -> APIKeyEntry:
        if (self.key is None) == (self.key_env is None):
            raise located(("key",), "give exactly one of key and key_env", None)
        return self


def _load_file(path: Path, env: Mapping[str, str]) -> list[APIKey]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise AccessConfigError(f"{path}: cannot read the API key file ({exc.strerror})") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else (
            f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "")
        raise AccessConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}{where}") from exc

    def error(field: str, message: str) -> AccessConfigError:
        return AccessConfigError(f"{path}: {field}: {message}" if field else f"{path}: {message}")

    entries = parse_config(list[APIKeyEntry], data, error, "", hide=frozenset({"key"}))  # a key is never shown
    keys: list[APIKey] = []
    for i, entry in enumerate(entries):
        secret = entry.key if entry.key is not None else env.get(str(entry.key_env), "")
        if not secret:
            raise error(f"[{i}].key_env", f"environment variable {entry.key_env!r} is unset or empty")
        rate = entry.rate_limit_rps
        burst = entry.burst if entry.burst is not None else (max(1.0, 2.0 * rate) if rate else 1.0)
        allowed = frozenset(entry.allowed_classes) if entry.allowed_classes is not None else None
        keys.append(APIKey(entry.name, secret.encode(), allowed, rate, burst))
    return keys
