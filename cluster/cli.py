"""The ``flowprefill`` command line.

Each subcommand parses its arguments here and calls into the package that owns the work;
heavy imports happen inside the handlers so ``flowprefill --help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from bench.cli import add_engine_args, model_dir
from bench.cli import register as register_bench_commands
from bench.stack import ServingStack
from cluster.app import ROUTER_POLICIES
from cluster.multinode import ClusterError


def _local_stack() -> ServingStack:
    """The launcher's single-node Ray on loopback, for the bench commands that start the app in-process."""
    from cluster.launcher import LOCAL_STACK

    return LOCAL_STACK


def _cmd_generate(args: argparse.Namespace) -> int:
    from replicas.llm import OfflineEngine
    from replicas.sampling_params import SamplingParams

    engine = OfflineEngine(model_dir(args.model), dtype=args.dtype, device=args.device)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        stop=tuple(args.stop),
    )
    if args.raw:
        ids = engine.tokenizer.encode(args.prompt)
    else:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    result = engine.generate([ids], [params])[0]
    print(result.text)
    print(
        f"[{len(ids)} prompt tokens, {len(result.token_ids)} generated, finish={result.finish_reason}, "
        f"ttft={result.ttft_s * 1000:.0f} ms]",
        file=sys.stderr,
    )
    return 0


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from replicas.model.default_model import prepare_default_model

    path = prepare_default_model(Path(args.cache_dir) if args.cache_dir else None, force=args.force)
    print(path)
    return 0


def _cmd_models_tiny(args: argparse.Namespace) -> int:
    from replicas.model.tiny import build_preset_checkpoint, build_tiny_checkpoint

    given = {k: v for k, v in (("dtype", args.dtype), ("num_shards", args.shards)) if v is not None}
    if args.preset:
        if args.arch or args.untied:
            raise ValueError("--preset fixes the architecture: leave out --arch and --untied")
        path = build_preset_checkpoint(args.dir, args.preset, seed=args.seed, device=args.device, **given)
    else:
        path = build_tiny_checkpoint(args.dir, args.arch or "llama", seed=args.seed, device=args.device,
                                     tie_word_embeddings=not args.untied, **given)
    print(path)
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from replicas.model.decoder import DecoderModel
    from replicas.profiling import profile_model

    model = DecoderModel.load(model_dir(args.model), dtype=args.dtype, device=args.device)
    cost = profile_model(model, max_tokens=args.max_tokens, repeats=args.repeats)
    cost.save(args.out)
    err = cost.fit_error
    print(f"wrote {args.out}: a={cost.a:.4g} b={cost.b:.4g} c={cost.c:.4g} d={cost.d:.4g}; held-out error "
          f"median {err.get('median_rel') or 0:.1%}, p90 {err.get('p90_rel') or 0:.1%}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from cluster.join import is_loopback, resolve_address, split_address

    address, setting = resolve_address(args.address)
    if address and not is_loopback(split_address(address, setting)[0]):
        # A driver on a real multi-machine cluster finds its node by its own IP: Ray's single-node
        # switch (the launcher's default, read when ray is imported) would pin it to loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    from cluster.launcher import DEFAULT_CONFIG, serve_main

    overrides: dict[str, object] = {}
    engine: dict[str, object] = {}
    if args.model:
        engine["model"] = str(Path(args.model).resolve())
        overrides["model_name"] = Path(args.model).resolve().name
    if args.policy:
        engine["policy"] = args.policy
    if engine or args.engine:
        from cluster.launcher import load_app_args

        app = load_app_args(Path(args.config or DEFAULT_CONFIG))
        base = app.get("engine") or {}
        if args.engine and args.engine != app.get("engine_kind", "flowprefill"):  # settings of another kind
            base = {k: v for k, v in base.items() if k == "model"}
        overrides["engine"] = {**base, **engine}
    if args.replicas:
        overrides["num_replicas"] = args.replicas
    if args.router_policy:
        overrides["router_policy"] = args.router_policy
    if args.engine:
        overrides["engine_kind"] = args.engine
    return serve_main(Path(args.config or DEFAULT_CONFIG), overrides, args.host, args.port, args.num_cpus,
                      args.grpc_port, address=args.address)


def _cmd_cluster_up(args: argparse.Namespace) -> int:
    from cluster.multinode import LocalCluster

    cluster = LocalCluster.up(args.nodes, head_cpus=args.head_cpus, worker_cpus=args.worker_cpus, port=args.port,
                              state_file=Path(args.state_file) if args.state_file else None,
                              dashboard_port=args.dashboard_port)
    print(f"local Ray cluster: head + {args.nodes - 1} worker nodes, state in {cluster.state_file}, logs under "
          f"{cluster.temp_dir}\n  GCS (--address, RAY_ADDRESS): {cluster.address}\n  dashboard (serve deploy "
          f"--address, RAY_DASHBOARD_ADDRESS): {cluster.dashboard_address}", file=sys.stderr)
    print(cluster.dashboard_address)
    print(cluster.address, flush=True)  # last: what scripts take as the head's address
    return 0


def _cmd_cluster_deploy_config(args: argparse.Namespace) -> int:
    from cluster.deployed import render_deploy_config, write_deploy_config
    from cluster.launcher import DEFAULT_CONFIG
    from cluster.multinode import LocalCluster, placement_args

    cluster = LocalCluster.load(Path(args.state_file) if args.state_file else None)
    redis_url = args.redis_url or os.environ.get("REDIS_URL", "").strip()
    data = render_deploy_config(Path(args.config or DEFAULT_CONFIG), redis_url,
                                placement_args(cluster.custom_resources()), args.http_port)
    if args.out:
        write_deploy_config(data, Path(args.out))
        print(f"wrote {args.out}; deploy it with: RAY_AUTH_MODE=token serve deploy {args.out} "
              f"--address {cluster.dashboard_address}", file=sys.stderr)
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False), end="", flush=True)
    return 0


