"""vLLM's OpenAI server as a child process of a replica, in vLLM's own virtual environment.

:class:`VLLMConfig` holds the vLLM engine's settings (validated field by field) and turns them
into the server's flags and environment; :class:`VLLMProcess` runs it.

vLLM pins its own versions of torch, transformers, pydantic, FastAPI and more, which cannot share
the project's environment, so :class:`VLLMProcess` runs ``.venv-vllm/bin/python -m
vllm.entrypoints.openai.api_server`` (``scripts/vllm_env.sh`` creates it) on a free loopback port
and talks to it over HTTP only.  The child gets its own session (process group); stopping it
signals the whole group (vLLM's API server, its engine core process and their threads).  A small
shell watchdog (its own session) kills that group if the parent dies without cleaning up (a Ray
actor killed with SIGKILL runs no ``atexit`` handler).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from replicas.engine_config import EngineConfigError
from state.config_model import config_dataclass, located, parse_config

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
MODULE = "vllm.entrypoints.openai.api_server"
CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
THREADS_BIND = r"^(auto|nobind|\d+(-\d+)?(,\d+(-\d+)?)*)$"  # auto | nobind | a CPU list
DTYPES = ("float32", "bfloat16", "float16")
NonEmpty = Annotated[str, Field(min_length=1)]
_METRIC = re.compile(r"^(vllm:[a-z_]+)(\{[^}]*\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
# Inherited variables that would make vLLM's interpreter import the wrong packages, or shrink its
# OpenMP pool (Ray sets OMP_NUM_THREADS to the actor's CPU count), or point it at the Ray cluster.
_DROP_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAY_ADDRESS",
             "CUDA_VISIBLE_DEVICES")
# The watchdog: one process (no children to leave as zombies) that ignores SIGTERM, waits until its
# parent is gone (it is re-parented then), and stops the server's process group.
_WATCHDOG = """import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.getppid() == parent:
    time.sleep(1.0)
for sig, pause in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        break
    time.sleep(pause)
