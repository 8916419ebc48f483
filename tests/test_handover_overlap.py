"""``flowprefill bench handover --overlap`` (bench/handover_overlap.py) on a tiny checkpoint without Ray:
every variant of every length measured, the bytes follow the KV blocks, the overlap fraction is the
clamped formula over the measured medians, and neither engine keeps a KV block or a live request."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from bench.handover_overlap import VARIANTS, overlap_fraction
from cluster.cli import main

LENGTHS = (16, 40)  # one full block; three blocks of 16, the last partly used


@pytest.mark.parametrize(("idle", "handover", "serial", "expected"), [
    (100.0, 100.0, 150.0, 1.0),  # fully hidden
    (100.0, 150.0, 150.0, 0.0),  # as slow as serial
    (100.0, 125.0, 150.0, 0.5),
    (100.0, 90.0, 150.0, 1.0),  # faster than idle: clamped
    (100.0, 170.0, 150.0, 0.0),  # slower than serial: clamped
    (100.0, 120.0, 100.0, None),  # nothing to hide
])
def test_overlap_fraction(idle, handover, serial, expected):
    assert overlap_fraction(idle, handover, serial) == expected


def test_bench_handover_overlap_report(tiny_checkpoint_factory, tmp_path, capsys):
    model = tiny_checkpoint_factory("llama", seed=5, num_layers=2, hidden_size=64, intermediate_size=128)
    out = tmp_path / "overlap.json"
    rc = main(["bench", "handover", "--overlap", "--model", str(model), "--lengths", ",".join(map(str, LENGTHS)),
               "--repeats", "1", "--no-ray", "--kv-cache-mib", "4", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    spec = report["kv_spec"]
    element = torch.empty((), dtype=getattr(torch, spec["dtype"].removeprefix("torch."))).element_size()
    bytes_per_token = 2 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"] * element
    assert report["variants"] == list(VARIANTS) and report["transport"] is None
    assert [row["length"] for row in report["rows"]] == list(LENGTHS)
    for row in report["rows"]:
        blocks = -(-row["length"] // spec["block_size"])
        assert row["blocks"] == blocks and row["n"] == 1
        assert row["bytes_per_token"] == bytes_per_token
        assert row["bytes"] == blocks * spec["block_size"] * bytes_per_token  # whole blocks travel
        (rep,) = row["repeats"]
        assert set(rep) == {*VARIANTS, "overlap_fraction"}
        for variant in VARIANTS:
            got = rep[variant]
            assert got["next_prefill_ms"] > 0 and got["transfer_ms"] > 0 and got["gather_ms"] > 0, variant
            assert 0 < got["admit_ms"] <= got["transfer_ms"], variant  # no Ray: the transfer is the admission
            assert "put_ms" not in got and "get_ms" not in got
            spread = row["next_prefill_ms"][variant]
            assert spread["min"] == spread["median"] == spread["max"] == got["next_prefill_ms"]
        # serial waits for the whole transfer before it submits the prompt
        assert rep["serial"]["next_prefill_ms"] > rep["serial"]["transfer_ms"]
        medians = [row["next_prefill_ms"][v]["median"] for v in VARIANTS]
        assert row["overlap_fraction"] == overlap_fraction(*medians) == rep["overlap_fraction"]
        assert row["overlap_fraction"] is None or 0.0 <= row["overlap_fraction"] <= 1.0
        assert row["paired_overlap_fraction"] == rep["overlap_fraction"]
        assert row["transfer_ms"]["median"] == statistics.median(
            [rep["idle"]["transfer_ms"], rep["serial"]["transfer_ms"]])
        assert row["in_flight_ms"]["median"] == rep["handover"]["transfer_ms"]
    assert report["rows"][0]["bytes"] < report["rows"][1]["bytes"]
    for role, kv in report["kv_end"].items():  # every handover admitted was released, no prefix hits
        assert kv["free_blocks"] == kv["num_blocks"] and kv["live"] == 0 and kv["hit_tokens"] == 0, role
    table = capsys.readouterr().out
    assert "next, serial ms" in table and "in flight ms" in table and f"{report['rows'][1]['bytes']:,}" in table


def test_bench_handover_overlap_through_ray(tiny_checkpoint_factory, tmp_path):
    """With Ray (a local single-node one the CLI starts and stops): every transfer is a put and a get
    through the object store on the event-loop thread, then the admission."""
    model = tiny_checkpoint_factory("llama", seed=5, num_layers=2, hidden_size=64, intermediate_size=128)
    out = tmp_path / "overlap-ray.json"
    rc = main(["bench", "handover", "--overlap", "--model", str(model), "--lengths", "24", "--repeats", "1",
               "--kv-cache-mib", "4", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    (rep,) = row["repeats"]
    for variant in VARIANTS:
        got = rep[variant]
        assert got["put_ms"] > 0 and got["get_ms"] > 0, variant
        assert got["put_ms"] + got["get_ms"] + got["admit_ms"] <= got["transfer_ms"], variant
    assert set(row["parts_ms"]) == {"put_ms", "get_ms", "admit_ms"}
    transport = report["transport"]
    moved = 1 + len(VARIANTS)  # the warm-up's serial transfer, then one per variant
    assert transport["sent"] == transport["received"] == moved
    assert transport["bytes_sent"] == transport["bytes_received"] == moved * row["bytes"]
