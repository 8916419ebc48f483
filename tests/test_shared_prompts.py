"""Prompts that share exactly the prefixes their block ids say (bench.prompts), fresh ones per run
(bench.serve_workload, bench.replay.fresh_prompts, bench.policy_bench.workload_prompts), and the
unique mode exactly as before.

The Mooncake trace (Apache-2.0) is by Qin et al., FAST'25; the Azure LLM inference trace 2023
(CC-BY 4.0) by Patel et al., "Splitwise", ISCA 2024.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bench.prompts import PromptBuilder
from bench.traces import Trace, TraceRequest, load_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
AZURE_CODE = SHARED / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"


@pytest.fixture(scope="module")
def tok(tiny_checkpoint_factory):
    from replicas.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_checkpoint_factory("llama3"))


def _mooncake(tmp_path: Path, rows: list[tuple[int, int, list[int]]]) -> Path:
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"timestamp": t, "input_length": n, "output_length": 4, "hash_ids": ids}) + "\n"
                         for t, n, ids in rows))
    return p


def test_prompts_sharing_leading_block_ids_share_exactly_those_tokens(tok, tmp_path):
    # three requests: b shares a's first two blocks then diverges; c shares only the first; d none
    path = _mooncake(tmp_path, [(0, 2000, [0, 1, 2, 3]), (10, 1800, [0, 1, 4, 5]), (20, 700, [0, 6]),
                                (30, 1500, [7, 8, 9])])
    trace = load_trace(path).scale_lengths(1 / 16)
    assert trace.block_tokens == 32 and [r.input_tokens for r in trace] == [125, 113, 44, 94]
    b = PromptBuilder(tok, seed=3)
    p = [b.build_shared(i, r.input_tokens, r.hash_ids, trace.block_tokens) for i, r in enumerate(trace)]
    for prompt, r in zip(p, trace):
        assert prompt.num_tokens == r.input_tokens
        assert list(prompt.token_ids) == tok.encode(prompt.text, add_special_tokens=True)  # text and ids agree
    ids = [q.token_ids for q in p]
    assert ids[0][:64] == ids[1][:64] and ids[0][64:96] != ids[1][64:96]  # two blocks of 32, then apart
    assert ids[0][:32] == ids[2][:32] and ids[0][32:44] != ids[2][32:44]
    assert ids[3][:32] != ids[0][:32]
    # text is compositional: the shared token prefix is a shared text prefix, word for word
    words = [q.text.split(" ")[1:] for q in p]
    assert words[0][:64] == words[1][:64] and words[0][64:96] != words[1][64:96]
    assert p[1].text.startswith(" " + " ".join(words[0][:64]) + " ")
    # deterministic per seed and namespace; another namespace (run) shares no block with this one
    assert b.build_shared(0, 125, (0, 1, 2, 3), 32) == p[0]
    assert PromptBuilder(tok, seed=3).build_shared(0, 125, (0, 1, 2, 3), 32) == p[0]
    other = b.build_shared(0, 125, (0, 1, 2, 3), 32, namespace=1)
    assert other.num_tokens == 125 and all(other.token_ids[k:k + 32] != ids[0][k:k + 32] for k in range(0, 125, 32))
    assert PromptBuilder(tok, seed=4).build_shared(0, 125, (0, 1, 2, 3), 32).token_ids[:32] != ids[0][:32]


def test_a_prompt_longer_than_its_blocks_ends_with_tokens_of_its_own(tok):
    b = PromptBuilder(tok, seed=0)
    x = b.build_shared(0, 50, (0,), 32)
    y = b.build_shared(1, 50, (0,), 32)
    assert x.token_ids[:32] == y.token_ids[:32] and x.token_ids[32:] != y.token_ids[32:]
    alone = [b.build_shared(i, 40, None, None) for i in range(3)]
    assert len({a.token_ids for a in alone}) == 3 and all(a.num_tokens == 40 for a in alone)
    with pytest.raises(ValueError, match="num_tokens"):
        b.build_shared(0, 0, (0,), 32)
    with pytest.raises(ValueError, match="block_tokens"):
        b.build_shared(0, 10, (0,), None)


def test_unique_prompts_are_unchanged_for_a_fixed_seed(tok):
    # digest of the prompts the builder made before shared prefixes existed (same tiny tokenizer)
    b = PromptBuilder(tok, 7)
    h = hashlib.sha256()
    for i, n in [(0, 1), (1, 5), (2, 33), (517, 64), (3, 300)]:
        p = b.build(i, n)
        h.update(p.text.encode())
        h.update(repr(p.token_ids).encode())
    assert b.build(1, 5).text == " of is small request it" and b.build(1, 5).token_ids == (346, 299, 390, 404, 310)
    assert h.hexdigest() == "958cb157b5f19972646d6d02a3577c234f9af0be9920625d799069503a8f9c13"


def _rows(reqs: list) -> list:
    return [[round(r.arrival_s, 9), r.prompt if isinstance(r.prompt, str) else list(r.prompt), r.input_tokens,
             r.max_tokens, r.slo_class, r.priority, r.ttft_slo_s] for r in reqs]


@pytest.mark.skipif(not AZURE_CODE.is_file(), reason=f"{AZURE_CODE} not found")
@pytest.mark.parametrize("fmt,digest", [
    ("text", "939f615a2d38b1c53931d0d84766a07824a4ec0cd97b83fa485c2920cc51bd03"),
    ("ids", "083337c39f2b61b6475b68b74045cfabd918901b9ae9b90fc5aba601fa16d609"),
])
def test_bench_serve_unique_mode_sends_what_it_sent_before(tok, fmt, digest):
    from bench.serve_bench import build_requests
    from bench.serve_config import ServeBenchConfig, slo_classes

    cfg = ServeBenchConfig(trace=str(AZURE_CODE), systems=("flowprefill",), prompt_format=fmt, max_requests=12)
    assert hashlib.sha256(json.dumps(_rows(build_requests(cfg, tok, slo_classes()))).encode()).hexdigest() == digest


def test_every_serve_run_sends_new_prompts_with_the_same_sharing(tok, tmp_path):
    from bench.serve_config import ServeBenchConfig, slo_classes
    from bench.serve_workload import build_workload

    rows = [(1000 * i, 900 + 15 * i, [0, 100 + i] if i % 2 else [0, 1]) for i in range(8)]
    cfg = ServeBenchConfig(trace=str(_mooncake(tmp_path, rows)), systems=("vllm",), window_start_s=0,
                           prompt_format="ids")
    wl = build_workload(cfg, tok, slo_classes())
    assert wl.mode == "trace" and wl.shared and wl.trace.block_tokens == 32
    assert wl.describe()["reusable_token_fraction"] == pytest.approx(wl.reusable_fraction) and wl.reusable_fraction > 0
    r0, r1 = wl.requests(0), wl.requests(1)
    assert [r.input_tokens for r in r0] == [r.input_tokens for r in r1] == [len(r.prompt) for r in r0]
    assert [r.arrival_s for r in r0] == [r.arrival_s for r in r1] and wl.requests(1) == r1
    n = len(r0[0].prompt)  # 56 tokens: block 0 (32), then 24 of block 1
    for run in (r0, r1):  # within a run: every request shares block 0, the even ones block 1 too
        assert all(r.prompt[:32] == run[0].prompt[:32] for r in run)
        assert run[2].prompt[:n] == run[0].prompt and run[1].prompt[32:n] != run[0].prompt[32:n]
    assert all(a.prompt[:32] != b.prompt[:32] for a, b in zip(r0, r1))  # across runs: nothing

    unique = build_workload(ServeBenchConfig(trace=cfg.trace, systems=("vllm",), window_start_s=0,
                                             prefix_mode="unique", prompt_format="ids"), tok, slo_classes())
    u0, u1 = unique.requests(0), unique.requests(1)
    b = PromptBuilder(tok, 0)
    assert [r.prompt for r in u0] == [b.build(i, r.input_tokens).token_ids for i, r in enumerate(u0)]
    assert [r.prompt for r in u1] == [b.build(8 + i, r.input_tokens).token_ids for i, r in enumerate(u1)]
    assert len({r.prompt[0] for r in u0 + u1}) == 16  # unique from the first token, across runs too


def test_policy_replays_get_fresh_prompts(tok):
    from bench.policy_bench import workload_prompts
    from bench.replay import fresh_prompts, make_prompts

    base = make_prompts(tok, [30, 31, 32, 33, 34])
    assert fresh_prompts(tok, base, 0) == base
    runs = [fresh_prompts(tok, base, k) for k in (1, 2, 3)]
    firsts = {p[0] for p in base}
    for run in runs:
        assert [len(p) for p in run] == [30, 31, 32, 33, 34] and all(p[1:] == q[1:] for p, q in zip(run, base))
        assert len({p[0] for p in run}) == 1 and run[0][0] not in firsts  # a marker no run-0 prompt starts with
    assert len({run[0][0] for run in runs}) == 3  # one marker per run
    hashed = Trace((TraceRequest(0.0, 40, 1, (0, 1)), TraceRequest(1.0, 50, 1, (0, 2))), "t", 16)
    a, b = workload_prompts(tok, hashed, 0, 1), workload_prompts(tok, hashed, 0, 2)
    assert [len(p) for p in a] == [40, 50] and a[0][:16] == a[1][:16] and a[0][16:32] != a[1][16:32]
    assert a[0][:16] != b[0][:16]
    plain = Trace((TraceRequest(0.0, 30, 1), TraceRequest(1.0, 31, 1)), "t")
    assert workload_prompts(tok, plain, 0, 0) == make_prompts(tok, [30, 31])
