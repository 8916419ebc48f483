"""Floating-point work of a prefill pass, and the GPUs' dense bf16 peaks: MFU for ``bench engine``.

MFU (model FLOPs utilisation) = the FLOPs the model must do / seconds / the chip's peak. What is
counted (:func:`prefill_flops`), as in the PaLM appendix and FlashAttention's causal accounting:

- every GEMM with weights: ``2 * tokens * (h*(q + 2kv) + q*h + 2*h*I + I*h)`` per layer (QKV,
  o_proj, gate/up, down);
- attention, causal: ``QK^T`` and ``PV`` are ``2 * d`` FLOPs each per (query, visible key) pair
  and head, and a causal prefill of ``n`` new tokens after ``c`` cached ones has
  ``n*c + n*(n+1)/2`` such pairs, so ``4 * d * heads * pairs`` per layer. The masked half of a
  square score matrix is not work the model needs and is not counted (a kernel that computes it
  anyway does not earn MFU for it). For Llama-3.1-8B this is about 4% of a prefill's FLOPs at
  2048 tokens and 13% at 8192;
- the LM head on the rows whose logits are wanted (the last token of each sequence):
  ``2 * rows * h * vocab``.

Norms, RoPE, the activation and residual adds are not counted (well under 1% of the total).

:data:`PEAK_BF16_DENSE_TFLOPS`: the vendor datasheets' dense (no 2:4 sparsity) BF16 tensor-core
peaks, at boost clock, matched against ``torch.cuda.get_device_name()``. These are the numbers an
MFU is quoted against; the matrix rate a machine reaches in practice is lower (an 8192^3 bf16 GEMM
ran at about 790 TFLOP/s on an H200), which ``gpu_check`` measures and reports beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from replicas.model.config import ModelConfig

#: (substring of the device name, dense bf16 TFLOP/s, where the number comes from); the first match
#: wins, so the more specific names come first.
PEAK_BF16_DENSE_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200 NVL", 835.5, "NVIDIA H200 NVL datasheet: 1,671 TFLOP/s bf16 with sparsity, halved"),
    ("H200", 989.4, "NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 with sparsity, halved"),
    ("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet: 1,671 TFLOP/s bf16 with sparsity, halved"),
    ("H100 PCIe", 756.5, "NVIDIA H100 PCIe datasheet: 1,513 TFLOP/s bf16 with sparsity, halved"),
    ("H100", 989.4, "NVIDIA H100 SXM datasheet: 1,979 TFLOP/s bf16 with sparsity, halved"),
    ("A100", 312.0, "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense"),
)


def detect_peak_tflops(device_name: str) -> tuple[float | None, str]:
    """``(dense bf16 peak TFLOP/s, source)`` for a CUDA device name; ``(None, why)`` if unknown."""
    for pattern, tflops, source in PEAK_BF16_DENSE_TFLOPS:
        if pattern.lower() in device_name.lower():
            return tflops, source
    known = ", ".join(p for p, _, _ in PEAK_BF16_DENSE_TFLOPS)
    return None, f"no datasheet peak for {device_name!r} (known: {known}); pass --peak-tflops"


@dataclass(frozen=True)
class PrefillFlops:
    """The FLOPs of one prefill pass, by part (see the module doc)."""

    linear: float
    attention: float
    lm_head: float

    @property
    def total(self) -> float:
        """Everything counted."""
        return self.linear + self.attention + self.lm_head


def attention_pairs(new_tokens: int, cached_tokens: int = 0, causal: bool = True) -> int:
    """(query, key) pairs of one head: causal ``n*c + n(n+1)/2``, else every query with every key."""
    n, c = new_tokens, cached_tokens
    return n * c + n * (n + 1) // 2 if causal else n * (n + c)


def prefill_flops(config: ModelConfig, new_tokens: int, cached_tokens: int = 0, logit_rows: int = 1,
                  causal: bool = True) -> PrefillFlops:
    """FLOPs of prefilling ``new_tokens`` of one sequence after ``cached_tokens`` (module doc)."""
    c = config
    h, inter = c.hidden_size, c.intermediate_size
    per_layer = h * c.q_size + 2 * h * c.kv_size + c.q_size * h + 3 * h * inter
    linear = 2.0 * new_tokens * per_layer * c.num_layers
    attention = 4.0 * c.head_dim * c.num_heads * attention_pairs(new_tokens, cached_tokens, causal) * c.num_layers
    return PrefillFlops(linear=linear, attention=attention, lm_head=2.0 * logit_rows * h * c.vocab_size)
