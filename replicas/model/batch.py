"""One forward pass's inputs: packed segments of several sequences.

A *segment* is a contiguous run of a sequence's tokens that this pass computes, after ``start``
tokens whose KV is already cached. Prefill chunks are long segments, decode steps are segments
of one token; both go through the same operator program.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from replicas.kv_blocks import BlockAllocator
from replicas.kv_cache import slot_indices


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, start + len(token_ids))`` of sequence ``seq_id``; ``want_logits``: the last
    token's logits are returned, ``all_logits``: every token's are (prompt logprobs), in order."""

    seq_id: int
    token_ids: Sequence[int]
    start: int
    want_logits: bool = True
    all_logits: bool = False

    @property
    def end(self) -> int:
        """Position one past the segment's last token."""
        return self.start + len(self.token_ids)


@dataclass
class ForwardBatch:
    """Tensors for one pass, built from segments and the KV block tables."""

    segments: list[Segment]
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T] where this pass's keys/values go
    offsets: list[int]  # segment i covers packed rows [offsets[i], offsets[i + 1])
    logit_rows: torch.Tensor  # rows of the packed batch whose logits are returned
    logit_seq_ids: list[int]
    # Decode (every segment one token): a padded table of all context slots per sequence.
    decode_slots: torch.Tensor | None = None  # [B, L]
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] True = attend
    context_slots: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens computed by this pass."""
        return int(self.input_ids.numel())

    @property
    def is_decode(self) -> bool:
        """Whether every segment is a single token (the batched decode path)."""
        return self.decode_slots is not None


def build_forward_batch(
    segments: Sequence[Segment], allocator: BlockAllocator, device: torch.device,
    sliding_window: int | None = None,
) -> ForwardBatch:
    """Pack ``segments`` into one pass; their KV capacity must already be allocated."""
    if not segments:
        raise ValueError("a forward batch needs at least one segment")
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    offsets = [0]
    logit_rows: list[int] = []
    logit_seq_ids: list[int] = []
    context: list[torch.Tensor | None] = []
    for seg in segments:
        n = len(seg.token_ids)
        if n == 0:
            raise ValueError(f"segment of sequence {seg.seq_id} is empty")
        ids.extend(seg.token_ids)
        positions.append(torch.arange(seg.start, seg.end, dtype=torch.int64))
        slots.append(slot_indices(allocator, seg.seq_id, seg.start, seg.end))
        context.append(slot_indices(allocator, seg.seq_id, 0, seg.end) if seg.start > 0 else None)
        offsets.append(offsets[-1] + n)
        if seg.all_logits:
            logit_rows.extend(range(offsets[-2], offsets[-1]))
            logit_seq_ids.extend([seg.seq_id] * n)
        elif seg.want_logits:
            logit_rows.append(offsets[-1] - 1)
            logit_seq_ids.append(seg.seq_id)
    batch = ForwardBatch(
        segments=list(segments),
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.cat(positions).to(device),
        write_slots=torch.cat(slots).to(device),
        offsets=offsets,
        logit_rows=torch.tensor(logit_rows, dtype=torch.int64, device=device),
        logit_seq_ids=logit_seq_ids,
        context_slots=[c.to(device) if c is not None else None for c in context],
    )
    if all(len(s.token_ids) == 1 for s in segments) and len(segments) > 1:
        _add_decode_table(batch, sliding_window, device)
    return batch


def _add_decode_table(batch: ForwardBatch, sliding_window: int | None, device: torch.device) -> None:
    """Pad every sequence's context slots into one ``[B, L]`` table plus a mask."""
    rows = []
    for i, ctx in enumerate(batch.context_slots):
        rows.append(ctx if ctx is not None else batch.write_slots[i : i + 1])
    length = max(int(r.numel()) for r in rows)
    table = torch.zeros(len(rows), length, dtype=torch.int64, device=device)
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        n = int(r.numel())
        table[i, :n] = r
        lo = max(n - sliding_window, 0) if sliding_window else 0
        mask[i, lo:n] = True
    batch.decode_slots = table
    batch.decode_mask = mask[:, None, None, :]
