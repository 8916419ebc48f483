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
from router.api_model import decode_json_object, validate_body
from router.protocol import ProtocolConfig, chat_messages
from router.request_models import DetokenizeRequest, TokenizeChat, TokenizeCompletion
from router.tool_calls import parse_tools
from router.tool_prompt import prompt_inputs


class UtilityTokenizer(Protocol):
    """What these endpoints need of :class:`replicas.model.tokenizer.Tokenizer`."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...


def tokenize(body: bytes, config: ProtocolConfig, tokenizer: UtilityTokenizer) -> dict[str, Any]:
    """The ``/tokenize`` answer for ``body``; raises :class:`APIError`."""
    data = decode_json_object(body, config.max_body_bytes)
    if "messages" in data and "prompt" in data:
        raise APIError.invalid("prompt", "give either prompt or messages, not both")
    r: TokenizeChat | TokenizeCompletion
    if "messages" in data:
        r = validate_body(TokenizeChat, data)
        config.check_model(r.model)
        messages, definitions = prompt_inputs(chat_messages(r), parse_tools(r),
                                              bool(getattr(tokenizer, "template_uses_tools", False)))
        generation_prompt = r.add_generation_prompt is not False
        try:
            if definitions:
                text = tokenizer.apply_chat_template(messages, generation_prompt, tools=definitions)
            else:
                text = tokenizer.apply_chat_template(messages, generation_prompt)
        except jinja2.TemplateError as exc:
            raise APIError.invalid("messages", f"messages rejected by the chat template: {exc}") from None
        ids = tokenizer.encode(text, add_special_tokens=bool(r.add_special_tokens))
    else:
        r = validate_body(TokenizeCompletion, data)
        config.check_model(r.model)
        ids = tokenizer.encode(r.prompt, add_special_tokens=r.add_special_tokens is not False)
    strs = [tokenizer.id_to_token(t) or "" for t in ids] if r.return_token_strs else None
    return {"count": len(ids), "max_model_len": config.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(body: bytes, config: ProtocolConfig, tokenizer: UtilityTokenizer) -> dict[str, Any]:
    """The ``/detokenize`` answer for ``body``; raises :class:`APIError`."""
    r = validate_body(DetokenizeRequest, decode_json_object(body, config.max_body_bytes))
    config.check_model(r.model)
    tokens = config.check_token_ids(r.tokens, "tokens")
    return {"prompt": tokenizer.decode(list(tokens), skip_special_tokens=False)}


def models_list(config: ProtocolConfig, created: int, owned_by: str = "flowprefill") -> dict[str, Any]:
    """``GET /v1/models``: each served model with when this server started serving it (epoch seconds)
    and its context length, in vLLM's model card shape."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": owned_by, "root": name, "parent": None,
         "max_model_len": config.max_model_len}
        for name in config.served_models
    ]}
