"""An engine's view of its prefix cache, per request (no tensors: the engine and the simulator share it).

For every request the tracker keeps its block names (:mod:`replicas.prefix_hash`) and drives the
:class:`~replicas.kv_blocks.BlockAllocator` through the request's life:

* **Arrival** (:meth:`PrefixTracker.admit`): attach the longest cached prefix, at most all full
  blocks but the one holding the last prompt token (one token is always computed, so the first
  token has logits), and find whether a request still prefilling will publish the blocks that
  follow (``shares_with``, ``shared_tokens``): the scheduler decides whether to wait for it.
* **A pass completes** (:meth:`passed`): the pass's full blocks have KV in every layer; they are
  published. A suspended program's blocks are published pass by pass, never mid-pass.
* **Decoding** (:meth:`decoded`): generated tokens' full blocks are published too, so the next turn
  of a conversation (prompt = this prompt + this answer + more) finds them.
* **A program ends** (:meth:`waiting_on`, :meth:`extend`, :meth:`prefilled`): requests that waited
  for its members' blocks attach what was published (the scheduler plans their rest once the
  member's prefill is complete).
* **The end** (:meth:`forget`): the engine frees the sequence; published blocks stay cached.

:meth:`summary` is the bounded list of routing names the replica publishes for placement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from replicas.kv_blocks import BlockAllocator
from replicas.prefix_hash import BlockName, block_names, routing_names
from state.schema import MAX_PREFIX_NAMES

#: Routing granularity, in KV blocks: the summary names every ROUTING_STRIDE-th block.
ROUTING_STRIDE = 4
#: At most this many names in a replica's published summary (8 hex characters each).
SUMMARY_MAX_NAMES = MAX_PREFIX_NAMES


@dataclass(frozen=True)
class PrefixMatch:
    """What the cache holds of a new prompt: tokens to skip, and who is computing the next ones."""

    cached_tokens: int = 0
    shares_with: str | None = None
    shared_tokens: int = 0


class PrefixTracker:
    """Per-request block names over one allocator; ``salt`` names the model and dtype."""

    def __init__(self, allocator: BlockAllocator, salt: str, *, stride: int = ROUTING_STRIDE,
                 summary_max: int = SUMMARY_MAX_NAMES) -> None:
        self.allocator = allocator
        self.salt = salt
        self.stride = stride
        self.summary_max = summary_max
        self._names: dict[str, list[BlockName]] = {}  # request id -> names of its full blocks so far
        self._seq: dict[str, int] = {}
        self._rid: dict[int, str] = {}  # sequence id -> request id
        self._usable: dict[str, int] = {}  # request id -> prompt blocks it may take from the cache
        self._computing: dict[BlockName, str] = {}  # unpublished block name -> the request computing it
        self._waiters: dict[str, list[str]] = {}  # request id -> requests waiting for its blocks
        self._summary: tuple[int, tuple[str, ...]] = (-1, ())

    @property
    def enabled(self) -> bool:
        """Whether the allocator caches (otherwise nothing is named or matched)."""
        return self.allocator.caching

    @property
    def routing_block_tokens(self) -> int:
        """Tokens per routing name (the summary's granularity)."""
        return self.allocator.block_size * self.stride

    def admit(self, request_id: str, seq_id: int, prompt: Sequence[int],
              names: Sequence[BlockName] | None = None, *, reuse: bool = True) -> PrefixMatch:
        """Attach the cached prefix of a new request's prompt and find a request computing what follows
        (``names``: the prompt's block names when the caller has them already, e.g. the simulator).
        ``reuse`` False: the request computes its whole prompt (it wants every position's logits, for
        prompt logprobs); its blocks are still published for others."""
        self._seq[request_id], self._rid[seq_id] = seq_id, request_id
        if not self.enabled:
            self.allocator.attach_prefix(seq_id, (), query_tokens=len(prompt))
            return PrefixMatch()
        bs = self.allocator.block_size
        names = list(names) if names is not None else block_names(prompt, bs, self.salt)
        self._names[request_id] = names
        usable = self._usable[request_id] = (len(prompt) - 1) // bs if reuse else 0  # never the last token's block
        cached = self.allocator.attach_prefix(seq_id, names[:usable], query_tokens=len(prompt))
        first = cached // bs
        owner = self._computing.get(names[first]) if first < usable else None
        shared = 0
        if owner is not None:
            while first + shared < usable and self._computing.get(names[first + shared]) == owner:
                shared += 1
            self._waiters.setdefault(owner, []).append(request_id)
        for name in names[first:]:  # what this one computes, unless it waits for the owner's copy
            self._computing.setdefault(name, request_id)
        return PrefixMatch(cached, owner, shared * bs)

    def passed(self, seq_id: int, upto_tokens: int) -> None:
        """A pass computed sequence ``seq_id``'s prompt KV below ``upto_tokens`` in every layer: publish it."""
        request_id = self._rid.get(seq_id)
        names = self._names.get(request_id) if request_id is not None else None
        if request_id is None or names is None:
            return
        self.allocator.publish(self._seq[request_id], names, upto_tokens)
        for name in names[:upto_tokens // self.allocator.block_size]:
            if self._computing.get(name) == request_id:
                del self._computing[name]

    def decoded(self, request_id: str, tokens: Sequence[int], kv_tokens: int) -> None:
        """The sequence (prompt and output ``tokens``) has KV for its first ``kv_tokens`` positions:
        name and publish its new full blocks."""
        names = self._names.get(request_id)
        bs = self.allocator.block_size
        if names is None or kv_tokens // bs <= len(names):
            return
        start = len(names)
        names.extend(block_names(tokens[:kv_tokens], bs, self.salt, start=start, parent=names[-1] if names else None))
        self.allocator.publish(self._seq[request_id], names, kv_tokens)

    def prompt_names(self, request_id: str, blocks: int) -> list[BlockName]:
        """The names of ``request_id``'s first ``blocks`` full blocks (empty without a prefix cache)."""
        return list(self._names.get(request_id, ())[:blocks])

    def waiting_on(self, request_id: str) -> list[str]:
        """Requests waiting for ``request_id``'s blocks (after each of its programs they may attach more)."""
        return list(self._waiters.get(request_id, ()))

    def prefilled(self, request_id: str) -> None:
        """``request_id``'s prompt is fully prefilled: nobody waits for it any more."""
        self._waiters.pop(request_id, None)

    def extend(self, request_id: str) -> int:
        """Attach what was published since a waiting request arrived; returns its cached tokens now."""
        names = self._names[request_id][:self._usable[request_id]]  # a waiter has computed nothing yet
        return self.allocator.extend_prefix(self._seq[request_id], names)

    def forget(self, request_id: str) -> None:
        """The request left the engine (its sequence is freed by the engine): drop its names."""
        names = self._names.pop(request_id, ())
        self._rid.pop(self._seq.pop(request_id, -1), None)
        self._usable.pop(request_id, None)
        self._waiters.pop(request_id, None)
        for name in names:
            if self._computing.get(name) == request_id:
                del self._computing[name]

    def summary(self) -> tuple[int, tuple[str, ...]]:
        """``(version, routing names)``: every ``stride``-th cached block's routing name, held ones
        first, then most recently used; at most ``summary_max``. Recomputed only when the cache changed."""
        version = self.allocator.version
        if self._summary[0] != version:
            names = self.allocator.cached_names(every=self.stride, limit=self.summary_max)
            self._summary = (version, tuple(routing_names(names, 1)))
        return self._summary
