"""JSON schemas as llguidance grammars (torch-free: the router checks a request's schema with it, the
engine's :mod:`replicas.structured_output` compiles it against the vocabulary)."""

from __future__ import annotations

import json

import llguidance


def grammar_of(schema: str) -> str:
    """The llguidance grammar of a JSON schema given as text, for compact JSON (no whitespace between
    tokens): a flexible-whitespace grammar lets a model loop on whitespace until ``max_tokens``
    (vLLM's ``disable_any_whitespace``, made the default here)."""
    return llguidance.LLMatcher.grammar_from_json_schema(json.loads(schema), defaults={"whitespace_flexible": False})


def schema_error(schema: str) -> str | None:
    """Why a JSON schema (as text) cannot constrain output (None: it can)."""
    try:
        grammar = grammar_of(schema)
    except (ValueError, TypeError, RuntimeError) as exc:
        return str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else None
