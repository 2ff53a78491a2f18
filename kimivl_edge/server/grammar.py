"""``response_format`` -> a GBNF grammar for llama.cpp's grammar sampler (llama-cpp-python's JSON grammar and its
JSON-schema converter, a port of llama.cpp's json-schema-to-grammar)."""
from __future__ import annotations

import json

from .errors import invalid_field
from .schemas import ResponseFormat


def response_grammar(rf: ResponseFormat | None) -> str | None:
    """None for plain text; a grammar that admits only JSON (matching the schema when one is given)."""
    if rf is None or rf.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    schema = rf.json_schema.schema_ if rf.type == "json_schema" and rf.json_schema is not None else rf.schema_
    if rf.type == "json_schema" and schema is None:
        raise invalid_field("response_format json_schema needs json_schema.schema", "response_format")
    if schema is None:
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises bare exceptions for schemas it cannot express
        raise invalid_field(f"response_format: unsupported JSON schema ({type(e).__name__}: {e})",
                            "response_format") from None
