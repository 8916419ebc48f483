"""Content names for KV blocks: a chained hash over each full block of tokens.

Block ``i`` of a sequence (tokens ``[i * B, (i + 1) * B)``) is named by
``blake2b(name(i - 1) || tokens of block i)`` (8 bytes), block 0's parent being a root derived from
a *salt* that names everything else its KV depends on (the model and its dtype). Two sequences'
blocks get the same name exactly when everything before and in them is the same, so a name is a
safe key for sharing KV. The hash is stable across processes and machines (unlike Python's
``hash``): the engine names its cached blocks with it, the router names a request's prefix with it,
and the cluster simulator uses it for its simulated caches.

Routing summaries (:func:`routing_names`) keep every ``stride``-th name as 8 hex characters: enough
to estimate how much of a prompt a replica holds (a 32-bit name can collide; a collision costs a
misplaced request, never wrong KV, because the engine matches full 64-bit names of every block).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

BlockName = bytes  # 8 bytes
_DIGEST = 8
_TOKEN_BYTES = 4  # token ids are < 2**31


def prefix_salt(model: str, dtype: str) -> str:
    """The salt of a replica's block names: what, besides the tokens, its KV depends on."""
    return f"{model}|{dtype}"


def _root(salt: str) -> bytes:
    return hashlib.blake2b(salt.encode(), digest_size=_DIGEST).digest()


def block_names(token_ids: Sequence[int], block_size: int, salt: str, *, start: int = 0,
                parent: BlockName | None = None) -> list[BlockName]:
    """Names of every full block of ``token_ids``, from block ``start`` on (``parent``: the name of
    block ``start - 1``, required when ``start > 0``)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if start and parent is None:
        raise ValueError("block_names: a start past block 0 needs the parent block's name")
    full = len(token_ids) // block_size
    if start >= full:
        return []
    raw = array("i", token_ids[start * block_size:full * block_size]).tobytes()
    step = block_size * _TOKEN_BYTES
    name = parent if parent is not None else _root(salt)
    out: list[BlockName] = []
    for offset in range(0, len(raw), step):
        name = hashlib.blake2b(name + raw[offset:offset + step], digest_size=_DIGEST).digest()
        out.append(name)
    return out


def routing_names(names: Sequence[BlockName], stride: int) -> list[str]:
    """Every ``stride``-th block name (blocks ``stride - 1``, ``2 * stride - 1``, ...) as 8 hex characters:
    the granularity at which replicas summarise their caches and the router matches prompts."""
    return [names[i][:4].hex() for i in range(stride - 1, len(names), stride)]


def routing_names_of(token_ids: Sequence[int], block_size: int, stride: int, salt: str) -> tuple[str, ...]:
    """:func:`routing_names` of a prompt (what the ingress attaches to a request for placement)."""
    return tuple(routing_names(block_names(token_ids, block_size, salt), stride))


@dataclass(frozen=True)
class PrefixNaming:
    """How a replica names prompt prefixes for placement: its salt, KV block size and routing stride."""

    salt: str
    block_size: int
    stride: int

    @property
    def block_tokens(self) -> int:
        """Tokens per routing name."""
        return self.block_size * self.stride

    def names_of(self, token_ids: Sequence[int]) -> tuple[str, ...]:
        """The routing names of ``token_ids``."""
        return routing_names_of(token_ids, self.block_size, self.stride, self.salt)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (what :meth:`from_dict` parses)."""
        return {"salt": self.salt, "block_size": self.block_size, "stride": self.stride}

    @classmethod
    def from_dict(cls, data: object) -> PrefixNaming | None:
        """Parse ``tokenizer_info``'s ``prefix`` (None when the replica has no prefix cache or it is malformed)."""
        if not isinstance(data, dict):
            return None
        salt, size, stride = data.get("salt"), data.get("block_size"), data.get("stride")
        if not isinstance(salt, str) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                for v in (size, stride)):
            return None
        return cls(salt, size, stride)
