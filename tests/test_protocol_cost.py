"""bench/protocol_cost.py: every operation is timed, and ``--against`` a checkout prints both sides."""

from __future__ import annotations

import json
from pathlib import Path

from bench import protocol_cost

ROOT = Path(__file__).resolve().parents[1]
OPS = {"chat_request_parse", "completion_request_parse", "chat_stream_delta", "chat_stream_delta_logprobs",
       "completion_chunk", "chat_body_1_choice"}


def test_every_operation_costs_a_positive_number_of_microseconds():
    costs = protocol_cost.measure(number=20)
    assert set(costs) == OPS and all(0 < us < 1e5 for us in costs.values())


def test_against_a_checkout_prints_json_and_a_table_side_by_side(capsys):
    assert protocol_cost.main(["--against", str(ROOT), "--number", "10", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.index("| op |")])
    assert set(report["baseline"]) == set(report["this"]) == OPS
    rows = [line for line in out.splitlines() if line.startswith("| ") and "µs" not in line]
    assert len(rows) == len(OPS) and all(line.rstrip().endswith("x |") for line in rows)
