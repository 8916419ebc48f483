"""``response_format`` of a completions or chat request: the JSON schema its output is constrained to.

``text`` (or no field): none. ``json_object``: ``{"type": "object"}``. ``json_schema``: OpenAI's
``{"name", "description", "schema", "strict"}`` (``name`` and ``schema`` required); the schema must
compile to a grammar (:mod:`replicas.json_grammar`), else a 400 naming
``response_format.json_schema.schema``. The engine applies it (:mod:`replicas.structured_output`).
"""

from __future__ import annotations

import json

from router.api_errors import APIError
from router.request_fields import BodyFields

JSON_OBJECT_SCHEMA = '{"type": "object"}'


def response_format_schema(f: BodyFields) -> str | None:
    """The JSON schema (as text) that ``response_format`` constrains the output to, or None (``text``)."""
    fmt = f.obj("response_format")
    if fmt is None:
        return None
    r = BodyFields(fmt, "response_format.")
    kind = r.string("type", required=True)
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise APIError.invalid("response_format.type", "response_format.type must be 'text', 'json_object' or "
                                                       f"'json_schema', got {kind!r}")
    spec = r.obj("json_schema")
    if spec is None:
        raise APIError.invalid("response_format.json_schema", "response_format.json_schema is required with "
                                                              "type 'json_schema'")
    s = BodyFields(spec, "response_format.json_schema.")
    s.reject_unknown(frozenset({"name", "description", "schema", "strict"}))
    s.string("name", required=True, non_empty=True)
    s.string("description")
    s.boolean("strict")
    schema = s.obj("schema")
    if schema is None:
        raise APIError.invalid("response_format.json_schema.schema", "response_format.json_schema.schema is required")
    from replicas.json_grammar import schema_error  # llguidance: loaded only for structured output

    text = json.dumps(schema)
    error = schema_error(text)
    if error is not None:
        raise APIError.invalid("response_format.json_schema.schema",
                               f"response_format.json_schema.schema cannot constrain output: {error}")
    return text
