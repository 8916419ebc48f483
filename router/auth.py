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
from typing import Any

import yaml

from router.api_errors import APIError

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
    if not isinstance(data, list):
        raise AccessConfigError(f"{path}: must be a list of key entries")
    return [_entry(path, i, item, env) for i, item in enumerate(data)]


def _entry(path: Path, i: int, item: Any, env: Mapping[str, str]) -> APIKey:  # noqa: ANN401
    where = f"{path}: [{i}]"
    if not isinstance(item, Mapping):
        raise AccessConfigError(f"{where}: must be a mapping")
    unknown = sorted(set(item) - {"name", "key", "key_env", "allowed_classes", "rate_limit_rps", "burst"})
    if unknown:
        raise AccessConfigError(f"{where}.{unknown[0]}: unknown field")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise AccessConfigError(f"{where}.name: must be a non-empty string")
    if ("key" in item) == ("key_env" in item):
        raise AccessConfigError(f"{where}.key: give exactly one of key and key_env")
    if "key_env" in item:
        secret = env.get(str(item["key_env"]), "")
        if not secret:
            raise AccessConfigError(f"{where}.key_env: environment variable {item['key_env']!r} is unset or empty")
    else:
        secret = item["key"]
        if not isinstance(secret, str) or len(secret) < 8:
            raise AccessConfigError(f"{where}.key: must be a string of at least 8 characters")
    classes = item.get("allowed_classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise AccessConfigError(f"{where}.allowed_classes: must be a list of SLO class names")
    rate = item.get("rate_limit_rps")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0
                             or not math.isfinite(rate)):
        raise AccessConfigError(f"{where}.rate_limit_rps: must be a positive number")
    burst = item.get("burst", max(1.0, 2.0 * rate) if rate else 1.0)
    if isinstance(burst, bool) or not isinstance(burst, int | float) or not burst >= 1 or not math.isfinite(burst):
        raise AccessConfigError(f"{where}.burst: must be a number >= 1")
    return APIKey(name, secret.encode(), frozenset(classes) if classes is not None else None,
                  float(rate) if rate is not None else None, float(burst))
