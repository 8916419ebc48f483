"""Arguments and entry point of ``flowprefill bench sim`` (argparse only at import: ``--help`` stays instant)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.stack import ServingStack


def _csv(kind: type) -> object:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def parse_decode_curve(text: str) -> tuple[tuple[int, float], ...]:
    """``--decode-curve``: comma-separated ``batch:seconds`` points, e.g. ``1:0.06,4:0.065,16:0.16``."""
    points = []
    for item in (x.strip() for x in text.split(",")):
        size, sep, seconds = item.partition(":")
        try:
            if not sep:
                raise ValueError
            points.append((int(size), float(seconds)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected batch:seconds, got {item!r}") from None
    try:
        from bench.sim.exec_model import ExecConfig

        ExecConfig(decode_curve=tuple(points))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("decode_curve: ")) from None
    return tuple(points)


def parse_pd_ratios(text: str) -> tuple[tuple[int, int], ...]:
    """``--pd-ratios``: comma-separated ``P:D`` splits, e.g. ``1:1,1:3,3:1``."""
    from bench.sim.pd import parse_ratio

    try:
        ratios = tuple(parse_ratio(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--pd-ratios: ")) from None
    if not ratios:
        raise argparse.ArgumentTypeError("expected at least one P:D split, e.g. 1:3")
    return ratios


PD_MAX_OUTPUT_TOKENS = 64  # --max-output-tokens of a P/D sweep unless given: decode must matter


def add_sim_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``bench sim``."""
    p.add_argument("--trace", required=True, help="Azure CSV, Mooncake JSONL, or generic CSV/JSONL")
    p.add_argument("--replicas", type=_csv(int), default=(1, 4, 16, 64, 256), help="comma-separated replica counts")
    p.add_argument("--router-policies", type=_csv(str), default=("slo_aware", "round_robin", "pow2"),
                   help="comma-separated: slo_aware, round_robin, least_loaded, pow2, prefix_affinity")
    p.add_argument("--prefix-mode", choices=["unique", "trace", "multiturn"], default=None,
                   help="shared prefixes: the trace's block ids, generated conversations, or none (default: trace "
                        "when the trace has block ids, else unique)")
    p.add_argument("--prefix-groups", type=float, default=1.0,
                   help="keep this seeded fraction of the prefix groups over the whole trace (Mooncake's sharing "
                        "is long-range; see bench/shared_prefix.py)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="each replica's KV pool in tokens, for the prefix cache (default: the engine's default pool)")
    p.add_argument("--policy", choices=["flowprefill", "chunked", "fcfs"], default="flowprefill")
    p.add_argument("--profile", default=None, help="cost-model JSON, CPU or GPU (default: the cached CPU profile)")
    p.add_argument("--length-scale", type=float, default=1 / 16,
                   help="input lengths are multiplied by this (as bench policies; use 1 with a GPU profile)")
    p.add_argument("--max-output-tokens", type=int, default=None,
                   help=f"cap on the trace's output lengths (default 4; with --pd-ratios {PD_MAX_OUTPUT_TOKENS})")
    p.add_argument("--window-start-s", type=float, default=0.0)
    p.add_argument("--window-s", type=float, default=None, help="trace window per replica (default: the span of "
                   "--requests-per-replica requests)")
    p.add_argument("--requests-per-replica", type=int, default=60)
    p.add_argument("--max-requests", type=int, default=16000, help="cap per simulated run (a shorter horizon)")
    p.add_argument("--chunk-tokens", type=int, default=128, help="chunk of the chunked baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine-steps", type=int, default=4, help="bisection steps after the 90%% crossing")
    p.add_argument("--staleness-s", type=float, default=0.0, help="delay of the queue state the router sees")
    p.add_argument("--boundary-delay-s", type=float, default=0.002,
                   help="wait for the next operator boundary (preemption latency)")
    p.add_argument("--decode-step-s", type=float, default=None, help="fixed decode step time (default: cost model)")
    p.add_argument("--decode-curve", type=parse_decode_curve, default=(),
                   help="measured decode step seconds per batch size, batch:seconds,... (the curve `bench engine` "
                        "or `bench sim --validate` prints); default: the cost model's marginal token")
    p.add_argument("--exec-time-scale", type=float, default=1.0,
                   help="execution this many times slower than the profile (e.g. a --validate fit)")
    p.add_argument("--seq-overhead-s", type=float, default=0.0,
                   help="seconds per extra sequence in a prefill batch or decode step (e.g. a --validate fit)")
    p.add_argument("--jobs", type=int, default=0,
                   help="worker processes, one router policy each (default 0: one per usable CPU)")
    p.add_argument("--no-early-stop", action="store_true", help="simulate every request even past a sure miss")
    p.add_argument("--no-shed", action="store_true", help="slo_aware never sheds sheddable requests")
    p.add_argument("--validate", action="store_true",
                   help="instead: real in-process replays of a short window against the simulation")
    p.add_argument("--validate-requests", type=int, default=60, help="requests of the validation replay")
    p.add_argument("--nodes", type=int, default=1,
                   help="--validate on a local cluster of this many Ray nodes (head + workers, one real replica per "
                        "worker): the measured goodput beside the simulated one for the same replicas and requests")
    p.add_argument("--validate-runs", type=int, default=3,
                   help="real replays of the validation window (compared by their median p50 and p90)")
    p.add_argument("--validate-utilization", type=float, default=0.6,
                   help="predicted prefill utilisation of the validation replay")
    p.add_argument("--model", default=None, help="HF model directory for --validate (default: SmolLM2-135M)")
    p.add_argument("--pd-ratios", type=parse_pd_ratios, default=(),
                   help="P/D sweep: compare colocated replicas with these prefill:decode splits of every replica "
                        "count, e.g. 1:1,1:3,3:1 (goodput counts TTFT and TPOT; the first --router-policies only)")
    p.add_argument("--tpot-slo-s", type=float, default=None,
                   help="every class's TPOT SLO (default with --pd-ratios: 5 batch-1 decode steps; else none)")
    p.add_argument("--kv-bytes-per-token", type=int, default=None,
                   help="P/D handover bytes per prompt token (default: --pd-model's config, the profile's dtype)")
    p.add_argument("--pd-model", default=None, help="checkpoint dir whose config.json sizes the KV (default: SmolLM2)")
    p.add_argument("--kv-bandwidth-mbps", type=float, default=None,
                   help="P/D handover bandwidth in MB/s (default 250: bench handover on this CPU box)")
    p.add_argument("--kv-latency-ms", type=float, default=None, help="P/D handover fixed latency (default 15 ms)")
    p.add_argument("--pd-first-token", choices=["prefill", "decode"], default="prefill",
                   help="where the client's first token comes from: the prefill replica (FlowPrefill: the "
                        "transfer shows in TPOT) or the decode replica (TTFT includes the transfer)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of goodput per replica against the replica count")


