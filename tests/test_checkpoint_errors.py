"""A bad checkpoint is refused at load time with the file or field named."""

import json

import pytest
from safetensors.torch import load_file, save_file

from replicas.model.config import ModelConfig
from replicas.model.decoder import DecoderModel
from replicas.model.errors import CheckpointError
from replicas.model.tiny import build_tiny_checkpoint


@pytest.fixture()
def ckpt(tmp_path):
    return build_tiny_checkpoint(tmp_path / "m", "qwen2", seed=1)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "'architectures'"),
        ({"hidden_size": None}, "'hidden_size'"),
        ({"num_hidden_layers": "two"}, "'num_hidden_layers'"),
        ({"num_key_value_heads": 3}, "'num_key_value_heads'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None}, "low_freq_factor"),
    ],
)
def test_bad_config_names_the_field(ckpt, changes, needle):
    _edit_config(ckpt, **changes)
    with pytest.raises(CheckpointError, match=needle) as err:
        DecoderModel.load(ckpt)
    assert "config.json" in str(err.value)


def test_missing_config_and_weights_name_the_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        DecoderModel.load(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        DecoderModel.load(ckpt)


def test_missing_tensor_and_wrong_shape_are_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    bias = tensors.pop("model.layers.1.self_attn.k_proj.bias")
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        DecoderModel.load(ckpt)
    tensors["model.layers.1.self_attn.k_proj.bias"] = bias[:-1]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj\.bias.*shape"):
        DecoderModel.load(ckpt)


def test_missing_shard_is_named(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "s", "llama", seed=1, num_shards=2)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        DecoderModel.load(path)


def test_architecture_specifics_are_read(tmp_path):
    qwen3 = ModelConfig.from_dir(build_tiny_checkpoint(tmp_path / "q3", "qwen3"))
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim != qwen3.hidden_size // qwen3.num_heads
    qwen2 = ModelConfig.from_dir(build_tiny_checkpoint(tmp_path / "q2", "qwen2"))
    assert qwen2.qkv_bias and not qwen2.qk_norm
    llama3 = ModelConfig.from_dir(build_tiny_checkpoint(tmp_path / "l3", "llama3"))
    assert llama3.rope.rope_type == "llama3" and llama3.rope.factor > 1
    assert llama3.num_kv_heads < llama3.num_heads  # GQA


def test_unknown_dtype_and_unavailable_device_are_clear(ckpt):
    with pytest.raises(ValueError, match="dtype"):
        DecoderModel.load(ckpt, dtype="int8")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            DecoderModel.load(ckpt, device="cuda")
