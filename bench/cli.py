"""The ``flowprefill bench ...`` subcommands: their arguments and handlers.

``cluster/cli.py`` registers them under ``bench`` (:func:`register`) and hands over the
:class:`~bench.stack.ServingStack` that the commands starting Ray in-process need; nothing here
imports the launcher. Heavy imports happen inside the handlers so ``flowprefill --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.cache_ab_cli import add_cache_ab_parser
from bench.cli_args import add_engine_args, add_prefix_args, model_dir, positive_ints, prefix_settings
from bench.fault_cli import add_faults_parser
from bench.stack import ServingStack

Handler = Callable[[argparse.Namespace], int]


def _write_json(path: str | None, report: object) -> None:
    """Write a benchmark's JSON report where ``--json`` asked (and say so on stderr)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2))
        print(f"wrote {path}", file=sys.stderr)


def _cmd_bench_engine(args: argparse.Namespace) -> int:
    from bench.engine_bench import EngineBenchConfig, run_engine_bench

    config = EngineBenchConfig(quick=args.quick, dtype=args.dtype, device=args.device, peak_tflops=args.peak_tflops)
    report = run_engine_bench(model_dir(args.model), config)
    _write_json(args.json, report)
    return 0


def _cmd_bench_sampling(args: argparse.Namespace) -> int:
    from bench.sampling_bench import SamplingBenchConfig, run_sampling_bench

    def ints(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--batch-sizes: expected comma-separated integers, got {text!r}") from None

    cfg = SamplingBenchConfig(batch_sizes=ints(args.batch_sizes), prompt_tokens=args.prompt_tokens,
                              steps=args.steps, repeats=args.repeats,
                              variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()))
    _write_json(args.json, run_sampling_bench(model_dir(args.model), cfg, dtype=args.dtype, device=args.device))
    return 0


