"""MFU's numerator and denominator: the FLOPs counted per prefill, and the GPU peaks by device name."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import attention_pairs, detect_peak_tflops, prefill_flops
from replicas.executor import PreemptibleExecutor
from replicas.kv_cache import PagedKVCache
from replicas.model.config import ModelConfig
from replicas.model.decoder import DecoderModel
from replicas.model.tiny import PRESETS, build_preset_checkpoint
from replicas.programs import PrefillItem, prefill_program


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
])
def test_peak_is_the_datasheet_dense_bf16_rate_of_the_device_named(name, tflops):
    peak, source = detect_peak_tflops(name)
    assert peak == tflops and "datasheet" in source


def test_an_unknown_device_has_no_peak_and_says_how_to_give_one():
    peak, why = detect_peak_tflops("NVIDIA GeForce RTX 4090")
    assert peak is None and "--peak-tflops" in why


def test_causal_pairs_add_up_over_chunks():
    assert attention_pairs(4) == 1 + 2 + 3 + 4
    assert attention_pairs(3, 5) == 6 + 7 + 8
    assert attention_pairs(4, causal=False) == 16
    assert attention_pairs(100) == attention_pairs(40) + attention_pairs(60, 40)


def test_8b_prefill_flops_are_twice_the_matmul_parameters_per_token_plus_attention(tmp_path):
    path = build_preset_checkpoint(tmp_path / "cfg", "llama3-8b", num_layers=1, hidden_size=64, num_heads=8,
                                   num_kv_heads=2, head_dim=8, intermediate_size=64, model_vocab_size=500)
    mini = ModelConfig.from_dir(path)
    v = PRESETS["llama3-8b"]
    config = ModelConfig(**{**vars(mini), "hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8,
                            "head_dim": 128, "intermediate_size": 14336, "vocab_size": v["model_vocab_size"]})
    f = prefill_flops(config, 2048)
    matmul_params = 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336)  # 6.98e9 of the 8.03e9 parameters
    assert f.linear == 2 * 2048 * matmul_params
    assert f.attention == 4 * 128 * 32 * (2048 * 2049 // 2) * 32
    assert f.lm_head == 2 * 4096 * 128256
    assert 0.03 < f.attention / f.total < 0.04  # attention is about 4% of it at 2048 tokens, 13% at 8192
    assert 0.12 < prefill_flops(config, 8192).attention / prefill_flops(config, 8192).total < 0.14


def test_counted_gemm_flops_match_torchs_flop_counter_on_a_real_pass(tiny_checkpoint_factory):
    """torch's counter sees every GEMM the pass runs (not CPU attention, which it has no formula
    for): ours must count exactly those, linear layers and the LM head on the last token."""
    model = DecoderModel.load(tiny_checkpoint_factory("qwen3", seed=2, num_layers=3, tie_word_embeddings=False))
    n = 37
    kv = PagedKVCache(model.kv_spec(), num_blocks=8)
    kv.allocator.ensure_capacity(0, n)
    model.small_rows_max = model.small_rows_max_lm_head = 0  # plain GEMMs (the small-row path is an mm too)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        PreemptibleExecutor("none").run_to_completion(prefill_program(model, kv, [PrefillItem(0, list(range(n)))]))
    f = prefill_flops(model.config, n)
    assert counter.get_total_flops() == f.linear + f.lm_head
