"""Start and stop the serving systems under test as subprocesses, on 127.0.0.1 only.

:class:`ManagedServer` runs one server command in its own process group (session), logs its
output to a file, waits until ``GET /v1/models`` lists the served model, and stops it by
signalling the main process (SIGTERM, which ``flowprefill serve`` and vLLM handle by shutting
down cleanly), then killing whatever remains of the group.

Systems (:func:`server_spec`):

* ``flowprefill``, ``chunked``, ``fcfs``: ``python -m cluster.cli serve --policy P --port P
  --grpc-port G --config TMP.yaml``, where the temporary config is ``ray_config.yaml`` with engine
  overrides (the chunk size of the ``chunked`` baseline is the engine's ``policy_chunk_tokens``,
  for which ``serve`` has no flag). A benchmark names a ``chunked`` server of chunk ``N`` as
  ``chunked-N`` (:func:`split_system`);
* ``flowprefill-nocache``: ``flowprefill`` with the engine's prefix cache off
  (``enable_prefix_caching: false``), to measure what the cache adds on shared-prefix traffic;
* ``vllm``: vLLM's OpenAI server from ``.venv-vllm`` (``scripts/vllm_env.sh``) with the flags of
  ``shared/BASELINES.md``: chunked prefill, priority scheduling, no prefix caching, float32, both
  cores (``VLLM_CPU_OMP_THREADS_BIND=0-1``), chunk budget 512 and long-prefill threshold 256. With
  ``prefix_caching`` (shared-prefix benchmarks) ``--no-enable-prefix-caching`` is dropped: vLLM
  runs at its defaults, prefix caching on; ``flowprefill-vllm`` gets the same through its
  engine setting ``enable_prefix_caching``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SERVE_CONFIG = REPO / "ray_config.yaml"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
FLOWPREFILL_SYSTEMS = ("flowprefill", "chunked", "fcfs")
NOCACHE = "flowprefill-nocache"  # flowprefill with its prefix cache off
#: FlowPrefill as two replicas sharing the machine's cores (the launcher splits them, half a logical CPU
#: each so the router ingress fits on 2 cores): prefill/decode disaggregated (1 prefill + 1 decode
#: replica, replicas/handover.py) against 2 colocated replicas. The app ``args`` over the Serve config's.
TOPOLOGIES: dict[str, dict[str, Any]] = {
    "flowprefill-pd": {"num_replicas": 1, "replica_cpus": 0.5, "decode": {"num_replicas": 1, "replica_cpus": 0.5}},
    "flowprefill-x2": {"num_replicas": 2, "replica_cpus": 0.5},
}
SYSTEMS = (*FLOWPREFILL_SYSTEMS, NOCACHE, *TOPOLOGIES, "vllm", "flowprefill-vllm")  # the last: vLLM behind our router
HOST = "127.0.0.1"
CHUNKED_PREFIX = "chunked-"


class ServerStartError(RuntimeError):
    """A server exited or did not become ready in time; the message ends with its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerSpec:
    """How to run one system: command, environment additions, port and the model name it serves."""

    name: str
    argv: list[str]
    port: int
    model_name: str
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 300.0
    cleanup: list[Path] = field(default_factory=list)  # temporary files to remove after stopping

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (without ``/v1``)."""
        return f"http://{HOST}:{self.port}"


def split_system(label: str) -> tuple[str, int | None]:
    """``chunked-256`` -> ``("chunked", 256)``; any other known system -> ``(label, None)``.

    Raises ValueError naming the label when it is neither a system of :data:`SYSTEMS` nor
    ``chunked-N`` with a positive integer ``N``.
    """
    if label.startswith(CHUNKED_PREFIX):
        size = label[len(CHUNKED_PREFIX):]
        if size.isdigit() and int(size) > 0:
            return "chunked", int(size)
        raise ValueError(f"system {label!r}: the chunk of chunked-N must be a positive integer")
    if label not in SYSTEMS:
        raise ValueError(f"unknown system {label!r}; expected one of {', '.join(SYSTEMS)} or chunked-N")
    return label, None


def vllm_available() -> tuple[bool, str]:
    """Whether ``.venv-vllm`` holds vLLM; the reason when it does not."""
    if not VLLM_PYTHON.exists():
        return False, f"{VLLM_PYTHON} is missing: run scripts/vllm_env.sh to install vLLM (CPU)"
    if not any((REPO / ".venv-vllm").glob(".installed-*")):
        return False, f"{REPO / '.venv-vllm'} is incomplete (no stamp file): re-run scripts/vllm_env.sh"
    return True, ""


def _serve_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Serve config file and its ``flowprefill`` application (errors name the file and the field)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the Serve config ({exc})") from exc
    apps = data.get("applications") if isinstance(data, dict) else None
    app = next((a for a in apps or [] if isinstance(a, dict) and a.get("name") == "flowprefill"), None)
    if app is None:
        raise ValueError(f"{path}: no application named 'flowprefill' under 'applications'")
    return data, app


def serve_app_args(path: Path | None = None) -> dict[str, Any]:
    """The ``args`` of the FlowPrefill application in the Serve config the bench's servers run with."""
    args = _serve_config(path or DEFAULT_SERVE_CONFIG)[1].get("args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"{path or DEFAULT_SERVE_CONFIG}: field 'applications[flowprefill].args' must be a mapping")
    return args


def flowprefill_config(out_dir: Path, policy: str, engine: Mapping[str, Any], base: Path | None = None,
                       engine_kind: str = "flowprefill", app_args: Mapping[str, Any] | None = None) -> Path:
    """Write ``ray_config.yaml`` (or ``base``) with ``engine`` merged into the app's engine settings
    and the given policy, ``app_args`` over the app's other ``args``; returns the path of the new
    file in ``out_dir``.  With ``engine_kind`` ``vllm`` the engine settings are replaced by ``engine``
    (vLLM's own) and no policy is set."""
    data, app = _serve_config(base or DEFAULT_SERVE_CONFIG)
    args = {**(app.get("args") or {}), **dict(app_args or {})}
    app["args"] = args
    if engine_kind == "flowprefill":
        args["engine"] = {**(args.get("engine") or {}), **dict(engine), "policy": policy}
    else:
        args["engine_kind"], args["engine"] = engine_kind, dict(engine)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"serve-{policy}-", suffix=".yaml", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return Path(name)


def server_spec(system: str, model_dir: Path, model_name: str, *, work_dir: Path,
                engine: Mapping[str, Any] | None = None, chunk_tokens: int = 256,
                vllm_budget: int = 512, vllm_long_prefill: int | None = 256, threads_bind: str = "0-1",
                port: int | None = None, prefix_caching: bool = False,
                vllm_block_size: int | None = None) -> ServerSpec:
    """The command line of ``system`` (one of :data:`SYSTEMS`) serving ``model_dir`` as ``model_name``.

    ``engine`` holds FlowPrefill engine overrides (every FlowPrefill system gets them);
    ``chunk_tokens`` is the chunk of the ``chunked`` baseline; ``vllm_budget`` and
    ``vllm_long_prefill`` are vLLM's ``--max-num-batched-tokens`` and
    ``--long-prefill-token-threshold`` (None: not passed); ``prefix_caching`` turns vLLM's prefix
    caching on (both vLLM systems; FlowPrefill's engines keep their own setting); ``vllm_block_size``
    is ``vllm``'s ``--block-size`` (None: its default, 128 tokens on the CPU, whose prefix cache then
    hits nothing shorter than a block).
    """
    if system == NOCACHE:
        spec = server_spec("flowprefill", model_dir, model_name, work_dir=work_dir,
                           engine={**(engine or {}), "enable_prefix_caching": False}, port=port)
        spec.name = NOCACHE
        return spec
    port = port or free_port()
    if system in FLOWPREFILL_SYSTEMS or system in TOPOLOGIES:
        settings = dict(engine or {})
        settings["model"] = str(model_dir)
        if system == "chunked":
            settings["policy_chunk_tokens"] = chunk_tokens
        if "decode" in TOPOLOGIES.get(system, {}):
            settings["role"] = "prefill"
        policy = system if system in FLOWPREFILL_SYSTEMS else "flowprefill"
        config = flowprefill_config(work_dir, policy, settings, app_args=TOPOLOGIES.get(system))
        grpc_port = free_port()
        argv = [sys.executable, "-m", "cluster.cli", "serve", "--policy", policy, "--host", HOST,
                "--port", str(port), "--grpc-port", str(grpc_port), "--config", str(config),
                "--model", str(model_dir)]
        # --model renames the served model after the directory; the bench reads the name from /v1/models.
        return ServerSpec(system, argv, port, Path(model_dir).resolve().name, cleanup=[config])
    if system == "vllm":
        ok, why = vllm_available()
        if not ok:
            raise ServerStartError(why)
        argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", model_name, "--host", HOST, "--port", str(port),
                "--max-model-len", "8192", "--dtype", "float32", "--enable-chunked-prefill",
                "--max-num-batched-tokens", str(vllm_budget), "--scheduling-policy", "priority"]
        if not prefix_caching:
            argv.append("--no-enable-prefix-caching")
        if vllm_long_prefill is not None:
            argv += ["--long-prefill-token-threshold", str(vllm_long_prefill)]
        if vllm_block_size is not None:
            argv += ["--block-size", str(vllm_block_size)]
        env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        return ServerSpec(system, argv, port, model_name, env=env, ready_timeout_s=420.0)
    if system == "flowprefill-vllm":  # the same vLLM settings as "vllm", inside FlowPrefill's replica
        ok, why = vllm_available()
        if not ok:
            raise ServerStartError(why)
        settings: dict[str, Any] = {"model": str(model_dir), "dtype": "float32", "max_num_batched_tokens": vllm_budget,
                                    "kv_cache_gib": 4, "omp_threads_bind": threads_bind,
                                    "enable_prefix_caching": prefix_caching}
        if vllm_long_prefill is not None:
            settings["long_prefill_token_threshold"] = vllm_long_prefill
        config = flowprefill_config(work_dir, "vllm", settings, engine_kind="vllm")
        argv = [sys.executable, "-m", "cluster.cli", "serve", "--engine", "vllm", "--host", HOST, "--port", str(port),
                "--grpc-port", str(free_port()), "--config", str(config), "--model", str(model_dir)]
        return ServerSpec(system, argv, port, Path(model_dir).resolve().name, cleanup=[config],
                          ready_timeout_s=900.0)
    raise ValueError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")


