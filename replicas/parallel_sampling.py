"""``n`` choices from one prefill: a prefilled request's sequence forks into ``n`` decoding sequences.

The prompt is prefilled once, as for ``n`` = 1 (the scheduler sees one request). When its prefill
completes, choices 1..n-1 start as copies of choice 0's sequence (:meth:`PagedKVCache.fork`): the
full prompt blocks are shared through the block allocator's reference counts, and the partial last
block, the one decoding writes next, is copied for each new choice (a private copy at the fork,
which costs what copy-on-write would: one block per choice). Every choice samples its first token
from the same prefill logits with its own :class:`~replicas.sampling.RequestSampler`: seed
``seed + i`` for choice ``i`` when seeded (vLLM's convention, ``SamplingParams.for_choice``), so
choice ``i`` of a seeded request is what a separate request with seed ``seed + i`` would generate.

Choice 0 is the request's :class:`~replicas.engine_types.LiveRequest` (the engine's ``live`` entry,
known to the scheduler and the prefix tracker); the others hang off it (``choices``) and decode
under their own keys. A choice that finishes gives its blocks back at once; the request finishes
(and the scheduler frees choice 0's sequence) when the last choice does.
"""

from __future__ import annotations

from collections.abc import Callable

from replicas.detokenize import OutputStream
from replicas.engine_decode import DecodeBatcher
from replicas.engine_types import LiveRequest
from replicas.kv_blocks import KVCacheFull
from replicas.kv_cache import PagedKVCache
from replicas.sampling import RequestSampler
from replicas.sampling_params import SamplingParams


def fork_choices(parent: LiveRequest, kv: PagedKVCache, new_seq_id: Callable[[], int],
                 sampler_for: Callable[[SamplingParams], RequestSampler],
                 stream_for: Callable[[SamplingParams], OutputStream]) -> list[LiveRequest]:
    """All of ``parent``'s choices, itself first: choices 1..n-1 created on forks of its prefilled
    sequence (``parent.position`` tokens). All or nothing: on :class:`KVCacheFull` the forks made
    so far are freed and the error propagates."""
    made: list[LiveRequest] = []
    try:
        for index in range(1, parent.params.n):
            seq_id = new_seq_id()
            kv.fork(parent.seq_id, seq_id, parent.position)
            params = parent.params.for_choice(index)
            made.append(LiveRequest(parent.request, parent.params, parent.sink, seq_id, sampler_for(params),
                                    stream_for(params), position=parent.position, emitted_first=True,
                                    index=index))
    except KVCacheFull:
        for child in made:
            kv.allocator.free(child.seq_id)
        raise
    parent.choices = made
    parent.open_choices = parent.params.n
    return [parent, *made]


def retire_choice(choice: LiveRequest, decoder: DecodeBatcher, kv: PagedKVCache) -> None:
    """A choice finished while others go on: it stops decoding and its blocks go back (the shared
    prompt blocks stay with the choices that hold them)."""
    decoder.remove(choice.key)
    kv.allocator.free(choice.seq_id)


def drop_choices(parent: LiveRequest, decoder: DecodeBatcher, kv: PagedKVCache) -> None:
    """The request ends (finished, failed or aborted): no choice decodes any more and the forked
    choices' blocks go back (choice 0's sequence is freed by whoever frees the request)."""
    decoder.remove(parent.key)
    for child in parent.choices:
        retire_choice(child, decoder, kv)
