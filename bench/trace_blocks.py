"""The block ids of a trace's prompts: Mooncake's ``hash_ids``, checked line by line.

``hash_ids`` names a prompt as a list of :data:`MOONCAKE_BLOCK_TOKENS`-token blocks (the last one
may be partial): requests whose lists start with the same ids share exactly that prefix. A valid
list holds exactly ``ceil(input_length / 512)`` distinct non-negative integers, and an id keeps
one position in every request of a file (it names a prefix, not a block's content alone).
:class:`BlockIdChecker` raises ``ValueError`` with the reason; the loader (:mod:`bench.traces`)
names the file, line and field. The Mooncake trace is Apache-2.0; cite Qin et al., "Mooncake: A
KVCache-centric Disaggregated Architecture for LLM Serving", FAST'25.
"""

from __future__ import annotations

import json

MOONCAKE_BLOCK_TOKENS = 512  # tokens per block of a Mooncake trace's ``hash_ids``


class BlockIdChecker:
    """Checks one file's ``hash_ids``, line by line: type, count against the input length, and that
    an id keeps its position across lines."""

    def __init__(self, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        self.positions: dict[int, tuple[int, int]] = {}  # id -> (position, first line)

    def check(self, line: int, v: object, input_length: int) -> tuple[int, ...]:
        """The ids of line ``line`` as a tuple; ``ValueError`` saying what is wrong with them."""
        if not isinstance(v, list):
            raise ValueError(f"expected a list of block ids, got {json.dumps(v)}")
        for k, h in enumerate(v):
            if isinstance(h, bool) or not isinstance(h, int) or h < 0:
                raise ValueError(f"element {k}: expected a non-negative integer block id, got {json.dumps(h)}")
        need = -(-input_length // self.block_tokens)
        if len(v) != need:
            what = "more" if len(v) > need else "fewer"
            raise ValueError(f"{len(v)} block ids is {what} than input_length {input_length} needs: "
                             f"ceil({input_length} / {self.block_tokens}) = {need}")
        if len(set(v)) != len(v):
            dup = next(h for k, h in enumerate(v) if h in v[:k])
            raise ValueError(f"block id {dup} appears twice (ids name prefixes, so each comes once in a prompt)")
        for k, h in enumerate(v):
            pos, first = self.positions.setdefault(h, (k, line))
            if pos != k:
                raise ValueError(f"block id {h} at position {k} was at position {pos} on line {first} "
                                 "(an id names a prefix, so it keeps its position)")
        return tuple(v)
