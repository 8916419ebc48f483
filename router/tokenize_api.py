"""vLLM's utility endpoints of its OpenAI server: ``POST /tokenize``, ``POST /detokenize``, and the
``GET /v1/models`` list. Pure Python over the router's tokenizer (no Ray, no FastAPI).

* ``/tokenize`` takes ``{model?, prompt, add_special_tokens = true, return_token_strs = false}`` or
  ``{model?, messages, tools?, add_generation_prompt = true, add_special_tokens = false,
  return_token_strs}`` (the chat template renders the messages and tools as for a chat request,
  :mod:`router.tool_prompt`; it holds the special tokens already) and answers
  ``{count, max_model_len, tokens, token_strs}`` (``token_strs``: the vocabulary pieces, or null).
* ``/detokenize`` takes ``{model?, tokens}`` and answers ``{prompt}`` (special tokens kept).
* A bad field is a 400 naming it; an unknown ``model`` a 404, as for generation.
"""

from __future__ import annotations

from typing import Any, Protocol

import jinja2

from router.api_errors import APIError
from router.chat_messages import parse_messages
from router.protocol import ProtocolConfig
from router.request_fields import BodyFields, decode_json_object, is_int
from router.tool_calls import parse_tools
from router.tool_prompt import prompt_inputs

_COMPLETION_FIELDS = frozenset({"model", "prompt", "add_special_tokens", "return_token_strs"})
_CHAT_FIELDS = frozenset({"model", "messages", "tools", "add_generation_prompt", "add_special_tokens",
                          "return_token_strs"})


class UtilityTokenizer(Protocol):
    """What these endpoints need of :class:`replicas.model.tokenizer.Tokenizer`."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...


def _check_model(f: BodyFields, config: ProtocolConfig) -> None:
    model = f.string("model")
    if model is not None and model not in config.served_models:
        raise APIError.model_not_found(model, list(config.served_models))


def tokenize(body: bytes, config: ProtocolConfig, tokenizer: UtilityTokenizer) -> dict[str, Any]:
    """The ``/tokenize`` answer for ``body``; raises :class:`APIError`."""
    f = BodyFields(decode_json_object(body, config.max_body_bytes))
    chat = "messages" in f.data
    if chat and "prompt" in f.data:
        raise APIError.invalid("prompt", "give either prompt or messages, not both")
    f.reject_unknown(_CHAT_FIELDS if chat else _COMPLETION_FIELDS)
    _check_model(f, config)
    add_special = f.boolean("add_special_tokens")
    if chat:
        messages, definitions = prompt_inputs(parse_messages(f.data.get("messages")), parse_tools(f),
                                              bool(getattr(tokenizer, "template_uses_tools", False)))
        generation_prompt = True if f.boolean("add_generation_prompt") is None else f.boolean("add_generation_prompt")
        try:
            if definitions:
                text = tokenizer.apply_chat_template(messages, bool(generation_prompt), tools=definitions)
            else:
                text = tokenizer.apply_chat_template(messages, bool(generation_prompt))
        except jinja2.TemplateError as exc:
            raise APIError.invalid("messages", f"messages rejected by the chat template: {exc}") from None
        ids = tokenizer.encode(text, add_special_tokens=bool(add_special))
    else:
        prompt = f.string("prompt", required=True)
        assert prompt is not None
        ids = tokenizer.encode(prompt, add_special_tokens=True if add_special is None else add_special)
    strs = [tokenizer.id_to_token(t) or "" for t in ids] if f.boolean("return_token_strs") else None
    return {"count": len(ids), "max_model_len": config.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(body: bytes, config: ProtocolConfig, tokenizer: UtilityTokenizer) -> dict[str, Any]:
    """The ``/detokenize`` answer for ``body``; raises :class:`APIError`."""
    f = BodyFields(decode_json_object(body, config.max_body_bytes))
    f.reject_unknown(frozenset({"model", "tokens"}))
    _check_model(f, config)
    if not f.given("tokens"):
        raise APIError.invalid("tokens", "tokens is required")
    tokens = f.array("tokens")
    assert tokens is not None
    hi = (config.vocab_size or 2**31) - 1
    for i, t in enumerate(tokens):
        if not is_int(t) or not 0 <= t <= hi:
            raise APIError.invalid("tokens", f"tokens[{i}] must be a token id in [0, {hi}], got {t!r}")
    return {"prompt": tokenizer.decode(tokens, skip_special_tokens=False)}


def models_list(config: ProtocolConfig, created: int, owned_by: str = "flowprefill") -> dict[str, Any]:
    """``GET /v1/models``: each served model with when this server started serving it (epoch seconds)
    and its context length, in vLLM's model card shape."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": owned_by, "root": name, "parent": None,
         "max_model_len": config.max_model_len}
        for name in config.served_models
    ]}
