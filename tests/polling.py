"""Bounded polling for integration tests that wait on other processes (Ray actors, servers).

Deterministic scheduler tests use an injected clock instead; this is only for state that lives in
another process and has no event to wait on from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str, timeout_s: float = 60.0, interval_s: float = 0.2) -> T:
    """Poll ``predicate()`` until it returns something truthy and return that; fail after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")
