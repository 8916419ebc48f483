"""Model configuration read from an HF checkpoint's ``config.json``.

Only what the operator program needs is kept, validated field by field so that a bad checkpoint
fails at load time with the field named, never later inside a forward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replicas.model.errors import CheckpointError

#: Parameter dtypes a checkpoint may be loaded in (torch's names; :mod:`replicas.model.weights` maps them).
DTYPE_NAMES = ("float32", "bfloat16", "float16")

#: ``architectures[0]`` -> family. All are Llama-shaped decoders with small differences.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (``rope_theta`` plus optional scaling)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: str

    @property
    def q_size(self) -> int:
        """Width of the query projection output."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projection outputs."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read and validate ``config.json`` in ``model_dir``."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (an HF model directory needs config.json)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Validate a parsed ``config.json``; errors name ``source`` and the field."""
        f = _Fields(raw, source)
        archs = f.get("architectures", list, required=False) or []
        model_type = f.get("model_type", str, required=False)
        family = None
        for arch in archs:
            family = SUPPORTED_ARCHITECTURES.get(arch, family)
        if family is None and model_type in SUPPORTED_ARCHITECTURES.values():
            family = model_type
        if family is None:
            raise CheckpointError(
                f"{source}: field 'architectures' = {archs!r} (model_type {model_type!r}) is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = f.positive_int("hidden_size")
        heads = f.positive_int("num_attention_heads")
        kv_heads = f.positive_int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise CheckpointError(
                f"{source}: field 'num_key_value_heads' ({kv_heads}) must divide "
                f"num_attention_heads ({heads})"
            )
        head_dim = f.get("head_dim", int, required=False)
        if head_dim is None:
            if hidden % heads:
                raise CheckpointError(f"{source}: field 'hidden_size' is not divisible by the head count")
            head_dim = hidden // heads
        if head_dim <= 0 or head_dim % 2:
            raise CheckpointError(f"{source}: field 'head_dim' must be a positive even number, got {head_dim}")
        attention_bias = bool(f.get("attention_bias", bool, required=False) or False)
        sliding = None
        if family == "mistral" or f.get("use_sliding_window", bool, required=False):
            sliding = f.get("sliding_window", int, required=False)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        return cls(
            family=family,
            vocab_size=f.positive_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=f.positive_int("intermediate_size"),
            num_layers=f.positive_int("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=f.positive_float("rms_norm_eps", default=1e-6),
            rope=_rope_config(f, raw, source),
            max_position_embeddings=f.positive_int("max_position_embeddings", default=4096),
            tie_word_embeddings=bool(f.get("tie_word_embeddings", bool, required=False) or False),
            qkv_bias=attention_bias or family == "qwen2",
            o_bias=attention_bias and family == "llama",
            mlp_bias=bool(f.get("mlp_bias", bool, required=False) or False),
            qk_norm=family == "qwen3",
            sliding_window=sliding,
            eos_token_ids=eos_ids,
            checkpoint_dtype=str(dtype),
        )


class _Fields:
    """Typed access to config fields with errors that name the field."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def get(self, name: str, kind: type, required: bool = True, default: Any = None) -> Any:  # noqa: ANN401
        value = self.raw.get(name, default)
        if value is None:
            if required:
                raise CheckpointError(f"{self.source}: missing field '{name}'")
            return None
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise CheckpointError(
                f"{self.source}: field '{name}' must be {kind.__name__}, got {type(value).__name__}"
            )
        return value

    def positive_int(self, name: str, default: int | None = None) -> int:
        value = self.get(name, int, required=default is None, default=default)
        if value <= 0:
            raise CheckpointError(f"{self.source}: field '{name}' must be positive, got {value}")
        return value

    def positive_float(self, name: str, default: float | None = None) -> float:
        value = float(self.get(name, float, required=default is None, default=default))
        if not value > 0:
            raise CheckpointError(f"{self.source}: field '{name}' must be positive, got {value}")
        return value


def _rope_config(f: _Fields, raw: dict[str, Any], source: str) -> RopeConfig:
    """Read RoPE settings from either the legacy or the transformers-5 layout."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{source}: field 'rope_parameters' must be an object")
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(f"{source}: field 'rope_scaling' must be an object or null")
    merged: dict[str, Any] = {**(scaling or {}), **(params or {})}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise CheckpointError(f"{source}: field 'rope_theta' must be a positive number, got {theta!r}")
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{source}: field 'rope_scaling.rope_type' = {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    sub = _Fields(merged, f"{source} (rope_scaling)")
    if rope_type == "linear":
        return RopeConfig(theta=float(theta), rope_type="linear", factor=sub.positive_float("factor"))
    return RopeConfig(
        theta=float(theta),
        rope_type="llama3",
        factor=sub.positive_float("factor"),
        low_freq_factor=sub.positive_float("low_freq_factor"),
        high_freq_factor=sub.positive_float("high_freq_factor"),
        original_max_position_embeddings=sub.positive_int("original_max_position_embeddings"),
    )
