"""OpenAI-compatible request parsing: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

``parse_completion_request`` / ``parse_chat_request`` validate a raw body into its pydantic model
(:mod:`router.request_models`, errors from :mod:`router.api_model`), check what needs the deployment
(served models, context length, vocabulary, ``max_tokens`` defaults) and build a
:class:`GenerateRequest` (sampling parameters, resolved SLO, stream flags, the prompt as text /
messages and, given a tokenizer, as token ids), or raise :class:`~router.api_errors.APIError`
naming the offending field. Pure Python: no Ray, no FastAPI.

Choices (status codes in :mod:`router.api_errors`):

* Unknown top-level fields are a 400 naming them. Harmless OpenAI fields are accepted at their
  neutral value (empty ``suffix``, ``store`` false, the deprecated ``functions``/``function_call``
  empty or none/auto); other values are 422 ``unsupported_parameter`` (:mod:`router.request_models`).
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
* ``temperature`` is limited to [0, 2] as in OpenAI; vLLM extensions ``top_k``, ``stop_token_ids``,
  ``ignore_eos``, ``skip_special_tokens``, ``include_stop_str_in_output``, ``allowed_token_ids`` and
  ``truncate_prompt_tokens`` / ``truncation_side`` (the tokenized prompt cut before the context
  check) are accepted; vLLM's
  other fields only at their defaults (:mod:`router.vllm_extras`).
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
from replicas.sampling_params import SamplingParams
from router.api_errors import APIError
from router.api_model import decode_json_object, validate_body
from router.request_models import MAX_TOKEN_ID, ChatCompletionRequest, CompletionRequest, SamplingFields
from router.slo import ResolvedSLO, SLOPolicy
from router.tool_calls import ToolsRequest, parse_tools
from router.tool_prompt import encode_chat_request
from state.clock import WALL_CLOCK

DEFAULT_MAX_BODY_BYTES = 1 << 20

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
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def check_model(self, model: str | None) -> None:
        """404 unless ``model`` (None: not given) is served."""
        if model is not None and model not in self.served_models:
            raise APIError.model_not_found(model, list(self.served_models))

    def check_token_ids(self, ids: list[int] | tuple[int, ...], param: str) -> tuple[int, ...]:
        """``ids`` as a tuple if every one is in the vocabulary, else a 400 naming ``param``."""
        hi = MAX_TOKEN_ID if self.vocab_size is None else self.vocab_size - 1
        for i, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= hi:
                raise APIError.invalid(param, f"{param}[{i}] must be a token id in [0, {hi}], got {t!r}")
        return tuple(ids)


@dataclass(frozen=True)
class GenerateRequest:
    """A validated generation request, ready for placement and the engine.

    ``prompt`` (completions, when given as text) or ``messages`` (chat, validated by
    :class:`router.chat_models.ChatMessage`) hold the input; ``tools`` (chat) its tools and tool choice;
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
    r = validate_body(CompletionRequest, decode_json_object(body, config.max_body_bytes))
    config.check_model(r.model)
    text, ids = (r.prompt, None) if isinstance(r.prompt, str) else (None, config.check_token_ids(r.prompt, "prompt"))
    if ids is None and tokenizer is not None and text is not None:
        ids = tuple(tokenizer.encode(text, add_special_tokens=r.add_special_tokens is not False))
    return _finish(r, headers, config, "completions", request_id, now, text=text, ids=ids, prompt_param="prompt")


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
    r = validate_body(ChatCompletionRequest, decode_json_object(body, config.max_body_bytes))
    config.check_model(r.model)
    messages = chat_messages(r)
    tools = parse_tools(r)
    ids = None
    if tokenizer is not None:
        try:
            ids = tuple(encode_chat_request(tokenizer, messages, tools, r.add_generation_prompt is not False))
        except jinja2.TemplateError as exc:  # e.g. the template's raise_exception("roles must alternate")
            raise APIError.invalid("messages", f"messages rejected by the chat template: {exc}") from None
    return _finish(r, headers, config, "chat.completions", request_id, now,
                   messages=tuple(messages), ids=ids, prompt_param="messages", tools=tools)


def chat_messages(r: ChatCompletionRequest | Any) -> list[dict[str, Any]]:  # noqa: ANN401 (any model with messages)
    """The request's messages as chat templates take them (string content, ``system`` for ``developer``)."""
    from replicas.model.tokenizer import validate_messages

    out = [m.template_dict() for m in r.messages]
    try:
        return validate_messages(out)
    except ValueError as exc:  # pragma: no cover - the models are stricter
        text = str(exc)
        raise APIError.invalid(text.split(":", 1)[0], text) from None


