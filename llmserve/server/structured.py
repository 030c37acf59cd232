"""Structured-output fields of a request body -> StructuredOutputs (or a 400 naming the field).

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema"}) on both endpoints, and
vLLM's extensions: a `structured_outputs` object with exactly one of json / regex / choice / grammar,
and the older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` fields. At most one
of these may be given. Every constraint is enforced token by token (llguidance), `strict` or not.
"""

from __future__ import annotations

import json

from llmserve.sampling_params import StructuredOutputs
from llmserve.server.errors import bad_request

ANY_JSON_OBJECT = '{"type": "object"}'
MAX_SPEC_CHARS = 100_000  # a schema or grammar longer than this is refused before compiling
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
STRUCTURED_FIELDS = ("response_format", "structured_outputs", *GUIDED_FIELDS)


def wants_grammar(body: dict) -> bool:
    """Whether the body asks for a constrained output (a grammar is compiled to check it)."""
    return any(body.get(name) for name in STRUCTURED_FIELDS) or bool(body.get("tools"))


def parse_structured_outputs(body: dict) -> tuple[StructuredOutputs | None, str | None]:
    """The request's constraint and the field it came from; (None, None) for free text."""
    given = [name for name in STRUCTURED_FIELDS if body.get(name) is not None]
    if len(given) > 1:
        raise bad_request(f"give at most one of {', '.join(given)}", given[1])
    if not given:
        return None, None
    name = given[0]
    if name == "response_format":
        return _response_format(body[name]), name
    if name == "structured_outputs":
        return _extension(body[name]), name
    return _spec(GUIDED_FIELDS[name], body[name], name), name


def _response_format(value) -> StructuredOutputs | None:
    param = "response_format"
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("'response_format' must be an object whose type is 'text', 'json_object' or 'json_schema'",
                          f"{param}.type")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return StructuredOutputs("json", ANY_JSON_OBJECT)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("'response_format.json_schema' must be an object with a 'schema'", f"{param}.json_schema")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise bad_request("'response_format.json_schema.name' must be a string", f"{param}.json_schema.name")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request("'response_format.json_schema.strict' must be a boolean", f"{param}.json_schema.strict")
    schema = spec.get("schema", {"type": "object"})  # OpenAI's default: any object
    return _spec("json", schema, f"{param}.json_schema.schema")


def _extension(value) -> StructuredOutputs:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise bad_request(f"'{param}' must be an object with one of json, regex, choice, grammar", param)
    kinds = [kind for kind in ("json", "regex", "choice", "grammar") if value.get(kind) is not None]
    if len(kinds) != 1:
        raise bad_request(f"'{param}' must hold exactly one of json, regex, choice, grammar", param)
    return _spec(kinds[0], value[kinds[0]], f"{param}.{kinds[0]}")


def _spec(kind: str, value, param: str) -> StructuredOutputs:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad_request(f"'{param}' is not valid JSON", param) from None
        if not isinstance(value, (dict, bool)):
            raise bad_request(f"'{param}' must be a JSON schema (an object)", param)
        text = json.dumps(value)
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request(f"'{param}' must be a non-empty array of non-empty strings", param)
        text = json.dumps(value)
    else:
        if not isinstance(value, str) or not value:
            raise bad_request(f"'{param}' must be a non-empty string", param)
        text = value
    if len(text) > MAX_SPEC_CHARS:
        raise bad_request(f"'{param}' is {len(text)} characters long; at most {MAX_SPEC_CHARS} are allowed", param)
    return StructuredOutputs(kind, text)
