"""SIGTERM ends a ``flowprefill`` command like Ctrl-C: context managers run, so a bench stops the
servers and Redis it started (fault injection: the command body is replaced by one that signals itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import contextlib, os, signal, sys, time
import cluster.cli as cli

marker = sys.argv[1]

@contextlib.contextmanager
def started_server():
    try:
        yield
    finally:
        open(marker, "w").write("stopped")  # what ManagedServer.__exit__ does: stop what was started

def fake_command(args):
    with started_server():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted by the signal
    return 0

cli._cmd_models_prepare = fake_command
sys.exit(cli.main(["models", "prepare"]))
"""


def test_sigterm_runs_the_cleanup_of_the_running_command(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(marker)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 143, proc.stderr
    assert marker.read_text() == "stopped"
