"""Every official HL7 example of the referral types is accepted, or refused with a precise
OperationOutcome; adapted to our rules, it is accepted and reads back equal (kept fields)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fhir_gateway.models import FhirResource
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import (
    PLACER,
    World,
    body,
    submit,
    task_of,
)
from fhir_gateway.tests.test_registry import R4_EXAMPLES, R5_EXAMPLES
from referrals.models import Referral
from tests.shared_data import FHIR_EXAMPLES

pytestmark = pytest.mark.django_db

EXAMPLES = FHIR_EXAMPLES
TYPES = ("ServiceRequest", "Task", "Patient", "Communication", "DocumentReference", "Bundle")


def _example_files(folder: str) -> list[Path]:
    """The shared examples of one version; none is an error, not an empty (skipped) test."""
    files = sorted((EXAMPLES / folder).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no FHIR examples in {EXAMPLES / folder} (SHARED_DIR?)")
    return files


def _examples() -> list[tuple[str, str]]:
    found = []
    for version, folder in (("4.0", "R4"), ("5.0", "R5")):
        for path in _example_files(folder):
            rtype = json.loads(path.read_text()).get("resourceType")
            if rtype in TYPES:
                found.append((version, f"{folder}/{path.name}"))
    return found


# (status, words in the diagnostics) per example: why each official example does not fit.
EXPECTED: dict[str, tuple[int, str]] = {
    "Bundle-bundle-response.json": (422, "only transaction"),
    "Bundle-bundle-transaction.json": (422, "a transaction here is one referral"),
    "bundle-transaction.json": (422, "a transaction here is one referral"),
    "Communication-example.json": (422, "must reference the referral's Task"),
    "communication-example.json": (422, "must reference the referral's Task"),
    "DocumentReference-example.json": (422, "must reference the referral's Task"),
    "documentreference-example.json": (422, "must reference the referral's Task"),
    "Patient-example.json": (405, "create is not supported for Patient"),
    "patient-example.json": (405, "create is not supported for Patient"),
    "ServiceRequest-di.json": (422, "needs the placer identifier"),
    "ServiceRequest-example.json": (422, "must be active, not 'completed'"),
    "ServiceRequest-physiotherapy.json": (422, "must be active, not 'completed'"),
    "ServiceRequest-subrequest.json": (422, "intent must be order"),
    "servicerequest-example-pt.json": (422, "must be active, not 'completed'"),
    "servicerequest-example.json": (422, "must be active, not 'completed'"),
    "servicerequest-example3.json": (422, "performerType must name the requested specialty"),
}


def _expected(name: str, resource: dict[str, Any]) -> tuple[int, str]:
    if name in EXPECTED:
        return EXPECTED[name]
    if resource["resourceType"] == "Task":
        return (405, "create is not supported for Task")
    raise AssertionError(f"no expectation for {name}")


@pytest.mark.parametrize(("folder", "registry"), [("R4", R4_EXAMPLES), ("R5", R5_EXAMPLES)])
def test_every_shared_example_is_checked(folder: str, registry: list[str]) -> None:
    """Each example is posted here (the referral types) or in test_registry (the registry
    types, read-only: 405): a file of any other type, or one left out, fails."""
    referral = {name.split("/")[1] for _v, name in _examples() if name.startswith(folder)}
    files = {path.name for path in _example_files(folder)}

    assert not referral & set(registry)
    assert referral | set(registry) == files


@pytest.mark.parametrize(("version", "name"), _examples())
def test_official_example(world: World, version: str, name: str) -> None:
    resource = json.loads((EXAMPLES / name).read_text())
    media = FHIR_R5 if version == "5.0" else FHIR_R4
    path = "/fhir" if resource["resourceType"] == "Bundle" else f"/fhir/{resource['resourceType']}"
    stored_before = FhirResource.objects.count()

    response = world.r4.post(path, resource, content_type=media, Accept=media)

    status, words = _expected(name.split("/")[1], resource)
    issue = outcome_issue(response)
    assert response.status_code == status
    assert words in issue["diagnostics"]
    assert FhirResource.objects.count() == stored_before
    assert Referral.objects.count() == 0


def _fit(resource: dict[str, Any], world: World, placer: str, version: str) -> dict[str, Any]:
    """An official ServiceRequest adapted to our rules: placer id, specialty, question."""
    fitted = copy.deepcopy(resource)
    fitted.pop("id", None)
    fitted["status"] = "active"
    fitted["intent"] = "order"
    fitted["identifier"] = [{"system": PLACER, "value": placer}]
    fitted["performerType"] = {
        "coding": [{"system": "http://snomed.info/sct", "code": "394537008"}]
    }
    fitted.pop("requester", None)
    fitted.pop("performer", None)
    # A standalone create names a Patient we can keep: the example's, on the sender's server.
    fitted["subject"] = {
        "reference": "https://his.example.org/fhir/" + resource["subject"]["reference"]
    }
    question = {"text": "Is this indicated?"}
    if version == "4.0":
        fitted["reasonCode"] = [question]
    else:
        fitted["reason"] = [{"concept": question}]
    return fitted


KEPT_SERVICE_REQUEST = ("identifier", "priority", "performerType")


@pytest.mark.parametrize(
    ("version", "name"),
    [
        ("4.0", "R4/ServiceRequest-example.json"),
        ("4.0", "R4/ServiceRequest-physiotherapy.json"),
        ("5.0", "R5/servicerequest-example.json"),
        ("5.0", "R5/servicerequest-example3.json"),
    ],
)
def test_adapted_service_request_reads_back_equal(world: World, version: str, name: str) -> None:
    media = FHIR_R5 if version == "5.0" else FHIR_R4
    sent = _fit(json.loads((EXAMPLES / name).read_text()), world, "EX-1", version)

    created = world.r4.post("/fhir/ServiceRequest", sent, content_type=media, Accept=media)
    assert created.status_code == 201, created.content
    back = body(world.r4.get(f"/fhir/ServiceRequest/{body(created)['id']}", Accept=media))

    placer = next(i for i in back["identifier"] if i["system"] == PLACER)
    assert placer["value"] == "EX-1"
    assert back.get("priority", "routine") == sent.get("priority", "routine")
    assert back["performerType"]["coding"][0]["code"] == "394537008"
    reason = back["reasonCode"] if version == "4.0" else [r["concept"] for r in back["reason"]]
    assert reason == [{"text": "Is this indicated?"}]
    assert back["intent"] == "order" and back["status"] == "active"
    assert back == body(created)


@pytest.mark.parametrize(
    ("version", "name"), [("4.0", "R4/Patient-example.json"), ("5.0", "R5/patient-example.json")]
)
def test_official_patient_in_a_transaction_keeps_the_minimum(
    world: World, version: str, name: str
) -> None:
    media = FHIR_R5 if version == "5.0" else FHIR_R4
    official = json.loads((EXAMPLES / name).read_text())
    official.pop("id")
    from fhir_gateway.tests.referral_world import transaction

    bundle = transaction(world, version=version)
    bundle["entry"][0]["resource"] = official

    response = world.r4.post("/fhir", bundle, content_type=media, Accept=media)

    assert response.status_code == 200, response.content
    patient = body(response)["entry"][0]["resource"]
    first = official["identifier"][0]
    assert patient["identifier"] == [{"system": first["system"], "value": first["value"]}]
    assert patient["gender"] == official["gender"]
    assert patient["birthDate"] == official["birthDate"][:4]
    assert set(patient) == {"resourceType", "id", "meta", "identifier", "gender", "birthDate"}
    read = world.r4.get(f"/fhir/Patient/{patient['id']}", Accept=media)
    assert body(read) == patient


@pytest.mark.parametrize(
    ("version", "name"),
    [("4.0", "R4/Communication-example.json"), ("5.0", "R5/communication-example.json")],
)
def test_official_communication_on_our_task_is_accepted(
    world: World, version: str, name: str
) -> None:
    media = FHIR_R5 if version == "5.0" else FHIR_R4
    task_id = task_of(submit(world))["id"]
    official = json.loads((EXAMPLES / name).read_text())
    for key in ("id", "inResponseTo", "basedOn", "encounter", "recipient", "sender", "subject"):
        official.pop(key, None)
    official["partOf"] = [{"reference": f"Task/{task_id}"}]

    response = world.r5.post("/fhir/Communication", official, content_type=media, Accept=media)

    assert response.status_code == 201, response.content
    back = body(response)
    assert back["partOf"] == official["partOf"]
    assert back["status"] == "completed"
    assert Referral.objects.get().messages.count() == 1
    read = world.r5.get(f"/fhir/Communication/{back['id']}", Accept=media)
    assert body(read) == back
