"""What ``flowprefill bench sim`` simulates: :class:`SimBenchConfig` (its CLI flags, validated) and
the inputs a sweep resolves from it: the cost profile, the trace as replayed, the scheduler's
settings and the default KV pool."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.sim.cluster import ROUTER_POLICIES
from bench.sim.kv_transfer import DEFAULT_BANDWIDTH_BYTES_PER_S, DEFAULT_LATENCY_S, KVTransferCost
from bench.sim.pd import PDConfig, split_replicas
from bench.traces import Trace, load_trace
from replicas.cost_profiling import detect_hardware, profile_file_name
from replicas.scheduler.config import SchedulerConfig
from replicas.scheduler.cost_model import CostModel


@dataclass
class SimBenchConfig:
    """What to simulate (CLI flags of ``flowprefill bench sim``)."""

    trace: str
    replicas: tuple[int, ...] = (1, 4, 16, 64, 256)
    router_policies: tuple[str, ...] = ("slo_aware", "round_robin", "pow2")
    policy: str = "flowprefill"
    profile: str | None = None
    length_scale: float = 1 / 16
    max_output_tokens: int = 4
    window_start_s: float = 0.0
    window_s: float | None = None
    requests_per_replica: int = 60
    max_requests: int = 16000
    chunk_tokens: int = 128
    seed: int = 0
    refine_steps: int = 4
    max_steps: int = 12
    staleness_s: float = 0.0
    boundary_delay_s: float = 0.002
    decode_step_s: float | None = None
    decode_curve: tuple[tuple[int, float], ...] = ()
    exec_time_scale: float = 1.0
    seq_overhead_s: float = 0.0
    early_stop: bool = True
    shed: bool = True
    jobs: int = 0  # worker processes, one router policy each (0: one per usable CPU, at most one per policy)
    prefix_mode: str | None = None  # unique | trace | multiturn (None: trace when the trace has block ids)
    prefix_groups: float = 1.0  # keep this fraction of the prefix groups (bench.shared_prefix.sample_prefix_groups)
    kv_cache_tokens: int | None = None  # each replica's KV pool, in tokens (None: the engine's default pool)
    # P/D sweep (pd_ratios non-empty): columns are colocated and each P:D split of every replica count
    pd_ratios: tuple[tuple[int, int], ...] = ()
    tpot_slo_s: float | None = None  # every class's TPOT SLO (P/D sweep default: TPOT_MULTIPLE x a batch-1 step)
    kv_bytes_per_token: int | None = None  # None: from --pd-model (default: the default model) at the profile's dtype
    pd_model: str | None = None
    kv_bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH_BYTES_PER_S
    kv_latency_s: float = DEFAULT_LATENCY_S
    pd_first_token: str = "prefill"

    def __post_init__(self) -> None:
        bad = [p for p in self.router_policies if p not in ROUTER_POLICIES]
        if bad or not self.router_policies:
            raise ValueError(f"--router-policies: unknown {bad}; expected some of {ROUTER_POLICIES}")
        if not self.replicas or min(self.replicas) < 1:
            raise ValueError(f"--replicas: need positive counts, got {self.replicas}")
        if self.jobs < 0:
            raise ValueError(f"--jobs: need 0 (automatic) or a positive count, got {self.jobs}")
        if self.pd_ratios:
            for n in self.replicas:
                split_replicas(n, (1, 1))  # every count must hold a prefill and a decode replica
            PDConfig(1, 1, self.transfer, self.pd_first_token)  # validates the handover settings
        if self.tpot_slo_s is not None and not self.tpot_slo_s > 0:
            raise ValueError(f"--tpot-slo-s: must be positive, got {self.tpot_slo_s}")

    @property
    def transfer(self) -> KVTransferCost:
        """The handover's cost (``kv_bytes_per_token`` resolved by :func:`run_sweep`; 0 until then)."""
        return KVTransferCost(self.kv_bytes_per_token or 0, self.kv_bandwidth_bytes_per_s, self.kv_latency_s)

    @property
    def chains(self) -> tuple[tuple[str, tuple[int, int] | None], ...]:
        """The sweep's columns as ``(router policy, P:D ratio or None for colocated)``: every router
        policy colocated, or (a P/D sweep) the first router policy colocated and at every ratio."""
        if not self.pd_ratios:
            return tuple((rp, None) for rp in self.router_policies)
        rp = self.router_policies[0]
        return ((rp, None), *((rp, r) for r in self.pd_ratios))


