"""The bodies of ``POST /v1/completions``, ``/v1/chat/completions``, ``/tokenize`` and ``/detokenize``
as pydantic models (:class:`~router.api_model.APIModel`: strict, unknown fields refused, ``null`` is
"not given"). What the fields mean, and the rules that need the deployment (served models, context
length, vocabulary): :mod:`router.protocol`.

Ranges (400 outside them): ``temperature`` [0, 2], ``top_p`` (0, 1], ``top_k`` >= -1 (0 and -1:
off), ``seed`` [0, 2^63), penalties ``presence``/``frequency`` [-2, 2], ``repetition`` > 0, ``min_p``
[0, 1], ``n`` and ``best_of`` [1, 128], ``logprobs`` (completions) / ``top_logprobs`` (chat) and
vLLM's ``prompt_logprobs`` [0, 20]. Accepted only at their neutral value (else 422
``unsupported_parameter``): completions' ``suffix`` empty; chat's ``store`` false, ``modalities``
``["text"]``, the deprecated ``functions`` empty and ``function_call`` ``none``/``auto``;
``stream_options.continuous_usage_stats`` false; ``best_of`` above ``n``. ``user``, ``service_tier``
and ``metadata`` are type-checked and ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from replicas.sampling_params import MAX_LOGPROBS, MAX_N, MAX_SEED
from router.api_model import (
    UNSUPPORTED,
    APIModel,
    Text,
    check_utf8,
    integer_in,
    invalid,
    located,
    number_in,
    shown,
    type_name,
    unsupported,
)
from router.chat_models import ChatMessage, ToolFields
from router.vllm_extras import ChatVLLMExtras, CompletionVLLMExtras

MAX_INT = 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1
JSON_OBJECT_SCHEMA = '{"type": "object"}'

Count = integer_in(1, MAX_INT)
NonNegative = integer_in(0, MAX_INT)
LogprobCount = integer_in(0, MAX_LOGPROBS)
Penalty = number_in(-2.0, 2.0)
Choices = integer_in(1, MAX_N)


class StreamOptions(APIModel):
    """``stream_options`` (only with ``stream: true``)."""

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None

    @field_validator("continuous_usage_stats")
    @classmethod
    def _not_continuous(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported("is not supported")
        return value


class JSONSchemaFormat(APIModel):
    """``response_format.json_schema``: OpenAI's ``{"name", "description"?, "schema", "strict"?}``."""

    name: Annotated[Text, Field(min_length=1)]
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _compiles(cls, schema: dict[str, Any]) -> dict[str, Any]:
        from replicas.json_grammar import schema_error  # llguidance: loaded only for structured output

        error = schema_error(json.dumps(schema))
        if error is not None:
            raise invalid(f"cannot constrain output: {error}")
        return schema


class ResponseFormat(APIModel):
    """``response_format``: ``text``, ``json_object`` or ``json_schema`` (with :class:`JSONSchemaFormat`)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise located(("json_schema",), "is required with type 'json_schema'")
        return self

    def schema_text(self) -> str | None:
        """The JSON schema (as text) the output is constrained to, or None (``text``)."""
        if self.type == "json_object":
            return JSON_OBJECT_SCHEMA
        if self.type == "json_schema" and self.json_schema is not None:
            return json.dumps(self.json_schema.schema_)
        return None


def _stop_list(value: object) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid(f"must be a string or an array of strings, got {type_name(value)}")
    for s in items:
        check_utf8(s)
    return items


class SamplingFields(APIModel):
    """The fields both generation endpoints share."""

    model: Text
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Count | None = None
    temperature: number_in(0.0, 2.0) | None = None
    top_p: number_in(0.0, 1.0, open_lo=True) | None = None
    top_k: integer_in(-1, MAX_INT) | None = None
    seed: integer_in(0, MAX_SEED) | None = None
    stop: Any = None
    stop_token_ids: list[Any] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    allowed_token_ids: Annotated[list[Any], Field(min_length=1)] | None = None
    truncate_prompt_tokens: integer_in(-1, MAX_INT) | None = None
    truncation_side: Literal["left", "right"] | None = None
    n: Choices | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: number_in(0.0, float("inf"), open_lo=True) | None = None
    min_p: number_in(0.0, 1.0) | None = None
    logit_bias: dict[str, Any] | None = None
    min_tokens: NonNegative | None = None
    prompt_logprobs: LogprobCount | None = None
    response_format: ResponseFormat | None = None
    user: Text | None = None
    priority: int | None = None
    slo_class: Text | None = None
    service_tier: Text | None = None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_a_token(cls, value: int | None) -> int | None:
        if value == 0:
            raise invalid("must be -1 (the context length) or at least 1, got 0")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: object) -> list[str] | None:
        return None if value is None else _stop_list(value)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise located(("stream_options",), "is only allowed when stream is true")
        return self

    def truncated(self, ids: tuple[int, ...], max_model_len: int | None) -> tuple[int, ...]:
        """``ids`` cut to ``truncate_prompt_tokens`` (-1: ``max_model_len``) as vLLM does: the last
        tokens kept (``truncation_side`` ``left``, the default) or the first (``right``)."""
        keep = self.truncate_prompt_tokens
        if keep == -1:
            keep = max_model_len
        if keep is None or len(ids) <= keep:
            return ids
        return ids[:keep] if self.truncation_side == "right" else ids[len(ids) - keep:]

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple (one string is one stop string)."""
        return tuple(self.stop or ())


