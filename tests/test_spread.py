"""``bench spread``'s parts that need no model: settings, the per-thread GC log, the summary."""

from __future__ import annotations

import gc
import threading

import pytest

from bench.spread import VARIANTS, SpreadConfig, ThreadGCLog, summarize_variant


def test_bad_settings_name_their_flag():
    with pytest.raises(ValueError, match="--variants: unknown gc-off"):
        SpreadConfig(trace="t.csv", rate_rps=4, variants=("baseline", "gc-off"))
    with pytest.raises(ValueError, match="--competitor"):
        SpreadConfig(trace="t.csv", rate_rps=4, competitor="stress")
    with pytest.raises(ValueError, match="--runs: a spread needs at least 2"):
        SpreadConfig(trace="t.csv", rate_rps=4, runs=1)
    with pytest.raises(ValueError, match="--rate"):
        SpreadConfig(trace="t.csv", rate_rps=0)
    assert set(VARIANTS) >= {"baseline", "omp-passive", "omp-active", "omp-spin", "threads-1", "malloc-keep"}


def test_gc_log_splits_collections_by_thread():
    """Real collections: three on a worker thread counted as the compute thread's, one here as 'other'."""
    worker = threading.Thread(target=lambda: [gc.collect() for _ in range(3)])
    log = ThreadGCLog(None)
    gc.callbacks.append(log)
    try:
        worker.start()
        log.ident = worker.ident
        worker.join()
        gc.collect()
    finally:
        gc.callbacks.remove(log)
    taken = log.take()
    assert taken["gc_count"] >= 3 and taken["gc_other_count"] >= 1
    assert 0 < taken["gc_max_ms"] <= taken["gc_total_ms"]
    assert log.take()["gc_count"] == 0  # a take starts the next count


def test_summary_is_the_median_and_spread_of_the_replays():
    runs = [{"attainment": a, "ttft_p50_s": p, "gc_total_ms": 1.0, "gc_max_ms": 0.5, "gc_other_total_ms": 2.0,
             "gc_other_max_ms": m, "cost_scale": c, "probe_ms": probe}
            for a, p, m, c, probe in [(0.9, 0.3, 1.0, 1.1, 450.0), (0.8, 0.5, 4.0, 1.3, 600.0),
                                      (1.0, 0.2, 2.0, 1.0, 400.0)]]
    s = summarize_variant({"variant": "baseline", "runs": runs})
    assert (s["attainment_median"], s["attainment_min"], s["attainment_max"]) == (0.9, 0.8, 1.0)
    assert s["spread"] == pytest.approx(0.2) and s["ttft_p50_median_s"] == 0.3
    assert (s["gc_other_max_ms"], s["cost_scale_median"]) == (4.0, 1.1)
    assert (s["probe_ms_median"], s["probe_ms_min"], s["probe_ms_max"]) == (450.0, 400.0, 600.0)
    assert s["attainment_vs_probe"] < -0.9  # slower probe, lower attainment
