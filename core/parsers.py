"""Request body parsers for the REST API."""

from __future__ import annotations

import codecs
import math
from typing import Any

from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import ParseError
from rest_framework.utils import json


def _finite_float(text: str) -> float:
    """A JSON number as a float, refused when it is beyond a float's range (``1e400``):
    Python reads it as infinity, which no field takes and some turn into an uncaught
    OverflowError (a primary key: ``int(inf)``)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


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
    a 500), and so are a number beyond a float's range (``_finite_float``) and a string
    holding a lone surrogate (``"\\ud800"``): a field's error repeating it could not be
    encoded, a 500 (found by fuzzing a choice field)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        # DRF's parse, with parse_float added.
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            decoded_stream: Any = codecs.getreader(encoding)(stream)
            parse_constant = json.strict_constant if self.strict else None
            data = json.load(
                decoded_stream, parse_constant=parse_constant, parse_float=_finite_float
            )
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc
        except RecursionError as exc:
            raise ParseError("JSON parse error - nested too deeply.") from exc
        if holds_lone_surrogate(data):
            raise ParseError(
                "JSON parse error - a string holds a lone surrogate (\\ud800-\\udfff)."
            )
        return data
