"""Settings of one replica engine, a strict pydantic dataclass (no torch: the deployment and the
launcher validate settings without loading a model).

The same dataclass is built from CLI flags, from ``ray_config.yaml`` (the replica deployment's
``engine`` section, :meth:`EngineConfig.from_dict`) and from tests; an unknown or bad field is
refused with its path (:mod:`state.config_model`). Validation runs once, when the config is built:
the engine reads plain dataclass attributes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt

from replicas.model.config import DTYPE_NAMES
from replicas.scheduler.config import DEFAULT_CHUNK_TOKENS, GRANULARITIES
from state.config_model import config_dataclass, parse_config
from state.fields import FieldError

ROLES = ("colocated", "prefill", "decode")  # what a replica does (replicas/handover.py)


class EngineConfigError(FieldError):
    """A bad engine setting; ``field`` names it (dotted path from the config root)."""


@config_dataclass(EngineConfigError)
class EngineConfig:
    """What one replica runs and how (the paper's defaults where it has them)."""

    model: str | None = None  # HF model directory; None = the prepared SmolLM2 default
    dtype: Literal[DTYPE_NAMES] = "float32"
    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?)$")] = "cpu"
    kv_cache_bytes: PositiveInt = 1 << 30
    block_size: PositiveInt = 16
    enable_prefix_caching: bool = True  # reuse the KV of prompt prefixes computed before (replicas/kv_blocks.py)
    # at most this share of the KV pool holds cached blocks no request uses
    prefix_cache_share: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    granularity: Literal[GRANULARITIES] = "block"
    max_inflight: PositiveInt = 2  # CUDA launch-ahead bound K (operators in flight)
    chunk_tokens: PositiveInt = DEFAULT_CHUNK_TOKENS  # long prompts run in passes of this many tokens
    policy: Literal["flowprefill", "chunked", "fcfs"] = "flowprefill"
    alpha: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1  # SLO-aware batching margin (fraction of the TTFT SLO)
    short_threshold: PositiveInt = 2048  # prompts up to this length may be batched together
    batch_token_budget: PositiveInt = 8192
    policy_chunk_tokens: PositiveInt = 512  # C for the `chunked` baseline
    max_suspended_batches: PositiveInt = 8
    admission_control: bool = False
    # refuse requests predicted this many times past their TTFT SLO
    late_reject_factor: Annotated[float, Field(ge=1.0)] | None = None
    max_queued_work_s: Annotated[float, Field(gt=0.0)] | None = None  # refuse arrivals beyond this predicted work
    # refusals by lateness keep the capacity tighter SLO classes offered over this many recent seconds
    urgent_reserve_window_s: Annotated[float, Field(gt=0.0)] | None = 5.0
    calibrate_cost: bool = True  # scale the profiled cost model by the measured slowdown under load
    default_tpot_slo_s: Annotated[float, Field(gt=0.0)] = 0.5  # decode cadence target without a TPOT SLO
    max_waiting: PositiveInt = 1024  # queue bound: arrivals beyond it are rejected (memory stays bounded)
    max_decoding: PositiveInt = 64  # sequences decoding at once
    profile: str | None = None  # cost-model JSON; None = cached profile or profile at start-up
    profile_max_tokens: PositiveInt = 2048
    # Torch intra-op threads of a CPU replica; None = every core this process may run on (the
    # launcher fills it in, splitting the machine between its replicas). Ray sets OMP_NUM_THREADS
    # to an actor's CPU share (1 for ``replica_cpus: 1.0``), which would leave a one-replica node
    # with a single compute thread.
    cpu_threads: PositiveInt | None = None
    # colocated: prefill and decode here (the default); prefill: hand each request over after its first
    # token (replicas/handover.py); decode: admit handed-over requests into the decode batch
    role: Literal[ROLES] = "colocated"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], prefix: str = "engine") -> EngineConfig:
        """Build from a mapping (e.g. YAML); unknown keys and bad values are refused with their path."""
        return parse_config(cls, data, EngineConfigError, prefix)


def cpu_threads_of(config: EngineConfig) -> int:
    """The torch threads a CPU replica of ``config`` computes with (``cpu_threads``, else every usable core)."""
    return config.cpu_threads or usable_cores()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not Linux
        return max(os.cpu_count() or 1, 1)