def _max_tokens(r: SamplingFields, config: ProtocolConfig, chat: bool, prompt_len: int | None
                ) -> tuple[int, str, bool]:
    """(max_tokens, the field it came from, whether it was given explicitly)."""
    value, key = r.max_tokens, "max_tokens"
    newer = getattr(r, "max_completion_tokens", None)
    if newer is not None:
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
    r: CompletionRequest | ChatCompletionRequest,
    headers: Mapping[str, str],
    config: ProtocolConfig,
    endpoint: Endpoint,
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
    cut = _truncate(r, ids, config)
    if cut != ids:
        ids, text = cut, None  # echo decodes what was kept
    stream = bool(r.stream)
    include_usage = bool(r.stream_options and r.stream_options.include_usage)
    prompt_len = None if ids is None else len(ids)
    max_tokens, max_key, explicit = _max_tokens(r, config, chat, prompt_len)
    echo = isinstance(r, CompletionRequest) and bool(r.echo)
    logprobs = r.logprob_count
    scored = [k for k in (logprobs if echo else None, r.prompt_logprobs) if k is not None]
    _check_context(config, prompt_len, max_tokens, prompt_param, max_key if explicit else prompt_param)
    json_schema = r.response_format.schema_text() if r.response_format is not None else None
    grammar = tools.grammar() if tools is not None else None
    if grammar is not None and json_schema is not None:
        raise APIError.invalid("tool_choice", "a tool_choice that forces tool calls cannot be combined with a "
                                              "response_format that constrains the reply to JSON")
    min_tokens = r.min_tokens or 0
    if min_tokens > max_tokens:
        raise APIError.invalid("min_tokens", f"min_tokens ({min_tokens}) must be at most max_tokens ({max_tokens})")
    try:
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=_default(r.temperature, 1.0),
            top_p=_default(r.top_p, 1.0),
            top_k=_default(r.top_k, 0),
            seed=r.seed,
            stop=r.stop_strings(),
            stop_token_ids=config.check_token_ids(r.stop_token_ids or [], "stop_token_ids"),
            ignore_eos=bool(r.ignore_eos),
            skip_special_tokens=r.skip_special_tokens is not False,
            include_stop_str_in_output=bool(r.include_stop_str_in_output),
            allowed_token_ids=config.check_token_ids(r.allowed_token_ids or [], "allowed_token_ids"),
            presence_penalty=_default(r.presence_penalty, 0.0),
            frequency_penalty=_default(r.frequency_penalty, 0.0),
            repetition_penalty=_default(r.repetition_penalty, 1.0),
            min_p=_default(r.min_p, 0.0),
            logit_bias=r.logit_bias or {},
            min_tokens=min_tokens,
            logprobs=logprobs,
            n=r.n or 1,
            prompt_logprobs=max(scored) if scored else None,
            json_schema=json_schema,
            grammar=grammar,
        )
        if config.vocab_size is not None:
            sampling.check_vocab(config.vocab_size)
    except InvalidRequestError as exc:
        raise APIError.from_invalid_request(exc) from None
    slo = config.slo_policy.resolve(headers, r.slo_class, r.priority)
    arrival = WALL_CLOCK() if now is None else now
    prefix = "chatcmpl" if chat else "cmpl"
    return GenerateRequest(
        request_id=request_id or f"{prefix}-{uuid.uuid4().hex}",
        endpoint=endpoint,
        model=r.model,
        sampling=sampling,
        slo=slo,
        stream=stream,
        include_usage=include_usage,
        prompt=text,
        prompt_token_ids=ids,
        messages=messages,
        tools=tools,
        user=r.user,
        echo=echo,
        prompt_logprobs=r.prompt_logprobs,
        created=int(arrival),
        arrival_time=arrival,
    )


def _truncate(r: SamplingFields, ids: tuple[int, ...] | None, config: ProtocolConfig) -> tuple[int, ...] | None:
    """The prompt ids after vLLM's ``truncate_prompt_tokens`` (unchanged without it)."""
    param = "truncate_prompt_tokens"
    if r.truncate_prompt_tokens is None:
        if r.truncation_side is not None:
            raise APIError.invalid("truncation_side", "truncation_side needs truncate_prompt_tokens")
        return ids
    if ids is None:
        raise APIError.unsupported(param, f"{param} needs the prompt's token ids (a router with the tokenizer)")
    if r.truncate_prompt_tokens == -1 and config.max_model_len is None:
        raise APIError.unsupported(param, f"{param} -1 needs a known max_model_len")
    return r.truncated(ids, config.max_model_len)


def _default(value: Any, default: Any) -> Any:  # noqa: ANN401
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
