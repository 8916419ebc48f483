"""Per-request token history and the batched logits processors applied before sampling.

vLLM's order and semantics (``vllm/v1/sample/sampler.py``): ``allowed_token_ids`` masks every
other token, ``logit_bias`` is added and
``min_tokens`` masks the stop tokens (end-of-sequence unless ``ignore_eos``, and ``stop_token_ids``)
while fewer than ``min_tokens`` tokens were generated; then the penalties: ``repetition_penalty``
over every token seen in the prompt or the output (a positive logit is divided by it, a negative one
multiplied), then ``frequency_penalty * count`` and ``presence_penalty * (count > 0)`` subtracted
over the output tokens only (OpenAI's definition). Rows that ask for none of these are untouched,
and a batch where no row asks for any is returned as is (no copy): the common path costs nothing.

Log probabilities (:func:`token_logprobs`) are vLLM's default ``logprobs_mode="raw_logprobs"``:
the log-softmax of the model's logits before any processing (penalties, bias, temperature, top-k/p).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from replicas.engine_types import TokenLogprob
from replicas.sampling_params import SamplingParams


class TokenHistory:
    """What one request generated so far, and the counts its penalties need (built on first use)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = (),
                 stop_ids: Sequence[int] = ()) -> None:
        self.params = params
        self.prompt_ids = tuple(prompt_ids)
        self.stop_ids = tuple(stop_ids)
        self.output_ids: list[int] = []
        self._counts: torch.Tensor | None = None
        self._prompt_mask: torch.Tensor | None = None
        self._allowed: torch.Tensor | None = None

    def record(self, token_id: int) -> None:
        """Append a sampled token."""
        self.output_ids.append(token_id)
        if self._counts is not None and token_id < self._counts.shape[0]:
            self._counts[token_id] += 1

    def counts(self, vocab: int, device: torch.device) -> torch.Tensor:
        """float32 [vocab]: how often each token was generated."""
        if self._counts is None or self._counts.shape[0] != vocab or self._counts.device != device:
            counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            ids = torch.tensor([t for t in self.output_ids if t < vocab], dtype=torch.int64, device=device)
            counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
            self._counts = counts
        return self._counts

    def prompt_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """bool [vocab]: the tokens of the prompt."""
        if self._prompt_mask is None or self._prompt_mask.shape[0] != vocab or self._prompt_mask.device != device:
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor([t for t in self.prompt_ids if 0 <= t < vocab], dtype=torch.int64, device=device)
            mask[ids] = True
            self._prompt_mask = mask
        return self._prompt_mask


    def allowed_index(self, vocab: int, device: torch.device) -> torch.Tensor:
        """int64 ids of ``allowed_token_ids`` inside the vocabulary (built once per request)."""
        if self._allowed is None or self._allowed.device != device:
            self._allowed = torch.tensor([t for t in self.params.allowed_token_ids if t < vocab],
                                         dtype=torch.int64, device=device)
        return self._allowed


def process_logits(logits: torch.Tensor, histories: Sequence[TokenHistory]) -> torch.Tensor:
    """``logits`` [B, V] with each row's bias, ``min_tokens`` mask and penalties applied (float32 copy),
    or ``logits`` itself when no row asks for any. Token ids outside the vocabulary are ignored."""
    rows = [i for i, h in enumerate(histories) if h.params.processes_logits]
    if not rows:
        return logits
    out = logits.float().clone()
    batch_rows, vocab = out.shape
    device = out.device
    _mask_disallowed(out, [(i, histories[i].allowed_index(vocab, device)) for i in rows
                           if histories[i].params.allowed_token_ids])
    bias_at: list[tuple[int, int]] = []
    bias_by: list[float] = []
    mask_at: list[tuple[int, int]] = []
    for i in rows:
        h = histories[i]
        for token, bias in h.params.logit_bias:
            if token < vocab:
                bias_at.append((i, token))
                bias_by.append(bias)
        if len(h.output_ids) < h.params.min_tokens:
            mask_at.extend((i, t) for t in h.stop_ids if 0 <= t < vocab)
    if bias_at:
        at = torch.tensor(bias_at, dtype=torch.int64, device=device)
        out.index_put_((at[:, 0], at[:, 1]), torch.tensor(bias_by, dtype=torch.float32, device=device),
                       accumulate=True)
    if mask_at:
        at = torch.tensor(mask_at, dtype=torch.int64, device=device)
        out[at[:, 0], at[:, 1]] = float("-inf")
    penalised = [i for i in rows if histories[i].params.has_penalties]
    if penalised:
        _apply_penalties(out, penalised, [histories[i] for i in penalised])
    return out


def _mask_disallowed(out: torch.Tensor, rows: list[tuple[int, torch.Tensor]]) -> None:
    """Set every token of row ``i`` but the ids in ``keep`` to -inf."""
    for i, keep in rows:
        kept = out[i, keep].clone()
        out[i].fill_(float("-inf"))
        out[i, keep] = kept


def _apply_penalties(out: torch.Tensor, rows: list[int], histories: list[TokenHistory]) -> None:
    vocab, device = out.shape[1], out.device
    idx = torch.tensor(rows, dtype=torch.int64, device=device)
    counts = torch.stack([h.counts(vocab, device) for h in histories])
    generated = counts > 0
    seen = generated | torch.stack([h.prompt_mask(vocab, device) for h in histories])

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(h.params, name) for h in histories], dtype=torch.float32,
                            device=device).unsqueeze(1)

    sub = out[idx]
    rep = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * generated.float()
    out[idx] = sub


def prompt_token_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[TokenLogprob]:
    """Prompt logprobs: row ``j`` of ``logits`` [R, V] (raw, float) predicts ``targets[j]``; per row that
    token's log-softmax, its rank (1 + the tokens strictly more likely) and the ``k`` most likely
    tokens (only the first ``len(targets)`` rows count)."""
    rows = len(targets)
    if rows == 0:
        return []
    logp = torch.log_softmax(logits[:rows].float(), dim=1)
    ids = torch.tensor(list(targets), dtype=torch.int64, device=logits.device)
    picked = logp.gather(1, ids.unsqueeze(1))
    ranks = (logp > picked).sum(dim=1).add_(1).tolist()
    chosen = picked.squeeze(1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * rows
    if k > 0:
        values, top_ids = logp.topk(min(k, logp.shape[1]), dim=1)
        tops = [tuple(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
    return [TokenLogprob(int(t), float(c), top, int(r)) for t, c, top, r in zip(targets, chosen, tops, ranks)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   params: Sequence[SamplingParams]) -> list[TokenLogprob | None]:
    """Per row: the sampled token's raw log probability and the ``params.logprobs`` most likely
    tokens (None for rows that did not ask). ``logits`` are the unprocessed model logits [B, V]."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return result
    idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    logp = torch.log_softmax(logits[idx].float(), dim=1)
    chosen = logp.gather(1, tokens[idx].unsqueeze(1)).squeeze(1).tolist()
    k = max(params[i].logprobs or 0 for i in rows)
    top_values, top_ids = logp.topk(min(k, logp.shape[1]), dim=1) if k > 0 else (None, None)
    for j, i in enumerate(rows):
        n = params[i].logprobs or 0
        top: tuple[tuple[int, float], ...] = ()
        if n and top_values is not None and top_ids is not None:
            top = tuple(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist()))
        result[i] = TokenLogprob(int(tokens[i]), float(chosen[j]), top)
    return result