def _cmd_bench_policies(args: argparse.Namespace) -> int:
    from bench.policy_bench import PolicyBenchConfig, run_policy_bench

    cfg = PolicyBenchConfig(
        trace=args.trace, window_start_s=args.window_start_s, window_s=args.window_s, quick=args.quick,
        length_scale=args.length_scale, max_requests=args.max_requests, seed=args.seed,
        chunk_sizes=tuple(args.chunk_sizes), repeats=args.repeats, **prefix_settings(args),
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()) if args.policies else None,
        engine={"dtype": args.dtype, "device": args.device, **({"profile": args.profile} if args.profile else {})},
    )
    report = run_policy_bench(cfg, Path(args.model) if args.model else None)
    _write_json(args.json, report)
    if args.plot:
        from bench.plots import plot_attainment

        plot_attainment(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _cmd_bench_spread(args: argparse.Namespace) -> int:
    from bench.spread import SpreadConfig, run_spread_bench

    cfg = SpreadConfig(trace=args.trace, rate_rps=args.rate, runs=args.runs, max_requests=args.max_requests,
                       window_start_s=args.window_start_s, length_scale=args.length_scale, seed=args.seed,
                       variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
                       competitor=args.competitor)
    _write_json(args.json, run_spread_bench(cfg))
    return 0


def _cmd_bench_handover(args: argparse.Namespace, stack: Callable[[], ServingStack]) -> int:
    from bench.handover_bench import HandoverBenchConfig, format_table, run_handover_bench

    cfg = HandoverBenchConfig(lengths=args.lengths, repeats=args.repeats, ray=args.ray, dtype=args.dtype,
                              device=args.device, kv_cache_bytes=args.kv_cache_mib << 20, seed=args.seed)
    path = model_dir(args.model)
    if args.ray:
        import ray

        stack().start_ray(num_cpus=2)
    try:
        if args.overlap:
            from bench.handover_overlap import format_overlap_table, run_overlap_bench

            report = run_overlap_bench(path, cfg)
        else:
            report = run_handover_bench(path, cfg)
    finally:
        if args.ray:
            ray.shutdown()
    print(format_overlap_table(report) if args.overlap else format_table(report))
    _write_json(args.json, report)
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from bench.serve_bench import run_serve_bench
    from bench.serve_config import ServeBenchConfig
    from bench.servers import parse_engine_settings

    cfg = ServeBenchConfig(
        trace=args.trace, systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()), quick=args.quick,
        window_start_s=args.window_start_s, window_s=args.window_s, max_requests=args.max_requests,
        length_scale=args.length_scale, max_output_tokens=args.max_output_tokens, seed=args.seed,
        prompt_format=args.prompt_format, start_scale=args.start_scale, chunk_sizes=args.chunk_sizes,
        vllm_threads_bind=args.vllm_threads_bind, vllm_block_size=args.vllm_block_size, config=args.config,
        log_dir=args.log_dir, fixed_rate_rps=args.fixed_rate, slos=args.slos,
        engine_settings=parse_engine_settings(args.engine_set), repeats=args.repeats, budget_s=args.budget_s,
        **prefix_settings(args),
    )

    def save(report: dict[str, object]) -> None:  # after each system, and at the end
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))

    report = run_serve_bench(cfg, Path(args.model) if args.model else None, checkpoint=save)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot_dir:
        from bench.serve_plots import write_plots

        for path in write_plots(report, args.plot_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_bench_sim(args: argparse.Namespace, stack: Callable[[], ServingStack]) -> int:
    from bench.sim.cli import run_from_args

    return run_from_args(args, stack)


def _cmd_bench_router(args: argparse.Namespace, stack: Callable[[], ServingStack]) -> int:
    from bench.router_bench import RouterBenchConfig, print_report, run_router_bench
    from bench.router_multinode import check_router_nodes, format_comparison, run_router_compare

    check_router_nodes(args.nodes, args.engine)  # before anything starts
    cfg = RouterBenchConfig(engine=args.engine, replicas=args.replicas, router_policy=args.router_policy,
                            port=args.port, grpc_port=args.grpc_port, sequential=args.requests,
                            step_s=args.step_s, **({"rates": tuple(args.rates)} if args.rates else {}))
    if args.nodes == 1:
        report = run_router_bench(cfg, stack())
        print_report(report)
    else:
        report = run_router_compare(cfg, stack(), args.nodes)
        print_report(report["single_node"])
        print_report(report["multi_node"])
        print(format_comparison(report))
    _write_json(args.json, report)
    return 0


def _cmd_bench_autoscale(args: argparse.Namespace, stack: Callable[[], ServingStack]) -> int:
    from bench.autoscale_demo import AutoscaleDemoConfig, run_autoscale_demo, summary, write_outputs

    report = run_autoscale_demo(AutoscaleDemoConfig(minutes=args.minutes, max_replicas=args.max_replicas,
                                                    low_rate=args.low_rate, high_rate=args.high_rate,
                                                    prompt_repeats=args.prompt_repeats), stack())
    print(summary(report))
    write_outputs(report, args.json, args.plot)
    return 0


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from bench.soak import SoakConfig, print_soak, run_soak

    report = run_soak(SoakConfig(trace=args.trace, goodput_rps=args.goodput_rps, minutes=args.minutes,
                                 fraction=args.fraction), Path(args.model) if args.model else None)
    print_soak(report)
    _write_json(args.json, report)
    return 0 if report["errors"] == 0 else 1


def _cmd_bench_overload(args: argparse.Namespace) -> int:
    from bench.overload import OverloadConfig, print_overload, run_overload
    from bench.servers import parse_engine_settings

    settings = parse_engine_settings(args.engine_set)
    report = run_overload(OverloadConfig(trace=args.trace, goodput_rps=args.goodput_rps, factor=args.factor,
                                         overload_s=args.overload_s, engine_settings=settings,
                                         repeats=args.repeats, base_fraction=args.base_fraction,
                                         after_s=args.after_s),
                          Path(args.model) if args.model else None)
    print_overload(report)
    _write_json(args.json, report)
    lost = report["journal_after"].get("open_requests", 0)
    return 0 if report["healthy_after"] and report["health_failures"] == 0 and lost == 0 else 1


def register(bsub: argparse._SubParsersAction, stack: Callable[[], ServingStack]) -> None:
    """Add every bench subcommand to ``bsub``; ``stack()`` gives the launcher's :class:`ServingStack`
    to the commands that run the Serve app in this process (called only when one runs)."""
    eng = bsub.add_parser("engine", help="prefill throughput and MFU, checkpoint overhead, preemption latency")
    add_engine_args(eng)
    eng.add_argument("--quick", action="store_true", help="finish within about a minute")
    eng.add_argument("--peak-tflops", type=float, default=None,
                     help="dense bf16 peak for MFU (default: from the CUDA device name, bench/flops.py; none on CPU)")
    eng.add_argument("--json", default=None)
    eng.set_defaults(func=_cmd_bench_engine)
    smp = bsub.add_parser("sampling", help="decode step time with logprobs, penalties, min_p + bias and a JSON "
                          "grammar against plain greedy, same batch sizes")
    add_engine_args(smp)
    smp.add_argument("--batch-sizes", default="1,4,16")
    smp.add_argument("--variants", default=",".join(("greedy", "logprobs", "penalties", "min_p_bias", "json", "all")))
    smp.add_argument("--prompt-tokens", type=int, default=64)
    smp.add_argument("--steps", type=int, default=12, help="decode steps per variant per repeat")
    smp.add_argument("--repeats", type=int, default=5, help="round-robin repeats over the variants")
    smp.add_argument("--json", default=None)
    smp.set_defaults(func=_cmd_bench_sampling)
    pol = bsub.add_parser("policies", help="in-process goodput of flowprefill, chunked and fcfs on a trace "
                          "(and flowprefill without its prefix cache on shared-prefix traffic)")
    add_engine_args(pol)
    pol.add_argument("--trace", required=True, help="Azure CSV, Mooncake JSONL, or generic CSV/JSONL")
    pol.add_argument("--window-start-s", type=float, default=0.0)
    pol.add_argument("--window-s", type=float, default=None)
    pol.add_argument("--max-requests", type=int, default=60)
    pol.add_argument("--length-scale", type=float, default=1 / 16, help="input lengths are multiplied by this")
    pol.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 128, 256])
    pol.add_argument("--seed", type=int, default=0)
    pol.add_argument("--profile", default=None, help="cost-model JSON (default: cached or profiled now)")
    pol.add_argument("--quick", action="store_true", help="fewer requests and search steps (under 10 minutes)")
    pol.add_argument("--policies", default=None,
                     help="comma-separated configurations to run, in order (default all: flowprefill, "
                          "flowprefill-nocache on shared prefixes, fcfs, chunked-C per --chunk-sizes)")
    pol.add_argument("--repeats", type=int, default=3,
                     help="replays at each boundary rate; goodput is decided on their median (1 elsewhere)")
    add_prefix_args(pol)
    pol.add_argument("--json", default=None)
    pol.add_argument("--plot", default=None, help="PNG of attainment against request rate per policy")
    pol.set_defaults(func=_cmd_bench_policies)
    spr = bsub.add_parser("spread", help="run-to-run TTFT spread: one window replayed N times per variant "
                          "(OpenMP wait policy, threads, malloc), each in a fresh process, with GC pauses, page "
                          "faults and an idle-prefill probe per replay, optionally beside a busy core")
    spr.add_argument("--trace", required=True, help="Azure CSV, Mooncake JSONL, or generic CSV/JSONL")
    spr.add_argument("--rate", type=float, required=True, help="request rate (req/s) of every replay")
    spr.add_argument("--runs", type=int, default=5, help="replays per variant")
    spr.add_argument("--max-requests", type=int, default=48)
    spr.add_argument("--window-start-s", type=float, default=0.0)
    spr.add_argument("--length-scale", type=float, default=1 / 16)
    spr.add_argument("--seed", type=int, default=0)
    spr.add_argument("--variants", default="baseline,omp-active",
                     help="comma-separated: baseline, omp-passive, omp-active, omp-spin, threads-1, malloc-keep")
    spr.add_argument("--competitor", default="none", choices=("none", "busy-loop"),
                     help="busy-loop: a process spinning on one core beside the replays")
    spr.add_argument("--json", default=None)
    spr.set_defaults(func=_cmd_bench_spread)
    hov = bsub.add_parser("handover", help="P/D handover cost per request against prompt length: bytes, gather, "
                          "decode-side admit, Ray put/get and first token to admission (p50/p99 ms)")
    add_engine_args(hov)
    hov.add_argument("--lengths", type=positive_ints, default=(32, 128, 512, 2048),
                     help="prompt lengths in tokens, comma-separated")
    hov.add_argument("--repeats", type=int, default=10, help="requests per length, each a fresh prompt")
    hov.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True,
                     help="move each handover through a local Ray's object store (put/get), as the deployment does")
    hov.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache of each engine")
    hov.add_argument("--overlap", action="store_true",
                     help="instead: the next prefill's time to first token alone, with the previous handover in "
                          "flight, and after it (serial), and the fraction of the handover hidden "
                          "(bench/handover_overlap.py)")
    hov.add_argument("--seed", type=int, default=0)
    hov.add_argument("--json", default=None)
    hov.set_defaults(func=partial(_cmd_bench_handover, stack=stack))
    auto = bsub.add_parser("autoscale", help="SLO-driven autoscaling under a load step, on a local cluster")
    auto.add_argument("--minutes", type=float, default=4.5, help="duration of the offered load")
    auto.add_argument("--max-replicas", type=int, default=2)
    auto.add_argument("--low-rate", type=float, default=0.3, help="requests/s before and after the step")
    auto.add_argument("--high-rate", type=float, default=2.0, help="requests/s during the step")
    auto.add_argument("--prompt-repeats", type=int, default=3, help="prompt length, in repeats of the demo text")
    auto.add_argument("--json", default=None)
    auto.add_argument("--plot", default=None, help="PNG of replica count, offered load and TTFT attainment")
    auto.set_defaults(func=partial(_cmd_bench_autoscale, stack=stack))
    rtr = bsub.add_parser("router", help="router overhead, routing decision time and max request rate (echo engine)")
    rtr.add_argument("--engine", choices=["echo", "flowprefill"], default="echo",
                     help="echo: model-free replicas (default); flowprefill: the real engine")
    rtr.add_argument("--replicas", type=int, default=2)
    rtr.add_argument("--router-policy", choices=["slo_aware", "round_robin", "least_loaded", "prefix_affinity", "pow2"],
                     default="slo_aware")
    rtr.add_argument("--requests", type=int, default=200, help="sequential requests for the overhead")
    rtr.add_argument("--rates", type=float, nargs="+", default=None, help="open-loop rates to try, ascending")
    rtr.add_argument("--step-s", type=float, default=8.0, help="seconds of load per rate")
    rtr.add_argument("--nodes", type=int, default=1,
                     help="1: one node; N > 1: the same figures on one node and then on a local N-node cluster "
                          "(replicas on the N-1 workers, router on the head), side by side (echo engine)")
    rtr.add_argument("--port", type=int, default=8790)
    rtr.add_argument("--grpc-port", type=int, default=9790)
    rtr.add_argument("--json", default=None)
    rtr.set_defaults(func=partial(_cmd_bench_router, stack=stack))
    soak = bsub.add_parser("soak", help="the trace at a fraction of goodput for minutes: errors, attainment, memory")
    soak.add_argument("--trace", required=True)
    soak.add_argument("--goodput-rps", type=float, required=True, help="FlowPrefill's goodput from bench serve")
    soak.add_argument("--fraction", type=float, default=0.8)
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--model", default=None)
    soak.add_argument("--json", default=None)
    soak.set_defaults(func=_cmd_bench_soak)
    over = bsub.add_parser("overload", help="a bounded burst at 10x goodput: refusals, attainment, memory, recovery")
    over.add_argument("--trace", required=True)
    over.add_argument("--goodput-rps", type=float, required=True, help="FlowPrefill's goodput from bench serve")
    over.add_argument("--factor", type=float, default=10.0, help="overload rate as a multiple of the goodput")
    over.add_argument("--overload-s", type=float, default=60.0, help="seconds of overload")
    over.add_argument("--base-fraction", type=float, default=0.5,
                      help="rate before and after the burst, as a fraction of the goodput (1.0 tests that the "
                           "goodput given is sustainable)")
    over.add_argument("--after-s", type=float, default=90.0, help="seconds at the base rate after the burst")
    over.add_argument("--repeats", type=int, default=1,
                      help="run the three phases this many times on one server; attainment is their median")
    over.add_argument("--engine-set", action="append", default=[], metavar="KEY=VALUE",
                      help="an engine setting for the server (YAML value), e.g. late_reject_factor=1.0; repeatable")
    over.add_argument("--model", default=None)
    over.add_argument("--json", default=None)
    over.set_defaults(func=_cmd_bench_overload)
    add_faults_parser(bsub, stack)
    add_cache_ab_parser(bsub)
    sim = bsub.add_parser("sim", help="cluster simulator: goodput per replica for replica counts and router policies")
    from bench.sim.cli import add_sim_args  # argparse only: no heavy imports

    add_sim_args(sim)
    sim.set_defaults(func=partial(_cmd_bench_sim, stack=stack))
    bsrv = bsub.add_parser("serve", help="HTTP goodput of FlowPrefill's policies and vLLM, each as a server")
    bsrv.add_argument("--trace", required=True, help="Azure CSV, Mooncake JSONL, or generic CSV/JSONL")
    bsrv.add_argument("--systems", default="flowprefill,chunked,fcfs,vllm",
                      help="comma-separated, in run order: flowprefill, chunked (one per --chunk-sizes), chunked-N, "
                           "fcfs, flowprefill-nocache (prefix cache off), flowprefill-pd (1 prefill + 1 decode "
                           "replica), flowprefill-x2 (2 colocated replicas, the same cores), vllm, flowprefill-vllm")
    bsrv.add_argument("--model", default=None, help="HF model directory (default: the prepared SmolLM2-135M)")
    bsrv.add_argument("--window-start-s", type=float, default=29.0)
    bsrv.add_argument("--window-s", type=float, default=None)
    bsrv.add_argument("--max-requests", type=int, default=48, help="requests of the window (48: the code trace's "
                      "first dense stretch; a window spanning an idle gap gets a warning)")
    bsrv.add_argument("--length-scale", type=float, default=1 / 16, help="input lengths are multiplied by this")
    bsrv.add_argument("--max-output-tokens", type=int, default=16, help="cap on each request's max_tokens")
    bsrv.add_argument("--seed", type=int, default=0)
    bsrv.add_argument("--prompt-format", choices=["text", "ids"], default="text")
    bsrv.add_argument("--start-scale", type=float, default=None, help="first rate scale (default: probed)")
    bsrv.add_argument("--chunk-sizes", type=positive_ints, default=(64, 128, 256),
                      help="chunk sizes of the chunked baseline, comma-separated: 'chunked' runs one server per size")
    bsrv.add_argument("--vllm-block-size", type=int, default=None,
                      help="vllm's --block-size (default: vLLM's own, 128 tokens on the CPU, where it must be a "
                           "multiple of 32); its prefix cache reuses whole blocks only")
    bsrv.add_argument("--vllm-threads-bind", default="0-1",
                      help="VLLM_CPU_OMP_THREADS_BIND of both vLLM systems (e.g. 1: one core, the other left to Ray)")
    bsrv.add_argument("--config", default=None, help="Serve config with the SLO classes (default: ray_config.yaml)")
    bsrv.add_argument("--slos", choices=["ttft", "both"], default="ttft",
                      help="what a request must meet to count toward goodput: its class's TTFT SLO, or both its "
                           "TTFT and TPOT SLOs (for P/D against colocated: --systems flowprefill-pd,flowprefill-x2)")
    bsrv.add_argument("--log-dir", default="out/serve-bench", help="server logs and temporary configs")
    bsrv.add_argument("--quick", action="store_true",
                      help="fewer requests and runs, all searches within --budget-s (default 3600 s with --quick)")
    bsrv.add_argument("--repeats", type=int, default=3,
                      help="runs at each boundary rate; goodput is decided on their median (1 elsewhere)")
    bsrv.add_argument("--fixed-rate", type=float, default=None, metavar="RPS",
                      help="no goodput search: --repeats identical replays at this rate per system, to measure "
                           "their attainment spread (max - min)")
    bsrv.add_argument("--budget-s", type=float, default=None,
                      help="wall-time budget of all searches together; a search stops where it is when its share "
                           "is spent (default: unbounded, 3600 with --quick)")
    add_prefix_args(bsrv)
    bsrv.add_argument("--engine-set", action="append", default=[], metavar="KEY=VALUE",
                      help="a FlowPrefill engine setting for every FlowPrefill system (repeatable), e.g. cpu_threads=1")
    bsrv.add_argument("--json", default=None)
    bsrv.add_argument("--plot-dir", default=None, help="directory for attainment / TTFT CDF / timeline PNGs")
    bsrv.set_defaults(func=_cmd_bench_serve)
