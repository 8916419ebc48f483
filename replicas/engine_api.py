"""The replica-engine interface: what a Serve replica needs from the engine inside it.

:class:`~replicas.deployment.ReplicaServer` talks to its engine only through
:class:`ReplicaEngineAPI`, so the same deployment (Redis registration, queue-state publishing,
streaming, health) serves every engine kind:

* ``flowprefill``: the native engine (:class:`replicas.engine.ReplicaEngine`): operator-level
  preemptive prefill under the event-driven scheduler.
* ``echo``: a model-free engine (:class:`replicas.echo_engine.EchoEngine`) that streams the prompt
  back at a configured speed; it isolates the router and the HTTP path in benchmarks.
* ``vllm``: vLLM's OpenAI server as a child process in its own environment
  (:class:`replicas.vllm_engine.VLLMEngine`), priorities from deadlines.

An engine is built by :func:`make_engine` from its kind and its settings mapping (validated,
errors name the field under ``prefix``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from replicas.engine_stats import EngineStats
from replicas.engine_types import RequestOutput
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from state.clock import WALL_CLOCK, Clock

ENGINE_KINDS = ("flowprefill", "echo", "vllm")

StateCallback = Callable[[EngineStats], None]


class ReplicaEngineAPI(Protocol):
    """One replica's engine.

    ``stats()`` returns the latest queue-state snapshot (:class:`~replicas.engine_stats.EngineStats`);
    the engine calls ``on_state_change(stats)`` after every event (from any thread). Timestamps are
    epoch seconds from the engine's :class:`~state.clock.Clock`.  ``generate`` streams a
    request's outputs; closing the stream early aborts the request and frees its memory.
    """

    kind: str
    cost_model: CostModel
    on_state_change: StateCallback | None

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def policy_name(self) -> str: ...

    def prefix_naming(self) -> dict[str, object] | None:
        """How the engine names prompt prefixes for placement (``PrefixNaming.to_dict()``), or None."""

    def start(self) -> None: ...

    def shutdown(self, timeout_s: float = 10.0) -> None: ...

    def is_alive(self) -> bool: ...

    def generate(self, request: Request, params: SamplingParams) -> AsyncIterator[RequestOutput]: ...

    def stats(self) -> EngineStats: ...


def make_engine(
    kind: str, settings: Mapping[str, Any], *, on_state_change: StateCallback | None, clock: Clock = WALL_CLOCK,
    prefix: str = "engine",
) -> ReplicaEngineAPI:
    """Build the ``kind`` engine from ``settings`` (raises ``EngineConfigError`` naming the field)."""
    from replicas.engine_config import EngineConfigError

    if kind == "flowprefill":
        from replicas.engine import ReplicaEngine
        from replicas.engine_config import EngineConfig

        return ReplicaEngine(EngineConfig.from_dict(settings, prefix=prefix), clock=clock,
                             on_state_change=on_state_change)
    if kind == "echo":
        from replicas.echo_engine import EchoConfig, EchoEngine

        return EchoEngine(EchoConfig.from_dict(settings, prefix=prefix), clock=clock, on_state_change=on_state_change)
    if kind == "vllm":
        from replicas.vllm_engine import VLLMConfig, VLLMEngine

        config = VLLMConfig.from_dict(settings, prefix=prefix)
        config.check_environment(prefix)
        return VLLMEngine(config, clock=clock, on_state_change=on_state_change)
    raise EngineConfigError("engine_kind", f"must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
