"""Shared pytest fixtures: tiny seeded checkpoints and the SmolLM2 default model."""

from __future__ import annotations

import os

# Ray reads its network settings when first imported, and several test modules import it (through
# router.request_router) before the serving tests start Ray: set them before anything imports ray,
# so every Ray listener stays on the node IP 127.0.0.1 (see cluster/launcher.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from replicas.model.tiny import build_tiny_checkpoint

TinyFactory = Callable[..., Path]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip, saying why, where torch sees no CUDA device (tests/devices.py)."""
    import torch

    if torch.cuda.is_available():
        return
    from tests.devices import CUDA_SKIP_REASON

    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> TinyFactory:
    """``factory(arch="llama", **kwargs) -> Path``: a tiny checkpoint, built once per argument set.

    The returned directories are shared across the session: treat them as read-only.
    """
    built: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def factory(arch: str = "llama", **kwargs: Any) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **kwargs)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (about a minute the first time, then cached).

    Uses ``$FLOWPREFILL_CACHE`` (default ``~/.cache/flowprefill``). Tests using it should be ``slow``.
    """
    from replicas.model.default_model import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def redis_server() -> Any:
    """A private ``redis-server`` on 127.0.0.1 for the whole session (tests use unique namespaces).

    Tests that stop, restart or password-protect a server start their own instead.
    """
    from state.redis_server import RedisServer

    server = RedisServer()
    try:
        yield server
    finally:
        server.close()
