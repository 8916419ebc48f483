"""``serve deploy`` (Ray's own CLI) onto a ``flowprefill cluster up`` cluster, as the README documents.

``flowprefill cluster up --nodes 2`` starts a head (with the dashboard on loopback) and one worker
node; ``flowprefill cluster deploy-config`` writes the config with the session's real Redis in
its runtime env; ``serve deploy --address <dashboard>`` deploys it, and ``serve status`` is polled
until RUNNING. The app runs the model-free echo engine on a tiny checkpoint (no weights to load),
so the time measured is Serve's and FlowPrefill's own. A REDIS_URL that is unset or points to a
closed port must fail the deployment with a message naming REDIS_URL, visible in ``serve status``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.polling import wait_for

MODEL = "echo-model"
NAMESPACE = "serve-deploy-test"
REPO = Path(__file__).resolve().parents[1]
SERVE = Path(sys.executable).with_name("serve")
LOOPBACK = ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"), **extra}
    for name in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "REDIS_URL"):  # only what each command is given
        if name not in extra:
            env.pop(name, None)
    return env


def _cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=_env(**env))


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(SERVE), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env())


def _app_status(dashboard: str) -> dict:
    """``serve status`` (its YAML) for the flowprefill app; {} while there is none."""
    out = _serve("status", "--address", dashboard)
    assert out.returncode == 0, out.stderr
    return (yaml.safe_load(out.stdout).get("applications") or {}).get("flowprefill") or {}


def test_deploy_config_refuses_a_missing_redis_url(tmp_path):
    from cluster.deployed import DeployConfigError, render_deploy_config

    with pytest.raises(DeployConfigError, match="REDIS_URL"):
        render_deploy_config(REPO / "ray_config.yaml", "", {})
    config = render_deploy_config(REPO / "ray_config.yaml", "redis://127.0.0.1:1/0", {"num_replicas": 2})
    (app,) = config["applications"]
    assert app["runtime_env"]["env_vars"]["REDIS_URL"] == "redis://127.0.0.1:1/0" and app["args"]["num_replicas"] == 2
    assert config["http_options"]["host"] == "127.0.0.1" and config["proxy_location"] == "HeadOnly"


def test_deployed_redis_url_names_the_variable_and_is_bounded():
    from cluster.deployed import DeployConfigError, deployed_redis_url
    from cluster.multinode import free_port

    with pytest.raises(DeployConfigError, match="REDIS_URL is not set"):
        deployed_redis_url(None)
    started = time.monotonic()
    with pytest.raises(DeployConfigError, match=r"REDIS_URL=redis://:\*\*\*@127\.0\.0\.1"):
        deployed_redis_url(f"redis://:secret@127.0.0.1:{free_port()}/0", timeout_s=1.0)
    assert time.monotonic() - started < 5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``flowprefill cluster up --nodes 2`` (the CLI); the last test stops it with ``cluster down``."""
    from cluster.multinode import LocalCluster

    state_file = tmp_path_factory.mktemp("deploy-cluster") / "cluster.json"
    try:
        up = _cli("cluster", "up", "--nodes", "2", "--head-cpus", "2", "--worker-cpus", "1",
                  "--state-file", str(state_file), timeout=600)
    except subprocess.TimeoutExpired:
        if state_file.exists():
            LocalCluster.load(state_file).down(keep_logs=True)
        raise
    assert up.returncode == 0, up.stderr
    local = LocalCluster.load(state_file)
    try:
        assert up.stdout.split() == [local.dashboard_address, local.address], up.stdout
        assert "serve deploy" in up.stderr and local.dashboard_address.startswith("http://127.0.0.1:")
        yield local
    finally:
        if state_file.exists():
            LocalCluster.load(state_file).down()


@pytest.fixture(scope="module")
def echo_config(tmp_path_factory, tiny_checkpoint_factory) -> Path:
    """ray_config.yaml with the echo engine (10 ms per token) on a tiny checkpoint."""
    app = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    app["applications"][0]["args"].update({
        "model_name": MODEL, "namespace": NAMESPACE, "engine_kind": "echo", "replica_cpus": 0.5,
        "engine": {"model": str(tiny_checkpoint_factory()), "decode_step_s": 0.01, "prefill_s_per_1k_tokens": 0.1}})
    path = tmp_path_factory.mktemp("deploy-config") / "echo.yaml"
    path.write_text(yaml.safe_dump(app))
    return path


def _deploy_config(cluster, echo_config: Path, out: Path, redis_url: str, http_port: int) -> Path:
    made = _cli("cluster", "deploy-config", "--config", str(echo_config), "--redis-url", redis_url, "--http-port",
                str(http_port), "--state-file", cluster.state_file, "-o", str(out), timeout=60)
    assert made.returncode == 0, made.stderr
    return out