def run_from_args(args: argparse.Namespace, stack: Callable[[], ServingStack] | None = None) -> int:
    """Run the sweep (or ``--validate``, on one in-process replica or with ``--nodes`` on a local
    multi-node cluster that ``stack()`` starts) and write ``--json`` / ``--plot``."""
    if args.nodes != 1 and not args.validate:
        raise ValueError("--nodes: only with --validate (the sweep simulates; it starts no cluster)")
    if args.validate and args.nodes != 1:
        from bench.sim.cluster_compare import ClusterCompareConfig, run_cluster_compare

        if stack is None:
            raise ValueError("--nodes: this entry point has no launcher to start a cluster with")
        ccfg = ClusterCompareConfig(trace=args.trace, nodes=args.nodes, window_start_s=args.window_start_s,
                                    window_s=args.window_s, requests=args.validate_requests,
                                    length_scale=args.length_scale, max_output_tokens=args.max_output_tokens or 4,
                                    seed=args.seed, boundary_delay_s=args.boundary_delay_s)
        report = run_cluster_compare(ccfg, stack())
    elif args.validate:
        from bench.sim.validate import run_validation

        report = run_validation(
            args.trace, profile=args.profile, model_dir=Path(args.model) if args.model else None,
            window_start_s=args.window_start_s, window_s=args.window_s, max_requests=args.validate_requests,
            length_scale=args.length_scale, utilization=args.validate_utilization, seed=args.seed,
            boundary_delay_s=args.boundary_delay_s, decode_step_s=args.decode_step_s, real_runs=args.validate_runs,
        )
    else:
        from bench.sim.sweep import plot_goodput, run_sweep
        from bench.sim.sweep_config import SimBenchConfig

        pd_kw: dict[str, object] = {}
        if args.kv_bandwidth_mbps is not None:
            pd_kw["kv_bandwidth_bytes_per_s"] = args.kv_bandwidth_mbps * 1e6
        if args.kv_latency_ms is not None:
            pd_kw["kv_latency_s"] = args.kv_latency_ms / 1e3
        max_output = args.max_output_tokens
        if max_output is None:
            max_output = PD_MAX_OUTPUT_TOKENS if args.pd_ratios else 4
        cfg = SimBenchConfig(
            trace=args.trace, replicas=tuple(args.replicas), router_policies=tuple(args.router_policies),
            policy=args.policy, profile=args.profile, length_scale=args.length_scale,
            max_output_tokens=max_output, window_start_s=args.window_start_s, window_s=args.window_s,
            requests_per_replica=args.requests_per_replica, max_requests=args.max_requests,
            chunk_tokens=args.chunk_tokens, seed=args.seed, refine_steps=args.refine_steps,
            staleness_s=args.staleness_s, boundary_delay_s=args.boundary_delay_s, decode_step_s=args.decode_step_s,
            decode_curve=tuple(args.decode_curve),
            exec_time_scale=args.exec_time_scale, seq_overhead_s=args.seq_overhead_s,
            early_stop=not args.no_early_stop, shed=not args.no_shed, jobs=args.jobs,
            prefix_mode=args.prefix_mode, prefix_groups=args.prefix_groups, kv_cache_tokens=args.kv_cache_tokens,
            pd_ratios=tuple(args.pd_ratios), tpot_slo_s=args.tpot_slo_s, kv_bytes_per_token=args.kv_bytes_per_token,
            pd_model=args.pd_model, pd_first_token=args.pd_first_token, **pd_kw,  # type: ignore[arg-type]
        )
        report = run_sweep(cfg)
        if args.plot:
            plot_goodput(report, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
