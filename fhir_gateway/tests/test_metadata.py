"""/fhir/metadata states exactly what the router serves."""

from __future__ import annotations

import json

import pytest

from fhir_gateway.handlers import HANDLERS
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5
from fhir_gateway.versions import model_class

REGISTRY_TYPES = [
    "Endpoint",
    "HealthcareService",
    "Location",
    "Organization",
    "OrganizationAffiliation",
    "PractitionerRole",
]
# Served by the referral mapping (walked by test_referral_fhir with a referral in scope).
REFERRAL_TYPES = ["Communication", "DocumentReference", "Patient", "ServiceRequest", "Task"]


@pytest.mark.parametrize(
    ("accept", "version", "release"), [(FHIR_R4, "4.0", "4.0.1"), (FHIR_R5, "5.0", "5.0.0")]
)
def test_capability_statement_is_valid_in_the_requested_version(
    anonymous, accept, version, release
):
    response = anonymous.get("/fhir/metadata", Accept=accept)
    assert response.status_code == 200
    body = json.loads(response.content)
    model_class("CapabilityStatement", version).model_validate(body)
    assert body["fhirVersion"] == release
    assert [r["type"] for r in body["rest"][0]["resource"]] == sorted(
        REGISTRY_TYPES + REFERRAL_TYPES
    )
    assert body["rest"][0]["interaction"] == [{"code": "transaction"}]


def test_capability_lists_exactly_the_routed_handlers(anonymous):
    body = json.loads(anonymous.get("/fhir/metadata").content)
    declared = {r["type"]: r for r in body["rest"][0]["resource"]}
    assert set(declared) == set(HANDLERS)
    for resource_type, entry in declared.items():
        handler = HANDLERS[resource_type]
        assert [i["code"] for i in entry["interaction"]] == list(handler.interactions)
        assert [p["name"] for p in entry.get("searchParam", [])] == (
            ["_id", "_lastUpdated", *(p.name for p in handler.search_params)]
            if handler.search is not None
            else []
        )
    assert declared["Organization"]["interaction"] == [
        {"code": "read"},
        {"code": "vread"},
        {"code": "history-instance"},
        {"code": "search-type"},
    ]
    assert [p["name"] for p in declared["Location"]["searchParam"]] == [
        "_id",
        "_lastUpdated",
        "name",
        "identifier",
        "address-country",
        "organization",
        "partof",
        "status",
        "near",
    ]


def test_every_declared_interaction_and_search_param_is_served(fhir, network):
    """Driven by the statement itself: nothing declared answers 404/405."""
    body = json.loads(fhir.get("/fhir/metadata").content)
    samples = {
        "Organization": network.hub.pk,
        "Location": network.hub.pk,
        "HealthcareService": network.pediatrics.pk,
        "Endpoint": network.endpoint.pk,
        "OrganizationAffiliation": network.link.pk,
        "PractitionerRole": network.role.pk,
    }
    values = {
        "token": "x",
        "string": "x",
        "reference": "Organization/1",
        "date": "ge2020-01-01",
        "special": "21|105|10|km",
    }
    for entry in body["rest"][0]["resource"]:
        if entry["type"] in REFERRAL_TYPES:
            continue
        rtype, pk = entry["type"], samples[entry["type"]]
        paths = {
            "read": f"/fhir/{rtype}/{pk}",
            "vread": f"/fhir/{rtype}/{pk}/_history/1",
            "history-instance": f"/fhir/{rtype}/{pk}/_history",
            "search-type": f"/fhir/{rtype}",
        }
        for interaction in entry["interaction"]:
            assert fhir.get(paths[interaction["code"]]).status_code == 200, (rtype, interaction)
        for param in entry["searchParam"]:
            value = "true" if param["name"] == "active" else values[param["type"]]
            response = fhir.get(f"/fhir/{rtype}?{param['name']}={value}", Prefer="handling=strict")
            assert response.status_code == 200, (rtype, param["name"], response.content)


def test_types_not_declared_are_not_routed(fhir):
    body = json.loads(fhir.get("/fhir/metadata").content)
    declared = {r["type"] for r in body["rest"][0]["resource"]}
    for rtype in ["Practitioner", "Binary", "Subscription", "Encounter"]:
        assert rtype not in declared
        assert fhir.get(f"/fhir/{rtype}").status_code == 404
