"""Tiny, seeded HF-format checkpoints for tests, written without transformers.

``build_tiny_checkpoint`` writes ``config.json``, safetensors weights (optionally sharded with an
index), a byte-level BPE ``tokenizer.json`` trained locally on a small built-in corpus,
``tokenizer_config.json`` with a ChatML template and ``generation_config.json``. The same arguments
always give byte-identical files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

#: arch name -> (``architectures[0]``, ``model_type``)
ARCHES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "llama3": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_CORPUS = """\
The morning train left the station a few minutes late, and most of the passengers did not mind.
A small dog slept under the bench while its owner read the news about the weather and the harvest.
Rain had fallen through the night, so the fields were green and the roads were still wet.
Students walked to the school with their books, talking about the test they would take that day.
The teacher asked a simple question: what is the capital of France? Everyone knew it was Paris.
In the kitchen, the cook cut onions, boiled water and added salt, pepper and a little butter.
Good software is tested often, measured with care and changed in small steps that are easy to review.
When the server is busy, requests wait in a queue until a worker is free to serve them.
Short requests should not wait behind long ones, so the scheduler may pause a long task and resume it.
Numbers like 1, 2, 3, 10, 42 and 2048 appear in logs, tables and reports every single day.
She wrote a letter to her brother, who lived by the sea and worked on a fishing boat.
The library opens at nine in the morning and closes at six in the evening, except on Sunday.
Water boils at one hundred degrees at sea level, but at a lower temperature high in the mountains.
He said that the best way to learn a language is to read, to listen and to speak it every day.
The model reads the prompt, builds its cache of keys and values, and then writes one token at a time.
Please answer in one sentence. Thank you for your help! Can you explain why the sky is blue?
The city has old stone bridges, narrow streets, busy markets and a park with tall trees.
After dinner they played cards, drank tea and told stories until the fire burned low.
"""


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE trained on the built-in corpus (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tok


@dataclass(frozen=True)
class _WeightSpec:
    """One tensor to generate: ``1 + N(0, std)`` for a norm (``offset`` 1), else ``N(0, std)``."""

    name: str
    shape: tuple[int, ...]
    std: float
    offset: float = 0.0


def _weight_specs(arch: str, v: dict[str, Any], init_std: float | None) -> list[_WeightSpec]:
    """Every tensor under its standard HF name, in the fixed generation order.

    ``init_std`` None keeps the tiny models' scales (0.08 for projections, 0.1 for embeddings and
    the LM head, 0.05 for biases); a value (0.02 for the 8B preset, like ``initializer_range``)
    is used for all of them, so that 32 layers of 4096 wide keep activations in a sane range.
    Norm weights are ``1 + N(0, 0.05)`` either way.
    """
    proj, embed, bias = (0.08, 0.1, 0.05) if init_std is None else (init_std,) * 3

    def normal(name: str, *shape: int, std: float = proj) -> _WeightSpec:
        return _WeightSpec(name, shape, std)

    def norm(name: str, size: int) -> _WeightSpec:
        return _WeightSpec(name, (size,), 0.05, 1.0)

    vocab, hidden, inter, head_dim = v["vocab_size"], v["hidden_size"], v["intermediate_size"], v["head_dim"]
    out = [normal("model.embed_tokens.weight", vocab, hidden, std=embed)]
    q_size, kv_size = v["num_heads"] * head_dim, v["num_kv_heads"] * head_dim
    for i in range(v["num_layers"]):
        p = f"model.layers.{i}."
        out.append(norm(p + "input_layernorm.weight", hidden))
        out.append(normal(p + "self_attn.q_proj.weight", q_size, hidden))
        out.append(normal(p + "self_attn.k_proj.weight", kv_size, hidden))
        out.append(normal(p + "self_attn.v_proj.weight", kv_size, hidden))
        out.append(normal(p + "self_attn.o_proj.weight", hidden, q_size))
        if arch == "qwen2":
            out.append(normal(p + "self_attn.q_proj.bias", q_size, std=bias))
            out.append(normal(p + "self_attn.k_proj.bias", kv_size, std=bias))
            out.append(normal(p + "self_attn.v_proj.bias", kv_size, std=bias))
        if arch == "qwen3":
            out.append(norm(p + "self_attn.q_norm.weight", head_dim))
            out.append(norm(p + "self_attn.k_norm.weight", head_dim))
        out.append(norm(p + "post_attention_layernorm.weight", hidden))
        out.append(normal(p + "mlp.gate_proj.weight", inter, hidden))
        out.append(normal(p + "mlp.up_proj.weight", inter, hidden))
        out.append(normal(p + "mlp.down_proj.weight", hidden, inter))
    out.append(norm("model.norm.weight", hidden))
    if not v["tie_word_embeddings"]:
        out.append(normal("lm_head.weight", vocab, hidden, std=embed))
    return out


def _generate(spec: _WeightSpec, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """One seeded tensor, drawn in float32 on the generator's device, cast to ``dtype``, on the CPU."""
    t = torch.randn(*spec.shape, generator=gen, device=gen.device) * spec.std
    if spec.offset:
        t = spec.offset + t
    return t.to(dtype).contiguous().cpu()


