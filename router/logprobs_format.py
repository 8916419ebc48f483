"""Log probabilities in OpenAI's response formats, from the engine's per-token entries.

An entry is what a replica sends per sampled token (:class:`replicas.engine_types.TokenLogprob`, as
an object or as its dict): the token id, its log probability and the requested number of most
likely alternatives. The values are vLLM's default ``raw_logprobs``: the log-softmax of the model's
logits before penalties, bias and temperature. A token's text is its id decoded alone, special
tokens included. ``-inf`` (not JSON) is clamped to -9999.0, as vLLM does.

* completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (with ``echo``, the
  prompt tokens first; the first one's ``token_logprobs`` and ``top_logprobs`` are null); each
  ``top_logprobs`` item maps token text to logprob for the sampled token and the ``logprobs`` most
  likely ones (as vLLM); ``text_offset`` is the running character offset of each token in the text.
* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``; ``top_logprobs``
  holds the ``top_logprobs`` most likely tokens, most likely first; ``bytes`` is the token text's
  UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from replicas.engine_types import TokenLogprob

MIN_LOGPROB = -9999.0
TokenText = Callable[[int], str]
LogprobEntry = TokenLogprob | Mapping[str, Any]  # a replica's entry: the object, or its dict after Serve


def entry_fields(raw: LogprobEntry) -> tuple[int, float | None, list[tuple[int, float]]]:
    """(token id, logprob, [(alternative id, logprob), ...]) of an entry, an object or its dict; the
    logprob is None for the first prompt token (echo), which has none."""
    if isinstance(raw, TokenLogprob):
        token_id, logprob, top = raw.token_id, raw.logprob, raw.top
    else:
        token_id, logprob, top = raw["token_id"], raw["logprob"], raw.get("top") or ()
    return int(token_id), None if logprob is None else float(logprob), [(int(t), float(v)) for t, v in top]


def clamp_logprob(value: float) -> float:
    """``value`` with ``-inf`` (and anything lower) raised to -9999.0."""
    return max(value, MIN_LOGPROB)


def vllm_prompt_logprobs(entries: Iterable[LogprobEntry], token_text: TokenText,
                         top_n: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or ``{"<token id>": {"logprob",
    "rank", "decoded_token"}}`` for the prompt token and the ``top_n`` most likely ones."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for raw in entries:
        token_id, logprob, top = entry_fields(raw)
        if logprob is None:
            out.append(None)
            continue
        rank = raw.rank if isinstance(raw, TokenLogprob) else raw.get("rank")
        item = {str(token_id): {"logprob": clamp_logprob(logprob), "rank": rank, "decoded_token": token_text(token_id)}}
        for position, (alt, value) in enumerate(top[:top_n], 1):
            item.setdefault(str(alt), {"logprob": clamp_logprob(value), "rank": position,
                                       "decoded_token": token_text(alt)})
        out.append(item)
    return out


class LogprobsFormatter:
    """Formats entries for one request's endpoint, with at most ``top_n`` alternatives per token;
    completions' ``text_offset`` runs across calls (one per streamed chunk, or one for a body)."""

    def __init__(self, token_text: TokenText, chat: bool, top_n: int = 0) -> None:
        self.token_text = token_text
        self.chat = chat
        self.top_n = top_n
        self.offset = 0

    def format(self, entries: Iterable[LogprobEntry]) -> dict[str, Any]:
        """The ``logprobs`` object of a choice for ``entries`` (in token order)."""
        parsed = [(t, lp, top[: self.top_n]) for t, lp, top in (entry_fields(e) for e in entries)]
        return self._chat(parsed) if self.chat else self._completion(parsed)

    def _chat(self, parsed: Sequence[tuple[int, float | None, list[tuple[int, float]]]]) -> dict[str, Any]:
        def item(token_id: int, logprob: float | None) -> dict[str, Any]:
            text = self.token_text(token_id)
            value = clamp_logprob(MIN_LOGPROB if logprob is None else logprob)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", "replace"))}

        return {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in top]}
                            for t, lp, top in parsed]}

    def _completion(self, parsed: Sequence[tuple[int, float | None, list[tuple[int, float]]]]) -> dict[str, Any]:
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token_id, logprob, top in parsed:
            text = self.token_text(token_id)
            tokens.append(text)
            if logprob is None:  # the first prompt token under echo: null, as vLLM
                values.append(None)
                tops.append(None)
            else:
                values.append(clamp_logprob(logprob))
                alternatives = {text: clamp_logprob(logprob)}
                for alt, value in top:
                    alternatives.setdefault(self.token_text(alt), clamp_logprob(value))
                tops.append(alternatives)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
