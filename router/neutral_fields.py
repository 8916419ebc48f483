"""OpenAI request fields this server accepts only at their neutral value.

Each is type- and range-checked like OpenAI does (400 naming the field); a valid but non-neutral
value is a 422 ``unsupported_parameter`` naming the field (the deprecated ``functions`` /
``function_call``: use ``tools`` / ``tool_choice``, :mod:`router.tool_calls`). ``user``,
``service_tier`` and ``metadata`` are only type-checked: they do not change the result. The sampling
fields (penalties, ``min_p``, ``logit_bias``, ``min_tokens``, ``logprobs``, ``top_logprobs``) are real
and parsed by :mod:`router.protocol`, as are ``n``, ``best_of`` (at most ``n``), ``echo`` and
``response_format``.
"""

from __future__ import annotations

from router.api_errors import APIError
from router.request_fields import BodyFields


def check_neutral_completion(f: BodyFields) -> None:
    """Completions-only fields: ``suffix`` empty."""
    if f.string("suffix"):
        raise APIError.unsupported("suffix", "suffix is not supported")


def check_neutral_common(f: BodyFields, chat: bool) -> None:
    """Fields of both endpoints that do not change the result: type-checked only."""
    f.string("user")
    f.string("service_tier")


def check_neutral_chat(f: BodyFields) -> None:
    """Chat-only fields: 400 on a wrong type or range, 422 on a non-neutral value."""
    if f.array("functions"):
        raise APIError.unsupported("functions", "functions (deprecated) are not supported: use tools")
    choice = f.data.get("function_call")
    if choice is not None and choice not in ("none", "auto"):
        if choice == "required" or isinstance(choice, dict):
            raise APIError.unsupported("function_call", "function_call (deprecated) is not supported: use tool_choice")
        raise APIError.invalid("function_call", f"function_call must be 'none', 'auto', 'required' or an object, got "
                                                f"{choice!r}")
    if f.boolean("store"):
        raise APIError.unsupported("store", "store is not supported")
    f.obj("metadata")
    modalities = f.array("modalities")
    if modalities is not None and modalities != ["text"]:
        raise APIError.unsupported("modalities", f"modalities other than ['text'] are not supported, got {modalities}")
