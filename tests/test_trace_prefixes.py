"""Block ids of shared prompt prefixes: the Mooncake loader's ``hash_ids``, length scaling, the
reusable fraction, prefix-group sampling and the multi-turn chat generator.

The Mooncake trace (Apache-2.0) is by Qin et al., "Mooncake: A KVCache-centric Disaggregated
Architecture for LLM Serving", FAST'25; the Azure LLM inference trace 2023 (CC-BY 4.0) by Patel et
al., "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.multiturn import MultiTurnConfig, multiturn_trace, reuse_summary
from bench.shared_prefix import (
    apply_prefix_mode,
    resolve_prefix_mode,
    reusable_fraction,
    reusable_tokens,
    sample_prefix_groups,
)
from bench.traces import MOONCAKE_BLOCK_TOKENS, Trace, TraceFormatError, TraceRequest, load_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
MOONCAKE = SHARED / "mooncake" / "synthetic_trace.jsonl"
AZURE_CODE = SHARED / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"
needs_mooncake = pytest.mark.skipif(not MOONCAKE.is_file(), reason=f"{MOONCAKE} not found (no shared/ beside the repo)")
needs_azure = pytest.mark.skipif(not AZURE_CODE.is_file(), reason=f"{AZURE_CODE} not found")


def _line(t: int, n: int, out: int = 1, ids: object = None) -> str:
    row: dict[str, object] = {"timestamp": t, "input_length": n, "output_length": out}
    if ids is not None:
        row["hash_ids"] = ids
    return json.dumps(row)


def _write(tmp_path: Path, *lines: str) -> Path:
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


# ---------------------------------------------------------------- the loader


def test_mooncake_hash_ids_are_loaded_with_the_block_size(tmp_path: Path) -> None:
    p = _write(tmp_path, _line(0, 1100, 3, [0, 1, 2]), _line(5, 512, 2, [0]), _line(9, 40, 1))
    tr = load_trace(p)
    assert tr.block_tokens == MOONCAKE_BLOCK_TOKENS == 512 and tr.has_prefixes
    assert tr.requests == (TraceRequest(0.0, 1100, 3, (0, 1, 2)), TraceRequest(0.005, 512, 2, (0,)),
                           TraceRequest(0.009, 40, 1, None))  # a line without hash_ids shares nothing
    # the ids survive windows, heads and rate scaling
    assert tr.window(0.004, 1.0).requests[0].hash_ids == (0,) and tr.head(1).requests[0].hash_ids == (0, 1, 2)
    assert tr.scale_rate(2.0).block_tokens == 512 and tr.scale_rate(2.0).requests[0].hash_ids == (0, 1, 2)
    assert not tr.without_prefixes().has_prefixes and tr.without_prefixes().block_tokens is None
    plain = load_trace(_write(tmp_path, _line(0, 40), _line(1, 50)))
    assert plain.block_tokens is None and not plain.has_prefixes


@needs_mooncake
def test_the_real_mooncake_trace_reuses_65_percent_of_its_prompt_tokens() -> None:
    tr = load_trace(MOONCAKE)
    assert len(tr) == 3993 and all(len(r.hash_ids) == -(-r.input_tokens // 512) for r in tr)
    assert reusable_fraction(tr) == pytest.approx(0.6512, abs=5e-4)  # PROVENANCE.md: 65%
    scaled = tr.scale_lengths(1 / 16)
    assert scaled.block_tokens == 32
    assert reusable_fraction(scaled) == pytest.approx(reusable_fraction(tr), abs=1e-3)


@pytest.mark.parametrize("ids,n,detail", [
    ("[0, 1]", 600, 'expected a list of block ids, got "[0, 1]"'),
    ({"a": 1}, 600, "expected a list of block ids"),
    (None, 600, "expected a list of block ids, got null"),
    ([0, 1.5], 600, "element 1: expected a non-negative integer block id, got 1.5"),
    ([0, "7"], 600, 'element 1: expected a non-negative integer block id, got "7"'),
    ([True, 1], 600, "element 0: expected a non-negative integer block id, got true"),
    ([0, -3], 600, "element 1: expected a non-negative integer block id, got -3"),
    ([0, 1, 2], 600, "3 block ids is more than input_length 600 needs: ceil(600 / 512) = 2"),
    ([0], 1025, "1 block ids is fewer than input_length 1025 needs: ceil(1025 / 512) = 3"),
    ([], 5, "0 block ids is fewer than input_length 5 needs"),
    ([4, 4], 600, "block id 4 appears twice"),
])
def test_malformed_hash_ids_name_the_line_and_the_field(tmp_path: Path, ids: object, n: int, detail: str) -> None:
    good = _line(0, 600, 1, [10, 11])
    bad = _line(7, n, 1, ids) if ids is not None else json.dumps(
        {"timestamp": 7, "input_length": n, "output_length": 1, "hash_ids": None})
    p = _write(tmp_path, good, "", bad)
    with pytest.raises(TraceFormatError) as ei:
        load_trace(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:3: field 'hash_ids': "), msg
    assert detail in msg, msg
    assert ei.value.line == 3 and ei.value.field == "hash_ids"


def test_a_block_id_that_moves_position_is_refused_naming_both_lines(tmp_path: Path) -> None:
    p = _write(tmp_path, _line(0, 600, 1, [5, 6]), _line(1, 900, 1, [6, 7]))
    with pytest.raises(TraceFormatError) as ei:
        load_trace(p)
    assert str(ei.value).endswith("m.jsonl:2: field 'hash_ids': block id 6 at position 0 was at position 1 on "
                                  "line 1 (an id names a prefix, so it keeps its position)")


# ---------------------------------------------------------------- length scaling


def test_scaling_lengths_scales_blocks_and_keeps_the_ids_the_prompt_covers() -> None:
    tr = Trace((TraceRequest(0.0, 1100, 1, (0, 1, 2)), TraceRequest(1.0, 1030, 1, (0, 1, 9)),
                TraceRequest(2.0, 20, 1, (3,))), "t", 512)
    s = tr.scale_lengths(1 / 16)
    assert s.block_tokens == 32  # 512 / 16
    # 1100 -> 69 tokens: blocks of 32, 32 and 5; 1030 -> 64: its third id covers nothing and is dropped
    assert [(r.input_tokens, r.hash_ids) for r in s] == [(69, (0, 1, 2)), (64, (0, 1)), (1, (3,))]
    assert tr.scale_lengths(1 / 10).block_tokens == 51  # 51.2, rounded half up
    assert tr.scale_lengths(1 / 2048).block_tokens == 1  # never below one token
    assert Trace((TraceRequest(0.0, 5, 1),)).scale_lengths(0.5).block_tokens is None


def test_reusable_tokens_count_leading_blocks_an_earlier_prompt_held() -> None:
    tr = Trace((TraceRequest(0.0, 10, 1, (0, 1, 2)),  # 4 + 4 + 2 tokens, all new
                TraceRequest(1.0, 12, 1, (0, 1, 2)),  # 4 + 4 reused, then 2 of block 2's 4 (only 2 were held)
                TraceRequest(2.0, 9, 1, (0, 5, 6)),  # block 0 reused, then a new branch
                TraceRequest(3.0, 6, 1, (7, 1)),  # block 1 after another parent: not the same prefix
                TraceRequest(4.0, 8, 1, None)), "t", 4)  # no ids: nothing reusable
    assert reusable_tokens(tr) == (4 + 4 + 2 + 4, 10 + 12 + 9 + 6 + 8)
    assert reusable_fraction(Trace(())) == 0.0


# ---------------------------------------------------------------- modes and sampling


def test_prefix_mode_defaults_to_trace_with_block_ids_and_unique_without() -> None:
    hashed = Trace((TraceRequest(0.0, 600, 1, (0, 1)), TraceRequest(1.0, 600, 1, (0, 2))), "m", 512)
    plain = Trace((TraceRequest(0.0, 600, 1), TraceRequest(1.0, 700, 1)), "azure")
    assert resolve_prefix_mode(None, hashed) == "trace" and resolve_prefix_mode(None, plain) == "unique"
    assert resolve_prefix_mode("unique", hashed) == "unique" and resolve_prefix_mode("multiturn", plain) == "multiturn"
    with pytest.raises(ValueError, match="--prefix-mode trace: azure has no block ids.*multiturn"):
        resolve_prefix_mode("trace", plain)
    with pytest.raises(ValueError, match="--prefix-mode: expected one of unique, trace, multiturn"):
        resolve_prefix_mode("shared", plain)
    assert not apply_prefix_mode(hashed, "unique").has_prefixes
    assert apply_prefix_mode(hashed, "trace") is hashed
    assert apply_prefix_mode(plain, "multiturn").block_tokens == 512


def test_sampling_prefix_groups_keeps_whole_groups_seeded() -> None:
    reqs = [TraceRequest(float(i), 600, 1, (i % 10, 100 + i)) for i in range(200)]
    tr = Trace(tuple(reqs), "t", 512)
    half = sample_prefix_groups(tr, 0.5, seed=3)
    roots = {r.hash_ids[0] for r in half}
    assert 0 < len(roots) < 10
    assert len(half) == 20 * len(roots)  # every request of a kept group, none of the others
    assert [r.arrival_s for r in half] == sorted(r.arrival_s for r in half)
    assert half == sample_prefix_groups(tr, 0.5, seed=3) and sample_prefix_groups(tr, 1.0) is tr
    assert {r.hash_ids[0] for r in sample_prefix_groups(tr, 0.5, seed=4)} != roots
    with pytest.raises(ValueError, match="--prefix-groups"):
        sample_prefix_groups(tr, 0.0)
    with pytest.raises(ValueError, match="no block ids"):
        sample_prefix_groups(tr.without_prefixes(), 0.5)


@needs_mooncake
def test_sampled_mooncake_keeps_its_long_range_sharing_at_a_replayable_size() -> None:
    tr = load_trace(MOONCAKE)
    assert reusable_fraction(tr.head(48)) == 0.0  # a short window shares nothing: reuse is long-range
    sampled = sample_prefix_groups(tr, 1 / 32, seed=0)
    assert len(sampled) == 105 and reusable_fraction(sampled) == pytest.approx(0.618, abs=1e-3)


# ---------------------------------------------------------------- the multi-turn generator


def _chat_trace(n: int = 300, seed: int = 1) -> Trace:
    import random

    rng = random.Random(seed)
    t, reqs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(2.0)
        reqs.append(TraceRequest(t, rng.randint(20, 6000), rng.randint(5, 400)))
    return Trace(tuple(reqs), "chat")


def test_multiturn_is_seeded_and_keeps_arrivals_and_lengths() -> None:
    trace = _chat_trace()
    a, turns = multiturn_trace(trace, MultiTurnConfig(seed=5))
    b, _ = multiturn_trace(trace, MultiTurnConfig(seed=5))
    c, _ = multiturn_trace(trace, MultiTurnConfig(seed=6))
    assert a == b and a.requests != c.requests
    assert a.block_tokens == 512 and all(r.hash_ids is not None for r in a)
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in a] == \
        [(r.arrival_s, r.input_tokens, r.output_tokens) for r in trace]
    assert all(len(r.hash_ids) == -(-r.input_tokens // 512) for r in a)
    summary = reuse_summary(a, turns)
    assert summary["continued"] > 0 and summary["opened"] > 0 and summary["standalone"] > 0
    assert summary["continued"] + summary["opened"] + summary["standalone"] == pytest.approx(1.0)
    assert 0 < summary["reusable_token_fraction"] < 1


def test_each_turn_is_the_previous_prompt_plus_its_answer_plus_a_new_message() -> None:
    cfg = MultiTurnConfig(system_prompt_tokens=1024, continue_probability=0.9, min_user_tokens=16, seed=2)
    trace, turns = multiturn_trace(_chat_trace(), cfg)
    last: dict[int, int] = {}  # conversation -> index of its previous turn
    checked = 0
    for i, (r, t) in enumerate(zip(trace, turns)):
        if t.conversation is None:  # standalone: too short for the system prompt, its own blocks
            assert r.input_tokens < 1024 + 16 and t.turn == 0 and t.user_tokens == r.input_tokens
            continue
        assert r.hash_ids[:2] == (0, 1)  # the shared system prompt: two 512-token blocks
        assert t.history_tokens + t.user_tokens == r.input_tokens and t.user_tokens >= 16
        if t.turn == 1:
            assert t.history_tokens == 1024 and t.conversation not in last
        else:
            prev = trace.requests[last[t.conversation]]
            assert t.turn == turns[last[t.conversation]].turn + 1
            assert t.history_tokens == prev.input_tokens + prev.output_tokens  # previous prompt + its answer
            n_prev = -(-prev.input_tokens // 512)
            assert r.hash_ids[:n_prev] == prev.hash_ids  # the previous prompt's blocks, its partial last one too
            checked += 1
        last[t.conversation] = i
    assert checked >= 10
    # standalone prompts and first turns after the system prompt share nothing with anyone else
    seen: set[int] = set()
    for r, t in zip(trace, turns):
        own = r.hash_ids if t.conversation is None else (r.hash_ids[2:] if t.turn == 1 else ())
        assert not seen & set(own)
        seen |= set(r.hash_ids)


def test_multiturn_reusable_share_matches_its_turns() -> None:
    cfg = MultiTurnConfig(system_prompt_tokens=512, continue_probability=1.0, seed=0)
    trace = Trace((TraceRequest(0.0, 600, 100), TraceRequest(1.0, 800, 10), TraceRequest(2.0, 700, 5),
                   TraceRequest(3.0, 100, 5)), "t")
    out, turns = multiturn_trace(trace, cfg)
    # 1: opens (system 512 + 88); 2: continues 1 (600 + 100 + 100); 3: too short to continue 2, opens; 4: standalone
    assert [(t.conversation, t.turn) for t in turns] == [(0, 1), (0, 2), (1, 1), (None, 0)]
    assert reusable_tokens(out) == (600 + 512, 600 + 800 + 700 + 100)  # turn 2 reuses all of turn 1, turn 3 the system


@pytest.mark.parametrize("kwargs,match", [
    ({"system_prompt_tokens": 1000}, "multiple of 512"), ({"system_prompt_tokens": -512}, "multiple of 512"),
    ({"continue_probability": 1.5}, r"\[0, 1\]"), ({"min_user_tokens": 0}, "min_user_tokens"),
    ({"max_idle_s": 0}, "max_idle_s"),
])
def test_bad_multiturn_settings_are_refused_by_name(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiTurnConfig(**kwargs)


def test_idle_conversations_take_no_more_turns() -> None:
    trace = Trace((TraceRequest(0.0, 600, 10), TraceRequest(700.0, 2000, 10)), "t")
    _, turns = multiturn_trace(trace, MultiTurnConfig(system_prompt_tokens=512, continue_probability=1.0,
                                                      max_idle_s=600.0))
    assert [t.turn for t in turns] == [1, 1]  # 700 s later the first conversation is closed


@needs_azure
def test_multiturn_on_the_azure_code_trace_gives_the_documented_share() -> None:
    trace, turns = multiturn_trace(load_trace(AZURE_CODE))
    s = reuse_summary(trace, turns)
    assert s["reusable_token_fraction"] == pytest.approx(0.44, abs=0.005)  # bench/multiturn.py's docstring
    assert (round(s["continued"], 2), round(s["opened"], 2), round(s["standalone"], 2)) == (0.29, 0.32, 0.39)
