"""``flowprefill bench cache-ab``: its arguments and handler (heavy imports inside the handler)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.cli_args import add_engine_args, add_prefix_args, prefix_settings
from bench.fault_cli import write_json


def _cmd_cache_ab(args: argparse.Namespace) -> int:
    from bench.cache_ab import CacheABConfig, plot_cache_ab, run_cache_ab
    from bench.policy_bench import PolicyBenchConfig

    bench = PolicyBenchConfig(
        trace=args.trace, window_start_s=args.window_start_s, max_requests=args.max_requests,
        length_scale=args.length_scale, seed=args.seed, quick=args.quick, **prefix_settings(args),
        engine={"dtype": args.dtype, "device": args.device, **({"profile": args.profile} if args.profile else {})},
    )
    cfg = CacheABConfig(bench=bench, rounds=args.rounds, step=args.step, start_utilisation=args.start_utilisation,
                        max_rates=args.max_rates)
    report = run_cache_ab(cfg, Path(args.model) if args.model else None)
    write_json(args.json, report)
    if args.plot:
        plot_cache_ab(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def add_cache_ab_parser(bsub: argparse._SubParsersAction) -> None:
    """Add ``cache-ab`` to the bench subcommands."""
    p = bsub.add_parser("cache-ab", help="in-process goodput with the prefix cache on against off, both engines "
                        "replayed interleaved at every rate of one grid (paired rounds, one machine state)")
    add_engine_args(p)
    p.add_argument("--trace", required=True, help="Mooncake JSONL (trace mode) or Azure CSV (multiturn mode)")
    p.add_argument("--window-start-s", type=float, default=0.0)
    p.add_argument("--max-requests", type=int, default=32)
    p.add_argument("--length-scale", type=float, default=1 / 16, help="input lengths are multiplied by this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None, help="cost-model JSON (default: cached or profiled now)")
    p.add_argument("--quick", action="store_true", help="at most 16 requests per replay")
    p.add_argument("--rounds", type=int, default=3, help="replays per configuration at each rate, order alternating")
    p.add_argument("--step", type=float, default=1.25, help="ratio between neighbouring grid rates")
    p.add_argument("--start-utilisation", type=float, default=0.5,
                   help="first rate as a share of the cold engine's predicted capacity for the window")
    p.add_argument("--max-rates", type=int, default=9, help="grid rates at most (climbing stops once both fail)")
    add_prefix_args(p)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of attainment against rate, on and off")
    p.set_defaults(func=_cmd_cache_ab)
