"""KV block bookkeeping with automatic prefix caching (no tensors: the engine and the simulator share it).

A pool of ``num_blocks`` blocks of ``block_size`` tokens and a block table per sequence. Blocks are
reference-counted: a sequence holds one reference to each block of its table, and several
sequences may hold the same block when they share its content. A block whose KV is complete in
every layer can be *published* under its content name (:mod:`replicas.prefix_hash`); a published
block that no sequence references any more stays cached, evictable least-recently-used, and a new
sequence whose prompt starts with the same names *attaches* it instead of computing it again.

Every block is in exactly one of three places: **free** (no name, no reference), **cached** (a name,
no reference: evictable, oldest first) or **held** (one or more references, named or not).
Allocation takes free blocks first, then evicts the least recently used cached block; it never
touches a held block, so a running, waiting (attached prefix) or suspended sequence's KV is safe.
Allocation is all-or-nothing: :class:`KVCacheFull` is raised and nothing changes. A freed
sequence's blocks go back tail first, so a chain's later blocks are evicted before its earlier
ones (a prefix stays matchable as long as possible).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from replicas.prefix_hash import BlockName


class KVCacheFull(RuntimeError):
    """Raised when the block pool cannot hold the requested tokens."""

    def __init__(self, seq_id: int, blocks_needed: int, blocks_free: int) -> None:
        super().__init__(
            f"KV cache full: sequence {seq_id} needs {blocks_needed} more blocks, {blocks_free} free"
        )
        self.seq_id = seq_id
        self.blocks_needed = blocks_needed
        self.blocks_free = blocks_free


class BlockAllocator:
    """Block tables, reference counts and the prefix cache of one KV pool.

    ``max_cached_blocks`` bounds the cached (unreferenced, published) blocks: the cache's share of
    the pool; beyond it the oldest are evicted at once. ``enable_prefix_caching=False`` keeps the
    pool a plain allocator (nothing is published, nothing matches).
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False,
                 max_cached_blocks: int | None = None) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = enable_prefix_caching
        self.max_cached_blocks = num_blocks if max_cached_blocks is None else max(0, min(max_cached_blocks, num_blocks))
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._name_of: dict[int, BlockName] = {}  # published block -> its name
        self._index_of: dict[int, int] = {}  # published block -> its index in its sequence
        self._block_of: dict[BlockName, int] = {}  # name -> published block
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced published blocks, oldest first
        self.version = 1  # bumped whenever the set of published names changes (0: no cache)
        # called as on_change(name, index in its sequence, published) whenever a block is (un)published
        self.on_change: Callable[[BlockName, int, bool], None] | None = None
        self.queried_tokens = 0  # prompt tokens looked up (attach_prefix)
        self.hit_tokens = 0  # of those, found cached
        self.evictions = 0  # cached blocks reused for other content

    # ------------------------------------------------------------------ capacity
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones plus cached (evictable) ones."""
        return len(self._free) + len(self._cached)

    @property
    def free_tokens(self) -> int:
        """Token capacity of :attr:`num_free_blocks`."""
        return self.num_free_blocks * self.block_size

    @property
    def num_cached_blocks(self) -> int:
        """Published blocks (held or not): what a new prompt can match."""
        return len(self._block_of)

    def blocks_needed(self, seq_id: int, total_tokens: int) -> int:
        """Extra blocks ``seq_id`` needs to hold ``total_tokens`` tokens."""
        have = len(self._tables.get(seq_id, ()))
        return max(-(-total_tokens // self.block_size) - have, 0)

    def can_allocate(self, seq_id: int, total_tokens: int) -> bool:
        """Whether :meth:`ensure_capacity` would succeed now."""
        return self.blocks_needed(seq_id, total_tokens) <= self.num_free_blocks

    def ensure_capacity(self, seq_id: int, total_tokens: int) -> None:
        """Grow ``seq_id``'s table to hold ``total_tokens``; all or nothing."""
        need = self.blocks_needed(seq_id, total_tokens)
        if need > self.num_free_blocks:
            raise KVCacheFull(seq_id, need, self.num_free_blocks)
        table = self._tables.setdefault(seq_id, [])
        for _ in range(need):
            block = self._take()
            self._refs[block] = 1
            table.append(block)

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._cached.popitem(last=False)  # least recently used
        self._unpublish(block)
        self.evictions += 1
        return block

    def _unpublish(self, block: int) -> None:
        index = self._index_of.pop(block)
        name = self._name_of.pop(block)
        del self._block_of[name]
        self.version += 1
        if self.on_change is not None:
            self.on_change(name, index, False)

    # ------------------------------------------------------------------ prefix cache
    def match(self, names: Sequence[BlockName]) -> int:
        """How many leading ``names`` are cached (published), without taking them."""
        count = 0
        for name in names:
            if name not in self._block_of:
                break
            count += 1
        return count

    def attach_prefix(self, seq_id: int, names: Sequence[BlockName], query_tokens: int | None = None) -> int:
        """Start ``seq_id``'s table with the cached blocks of its leading ``names`` (referenced from now
        on, so never evicted while it lives); returns the tokens they hold. The sequence must hold no
        blocks yet. Counts ``query_tokens`` (default: the tokens ``names`` cover) as queried and the
        matched ones as hits."""
        if self._tables.get(seq_id):
            raise ValueError(f"attach_prefix: sequence {seq_id} already holds blocks")
        self.queried_tokens += len(names) * self.block_size if query_tokens is None else query_tokens
        if not self.caching:
            return 0
        blocks = [self._block_of[name] for name in names[:self.match(names)]]
        for block in blocks:
            self._hold(block)
        if blocks:
            self._tables[seq_id] = blocks
        self.hit_tokens += len(blocks) * self.block_size
        return len(blocks) * self.block_size

    def extend_prefix(self, seq_id: int, names: Sequence[BlockName]) -> int:
        """Attach more cached blocks to a sequence whose table is exactly its matched prefix so far
        (it computed nothing yet): ``names`` are all its block names; returns its cached tokens now."""
        table = self._tables.setdefault(seq_id, [])
        if any(self._name_of.get(b) != n for b, n in zip(table, names)):
            raise ValueError(f"extend_prefix: sequence {seq_id}'s table is not a cached prefix of these names")
        if not self.caching:
            return len(table) * self.block_size
        more = [self._block_of[name] for name in names[len(table):len(table) + self.match(names[len(table):])]]
        for block in more:
            self._hold(block)
        table.extend(more)
        self.hit_tokens += len(more) * self.block_size
        if not table:
            del self._tables[seq_id]
        return len(table) * self.block_size

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            self._cached.pop(block)
        self._refs[block] += 1

    def publish(self, seq_id: int, names: Sequence[BlockName], upto_tokens: int) -> int:
        """Publish ``seq_id``'s full blocks below ``upto_tokens`` (their KV is complete in every layer)
        under ``names``; a block whose content another block already holds stays private. Returns
        how many blocks were newly published."""
        if not self.caching:
            return 0
        table = self._tables.get(seq_id, ())
        count = min(upto_tokens // self.block_size, len(table), len(names))
        added = 0
        for index in range(count):
            block, name = table[index], names[index]
            if block in self._name_of or name in self._block_of:
                continue
            self._name_of[block], self._block_of[name], self._index_of[block] = name, block, index
            added += 1
            if self.on_change is not None:
                self.on_change(name, index, True)
        if added:
            self.version += 1
        return added

    def is_published(self, name: BlockName) -> bool:
        """Whether a block with this name is cached."""
        return name in self._block_of

    def cached_names(self, every: int = 1, limit: int | None = None) -> list[BlockName]:
        """The names of published blocks whose index in their sequence is ``every - 1`` modulo ``every``
        (``every=1``: all), held ones first, then cached ones most recently used first; at most ``limit``."""
        order = [b for b, refs in enumerate(self._refs) if refs and b in self._name_of]
        order.extend(reversed(self._cached))
        out = [self._name_of[b] for b in order if self._index_of[b] % every == every - 1]
        return out if limit is None else out[:limit]

    # ------------------------------------------------------------------ parallel sampling
    def fork(self, parent: int, child: int, num_tokens: int) -> tuple[int, int] | None:
        """Start ``child`` (no blocks yet) as a copy of ``parent``'s first ``num_tokens`` tokens: their
        full blocks are shared (one more reference each, never written again: decoding writes past
        ``num_tokens``), and a partial last block gets a fresh private block for the child. Returns
        ``(parent's partial block, child's copy)`` for the caller to copy the KV of, or None when
        ``num_tokens`` fills whole blocks. All or nothing (:class:`KVCacheFull`)."""
        if self._tables.get(child):
            raise ValueError(f"fork: sequence {child} already holds blocks")
        table = self._tables.get(parent, [])
        used = -(-num_tokens // self.block_size)
        if num_tokens <= 0 or used > len(table):
            raise ValueError(f"fork: sequence {parent} holds {len(table)} blocks, not {num_tokens} tokens")
        full = num_tokens // self.block_size
        partial = used > full
        if partial and not self.num_free_blocks:
            raise KVCacheFull(child, 1, 0)
        shared = table[:full]
        for block in shared:
            self._hold(block)
        self._tables[child] = list(shared)
        if not partial:
            return None
        copy = self._take()
        self._refs[copy] = 1
        self._tables[child].append(copy)
        return table[full], copy

    # ------------------------------------------------------------------ release
    def free(self, seq_id: int) -> int:
        """Drop ``seq_id``'s references, tail first; returns how many blocks it held (0 if unknown).
        Published blocks nobody holds stay cached (most recent last); others become free."""
        table = self._tables.pop(seq_id, [])
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise AssertionError(f"block {block}: reference count below zero")
            if self._refs[block]:
                continue
            if block in self._name_of:
                self._cached[block] = None
            else:
                self._free.append(block)
        while len(self._cached) > self.max_cached_blocks:
            block, _ = self._cached.popitem(last=False)
            self._unpublish(block)
            self.evictions += 1
            self._free.append(block)
        return len(table)

    def has(self, seq_id: int) -> bool:
        """Whether ``seq_id`` holds blocks."""
        return seq_id in self._tables

    def capacity(self, seq_id: int) -> int:
        """Tokens ``seq_id`` can hold without growing."""
        return len(self._tables.get(seq_id, ())) * self.block_size

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of ``seq_id``'s block ids, in order."""
        return list(self._tables.get(seq_id, ()))

    def refcount(self, block: int) -> int:
        """How many sequences hold ``block``."""
        return self._refs[block]

    def check_invariants(self) -> None:
        """Assert every block is in exactly one of free / cached / held, with exact reference counts."""
        counts = [0] * self.num_blocks
        for table in self._tables.values():
            for block in table:
                counts[block] += 1
        if counts != self._refs:
            raise AssertionError("reference counts differ from the block tables")
        free, cached = set(self._free), set(self._cached)
        held = {b for b in range(self.num_blocks) if self._refs[b]}
        if len(free) != len(self._free) or free & cached or free & held or cached & held:
            raise AssertionError("a block is in two of free / cached / held")
        if free | cached | held != set(range(self.num_blocks)):
            raise AssertionError(f"blocks lost: {self.num_blocks - len(free | cached | held)} unaccounted for")
        if any(b in self._name_of for b in free) or not cached <= set(self._name_of):
            raise AssertionError("a free block has a name, or a cached one has none")
        if {self._block_of[n] for n in self._block_of} != set(self._name_of) or len(self._block_of) != len(
                self._name_of) or set(self._index_of) != set(self._name_of):
            raise AssertionError("the name index is inconsistent")
        if len(cached) > self.max_cached_blocks:
            raise AssertionError(f"{len(cached)} cached blocks over the cap of {self.max_cached_blocks}")
