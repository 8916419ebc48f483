"""Prefix caching of the systems under test: vLLM's flags (on at its defaults for shared-prefix
traffic, off for the unique comparison), ``flowprefill-nocache``, and hit rates read from vLLM's
and FlowPrefill's ``/metrics`` and from an engine's counters."""

from __future__ import annotations

import pytest
import yaml

from bench import servers
from bench.prefix_stats import (
    PrefixCounters,
    engine_prefix_counters,
    flowprefill_prefix_counters,
    format_hit_rate,
    prefix_counters_from_metrics,
    total,
    vllm_prefix_counters,
)
from bench.serve_compare import format_comparison, goodput_comparison
from replicas.vllm_process import VLLMConfig, parse_vllm_metrics

# As vLLM's Prometheus client writes them (prometheus_client 0.26 in .venv-vllm): counters get
# ``_total`` and a ``_created`` gauge; one series per engine.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm"} 1.0
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="smollm"} 4096.0
vllm:prefix_cache_queries_total{engine="1",model_name="smollm"} 1024.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="smollm"} 1.7962865530650551e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="smollm"} 2560.0
vllm:prefix_cache_hits_total{engine="1",model_name="smollm"} 512.0
vllm:prefix_cache_hits_created{engine="0",model_name="smollm"} 1.796286553065075e+09
# HELP vllm:external_prefix_cache_hits_total External prefix cache hits.
vllm:external_prefix_cache_hits_total{engine="0",model_name="smollm",source="p2p"} 999.0
"""

FLOWPREFILL_METRICS = """\
# HELP flowprefill_replica_cost_scale How much slower than profiled a replica's prefill runs now.
flowprefill_replica_cost_scale{replica="r1"} 1.1
# HELP flowprefill_prefix_cache_queried_tokens_total Prompt tokens looked up in the prefix cache.
# TYPE flowprefill_prefix_cache_queried_tokens_total counter
flowprefill_prefix_cache_queried_tokens_total{replica="r1"} 3000.0
flowprefill_prefix_cache_queried_tokens_total{replica="r2"} 1000.0
flowprefill_prefix_cache_hit_tokens_total{replica="r1"} 1500.0
flowprefill_prefix_cache_hit_tokens_total{replica="r2"} 500.0
flowprefill_prefix_cache_evictions_total{replica="r1"} 7.0
flowprefill_prefix_cache_evictions_total{replica="r2"} 0.0
"""


def test_vllm_hit_rate_is_read_from_its_metrics():
    c = vllm_prefix_counters(VLLM_METRICS)
    assert c == PrefixCounters(5120.0, 3072.0, None)  # both engines; _created and external hits left out
    assert c.hit_rate == pytest.approx(0.6)
    assert prefix_counters_from_metrics(VLLM_METRICS) == c
    bare = "vllm:prefix_cache_queries{engine=\"0\"} 10\nvllm:prefix_cache_hits{engine=\"0\"} 4\n"
    assert vllm_prefix_counters(bare) == PrefixCounters(10.0, 4.0)  # without the _total suffix too
    got = parse_vllm_metrics(VLLM_METRICS)  # what the vLLM engine kind mirrors into its counters
    assert got["vllm:prefix_cache_queries_total"] == 5120 and got["vllm:prefix_cache_hits_total"] == 3072


def test_flowprefill_hit_rate_is_read_from_the_router_metrics():
    c = flowprefill_prefix_counters(FLOWPREFILL_METRICS)
    assert c == PrefixCounters(4000.0, 2000.0, 7.0) and c.hit_rate == 0.5
    assert prefix_counters_from_metrics(FLOWPREFILL_METRICS + VLLM_METRICS) == c  # FlowPrefill's own first


def test_missing_counters_mean_an_unknown_hit_rate_not_a_crash():
    before_the_cache = "flowprefill_replica_cost_scale{replica=\"r1\"} 1.0\n# HELP x y\n"
    assert prefix_counters_from_metrics(before_the_cache) is None and prefix_counters_from_metrics("") is None
    assert engine_prefix_counters({"preemptions": 3}) is None
    assert format_hit_rate(None) == "     -" and format_hit_rate(0.625) == " 62.5%"
    assert PrefixCounters(0.0, 0.0).hit_rate is None
    assert total([PrefixCounters(10, 5), None]) is None and total([]) is None


def test_counts_between_two_reads_and_over_several_runs():
    before = flowprefill_prefix_counters(FLOWPREFILL_METRICS)
    after = PrefixCounters(5000.0, 2900.0, 9.0)
    run = after.since(before)
    assert run == PrefixCounters(1000.0, 900.0, 2.0) and run.hit_rate == pytest.approx(0.9)
    assert run.to_dict() == {"queried_tokens": 1000.0, "hit_tokens": 900.0, "evictions": 2.0, "hit_rate": 0.9}
    assert after.since(None) == after
    assert total([run, PrefixCounters(1000.0, 100.0, None)]) == PrefixCounters(2000.0, 1000.0, None)
    engine = engine_prefix_counters({"prefix_queried_tokens": 64, "prefix_hit_tokens": 48, "prefix_evictions": 1})
    assert engine == PrefixCounters(64.0, 48.0, 1.0) and engine.hit_rate == 0.75
    assert engine_prefix_counters({"prefix_queried_tokens": 8}) == PrefixCounters(8.0, 0.0, None)


def test_vllm_runs_at_its_defaults_with_prefix_caching_and_without_it_for_unique_prompts(tmp_path, monkeypatch):
    monkeypatch.setattr(servers, "vllm_available", lambda: (True, ""))
    off = servers.server_spec("vllm", tmp_path / "m", "m", work_dir=tmp_path)
    on = servers.server_spec("vllm", tmp_path / "m", "m", work_dir=tmp_path, prefix_caching=True)
    assert "--no-enable-prefix-caching" in off.argv
    assert "--no-enable-prefix-caching" not in on.argv and "--enable-prefix-caching" not in on.argv  # vLLM's default
    strip = {"--no-enable-prefix-caching", str(off.port), str(on.port)}
    assert [a for a in off.argv if a not in strip] == [a for a in on.argv if a not in strip]  # nothing else differs
    assert "--block-size" not in on.argv  # vLLM's own block size unless told
    fine = servers.server_spec("vllm", tmp_path / "m", "m", work_dir=tmp_path, prefix_caching=True, vllm_block_size=16)
    assert fine.argv[fine.argv.index("--block-size") + 1] == "16"

    for caching in (False, True):
        fv = servers.server_spec("flowprefill-vllm", tmp_path / "m", "m", work_dir=tmp_path, prefix_caching=caching)
        engine = yaml.safe_load(fv.cleanup[0].read_text())["applications"][0]["args"]["engine"]
        assert engine["enable_prefix_caching"] is caching
        args = VLLMConfig.from_dict(engine).server_args("/m", "m")  # what the vLLM engine kind then runs
        assert ("--no-enable-prefix-caching" in args) is not caching and "--enable-prefix-caching" not in args


def test_the_vllm_engine_kind_keeps_prefix_caching_off_unless_asked():
    assert VLLMConfig().enable_prefix_caching is False
    assert "--no-enable-prefix-caching" in VLLMConfig.from_dict({}).server_args("/m", "m")
    assert "--no-enable-prefix-caching" not in VLLMConfig.from_dict(
        {"enable_prefix_caching": True}).server_args("/m", "m")
    from replicas.engine_config import EngineConfigError

    with pytest.raises(EngineConfigError) as err:
        VLLMConfig.from_dict({"enable_prefix_caching": "yes"}, prefix="args.engine")
    assert err.value.field == "args.engine.enable_prefix_caching" and "valid boolean" in str(err.value)


def test_flowprefill_nocache_is_flowprefill_with_its_cache_off(tmp_path):
    assert servers.split_system(servers.NOCACHE) == ("flowprefill-nocache", None)
    spec = servers.server_spec(servers.NOCACHE, tmp_path / "m", "m", work_dir=tmp_path, engine={"short_threshold": 9})
    engine = yaml.safe_load(spec.cleanup[0].read_text())["applications"][0]["args"]["engine"]
    assert spec.name == servers.NOCACHE and spec.argv[spec.argv.index("--policy") + 1] == "flowprefill"
    assert engine["enable_prefix_caching"] is False and engine["short_threshold"] == 9
    assert engine["policy"] == "flowprefill"


def test_the_comparison_says_what_the_cache_adds():
    entries = [{"system": "flowprefill", "goodput": 3.0, "points": [], "error": None},
               {"system": servers.NOCACHE, "goodput": 2.0, "points": [], "error": None},
               {"system": "vllm", "goodput": 1.5, "points": [], "error": None}]
    cmp = goodput_comparison(entries)
    assert cmp["flowprefill_vs_nocache"] == {"of": servers.NOCACHE, "ratio": 1.5, "ratio_is_lower_bound": False,
                                             "interval": [None, None]}  # no failing rate recorded: no bracket
    assert cmp["flowprefill_vs_vllm"]["ratio"] == 2.0 and cmp["best_own_baseline"] is None  # nocache is no baseline
    assert "FlowPrefill goodput / its prefix cache off (flowprefill-nocache): 1.50x" in format_comparison(cmp)
    assert goodput_comparison(entries[2:])["flowprefill_vs_nocache"] is None