def served_models(base_url: str, timeout_s: float = 2.0) -> list[str] | None:
    """The model ids ``GET /v1/models`` lists, or None when the server does not answer (yet)."""
    import json

    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=timeout_s) as resp:  # noqa: S310 - loopback
            if resp.status != 200:
                return None
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return [m.get("id") for m in data.get("data") or [] if isinstance(m, dict)]


def parse_engine_settings(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (VALUE read as YAML: numbers, booleans, null) into a settings dict."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-set: expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"--engine-set {key.strip()}: cannot read {raw!r}: {exc}") from None
    return out


def check_engine_settings(settings: Mapping[str, Any]) -> None:
    """Refuse a bad ``--engine-set`` key or value now, naming it (not when the server starts)."""
    from replicas.engine_config import EngineConfig

    EngineConfig.from_dict(settings, prefix="--engine-set")


def metric_values(text: str, name: str) -> list[float]:
    """Every sample of metric ``name`` (any labels) in Prometheus text format."""
    values = []
    for line in text.splitlines():
        if line.split("{", 1)[0].split(" ", 1)[0] != name:
            continue
        try:
            values.append(float(line.rsplit(" ", 1)[1]))
        except (IndexError, ValueError):
            continue
    return values


def metrics_text(base_url: str, timeout_s: float = 30.0) -> str:
    """The server's ``/metrics`` page."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout_s) as resp:
        return resp.read().decode()


def router_journal(base_url: str) -> dict[str, Any]:
    """The ``journal`` part of ``/v1/router/stats``: open requests, pending writes, write failures."""
    with urllib.request.urlopen(f"{base_url}/v1/router/stats", timeout=30) as resp:
        return json.loads(resp.read()).get("journal", {})


def max_cost_scale(base_url: str) -> float | None:
    """The highest replica cost scale in the server's ``/metrics`` (see :func:`cost_scale_from_metrics`),
    or None when it cannot be read."""
    try:
        return cost_scale_from_metrics(metrics_text(base_url, timeout_s=5.0))
    except OSError:
        return None


def cost_scale_from_metrics(text: str) -> float | None:
    """The highest ``flowprefill_replica_cost_scale`` (how much slower than profiled a replica's prefill
    runs now) in Prometheus text, or None when no replica reports one."""
    return max(metric_values(text, "flowprefill_replica_cost_scale"), default=None)


class ManagedServer:
    """One running system; use as a context manager (start and wait on enter, stop on exit)."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self.model_name = spec.model_name

    def start(self) -> None:
        """Launch the command in a new session, output to the log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child, closed after it exits
        env = {**os.environ, **self.spec.env}
        self.proc = subprocess.Popen(self.spec.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self) -> float:
        """Poll ``/v1/models`` until it lists a model; returns the seconds since :meth:`start`."""
        assert self.proc is not None, "start() first"
        t0 = time.monotonic()
        deadline = t0 + self.spec.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(f"{self.spec.name} exited with status {code} before it was ready; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
            models = served_models(self.spec.base_url)
            if models:
                self.model_name = self.spec.model_name if self.spec.model_name in models else str(models[0])
                self.startup_s = time.monotonic() - t0
                return self.startup_s
            time.sleep(0.5)
        raise ServerStartError(f"{self.spec.name} not ready after {self.spec.ready_timeout_s:.0f} s; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server, wait up to ``grace_s``, then SIGKILL its whole process group."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers: Ray workers, vLLM engine core
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for path in self.spec.cleanup:
            path.unlink(missing_ok=True)

    def __enter__(self) -> ManagedServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop(grace_s=5.0)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
