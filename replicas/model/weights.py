"""Loading HF safetensors checkpoints into fused per-layer weights.

Q, K and V projections are fused into one matrix, and so are the MLP's gate and up projections,
so each block runs two large GEMMs instead of five small ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from replicas.model.config import DTYPE_NAMES, ModelConfig
from replicas.model.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name (``float32``, ``bfloat16``, ``float16``) to torch."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


@dataclass
class LayerWeights:
    """One decoder layer's tensors, fused for the operator program."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class ModelWeights:
    """All tensors of a decoder, on one device in one dtype."""

    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor


class _TensorSource:
    """Tensor names -> files of a single-file or sharded safetensors checkpoint."""

    def __init__(self, model_dir: Path) -> None:
        single = model_dir / "model.safetensors"
        index = model_dir / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: field 'weight_map' missing or not valid JSON ({exc})") from exc
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: field 'weight_map' must be an object")
            for name, shard in weight_map.items():
                path = model_dir / str(shard)
                if not path.is_file():
                    raise CheckpointError(f"{index}: shard '{shard}' for tensor '{name}' is missing")
                self.files[name] = path
        elif single.is_file():
            with safe_open(str(single), framework="pt", device="cpu") as fh:
                self.files = {name: single for name in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        else:
            raise CheckpointError(
                f"{model_dir}: no model.safetensors or model.safetensors.index.json (only safetensors "
                "checkpoints are supported)"
            )
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        path = self.files.get(name)
        if path is None:
            raise CheckpointError(f"checkpoint is missing tensor '{name}'")
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from exc
            self._handles[path] = handle
        return handle.get_tensor(name)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._handles.clear()


def load_weights(
    model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> ModelWeights:
    """Read, validate and fuse every tensor of the checkpoint at ``model_dir``."""
    src = _TensorSource(Path(model_dir))
    c = config

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = src.get(name)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"tensor '{name}' has shape {tuple(tensor.shape)}, config.json implies {shape}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor '{name}' has dtype {tensor.dtype}; quantized checkpoints are unsupported")
        return tensor.to(device=device, dtype=dtype).contiguous()

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=0).contiguous()

    h, hd = c.hidden_size, c.head_dim
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        qkv = cat([
            take(p + "self_attn.q_proj.weight", (c.q_size, h)),
            take(p + "self_attn.k_proj.weight", (c.kv_size, h)),
            take(p + "self_attn.v_proj.weight", (c.kv_size, h)),
        ])
        qkv_bias = None
        if c.qkv_bias:
            qkv_bias = cat([
                take(p + "self_attn.q_proj.bias", (c.q_size,)),
                take(p + "self_attn.k_proj.bias", (c.kv_size,)),
                take(p + "self_attn.v_proj.bias", (c.kv_size,)),
            ])
        gate_up_bias = down_bias = None
        if c.mlp_bias:
            gate_up_bias = cat([
                take(p + "mlp.gate_proj.bias", (c.intermediate_size,)),
                take(p + "mlp.up_proj.bias", (c.intermediate_size,)),
            ])
            down_bias = take(p + "mlp.down_proj.bias", (h,))
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (h,)),
                qkv=qkv,
                qkv_bias=qkv_bias,
                q_norm=take(p + "self_attn.q_norm.weight", (hd,)) if c.qk_norm else None,
                k_norm=take(p + "self_attn.k_norm.weight", (hd,)) if c.qk_norm else None,
                o_proj=take(p + "self_attn.o_proj.weight", (h, c.q_size)),
                o_bias=take(p + "self_attn.o_proj.bias", (h,)) if c.o_bias else None,
                post_norm=take(p + "post_attention_layernorm.weight", (h,)),
                gate_up=cat([
                    take(p + "mlp.gate_proj.weight", (c.intermediate_size, h)),
                    take(p + "mlp.up_proj.weight", (c.intermediate_size, h)),
                ]),
                gate_up_bias=gate_up_bias,
                down=take(p + "mlp.down_proj.weight", (h, c.intermediate_size)),
                down_bias=down_bias,
            )
        )
    embed = take("model.embed_tokens.weight", (c.vocab_size, h))
    if "lm_head.weight" in src and not c.tie_word_embeddings:
        lm_head = take("lm_head.weight", (c.vocab_size, h))
    elif c.tie_word_embeddings:
        lm_head = embed
    else:
        raise CheckpointError("checkpoint is missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
    final_norm = take("model.norm.weight", (h,))
    src.close()
    return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def iter_parameters(weights: ModelWeights) -> Iterator[torch.Tensor]:
    """Every distinct tensor of ``weights`` (for memory accounting)."""
    seen: set[int] = set()
    for tensor in [weights.embed, weights.final_norm, weights.lm_head]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor
    for layer in weights.layers:
        for tensor in vars(layer).values():
            if tensor is not None:
                yield tensor
