"""`bench engine` on a tiny checkpoint: the report's figures are paired medians and a direct cost."""

from __future__ import annotations

import json

import pytest

from bench.engine_bench import EngineBenchConfig, measure_checkpoint_cost, run_engine_bench
from replicas.model.decoder import DecoderModel


def test_more_repeats_for_shorter_prompts():
    cfg = EngineBenchConfig(lengths=[512, 2048, 8192], repeats=3)
    assert [cfg.repeats_at(n) for n in cfg.lengths] == [12, 6, 3]
    assert (cfg.latency_tokens, cfg.latency_runs) == (4096, 2)
    quick = EngineBenchConfig(quick=True)
    assert [quick.repeats_at(n) for n in quick.lengths] == [2, 2, 2]
    assert (quick.latency_tokens, quick.latency_runs) == (768, 1)


def test_report_has_paired_ratios_and_direct_checkpoint_cost(tiny_checkpoint_factory, capsys):
    model_dir = tiny_checkpoint_factory("llama", seed=3, num_layers=3, hidden_size=64, intermediate_size=128)
    cfg = EngineBenchConfig(lengths=[16, 64], repeats=2, latency_tokens=64, latency_runs=1, chunk_sizes=(16,))
    report = run_engine_bench(model_dir, cfg)
    json.dumps(report)
    assert report["repeats"] == {"16": 4, "64": 2}
    for n in ("16", "64"):
        assert report["speedup_vs_transformers"][n] > 0
        assert -1 < report["checkpoint_overhead"][n] < 1
        assert report["speedup_vs_transformers_best"][n] == pytest.approx(
            report["prefill_tokens_per_s"]["ours_block"][n] / report["prefill_tokens_per_s"]["transformers"][n])
    cost = report["checkpoint_cost"]
    assert cost["points_per_pass"] == 6  # block: two per layer
    assert 0 < cost["per_point_us"] < 50  # a generator yield and a queue check
    seconds_none = {n: int(n) / report["prefill_tokens_per_s"]["ours"][n] for n in ("16", "64")}
    for n, share in cost["direct_overhead"].items():
        assert share == pytest.approx(6 * cost["per_point_us"] * 1e-6 / seconds_none[n])
    decode = report["decode_step_ms"]["by_batch"]
    assert list(decode) == ["1", "2", "4", "8", "16"]
    for row in decode.values():
        assert row["small_rows_ms"] > 0 and row["plain_ms"] > 0
        assert row["speedup"] == pytest.approx(row["plain_ms"] / row["small_rows_ms"])
        assert row["max_abs_logit_diff"] < 1e-4
    assert decode["1"]["max_abs_logit_diff"] == 0.0  # one row always takes the plain path
    out = capsys.readouterr().out
    assert "median of per-repeat ratios" in out and "small-row path" in out


def test_direct_cost_is_points_times_cost_over_pass_time(tiny_checkpoint_factory):
    model = DecoderModel.load(tiny_checkpoint_factory("llama", seed=3, num_layers=3, hidden_size=64,
                                                      intermediate_size=128))
    cost = measure_checkpoint_cost(model, [100], {"100": 1.0}, points=10_000)
    assert cost["direct_overhead"]["100"] == pytest.approx(6 * cost["per_point_us"] * 1e-6)
