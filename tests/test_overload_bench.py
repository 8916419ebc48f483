"""bench/overload.py without a server: the three-phase schedule and the per-phase accounting."""

from __future__ import annotations

import pytest

from bench.loadgen import LoadRequest, RequestResult
from bench.overload import OverloadConfig, median_phases, phase_of, schedule, summarize_phases


def _base(n: int = 20) -> list[LoadRequest]:
    return [LoadRequest(arrival_s=i * 0.5, prompt=(1, 2), input_tokens=2, max_tokens=4,
                        slo_class="batch" if i % 2 else "interactive", priority=i % 2, ttft_slo_s=1.0)
            for i in range(n)]


def test_schedule_runs_each_phase_at_its_rate() -> None:
    cfg = OverloadConfig(trace="t", goodput_rps=2.0, factor=10, base_fraction=0.5,
                         before_s=20, overload_s=30, after_s=40)
    requests, next_copy = schedule(cfg, _base())
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals) and arrivals[-1] < 90
    counts = {p: sum(phase_of(cfg, t) == p for t in arrivals) for p in ("before", "overload", "after")}
    assert abs(counts["before"] / 20 - 1.0) < 0.15  # 0.5 x 2 req/s
    assert abs(counts["overload"] / 30 - 20.0) < 2.0  # 10 x 2 req/s
    assert abs(counts["after"] / 40 - 1.0) < 0.15


def test_phase_summary_counts_refusals_with_retry_after_and_attainment() -> None:
    cfg = OverloadConfig(trace="t", goodput_rps=1.0, before_s=10, overload_s=10, after_s=10)
    results = [
        RequestResult(0, "interactive", 2, 1.0, arrival_s=1, ttft_s=0.5, e2e_s=1.0, output_tokens=4, status=200),
        RequestResult(1, "batch", 2, 60.0, arrival_s=12, error="HTTP 429: shed", status=429, retry_after="1"),
        RequestResult(2, "batch", 2, 60.0, arrival_s=13, error="HTTP 429: full", status=429),
        RequestResult(3, "interactive", 2, 1.0, arrival_s=14, ttft_s=2.0, e2e_s=3.0, output_tokens=4, status=200),
        RequestResult(4, "interactive", 2, 1.0, arrival_s=15, error="cancelled: no first token within the TTFT SLO"),
        RequestResult(5, "interactive", 2, 1.0, arrival_s=25, error="HTTP 503: replica failed", status=503),
    ]
    table = summarize_phases(cfg, results)
    assert table["before"]["all"] == {"requests": 1, "completed": 1, "met": 1, "rejected_429": 0, "retry_after": 0,
                                      "other_errors": 0, "cancelled": 0, "attainment": 1.0, "bound": 1.0}
    assert table["overload"]["batch"]["refusal_reasons"] == {"shed": 1, "full": 1}
    over = table["overload"]
    assert over["batch"]["rejected_429"] == 2 and over["batch"]["retry_after"] == 1
    assert over["interactive"]["completed"] == 1 and over["interactive"]["cancelled"] == 1
    assert over["interactive"]["attainment"] == 0.0 and over["all"]["requests"] == 4
    assert table["after"]["all"]["other_errors"] == 1


def test_capacity_bound_serves_the_most_urgent_class_first() -> None:
    """10 s at 1 req/s of goodput: 10 requests can meet their SLO; 8 interactive (1 s SLO) take 8 of
    them, 20 standard (5 s) the other 2, 4 batch none."""
    cfg = OverloadConfig(trace="t", goodput_rps=1.0, before_s=10, overload_s=10, after_s=10)
    results = [RequestResult(i, cls, 2, slo, arrival_s=10.5, error="HTTP 429", status=429)
               for i, (cls, slo) in enumerate([("interactive", 1.0)] * 8 + [("standard", 5.0)] * 20
                                              + [("batch", 60.0)] * 4)]
    over = summarize_phases(cfg, results)["overload"]
    assert over["all"]["bound"] == round(10 / 32, 3)
    assert (over["interactive"]["bound"], over["standard"]["bound"], over["batch"]["bound"]) == (1.0, 0.1, 0.0)


def test_the_bound_at_speed_scales_each_phase_by_its_prefill_speed() -> None:
    """Prefill at 2x its profile in the burst against 1x before: half the capacity, so the 8
    interactive requests can have only 5 of the 10 goodput slots, standard none."""
    from bench.overload import _capacity_bounds, speed_ratios

    assert speed_ratios({"before": 1.0, "overload": 2.0, "after": None}) == {"before": 1.0, "overload": 0.5}
    assert speed_ratios({"before": None, "overload": 2.0}) == {}
    cfg = OverloadConfig(trace="t", goodput_rps=1.0, before_s=10, overload_s=10, after_s=10)
    results = [RequestResult(i, cls, 2, slo, arrival_s=10.5, error="HTTP 429", status=429)
               for i, (cls, slo) in enumerate([("interactive", 1.0)] * 8 + [("standard", 5.0)] * 20)]
    table = summarize_phases(cfg, results)
    _capacity_bounds(cfg, results, table, {"overload": 0.5}, key="bound_at_speed")
    over = table["overload"]
    assert (over["interactive"]["bound_at_speed"], over["standard"]["bound_at_speed"]) == (round(5 / 8, 3), 0.0)
    assert over["interactive"]["bound"] == 1.0  # the plain bound is kept beside it