@pytest.fixture(scope="module")
def deployed(cluster, echo_config, redis_server, tmp_path_factory) -> dict:
    from cluster.multinode import free_port

    port = free_port()
    config = _deploy_config(cluster, echo_config, tmp_path_factory.mktemp("deploy") / "deploy.yaml",
                            redis_server.url, port)
    assert "REDIS_URL" in config.read_text() and oct(config.stat().st_mode & 0o777) == "0o600"
    started = time.monotonic()
    sent = _serve("deploy", str(config), "--address", cluster.dashboard_address, timeout=120)
    assert sent.returncode == 0, sent.stderr
    status = wait_for(lambda: (s := _app_status(cluster.dashboard_address)).get("status") in ("RUNNING",
                      "DEPLOY_FAILED") and s, "the app RUNNING", timeout_s=120, interval_s=0.5)
    assert status["status"] == "RUNNING", status.get("message")
    print(f"\nserve deploy -> RUNNING: {time.monotonic() - started:.1f} s", file=sys.stderr)
    return {"base": f"http://127.0.0.1:{port}", "port": port, "redis_url": redis_server.url, "status": status}


async def _replica_states(redis_url: str) -> dict:
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        return await state.read_all_replica_states(skip_invalid=True)



@pytest.mark.slow
def test_serve_deploy_runs_serves_and_registers_replicas(deployed):
    assert set(deployed["status"]["deployments"]) == {"FlowPrefillReplica", "FlowPrefillRouter"}
    req = urllib.request.Request(deployed["base"] + "/v1/completions", headers={"content-type": "application/json"},
                                 data=json.dumps({"model": MODEL, "prompt": "hello there", "max_tokens": 3}).encode())
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = json.loads(resp.read())
        replica = resp.headers["x-flowprefill-replica"]
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    states = wait_for(lambda: asyncio.run(_replica_states(deployed["redis_url"])), "the replica in Redis")
    assert set(states) == {replica}  # one worker node: one replica, the one that answered


@pytest.mark.slow
def test_every_listener_is_on_loopback(deployed, cluster):
    """GCS, raylets, the dashboard and its agents, Serve's controller, proxy and replicas: 127.0.0.1 only."""
    pids = set().union(*(n.processes() for n in cluster.nodes))
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [line for line in out.splitlines() if any(f"pid={p}," in line for p in pids)]
    dashboard = f"127.0.0.1:{cluster.dashboard_port} "
    assert any(f":{deployed['port']} " in line for line in ours) and any(dashboard in line for line in ours), ours
    wide = [line for line in ours if not any(f" {a}:" in line for a in LOOPBACK)]
    assert not wide, "listeners beyond loopback:\n" + "\n".join(wide)


@pytest.mark.slow
@pytest.mark.parametrize("redis", ["closed-port", "unset"])
def test_bad_redis_url_fails_the_deployment_naming_it(deployed, cluster, echo_config, tmp_path, redis):
    from cluster.multinode import free_port

    config = _deploy_config(cluster, echo_config, tmp_path / "bad.yaml", f"redis://127.0.0.1:{free_port()}/0",
                            deployed["port"])
    if redis == "unset":  # a hand-written config without the runtime env
        data = yaml.safe_load(config.read_text())
        del data["applications"][0]["runtime_env"]
        config.write_text(yaml.safe_dump(data))
    expected = "REDIS_URL is not set" if redis == "unset" else "REDIS_URL=redis://127.0.0.1:"
    started = time.monotonic()
    assert _serve("deploy", str(config), "--address", cluster.dashboard_address).returncode == 0
    wait_for(lambda: (s := _app_status(cluster.dashboard_address)).get("status") == "DEPLOY_FAILED"
             and expected in s.get("message", ""), f"DEPLOY_FAILED naming {expected!r}", timeout_s=60, interval_s=0.5)
    print(f"\n  {redis} REDIS_URL: DEPLOY_FAILED after {time.monotonic() - started:.1f} s", file=sys.stderr)


@pytest.mark.slow
def test_serve_shutdown_leaves_the_cluster_and_cluster_down_stops_it(deployed, cluster):
    assert _serve("shutdown", "--address", cluster.dashboard_address, "-y").returncode == 0
    wait_for(lambda: not _app_status(cluster.dashboard_address), "the app gone", timeout_s=60, interval_s=0.5)
    assert all(n.alive for n in cluster.nodes)
    pids = set().union(*(n.processes() for n in cluster.nodes))
    down = _cli("cluster", "down", "--state-file", cluster.state_file, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not Path(cluster.state_file).exists()
    from cluster.multinode import _running

    assert not _running(pids)
