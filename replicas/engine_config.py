"""Settings of one replica engine, validated field by field (no torch: the deployment and the
launcher validate settings without loading a model).

The same dataclass is built from CLI flags, from ``ray_config.yaml`` (the replica deployment's
``engine`` section) and from tests; an unknown or bad field is refused with its name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from replicas.model.config import DTYPE_NAMES
from replicas.scheduler.config import DEFAULT_CHUNK_TOKENS, GRANULARITIES
from state.fields import FieldError

ROLES = ("colocated", "prefill", "decode")  # what a replica does (replicas/handover.py)


class EngineConfigError(FieldError):
    """A bad engine setting; ``field`` names it (dotted path from the config root)."""


@dataclass(frozen=True)
class EngineConfig:
    """What one replica runs and how (the paper's defaults where it has them)."""

    model: str | None = None  # HF model directory; None = the prepared SmolLM2 default
    dtype: str = "float32"
    device: str = "cpu"
    kv_cache_bytes: int = 1 << 30
    block_size: int = 16
    enable_prefix_caching: bool = True  # reuse the KV of prompt prefixes computed before (replicas/kv_blocks.py)
    prefix_cache_share: float = 1.0  # at most this share of the KV pool holds cached blocks no request uses
    granularity: str = "block"
    max_inflight: int = 2  # CUDA launch-ahead bound K (operators in flight)
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # long prompts run in passes of this many tokens
    policy: str = "flowprefill"  # flowprefill | chunked | fcfs
    alpha: float = 0.1  # SLO-aware batching margin, as a fraction of the head's TTFT SLO
    short_threshold: int = 2048  # prompts up to this length may be batched together
    batch_token_budget: int = 8192
    policy_chunk_tokens: int = 512  # C for the `chunked` baseline
    max_suspended_batches: int = 8
    admission_control: bool = False
    late_reject_factor: float | None = None  # refuse requests predicted this many times past their TTFT SLO
    max_queued_work_s: float | None = None  # refuse arrivals beyond this much predicted prefill work
    # refusals by lateness keep the capacity tighter SLO classes offered over this many recent seconds
    urgent_reserve_window_s: float | None = 5.0
    calibrate_cost: bool = True  # scale the profiled cost model by the measured slowdown under load
    default_tpot_slo_s: float = 0.5  # decode cadence target when a request names no TPOT SLO
    max_waiting: int = 1024  # queue bound: arrivals beyond it are rejected (memory stays bounded)
    max_decoding: int = 64  # sequences decoding at once
    profile: str | None = None  # cost-model JSON; None = cached profile or profile at start-up
    profile_max_tokens: int = 2048
    # Torch intra-op threads of a CPU replica; None = every core this process may run on (the
    # launcher fills it in, splitting the machine between its replicas). Ray sets OMP_NUM_THREADS
    # to an actor's CPU share (1 for ``replica_cpus: 1.0``), which would leave a one-replica node
    # with a single compute thread.
    cpu_threads: int | None = None
    # colocated: prefill and decode here (the default); prefill: hand each request over after its first
    # token (replicas/handover.py); decode: admit handed-over requests into the decode batch
    role: str = "colocated"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        positive_ints = ("kv_cache_bytes", "block_size", "max_inflight", "chunk_tokens", "short_threshold",
                         "batch_token_budget", "policy_chunk_tokens", "max_suspended_batches", "max_waiting",
                         "max_decoding", "profile_max_tokens")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EngineConfigError(name, f"must be a positive integer, got {value!r}")
        for name in ("alpha", "default_tpot_slo_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise EngineConfigError(name, f"must be a finite number, got {value!r}")
        if not 0 <= self.alpha < 1:
            raise EngineConfigError("alpha", f"must be in [0, 1), got {self.alpha}")
        if self.default_tpot_slo_s <= 0:
            raise EngineConfigError("default_tpot_slo_s", "must be positive")
        if self.dtype not in DTYPE_NAMES:
            raise EngineConfigError("dtype", f"must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise EngineConfigError("device", f"must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.granularity not in GRANULARITIES:
            raise EngineConfigError("granularity",
                                    f"must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.role not in ROLES:
            raise EngineConfigError("role", f"must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.policy not in ("flowprefill", "chunked", "fcfs"):
            raise EngineConfigError("policy", f"must be flowprefill, chunked or fcfs, got {self.policy!r}")
        for name in ("admission_control", "calibrate_cost", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise EngineConfigError(name, "must be true or false")
        share = self.prefix_cache_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 <= share <= 1.0:
            raise EngineConfigError("prefix_cache_share", f"must be a number in [0, 1], got {share!r}")
        if self.cpu_threads is not None and (isinstance(self.cpu_threads, bool)
                                             or not isinstance(self.cpu_threads, int) or self.cpu_threads <= 0):
            raise EngineConfigError("cpu_threads", f"must be null or a positive integer, got {self.cpu_threads!r}")
        for name, low in (("late_reject_factor", 1.0), ("max_queued_work_s", 0.0), ("urgent_reserve_window_s", 0.0)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value < math.inf \
                    or value == 0:
                raise EngineConfigError(name, f"must be null or a finite number >= {low:g} (and > 0), got {value!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], prefix: str = "engine") -> EngineConfig:
        """Build from a mapping (e.g. YAML); unknown keys are refused with their path."""
        if not isinstance(data, Mapping):
            raise EngineConfigError(prefix, f"must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if f.name != "extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EngineConfigError(f"{prefix}.{unknown[0]}", f"unknown setting (known: {', '.join(sorted(known))})")
        try:
            return cls(**dict(data))
        except EngineConfigError as exc:
            raise EngineConfigError(f"{prefix}.{exc.field}", str(exc).split(": ", 1)[1]) from None
        except TypeError as exc:  # a wrong type slipped past the checks above
            raise EngineConfigError(prefix, str(exc)) from None


def cpu_threads_of(config: EngineConfig) -> int:
    """The torch threads a CPU replica of ``config`` computes with (``cpu_threads``, else every usable core)."""
    return config.cpu_threads or usable_cores()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not Linux
        return max(os.cpu_count() or 1, 1)