def test_engine_settings_are_read_as_yaml_and_validated() -> None:
    import pytest

    from bench.servers import parse_engine_settings

    assert parse_engine_settings(["late_reject_factor=1.0", "calibrate_cost=false", "max_queued_work_s=null"]) == {
        "late_reject_factor": 1.0, "calibrate_cost": False, "max_queued_work_s": None}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_engine_settings(["late_reject_factor"])
    with pytest.raises(ValueError, match="--engine-set.late_reject_factr"):
        OverloadConfig(trace="t", goodput_rps=1.0, engine_settings={"late_reject_factr": 1.0})


def test_class_outcomes_cover_the_whole_run_per_class() -> None:
    from bench.outcomes import class_outcomes

    results = [
        RequestResult(0, "interactive", 2, 1.0, arrival_s=1, ttft_s=0.5, e2e_s=1.0, output_tokens=4, status=200),
        RequestResult(1, "interactive", 2, 1.0, arrival_s=2, ttft_s=1.5, e2e_s=2.0, output_tokens=4, status=200),
        RequestResult(2, "batch", 2, 60.0, arrival_s=3,
                      error='HTTP 429: {"error": {"message": "expired: waited 91.2s for \'r-17\'"}}', status=429),
    ]
    rows = class_outcomes(results)
    assert rows["interactive"]["attainment"] == 0.5 and rows["interactive"]["completed"] == 2
    assert rows["batch"]["refusal_reasons"] == {"expired: waited # for '…'": 1}
    assert rows["all"]["requests"] == 3 and rows["all"]["met"] == 1


def test_cost_scale_is_the_highest_replica_gauge_in_the_metrics_text() -> None:
    from bench.servers import cost_scale_from_metrics

    text = ("# HELP flowprefill_replica_cost_scale prefill time over its profile\n"
            'flowprefill_replica_cost_scale{replica="a"} 1.25\n'
            'flowprefill_replica_cost_scale{replica="b"} 1.75\n'
            'flowprefill_replica_queue_depth{replica="a"} 3.0\n')
    assert cost_scale_from_metrics(text) == 1.75
    assert cost_scale_from_metrics("flowprefill_replica_queue_depth 3.0\n") is None


def test_metric_values_match_the_whole_name_across_labels() -> None:
    from bench.servers import metric_values

    text = ("# TYPE flowprefill_replica_retries_total counter\n"
            'flowprefill_replica_retries_total{replica="a"} 2.0\n'
            'flowprefill_replica_retries_total{replica="b"} 1.0\n'
            "flowprefill_replica_retries_total_created 1.7e9\n"
            "flowprefill_redis_fallbacks_total 17.0\n")
    assert sum(metric_values(text, "flowprefill_replica_retries_total")) == 3.0
    assert metric_values(text, "flowprefill_redis_fallbacks_total") == [17.0]
    assert metric_values(text, "flowprefill_replica_retries") == []


def test_every_copy_of_the_window_sends_prompts_of_its_own() -> None:
    """A prefix cache would serve a tiled window's repeats from memory: each copy gets new prompts."""
    cfg = OverloadConfig(trace="t", goodput_rps=2.0, before_s=20, overload_s=30, after_s=40)
    base = _base()

    def copies(k: int) -> list[LoadRequest]:
        return [LoadRequest(r.arrival_s, (1000 + k, 2), 2, 4, r.slo_class, r.priority, 1.0) for r in base]

    first, next_copy = schedule(cfg, base, copies, first_copy=1)
    second, _ = schedule(cfg, base, copies, first_copy=next_copy)
    prompts = [r.prompt for r in first + second]
    per_copy = len(base)
    assert len(set(prompts)) == -(-len(prompts) // per_copy) and len(set(r.prompt for r in first)) == next_copy - 1
    assert not {r.prompt for r in first} & {r.prompt for r in second}
    assert (1000, 2) not in prompts  # copy 0, the warm-up's, is never measured


def test_repeats_merge_into_medians_with_counts_summed() -> None:
    row = {"requests": 4, "completed": 4, "met": 2, "rejected_429": 1, "retry_after": 1, "other_errors": 0,
           "cancelled": 0, "bound": 0.5}
    tables = [{"before": {}, "overload": {"interactive": {**row, "attainment": a, "refusal_reasons": {"shed": 1}}},
               "after": {}} for a in (0.5, 0.9, 0.7)]
    merged = median_phases(tables)["overload"]["interactive"]
    assert merged["attainment"] == 0.7 and merged["attainment_min"] == 0.5 and merged["attainment_max"] == 0.9
    assert merged["requests"] == 12 and merged["rejected_429"] == 3 and merged["refusal_reasons"] == {"shed": 3}
    assert merged["bound"] == 0.5
    with pytest.raises(ValueError, match="--repeats"):
        OverloadConfig(trace="t", goodput_rps=1.0, repeats=0)
