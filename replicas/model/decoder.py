"""A Llama-family decoder written as a program of operators.

:meth:`DecoderModel.forward` is a generator: it yields a :class:`Boundary` after each operator
and returns the logits. Whoever drives it decides at which boundaries it may stop; a suspended
generator keeps its hidden states and residual in its frame, and the KV it already wrote stays
in the paged cache, so resuming needs no recompute and no copies. This module knows nothing of
scheduling: it only says where a pass can be cut.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from enum import IntEnum
from pathlib import Path

import torch
import torch.nn.functional as F

from replicas.kv_cache import KVCacheSpec, PagedKVCache
from replicas.model.batch import ForwardBatch
from replicas.model.config import ModelConfig
from replicas.model.rope import RotaryTable, apply_rotary
from replicas.model.weights import LayerWeights, ModelWeights, iter_parameters, load_weights, parse_dtype


class Boundary(IntEnum):
    """How coarse a point between operators is: each level includes the finer ones' points."""

    OP = 0  # after a GEMM or the attention kernel
    BLOCK = 1  # after the attention block and after the MLP block (the paper's default)
    LAYER = 2  # after a whole decoder layer


ForwardProgram = Generator[Boundary, None, torch.Tensor]

# On CPU, MKL's sgemm packs the whole weight matrix on every call, which for a decode step's few rows
# costs more than the multiply: a step of 2-4 sequences took twice as long as one of 1 sequence on the
# 2-core dev machine. Multiplying ``W @ x.T`` instead (the few rows become the small N side) skips that
# and halved those steps (``bench engine`` reports the decode curve). Row counts up to these limits take
# that path; beyond them the plain GEMM is as fast or faster. The vocabulary projection is one large
# matrix and profits up to more rows than the layers' small ones.
CPU_SMALL_ROWS_MAX = 7
CPU_SMALL_ROWS_MAX_LM_HEAD = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, small_rows_max: int) -> torch.Tensor:
    """``F.linear`` for a 2-D ``x``; with 2 to ``small_rows_max`` rows computed as ``(W @ x.T).T``."""
    if 2 <= x.shape[0] <= small_rows_max:
        out = torch.mm(weight, x.t()).t().contiguous()
        return out if bias is None else out.add_(bias)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as the reference implementations do."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class DecoderModel:
    """Weights plus the operator program of one decoder (no scheduling, no Ray)."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, device: torch.device, dtype: torch.dtype,
                 name: str = "model") -> None:
        self.config = config
        self.weights = weights
        self.device = device
        self.dtype = dtype
        self.name = name
        self.rotary = RotaryTable(config.rope, config.head_dim, min(config.max_position_embeddings, 8192), device)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        on_cpu = device.type == "cpu"
        self.small_rows_max = CPU_SMALL_ROWS_MAX if on_cpu else 0
        self.small_rows_max_lm_head = CPU_SMALL_ROWS_MAX_LM_HEAD if on_cpu else 0

    @classmethod
    def load(cls, model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> DecoderModel:
        """Load an HF checkpoint directory onto ``device`` in ``dtype``."""
        config = ModelConfig.from_dir(model_dir)
        torch_dtype = parse_dtype(dtype)
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        weights = load_weights(model_dir, config, torch_dtype, dev)
        return cls(config, weights, dev, torch_dtype, name=Path(model_dir).name)

    @property
    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        return sum(t.numel() for t in iter_parameters(self.weights))

    def kv_spec(self, block_size: int = 16) -> KVCacheSpec:
        """The KV cache shape this model needs."""
        c = self.config
        return KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype, block_size)

    def forward(self, batch: ForwardBatch, kv: PagedKVCache) -> ForwardProgram:
        """The operator program of one pass; returns float32 logits ``[len(logit_rows), vocab]``."""
        w, eps, small = self.weights, self.config.rms_norm_eps, self.small_rows_max
        hidden = F.embedding(batch.input_ids, w.embed)
        cos, sin = self.rotary.lookup(batch.positions, self.dtype)
        yield Boundary.OP
        for index, layer in enumerate(w.layers):
            residual = hidden
            qkv = linear(rms_norm(hidden, layer.input_norm, eps), layer.qkv, layer.qkv_bias, small)
            yield Boundary.OP
            attn = self._attention(index, layer, qkv, cos, sin, batch, kv)
            yield Boundary.OP
            hidden = residual + linear(attn, layer.o_proj, layer.o_bias, small)
            yield Boundary.BLOCK
            residual = hidden
            act = self._gate_up(rms_norm(hidden, layer.post_norm, eps), layer)
            yield Boundary.OP
            hidden = residual + linear(act, layer.down, layer.down_bias, small)
            yield Boundary.LAYER
        rows = hidden.index_select(0, batch.logit_rows)
        return linear(rms_norm(rows, w.final_norm, eps), w.lm_head, None, self.small_rows_max_lm_head).float()

    def _gate_up(self, x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        """``silu(x W_gate) * (x W_up)``, activation in place.

        On CPU the fused weight runs as two GEMMs over its row halves (contiguous views, no copy):
        MKL multiplies the two ``[I, h]`` halves 2-4% faster than one ``[2I, h]`` matrix, and the
        halves come out contiguous for the activation. On accelerators one fused GEMM is better.
        """
        size, small = self.config.intermediate_size, self.small_rows_max
        if self.device.type == "cpu":
            bias = layer.gate_up_bias
            gate = linear(x, layer.gate_up[:size], None if bias is None else bias[:size], small)
            up = linear(x, layer.gate_up[size:], None if bias is None else bias[size:], small)
        else:
            gate, up = F.linear(x, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
        return F.silu(gate, inplace=True).mul_(up)

    def _attention(
        self, index: int, layer: LayerWeights, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        batch: ForwardBatch, kv: PagedKVCache,
    ) -> torch.Tensor:
        """QK-norm, RoPE, KV write and attention for every segment of the pass."""
        c = self.config
        tokens = qkv.shape[0]
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.reshape(tokens, c.num_heads, c.head_dim)
        k = k.reshape(tokens, c.num_kv_heads, c.head_dim)
        v = v.reshape(tokens, c.num_kv_heads, c.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q = rms_norm(q, layer.q_norm, c.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, c.rms_norm_eps)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        kv.write(index, batch.write_slots, k, v)
        if batch.decode_slots is not None:
            return self._decode_attention(index, q, batch, kv)
        outs = []
        for i, seg in enumerate(batch.segments):
            lo, hi = batch.offsets[i], batch.offsets[i + 1]
            context = batch.context_slots[i]
            if context is None:
                keys, values = k[lo:hi], v[lo:hi]
            else:
                keys, values = kv.gather(index, context)
            mask = _causal_mask(seg.start, seg.end, c.sliding_window, q.device)
            out = F.scaled_dot_product_attention(
                q[lo:hi].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                attn_mask=mask, is_causal=mask is None and hi - lo > 1 and seg.start == 0,
                scale=self.scale, enable_gqa=True,
            )
            outs.append(out[0].transpose(0, 1).reshape(hi - lo, c.q_size))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _decode_attention(self, index: int, q: torch.Tensor, batch: ForwardBatch, kv: PagedKVCache) -> torch.Tensor:
        """One query token per sequence against its padded context, in a single kernel call."""
        assert batch.decode_slots is not None
        keys, values = kv.gather(index, batch.decode_slots)  # [B, L, kv_heads, head_dim]
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=batch.decode_mask, scale=self.scale, enable_gqa=True,
        )
        return out.reshape(q.shape[0], self.config.q_size)


def _causal_mask(start: int, end: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Mask for queries ``[start, end)`` over keys ``[0, end)``; None when a plain causal kernel fits."""
    windowed = window is not None and end > window
    if not windowed and (start == 0 or end - start == 1):
        return None
    q_pos = torch.arange(start, end, device=device)[:, None]
    k_pos = torch.arange(0, end, device=device)[None, :]
    allowed = k_pos <= q_pos
    if windowed:
        allowed &= k_pos > q_pos - window
    return allowed
