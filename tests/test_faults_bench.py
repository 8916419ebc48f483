"""bench/faults.py without a server: the fault timeline, the per-phase ledger, and finding replica processes."""

from __future__ import annotations

import subprocess
import time

import pytest

from bench.faults import PHASES, FaultConfig, phase_of, replica_pids, summarize
from bench.loadgen import RequestResult


def test_phases_follow_the_fault_timeline() -> None:
    cfg = FaultConfig(trace="t", phase_s=30, outage_s=15)
    assert cfg.starts() == {"before crash": 0.0, "crash": 30.0, "after crash": 60.0, "outage": 90.0,
                            "after outage": 105.0}
    assert cfg.duration_s == 135.0
    assert [phase_of(cfg, t) for t in (0, 29.9, 30, 61, 90, 104.9, 105, 200)] == [
        "before crash", "before crash", "crash", "after crash", "outage", "outage", "after outage", "after outage"]
    with pytest.raises(ValueError, match="--replicas"):
        FaultConfig(trace="t", replicas=1)


def test_ledger_separates_answers_clear_errors_refusals_and_lost_requests() -> None:
    cfg = FaultConfig(trace="t", phase_s=10, outage_s=5)
    results = [
        RequestResult(0, "interactive", 2, 1.0, arrival_s=1, ttft_s=0.5, e2e_s=1.0, output_tokens=4, status=200),
        RequestResult(1, "standard", 2, 5.0, arrival_s=11, ttft_s=0.5, e2e_s=1.0, output_tokens=4, status=200),
        RequestResult(2, "standard", 2, 5.0, arrival_s=12, ttft_s=0.3, status=200,
                      error="stream error: replica failed while streaming"),
        RequestResult(3, "batch", 2, 60.0, arrival_s=13, status=429, error="HTTP 429: shed"),
        RequestResult(4, "standard", 2, 5.0, arrival_s=31, error="cancelled: no first token within the TTFT SLO"),
    ]
    table = summarize(cfg, results, journal_left=2)
    assert list(table) == list(PHASES)
    crash = table["crash"]
    assert (crash["requests"], crash["accepted"], crash["completed"], crash["failed_clearly"], crash["lost"],
            crash["refused_429"]) == (3, 2, 1, 1, 0, 1)
    assert crash["errors"] == ["stream error: replica failed while streaming"]
    assert table["outage"]["lost"] == 1  # hung until the drain limit
    assert table["after outage"]["lost"] == 2  # the journal's leftovers
    assert table["before crash"]["attainment"] == 1.0


def test_replica_processes_are_found_by_their_ray_title() -> None:
    proc = subprocess.Popen(["bash", "-c", 'exec -a "ray::ServeReplica:test:FakeTitleForThisTest" sleep 30'])
    try:
        deadline = time.monotonic() + 10
        while proc.pid not in replica_pids("ServeReplica:test:FakeTitleForThisTest"):
            assert time.monotonic() < deadline, "the titled process was not found"
            time.sleep(0.05)
        assert replica_pids("ServeReplica:test:NoSuchReplica") == []
    finally:
        proc.kill()
        proc.wait()
