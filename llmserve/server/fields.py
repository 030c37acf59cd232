"""Typed readers for JSON request fields: each raises a 400 APIError naming the field."""

from __future__ import annotations

import math
from typing import Any

from llmserve.server.errors import bad_request

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_MISSING = object()


def get_bool(body: dict, name: str, default: bool | None = False) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {_kind(value)}", name)
    return value


def get_int(body: dict, name: str, default: int | None = None, *, lo: int = INT64_MIN,
            hi: int = INT64_MAX) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {_kind(value)}", name)
    if not lo <= value <= hi:
        raise bad_request(f"'{name}' must be in [{lo}, {hi}], got {value}", name)
    return value


def get_number(body: dict, name: str, default: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{name}' must be a number, got {_kind(value)}", name)
    if not math.isfinite(value):
        raise bad_request(f"'{name}' must be a finite number, got {value}", name)
    return float(value)


def get_str(body: dict, name: str, default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string, got {_kind(value)}", name)
    return value


def get_str_list(body: dict, name: str, *, max_items: int, max_chars: int, why: str = "") -> list[str]:
    """A string or a list of at most `max_items` strings of at most `max_chars` characters (as `stop`);
    `why` (the limits' reason) ends the error message."""
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and len(value) > max_items:
        raise bad_request(f"'{name}' may hold at most {max_items} strings, got {len(value)}{why}", name)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request(f"'{name}' must be a string or a list of strings", name)
    if any(len(s) > max_chars for s in value):
        raise bad_request(f"each string in '{name}' may have at most {max_chars} characters, got one of "
                          f"{max(map(len, value))}{why}", name)
    return value


def get_int_list(body: dict, name: str, *, lo: int, hi: int, max_items: int, why: str = "") -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, list) and len(value) > max_items:
        raise bad_request(f"'{name}' may hold at most {max_items} ids, got {len(value)}{why}", name)
    if not isinstance(value, list) or not all(_is_int(v) and lo <= v <= hi for v in value):
        raise bad_request(f"'{name}' must be a list of integers in [{lo}, {hi}]", name)
    return value


def get_object(body: dict, name: str) -> dict:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"'{name}' must be an object, got {_kind(value)}", name)
    return value


def is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """The JSON type name of `value`, for error messages (never the value: it may be a prompt)."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)
