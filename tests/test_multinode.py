"""FlowPrefill on a real multi-node Ray cluster: three raylets on loopback, real Redis, real HTTP.

``flowprefill cluster up --nodes 3`` starts a head and two worker nodes on this machine;
``flowprefill serve --address`` (a child process, as an operator would run it) deploys the app
onto it with the model-free ``echo`` engine (a configured speed, no weights), one replica per
worker node and the router on the head. The tests then place requests across nodes, kill a
worker node's raylet under load and bring it back, stop ``serve`` with Ctrl-C, and finally stop
the cluster with ``cluster down``; each checks against Ray's state API and Redis, never a mock.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.polling import wait_for

pytestmark = pytest.mark.slow

MODEL = "echo-model"
NAMESPACE = "multinode-test"
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    from cluster.multinode import free_port

    return free_port()


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def _post(base: str, body: dict, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, dict]:
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def _stream(base: str, body: dict, timeout: float = 120) -> tuple[int, list[dict]]:
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, [json.loads(line[6:]) for line in resp.read().decode().splitlines()
                                 if line.startswith("data: ") and line != "data: [DONE]"]
    except urllib.error.HTTPError as err:
        return err.code, [json.loads(err.read())]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


async def _async_states(redis_url: str) -> dict:
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        return await state.read_all_replica_states(skip_invalid=True)


def _states(redis_url: str) -> dict:
    return asyncio.run(_async_states(redis_url))


async def _async_journal(redis_url: str) -> list:
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        return list(await state._redis.hkeys(state.keys.journal()))


def _journal(redis_url: str) -> list:
    return asyncio.run(_async_journal(redis_url))


def _node_index(node_id: str) -> int | None:
    """The FlowPrefill index of a Ray node (its ``flowprefill_node_<i>`` resource); None: not alive."""
    import ray

    for node in ray.nodes():
        if node["NodeID"] == node_id and node["Alive"]:
            names = [k for k in node["Resources"] if k.startswith("flowprefill_node_")]
            return int(names[0].rsplit("_", 1)[1]) if names else None
    return None


def _placement() -> dict[str, int]:
    """Serve replica id (or ``router``) -> node index, from the GCS actor table (alive actors).

    (Ray's dashboard-backed ``ray.util.state`` needs the dashboard, which the local cluster leaves off.)"""
    from ray._private.state import actors

    placed = {}
    for actor in actors().values():
        name = actor["Name"] or ""
        if actor["State"] != "ALIVE":
            continue
        if name.startswith("SERVE_REPLICA::flowprefill#FlowPrefillReplica#"):
            placed[name.rsplit("#", 1)[1]] = _node_index(actor["Address"]["NodeID"])
        elif name.startswith("SERVE_REPLICA::flowprefill#FlowPrefillRouter#"):
            placed["router"] = _node_index(actor["Address"]["NodeID"])
    return placed


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """``flowprefill cluster up --nodes 3`` (the CLI), then this process as a driver on it."""
    from cluster.multinode import LocalCluster

    state_file = tmp_path_factory.mktemp("cluster") / "cluster.json"
    started = time.monotonic()
    try:
        up = _cli("cluster", "up", "--nodes", "3", "--head-cpus", "2", "--worker-cpus", "1",
                  "--state-file", str(state_file), timeout=900)
    except subprocess.TimeoutExpired:
        if state_file.exists():  # stop what it had started
            LocalCluster.load(state_file).down(keep_logs=True)
        raise
    assert up.returncode == 0, up.stderr
    cluster = LocalCluster.load(state_file)
    assert up.stdout.strip().splitlines()[-1] == cluster.address and cluster.address.startswith("127.0.0.1:")
    print(f"\ncluster up: {time.monotonic() - started:.1f} s", file=sys.stderr)
    import ray

    from cluster.join import use_local_token
    from cluster.launcher import worker_runtime_env

    try:
        use_local_token()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False,
                 runtime_env=worker_runtime_env())  # the test's own app stays on loopback too
        yield cluster
    finally:
        ray.shutdown()
        cluster.down()  # idempotent: the last test stops it through the CLI


