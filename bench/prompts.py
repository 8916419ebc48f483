"""Prompts of exact token lengths for the benchmarks: unique ones, or ones that share prefixes.

A prompt of ``n`` tokens is built from English words that each encode, with their leading space,
to exactly one token of the model's tokenizer. Byte-level BPE tokenizers (Llama 3, Qwen, SmolLM2,
GPT-2 style) split text into words at spaces before merging, so a text made of ``k`` such words
re-tokenizes to exactly ``k`` tokens; :class:`PromptBuilder` still re-encodes every prompt and
repairs the rare text whose count differs, so the length is checked rather than assumed.

Each prompt is unique from its first tokens on: its first words spell the request index in base
``len(pool)``, and the rest is drawn by a generator seeded with ``(seed, index)``. Servers with
prefix caching therefore share no cached block between two prompts, and the same seed gives the
same prompts on every run and for every system.

Shared prefixes (:meth:`PromptBuilder.build_shared`): a request names its prompt as block ids
(Mooncake ``hash_ids``, or the multi-turn generator's, see :mod:`bench.traces`), each block
``block_tokens`` words drawn by a generator seeded with ``(seed, namespace, block id)``; the
prompt is the first words of its blocks laid end to end, then words of its own (seeded with the
request index) if its blocks run out. Since every word is one token, prompts whose block ids
start alike share exactly those leading tokens, in the text and in the ids; distinct blocks are
drawn independently, so prompts stay apart from the first differing block on (two different
blocks share a first word with probability ``1 / len(pool)``, a whole block practically never).
The ids are checked against the tokenizer's encoding of the text, so both forms are the same
prompt. A new ``namespace`` gives every block new words: a benchmark uses one per measured run, so
a server's cache keeps nothing from one run that the next could hit.

A :class:`Prompt` carries both the text and the token ids, so a load generator can send either
(``prompt: "..."`` or ``prompt: [ids]``; both are OpenAI ``/v1/completions`` forms).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

#: Common English words; those that are one token with a leading space form the pool.
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their can has been if more when will would who so no out up into "
    "time about them some could other then than its first two new like only may over also these any see very "
    "after most made where way many before must through back years much your down should well because each "
    "just those people how too little state good world very still own men work long get here between both life "
    "being under never day same another know while last might us great old year off come since against go came "
    "right used take three states himself few house use during without again place around however home small "
    "found thought went say part once general high upon school every does got united left number course war "
    "until always away something fact though water less public put think almost hand enough far took head yet "
    "government system better set told nothing night end why called didn find going look asked later knew point "
    "next program city business give group toward young days let room president side social given present "
    "several order national possible rather second face per among form important often things looked early white "
    "case john become large big need four within felt along children saw best church ever least power development "
    "light thing seemed family interest want members mind country area others done turned although open god "
    "service certain kind problem began different door thus help sense means whole matter perhaps itself york "
    "times law human line above name example action company hands local show whether five history gave today "
    "either act feet across taken past quite anything seen having death week experience body word half really "
    "field am car words already themselves information tell college shall money period held keep sure probably "
    "free seems political real cannot behind miss question air office making brought whose special major heard "
    "problems federal became study ago moment available known result street economic boy position reason change "
    "south board individual job society areas west close turn love community true court force full seem wife "
    "future age wanted voice department center woman control common policy necessary following front sometimes "
    "six girl clear further land able feel mother music party provide university child effect level stood "
    "military town short morning total outside rate figure class art century washington north usually plan "
    "leave therefore evidence top million sound black strong hard various believe type value play surface soon "
    "mean near table lines run tax road army modern river bed student garden market report paper window model "
    "cloud engine request answer signal value memory token stream batch queue server client cache network"
).split()


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class Prompt:
    """A prompt as text and as the token ids the server computes from that text."""

    text: str
    token_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        """Tokens the server sees for :attr:`text` (special tokens it adds included)."""
        return len(self.token_ids)


class PromptBuilder:
    """Builds prompts of exact token lengths for one tokenizer, unique (:meth:`build`) or sharing
    prefixes by block ids (:meth:`build_shared`); see the module docstring."""

    def __init__(self, tokenizer: _Tokenizer, seed: int = 0, *, add_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.add_special_tokens = add_special_tokens
        pool = [w for w in dict.fromkeys(_WORDS) if len(tokenizer.encode(" " + w)) == 1]
        if len(pool) < 16:
            raise ValueError(f"only {len(pool)} of the built-in words are single tokens for this tokenizer; "
                             "prompts of exact lengths need at least 16")
        self.pool = pool
        # Tokens the server adds around any text (a BOS, say): subtracted from the word budget.
        self.special = len(self._encode("")) if add_special_tokens else 0
        self._word_ids = [tokenizer.encode(" " + w)[0] for w in pool]
        self._blocks: dict[tuple[int, int, int], list[int]] = {}  # (namespace, id, size) -> word indices

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens)

    def _words(self, index: int, count: int) -> list[str]:
        """``count`` words: the index spelled in base ``len(pool)``, then seeded random words."""
        base = len(self.pool)
        digits: list[str] = []
        value = index
        while True:
            digits.append(self.pool[value % base])
            value //= base
            if value == 0:
                break
        rng = random.Random(self.seed * 1_000_003 + index)
        rest = [self.pool[rng.randrange(base)] for _ in range(max(count - len(digits), 0))]
        return (digits + rest)[:count]

    def build(self, index: int, num_tokens: int) -> Prompt:
        """The prompt of request ``index`` with exactly ``num_tokens`` tokens as the server counts them.

        Raises ``ValueError`` if ``num_tokens`` is below the tokens the server adds by itself plus one.
        """
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        words_needed = num_tokens - self.special
        if words_needed < 1:
            raise ValueError(f"num_tokens must be >= {self.special + 1} for this tokenizer, got {num_tokens}")
        words = self._words(index, words_needed)
        text = " " + " ".join(words)
        ids = self._encode(text)
        if len(ids) != num_tokens:  # a merge across words: cut or pad the ids, then check the text again
            ids = self._repair(text, ids, num_tokens)
            text = self.tokenizer.decode(ids[self.special:] if self.special else ids, skip_special_tokens=True)
            ids = self._encode(text)
            if len(ids) != num_tokens:
                raise ValueError(f"cannot build a {num_tokens}-token prompt for request {index}: "
                                 f"its text re-tokenizes to {len(ids)} tokens")
        return Prompt(text, tuple(ids))

    def build_shared(self, index: int, num_tokens: int, hash_ids: Sequence[int] | None, block_tokens: int | None,
                     *, namespace: int = 0) -> Prompt:
        """The prompt of request ``index``: ``num_tokens`` tokens, the first words of the blocks
        ``hash_ids`` names (``block_tokens`` words each), then words of its own if they run out.

        ``hash_ids`` None: the whole prompt is the request's own. Raises ``ValueError`` for a length
        below the server's own tokens plus one, or a tokenizer whose encoding of the text differs
        from the words' ids (the prefixes could not be exact).
        """
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        need = num_tokens - self.special
        if need < 1:
            raise ValueError(f"num_tokens must be >= {self.special + 1} for this tokenizer, got {num_tokens}")
        if hash_ids is not None and (block_tokens is None or block_tokens < 1):
            raise ValueError(f"block ids need a positive block_tokens, got {block_tokens!r}")
        words: list[int] = []
        for h in hash_ids or ():
            if len(words) >= need:
                break
            words += self._block(namespace, h, block_tokens or 1)
        del words[need:]
        if len(words) < need:
            rng = random.Random(f"{self.seed}:{namespace}:own:{index}")
            words += [rng.randrange(len(self.pool)) for _ in range(need - len(words))]
        text = " " + " ".join(self.pool[w] for w in words)
        ids = self._encode(text)
        expected = [self._word_ids[w] for w in words]
        extra = len(ids) - len(expected)  # the server's own tokens, around the words
        if len(ids) != num_tokens or not any(ids[s:s + len(expected)] == expected for s in range(extra + 1)):
            raise ValueError(f"the tokenizer does not encode the pool's words one token each in request {index}'s "
                             "prompt: shared prefixes would not be exact")
        return Prompt(text, tuple(ids))

    def _block(self, namespace: int, block_id: int, size: int) -> list[int]:
        """Word indices of one block, drawn once per ``(seed, namespace, id)``."""
        key = (namespace, block_id, size)
        words = self._blocks.get(key)
        if words is None:
            rng = random.Random(f"{self.seed}:{namespace}:block:{block_id}")
            words = self._blocks[key] = [rng.randrange(len(self.pool)) for _ in range(size)]
        return words

    def _repair(self, text: str, ids: list[int], num_tokens: int) -> list[int]:
        if len(ids) > num_tokens:
            return ids[:num_tokens]
        filler = self._encode(" " + self.pool[0])[self.special:]
        return ids + filler * (num_tokens - len(ids))


def make_prompts(tokenizer: _Tokenizer, lengths: Sequence[int], *, seed: int = 0) -> list[Prompt]:
    """One unique prompt per requested length (request ``i`` gets ``lengths[i]`` tokens)."""
    builder = PromptBuilder(tokenizer, seed)
    return [builder.build(i, n) for i, n in enumerate(lengths)]


def max_tokens_for(output_tokens: int, cap: int | None) -> int:
    """The ``max_tokens`` to request for a trace output length: at least 1, at most ``cap``."""
    if cap is not None and cap < 1:
        raise ValueError(f"the output cap must be >= 1, got {cap}")
    n = max(int(output_tokens), 1)
    return min(n, cap) if cap is not None else n