def _cmd_cluster_down(args: argparse.Namespace) -> int:
    from cluster.multinode import LocalCluster

    cluster = LocalCluster.load(Path(args.state_file) if args.state_file else None)
    cluster.down()
    print(f"stopped the local cluster at {cluster.address} ({len(cluster.nodes)} nodes; Serve apps on it went "
          "with it)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="flowprefill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt through the engine")
    gen.add_argument("prompt")
    add_engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="start Redis, a local Ray and the OpenAI-compatible Serve app")
    srv.add_argument("--model", default=None, help="HF model directory (default: the prepared SmolLM2-135M)")
    srv.add_argument("--replicas", type=int, default=None)
    srv.add_argument("--config", default=None, help="Serve config (default: ray_config.yaml)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=9000)
    srv.add_argument("--policy", choices=["flowprefill", "chunked", "fcfs"], default=None)
    srv.add_argument("--router-policy", choices=list(ROUTER_POLICIES), default=None)
    srv.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule (default: all)")
    srv.add_argument("--engine", choices=["flowprefill", "echo", "vllm"], default=None,
                     help="replica engine kind (default: the config's engine_kind); vllm runs vLLM's server from "
                          ".venv-vllm (scripts/vllm_env.sh) with the config's engine settings")
    srv.add_argument("--address", default=None,
                     help="join the running Ray cluster whose head is at HOST:PORT (default: $RAY_ADDRESS; "
                          "unset: start a local Ray on loopback); on exit only this app is removed")
    srv.set_defaults(func=_cmd_serve)

    clu = sub.add_parser("cluster", help="a multi-node Ray cluster on this machine (head + worker raylets, loopback)")
    csub = clu.add_subparsers(dest="cluster_command", required=True)
    up = csub.add_parser("up", help="start a Ray head and --nodes - 1 worker raylets; prints the head's address")
    up.add_argument("--nodes", type=int, default=3, help="Ray nodes in all, the head included (default 3)")
    up.add_argument("--head-cpus", type=float, default=2.0, help="CPUs the head offers (Serve, router)")
    up.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs each worker node offers")
    up.add_argument("--port", type=int, default=None, help="the head's GCS port (default: a free one)")
    up.add_argument("--state-file", default=None,
                    help="where to record the processes (default: $FLOWPREFILL_CLUSTER_STATE or "
                         "~/.cache/flowprefill/cluster.json)")
    up.add_argument("--dashboard-port", type=int, default=None,
                    help="the head dashboard's port on 127.0.0.1, for `serve deploy --address` (default: a free one)")
    up.set_defaults(func=_cmd_cluster_up)
    dep = csub.add_parser("deploy-config", help="write a Serve config for `serve deploy` onto the running local "
                                                "cluster (REDIS_URL, HTTP proxy on loopback, one replica per worker)")
    dep.add_argument("--config", default=None, help="the Serve config to start from (default: ray_config.yaml)")
    dep.add_argument("--redis-url", default=None, help="Redis every node reaches (default: $REDIS_URL; required)")
    dep.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy port on 127.0.0.1 (default 8000)")
    dep.add_argument("--out", "-o", default=None, help="file to write (owner-only; default: print it)")
    dep.add_argument("--state-file", default=None)
    dep.set_defaults(func=_cmd_cluster_deploy_config)
    down = csub.add_parser("down", help="stop exactly the nodes `cluster up` started")
    down.add_argument("--state-file", default=None)
    down.set_defaults(func=_cmd_cluster_down)

    models = sub.add_parser("models", help="prepare the default model or build test checkpoints")
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="convert the bundled SmolLM2-135M GGUF into an HF directory (once)")
    prep.add_argument("--cache-dir", default=None)
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(func=_cmd_models_prepare)
    tiny = msub.add_parser("tiny", help="write a seeded tiny random-weight checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", default=None, choices=["llama", "llama3", "mistral", "qwen2", "qwen3"],
                      help="default llama")
    tiny.add_argument("--preset", default=None, choices=["llama3-8b"],
                      help="full-size shapes with random weights instead of tiny ones (llama3-8b: Llama-3.1-8B, "
                           "bfloat16, about 16 GB; draw it with --device cuda)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                      help="default float32 (a preset's own: bfloat16)")
    tiny.add_argument("--shards", type=int, default=None, help="default 1 (a preset's own: 4)")
    tiny.add_argument("--untied", action="store_true", help="separate lm_head instead of tied embeddings")
    tiny.add_argument("--device", default="cpu", help="where the random weights are drawn: cpu or cuda")
    tiny.set_defaults(func=_cmd_models_tiny)

    prof = sub.add_parser("profile", help="measure prefill latency over input lengths and fit the TTFT cost model")
    add_engine_args(prof)
    prof.add_argument("--out", required=True, help="JSON file to write")
    prof.add_argument("--max-tokens", type=int, default=4096)
    prof.add_argument("--repeats", type=int, default=2)
    prof.set_defaults(func=_cmd_profile)

    bench = sub.add_parser("bench", help="benchmarks (print a table, optionally write JSON)")
    register_bench_commands(bench.add_subparsers(dest="bench_command", required=True), _local_stack)
    return parser


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(143)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowprefill`` console script."""
    args = build_parser().parse_args(argv)
    # SIGTERM ends a command like Ctrl-C does, so servers and Redis a bench started are stopped on the
    # way out (`serve` replaces this handler once Ray is up).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, ClusterError) as exc:
        print(f"flowprefill: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
