"""A private ``redis-server`` for development, tests and single-machine clusters.

:class:`RedisServer` starts ``redis-server`` bound to 127.0.0.1 on a free port, waits until it
answers (checking INFO's ``process_id`` so another server on the port cannot pass for it) and
stops it again (SIGTERM, then SIGKILL).  :func:`redis_url_from_env_or_start`
uses ``$REDIS_URL`` when set (an external or KubeRay-managed Redis) and starts a private server
otherwise.  Passwords never reach logs or error messages: use :func:`redact_url` before printing
a URL.  The password is passed through a 0600 config file, so it does not show in ``ps`` either.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis

HOST = "127.0.0.1"
REDIS_URL_ENV = "REDIS_URL"


class RedisServerError(RuntimeError):
    """``redis-server`` is missing, died while starting, or did not answer in time."""


def redact_url(url: str) -> str:
    """``url`` with any password (userinfo or ``?password=`` query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if sep else netloc
    query = parts.query
    if query:
        pairs = [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1 (context manager; ``stop()`` is idempotent).

    ``persist_dir`` keeps an append-only file there, so data survives :meth:`restart`; without
    it the server is memory-only (``--save '' --appendonly no``) and a restart starts empty.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        persist_dir: str | Path | None = None,
        executable: str | None = None,
        start_timeout_s: float = 10.0,
        start: bool = True,
    ) -> None:
        found = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(found).exists():
            raise RedisServerError(
                "redis-server not found: install it (Debian/Ubuntu: `apt-get install -y redis-server`, "
                "or run scripts/bootstrap.sh as root) or set REDIS_URL to an existing server"
            )
        self.executable = found
        self.password = password or None
        self.persist_dir = Path(persist_dir) if persist_dir is not None else None
        self.start_timeout_s = start_timeout_s
        self._fixed_port = port
        self.port: int = port or 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None
        if start:
            self.start()

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0`` (contains the password: never log it)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def redacted_url(self) -> str:
        """:attr:`url` with the password replaced by ``***``."""
        return redact_url(self.url)

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the server (a free port the first time, the same port afterwards) and wait until it answers."""
        if self.running:
            return
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="flowprefill-redis-"))
        attempts = 1 if (self._fixed_port or self.port) else 3
        for attempt in range(attempts):
            if not self.port:
                self.port = _free_port()
            try:
                self._launch()
                atexit.register(self.stop)
                return
            except RedisServerError:
                # Another process may have taken the free port between probe and bind: retry.
                if attempt + 1 >= attempts or "address already in use" not in self._log_tail().lower():
                    self._cleanup_workdir()
                    raise
                self.port = 0

    def _launch(self) -> None:
        assert self._workdir is not None
        conf = self._workdir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            if self.password:
                # Config-file string syntax: quote and escape so any password round-trips.
                escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
                f.write(f'requirepass "{escaped}"\n')
        data_dir = self.persist_dir or self._workdir
        data_dir.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes"] if self.persist_dir else ["--appendonly", "no"]
        args = [
            self.executable, str(conf),
            "--bind", HOST, "--port", str(self.port), "--daemonize", "no", "--protected-mode", "yes",
            "--save", "", *persistence, "--dir", str(data_dir), "--logfile", "",
        ]  # fmt: skip
        self._log_path = self._workdir / f"redis-{self.port}.log"
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis(
            host=HOST, port=self.port, password=self.password, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        try:
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    code = None if self._proc is None else self._proc.returncode
                    self._proc = None
                    raise RedisServerError(
                        f"redis-server on {HOST}:{self.port} exited with code {code} while starting; "
                        f"log tail:\n{self._log_tail()}"
                    )
                try:
                    # Check identity: another server already on this port must not pass for ours.
                    if client.info("server").get("process_id") == self._proc.pid:
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying the append-only file
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    self._terminate()
                    raise RedisServerError(
                        f"redis-server on {HOST}:{self.port} did not answer PING within "
                        f"{self.start_timeout_s:.1f} s; log tail:\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self, lines: int = 20) -> str:
        if self._log_path is None or not self._log_path.exists():
            return "<no log>"
        text = self._log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        out = "\n".join(text) or "<empty log>"
        return out.replace(self.password, "***") if self.password else out

    def _terminate(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; keeps the port and data dir for :meth:`restart`."""
        self._terminate(timeout_s)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its temporary directory (the ``persist_dir`` is kept)."""
        self.stop()
        self._cleanup_workdir()
        atexit.unregister(self.stop)

    def _cleanup_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisServer({self.redacted_url}, running={self.running})"


def redis_url_from_env_or_start(**server_kwargs: object) -> tuple[str, RedisServer | None]:
    """``($REDIS_URL, None)`` when the variable is set, else ``(url, server)`` of a new private server.

    The caller owns the returned server and must ``close()`` it.
    """
    url = os.environ.get(REDIS_URL_ENV, "").strip()
    if url:
        return url, None
    server = RedisServer(**server_kwargs)  # type: ignore[arg-type]
    return server.url, server
