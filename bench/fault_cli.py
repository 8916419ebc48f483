"""``flowprefill bench faults``: its arguments, their validation and its handler.

``--kill replica`` (the default) is :mod:`bench.faults` (a replica crash, then a Redis outage, on
one node with the real engine and a trace); ``--kill node`` is :mod:`bench.node_faults` (a worker
node lost on a local multi-node cluster the :class:`~bench.stack.ServingStack` starts). Heavy
imports happen inside the handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.stack import ServingStack


def write_json(path: str | None, report: object) -> None:
    """Write the JSON report where ``--json`` asked (and say so on stderr)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2))
        print(f"wrote {path}", file=sys.stderr)


FAULT_KINDS = ("replica", "node")


def check_fault_args(kill: str, nodes: int, trace: str | None) -> None:
    """``--kill replica`` (a replica crash and a Redis outage, one node, a trace) or ``--kill node``
    (a worker node lost on a local cluster of ``--nodes`` >= 3, echo replicas, no trace)."""
    if kill not in FAULT_KINDS:
        raise ValueError(f"--kill: one of {', '.join(FAULT_KINDS)}, got {kill!r}")
    if kill == "replica":
        if nodes != 1:
            raise ValueError(f"--nodes {nodes}: the replica crash and Redis outage run on one node; "
                             "a multi-node run takes --kill node")
        if not trace:
            raise ValueError("--trace: required with --kill replica (the default)")
    elif nodes < 3:
        raise ValueError(f"--kill node: needs --nodes >= 3 (the head and two workers: one to kill, one to "
                         f"survive), got {nodes}")


def cmd_bench_faults(args: argparse.Namespace, stack: Callable[[], ServingStack]) -> int:
    """Run the fault bench ``--kill`` names, print its table; exit status 1 when a request was lost."""
    from bench.faults import FaultConfig, print_faults, run_faults

    check_fault_args(args.kill, args.nodes, args.trace)
    if args.kill == "node":
        from bench.node_faults import NodeFaultConfig, run_node_faults

        rate = {"rate_rps": args.rate_rps} if args.rate_rps is not None else {}
        cfg = NodeFaultConfig(nodes=args.nodes, phase_s=args.phase_s, port=args.port, grpc_port=args.grpc_port,
                              **rate)
        report = run_node_faults(cfg, stack())
    else:
        report = run_faults(FaultConfig(trace=args.trace, rate_rps=args.rate_rps or 1.2, replicas=args.replicas,
                                        phase_s=args.phase_s, outage_s=args.outage_s, cpu_threads=args.cpu_threads),
                            Path(args.model) if args.model else None)
    print_faults(report)
    if "ttft_ms" in report:
        from bench.node_faults import format_ttft

        print(format_ttft(report["ttft_ms"]))
    write_json(args.json, report)
    return 0 if sum(row["lost"] for row in report["phases"].values()) == 0 else 1


def add_faults_parser(bsub: argparse._SubParsersAction, stack: Callable[[], ServingStack]) -> None:
    """Add ``faults`` to the bench subcommands (``stack()`` is called only by ``--kill node``)."""
    flt = bsub.add_parser("faults", help="attainment before, during and after a replica crash and a Redis outage, "
                          "or (--kill node) the loss of a worker node of a local multi-node cluster")
    flt.add_argument("--kill", choices=FAULT_KINDS, default="replica",
                     help="replica: a replica crash, then a Redis outage (one node, --trace); node: SIGKILL one "
                          "worker node of a local --nodes cluster (echo replicas, one per worker)")
    flt.add_argument("--nodes", type=int, default=1, help="Ray nodes, head included (--kill node: at least 3)")
    flt.add_argument("--trace", default=None, help="the trace (--kill replica)")
    flt.add_argument("--rate-rps", type=float, default=None,
                     help="offered load over all replicas (default: 1.2; --kill node: 4)")
    flt.add_argument("--replicas", type=int, default=2)
    flt.add_argument("--phase-s", type=float, default=30.0, help="seconds of each measured window")
    flt.add_argument("--outage-s", type=float, default=15.0, help="seconds Redis stays down")
    flt.add_argument("--cpu-threads", type=int, default=1, help="compute threads per replica")
    flt.add_argument("--port", type=int, default=8791, help="--kill node: the cluster's HTTP port")
    flt.add_argument("--grpc-port", type=int, default=9791, help="--kill node: the cluster's gRPC port")
    flt.add_argument("--model", default=None)
    flt.add_argument("--json", default=None)
    flt.set_defaults(func=partial(cmd_bench_faults, stack=stack))
