"""The native engine's two sides of a prefill/decode handover (:mod:`replicas.handover`).

:func:`build_handover` runs on a ``prefill`` engine's loop thread right after the first token was
sampled and streamed; :func:`admit_handover` runs on a ``decode`` engine's loop thread when a
handover arrives. Both are plain functions over the engine's parts (KV cache, prefix tracker,
tokenizer), so the engine loop stays the only place that sequences events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from replicas.detokenize import OutputStream
from replicas.engine_types import LiveRequest, Sink
from replicas.handover import KVHandover, gather_kv, prompt_blocks, scatter_kv
from replicas.kv_cache import PagedKVCache
from replicas.prefix_tracker import PrefixTracker
from replicas.sampling import RequestSampler
from state.clock import Clock


def build_handover(lr: LiveRequest, kv: PagedKVCache, prefix: PrefixTracker, clock: Clock,
                   source: str = "") -> KVHandover:
    """The handover of ``lr`` (prompt prefilled, first token sampled): its prompt's KV copied to the CPU,
    its sampling state and its prompt's block names. The caller frees the sequence afterwards."""
    started = clock()
    n = lr.request.num_prompt_tokens
    keys, values = gather_kv(kv, prompt_blocks(kv.allocator, lr.seq_id, n))
    generator = lr.sampler.generator
    return KVHandover(
        request=dataclasses.replace(lr.request), params=lr.params, generated=tuple(lr.stream.token_ids),
        num_tokens=n, block_size=kv.spec.block_size, salt=prefix.salt, keys=keys, values=values,
        block_names=tuple(prefix.prompt_names(lr.request.request_id, n // kv.spec.block_size)),
        generator_state=None if generator is None else generator.get_state(), gather_s=clock() - started,
        source=source,
    )


@dataclasses.dataclass(frozen=True)
class Admitted:
    """A handover admitted: the live request to decode, and the prompt tokens found in this cache."""

    live: LiveRequest
    cached_tokens: int


def admit_handover(h: KVHandover, sink: Sink, seq_id: int, kv: PagedKVCache, prefix: PrefixTracker, *,
                   eos_token_ids: Sequence[int], decode_text: Callable[[Sequence[int]], str],
                   can_admit: Callable[[int], bool]) -> Admitted | str:
    """Allocate ``seq_id``'s blocks for a validated handover, attaching the prompt blocks this engine's
    prefix cache already holds under the same names and copying the others in; rebuild its sampler
    and output stream. Returns the error instead (nothing held) when the KV does not fit now:
    never evicts or overwrites a block another sequence holds."""
    request, bs = h.request, kv.spec.block_size
    rid = request.request_id
    total = h.num_tokens + 1  # the KV positions plus the next decoded one
    sampler = RequestSampler(h.params, kv.keys[0].device, prompt_ids=request.prompt_ids, eos_token_ids=eos_token_ids)
    stream = OutputStream(h.params, eos_token_ids, decode_text)
    for token in h.generated:
        sampler.history.record(token)
        if stream.append(token).finish_reason is not None:
            return f"handover of {rid}: its output already finished at token {token}"
    if h.generator_state is not None and sampler.generator is not None:
        sampler.generator.set_state(h.generator_state)
    names = list(h.block_names) if h.block_names else None
    match = prefix.admit(rid, seq_id, request.prompt_ids, names=names)
    cached_blocks = match.cached_tokens // bs
    if not can_admit(total - cached_blocks * bs) or not kv.allocator.can_allocate(seq_id, total):
        kv.allocator.free(seq_id)
        prefix.forget(rid)
        return (f"decode replica out of KV memory: {-(-total // bs) - cached_blocks} blocks needed, "
                f"{kv.allocator.num_free_blocks} free")
    kv.allocator.ensure_capacity(seq_id, total)
    table = prompt_blocks(kv.allocator, seq_id, h.num_tokens)
    scatter_kv(kv, table[cached_blocks:], h.keys, h.values, first=cached_blocks)
    prefix.passed(seq_id, h.num_tokens)  # the prompt's full blocks are complete here: publish them
    prefix.prefilled(rid)
    live = LiveRequest(request, h.params, sink, seq_id, sampler, stream,
                       position=h.num_tokens + len(h.generated) - 1, emitted_first=True)
    live.extra["handover"] = True
    return Admitted(live, match.cached_tokens)
