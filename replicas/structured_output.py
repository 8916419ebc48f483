"""Structured output: a request's JSON schema (``response_format``) or tool-call grammar (a forced
``tool_choice``, :mod:`replicas.tool_grammar`) compiled to a grammar (llguidance), whose token mask
is applied to its logits row in the batched sampler at every step.

Why llguidance (measured on SmolLM2's 49152-token vocabulary, CPU, per decode step of one
sequence; README, "Structured output"): its mask costs ~16 us at the median and stays under ~2 ms
at the worst step, a schema compiles in 1-7 ms, and the wheel has no dependencies. xgrammar's
median mask is similar but its worst steps reach 4-6 ms, it compiles in 11-25 ms and it pulls in
triton and apache-tvm-ffi; outlines-core's regex index takes 0.8 s (a schema) to 7 s (any JSON
object) to build per request.

``json_object`` is the schema ``{"type": "object"}``. A constrained row's logits get ``-inf`` at
every token the grammar does not allow next (after bias and penalties, before temperature and
sampling); once the grammar is complete it allows only end-of-sequence, so the choice stops. Log
probabilities stay the raw model's (vLLM's ``raw_logprobs``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import llguidance
import torch

from replicas.json_grammar import grammar_of, grammar_of_lark
from replicas.sampling_params import SamplingParams

log = logging.getLogger(__name__)
_BITS = 32


class GrammarTokenizer:
    """The model's vocabulary as llguidance sees it (built once per engine: about a second)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))

    def matcher(self, params: SamplingParams) -> RequestGrammar:
        """A fresh matcher for one choice of a request with ``json_schema`` or ``grammar`` set."""
        if params.grammar is not None:
            grammar = grammar_of_lark(params.grammar)
        elif params.json_schema is not None:
            grammar = grammar_of(params.json_schema)
        else:
            raise ValueError("the request has no json_schema or grammar to constrain its output")
        return RequestGrammar(llguidance.LLMatcher(self.tokenizer, grammar), self.vocab_size)


class RequestGrammar:
    """One choice's grammar state: the tokens it allows next, advanced by every sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        if matcher.is_error():
            raise ValueError(f"grammar: {matcher.get_error()}")
        self.matcher = matcher
        self.words = -(-vocab_size // _BITS)
        self.failed = False

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask into ``row`` (int32 [words], contiguous, on the CPU)."""
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token: int) -> None:
        """Advance past a sampled token; a token the grammar refuses (every allowed one was masked by
        something else) stops constraining this choice, with a warning."""
        if self.failed:
            return
        if not self.matcher.consume_token(token) or self.matcher.is_error():
            self.failed = True
            log.warning("structured output: token %d left the grammar (%s); no longer constrained", token,
                        self.matcher.get_error())


def apply_grammars(logits: torch.Tensor, grammars: Sequence[RequestGrammar | None]) -> torch.Tensor:
    """``logits`` [B, V] with ``-inf`` at the tokens each constrained row's grammar forbids (a float32
    copy), or ``logits`` itself when no row is constrained."""
    rows = [i for i, g in enumerate(grammars) if g is not None and not g.failed]
    if not rows:
        return logits
    out = logits.float().clone()
    vocab = out.shape[1]
    words = -(-vocab // _BITS)
    masks = torch.zeros(len(rows), words, dtype=torch.int32)
    for j, i in enumerate(rows):
        grammar = grammars[i]
        assert grammar is not None
        grammar.fill(masks[j])
    shifts = torch.arange(_BITS, dtype=torch.int32)
    allowed = ((masks.unsqueeze(2) >> shifts) & 1).reshape(len(rows), words * _BITS)[:, :vocab].bool()
    idx = torch.tensor(rows, dtype=torch.int64, device=out.device)
    out[idx] = out[idx].masked_fill(~allowed.to(out.device), float("-inf"))
    return out