def chain_label(cfg: SimBenchConfig, chain: tuple[str, tuple[int, int] | None]) -> str:
    """A column's name: the router policy, or in a P/D sweep ``colocated`` / ``P:D 1:3``."""
    rp, ratio = chain
    if not cfg.pd_ratios:
        return rp
    return "colocated" if ratio is None else f"P:D {ratio[0]}:{ratio[1]}"


def default_profile_path() -> Path:
    """The cached CPU profile of the default model on this machine, with the compute threads a
    replica uses by default (every usable core): what ``serve`` would use."""
    from replicas.engine_config import usable_cores
    from replicas.model.default_model import MODEL_NAME

    root = Path(os.environ.get("FLOWPREFILL_CACHE", Path.home() / ".cache" / "flowprefill"))
    return root / "profiles" / profile_file_name(MODEL_NAME, "float32", "cpu", detect_hardware("cpu"), usable_cores())


def load_profile(path: str | None) -> tuple[CostModel, str]:
    """``--profile FILE`` (any saved cost model, CPU or GPU), else the cached default, else profile now."""
    if path is not None:
        return CostModel.load(path), str(path)
    cached = default_profile_path()
    if cached.is_file():
        return CostModel.load(cached), str(cached)
    import torch

    from replicas.engine_config import usable_cores
    from replicas.model.decoder import DecoderModel
    from replicas.model.default_model import prepare_default_model
    from replicas.profiling import load_or_profile, profile_cache_path

    torch.set_num_threads(usable_cores())  # as a replica runs by default (the profile's name says so)
    model = DecoderModel.load(prepare_default_model())
    return load_or_profile(model), str(profile_cache_path(model))


def default_kv_cache_tokens(block_size: int = 16) -> int:
    """Tokens the engine's default KV pool (``EngineConfig.kv_cache_bytes``, float32) holds for the
    default model: what a simulated replica's prefix cache may hold by default."""
    from replicas.engine_config import EngineConfig
    from replicas.model.config import ModelConfig
    from replicas.model.default_model import prepare_default_model

    c = ModelConfig.from_dir(prepare_default_model())
    per_block = 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * 4
    return EngineConfig().kv_cache_bytes // per_block * block_size


def prepare_trace(cfg: SimBenchConfig) -> tuple[Trace, str]:
    """The trace as ``--prefix-mode`` replays it (block ids kept, dropped or generated), and the mode."""
    from bench.shared_prefix import apply_prefix_mode, resolve_prefix_mode, sample_prefix_groups  # noqa: I001

    trace = load_trace(cfg.trace)
    mode = resolve_prefix_mode(cfg.prefix_mode, trace)
    trace = apply_prefix_mode(trace, mode)
    if cfg.prefix_groups < 1.0:
        trace = sample_prefix_groups(trace, cfg.prefix_groups, cfg.seed)
    return trace, mode


def sched_config(policy: str, length_scale: float, chunk_tokens: int) -> SchedulerConfig:
    """Scheduler settings as ``bench.policy_bench.policy_configs`` sets them for the engine (lengths scaled)."""
    f = length_scale
    return SchedulerConfig(policy=policy, short_threshold=max(int(2048 * f), 1),
                           batch_token_budget=max(int(8192 * f), 1), chunk_tokens=chunk_tokens,
                           granularity="block" if policy == "flowprefill" else "none")
