"""Loopback holds whatever the import order: a process that imported ray before the launcher set
Ray's cluster switch still gets every Ray listener on 127.0.0.1 (bench handover did this, and its
raylet, GCS and dashboard agent listened on every interface)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROBE = r'''
import json, os, subprocess
import ray  # first, before cluster.launcher sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
from cluster.launcher import start_local_ray

def children(pid):
    kids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                kids.add(int(d))
    return kids

start_local_ray(num_cpus=1)
ours, todo = set(), {os.getpid()}
while todo:
    pid = todo.pop()
    ours.add(pid)
    todo |= children(pid) - ours
lines = [l for l in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
         if any(f"pid={p}," in l for p in ours)]
print(json.dumps(lines))
ray.shutdown()
'''


def test_ray_imported_first_still_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = json.loads(out.stdout.strip().splitlines()[-1])
    assert lines, "expected Ray listeners"
    loopback = ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]")
    wide = [line for line in lines if not any(f" {a}:" in line for a in loopback)]
    assert not wide, "listeners beyond loopback:\n" + "\n".join(wide)
