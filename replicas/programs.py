"""Prefill and decode passes composed into preemptible programs.

A prefill program covers a batch of prompts: it packs them into passes of at most
``chunk_tokens`` tokens (long prompts are split across passes, attending to the KV their earlier
chunks wrote) and yields at every operator boundary of every pass. No scheduling decision is
taken at chunk boundaries: the program is one unit for the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import torch

from replicas.kv_cache import PagedKVCache
from replicas.model.batch import Segment, build_forward_batch
from replicas.model.decoder import Boundary, DecoderModel
from replicas.scheduler.config import DEFAULT_CHUNK_TOKENS

Program = Generator[Boundary, None, dict[int, torch.Tensor]]


@dataclass(frozen=True)
class PrefillItem:
    """Compute KV for ``token_ids[start:end]`` of sequence ``seq_id`` (``end`` defaults to all)."""

    seq_id: int
    token_ids: Sequence[int]
    start: int = 0
    end: int | None = None
    want_logits: bool = True
    all_logits: bool = False  # every position's logits go to the program's ``on_logits`` (prompt logprobs)

    @property
    def stop(self) -> int:
        """The position this item prefills up to."""
        return len(self.token_ids) if self.end is None else self.end


def plan_passes(items: Sequence[PrefillItem], chunk_tokens: int) -> Iterator[list[Segment]]:
    """Split items into passes of at most ``chunk_tokens`` tokens, in order."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    current: list[Segment] = []
    budget = chunk_tokens
    for item in items:
        if not 0 <= item.start < item.stop <= len(item.token_ids):
            raise ValueError(
                f"sequence {item.seq_id}: bad prefill range [{item.start}, {item.stop}) "
                f"of {len(item.token_ids)} tokens"
            )
        pos = item.start
        while pos < item.stop:
            take = min(item.stop - pos, budget)
            last = pos + take == item.stop
            current.append(Segment(item.seq_id, item.token_ids[pos : pos + take], pos, last and item.want_logits,
                                   item.all_logits))
            pos += take
            budget -= take
            if budget == 0:
                yield current
                current, budget = [], chunk_tokens
    if current:
        yield current


def prefill_program(
    model: DecoderModel, kv: PagedKVCache, items: Sequence[PrefillItem], chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    on_pass: Callable[[Sequence[Segment]], None] | None = None,
    on_logits: Callable[[Segment, torch.Tensor], None] | None = None,
) -> Program:
    """Prefill ``items``; returns the last-token logits of each item that wants them, by seq id.

    ``on_logits(segment, logits)`` gets every position's logits ``[len(segment), vocab]`` of the
    segments of items with ``all_logits``, pass by pass, in order (only that pass's rows are kept).

    KV capacity for every item's range must be allocated before the program starts. ``on_pass``
    is called with a pass's segments once that pass has run through every layer, i.e. once their
    KV is complete (the engine publishes full prefix blocks there, while later passes may still be
    suspended).
    """
    logits: dict[int, torch.Tensor] = {}
    for segments in plan_passes(items, chunk_tokens):
        batch = build_forward_batch(segments, kv.allocator, model.device, model.config.sliding_window)
        out = yield from model.forward(batch, kv)
        row = 0  # the batch's logit rows follow its segments' order
        for seg in segments:
            count = len(seg.token_ids) if seg.all_logits else int(seg.want_logits)
            if seg.all_logits and on_logits is not None:
                on_logits(seg, out[row:row + count])
            if seg.want_logits:
                logits[seg.seq_id] = out[row + count - 1]
            row += count
        if on_pass is not None:
            on_pass(segments)
    return logits


def decode_program(model: DecoderModel, kv: PagedKVCache, steps: Sequence[tuple[int, int, int]]) -> Program:
    """One decode step for ``(seq_id, token_id, position)`` triples; returns next-token logits."""
    segments = [Segment(seq_id, (token,), pos, True) for seq_id, token, pos in steps]
    batch = build_forward_batch(segments, kv.allocator, model.device, model.config.sliding_window)
    out = yield from model.forward(batch, kv)
    return {seq_id: out[row] for row, seq_id in enumerate(batch.logit_seq_ids)}
