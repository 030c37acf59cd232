"""A request body as a JSON object of valid text, or the one-line 400 that says what is wrong with it."""

from __future__ import annotations

import json
import re

from llmserve.server.errors import bad_request

# a JSON escape of a UTF-16 surrogate: legal JSON, but alone it is not a character
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json_object(raw: bytes) -> dict:
    """Decode `raw` (UTF-8 JSON) into an object; anything else is a 400 APIError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # also refuses UTF-8-encoded surrogates
        raise bad_request(f"the body is not valid UTF-8: {exc}", code="invalid_json") from exc
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise bad_request("the body is not valid JSON: it is nested too deeply", code="invalid_json") from exc
    except ValueError as exc:  # Python refuses to read integers of more than 4300 digits
        raise bad_request("the body holds an integer too long to read (at most 4300 digits)",
                          code="invalid_json") from exc
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(text) and _holds_lone_surrogate(body):
        raise bad_request("the body holds a lone UTF-16 surrogate escape (such as \\ud800), which is not a "
                          "character; send valid Unicode text", code="invalid_unicode")
    return body


def _holds_lone_surrogate(body: dict) -> bool:
    """Whether some string in `body` has a surrogate that no pair completed (it cannot be encoded)."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