def _config(arch: str, **v: Any) -> dict[str, Any]:
    """``config.json`` readable by transformers 5 (``rope_parameters``) and older readers."""
    architecture, model_type = ARCHES[arch]
    rope_scaling = None
    if arch == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": v["original_max_position_embeddings"],
        }
    rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": v["rope_theta"]}
    cfg: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": v["vocab_size"],
        "hidden_size": v["hidden_size"],
        "intermediate_size": v["intermediate_size"],
        "num_hidden_layers": v["num_layers"],
        "num_attention_heads": v["num_heads"],
        "num_key_value_heads": v["num_kv_heads"],
        "head_dim": v["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": v["max_position_embeddings"],
        "rms_norm_eps": v["rms_norm_eps"],
        "rope_theta": v["rope_theta"],
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": v["tie_word_embeddings"],
        "bos_token_id": v["bos_token_id"],
        "eos_token_id": v["eos_token_id"],
        "pad_token_id": v["bos_token_id"],
        "torch_dtype": v["dtype"],
        "dtype": v["dtype"],
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if arch in ("llama", "llama3"):
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "mistral":
        cfg.update(sliding_window=None)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=v["num_layers"])
        if arch == "qwen3":
            cfg.update(attention_bias=False)
    return cfg


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _shard_groups(specs: list[_WeightSpec], element_size: int, num_shards: int) -> list[list[_WeightSpec]]:
    """Split tensors, in generation order, into ``num_shards`` groups of about equal bytes."""
    if num_shards > len(specs):
        raise ValueError(f"num_shards={num_shards} is more than the {len(specs)} tensors")
    sizes = [math.prod(s.shape) * element_size for s in specs]
    total = sum(sizes)
    groups: list[list[_WeightSpec]] = [[] for _ in range(num_shards)]
    done, shard = 0, 0
    for idx, (spec, size) in enumerate(zip(specs, sizes)):
        left = len(specs) - idx
        # move on when this shard has its share, but leave at least one tensor per remaining shard
        if (
            groups[shard]
            and shard < num_shards - 1
            and (done >= total * (shard + 1) / num_shards or left <= num_shards - 1 - shard)
        ):
            shard += 1
        groups[shard].append(spec)
        done += size
    return groups


def _save_weights(out: Path, specs: list[_WeightSpec], gen: torch.Generator, dtype: torch.dtype,
                  num_shards: int) -> int:
    """Generate and write the weights one shard at a time (host memory holds one shard); returns bytes.

    Tensors are drawn in generation order whatever the sharding, so the values depend only on the
    seed (and the generator's device), not on ``num_shards``.
    """
    meta = {"format": "pt"}
    for stale in out.glob("model*.safetensors*"):  # an earlier build with another shard count
        stale.unlink()
    element = torch.empty(0, dtype=dtype).element_size()
    total = sum(math.prod(s.shape) for s in specs) * element
    if num_shards == 1:
        save_file({s.name: _generate(s, gen, dtype) for s in specs}, str(out / "model.safetensors"), metadata=meta)
        return total
    weight_map: dict[str, str] = {}
    for k, group in enumerate(_shard_groups(specs, element, num_shards), start=1):
        fname = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
        save_file({s.name: _generate(s, gen, dtype) for s in group}, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys((s.name for s in group), fname))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / "model.safetensors.index.json", index)
    return total


