"""JSON schemas and Lark grammars as llguidance grammars (torch-free: the router checks a request's
schema or tool-call grammar with it, the engine's :mod:`replicas.structured_output` compiles it
against the vocabulary)."""

from __future__ import annotations

import json

import llguidance


def grammar_of(schema: str) -> str:
    """The llguidance grammar of a JSON schema given as text, for compact JSON (no whitespace between
    tokens): a flexible-whitespace grammar lets a model loop on whitespace until ``max_tokens``
    (vLLM's ``disable_any_whitespace``, made the default here)."""
    return llguidance.LLMatcher.grammar_from_json_schema(json.loads(schema), defaults={"whitespace_flexible": False})


def grammar_of_lark(lark: str) -> str:
    """The llguidance grammar of a Lark grammar (llguidance's dialect: ``%json {schema}`` embeds a
    JSON schema), e.g. :func:`replicas.tool_grammar.tool_call_grammar`."""
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _compile_error(grammar: str) -> str | None:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else None


def schema_error(schema: str) -> str | None:
    """Why a JSON schema (as text) cannot constrain output (None: it can)."""
    try:
        grammar = grammar_of(schema)
    except (ValueError, TypeError, RuntimeError) as exc:
        return str(exc)
    return _compile_error(grammar)


def lark_error(lark: str) -> str | None:
    """Why a Lark grammar cannot constrain output (None: it can)."""
    return _compile_error(grammar_of_lark(lark))