class CompletionRequest(SamplingFields, CompletionVLLMExtras):
    """``POST /v1/completions``; ``prompt`` is one string or one list of token ids (a one-element list
    of those is the same prompt; several prompts are 422). vLLM's ``add_special_tokens`` (default true)
    adds the tokenizer's special tokens (BOS) to a text prompt."""

    prompt: Any
    add_special_tokens: bool | None = None
    echo: bool | None = None
    best_of: Choices | None = None
    logprobs: LogprobCount | None = None
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: object) -> str | list[Any]:
        if value is None:
            raise invalid("is required")
        if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
            if len(value) > 1:
                raise unsupported("batched prompts unsupported: send one prompt per request")
            value = value[0]
        if isinstance(value, str):
            if not value:
                raise invalid("must not be empty")
            check_utf8(value)
            return value
        if not isinstance(value, list):
            raise invalid(f"must be a string or an array of token ids, got {type_name(value)}")
        if not value:
            raise invalid("must not be empty")
        return value  # token ids: checked against the vocabulary by ProtocolConfig.check_token_ids

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise unsupported("is not supported")
        return value

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        n, best_of = self.n or 1, self.best_of
        if best_of is not None and best_of < n:
            raise located(("best_of",), f"({best_of}) must be at least n ({n})", best_of)
        if best_of is not None and best_of > n:
            raise located(("best_of",), f"> n is not supported (best_of {best_of}, n {n}); vLLM's V1 engine "
                                        "refuses it too: ask for n choices and rank them", best_of, kind=UNSUPPORTED)
        return self

    @property
    def logprob_count(self) -> int | None:
        """Alternatives per token to return (None: no logprobs)."""
        return self.logprobs


class ChatCompletionRequest(SamplingFields, ToolFields, ChatVLLMExtras):
    """``POST /v1/chat/completions``. vLLM's ``add_generation_prompt`` (default true) ends the rendered
    prompt with the assistant turn's opening."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool | None = None
    top_logprobs: LogprobCount | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    modalities: list[Any] | None = None

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise unsupported("(deprecated) are not supported: use tools")
        return value

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: object) -> object:
        if value is None or value in ("none", "auto"):
            return value
        if value == "required" or isinstance(value, dict):
            raise unsupported("(deprecated) is not supported: use tool_choice")
        raise invalid(f"must be 'none', 'auto', 'required' or an object, got {shown(value)}")

    @field_validator("store")
    @classmethod
    def _no_store(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported("is not supported")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and value != ["text"]:
            raise unsupported(f"other than ['text'] are not supported, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise located(("max_completion_tokens",), "differs from max_tokens")
        if self.top_logprobs and not self.logprobs:
            raise located(("top_logprobs",), "requires logprobs to be true")
        return self

    @property
    def logprob_count(self) -> int | None:
        """Alternatives per token to return (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeCompletion(APIModel):
    """``POST /tokenize`` with a ``prompt``."""

    model: Text | None = None
    prompt: Text
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None


class TokenizeChat(ToolFields):
    """``POST /tokenize`` with chat ``messages`` (rendered by the chat template)."""

    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(APIModel):
    """``POST /detokenize``."""

    model: Text | None = None
    tokens: list[Any]  # token ids, checked against the vocabulary by ProtocolConfig.check_token_ids


#: The top-level fields each endpoint accepts (any other is a 400 ``unknown_parameter``).
COMPLETION_FIELDS = frozenset(CompletionRequest.model_fields)
CHAT_FIELDS = frozenset(ChatCompletionRequest.model_fields)