"""


class VLLMStartError(RuntimeError):
    """The vLLM server could not be started or did not become ready; the message says why (log tail)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_list(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` syntax)."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    start = prev = ids[0] if ids else 0
    for cpu in [*ids[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def parse_cpu_list(text: str) -> list[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]``."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(out))


def resolve_threads_bind(setting: str) -> str:
    """vLLM's thread binding for ``setting``: ``auto`` is every core this process may run on (vLLM's
    own ``auto`` reserves one core for the API server, which halves prefill speed on 2 cores)."""
    if setting != "auto":
        return setting
    return cpu_list(sorted(os.sched_getaffinity(0)))


def bound_threads(setting: str) -> int:
    """How many OpenMP threads the binding gives vLLM (``nobind``: the cores of this process)."""
    resolved = resolve_threads_bind(setting)
    return len(os.sched_getaffinity(0)) if resolved == "nobind" else len(parse_cpu_list(resolved))


def check_venv(venv: str | Path) -> Path:
    """The interpreter of the vLLM environment; :class:`VLLMStartError` if it is missing or incomplete."""
    root = Path(venv) if Path(venv).is_absolute() else REPO / venv
    python = root / "bin" / "python"
    if not python.exists():
        raise VLLMStartError(f"{python} is missing: run scripts/vllm_env.sh to create vLLM's environment "
                             "(vLLM runs in its own virtual environment, apart from .venv)")
    if not any(root.glob(".installed-*")):
        raise VLLMStartError(f"{root} is incomplete (no .installed-* stamp): re-run scripts/vllm_env.sh")
    return python


def child_env(extra: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: this one without the variables in :data:`_DROP_ENV`, plus ``extra``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _DROP_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    env.update(extra)
    return env


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes] | None:
    """``(status, body)`` of a GET on loopback, None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None


@config_dataclass(EngineConfigError)
class VLLMConfig:
    """Settings of the vLLM engine (``engine:`` in ``ray_config.yaml`` with ``engine_kind: vllm``)."""

    model: NonEmpty | None = None  # HF model directory; None = the prepared SmolLM2-135M default
    dtype: Literal[DTYPES] = "float32"
    max_num_batched_tokens: PositiveInt = 512  # chunked-prefill token budget per step
    long_prefill_token_threshold: PositiveInt | None = 256  # cap on one prompt's share of a step (None: vLLM's)
    max_model_len: PositiveInt = 8192  # at most the checkpoint's max_position_embeddings
    kv_cache_gib: PositiveInt = 4  # VLLM_CPU_KVCACHE_SPACE
    # VLLM_CPU_OMP_THREADS_BIND: auto (every core this replica may use), nobind or a CPU list such as 0-3 or 0,2,4
    omp_threads_bind: Annotated[str, Field(pattern=THREADS_BIND)] = "auto"
    startup_timeout_s: PositiveFloat = 420.0
    venv: NonEmpty = ".venv-vllm"  # relative to the repository root, or absolute
    extra_args: Annotated[tuple[str, ...], Field(strict=False)] = ()  # more vLLM server flags, passed as given
    profile: NonEmpty | None = None  # cost-model JSON; None = cached vLLM profile, else profiled at start
    profile_max_tokens: PositiveInt = 2048
    metrics_interval_s: PositiveFloat = 1.0  # how often vLLM's /metrics is polled
    # vLLM's automatic prefix caching (its own default is on). Off by default here: the unique-prompt
    # comparison runs without it; shared-prefix benchmarks turn it on (vLLM at its defaults).
    enable_prefix_caching: bool = False

    @model_validator(mode="after")
    def _profile_fits(self) -> VLLMConfig:
        if self.profile_max_tokens >= self.max_model_len:
            raise located(("profile_max_tokens",), f"must be below max_model_len ({self.max_model_len})",
                          self.profile_max_tokens)
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], prefix: str = "engine") -> VLLMConfig:
        """Validate a mapping (``extra_args`` may be a list); errors name ``<prefix>.<field>``."""
        return parse_config(cls, data, EngineConfigError, prefix)

    def check_environment(self, prefix: str = "engine") -> Path:
        """The vLLM environment's interpreter; :class:`EngineConfigError` on ``venv`` if it is missing."""
        try:
            return check_venv(self.venv)
        except VLLMStartError as exc:
            raise EngineConfigError(f"{prefix}.venv", str(exc)) from None

    def server_args(self, model_dir: str, served_name: str) -> list[str]:
        """vLLM's server flags (after ``--host``/``--port``) for these settings; with prefix caching
        on, vLLM's own default, no flag names it."""
        args = ["--model", model_dir, "--served-model-name", served_name, "--max-model-len", str(self.max_model_len),
                "--dtype", self.dtype, "--enable-chunked-prefill", "--max-num-batched-tokens",
                str(self.max_num_batched_tokens), "--scheduling-policy", "priority",
                "--disable-access-log-for-endpoints", "/metrics,/v1/models"]  # polled: keep them out of the log
        if not self.enable_prefix_caching:
            args.append("--no-enable-prefix-caching")
        if self.long_prefill_token_threshold is not None:
            args += ["--long-prefill-token-threshold", str(self.long_prefill_token_threshold)]
        return [*args, *self.extra_args]

    def server_env(self) -> dict[str, str]:
        """The variables vLLM's CPU backend reads (added to the inherited environment)."""
        return {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
                "VLLM_CPU_OMP_THREADS_BIND": resolve_threads_bind(self.omp_threads_bind)}


def parse_vllm_metrics(text: str) -> dict[str, Any]:
    """The counters the engine uses from vLLM's Prometheus text (summed over label sets)."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        m = _METRIC.match(line.strip())
        if m is None:
            continue
        name, labels, raw = m.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        if name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:generation_tokens_total",
                    "vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
            out[name] = out.get(name, 0.0) + value
        elif name == "vllm:kv_cache_usage_perc":
            out[name] = max(out.get(name, 0.0), value)
        elif name == "vllm:cache_config_info" and labels:
            info = dict(_LABEL.findall(labels))
            try:
                out["kv_total_tokens"] = int(info["num_gpu_blocks"]) * int(info["block_size"])
            except (KeyError, ValueError):
                pass
    return out


class VLLMProcess:
    """One vLLM OpenAI server: start it, wait until it serves, stop it (whole process group).

    ``args`` are the server's flags after ``--host/--port`` (the engine builds them from its
    settings); ``env`` adds to the inherited environment.
    """

    def __init__(self, python: Path, args: Sequence[str], env: Mapping[str, str], served_name: str,
                 *, port: int | None = None, log_path: Path | None = None) -> None:
        self.python = python
        self.port = port or free_port()
        self.argv = [str(python), "-m", MODULE, "--host", HOST, "--port", str(self.port), *args]
        self.env = child_env(env)
        self.served_name = served_name
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"flowprefill-vllm-{self.port}-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no ``/v1``)."""
        return f"http://{HOST}:{self.port}"

    @property
    def pgid(self) -> int | None:
        """The child's process group (its own pid), None before :meth:`start`."""
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Launch the server in a new session, with a watchdog in its group; output goes to the log."""
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(self.argv) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop, 5.0)
        self.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.proc.pid)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        """Whether the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def served_models(self) -> list[str] | None:
        """The model ids ``GET /v1/models`` lists, None while the server does not answer."""
        got = http_get(self.url + "/v1/models")
        if got is None or got[0] != 200:
            return None
        try:
            data = json.loads(got[1])
        except ValueError:
            return None
        return [str(m.get("id")) for m in data.get("data") or [] if isinstance(m, dict)]

    def wait_ready(self, timeout_s: float) -> float:
        """Poll ``/v1/models`` until it lists the served model; returns the seconds it took.

        Raises :class:`VLLMStartError` (with the log tail) when the server exits or ``timeout_s``
        passes; the server is stopped then.
        """
        assert self.proc is not None, "start() first"
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                raise VLLMStartError(f"vLLM exited with status {code} before it was ready; log {self.log_path}:\n"
                                     f"{self.log_tail()}")
            models = self.served_models()
            if models is not None and self.served_name in models:
                self.startup_s = time.monotonic() - t0
                return self.startup_s
            time.sleep(0.5)
        self.stop()
        raise VLLMStartError(f"vLLM not ready after {timeout_s:.0f} s (startup_timeout_s); log {self.log_path}:\n"
                             f"{self.log_tail()}")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the server's process group, wait up to ``grace_s``, then SIGKILL what remains."""
        proc, self.proc = self.proc, None
        watchdog, self.watchdog = self.watchdog, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if watchdog is not None:  # first, so it does not outlive us (it ignores SIGTERM)
            try:
                os.killpg(watchdog.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:  # the leader is gone; its engine core may not be
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            break
        for child in (proc, watchdog):
            if child is not None:
                try:
                    child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
