"""`bench engine` on a tiny checkpoint: the report's figures are paired medians and a direct cost."""

from __future__ import annotations

import json

import pytest
import torch

from bench.engine_bench import EngineBenchConfig, measure_checkpoint_cost, run_engine_bench
from bench.flops import prefill_flops
from bench.preemption_latency import _timeline_latencies
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
    cfg = EngineBenchConfig(lengths=[16, 64], repeats=2, latency_tokens=64, latency_runs=1, chunk_sizes=(16,),
                            peak_tflops=0.5)
    report = run_engine_bench(model_dir, cfg)
    json.dumps(report)
    flops = prefill_flops(DecoderModel.load(model_dir).config, 64).total
    assert report["prefill_flops"]["64"]["total"] == flops
    for key in ("ours", "ours_block", "transformers"):
        tflops = report["prefill_tflops"][key]["64"]
        assert tflops == pytest.approx(flops * report["prefill_tokens_per_s"][key]["64"] / 64 / 1e12)
        assert report["mfu"][key]["64"] == pytest.approx(tflops / 0.5)
    assert (report["peak_tflops"], report["peak_source"]) == (0.5, "given")
    lat = report["preempt_latency_ms"]
    assert [name for name, row in lat.items() if isinstance(row, dict)] == [
        "none", "layer", "block", "op", "block-K1", "block-K2", "block-K4", "chunked-16"]
    assert [lat[f"block-K{k}"]["max_inflight"] for k in (1, 2, 4)] == [1, 2, 4]
    assert lat["block"]["max_inflight"] == lat["max_inflight_default"] == 2
    for name in ("block-K1", "block-K2", "block-K4", "chunked-16"):
        assert 0 < lat[name]["p50"] <= lat[name]["p99"] <= lat[name]["max"] and lat[name]["samples"] == 2000
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


def test_latency_runs_to_when_the_device_is_free_after_the_next_point():
    """On CUDA the executor returns while up to K launched operators still run: a request is served
    once those have finished (``free_at``), not when the host passed the point."""
    points, free = [1.0, 2.0, 3.0], [1.5, 2.9, 3.2]
    host = _timeline_latencies(points, 0.0, 4.0, 4000, seed=1)
    device = _timeline_latencies(points, 0.0, 4.0, 4000, seed=1, free_at=free)
    assert max(host) <= 1.0 + 1e-9 and min(host) >= 0
    delays = sorted(d - h for d, h in zip(device, host))
    assert delays[0] == pytest.approx(0.0) and delays[-1] == pytest.approx(0.9)  # after the last point: 0


def test_point_clock_reads_when_the_device_finished_each_point():
    """On CUDA each point's event, read against the start event, says when the device got past it;
    the device is free after a point at the later of that and the host reaching the point."""
    from bench.preemption_latency import _PointClock

    class FakeEvent:
        def __init__(self, ms: float) -> None:
            self.ms = ms

        def elapsed_time(self, other: FakeEvent) -> float:
            return other.ms - self.ms

    clock = _PointClock(torch.device("cpu"))
    clock.cuda, clock.begin, clock.start = True, 10.0, FakeEvent(0.0)
    clock.points = [10.001, 10.002, 10.010]  # the host ran ahead of the first two
    clock.events = [FakeEvent(4.0), FakeEvent(8.0), FakeEvent(9.0)]  # device done at 10.004, 10.008, 10.009
    assert clock.free_at() == pytest.approx([10.004, 10.008, 10.010])
    clock.cuda = False
    assert clock.free_at() == clock.points
