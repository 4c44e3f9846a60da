"""Required-binding code checks that fhir.resources does not do (it accepts any code string).

Only the elements whose value changes what we do are listed: status, intent, priority and
the like of the resource types the gateway accepts or will accept. The value sets are the
required bindings of the FHIR specification in each version.
"""

from __future__ import annotations

from typing import Any

from fhir_gateway.outcomes import FhirError

_REQUEST_PRIORITY = frozenset({"routine", "urgent", "asap", "stat"})
_REQUEST_STATUS = frozenset(
    {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
)
_REQUEST_INTENT = frozenset(
    {
        "proposal",
        "plan",
        "directive",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    }
)
_TASK_STATUS = frozenset(
    {
        "draft",
        "requested",
        "received",
        "accepted",
        "rejected",
        "ready",
        "cancelled",
        "in-progress",
        "on-hold",
        "failed",
        "completed",
        "entered-in-error",
    }
)
_TASK_INTENT = frozenset(
    {
        "unknown",
        "proposal",
        "plan",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    }
)
_EVENT_STATUS = frozenset(
    {
        "preparation",
        "in-progress",
        "not-done",
        "on-hold",
        "stopped",
        "completed",
        "entered-in-error",
        "unknown",
    }
)
_DOCUMENT_REFERENCE_STATUS = frozenset({"current", "superseded", "entered-in-error"})
_COMPOSITION_STATUS_R4 = frozenset({"preliminary", "final", "amended", "entered-in-error"})
_COMPOSITION_STATUS_R5 = frozenset(
    {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "deprecated",
        "unknown",
    }
)
_ENDPOINT_STATUS = frozenset({"active", "suspended", "error", "off", "entered-in-error", "test"})
_LOCATION_STATUS = frozenset({"active", "suspended", "inactive"})
_GENDER = frozenset({"male", "female", "other", "unknown"})

_COMMON: dict[tuple[str, str], frozenset[str]] = {
    ("ServiceRequest", "status"): _REQUEST_STATUS,
    ("ServiceRequest", "intent"): _REQUEST_INTENT,
    ("ServiceRequest", "priority"): _REQUEST_PRIORITY,
    ("Task", "status"): _TASK_STATUS,
    ("Task", "intent"): _TASK_INTENT,
    ("Task", "priority"): _REQUEST_PRIORITY,
    ("Communication", "status"): _EVENT_STATUS,
    ("Communication", "priority"): _REQUEST_PRIORITY,
    ("DocumentReference", "status"): _DOCUMENT_REFERENCE_STATUS,
    ("Endpoint", "status"): _ENDPOINT_STATUS,
    ("Location", "status"): _LOCATION_STATUS,
    ("Patient", "gender"): _GENDER,
}

BOUND_CODES: dict[str, dict[tuple[str, str], frozenset[str]]] = {
    "4.0": {**_COMMON, ("DocumentReference", "docStatus"): _COMPOSITION_STATUS_R4},
    "5.0": {**_COMMON, ("DocumentReference", "docStatus"): _COMPOSITION_STATUS_R5},
}


def check_bound_codes(resource: dict[str, Any], version: str) -> None:
    """Raise 422 (code-invalid) for a top-level bound code outside its value set."""
    resource_type = str(resource.get("resourceType", ""))
    for (rtype, element), allowed in BOUND_CODES[version].items():
        if rtype != resource_type or element not in resource:
            continue
        value = resource[element]
        if value not in allowed:
            raise FhirError(
                422,
                "code-invalid",
                f"{resource_type}.{element} {value!r} is not in the required value set "
                f"({', '.join(sorted(allowed))}).",
                expression=[f"{resource_type}.{element}"],
            )