@pytest.fixture(scope="module")
def served(local_cluster, redis_server, tiny_checkpoint_factory, tmp_path_factory):
    """``flowprefill serve --address`` in a child process: echo replicas (100 ms per output token,
    10 s per 1k prompt tokens before the first), SLO-aware routing over the session's Redis."""
    import yaml

    port, grpc_port = _free_port(), _free_port()
    config = tmp_path_factory.mktemp("config") / "ray_config.yaml"
    app = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    args = app["applications"][0]["args"]
    args.update({"model_name": MODEL, "namespace": NAMESPACE, "engine_kind": "echo", "replica_cpus": 0.5,
                 "engine": {"model": str(tiny_checkpoint_factory()), "decode_step_s": 0.1,
                            "prefill_s_per_1k_tokens": 10.0}})
    config.write_text(yaml.safe_dump(app))
    env = {**os.environ, "REDIS_URL": redis_server.url}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--address", local_cluster.address,
                             "--config", str(config), "--port", str(port), "--grpc-port", str(grpc_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    started = time.monotonic()
    try:
        wait_for(lambda: any("FlowPrefill is serving" in line for line in lines) or proc.poll() is not None,
                 "serve --address to deploy", timeout_s=300)
        assert proc.poll() is None, "".join(lines)
        print(f"\nserve --address deployed: {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield {"proc": proc, "base": f"http://127.0.0.1:{port}", "port": port, "redis_url": redis_server.url,
               "lines": lines, "model_dir": tiny_checkpoint_factory()}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_replicas_spread_one_per_worker_node_router_on_head_and_both_in_redis(served, local_cluster):
    placed = wait_for(lambda: (p := _placement()) and len(p) == 3 and p, "a router and two replicas alive")
    router = placed.pop("router")
    assert router == 0, placed  # the head
    assert sorted(placed.values()) == [1, 2], placed  # one replica on each worker node
    registered = wait_for(lambda: (s := _states(served["redis_url"])) and len(s) == 2 and s, "two replicas in Redis")
    assert set(registered) == set(placed)  # Redis shows exactly the two replicas Ray runs
    code, body, _ = _post(served["base"], {"model": MODEL, "prompt": "hello there", "max_tokens": 2})
    assert code == 200 and body["usage"]["completion_tokens"] == 2


def test_every_listener_of_the_cluster_is_on_loopback(served, local_cluster):
    """Every process the nodes run (GCS, raylets, agents, Serve's controller, proxy and replicas)
    listens on 127.0.0.1 only."""
    pids = set().union(*(n.processes() for n in local_cluster.nodes))
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [line for line in out.splitlines() if any(f"pid={p}," in line for p in pids)]
    assert len(ours) >= 10 and any(f":{served['port']} " in line for line in ours), ours  # the HTTP proxy too
    loopback = ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")
    wide = [line for line in ours if not any(f" {a}:" in line for a in loopback)]
    assert not wide, "listeners beyond loopback:\n" + "\n".join(wide)


def test_urgent_request_goes_to_the_idle_node_while_the_other_holds_a_long_prefill(served):
    redis_url, base = served["redis_url"], served["base"]
    before = _get(base + "/v1/router/stats")["decisions"]
    long_result: dict = {}
    prompt = "lorem ipsum dolor sit amet " * 80

    def send_long() -> None:
        long_result["resp"] = _post(base, {"model": MODEL, "prompt": prompt, "max_tokens": 2},
                                    {"x-slo-class": "batch"})

    thread = threading.Thread(target=send_long)
    thread.start()
    try:
        during = wait_for(lambda: (s := _states(redis_url)) and len(s) == 2 and any(
            q.prompt_tokens > 200 and q.predicted_remaining_s > 1.0 for st in s.values() for q in st.requests) and s,
            "the long prompt holding one replica", interval_s=0.05)
        busy = next(rid for rid, st in during.items() if st.requests)
        placed = []
        for i in range(3):
            code, _, headers = _post(base, {"model": MODEL, "prompt": f"Hi there {i}", "max_tokens": 1},
                                     {"x-slo-class": "interactive"})
            assert code == 200
            placed.append(headers["x-flowprefill-replica"])
    finally:
        thread.join()
    assert long_result["resp"][0] == 200 and long_result["resp"][2]["x-flowprefill-replica"] == busy
    assert busy not in placed and len(set(placed)) == 1, (busy, placed)
    stats = _get(base + "/v1/router/stats")
    assert stats["decisions"] >= before + 4
    print(f"\nrouting decision with replicas on other nodes: p50 {stats['decision_ms']['p50']:.2f} ms, "
          f"p99 {stats['decision_ms']['p99']:.2f} ms ({stats['decisions']} decisions)", file=sys.stderr)


def test_killed_worker_node_loses_no_request_and_its_replacement_rejoins(served, local_cluster):
    redis_url, base = served["redis_url"], served["base"]
    states = wait_for(lambda: (s := _states(redis_url)) and len(s) == 2 and s, "two replicas in Redis")
    placed = _placement()
    from replicas.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(served["model_dir"])
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa "
    while len(tokenizer.encode(f"early0 {words}")) < 100:
        words += words
    results: dict[str, tuple[int, list[dict]]] = {}

    def client(name: str) -> None:
        results[name] = _stream(base, {"model": MODEL, "prompt": f"{name} {words}", "max_tokens": 40})

    early = [threading.Thread(target=client, args=(f"early{i}",)) for i in range(4)]
    for t in early:
        t.start()
    # The early requests stream on both replicas (40 outputs, 4 s) once their journal entries are
    # under a replica; then late ones arrive and wait >= 1 s of "prefill" for their first output.
    wait_for(lambda: sum(1 for e in asyncio.run(_journal_entries(redis_url)) if e.status == "running") == 4,
             "four streams under way", interval_s=0.05)
    late = [threading.Thread(target=client, args=(f"late{i}",)) for i in range(4)]
    for t in late:
        t.start()
    wait_for(lambda: len(_journal(redis_url)) == 8, "eight accepted requests in the journal", interval_s=0.05)
    victim = sorted(states)[0]
    victim_node = placed[victim]
    killed_at = time.monotonic()
    local_cluster.kill_node(victim_node)
    for t in early + late:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in early + late), "a client hung"
    recovered_s = time.monotonic() - killed_at

    completed, failed_clearly = [], []
    for name, (status, events) in results.items():
        assert status == 200, (name, events)
        errors = [e["error"]["message"] for e in events if "error" in e]
        if errors:
            assert "replica failed while streaming" in errors[0], errors
            assert any(e.get("choices") for e in events), "only a stream under way may end in an error"
            failed_clearly.append(name)
        else:
            assert events[-1]["choices"][0]["finish_reason"] == "length", (name, events[-1])
            completed.append(name)
    assert len(completed) + len(failed_clearly) == 8  # nothing lost
    assert all(n.startswith("early") for n in failed_clearly), failed_clearly  # no token yet: sent again
    assert all(f"late{i}" in completed for i in range(4))
    wait_for(lambda: _journal(redis_url) == [], "an empty journal")
    gone = wait_for(lambda: (s := _states(redis_url)) and victim not in s and s, "the dead replica leaving Redis",
                    timeout_s=60)
    (survivor,) = gone
    for i in range(4):  # the survivor serves everything meanwhile
        code, body, headers = _post(base, {"model": MODEL, "prompt": f"after the loss {i}", "max_tokens": 2})
        assert code == 200 and headers["x-flowprefill-replica"] == survivor
    print(f"\nnode {victim_node} killed: {len(completed)} completed, {len(failed_clearly)} streams ended with a "
          f"clear error, 0 lost; all answered {recovered_s:.1f} s after the kill", file=sys.stderr)

    # The node comes back: Serve places the missing replica on it, it registers, and takes traffic.
    back_at = time.monotonic()
    local_cluster.restart_node(victim_node)
    fresh = wait_for(lambda: (s := _states(redis_url)) and len(s) == 2 and s, "a replacement replica in Redis",
                     timeout_s=180)
    (replacement,) = set(fresh) - {survivor}
    assert wait_for(lambda: _placement().get(replacement), "the replacement in Ray's state") == victim_node
    print(f"node {victim_node} back: replacement replica registered {time.monotonic() - back_at:.1f} s after "
          "restart", file=sys.stderr)
    # It takes traffic: with a long prefill holding one replica, an urgent request goes to the other,
    # so the two requests use both the survivor and the replacement.
    long_prompt = "lorem ipsum dolor sit amet " * 80
    holder: dict = {}
    thread = threading.Thread(target=lambda: holder.update(resp=_post(
        base, {"model": MODEL, "prompt": long_prompt, "max_tokens": 1}, {"x-slo-class": "batch"})))
    thread.start()
    try:
        wait_for(lambda: any(q.prompt_tokens > 200 for st in _states(redis_url).values() for q in st.requests),
                 "the long prompt holding a replica", interval_s=0.05)
        code, _, headers = _post(base, {"model": MODEL, "prompt": "Hi again", "max_tokens": 1},
                                 {"x-slo-class": "interactive"})
    finally:
        thread.join()
    assert code == 200 and holder["resp"][0] == 200
    assert {headers["x-flowprefill-replica"], holder["resp"][2]["x-flowprefill-replica"]} == {survivor, replacement}


