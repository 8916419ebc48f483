"""``flowprefill bench handover`` on a tiny checkpoint without Ray: the bytes follow the KV blocks
exactly, the percentiles are ordered, and neither engine keeps a KV block."""

from __future__ import annotations

import json

import torch

from cluster.cli import main

LENGTHS = (20, 70)  # 2 and 5 blocks of 16 tokens, both with a partly used last block


def test_bench_handover_bytes_follow_the_blocks_and_every_kv_block_ends_free(tiny_checkpoint_factory, tmp_path,
                                                                             capsys):
    model = tiny_checkpoint_factory("llama", seed=5, num_layers=2, hidden_size=64, intermediate_size=128)
    out = tmp_path / "handover.json"
    rc = main(["bench", "handover", "--model", str(model), "--lengths", ",".join(map(str, LENGTHS)),
               "--repeats", "3", "--no-ray", "--kv-cache-mib", "4", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    spec = report["kv_spec"]
    element = torch.empty((), dtype=getattr(torch, spec["dtype"].removeprefix("torch."))).element_size()
    bytes_per_token = 2 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"] * element
    assert [row["length"] for row in report["rows"]] == list(LENGTHS)
    for row in report["rows"]:
        blocks = -(-row["length"] // spec["block_size"])
        assert row["blocks"] == blocks and row["n"] == 3
        assert row["bytes"] == blocks * spec["block_size"] * bytes_per_token
        assert {s["bytes"] for s in report["samples"][str(row["length"])]} == {row["bytes"]}
        assert row["prefix_hit_tokens"] == 0  # every repeat a fresh prompt
        for part in ("gather_ms", "admit_ms", "e2e_ms"):
            assert 0 <= row[part]["p50"] <= row[part]["p99"], part
        assert "put_ms" not in row and "get_ms" not in row  # no Ray
    assert report["rows"][0]["bytes"] < report["rows"][1]["bytes"]
    for role, kv in report["kv_end"].items():
        assert kv["free_blocks"] == kv["num_blocks"] and kv["live"] == 0, role
    table = capsys.readouterr().out
    assert "gather p50/p99 ms" in table and f"{report['rows'][1]['bytes']:,}" in table
