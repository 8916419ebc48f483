"""What handing a request's KV from a prefill to a decode replica costs in the simulator.

A handover of an ``n``-token prompt moves ``n * bytes_per_token`` bytes (keys and values of every
layer: ``2 * layers * kv_heads * head_dim * dtype bytes``, :func:`kv_bytes_per_token` from the
model's ``config.json``) and takes ``latency_s + bytes / bandwidth_bytes_per_s`` from the first
token on the prefill replica to the request's admission on the decode replica. The transfer runs
beside both replicas' compute (the real prefill replica overlaps it with its next prefill), so it
delays only the request itself.

The defaults come from this CPU box's ``flowprefill bench handover`` (SmolLM2-135M fp32 through a
local Ray object store, first token to decode admission, p50): 2048 tokens (94.4 MB) 378 ms in the
run the issue quotes; 32 tokens (1.5 MB) 17 ms, 512 (23.6 MB) 109 ms, 2048 480 ms on 2026-12-04
with other work on the two cores. 15 ms fixed and 250 MB/s give 21, 109 and 392 ms. A GPU
deployment passes its own (NVLink or RDMA: tens of GB/s): ``--kv-bandwidth-mbps``, ``--kv-latency-ms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8": 1, "fp8": 1}
DEFAULT_LATENCY_S = 0.015
DEFAULT_BANDWIDTH_BYTES_PER_S = 250e6
SMOLLM2_135M_FP32_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # 46,080: 2048 tokens = 94.4 MB, as bench handover reports


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: str = "float32") -> int:
    """KV bytes one prompt token occupies: keys and values of every layer at ``dtype``."""
    key = dtype.removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ValueError(f"dtype: unknown {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if value < 1:
            raise ValueError(f"kv_bytes_per_token {name}: need a positive integer, got {value!r}")
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[key]


def model_kv_bytes_per_token(model_dir: str | Path, dtype: str = "float32") -> int:
    """:func:`kv_bytes_per_token` of a checkpoint directory (its ``config.json``, read by the engine's
    own :class:`~replicas.model.config.ModelConfig`)."""
    from replicas.model.config import ModelConfig

    c = ModelConfig.from_dir(model_dir)
    return kv_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, dtype)


@dataclass(frozen=True)
class KVTransferCost:
    """``latency_s + tokens * bytes_per_token / bandwidth_bytes_per_s`` seconds per handover."""

    bytes_per_token: int = SMOLLM2_135M_FP32_BYTES_PER_TOKEN
    bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH_BYTES_PER_S
    latency_s: float = DEFAULT_LATENCY_S

    def __post_init__(self) -> None:
        if isinstance(self.bytes_per_token, bool) or not isinstance(self.bytes_per_token, int) \
                or self.bytes_per_token < 0:
            raise ValueError(f"kv bytes_per_token: need an integer >= 0, got {self.bytes_per_token!r}")
        if not (math.isfinite(self.bandwidth_bytes_per_s) and self.bandwidth_bytes_per_s > 0):
            raise ValueError(f"kv bandwidth: need a positive finite bytes/s, got {self.bandwidth_bytes_per_s!r}")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"kv latency: need finite seconds >= 0, got {self.latency_s!r}")

    def nbytes(self, tokens: int) -> int:
        """Bytes handed over for a ``tokens``-token prompt."""
        return tokens * self.bytes_per_token

    def seconds(self, tokens: int) -> float:
        """From the first token on the prefill replica to admission on the decode replica."""
        return self.latency_s + self.nbytes(tokens) / self.bandwidth_bytes_per_s