async def _journal_entries(redis_url: str) -> list:
    from state.client import ClusterState

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        keys = await state._redis.hkeys(state.keys.journal())
        entries = [await state.journal_get(k.decode() if isinstance(k, bytes) else k) for k in keys]
        return [e for e in entries if e is not None]


class Hello:
    """Another application on the same cluster, deployed from this driver: Ctrl-C must leave it."""

    def __call__(self, request: object) -> str:
        return "hello from another app"


def test_ctrl_c_removes_only_its_app_and_leaves_the_cluster_and_other_apps(served, local_cluster):
    import ray
    from ray import serve

    other = serve.deployment(Hello).options(name="Hello", ray_actor_options={
        "num_cpus": 0, "resources": {"flowprefill_head": 0.01}})
    serve.run(other.bind(), name="other", route_prefix="/other", blocking=False)
    hello = f"http://127.0.0.1:{served['port']}/other"
    wait_for(lambda: _read(hello) == "hello from another app", "the other app answering")
    proc = served["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0, "".join(served["lines"])
    assert "flowprefill" not in serve.status().applications
    assert serve.status().applications["other"].status == "RUNNING"
    assert _read(hello) == "hello from another app"
    assert sum(1 for n in ray.nodes() if n["Alive"]) == 3  # the cluster keeps running
    wait_for(lambda: not [a for a in _placement() if a != "router"] and "router" not in _placement(),
             "FlowPrefill's actors gone")
    serve.delete("other")


def _read(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


def test_bad_addresses_fail_fast_naming_the_setting(local_cluster):
    dead = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    bad = _cli("serve", "--address", dead, "--engine", "echo", timeout=60)
    print(f"\n  unreachable head refused in {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert bad.returncode == 2 and "--address" in bad.stderr and dead in bad.stderr, bad.stderr
    env_bad = _cli("serve", "--engine", "echo", env={"RAY_ADDRESS": dead}, timeout=60)
    assert env_bad.returncode == 2 and "RAY_ADDRESS" in env_bad.stderr, env_bad.stderr
    assert _cli("serve", "--address", "ray://10.0.0.1:10001", timeout=60).returncode == 2
    # Redis the nodes cannot reach: refused by name once every node has tried it, within the bound.
    no_redis = f"redis://127.0.0.1:{_free_port()}/0"
    at = time.monotonic()
    unreachable = _cli("serve", "--address", local_cluster.address, "--engine", "echo",
                       env={"REDIS_URL": no_redis}, timeout=200)
    print(f"  unreachable Redis refused in {time.monotonic() - at:.1f} s", file=sys.stderr)
    assert unreachable.returncode == 2, unreachable.stderr
    assert "REDIS_URL" in unreachable.stderr and "not reachable from every node" in unreachable.stderr
    print(f"\nbad addresses refused in {time.monotonic() - started:.1f} s (all four)", file=sys.stderr)


def test_cluster_down_stops_exactly_what_up_started(local_cluster):
    import ray

    ray.shutdown()  # this driver leaves first
    members = set().union(*(n.processes() for n in local_cluster.nodes))
    assert len(members) >= 10  # GCS, raylets, agents, Serve's actors and workers
    down = _cli("cluster", "down", "--state-file", local_cluster.state_file, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not Path(local_cluster.state_file).exists() and not Path(local_cluster.temp_dir).exists()
    left = []
    for pid in members:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
            if state != "Z":
                left.append(pid)
        except OSError:
            pass
    assert not left, f"processes left behind: {left}"
