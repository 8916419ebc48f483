"""The sampling fields the vLLM engine kind passes to vLLM's ``/v1/completions``, and the log
probabilities it reads back (torch-free, like :mod:`replicas.vllm_engine`).

Non-neutral penalties, ``min_p``, ``logit_bias``, ``min_tokens``, ``logprobs``, ``n`` and the JSON
schema of structured output (``response_format``) go to vLLM as the same fields (vLLM's semantics
are the native engine's). The tool-call grammar of a forced ``tool_choice`` (a Lark grammar with an
embedded JSON schema, :mod:`replicas.tool_grammar`) goes as vLLM's ``structured_outputs.grammar``:
vLLM's default backend choice (``auto``) compiles it with xgrammar, which reads that Lark, else
llguidance. The router renders tools into the prompt and parses the calls out of the text for
both engine kinds, so vLLM needs no tool parser (``--enable-auto-tool-choice``) for this.

With ``logprobs``, the body also sets vLLM's ``return_tokens_as_token_ids``,
so each token of the completions logprobs format reads ``"token_id:N"`` and the alternatives map
back to ids: :func:`parse_logprobs`. ``prompt_logprobs`` goes as vLLM's field of that name (which
vLLM answers only unstreamed, with ranks): :func:`parse_prompt_logprobs`.
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
    if not params.skip_special_tokens:
        body["skip_special_tokens"] = False
    if params.include_stop_str_in_output:
        body["include_stop_str_in_output"] = True
    if params.allowed_token_ids:
        body["allowed_token_ids"] = list(params.allowed_token_ids)
    if params.logit_bias:
        body["logit_bias"] = {str(t): b for t, b in params.logit_bias}
    if params.logprobs is not None:
        body["logprobs"] = params.logprobs
        body["return_tokens_as_token_ids"] = True
    if params.prompt_logprobs is not None:
        body["prompt_logprobs"] = params.prompt_logprobs
    if params.n > 1:  # vLLM's choices carry their index, and seed + i for choice i as the native engine
        body["n"] = params.n
    if params.json_schema is not None:  # vLLM's own structured output (its whitespace default is flexible)
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "response", "schema": json.loads(params.json_schema)}}
    if params.grammar is not None:
        body["structured_outputs"] = {"grammar": params.grammar}
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


def parse_prompt_logprobs(choice: Mapping[str, Any], prompt: Sequence[int],
                          n: int | None) -> tuple[TokenLogprob, ...] | None:
    """A body choice's vLLM ``prompt_logprobs`` (``[null, {"<id>": {"logprob", "rank", ...}}, ...]``) as
    entries for ``prompt`` (None when not asked for or absent): the first token has none; a token
    vLLM sent no entry for is ``-inf`` with no rank."""
    data = choice.get("prompt_logprobs")
    if n is None or not isinstance(data, Sequence) or not prompt:
        return None
    out = [TokenLogprob(int(prompt[0]), None)]
    for i, token in enumerate(prompt[1:], 1):
        entry = data[i] if i < len(data) and isinstance(data[i], Mapping) else {}
        values = {int(k): v for k, v in entry.items() if str(k).isdecimal() and isinstance(v, Mapping)}
        own = values.get(int(token), {})
        value = own.get("logprob")
        rank = own.get("rank")
        ranked = sorted(((tid, float(v["logprob"])) for tid, v in values.items()
                         if isinstance(v.get("logprob"), int | float)), key=lambda pair: -pair[1])
        out.append(TokenLogprob(int(token), float(value) if isinstance(value, int | float) else float("-inf"),
                                tuple(ranked[:n]), rank if isinstance(rank, int) else None))
    return tuple(out)
