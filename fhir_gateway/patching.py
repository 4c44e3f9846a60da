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

from typing import Any

import jsonpatch
import jsonpointer

from fhir_gateway.outcomes import FhirError
from fhir_gateway.versions import FHIR_JSON, parse_media_type, version_from_params

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
# Bodies read as JSON Patch (an array) or merge patch (an object) by their shape.
_EITHER = frozenset({FHIR_JSON, "application/json", "application/json+fhir"})


def patch_format(content_type: str, *, default_version: str) -> tuple[str, str]:
    """(media type, FHIR version) of a PATCH body; 415 for formats we do not apply."""
    parsed = parse_media_type(content_type)
    if parsed is None or parsed.media_type not in {JSON_PATCH, MERGE_PATCH, *_EITHER}:
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


def apply_patch(resource: dict[str, Any], patch: list[Any] | dict[str, Any]) -> dict[str, Any]:
    """The patched copy of ``resource`` (never changed in place). A malformed operation is
    400; one that cannot apply to this resource (a missing path, a failed ``test``) 422."""
    if isinstance(patch, dict):
        merged = merge_patch(resource, patch)
        assert isinstance(merged, dict)
        return merged
    try:
        operations = jsonpatch.JsonPatch(patch)
        patched = operations.apply(resource, in_place=False)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise FhirError(422, "processing", f"JSON Patch test failed: {exc}") from exc
    except (jsonpatch.JsonPatchConflict, jsonpointer.JsonPointerException) as exc:
        raise FhirError(
            422, "processing", f"The JSON Patch does not apply to this resource: {exc}"
        ) from exc
    except (jsonpatch.InvalidJsonPatch, TypeError, AttributeError) as exc:
        # TypeError/AttributeError: an operation that is not an object, or a path that is
        # not a string (the library does not check either itself).
        raise FhirError(400, "structure", f"The JSON Patch is malformed: {exc}") from exc
    if not isinstance(patched, dict):
        raise FhirError(422, "processing", "The JSON Patch replaces the whole resource.")
    return patched


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
