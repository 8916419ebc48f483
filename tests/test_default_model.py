"""The default SmolLM2-135M-Instruct model answers real questions through our engine."""

import pytest
import torch

from replicas.llm import OfflineEngine
from replicas.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(default_model_dir):
    return OfflineEngine(default_model_dir, kv_cache_bytes=256 << 20)


def test_capital_of_france_is_paris(engine):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    result = engine.generate([ids], [SamplingParams(max_tokens=32, temperature=0.0)])[0]
    assert "Paris" in result.text
    assert result.finish_reason == "stop"  # ended on <|im_end|>, not on the length cap
    assert engine.kv.allocator.num_free_blocks == engine.kv.allocator.num_blocks  # KV freed


def test_greedy_generation_matches_transformers(engine, default_model_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    ours = engine.generate([ids], [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)])[0]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert ours.token_ids == expected[0, len(ids):].tolist()


def test_stop_string_and_seeded_sampling(engine):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    stopped = engine.generate([ids], [SamplingParams(max_tokens=32, temperature=0.0, stop=(" Paris",))])[0]
    assert stopped.finish_reason == "stop" and stopped.text == "The capital of France is"
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=42)
    first = engine.generate([ids], [params])[0]
    again = engine.generate([ids, ids], [params, SamplingParams(max_tokens=5, temperature=1.0)])[0]
    assert first.token_ids == again.token_ids  # same seed, same tokens, whatever else is batched
