"""A model-free replica engine: streams the prompt's tokens back, for router benchmarks.

It implements :class:`~replicas.engine_api.ReplicaEngineAPI` exactly like the native engine
(queue state, cost model, abort on close), so the router, Redis publishing and the HTTP path run
unchanged while no forward pass costs anything.  ``prefill_s_per_1k_tokens`` and ``decode_step_s``
make it take time (an ``asyncio`` sleep, no CPU) when a benchmark wants a queue to form.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from pydantic import NonNegativeFloat, PositiveInt

from replicas.engine_config import EngineConfigError
from replicas.engine_stats import EngineStats
from replicas.engine_types import RequestOutput
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from replicas.scheduler.stats import QueueEntry
from replicas.ttft_parts import EngineTTFT
from state.clock import WALL_CLOCK, Clock, require_clock
from state.config_model import config_dataclass, parse_config


@config_dataclass(EngineConfigError)
class EchoConfig:
    """Settings of the echo engine (``model``: the directory whose tokenizer decodes the echo)."""

    model: str | None = None
    prefill_s_per_1k_tokens: NonNegativeFloat = 0.0
    decode_step_s: NonNegativeFloat = 0.0
    max_model_len: PositiveInt = 8192

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], prefix: str = "engine") -> EchoConfig:
        """Validate a mapping; unknown keys and bad values are refused with their path."""
        return parse_config(cls, data, EngineConfigError, prefix)


class EchoEngine:
    """Echoes each prompt (up to ``max_tokens``), one output per token."""

    kind = "echo"

    def __init__(self, config: EchoConfig, *, clock: Clock = WALL_CLOCK,
                 on_state_change: Callable[[EngineStats], None] | None = None) -> None:
        from replicas.model.default_model import prepare_default_model
        from replicas.model.tokenizer import Tokenizer

        self.config = config
        self.model_dir = config.model or str(prepare_default_model())
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.cost_model = CostModel.from_coefficients(0.0, config.prefill_s_per_1k_tokens / 1000.0, model="echo",
                                                      hardware="echo")
        self.clock = require_clock(clock, "EchoEngine")
        self.on_state_change = on_state_change
        self._live: dict[str, tuple[Request, float]] = {}  # request id -> (request, predicted end of prefill)
        self._alive = False
        self._publish()

    @property
    def model_name(self) -> str:
        """The served model's directory name (its tokenizer is the echo's)."""
        return f"echo-{self.model_dir.rstrip('/').rsplit('/', 1)[-1]}"

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output accepted."""
        return self.config.max_model_len

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return self.tokenizer.vocab_size

    @property
    def policy_name(self) -> str:
        """No scheduling policy: requests run concurrently."""
        return "echo"

    def prefix_naming(self) -> dict[str, object] | None:
        """No prefix cache."""
        return None

    def start(self) -> None:
        """Mark the engine alive (there is no loop thread)."""
        self._alive = True

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Mark the engine stopped."""
        self._alive = False

    def is_alive(self) -> bool:
        """Whether :meth:`start` ran and :meth:`shutdown` did not."""
        return self._alive

    def stats(self) -> EngineStats:
        """The latest queue-state snapshot (every live request counts as running)."""
        return self._stats

    async def generate(self, request: Request, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream the first ``max_tokens`` prompt tokens back, one per output."""
        prefill_s = self.config.prefill_s_per_1k_tokens * request.num_prompt_tokens / 1000.0
        accepted = self.clock()
        self._live[request.request_id] = (request, accepted + prefill_s)
        self._publish()
        try:
            if prefill_s > 0:
                await asyncio.sleep(prefill_s)
            echo = request.prompt_ids[: params.max_tokens]
            first_at: float | None = None
            for i, token in enumerate(echo):
                if i and self.config.decode_step_s > 0:
                    await asyncio.sleep(self.config.decode_step_s)
                last = i == len(echo) - 1
                if first_at is None:
                    first_at = self.clock()
                    self._live.pop(request.request_id, None)
                    self._publish()
                for index in range(params.n):  # every choice echoes the same tokens
                    start = i == 0 and index == 0
                    yield RequestOutput(
                        request.request_id, (token,), self.tokenizer.decode([token]), "length" if last else None,
                        request.num_prompt_tokens, i + 1,
                        ttft_s=(first_at - request.arrival_s) if start else None,
                        # no queue here: its "prefill" is the wait it simulates
                        ttft_timing=EngineTTFT(accepted, first_at, 0.0, first_at - accepted, 0.0, 0.0) if start
                        else None, index=index, choices_left=params.n - index - 1 if last else params.n,
                    )
        finally:
            if self._live.pop(request.request_id, None) is not None:
                self._publish()

    def _publish(self) -> None:
        now = self.clock()
        running = tuple(QueueEntry(rid, req.deadline, max(end - now, 0.0), req.num_prompt_tokens)
                        for rid, (req, end) in self._live.items())
        remaining = max((r.predicted_remaining_s for r in running), default=0.0)
        self._stats = EngineStats(self.model_name, now, policy=self.policy_name, running=running,
                                  running_remaining_s=remaining, pending_work_s=remaining,
                                  kv_free_tokens=self.config.max_model_len * 64)
        if self.on_state_change is not None:
            self.on_state_change(self._stats)
