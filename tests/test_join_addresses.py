"""Address rules of ``flowprefill serve --address`` and the multi-node placement args (no Ray started)."""

from __future__ import annotations

import socket
import time

import pytest

from cluster.app import AppConfig
from cluster.join import AddressError, check_redis_url, is_loopback, probe, resolve_address, split_address
from cluster.multinode import HEAD_RESOURCE, WORKER_RESOURCE, ClusterError, LocalCluster, placement_args
from replicas.engine_config import EngineConfigError


def test_address_comes_from_the_flag_then_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_address("127.0.0.1:7000") == ("127.0.0.1:7000", "--address")
    assert resolve_address(None) == ("10.0.0.5:6379", "RAY_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # Ray's own words for "find one": not a head address
    assert resolve_address(None) == (None, "")
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_address(None) == (None, "")


@pytest.mark.parametrize("bad", ["ray://10.0.0.1:10001", "10.0.0.1", "10.0.0.1:", ":6379", "host:0", "host:99999",
                                 "host:http"])
def test_malformed_addresses_are_refused_naming_the_setting(bad):
    with pytest.raises(AddressError, match="RAY_ADDRESS"):
        split_address(bad, "RAY_ADDRESS")


def test_well_formed_addresses_split():
    assert split_address("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert split_address("[::1]:6379") == ("::1", 6379)
    assert split_address("head.example:6380") == ("head.example", 6380)


def test_nothing_listening_fails_within_the_bound():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        started = time.monotonic()
        with pytest.raises(AddressError, match=r"--address=x \(the head\)"):
            probe("127.0.0.1", port, "--address=x (the head)", timeout_s=2.0)
    assert time.monotonic() - started < 3.0


def test_loopback_redis_is_refused_when_a_node_is_elsewhere():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.7") and not is_loopback("redis.svc")
    check_redis_url("redis://127.0.0.1:6379/0", ["127.0.0.1", "127.0.0.1"])  # one machine: fine
    check_redis_url("redis://10.0.0.2:6379/0", ["10.0.0.7", "10.0.0.8"])
    with pytest.raises(AddressError, match=r"REDIS_URL: .*10\.0\.0\.7"):
        check_redis_url("redis://127.0.0.1:6379/0", ["127.0.0.1", "10.0.0.7"])
    with pytest.raises(AddressError, match="REDIS_URL"):
        check_redis_url("redis://localhost/0", ["10.0.0.7"])


def test_placement_spreads_one_replica_per_flowprefill_worker_node():
    assert placement_args({"CPU": 4.0}) == {}  # a single node or a cluster laid out otherwise
    assert placement_args({"CPU": 4.0, WORKER_RESOURCE: 2.0, HEAD_RESOURCE: 1.0}) == {
        "replica_resources": {WORKER_RESOURCE: 1}, "num_replicas": 2, "router_resources": {HEAD_RESOURCE: 0.01}}
    config = AppConfig.from_args({"replica_resources": {WORKER_RESOURCE: 1}, "max_replicas_per_node": 1})
    assert config.replica_resources == {WORKER_RESOURCE: 1} and config.max_replicas_per_node == 1


@pytest.mark.parametrize(("args", "field"), [
    ({"replica_resources": {"flowprefill_worker": 0}}, "args.replica_resources.flowprefill_worker"),
    ({"replica_resources": ["flowprefill_worker"]}, "args.replica_resources"),
    ({"router_resources": {"GPU": 1}}, "args.router_resources"),
    ({"max_replicas_per_node": 0}, "args.max_replicas_per_node"),
    ({"max_replicas_per_node": True}, "args.max_replicas_per_node"),
])
def test_bad_placement_settings_name_their_field(args, field):
    with pytest.raises(EngineConfigError) as err:
        AppConfig.from_args(args)
    assert err.value.field == field


def test_cluster_state_file_errors_are_clear(tmp_path):
    with pytest.raises(ClusterError, match="no local cluster recorded"):
        LocalCluster.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ClusterError, match="not a cluster state file"):
        LocalCluster.load(tmp_path / "bad.json")
    with pytest.raises(ClusterError, match="at least 1"):
        LocalCluster.up(0, state_file=tmp_path / "c.json")