def build_tiny_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: str = "float32",
    tie_word_embeddings: bool = True,
    num_shards: int = 1,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    head_dim: int | None = None,
    vocab_size: int = 448,
    max_position_embeddings: int = 2048,
    rms_norm_eps: float = 1e-6,
    rope_theta: float = 10000.0,
    original_max_position_embeddings: int | None = None,
    model_vocab_size: int | None = None,
    init_std: float | None = None,
    device: str = "cpu",
) -> Path:
    """Write a seeded tiny HF checkpoint of ``arch`` into ``out_dir`` and return its path.

    ``arch`` is one of ``llama``, ``llama3`` (llama3 RoPE scaling), ``mistral``, ``qwen2`` (q/k/v
    biases) or ``qwen3`` (per-head q/k RMSNorm, ``head_dim`` defaults to ``2 * hidden/heads``).
    ``vocab_size`` is the BPE training target; ``config.json`` gets the tokenizer's real size,
    unless ``model_vocab_size`` pads the model's vocabulary (embedding and LM-head rows) past it,
    as a full-size shape needs (Llama 3's 128256): ids past the tokenizer's are valid model inputs
    that the tokenizer never produces. ``original_max_position_embeddings`` (llama3 RoPE scaling)
    defaults to ``max_position_embeddings // 8``; ``init_std`` see :func:`_weight_specs`.

    ``device`` is where the random weights are drawn (``cuda``: a full-size model's gigabytes in
    seconds); they are written one shard at a time. The same arguments give byte-identical files
    on the same kind of device; CPU and CUDA generators draw different numbers.
    :data:`PRESETS` holds full-size shapes (:func:`build_preset_checkpoint`).
    """
    if arch not in ARCHES:
        raise ValueError(f"arch {arch!r} is not supported; supported: {', '.join(ARCHES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {', '.join(_DTYPES)}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    if head_dim is None:
        head_dim = hidden_size // num_heads * (2 if arch == "qwen3" else 1)
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if arch != "llama3" and original_max_position_embeddings is not None:
        raise ValueError("original_max_position_embeddings applies to arch 'llama3' (llama3 RoPE scaling) only")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(vocab_size)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if model_vocab_size is not None:
        if model_vocab_size < vocab:
            raise ValueError(f"model_vocab_size ({model_vocab_size}) is below the tokenizer's {vocab} tokens")
        vocab = model_vocab_size
    bos_id, eos_id = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.save(str(out / "tokenizer.json"))

    sizes = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings,
    )
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    _save_weights(out, _weight_specs(arch, sizes, init_std), gen, _DTYPES[dtype], num_shards)
    config = _config(
        arch,
        **sizes,
        max_position_embeddings=max_position_embeddings,
        original_max_position_embeddings=original_max_position_embeddings or max_position_embeddings // 8,
        rms_norm_eps=rms_norm_eps,
        rope_theta=float(rope_theta),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        dtype=dtype,
    )
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": [eos_id, bos_id], "pad_token_id": bos_id},
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": BOS_TOKEN,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_position_embeddings,
            "chat_template": CHATML_TEMPLATE,
        },
    )
    return out


#: Full-size shapes with random weights (no download): ``build_preset_checkpoint(DIR, NAME)``.
#: ``llama3-8b`` is Llama-3.1-8B's config.json (GQA 32/8 heads, llama3 RoPE scaling, untied LM
#: head, vocabulary 128256 past the tiny tokenizer's), about 16 GB in bfloat16, in 4 shards.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        arch="llama3", dtype="bfloat16", tie_word_embeddings=False, num_shards=4, hidden_size=4096,
        num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336, head_dim=128,
        model_vocab_size=128256, max_position_embeddings=131072, original_max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, init_std=0.02,
    ),
}


def preset_parameters(name: str, **overrides: Any) -> int:
    """Parameter count of preset ``name`` with ``overrides`` (as :func:`build_preset_checkpoint`), unbuilt."""
    v = {**PRESETS[name], **overrides}
    vocab, h, inter, hd = v["model_vocab_size"], v["hidden_size"], v["intermediate_size"], v["head_dim"]
    q, kv = v["num_heads"] * hd, v["num_kv_heads"] * hd
    layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
    return vocab * h * (1 if v["tie_word_embeddings"] else 2) + v["num_layers"] * layer + h


def build_preset_checkpoint(out_dir: str | Path, name: str, **overrides: Any) -> Path:
    """:func:`build_tiny_checkpoint` with the shapes of ``PRESETS[name]`` (``overrides`` win, e.g. ``device``)."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is unknown; known: {', '.join(PRESETS)}")
    return build_tiny_checkpoint(out_dir, **{**PRESETS[name], **overrides})
