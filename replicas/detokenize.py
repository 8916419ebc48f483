"""Turning sampled token ids into text deltas, and deciding when a request finishes.

Incremental decoding keeps a small window of recent tokens instead of re-decoding the whole
output each step. The window is ``ids[start:]``; ``ids[start:read]`` is the last chunk whose text
was fully resolved, kept as context so decoders that treat the first token of a sequence specially
(e.g. dropping a leading space) decode the new tokens as they would appear in the whole text. The
new text is what the window decodes to beyond the context's text. A trailing U+FFFD means a
multi-byte character is (probably) split across tokens: it is held back until later tokens
complete it, while the text before it is passed on.

Stop strings are matched on that text. Text that could still be the beginning of a stop string is
held back until it is disambiguated; when a stop string completes, only the text before it is
emitted and the request finishes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from replicas.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
# A character is at most 4 UTF-8 bytes, so a genuinely split one resolves within a few tokens. A
# window still ending in U+FFFD after this many unresolved tokens holds invalid bytes; accept it
# as is so the window (and the cost of decoding it) stays bounded.
MAX_UNRESOLVED_TOKENS = 16


@dataclass(frozen=True)
class StepOutput:
    """What appending one token produced: the token, the newly emitted text, and why it finished."""

    token_id: int
    text_delta: str
    finish_reason: str | None


class IncrementalDecoder:
    """Decodes a growing list of token ids into append-only text, a few tokens at a time."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._start = 0  # window start: first context token
        self._read = 0  # end of the resolved context, start of unresolved tokens
        self._context_len = 0  # len(decode(ids[start:read]))
        self._emitted = 0  # chars of the window's text beyond the context already returned

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now certain (possibly empty)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._start :])
        done = self._context_len + self._emitted
        resolved = not text.endswith(REPLACEMENT_CHAR)
        if resolved or len(self._ids) - self._read > MAX_UNRESOLVED_TOKENS:
            self._advance()
            return text[done:]
        stable = len(text.rstrip(REPLACEMENT_CHAR))
        if stable <= done:
            return ""
        self._emitted = stable - self._context_len
        return text[done:stable]

    def flush(self) -> str:
        """Return the rest of the text, including unresolved trailing U+FFFD."""
        text = self._decode(self._ids[self._start :])
        rest = text[self._context_len + self._emitted :]
        self._advance()
        return rest

    def _advance(self) -> None:
        self._start, self._read = self._read, len(self._ids)
        self._context_len = len(self._decode(self._ids[self._start : self._read]))
        self._emitted = 0


class OutputStream:
    """One request's output: token ids in, text deltas and the finish decision out.

    A request finishes with ``"stop"`` on an end-of-sequence token (unless ``ignore_eos``), on one
    of ``stop_token_ids``, or when a stop string appears in the text; otherwise with ``"length"``
    once ``max_tokens`` tokens were appended. Stop tokens and stop strings are not part of the text
    (a stop string is, at its end, with ``include_stop_str_in_output``), but every appended token is
    part of ``token_ids``. Special tokens are decoded into the text only with ``skip_special_tokens``
    false. Before ``min_tokens`` tokens were appended, neither stop tokens nor stop strings finish
    the request (as vLLM; the sampler masks the stop tokens until then).
    """

    def __init__(
        self, params: SamplingParams, eos_token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]
    ) -> None:
        self._params = params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(eos_token_ids)
        self._stop_ids = frozenset(stop_ids)
        self._stops = params.stop
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._decoder = IncrementalDecoder(decode if params.skip_special_tokens
                                           else functools.partial(decode, skip_special_tokens=False))
        self._ids: list[int] = []
        self._chunks: list[str] = []
        self._pending = ""  # decoded text held back as a possible stop-string prefix
        self._finish_reason: str | None = None

    @property
    def token_ids(self) -> Sequence[int]:
        """Every appended token id, including a final stop/eos token (do not mutate)."""
        return self._ids

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def finished(self) -> bool:
        """Whether the request has finished."""
        return self._finish_reason is not None

    @property
    def finish_reason(self) -> str | None:
        """``"stop"``, ``"length"``, or None while running."""
        return self._finish_reason

    def append(self, token_id: int) -> StepOutput:
        """Add the next sampled token; return the text it releases and whether the request finished."""
        if self.finished:
            raise RuntimeError("append() on a finished output stream")
        self._ids.append(token_id)
        may_stop = len(self._ids) >= self._params.min_tokens
        if token_id in self._stop_ids and may_stop:
            delta, _ = self._release(self._decoder.flush(), final=True)
            return self._step(token_id, delta, "stop")
        delta, hit = self._release(self._decoder.push(token_id), final=False, check=may_stop)
        if hit:
            return self._step(token_id, delta, "stop")
        if len(self._ids) >= self._params.max_tokens:
            tail, hit = self._release(self._decoder.flush(), final=True)
            return self._step(token_id, delta + tail, "stop" if hit else "length")
        return self._step(token_id, delta, None)

    def _step(self, token_id: int, delta: str, finish_reason: str | None) -> StepOutput:
        if delta:
            self._chunks.append(delta)
        self._finish_reason = finish_reason
        return StepOutput(token_id, delta, finish_reason)

    def _release(self, new_text: str, final: bool, check: bool = True) -> tuple[str, bool]:
        """Add decoded text; return the part that can be emitted and whether a stop string was hit
        (``check`` False: stop strings are not looked for yet)."""
        buf = self._pending + new_text
        self._pending = ""
        if not self._stops or not check:
            return buf, False
        hits = [(i, len(s)) for s, i in ((s, buf.find(s)) for s in self._stops) if i >= 0]
        if hits:
            at, length = min(hits)  # the earliest stop string; at one place, the shortest (it completed first)
            return buf[: at + length if self._params.include_stop_str_in_output else at], True
        if final:
            return buf, False
        hold = self._stop_prefix_len(buf)
        self._pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string."""
        for length in range(min(len(buf), self._max_stop - 1), 0, -1):
            tail = buf[-length:]
            if any(len(s) > length and s.startswith(tail) for s in self._stops):
                return length
        return 0
