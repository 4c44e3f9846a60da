"""The CapabilityStatement, generated from the handler registry the router uses."""

from __future__ import annotations

from typing import Any

from fhir_gateway import batch, handlers
from fhir_gateway.handlers import (
    COMMON_SEARCH_PARAMS,
    HANDLERS,
    SYSTEM_INTERACTIONS,
    Operation,
    operations_of,
)
from fhir_gateway.patching import JSON_PATCH, MERGE_PATCH
from fhir_gateway.versions import DEFAULT_VERSION, FHIR_JSON, RELEASE, SUPPORTED_VERSIONS

# The date this statement's shape last changed (CapabilityStatement.date is required).
_STATEMENT_DATE = "2025-01-01"


def _operation_entries(operations: list[Operation], version: str) -> list[dict[str, Any]]:
    """One entry per operation name: an operation served at type and instance level
    (``Subscription/$status``) is one OperationDefinition; its documentation says both."""
    entries: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry = entries.setdefault(
            op.name, {"name": op.name, "definition": op.definition_for(version)}
        )
        if op.documentation and op.documentation not in entry.get("documentation", ""):
            entry["documentation"] = " ".join(
                part for part in (entry.get("documentation"), op.documentation) if part
            )
    return list(entries.values())


def capability_statement(version: str, *, base: str) -> dict[str, Any]:
    resources: list[dict[str, Any]] = []
    for resource_type in sorted(HANDLERS):
        handler = HANDLERS[resource_type]
        if version not in handler.fhir_versions:
            continue
        entry: dict[str, Any] = {"type": resource_type}
        if handler.profile:
            entry["profile"] = handler.profile
        if handler.documentation:
            entry["documentation"] = handler.documentation
        entry["interaction"] = [{"code": code} for code in handler.interactions]
        entry["versioning"] = "versioned-update"
        entry["readHistory"] = handler.supports(handlers.VREAD)
        entry["updateCreate"] = False
        entry["conditionalCreate"] = handler.conditional_create
        # If-None-Match naming the current version -> 304 (views.instance, binary.py);
        # If-Modified-Since too on the stored types (views._not_modified), not on Binary.
        if not handler.supports(handlers.READ):
            entry["conditionalRead"] = "not-supported"
        else:
            entry["conditionalRead"] = "not-match" if handler.raw_read else "full-support"
        entry["conditionalUpdate"] = False
        entry["conditionalDelete"] = "not-supported"
        if handler.supports(handlers.SEARCH):
            params = [*COMMON_SEARCH_PARAMS, *handler.search_params]
            if handler.includes:
                entry["searchInclude"] = sorted(handler.includes)
            if handler.revincludes:
                entry["searchRevInclude"] = sorted(handler.revincludes)
            entry["searchParam"] = [
                {
                    "name": p.name,
                    **({"definition": p.definition} if p.definition else {}),
                    "type": p.type,
                    "documentation": p.documentation + _modifiers_note(p),
                }
                for p in params
            ]
        operations = operations_of(resource_type, version)
        if operations:
            entry["operation"] = _operation_entries(operations, version)
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": _STATEMENT_DATE,
        "publisher": "Consilium",
        "kind": "instance",
        "software": {"name": "Consilium FHIR gateway"},
        "implementation": {"description": "Consilium referral network", "url": base},
        "fhirVersion": RELEASE[version],
        "format": [FHIR_JSON, "json"],
        "patchFormat": [JSON_PATCH, MERGE_PATCH],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    f"FHIR versions {', '.join(SUPPORTED_VERSIONS)} (fhirVersion media-type "
                    f"parameter; default {DEFAULT_VERSION}). Bearer tokens only. A transaction "
                    "Bundle sent with Prefer: respond-async is answered 202 with "
                    "Content-Location [base]/_async/<id>: poll it (202 until applied, then 200 "
                    "with a batch-response Bundle holding the transaction's answer); DELETE "
                    "cancels. A batch Bundle's entries are each answered as if sent alone "
                    f"(at most {batch.max_entries()} entries; no respond-async). "
                    "Searches, reads, vreads and histories take _summary (true, text, data, "
                    "false; count on searches) and _elements (a name, or Type.name for an "
                    "included type); subsets are tagged SUBSETTED."
                ),
                "security": {
                    "cors": False,
                    "description": "Authorization: Bearer <token> (issue_token).",
                },
                "resource": resources,
                # batch: served by the views (fhir_gateway/batch.py), whatever is registered
                "interaction": [{"code": code} for code in sorted({"batch", *SYSTEM_INTERACTIONS})],
                "operation": [
                    {
                        "name": "versions",
                        "definition": "http://hl7.org/fhir/OperationDefinition/"
                        "CapabilityStatement-versions",
                    },
                    *_operation_entries(operations_of(None, version), version),
                ],
            }
        ],
    }


def versions_parameters() -> dict[str, Any]:
    return {
        "resourceType": "Parameters",
        "parameter": [
            *({"name": "version", "valueCode": v} for v in SUPPORTED_VERSIONS),
            {"name": "default", "valueCode": DEFAULT_VERSION},
        ],
    }


def _modifiers_note(param: handlers.SearchParam) -> str:
    """The modifiers a parameter takes, said in its documentation (a CapabilityStatement
    has no element for them); the view refuses every other one (400)."""
    modifiers = set(param.modifiers) | ({"contains"} if param.type == "string" else set())
    if not modifiers:
        return ""
    return " Modifiers: " + ", ".join(f":{m}" for m in sorted(modifiers)) + "."
