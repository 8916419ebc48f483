"""``flowprefill bench sampling`` (bench/sampling_bench.py) on a tiny checkpoint: every variant at
every batch size, ratios against greedy, the JSON variants really constrained by the grammar, and
bad flags refused by name."""

from __future__ import annotations

import json

import pytest

from bench.sampling_bench import VARIANTS, SamplingBenchConfig, format_table, measure_sampling_steps
from replicas.model.decoder import DecoderModel
from replicas.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def report(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", seed=3, num_layers=2)
    cfg = SamplingBenchConfig(batch_sizes=(1, 3), prompt_tokens=20, steps=6, repeats=2)
    return measure_sampling_steps(DecoderModel.load(path), Tokenizer.from_dir(path), cfg, progress=False)


def test_every_variant_at_every_batch_size_with_ratios_to_greedy(report):
    assert set(report["by_batch"]) == {"1", "3"}
    for rows in report["by_batch"].values():
        assert set(rows) == set(VARIANTS)
        greedy = rows["greedy"]["step_ms"]
        assert rows["greedy"]["ratio_to_greedy"] == 1.0
        for row in rows.values():
            assert len(row["repeats"]["step_ms"]) == 2 and len(row["repeats"]["sample_ms"]) == 2
            assert row["step_ms_min"] <= row["step_ms"] <= row["step_ms_max"]
            assert row["ratio_to_greedy"] == pytest.approx(row["step_ms"] / greedy)
            assert 0 < row["sample_ms"] < row["step_ms"]  # sampling is part of the step
    json.dumps(report)  # JSON-ready
    assert "x greedy" in format_table(report)


def test_json_variants_follow_the_grammar(report):
    """Their tokens never left the grammar, and the text is a prefix of a JSON object."""
    texts = report["constrained_text"]
    assert set(texts) == {"json", "all"}
    for text in texts.values():
        assert text.lstrip().startswith("{")


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"batch_sizes": (0,)}, "--batch-sizes"), ({"batch_sizes": ()}, "--batch-sizes"),
    ({"variants": ("greedy", "beam")}, "--variants"), ({"variants": ("json",)}, "--variants"),
    ({"steps": 0}, "--steps"), ({"repeats": -1}, "--repeats"), ({"prompt_tokens": 0}, "--prompt-tokens"),
])
def test_bad_flags_are_refused_by_name(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        SamplingBenchConfig(**kwargs)
