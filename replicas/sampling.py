"""Batched next-token sampling on logits (torch); the parameters are :mod:`replicas.sampling_params`.

``sample_next_tokens`` picks one token per row of a ``[B, V]`` logits batch. A row's result depends
only on its own logits, parameters and generator, never on the other rows of the batch: the
decision whether to sort a row (for top-k / top-p) is taken from that row's parameters alone, and
each seeded row draws from its own ``torch.Generator``.

``sample_batch`` is what the engine's prefill and decode paths call: it applies each row's logits
processors (:mod:`replicas.logits_processing`: bias, ``min_tokens``, penalties), samples, computes
the log probabilities a row asked for, and records the sampled tokens in each request's history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from replicas.engine_types import TokenLogprob
from replicas.logits_processing import TokenHistory, process_logits, token_logprobs
from replicas.sampling_params import SamplingParams

if TYPE_CHECKING:  # llguidance: only structured output loads it
    from replicas.structured_output import RequestGrammar


class RequestSampler:
    """Per-request sampling state: the parameters and the request's random generator.

    A seeded request gets a ``torch.Generator`` on ``device`` seeded with ``params.seed``, so the
    same seed and logits always give the same tokens. An unseeded request has ``generator`` None
    and draws from torch's default generator (which lets unseeded rows be sampled in one call).
    ``history`` holds the request's prompt and generated tokens for its penalties and ``min_tokens``
    (``stop_ids``: the tokens ``min_tokens`` masks, i.e. the end-of-sequence ids unless ``ignore_eos``
    and ``stop_token_ids``).
    """

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu", *,
                 prompt_ids: Sequence[int] = (), eos_token_ids: Sequence[int] = ()) -> None:
        self.params = params
        stop_ids = (*(() if params.ignore_eos else eos_token_ids), *params.stop_token_ids)
        self.history = TokenHistory(params, prompt_ids, tuple(dict.fromkeys(stop_ids)))
        self.grammar: RequestGrammar | None = None  # set by the engine for structured output
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    def sample(self, logits: torch.Tensor) -> int:
        """Sample one token from a ``[V]`` logits vector (recorded in the history)."""
        return sample_batch(logits.unsqueeze(0), [self])[0][0]


def sample_batch(
    logits: torch.Tensor, samplers: Sequence[RequestSampler]
) -> list[tuple[int, TokenLogprob | None]]:
    """Process, sample and record one token per row of ``logits`` [B, V]; returns (token, logprob)
    per row (logprob None unless the row's ``params.logprobs`` is set)."""
    params = [s.params for s in samplers]
    processed = process_logits(logits, [s.history for s in samplers])
    if any(s.grammar is not None for s in samplers):
        from replicas.structured_output import apply_grammars

        grammars = [s.grammar for s in samplers]
        processed = apply_grammars(processed, grammars)
    tokens = sample_next_tokens(processed, params, [s.generator for s in samplers])
    logprobs = token_logprobs(logits, tokens, params)
    picked = tokens.tolist()
    for sampler, token in zip(samplers, picked):
        sampler.history.record(token)
        if sampler.grammar is not None:
            sampler.grammar.accept(token)
    return list(zip(picked, logprobs))


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One sample per row of non-negative ``probs`` [n, V]; returns int64 [n]."""
    out = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        idx = torch.tensor(unseeded, device=probs.device)
        out[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if seeded:
        picks = []
        for i in seeded:
            g = generators[i]
            assert g is not None
            row = probs[i] if g.device == probs.device else probs[i].to(g.device)
            picks.append(torch.multinomial(row, 1, generator=g).to(probs.device))
        out[torch.tensor(seeded, device=probs.device)] = torch.cat(picks)
    # Guard: never return a zero-probability token (fall back to the most likely one).
    chosen = probs.gather(1, out.unsqueeze(1)).squeeze(1)
    return torch.where(chosen > 0, out, probs.argmax(dim=1))


def _filtered_draw(
    scaled: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Top-k then top-p on temperature-scaled logits [n, V], sampled in sorted order."""
    n, vocab = scaled.shape
    device = scaled.device
    values, order = scaled.sort(dim=1, descending=True, stable=True)
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    if bool((ks < vocab).any()):
        positions = torch.arange(vocab, device=device)
        values.masked_fill_(positions.unsqueeze(0) >= ks.unsqueeze(1), float("-inf"))
    probs = torch.softmax(values, dim=1)
    # Nucleus: keep position j iff the mass strictly before it is < top_p (position 0 always kept).
    # Rows with top_p == 1 get a threshold no cumulative sum reaches, so rounding never drops tokens.
    thresholds = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=device)
    if bool((thresholds < 1.0).any()) and vocab > 1:
        before = probs.cumsum(dim=1)[:, :-1]
        drop = before >= thresholds.unsqueeze(1)
        probs[:, 1:].masked_fill_(drop, 0.0)
    picks = _draw(probs, generators)
    return order.gather(1, picks.unsqueeze(1)).squeeze(1)


def sample_next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Pick the next token for each row of ``logits`` [B, V]; returns int64 [B] on the logits' device.

    Greedy rows take the argmax (lowest index on ties). Other rows are scaled by their temperature
    (in float32), restricted by ``min_p`` (tokens whose probability is below ``min_p`` times the most
    likely one's are dropped), by top-k and then top-p (the smallest set of most likely tokens whose
    probability reaches ``top_p``; the top token is always kept), and sampled with the row's
    generator (``None``: torch's default generator).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(f"got {batch} logits rows, {len(params)} params and {len(generators)} generators")
    device = logits.device
    out = torch.empty(batch, dtype=torch.int64, device=device)
    groups: dict[str, list[int]] = {"greedy": [], "plain": [], "filtered": []}
    for i, p in enumerate(params):
        groups["greedy" if p.is_greedy else "filtered" if p.needs_filter else "plain"].append(i)
    for kind, rows in groups.items():
        if not rows:
            continue
        idx = torch.tensor(rows, device=device)
        if kind == "greedy":
            out[idx] = logits[idx].argmax(dim=1)
            continue
        temps = torch.tensor([params[i].temperature for i in rows], device=device, dtype=torch.float32)
        scaled = logits[idx].float().div_(temps.unsqueeze(1))
        min_ps = [params[i].min_p for i in rows]
        if any(m > 0 for m in min_ps):  # p < min_p * p_max  <=>  logit < max_logit + log(min_p)
            floor = torch.tensor(min_ps, device=device, dtype=torch.float32).log().unsqueeze(1)
            scaled.masked_fill_(scaled < scaled.max(dim=1, keepdim=True).values + floor, float("-inf"))
        row_params = [params[i] for i in rows]
        row_gens = [generators[i] for i in rows]
        if kind == "plain":
            out[idx] = _draw(torch.softmax(scaled, dim=1), row_gens)
        else:
            out[idx] = _filtered_draw(scaled, row_params, row_gens)
    return out
