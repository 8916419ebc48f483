"""bench serve's P/D comparison, without servers: the two systems' configs (same cores, the P/D one a valid
app), goodput counting both SLOs, and the P/D-to-colocated ratio."""

from __future__ import annotations

import pytest
import yaml

from bench import servers
from bench.loadgen import RequestResult, summarize
from bench.serve_compare import format_comparison, goodput_comparison
from cluster.app import AppConfig


def test_pd_and_two_colocated_replicas_get_valid_apps_on_the_same_share_of_the_machine(tmp_path):
    apps = {}
    for system in ("flowprefill-pd", "flowprefill-x2"):
        spec = servers.server_spec(system, tmp_path / "m", "m", work_dir=tmp_path, engine={"short_threshold": 128})
        args = yaml.safe_load(spec.cleanup[0].read_text())["applications"][0]["args"]
        assert spec.argv[spec.argv.index("--policy") + 1] == "flowprefill"
        assert args["engine"]["short_threshold"] == 128 and args["slo"]["classes"][0]["tpot_slo_ms"] == 500
        apps[system] = AppConfig.from_args(args)  # what `flowprefill serve` validates
    pd, x2 = apps["flowprefill-pd"], apps["flowprefill-x2"]
    pool = pd.decode_pool()
    assert pd.engine["role"] == "prefill" and pd.num_replicas == 1 and pool is not None and pool.num_replicas == 1
    assert x2.decode_pool() is None and x2.num_replicas == 2 and x2.engine.get("role", "colocated") == "colocated"
    assert pd.replica_cpus + pool.replica_cpus == 2 * x2.replica_cpus  # the same logical CPUs, 2 replicas each


def _result(ttft_s: float, e2e_s: float, tokens: int, tpot_slo_s: float | None, error: str | None = None):
    return RequestResult(0, "interactive", 100, 1.0, 0.0, ttft_s=ttft_s, e2e_s=e2e_s, output_tokens=tokens,
                         error=error, tpot_slo_s=tpot_slo_s)


def test_with_a_tpot_slo_a_request_counts_only_when_it_meets_both_slos():
    fast = _result(0.5, 0.5 + 7 * 0.1, 8, 0.2)     # TTFT 0.5 <= 1, TPOT 0.1 <= 0.2
    slow = _result(0.5, 0.5 + 7 * 0.3, 8, 0.2)     # TPOT 0.3 > 0.2
    late = _result(1.5, 1.5 + 7 * 0.1, 8, 0.2)     # TTFT missed
    single = _result(0.5, 0.5, 1, 0.2)             # one token: no TPOT to miss
    broken = _result(0.5, 0.9, 3, 0.2, error="stream: 503")
    assert [r.met_all for r in (fast, slow, late, single, broken)] == [True, False, False, True, False]
    assert [r.met for r in (fast, slow, late, single)] == [True, True, False, True]  # TTFT alone
    out = summarize([fast, slow, late, single])
    assert out["attainment"] == 0.5 and out["ttft_attainment"] == 0.75 and out["tpot_judged"] == 4
    # without a TPOT SLO the attainment is TTFT's, as before
    assert summarize([_result(0.5, 5.0, 8, None)])["attainment"] == 1.0


def test_the_report_gives_pd_goodput_over_two_colocated_replicas():
    entries = [{"system": "flowprefill-pd", "goodput": 1.5, "next_failing_rate_rps": 2.0},
               {"system": "flowprefill-x2", "goodput": 1.0, "next_failing_rate_rps": 1.5}]
    cmp = goodput_comparison(entries)
    assert cmp["pd_vs_colocated_x2"]["ratio"] == pytest.approx(1.5)
    assert any(line.startswith("P/D (1 prefill + 1 decode) goodput / 2 colocated replicas (flowprefill-x2): 1.50x")
               for line in format_comparison(cmp))


def test_bench_serve_refuses_an_unknown_slo_mode():
    from bench.serve_config import ServeBenchConfig

    with pytest.raises(ValueError, match="--slos"):
        ServeBenchConfig(trace="t.csv", systems=("flowprefill-pd",), slos="tpot")
    assert ServeBenchConfig(trace="t.csv", systems=("flowprefill-pd", "flowprefill-x2"), slos="both").slos == "both"
