"""``bench cache-ab``: the interleaved order, the grid's goodput and ratio interval, and one real
replay grid on a tiny checkpoint (the cache-on engine hits, the cache-off one computes everything)."""

from __future__ import annotations

import json

import pytest

from bench.cache_ab import CacheABConfig, goodput_on_grid, paired_tally, ratio_interval, round_orders, run_cache_ab
from bench.policy_bench import NOCACHE, PolicyBenchConfig


def test_the_first_replay_of_a_round_alternates_by_round_and_by_rate():
    assert round_orders(3, 0) == [("flowprefill", NOCACHE), (NOCACHE, "flowprefill"), ("flowprefill", NOCACHE)]
    assert round_orders(3, 1) == [(NOCACHE, "flowprefill"), ("flowprefill", NOCACHE), (NOCACHE, "flowprefill")]
    firsts = [order[0] for k in range(4) for order in round_orders(3, k)]
    assert firsts.count("flowprefill") == firsts.count(NOCACHE) == 6


def test_goodput_is_the_last_rate_before_the_first_miss_even_if_a_later_rate_passes():
    medians = [(1.0, 1.0), (1.25, 0.95), (1.5625, 0.85), (1.953, 0.92)]
    assert goodput_on_grid(medians) == (1.25, 1.5625)
    assert goodput_on_grid([(1.0, 0.5)]) == (0.0, 1.0)
    assert goodput_on_grid([(1.0, 0.9), (2.0, 1.0)]) == (2.0, None)


def test_the_ratio_interval_spans_what_the_grid_allows():
    r = ratio_interval((2.0, 2.5), (1.0, 1.25))
    assert r == {"ratio": 2.0, "low": 1.6, "high": 2.5}
    assert ratio_interval((2.0, None), (1.0, 1.25))["high"] is None  # on never failed: no upper bound
    assert ratio_interval((1.0, 1.25), (0.0, 1.0))["ratio"] is None  # off met no rate


def test_the_paired_tally_counts_rounds():
    assert paired_tally([0.9, 0.8, 1.0], [0.9, 0.9, 0.5]) == {"on_better": 1, "tie": 1, "off_better": 1}


def test_the_sign_test_is_two_sided_and_ignores_ties():
    from bench.cache_ab import sign_test_p

    assert sign_test_p(22, 4) == pytest.approx(0.000534, rel=1e-2)  # the Azure multi-turn run of 2026-12-04
    assert sign_test_p(4, 22) == sign_test_p(22, 4)
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)


def test_bad_grid_settings_name_their_flag():
    bench = PolicyBenchConfig(trace="t")
    for kwargs, flag in [({"rounds": 0}, "--rounds"), ({"step": 1.0}, "--step"),
                         ({"start_utilisation": 0.0}, "--start-utilisation"), ({"max_rates": 0}, "--max-rates")]:
        with pytest.raises(ValueError, match=flag):
            CacheABConfig(bench=bench, **kwargs)


def test_unique_prompts_are_refused_before_anything_loads(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"timestamp": 0, "input_length": 64, "output_length": 2, "hash_ids": [0]}) + "\n")
    with pytest.raises(ValueError, match="--prefix-mode unique"):
        run_cache_ab(CacheABConfig(bench=PolicyBenchConfig(trace=str(trace), prefix_mode="unique")),
                     tmp_path / "no-model")


@pytest.mark.slow
def test_a_real_grid_replays_both_engines_and_only_the_cached_one_hits(tmp_path, tiny_checkpoint_factory, capsys):
    # 8 requests sharing their first two 512-token blocks (32 tokens each at length scale 1/16)
    trace = tmp_path / "shared.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 400 * i, "input_length": 1536, "output_length": 2,
                                         "hash_ids": [0, 1, 2 + i]}) + "\n" for i in range(8)))
    bench = PolicyBenchConfig(trace=str(trace), max_requests=8, engine={"profile_max_tokens": 256})
    report = run_cache_ab(CacheABConfig(bench=bench, rounds=2, max_rates=2), tiny_checkpoint_factory("llama"))
    assert 1 <= len(report["rates"]) <= 2
    assert [r["rate_rps"] for r in report["rates"]] == sorted(r["rate_rps"] for r in report["rates"])
    for row in report["rates"]:
        k = row["grid_index"]
        on, off = row["flowprefill"], row[NOCACHE]
        assert len(on["runs"]) == len(off["runs"]) == 2 and len(row["probe_ms"]) == 2
        assert [r["first_in_round"] for r in on["runs"]] == [k % 2 == 0, k % 2 == 1]
        assert on["hit_rate"] is not None and on["hit_rate"] > 0.4  # 64 of 96 tokens shared after the first
        assert not off["hit_rate"]  # the cache-off engine never hits
        assert sum(row["tally"].values()) == 2
    assert set(report["goodput"]) == {"flowprefill", NOCACHE}
    out = capsys.readouterr().out
    assert "cache on" in out and "on/off" in out


def test_the_grid_steps_down_until_both_pass_then_climbs_until_both_fail():
    from bench.cache_ab import next_rate_index

    on, off = "flowprefill", NOCACHE
    m: dict[int, dict[str, float]] = {}
    assert next_rate_index(m, 0.5, 9) == 0
    m[0] = {on: 0.95, off: 0.85}
    assert next_rate_index(m, 0.5, 9) == -1  # off misses at the lowest rate: its goodput is below it
    m[-1] = {on: 1.0, off: 0.95}
    assert next_rate_index(m, 0.5, 9) == 1
    m[1] = {on: 0.6, off: 0.4}
    assert next_rate_index(m, 0.5, 9) == 2  # on is still above stop_below
    m[2] = {on: 0.45, off: 0.3}
    assert next_rate_index(m, 0.5, 9) is None
    assert next_rate_index({0: {on: 0.1, off: 0.1}, -1: {on: 0.1, off: 0.1}, -2: {on: 0.2, off: 0.1},
                            -3: {on: 0.2, off: 0.2}}, 0.5, 9) is None  # max_down reached and all failing
    assert next_rate_index({0: {on: 1.0, off: 1.0}}, 0.5, 1) is None  # max_rates
