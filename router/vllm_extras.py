"""vLLM's extra request fields that FlowPrefill does not implement, accepted only at vLLM's default.

Code written for vLLM's OpenAI server sends some of these at their default value; such a request is
served as vLLM would serve it. Any other value is a 422 ``unsupported_parameter`` naming the field and
saying why (and what to use instead), rather than the 400 ``unknown_parameter`` of a field nobody has
heard of. A value of the wrong type is a 400, as for every field. The table of every vLLM field and
what this server does with it is in the README (OpenAI API fields).

vLLM's extras that FlowPrefill implements are ordinary fields of :mod:`router.request_models`
(``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``,
``skip_special_tokens``, ``include_stop_str_in_output``, ``allowed_token_ids``, ``truncate_prompt_tokens``
and ``truncation_side``, ``prompt_logprobs``, ``priority``,
``add_special_tokens``, chat's ``add_generation_prompt``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationInfo, create_model, field_validator

from router.api_model import APIModel, invalid, type_name, unsupported

_TEXT = "the response carries the text (and logprobs when asked) only"
_MEDIA = "FlowPrefill serves text-only models"
_TEMPLATE = "the checkpoint's own chat template renders the messages and tools"
_REASONING = "FlowPrefill has no reasoning parser"

#: field -> (the values accepted: vLLM's default, and null; why another value is refused)
COMMON_NEUTRAL: dict[str, tuple[tuple[object, ...], str]] = {
    "spaces_between_special_tokens": ((True,), "special tokens are decoded as the tokenizer joins them"),
    "use_beam_search": ((False,), "beam search is not implemented: use n with a seed"),
    "length_penalty": ((1.0, 1), "it applies to beam search, which is not implemented"),
    "bad_words": (([],), "use logit_bias with -100 for the words' token ids"),
    "logprob_token_ids": ((), "logprobs return the sampled token and the top_logprobs alternatives"),
    "return_token_ids": ((False,), _TEXT),
    "return_tokens_as_token_ids": ((False,), _TEXT),
    "return_token_offsets": ((False,), _TEXT),
    "cache_salt": ((), "the prefix cache is shared by every request of a model; it is not salted per request"),
    "kv_transfer_params": ((), "FlowPrefill's own prefill/decode roles hand KV over between its replicas"),
    "ec_transfer_params": ((), _MEDIA),
    "mm_payload": (("tensors",), _MEDIA),
    "return_mm_kwargs": ((), _MEDIA),
    "thinking_token_budget": ((), _REASONING),
    "repetition_detection": ((), "use repetition_penalty or frequency_penalty"),
    "stream_interval": ((), "a stream sends every piece of text as soon as it is decoded"),
    "structured_outputs": ((), "use response_format (json_object or json_schema) or tools"),
    "request_id": ((), "the router assigns request ids (the response id)"),
    "session_id": ((), "placement follows the prompt's shared prefix, not a session"),
    "routed_experts_prompt_start": ((0,), "FlowPrefill returns no routed-expert data"),
    "vllm_xargs": ((), "no custom vLLM extensions run here"),
    "watermarking": ((False,), "watermarking is not implemented"),
}
CHAT_NEUTRAL: dict[str, tuple[tuple[object, ...], str]] = {
    "continue_final_message": ((False,), "the final message is always closed; add_generation_prompt false "
                                         "leaves the reply unprompted"),
    "echo": ((False,), "chat echo is not implemented (completions' echo is)"),
    "chat_template": ((), _TEMPLATE),
    "chat_template_kwargs": ((), _TEMPLATE),
    "documents": ((), _TEMPLATE),
    "include_reasoning": ((True,), _REASONING),
    "reasoning_effort": ((), _REASONING),
    "media_io_kwargs": ((), _MEDIA),
    "mm_processor_kwargs": ((), _MEDIA),
    "return_prompt_text": ((False,), _TEXT),
    "add_special_tokens": ((False,), "the chat template already holds the prompt's special tokens"),
}
COMPLETION_NEUTRAL: dict[str, tuple[tuple[object, ...], str]] = {
    "prompt_embeds": ((), _MEDIA),
}


def check_neutral(name: str, value: object, table: dict[str, tuple[tuple[object, ...], str]]) -> object:
    """``value`` if it is null or one of ``name``'s neutral values; a 400 if its JSON type differs
    from theirs, else a 422 with the table's reason."""
    accepted, reason = table[name]
    if value is None or any(type(value) is type(v) and value == v for v in accepted):
        return value
    if accepted and not any(isinstance(value, type(v)) and isinstance(value, bool) == isinstance(v, bool)
                            for v in accepted):
        expected = " or ".join(sorted({type_name(v) for v in accepted}))
        raise invalid(f"must be a {expected}, got {type_name(value)}")
    neutral = ", ".join(repr(v) for v in accepted) or "null"
    raise unsupported(f"is accepted only at vLLM's default ({neutral}): {reason}")


def _extras_model(name: str, table: dict[str, tuple[tuple[object, ...], str]],
                  base: type[APIModel] = APIModel) -> type[APIModel]:
    """A model with one optional field per entry of ``table``, each checked by :func:`check_neutral`."""

    def neutral(cls: type[APIModel], value: object, info: ValidationInfo) -> object:
        return check_neutral(str(info.field_name), value, table)

    validator = field_validator(*table)(classmethod(neutral))  # type: ignore[arg-type]
    fields: dict[str, Any] = {field: (Any, None) for field in table}
    return create_model(name, __base__=base, __doc__=f"vLLM's extras: {', '.join(table)}, at their defaults only.",
                        __validators__={f"_neutral_{name}": validator}, **fields)


#: vLLM's extras of both endpoints, at their defaults only (see the module docstring).
CommonVLLMExtras = _extras_model("CommonVLLMExtras", COMMON_NEUTRAL)
#: vLLM's chat-only extras.
ChatVLLMExtras = _extras_model("ChatVLLMExtras", CHAT_NEUTRAL, CommonVLLMExtras)
#: vLLM's completions-only extras.
CompletionVLLMExtras = _extras_model("CompletionVLLMExtras", COMPLETION_NEUTRAL, CommonVLLMExtras)
