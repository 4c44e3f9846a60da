"""/fhir/metadata states exactly what the router serves."""

from __future__ import annotations

import json

import pytest

from fhir_gateway.handlers import HANDLERS, OPERATIONS
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
# Case-file bytes (walked by test_binary with a case file in scope) and the report Measures
# (walked by test_measures with a reporting account).
WALKED_ELSEWHERE = ["Binary", "Measure"]
# The pull feed (walked by test_subscriptions with a Subscription of the caller's facility).
FEED_TYPES = {"4.0": ["Subscription"], "5.0": ["Subscription", "SubscriptionTopic"]}


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
        REGISTRY_TYPES + REFERRAL_TYPES + WALKED_ELSEWHERE + FEED_TYPES[version]
    )
    assert body["rest"][0]["interaction"] == [{"code": "batch"}, {"code": "transaction"}]
    assert [o["name"] for o in body["rest"][0]["operation"]] == ["versions", "events"]


@pytest.mark.parametrize(("accept", "version"), [(FHIR_R4, "4.0"), (FHIR_R5, "5.0")])
def test_capability_lists_exactly_the_routed_handlers(anonymous, accept, version):
    body = json.loads(anonymous.get("/fhir/metadata", Accept=accept).content)
    declared = {r["type"]: r for r in body["rest"][0]["resource"]}
    assert set(declared) == {t for t, h in HANDLERS.items() if version in h.fhir_versions}
    for resource_type, entry in declared.items():
        handler = HANDLERS[resource_type]
        assert [i["code"] for i in entry["interaction"]] == list(handler.interactions)
        assert [p["name"] for p in entry.get("searchParam", [])] == (
            ["_id", "_lastUpdated", *(p.name for p in handler.search_params)]
            if handler.search is not None
            else []
        )
    operations = {
        (level, rtype, name)
        for (level, rtype, name), op in OPERATIONS.items()
        if version in op.fhir_versions
    }
    listed = {("system", "", o["name"]) for o in body["rest"][0]["operation"]} - {
        ("system", "", "versions")
    }
    for rtype, entry in declared.items():
        listed |= {
            (level, rtype, o["name"])
            for o in entry.get("operation", [])
            for level in ("type", "instance")
            if (level, rtype, o["name"]) in OPERATIONS
        }
    assert listed == operations
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
        if entry["type"] in REFERRAL_TYPES + WALKED_ELSEWHERE + FEED_TYPES["4.0"]:
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


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5])
def test_conditional_read_is_declared_as_served(fhir, network, accept):
    """Every read answers If-None-Match naming the current version with 304, and every
    stored type If-Modified-Since too (Binary: If-None-Match only); the statement said
    conditionalRead "not-supported", so a caching client would not send them."""
    body = json.loads(fhir.get("/fhir/metadata", Accept=accept).content)
    declared = {r["type"]: r for r in body["rest"][0]["resource"]}
    path = f"/fhir/Organization/{network.hub.pk}"
    first = fhir.get(path, Accept=accept)

    held = fhir.get(path, Accept=accept, **{"If-None-Match": first["ETag"]})
    unmodified = fhir.get(path, Accept=accept, **{"If-Modified-Since": first["Last-Modified"]})

    assert (held.status_code, unmodified.status_code) == (304, 304)
    for rtype, entry in declared.items():
        expected = "not-match" if rtype == "Binary" else "full-support"
        assert entry["conditionalRead"] == expected, rtype


def test_types_not_declared_are_not_routed(fhir):
    body = json.loads(fhir.get("/fhir/metadata").content)
    declared = {r["type"] for r in body["rest"][0]["resource"]}
    for rtype in ["Practitioner", "Encounter", "SubscriptionTopic"]:
        assert rtype not in declared
        assert fhir.get(f"/fhir/{rtype}").status_code == 404
        assert fhir.get(f"/fhir/{rtype}/1/$events").status_code == 404
    # Operations not declared are not routed either.
    assert fhir.get("/fhir/$everything").status_code == 404
    assert fhir.get("/fhir/Organization/$events").status_code == 404
    assert fhir.get("/fhir/Organization/1/$status").status_code == 404


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5])
def test_each_types_documentation_names_every_sort_key_it_serves(anonymous, accept):
    """The CapabilityStatement says which ``_sort`` keys a type takes (in its
    documentation: ``_sort: key, key (how)…``): each served key, the common ones too."""
    statement = json.loads(anonymous.get("/fhir/metadata", Accept=accept).content)
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    for resource_type, handler in HANDLERS.items():
        if not handler.sorts and not handler.param_sorts:
            continue
        documentation = by_type[resource_type]["documentation"]
        assert "_sort:" in documentation, resource_type
        named = documentation.split("_sort:", 1)[1]
        words = {w.strip(" .;()") for part in named.split(",") for w in part.split()}
        for key in [*handler.sorts, *handler.param_sorts, "_lastUpdated", "_id"]:
            assert key in words, (resource_type, key)
