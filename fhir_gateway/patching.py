"""PATCH under /fhir (https://hl7.org/fhir/R5/http.html#patch).

A patch is applied to the JSON of the resource's current version, in the FHIR version of
the request, and the result is stored through the type's own update — the same checks,
transitions, permissions and If-Match as a PUT of that result. Two formats:

- JSON Patch (RFC 6902, ``application/json-patch+json``): FHIR's JSON patch format; an
  array of operations (``test`` included), applied with the ``jsonpatch`` library.
- JSON Merge Patch (RFC 7386, ``application/merge-patch+json``): an object whose members
  replace the resource's (``null`` removes one). This is what fhirpy's ``patch()`` sends,
  under ``application/json``: a plain JSON (or FHIR JSON) body is read as JSON Patch when it
  is an array and as a merge patch when it is an object.

FHIRPath Patch (a ``Parameters`` resource) and XML Patch are refused with 415/422.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import jsonpointer

from core.values import MAX_JSON_DEPTH, json_depth
from fhir_gateway.outcomes import FhirError
from fhir_gateway.versions import JSON_TYPES, parse_media_range, version_from_params

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


def patch_format(content_type: str, *, default_version: str) -> tuple[str, str]:
    """(media type, FHIR version) of a PATCH body; 415 for formats we do not apply."""
    parsed = parse_media_range(content_type)
    # A body under a plain or FHIR JSON type is read by its shape (array / object).
    if parsed is None or parsed.media_type not in {JSON_PATCH, MERGE_PATCH, *JSON_TYPES}:
        raise FhirError(
            415,
            "not-supported",
            f"PATCH Content-Type {content_type or '(none)'!r} is not supported; send JSON "
            f"Patch ({JSON_PATCH}) or JSON Merge Patch ({MERGE_PATCH}).",
        )
    return parsed.media_type, version_from_params(parsed, default=default_version, status=415)


def check_patch(body: Any, media_type: str) -> list[Any] | dict[str, Any]:
    """The parsed body as a patch document: a list of operations (JSON Patch) or an object
    (merge patch), as its media type requires."""
    if media_type == JSON_PATCH and not isinstance(body, list):
        raise FhirError(400, "structure", "A JSON Patch is an array of operations.")
    if media_type == MERGE_PATCH and not isinstance(body, dict):
        raise FhirError(400, "structure", "A JSON Merge Patch is an object.")
    if not isinstance(body, (list, dict)):
        raise FhirError(
            400, "structure", "A PATCH body is a JSON Patch array or a JSON Merge Patch object."
        )
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        raise FhirError(
            422,
            "not-supported",
            f"FHIRPath Patch is not supported; send JSON Patch ({JSON_PATCH}).",
        )
    return body


# At most this many operations in a JSON Patch.
MAX_OPERATIONS = 100
_OPERATIONS = frozenset({"add", "remove", "replace", "move", "copy", "test"})
_NEEDS_VALUE = frozenset({"add", "replace", "test"})
_NEEDS_FROM = frozenset({"move", "copy"})


def apply_patch(
    resource: dict[str, Any], patch: list[Any] | dict[str, Any], *, max_bytes: int
) -> dict[str, Any]:
    """The patched copy of ``resource`` (neither argument is changed: a patch retried on a
    newer version applies as sent). A malformed operation is 400; one that cannot apply to
    this resource (a missing path, a failed ``test``) 422; a patch whose ``copy``
    operations would grow the resource by more than ``max_bytes``, or of more than
    MAX_OPERATIONS operations, 422 too-costly (a small body must not build a huge one)."""
    try:
        document = copy.deepcopy(resource)
        if isinstance(patch, dict):
            merged = merge_patch(document, copy.deepcopy(patch))
            assert isinstance(merged, dict)
            return merged
        if len(patch) > MAX_OPERATIONS:
            raise FhirError(
                422, "too-costly", f"A JSON Patch may hold at most {MAX_OPERATIONS} operations."
            )
        copied = 0
        for index, operation in enumerate(copy.deepcopy(patch)):
            kind = _check_operation(index, operation)
            if kind == "test":  # RFC 6902 4.6: true is not 1 (Python's == says it is)
                if not same_json(_value_at(document, index, operation, "path"),
                                 operation["value"]):  # fmt: skip
                    raise FhirError(
                        422,
                        "processing",
                        f"JSON Patch test failed: operation {index} expects "
                        f"{json.dumps(operation['value'])[:200]} at {operation['path']!r}.",
                    )
                continue
            if kind in _NEEDS_FROM:
                value = _value_at(document, index, operation, "from")
                copied += len(json.dumps(value)) if kind == "copy" else 0
                if copied > max_bytes:
                    raise FhirError(
                        422,
                        "too-costly",
                        f"The JSON Patch's copies would add more than {max_bytes} bytes.",
                    )
            try:
                document = jsonpatch.JsonPatch([operation]).apply(document, in_place=True)
            except TypeError as exc:  # the library indexing a list by a name, or the like
                raise FhirError(
                    422, "processing", f"JSON Patch operation {index} does not apply: {exc}"
                ) from exc
    except RecursionError as exc:
        raise FhirError(400, "structure", "The patch is nested too deeply.") from exc
    except (jsonpatch.JsonPatchConflict, jsonpointer.JsonPointerException) as exc:
        raise FhirError(
            422, "processing", f"The JSON Patch does not apply to this resource: {exc}"
        ) from exc
    except jsonpatch.InvalidJsonPatch as exc:
        raise FhirError(400, "structure", f"The JSON Patch is malformed: {exc}") from exc
    if not isinstance(document, dict):
        raise FhirError(422, "processing", "The JSON Patch replaces the whole resource.")
    if json_depth(document) > MAX_JSON_DEPTH:  # copies of a branch into itself nest deeper
        raise FhirError(
            422, "processing", f"The patched resource nests more than {MAX_JSON_DEPTH} levels."
        )
    return document


def _check_operation(index: int, operation: Any) -> str:
    """The operation's kind; 400 when it is not a well-formed JSON Patch operation (the
    library checks less: a path without its leading "/" would be "not found")."""

    def malformed(why: str) -> FhirError:
        return FhirError(400, "structure", f"JSON Patch operation {index}: {why}")

    if not isinstance(operation, dict):
        raise malformed("an operation is an object.")
    kind = operation.get("op")
    if not isinstance(kind, str) or kind not in _OPERATIONS:
        raise malformed(f"op must be one of {', '.join(sorted(_OPERATIONS))}.")
    pointers = ["path", *(["from"] if kind in _NEEDS_FROM else [])]
    for member in pointers:
        pointer = operation.get(member)
        if not isinstance(pointer, str) or (pointer and not pointer.startswith("/")):
            raise malformed(f'{member} must be a JSON Pointer ("" or starting with /).')
    if kind in _NEEDS_VALUE and "value" not in operation:
        raise malformed(f"a {kind} operation needs a value.")
    return str(kind)


def _value_at(document: Any, index: int, operation: dict[str, Any], member: str) -> Any:
    """The value ``operation[member]`` points at; 422 when there is none (``/-`` names the
    place after an array's last element, which holds no value)."""
    value = jsonpointer.resolve_pointer(document, operation[member])
    if isinstance(value, jsonpointer.EndOfList):
        raise FhirError(
            422,
            "processing",
            f"JSON Patch operation {index}: {member} {operation[member]!r} names no value.",
        )
    return value


def same_json(a: Any, b: Any) -> bool:
    """JSON equality (RFC 6902 4.6): numbers by value, but a boolean is not a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, section 2."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result
