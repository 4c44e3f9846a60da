"""Request body parsers for the REST API."""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError


def holds_lone_surrogate(data: Any) -> bool:
    """Whether a parsed JSON value holds a string (a key or a value) with a lone surrogate,
    which JSON's ``\\ud800`` escape decodes to: no Unicode text, so neither storable nor
    encodable as UTF-8 (an error message repeating it could not be rendered)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, with JSON nested deeper than the interpreter can follow answered
    400 like any malformed body (``json`` raises RecursionError, which DRF lets through:
    a 500), and so is a string holding a lone surrogate (``"\\ud800"``): a field's error
    repeating it could not be encoded, a 500 (found by fuzzing a choice field)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            raise ParseError("JSON parse error - nested too deeply.") from exc
        if holds_lone_surrogate(data):
            raise ParseError(
                "JSON parse error - a string holds a lone surrogate (\\ud800-\\udfff)."
            )
        return data
