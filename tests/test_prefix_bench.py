"""``--prefix-mode`` and friends in ``bench serve`` and ``bench policies``: parsing, defaults,
validation, the configurations compared, and the hit rates in their reports."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import pytest

from bench import cli, cli_args
from bench.policy_bench import NOCACHE, PolicyBenchConfig, policy_configs
from bench.serve_config import ServeBenchConfig
from bench.shared_prefix import PREFIX_MODES
from replicas.engine_config import EngineConfig, EngineConfigError

ENGINE_HAS_CACHE_SETTING = "enable_prefix_caching" in {f.name for f in fields(EngineConfig)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers(dest="cmd"), stack=lambda: None)  # type: ignore[arg-type,return-value]
    return p


@pytest.mark.parametrize("command", ["serve", "policies"])
def test_prefix_flags_parse_with_defaults_left_to_the_trace(command):
    p = _parser()
    args = p.parse_args([command, "--trace", "t.jsonl"])
    assert args.prefix_mode is None  # resolved from the trace: trace with hash_ids, else unique
    assert cli_args.prefix_settings(args) == {"prefix_mode": None}  # the configs' own defaults stay
    args = p.parse_args([command, "--trace", "t.csv", "--prefix-mode", "multiturn", "--multiturn-system-tokens",
                         "512", "--multiturn-continue", "0.8", "--prefix-groups", "1/32"])
    assert cli_args.prefix_settings(args) == {"prefix_mode": "multiturn", "prefix_groups": 1 / 32,
                                          "multiturn_system_tokens": 512, "multiturn_continue": 0.8}
    for mode in PREFIX_MODES:
        assert p.parse_args([command, "--trace", "t", "--prefix-mode", mode]).prefix_mode == mode
    with pytest.raises(SystemExit):
        p.parse_args([command, "--trace", "t", "--prefix-mode", "shared"])
    with pytest.raises(SystemExit):
        p.parse_args([command, "--trace", "t", "--prefix-groups", "1/0"])
    assert cli_args.PREFIX_MODES == PREFIX_MODES  # the CLI's copy (no heavy import for --help) matches


@pytest.mark.parametrize("make", [lambda **kw: ServeBenchConfig(trace="t", systems=("flowprefill",), **kw),
                                  lambda **kw: PolicyBenchConfig(trace="t", **kw)])
def test_bad_prefix_settings_are_refused_by_flag(make):
    assert make().prefix_mode is None and make().prefix_groups in (None, 1.0)  # None: see prefix_groups()
    assert make().multiturn().system_prompt_tokens == 1024 and make(seed=4).multiturn().seed == 4
    with pytest.raises(ValueError, match="--prefix-mode: expected one of unique, trace, multiturn"):
        make(prefix_mode="shared")
    with pytest.raises(ValueError, match="--prefix-groups"):
        make(prefix_groups=0.0)
    with pytest.raises(ValueError, match="--multiturn-.*multiple of 512"):
        make(multiturn_system_tokens=1000)
    with pytest.raises(ValueError, match=r"--multiturn-.*\[0, 1\]"):
        make(multiturn_continue=2.0)


def test_policies_compare_the_cache_on_and_off_on_shared_prefix_traffic():
    cfg = PolicyBenchConfig(trace="t")
    plain = policy_configs(cfg)
    both = policy_configs(cfg, nocache=True)
    assert NOCACHE not in plain and list(both) == ["flowprefill", NOCACHE, *list(plain)[1:]]
    assert both[NOCACHE] == {**plain["flowprefill"], "enable_prefix_caching": False}
    assert both["flowprefill"] == plain["flowprefill"]  # flowprefill itself runs at the engine's default


@pytest.mark.skipif(ENGINE_HAS_CACHE_SETTING, reason="the engine knows enable_prefix_caching: nothing to refuse")
def test_an_engine_without_the_cache_setting_is_named_before_anything_runs(tmp_path, tiny_checkpoint_factory):
    from bench.policy_bench import run_policy_bench

    with pytest.raises(EngineConfigError, match="flowprefill-nocache.enable_prefix_caching: unknown field"):
        ServeBenchConfig(trace="t", systems=("flowprefill", NOCACHE))
    trace = tmp_path / "m.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 100 * i, "input_length": 600, "output_length": 2,
                                         "hash_ids": [0, 1 + i]}) + "\n" for i in range(4)))
    with pytest.raises(EngineConfigError, match="bench policies flowprefill-nocache.enable_prefix_caching"):
        run_policy_bench(PolicyBenchConfig(trace=str(trace)), tiny_checkpoint_factory("llama3"))  # before any load


def _serve_entry(system: str, goodput: float, hit: float | None) -> dict:
    runs = [{"attainment_per_class": {"interactive": 1.0}, "ttft_p50_s": 0.1, "ttft_p99_s": 0.3, "errors": 0,
             "cancelled": 0}]
    return {"system": system, "goodput": goodput, "prefix_hit_rate": hit, "startup_s": 5.0, "error": None,
            "points": [{"scale": 1.0, "rate_rps": 2.0, "attainment": 1.0, "repeats": runs, "results": [[]]}]}


def test_serve_report_shows_each_hit_rate_beside_its_goodput(capsys):
    from bench.serve_bench import print_report

    report = {"trace": "m.jsonl", "requests": 10, "base_rate_rps": 2.0, "length_scale": 1 / 16, "common_scale": 1.0,
              "requests_per_class": {"interactive": 10}, "prefix_mode": "trace", "reusable_token_fraction": 0.618,
              "systems": [_serve_entry("flowprefill", 3.0, 0.625), _serve_entry(NOCACHE, 2.0, None),
                          _serve_entry("vllm", 1.5, 0.25)]}
    print_report(report)
    out = capsys.readouterr().out.splitlines()
    assert "prefix mode trace: 61.8% of prompt tokens reusable" in out[2]
    header = out[3]
    assert header.index("goodput r/s") < header.index("hit %")
    rows = {line.split()[0]: line.split() for line in out[4:7]}
    assert rows["flowprefill"][1:3] == ["3.000", "62.5%"] and rows[NOCACHE][1:3] == ["2.000", "-"]
    assert rows["vllm"][1:3] == ["1.500", "25.0%"]
    assert "FlowPrefill goodput / its prefix cache off (flowprefill-nocache): 1.50x" in out
    report["systems"][0]["next_failing_rate_rps"] = None  # passed every rate tried: printed as a lower bound
    report["systems"][1]["next_failing_rate_rps"] = 3.0
    print_report(report)
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[4:7]}
    assert rows["flowprefill"][1] == ">=3.000" and rows[NOCACHE][1] == "2.000"


def test_policies_report_shows_each_hit_rate_beside_its_goodput(capsys):
    from bench.policy_bench import print_report

    point = {"attainment": 0.95, "attainment_per_class": {"batch": 1.0}, "ttft_p50_s": 0.2, "ttft_p99_s": 0.5}
    rows = [{"policy": name, "goodput": g, "prefix_hit_rate": hit, "common_scale": 1.0, "preemptions": 0,
             "scheduling_pass": {"median_s": 0.001}, "points": {"1": point}}
            for name, g, hit in (("flowprefill", 4.0, 0.5), (NOCACHE, 3.0, None))]
    print_report({"trace": "m.jsonl", "window_requests": 16, "base_rate_rps": 1.0, "length_scale": 1 / 16,
                  "prefix_mode": "multiturn", "reusable_token_fraction": 0.36, "policies": rows})
    out = capsys.readouterr().out.splitlines()
    assert "prefix mode multiturn: 36.0% of prompt tokens reusable" in out[2]
    assert out[4].split()[:3] == ["flowprefill", "4.000", "50.0%"] and out[5].split()[:3] == [NOCACHE, "3.000", "-"]


def test_plots_label_the_hit_rate(tmp_path):
    from bench.plots import plot_attainment

    row = {"policy": "flowprefill", "goodput": 1.0, "prefix_hit_rate": 0.5,
           "points": {"1": {"rate_rps": 1.0, "attainment": 0.95}}}
    path = Path(tmp_path) / "a.png"
    plot_attainment({"trace": "m.jsonl", "window_requests": 4, "length_scale": 1.0, "prefix_mode": "trace",
                     "policies": [row, {**row, "policy": NOCACHE, "prefix_hit_rate": None}]}, path)
    assert path.stat().st_size > 1000


def test_quick_on_a_trace_with_block_ids_samples_prefix_groups_unless_told():
    from bench.serve_workload import QUICK_PREFIX_GROUPS, prefix_groups

    quick = ServeBenchConfig(trace="t.jsonl", systems=("flowprefill",), quick=True)
    assert prefix_groups(quick, "trace") == QUICK_PREFIX_GROUPS == 1 / 64
    assert prefix_groups(quick, "multiturn") == 1.0 and prefix_groups(quick, "unique") == 1.0
    assert prefix_groups(ServeBenchConfig(trace="t.jsonl", systems=("flowprefill",)), "trace") == 1.0
    told = ServeBenchConfig(trace="t.jsonl", systems=("flowprefill",), quick=True, prefix_groups=0.5)
    assert prefix_groups(told, "trace") == 0.5


def test_policies_decide_goodput_on_the_median_of_boundary_replays():
    from bench.policy_bench import find_goodput, median_point

    class Replays:  # fault injection: replays whose attainment is scripted per scale
        def __init__(self) -> None:
            self.script = {1.5: [0.95, 0.5, 0.6]}  # one lucky replay at 1.5, then two misses

        def __call__(self, scale: float, tag: str) -> dict:
            att = self.script[scale].pop(0) if scale in self.script else (1.0 if scale <= 1.5 else 0.0)
            return {"attainment": att, "prefix_cache": None}

    class Bar:
        def update(self, n: int) -> None: ...
        def set_postfix(self, **kw: object) -> None: ...

    cfg = PolicyBenchConfig(trace="t", refine_steps=0, repeats=3)
    result = find_goodput(Replays(), 2.0, cfg, Bar(), 1.0)
    assert result["goodput_scale"] == 1.0 and result["goodput"] == 2.0 and result["next_failing_rate_rps"] == 3.0
    at = result["points"]["1.5"]
    assert at["attainment"] == 0.6 and at["attainment_min"] == 0.5 and at["attainment_max"] == 0.95
    assert [r["attainment"] for r in at["repeats"]] == [0.95, 0.5, 0.6]
    assert len(result["points"]["1"]["repeats"]) == 3
    assert median_point([{"attainment": 0.2}, {"attainment": 0.9}])["attainment"] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="--repeats"):
        PolicyBenchConfig(trace="t", repeats=0)


def test_policies_can_be_narrowed_by_name_and_unknown_names_are_refused():
    cfg = PolicyBenchConfig(trace="t", policies=("flowprefill", NOCACHE))
    assert list(policy_configs(cfg, nocache=True)) == ["flowprefill", NOCACHE]
    with pytest.raises(ValueError, match="--policies: unknown flowprefill-nocache"):
        policy_configs(cfg, nocache=False)  # no cache-off twin on unique prompts
