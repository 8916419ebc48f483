"""OpenAI-compatible request parsing: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

``parse_completion_request`` / ``parse_chat_request`` turn a raw body and its headers into a
:class:`GenerateRequest` (sampling parameters, resolved SLO, stream flags, the prompt as text /
messages and, given a tokenizer, as token ids) or raise :class:`~router.api_errors.APIError`
naming the offending field. Pure Python: no Ray, no FastAPI.

Choices (status codes in :mod:`router.api_errors`):

* Unknown top-level fields are a 400 naming them. Harmless OpenAI fields are accepted at their
  neutral value (empty ``suffix``, ``store`` false, the deprecated ``functions``/``function_call``
  empty or none/auto); other values are 422 ``unsupported_parameter`` (:mod:`router.neutral_fields`).
  ``user``, ``metadata`` and ``service_tier`` are type-checked and ignored.
* Chat ``tools`` / ``tool_choice`` (:mod:`router.tool_calls`) reach the prompt (:mod:`router.tool_prompt`);
  a forced choice sets ``SamplingParams.grammar`` (not with a JSON ``response_format``: 400 naming
  ``tool_choice``); replies are parsed for calls when the response is built (:mod:`router.tool_parser`).
* Sampling: ``presence_penalty``/``frequency_penalty`` in [-2, 2], ``repetition_penalty`` > 0,
  ``min_p`` in [0, 1], ``logit_bias`` (token id string -> bias in [-100, 100]; ids must be in the
  vocabulary), ``min_tokens`` (vLLM, at most ``max_tokens``). Log probabilities: completions take
  ``logprobs`` as an integer in [0, 20] (OpenAI allows 5; 20 is vLLM's limit); chat takes
  ``logprobs`` true with ``top_logprobs`` in [0, 20] (``top_logprobs`` > 0 needs ``logprobs`` true).
* ``n`` in [1, 128] choices, prefilled once (:mod:`replicas.parallel_sampling`); with ``seed``, choice
  ``i`` samples with ``seed + i`` (vLLM's convention). Completions' ``best_of`` must be at least
  ``n``; above ``n`` it is 422 (vLLM's V1 engine refuses it too). Completions' ``echo`` puts the
  prompt before each choice's text and, with ``logprobs``, the prompt tokens' log probabilities
  before the generated ones (the first prompt token's is null), as vLLM's server. vLLM's
  ``prompt_logprobs`` (0..20) adds them in vLLM's format to a non-streaming body (completions: each
  choice's ``prompt_logprobs``; chat: the body's), streams do not carry them.
* ``response_format`` (both endpoints, as vLLM): ``json_object`` or ``json_schema`` (``name`` and
  ``schema`` required; the schema must compile, else 400 naming
  ``response_format.json_schema.schema``) constrain the output (:mod:`replicas.structured_output`).
* ``prompt`` is one string or one list of token ids; a one-element list of those is the same
  prompt; several prompts are 422 ("batched prompts unsupported").
* ``temperature`` is limited to [0, 2] as in OpenAI; vLLM extensions ``top_k``, ``stop_token_ids``
  and ``ignore_eos`` are accepted.
* ``max_tokens`` defaults to ``config.default_max_tokens`` (16, as OpenAI completions); for chat
  (``max_tokens`` or ``max_completion_tokens``) it defaults to the rest of the context when the
  prompt length and ``max_model_len`` are known. Either way it is capped by ``max_tokens_limit``.
* A prompt that does not fit the context is a 400 with code ``context_length_exceeded``: param
  ``prompt``/``messages`` if the prompt alone leaves no room, else the max-tokens field.
* ``stream_options`` is only allowed with ``stream: true``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import jinja2

from replicas.errors import InvalidRequestError
from replicas.prefix_hash import PrefixNaming
from replicas.sampling_params import MAX_LOGPROBS, MAX_N, MAX_SEED, SamplingParams
from router.api_errors import APIError
from router.chat_messages import parse_messages
from router.neutral_fields import check_neutral_chat, check_neutral_common, check_neutral_completion
from router.request_fields import MAX_INT, BodyFields, decode_json_object, is_int, type_name
from router.response_format import response_format_schema
from router.slo import ResolvedSLO, SLOPolicy
from router.tool_calls import ToolsRequest, parse_tools
from router.tool_prompt import encode_chat_request
from state.clock import WALL_CLOCK

DEFAULT_MAX_BODY_BYTES = 1 << 20
MAX_TOKEN_ID = 2**31 - 1

_COMMON_FIELDS = frozenset({
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "stop_token_ids", "ignore_eos", "n", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "min_p", "logit_bias", "logprobs", "user", "priority", "slo_class", "service_tier", "min_tokens",
    "prompt_logprobs",
})
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix", "response_format"}
CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "store", "metadata", "modalities",
}

Endpoint = Literal["completions", "chat.completions"]


class PromptTokenizer(Protocol):
    """What parsing needs of :class:`replicas.model.tokenizer.Tokenizer`."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class ProtocolConfig:
    """What request parsing needs to know about the deployment.

    ``max_model_len`` and ``vocab_size`` (None: unknown) enable the context and token-id checks;
    ``prefix_naming`` (None: replicas have no prefix cache) names a prompt's prefix for placement.
    """

    served_models: tuple[str, ...]
    slo_policy: SLOPolicy = field(default_factory=SLOPolicy.default)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_model_len: int | None = None
    vocab_size: int | None = None
    default_max_tokens: int = 16
    max_tokens_limit: int | None = None
    prefix_naming: PrefixNaming | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "served_models", tuple(self.served_models))
        if not self.served_models or not all(isinstance(m, str) and m for m in self.served_models):
            raise ValueError(f"served_models must be non-empty strings, got {self.served_models!r}")
        for name in ("max_body_bytes", "max_model_len", "vocab_size", "default_max_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class GenerateRequest:
    """A validated generation request, ready for placement and the engine.

    ``prompt`` (completions, when given as text) or ``messages`` (chat, validated by
    :func:`router.chat_messages.parse_messages`) hold the input; ``tools`` (chat) its tools and tool choice;
    ``prompt_token_ids`` is set when a tokenizer was passed or the prompt was given as token ids.
    ``request_id`` doubles as the response ``id``; ``created`` is the response timestamp (s).
    """

    request_id: str
    endpoint: Endpoint
    model: str
    sampling: SamplingParams
    slo: ResolvedSLO
    stream: bool = False
    include_usage: bool = False
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    tools: ToolsRequest | None = None
    user: str | None = None
    echo: bool = False
    prompt_logprobs: int | None = None  # vLLM's field: the body carries them in vLLM's format
    created: int = 0
    arrival_time: float = 0.0

    @property
    def num_prompt_tokens(self) -> int | None:
        """Prompt length in tokens, if known."""
        return None if self.prompt_token_ids is None else len(self.prompt_token_ids)


def parse_completion_request(
    body: bytes,
    headers: Mapping[str, str],
    config: ProtocolConfig,
    *,
    tokenizer: PromptTokenizer | None = None,
    request_id: str | None = None,
    now: float | None = None,
) -> GenerateRequest:
    """Parse a ``POST /v1/completions`` body; raises :class:`APIError`."""
    f = BodyFields(decode_json_object(body, config.max_body_bytes))
    f.reject_unknown(COMPLETION_FIELDS)
    model = _model(f, config)
    text, ids = _prompt(f, config)
    check_neutral_common(f, chat=False)
    check_neutral_completion(f)
    if ids is None and tokenizer is not None and text is not None:
        ids = tuple(tokenizer.encode(text, add_special_tokens=True))
    return _finish(f, headers, config, "completions", model, request_id, now, text=text, ids=ids, prompt_param="prompt")


def parse_chat_request(
    body: bytes,
    headers: Mapping[str, str],
    config: ProtocolConfig,
    *,
    tokenizer: PromptTokenizer | None = None,
    request_id: str | None = None,
    now: float | None = None,
) -> GenerateRequest:
    """Parse a ``POST /v1/chat/completions`` body; raises :class:`APIError`."""
    f = BodyFields(decode_json_object(body, config.max_body_bytes))
    f.reject_unknown(CHAT_FIELDS)
    model = _model(f, config)
    messages = parse_messages(f.data.get("messages"))
    check_neutral_common(f, chat=True)
    check_neutral_chat(f)
    tools = parse_tools(f)
    ids = None
    if tokenizer is not None:
        try:
            ids = tuple(encode_chat_request(tokenizer, messages, tools))
        except jinja2.TemplateError as exc:  # e.g. the template's raise_exception("roles must alternate")
            raise APIError.invalid("messages", f"messages rejected by the chat template: {exc}") from None
    return _finish(
        f, headers, config, "chat.completions", model, request_id, now,
        messages=tuple(messages), ids=ids, prompt_param="messages", tools=tools,
    )


def _model(f: BodyFields, config: ProtocolConfig) -> str:
    model = f.string("model", required=True)
    assert model is not None
    if model not in config.served_models:
        raise APIError.model_not_found(model, list(config.served_models))
    return model


def _token_ids(value: list[Any], config: ProtocolConfig, param: str) -> tuple[int, ...]:
    hi = MAX_TOKEN_ID if config.vocab_size is None else config.vocab_size - 1
    for i, t in enumerate(value):
        if not is_int(t) or not 0 <= t <= hi:
            raise APIError.invalid(param, f"{param}[{i}] must be a token id in [0, {hi}], got {t!r}")
    return tuple(value)


def _prompt(f: BodyFields, config: ProtocolConfig) -> tuple[str | None, tuple[int, ...] | None]:
    """The prompt as (text, None) or (None, token ids)."""
    if not f.given("prompt"):
        raise APIError.invalid("prompt", "prompt is required")
    value = f.data["prompt"]
    if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
        if len(value) > 1:
            raise APIError.unsupported("prompt", "batched prompts unsupported: send one prompt per request")
        value = value[0]
    if isinstance(value, str):
        return BodyFields({"prompt": value}).string("prompt", non_empty=True), None
    if isinstance(value, list):
        if not value:
            raise APIError.invalid("prompt", "prompt must not be empty")
        return None, _token_ids(value, config, "prompt")
    raise APIError.invalid("prompt", f"prompt must be a string or an array of token ids, got {type_name(value)}")


def _stream_flags(f: BodyFields) -> tuple[bool, bool]:
    stream = bool(f.boolean("stream"))
    options = f.obj("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise APIError.invalid("stream_options", "stream_options is only allowed when stream is true")
    o = BodyFields(options, "stream_options.")
    o.reject_unknown(frozenset({"include_usage", "continuous_usage_stats"}))
    if o.boolean("continuous_usage_stats"):
        param = "stream_options.continuous_usage_stats"
        raise APIError.unsupported(param, f"{param} is not supported")
    return stream, bool(o.boolean("include_usage"))


def _stop(f: BodyFields) -> tuple[str, ...]:
    value = f.data.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise APIError.invalid("stop", f"stop must be a string or an array of strings, got {type_name(value)}")
    return tuple(BodyFields({"stop": s}).string("stop") or "" for s in items)


def _max_tokens(f: BodyFields, config: ProtocolConfig, chat: bool, prompt_len: int | None) -> tuple[int, str, bool]:
    """(max_tokens, the field it came from, whether it was given explicitly)."""
    key = "max_tokens"
    value = f.integer("max_tokens", 1, MAX_INT)
    if chat:
        newer = f.integer("max_completion_tokens", 1, MAX_INT)
        if newer is not None:
            if value is not None and value != newer:
                raise APIError.invalid("max_completion_tokens", "max_tokens and max_completion_tokens differ")
            value, key = newer, "max_completion_tokens"
    limit = config.max_tokens_limit
    if value is not None:
        if limit is not None and value > limit:
            raise APIError.invalid(key, f"{key} must be at most {limit}, got {value}")
        return value, key, True
    default = config.default_max_tokens
    if chat and prompt_len is not None and config.max_model_len is not None:
        default = max(1, config.max_model_len - prompt_len)
    return (default if limit is None else min(default, limit)), key, False


def _finish(
    f: BodyFields,
    headers: Mapping[str, str],
    config: ProtocolConfig,
    endpoint: Endpoint,
    model: str,
    request_id: str | None,
    now: float | None,
    *,
    prompt_param: str,
    text: str | None = None,
    ids: tuple[int, ...] | None = None,
    messages: tuple[dict[str, Any], ...] | None = None,
    tools: ToolsRequest | None = None,
) -> GenerateRequest:
    chat = endpoint == "chat.completions"
    stream, include_usage = _stream_flags(f)
    prompt_len = None if ids is None else len(ids)
    max_tokens, max_key, explicit = _max_tokens(f, config, chat, prompt_len)
    n = _n(f, chat)
    echo = not chat and bool(f.boolean("echo"))
    logprobs = _logprobs(f, chat)
    wanted_prompt = f.integer("prompt_logprobs", 0, MAX_LOGPROBS)
    scored = [k for k in (logprobs if echo else None, wanted_prompt) if k is not None]
    _check_context(config, prompt_len, max_tokens, prompt_param, max_key if explicit else prompt_param)
    json_schema = response_format_schema(f)
    grammar = tools.grammar() if tools is not None else None
    if grammar is not None and json_schema is not None:
        raise APIError.invalid("tool_choice", "a tool_choice that forces tool calls cannot be combined with a "
                                              "response_format that constrains the reply to JSON")
    try:
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=_default(f.number("temperature", 0.0, 2.0), 1.0),
            top_p=_default(f.number("top_p", 0.0, 1.0, open_lo=True), 1.0),
            top_k=_default(f.integer("top_k", -1, MAX_INT), 0),
            seed=f.integer("seed", 0, MAX_SEED),
            stop=_stop(f),
            stop_token_ids=_token_ids(f.array("stop_token_ids") or [], config, "stop_token_ids"),
            ignore_eos=bool(f.boolean("ignore_eos")),
            presence_penalty=_default(f.number("presence_penalty", -2.0, 2.0), 0.0),
            frequency_penalty=_default(f.number("frequency_penalty", -2.0, 2.0), 0.0),
            repetition_penalty=_default(f.number("repetition_penalty", 0.0, float("inf"), open_lo=True), 1.0),
            min_p=_default(f.number("min_p", 0.0, 1.0), 0.0),
            logit_bias=f.obj("logit_bias") or {},
            min_tokens=_min_tokens(f, max_tokens),
            logprobs=logprobs,
            n=n,
            prompt_logprobs=max(scored) if scored else None,
            json_schema=json_schema,
            grammar=grammar,
        )
        if config.vocab_size is not None:
            sampling.check_vocab(config.vocab_size)
    except InvalidRequestError as exc:
        raise APIError.from_invalid_request(exc) from None
    slo = config.slo_policy.resolve(headers, f.string("slo_class"), f.integer("priority"))
    arrival = WALL_CLOCK() if now is None else now
    prefix = "chatcmpl" if chat else "cmpl"
    return GenerateRequest(
        request_id=request_id or f"{prefix}-{uuid.uuid4().hex}",
        endpoint=endpoint,
        model=model,
        sampling=sampling,
        slo=slo,
        stream=stream,
        include_usage=include_usage,
        prompt=text,
        prompt_token_ids=ids,
        messages=messages,
        tools=tools,
        user=f.string("user"),
        echo=echo,
        prompt_logprobs=wanted_prompt,
        created=int(arrival),
        arrival_time=arrival,
    )


def _n(f: BodyFields, chat: bool) -> int:
    """``n``, checked against completions' ``best_of`` (which may only repeat it)."""
    n = f.integer("n", 1, MAX_N) or 1
    best_of = None if chat else f.integer("best_of", 1, MAX_N)
    if best_of is not None and best_of < n:
        raise APIError.invalid("best_of", f"best_of ({best_of}) must be at least n ({n})")
    if best_of is not None and best_of > n:
        raise APIError.unsupported("best_of", f"best_of > n is not supported (best_of {best_of}, n {n}); vLLM's "
                                              "V1 engine refuses it too: ask for n choices and rank them")
    return n


def _min_tokens(f: BodyFields, max_tokens: int) -> int:
    value = f.integer("min_tokens", 0, MAX_INT) or 0
    if value > max_tokens:
        raise APIError.invalid("min_tokens", f"min_tokens ({value}) must be at most max_tokens ({max_tokens})")
    return value


def _logprobs(f: BodyFields, chat: bool) -> int | None:
    """How many alternatives per token to return (None: no logprobs), from either endpoint's fields."""
    if not chat:
        return f.integer("logprobs", 0, MAX_LOGPROBS)
    wanted = f.boolean("logprobs")
    top = f.integer("top_logprobs", 0, MAX_LOGPROBS)
    if top and not wanted:
        raise APIError.invalid("top_logprobs", "top_logprobs requires logprobs to be true")
    return (top or 0) if wanted else None


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _check_context(
    config: ProtocolConfig, prompt_len: int | None, max_tokens: int, prompt_param: str, over_param: str
) -> None:
    limit = config.max_model_len
    if limit is None or prompt_len is None or prompt_len + max_tokens <= limit:
        return
    param = prompt_param if prompt_len >= limit else over_param
    raise APIError.invalid(
        param,
        f"This model's maximum context length is {limit} tokens; the request needs {prompt_len + max_tokens} "
        f"({prompt_len} in the {prompt_param}, {max_tokens} for the completion)",
        "context_length_exceeded",
    )
