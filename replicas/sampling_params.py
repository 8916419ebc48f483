"""Sampling parameters and their validation (no torch: the router and every engine kind use them).

The batched sampler that applies them to logits is :mod:`replicas.sampling`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from replicas.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1
# Temperatures below this are treated as greedy: dividing logits by them overflows float32.
MIN_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # top_logprobs / completions logprobs, as vLLM's default max_logprobs
MAX_LOGIT_BIAS = 100.0
MAX_TOKEN_ID = 2**31 - 1
MAX_N = 128  # choices per request (OpenAI's limit for n)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type_name(value: object) -> str:
    return type(value).__name__


def _normalise_stop(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, list | tuple):
        raise InvalidRequestError("stop", f"stop must be a string or a list of strings, got {_type_name(value)}")
    if len(value) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", f"stop allows at most {MAX_STOP_STRINGS} strings, got {len(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s:
            raise InvalidRequestError("stop", f"stop[{i}] must be a non-empty string, got {s!r}")
    return tuple(value)


def _normalise_token_ids(value: object, name: str = "stop_token_ids") -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidRequestError(name, f"{name} must be a list of integers, got {_type_name(value)}")
    for i, t in enumerate(value):
        if not _is_int(t) or t < 0:
            raise InvalidRequestError(name, f"{name}[{i}] must be a non-negative integer, got {t!r}")
    return tuple(value)


def _normalise_logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` (keys as OpenAI's strings or ints) as sorted ``(id, bias)`` pairs."""
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        value = dict(value)
    if not isinstance(value, Mapping):
        raise InvalidRequestError("logit_bias", f"logit_bias must be an object of token id -> bias, got "
                                                f"{_type_name(value)}")
    pairs: dict[int, float] = {}
    for key, bias in value.items():
        token = key if _is_int(key) else int(key) if isinstance(key, str) and key.isdecimal() else None
        if token is None or not 0 <= token <= MAX_TOKEN_ID:
            raise InvalidRequestError("logit_bias", f"logit_bias keys must be token ids (non-negative integers), "
                                                    f"got {key!r}")
        if not _is_number(bias) or not math.isfinite(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidRequestError("logit_bias", f"logit_bias[{key!r}] must be a number in [-100, 100], "
                                                    f"got {bias!r}")
        pairs[token] = float(bias)
    return tuple(sorted(pairs.items()))


def _check_schema_text(value: object) -> None:
    if not isinstance(value, str):
        raise InvalidRequestError("json_schema", f"json_schema must be a JSON schema as text, got {_type_name(value)}")
    try:
        schema = json.loads(value)
    except ValueError as exc:
        raise InvalidRequestError("json_schema", f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError("json_schema", f"json_schema must be a JSON object, got {_type_name(schema)}")


def _check_range(name: str, value: object, lo: float, hi: float, *, open_lo: bool = False) -> float:
    if not _is_number(value) or not math.isfinite(value) or value > hi or (value <= lo if open_lo else value < lo):
        interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise InvalidRequestError(name, f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    ``temperature`` 0 means greedy; ``top_k`` 0 or -1 disables top-k (stored as 0); ``stop`` also
    accepts a single string or a list and is stored as a tuple. Invalid values raise
    :class:`InvalidRequestError` naming the field.

    Logits processing (vLLM's order and semantics): ``logit_bias`` (token id -> bias in [-100, 100],
    added to the logits; stored as sorted ``(id, bias)`` pairs) and ``min_tokens`` (end-of-sequence
    and ``stop_token_ids`` masked until that many tokens were generated), then the penalties:
    ``repetition_penalty`` (> 0; over prompt and generated tokens, positive logits divided by it,
    negative ones multiplied), ``frequency_penalty`` and ``presence_penalty`` (in [-2, 2], OpenAI's:
    subtract ``frequency * count + presence * (count > 0)`` over generated tokens). Sampling rows
    then apply temperature, ``min_p`` (in [0, 1]: drop tokens below ``min_p`` times the top
    probability), top-k and top-p. ``logprobs`` (None, or 0..20 alternatives) asks for the log
    probability of each sampled token and its ``logprobs`` most likely alternatives.

    ``n`` (1..128) choices are generated from one prefill of the prompt (:mod:`replicas.parallel_sampling`);
    choice ``i`` samples with seed ``seed + i`` (vLLM's convention). ``prompt_logprobs`` (None, or
    0..20 alternatives) asks for the log probability of every prompt token but the first (the
    prompt is then computed in full, never taken from the prefix cache). ``json_schema`` (a JSON
    schema object as text) constrains the output to JSON that validates against it
    (:mod:`replicas.structured_output`; ``json_object`` is ``{"type": "object"}``). ``grammar`` (a Lark
    grammar in llguidance's dialect, which vLLM reads too) constrains it to that grammar instead:
    the router sets it for a forced ``tool_choice`` (:mod:`replicas.tool_grammar`). At most one of the two.
    vLLM's ``skip_special_tokens`` (default true) leaves special tokens out of the text, and
    ``include_stop_str_in_output`` (default false) keeps a matched stop string at the end of it;
    ``allowed_token_ids`` (empty: all) restricts sampling to those tokens (every other one masked
    before the bias and penalties).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    logprobs: int | None = None
    n: int = 1
    prompt_logprobs: int | None = None
    json_schema: str | None = None
    grammar: str | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidRequestError("temperature", f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not _is_number(p) or not math.isfinite(p) or not 0 < p <= 1:
            raise InvalidRequestError("top_p", f"top_p must be in (0, 1], got {p!r}")
        k = self.top_k
        if not _is_int(k) or k < -1:
            raise InvalidRequestError("top_k", f"top_k must be -1, 0 (disabled) or an integer >= 1, got {k!r}")
        s = self.seed
        if s is not None and (not _is_int(s) or not 0 <= s <= MAX_SEED):
            raise InvalidRequestError("seed", f"seed must be an integer in [0, 2**63 - 1] or null, got {s!r}")
        for flag in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidRequestError(flag, f"{flag} must be a boolean, got {getattr(self, flag)!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, _check_range(name, getattr(self, name), -2.0, 2.0))
        object.__setattr__(self, "repetition_penalty",
                           _check_range("repetition_penalty", self.repetition_penalty, 0.0, math.inf, open_lo=True))
        object.__setattr__(self, "min_p", _check_range("min_p", self.min_p, 0.0, 1.0))
        m = self.min_tokens
        if not _is_int(m) or not 0 <= m <= self.max_tokens:
            raise InvalidRequestError("min_tokens", f"min_tokens must be an integer in [0, max_tokens = "
                                                    f"{self.max_tokens}], got {m!r}")
        n = self.logprobs
        if n is not None and (not _is_int(n) or not 0 <= n <= MAX_LOGPROBS):
            raise InvalidRequestError("logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or null, "
                                                  f"got {n!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError("n", f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        pl = self.prompt_logprobs
        if pl is not None and (not _is_int(pl) or not 0 <= pl <= MAX_LOGPROBS):
            raise InvalidRequestError("prompt_logprobs", f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}] "
                                                         f"or null, got {pl!r}")
        if self.json_schema is not None:
            _check_schema_text(self.json_schema)
        if self.grammar is not None:
            if not isinstance(self.grammar, str) or not self.grammar.strip():
                raise InvalidRequestError("grammar", f"grammar must be a non-empty Lark grammar text, got "
                                                     f"{self.grammar!r:.40}")
            if self.json_schema is not None:
                raise InvalidRequestError("grammar", "grammar and json_schema cannot both constrain the output")
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "top_k", max(k, 0))
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_token_ids(self.stop_token_ids))
        object.__setattr__(self, "allowed_token_ids", _normalise_token_ids(self.allowed_token_ids, "allowed_token_ids"))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SamplingParams:
        """Build from a request body; unknown keys are rejected, ``None`` values mean "use the default"."""
        if not isinstance(data, Mapping):
            raise InvalidRequestError("sampling_params", f"sampling_params must be an object, got {_type_name(data)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            names = ", ".join(repr(key) for key in unknown)
            raise InvalidRequestError(unknown[0], f"unknown sampling parameter(s): {names}")
        return cls(**{key: value for key, value in data.items() if value is not None})

    @property
    def is_greedy(self) -> bool:
        """True when the argmax token is always chosen (temperature ~0 or top_k == 1)."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def constrained(self) -> bool:
        """True when a grammar (``json_schema`` or ``grammar``) constrains the output."""
        return self.json_schema is not None or self.grammar is not None

    @property
    def has_penalties(self) -> bool:
        """True when a presence, frequency or repetition penalty changes the logits."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def processes_logits(self) -> bool:
        """True when logits change before sampling: penalties, ``logit_bias``, ``min_tokens`` or
        ``allowed_token_ids``."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0 or bool(self.allowed_token_ids)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise :class:`InvalidRequestError` for a ``logit_bias`` key or an ``allowed_token_ids`` entry
        outside ``[0, vocab_size)``."""
        bad = next((t for t, _ in self.logit_bias if t >= vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("logit_bias", f"logit_bias key {bad} is not a token id of the vocabulary "
                                                    f"(size {vocab_size})")
        bad = next((t for t in self.allowed_token_ids if t >= vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("allowed_token_ids", f"allowed_token_ids entry {bad} is not a token id of the "
                                                           f"vocabulary (size {vocab_size})")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (what :meth:`from_dict` parses); ``logit_bias`` keys become strings."""
        out: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stop"], out["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        out["allowed_token_ids"] = list(self.allowed_token_ids)
        out["logit_bias"] = {str(t): b for t, b in self.logit_bias}
        return out

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice ``index`` of an ``n``-choice request: one choice, seed ``seed + index``
        (wrapping within [0, 2**63 - 1]) when seeded, as vLLM's parallel sampling."""
        seed = None if self.seed is None else (self.seed + index) % (MAX_SEED + 1)
        return replace(self, n=1, seed=seed)

    @property
    def needs_filter(self) -> bool:
        """True when sampling must restrict the vocabulary (top-k or top-p active)."""
        return self.top_k > 0 or self.top_p < 1.0
