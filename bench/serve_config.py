"""What ``flowprefill bench serve`` replays and against which systems: :class:`ServeBenchConfig`
(its CLI flags, validated, each error naming its flag), the system names it expands, and the SLO
classes every system is judged by."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.multiturn import MultiTurnConfig
from bench.servers import CHUNKED_PREFIX, NOCACHE, check_engine_settings, serve_app_args, split_system
from bench.shared_prefix import check_prefix_flags
from replicas.vllm_process import CPU_LIST
from router.slo import SLOClass

QUICK_BUDGET_S = 3600.0  # --quick: all searches together, whatever the trace's prompt lengths
SLO_MODES = ("ttft", "both")  # --slos: what attainment (and so goodput) counts


@dataclass
class ServeBenchConfig:
    """What to replay, against which systems, and how hard to search."""

    trace: str
    systems: tuple[str, ...] = ("flowprefill", "chunked", "fcfs", "vllm")  # "chunked": one per chunk size
    window_start_s: float = 29.0  # the code trace's first dense stretch starts here
    window_s: float | None = None
    max_requests: int = 48  # the code trace's first dense stretch from 29 s holds 51 requests
    length_scale: float = 1 / 16
    max_output_tokens: int = 16
    seed: int = 0
    prompt_format: str = "text"  # text | ids
    start_scale: float | None = None  # None: from a probe of the first system
    max_runs: int = 6  # search runs per system before refinement
    refine_steps: int = 2
    repeats: int = 3  # runs at each boundary rate (the best passing and the lowest failing); 1 elsewhere
    max_run_s: float = 300.0  # no rate so low that sending the window takes longer (goodput reported below it)
    drain_s: float = 65.0
    chunk_sizes: tuple[int, ...] = (64, 128, 256)  # of the chunked baseline (scaled lengths)
    vllm_budget: int = 512
    vllm_long_prefill: int | None = 256
    vllm_block_size: int | None = None  # vllm's --block-size (None: its default, 128 tokens on the CPU)
    vllm_threads_bind: str = "0-1"  # cores of vLLM's OpenMP threads (both vLLM systems)
    config: str | None = None  # Serve config with the SLO classes (default ray_config.yaml)
    log_dir: str = "out/serve-bench"
    quick: bool = False
    budget_s: float | None = None  # wall-time budget of all searches (None: unbounded; --quick: 40 min)
    engine_settings: dict[str, Any] = field(default_factory=dict)  # FlowPrefill engine settings on top
    prefix_mode: str | None = None  # unique | trace | multiturn; None: trace if the trace has block ids
    multiturn_system_tokens: int = MultiTurnConfig.system_prompt_tokens  # full-length tokens
    multiturn_continue: float = MultiTurnConfig.continue_probability
    # trace mode: keep this fraction of the prefix groups (whole trace, seeded); None: all of them, except
    # QUICK_PREFIX_GROUPS with --quick (bench.serve_workload.prefix_groups)
    prefix_groups: float | None = None
    fixed_rate_rps: float | None = None  # no search: `repeats` identical replays at this rate, per system
    slos: str = "ttft"  # what a request must meet to count: ttft, or both (its class's TTFT and TPOT SLOs)

    def __post_init__(self) -> None:
        if not self.chunk_sizes or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                       for c in self.chunk_sizes):
            raise ValueError(f"--chunk-sizes: need positive integers, got {self.chunk_sizes}")
        self.systems = expand_systems(self.systems, self.chunk_sizes)
        if self.prompt_format not in ("text", "ids"):
            raise ValueError(f"prompt_format must be text or ids, got {self.prompt_format!r}")
        check_engine_settings(self.engine_settings)
        if NOCACHE in self.systems:  # refused now, by name, if the engine has no such setting
            from replicas.engine_config import EngineConfig

            EngineConfig.from_dict({**self.engine_settings, "enable_prefix_caching": False}, prefix=NOCACHE)
        check_prefix_flags(self.prefix_mode, self.multiturn)
        if self.prefix_groups is not None and not 0.0 < self.prefix_groups <= 1.0:
            raise ValueError(f"--prefix-groups: expected a fraction in (0, 1], got {self.prefix_groups!r}")
        if self.vllm_block_size is not None and (self.vllm_block_size < 1 or self.vllm_block_size % 16):
            raise ValueError(f"--vllm-block-size: a positive multiple of 16, got {self.vllm_block_size}")
        if not CPU_LIST.match(self.vllm_threads_bind):
            raise ValueError(f"--vllm-threads-bind: expected a CPU list like 0-1, got {self.vllm_threads_bind!r}")
        if self.repeats < 1:
            raise ValueError(f"--repeats: need at least 1, got {self.repeats}")
        if self.slos not in SLO_MODES:
            raise ValueError(f"--slos: expected one of {', '.join(SLO_MODES)}, got {self.slos!r}")
        if self.fixed_rate_rps is not None and not (0 < self.fixed_rate_rps < float("inf")):
            raise ValueError(f"--fixed-rate: need a positive request rate, got {self.fixed_rate_rps}")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ValueError(f"--budget-s: need a positive number of seconds, got {self.budget_s}")
        if self.quick:  # bounded wall time on any trace: the budget stops a search where it is
            self.max_requests = min(self.max_requests, 32)
            self.max_output_tokens = min(self.max_output_tokens, 8)
            self.max_runs, self.refine_steps = min(self.max_runs, 6), min(self.refine_steps, 1)
            self.max_run_s = min(self.max_run_s, 60.0)
            self.budget_s = self.budget_s or QUICK_BUDGET_S

    def budget_per_system_s(self) -> float | None:
        """Each system's share of ``budget_s``, from its server's start (None: unbounded)."""
        return None if self.budget_s is None else self.budget_s / len(self.systems)

    def multiturn(self) -> MultiTurnConfig:
        """The multi-turn generator's settings (``--prefix-mode multiturn``)."""
        return MultiTurnConfig(system_prompt_tokens=self.multiturn_system_tokens,
                               continue_probability=self.multiturn_continue, seed=self.seed)


def expand_systems(systems: tuple[str, ...], chunk_sizes: tuple[int, ...]) -> tuple[str, ...]:
    """``chunked`` becomes ``chunked-N`` for every chunk size; duplicates are dropped, order kept.

    Raises ValueError naming ``--systems`` for an unknown system (see :func:`bench.servers.split_system`).
    """
    out: list[str] = []
    for label in systems:
        names = [f"{CHUNKED_PREFIX}{c}" for c in chunk_sizes] if label == "chunked" else [label]
        for name in names:
            try:
                split_system(name)
            except ValueError as exc:
                raise ValueError(f"--systems: {exc}") from None
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("--systems: name at least one system")
    return tuple(out)


def slo_classes(config: str | None = None) -> tuple[SLOClass, ...]:
    """The SLO classes FlowPrefill's server applies, from its Serve config."""
    from router.slo import SLOPolicy

    args = serve_app_args(Path(config) if config else None)
    return SLOPolicy.from_dict(args.get("slo") or SLOPolicy.default().to_dict()).classes
