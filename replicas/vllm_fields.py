"""The sampling fields the vLLM engine kind passes to vLLM's ``/v1/completions``, and the log
probabilities it reads back (torch-free, like :mod:`replicas.vllm_engine`).

Non-neutral penalties, ``min_p``, ``logit_bias``, ``min_tokens``, ``logprobs``, ``n`` and the JSON
schema of structured output (``response_format``) go to vLLM as the same fields (vLLM's semantics
are the native engine's). With ``logprobs``, the body also sets vLLM's ``return_tokens_as_token_ids``,
so each token of the completions logprobs format reads ``"token_id:N"`` and the alternatives map
back to ids: :func:`parse_logprobs`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from replicas.engine_types import TokenLogprob
from replicas.sampling_params import SamplingParams

_TOKEN_ID_PREFIX = "token_id:"


def sampling_fields(params: SamplingParams) -> dict[str, Any]:
    """The non-neutral extra sampling fields of a vLLM ``/v1/completions`` body."""
    body: dict[str, Any] = {}
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
                          ("min_p", 0.0), ("min_tokens", 0)):
        if getattr(params, name) != neutral:
            body[name] = getattr(params, name)
    if params.logit_bias:
        body["logit_bias"] = {str(t): b for t, b in params.logit_bias}
    if params.logprobs is not None:
        body["logprobs"] = params.logprobs
        body["return_tokens_as_token_ids"] = True
    if params.n > 1:  # vLLM's choices carry their index, and seed + i for choice i as the native engine
        body["n"] = params.n
    if params.json_schema is not None:  # vLLM's own structured output (its whitespace default is flexible)
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "response", "schema": json.loads(params.json_schema)}}
    return body


def _token_id(text: str) -> int | None:
    if text.startswith(_TOKEN_ID_PREFIX) and text[len(_TOKEN_ID_PREFIX):].isdecimal():
        return int(text[len(_TOKEN_ID_PREFIX):])
    return None


def parse_logprobs(choice: Mapping[str, Any], ids: Sequence[int], n: int | None) -> tuple[TokenLogprob, ...] | None:
    """One stream choice's ``logprobs`` as entries for ``ids`` (None when not asked for or absent).

    vLLM's ``top_logprobs`` item holds the sampled token besides the ``n`` most likely; sorted by
    value, its first ``n`` are those. A value vLLM sent as null (or no entry) is ``-inf``."""
    data = choice.get("logprobs")
    if n is None or not isinstance(data, Mapping):
        return None
    values: list[Any] = list(data.get("token_logprobs") or ())
    tops: list[Any] = list(data.get("top_logprobs") or ())
    out = []
    for i, token in enumerate(ids):
        value = values[i] if i < len(values) and isinstance(values[i], int | float) else float("-inf")
        alternatives = tops[i] if i < len(tops) and isinstance(tops[i], Mapping) else {}
        ranked = sorted(((tid, float(v)) for k, v in alternatives.items()
                         if (tid := _token_id(str(k))) is not None and isinstance(v, int | float)),
                        key=lambda pair: -pair[1])
        out.append(TokenLogprob(int(token), float(value), tuple(ranked[:n])))
    return tuple(out)
