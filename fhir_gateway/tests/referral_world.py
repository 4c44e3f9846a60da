"""A referral network for the FHIR referral tests: an R4 district hospital system submits,
an R5 system of the central children's hospital (pediatrics) answers."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.files.storage import default_storage

from accounts.models import User
from accounts.roles import Role
from accounts.services import api_token_issue
from fhir_gateway import referral_mapping as m
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, Network
from referrals import services
from referrals.models import Referral
from registry.models import Endpoint
from tests.factories import (
    PEDIATRICS,
    DepartmentFactory,
    EndpointFactory,
    FacilityFactory,
    UserFactory,
)

PLACER = "https://codao.example.org/sid/referral"
# A Patient on the member's own server: a standalone ServiceRequest may name it by URL.
HIS_PATIENT = "https://his.codao.example.org/fhir/Patient/77"
PATIENT_SYSTEM = "https://codao.example.org/sid/pseudonym"


@dataclass
class World:
    network: Network
    submitter: User
    consultant: User
    outsider: User
    r4: FhirClient  # the submitter's system (R4)
    r5: FhirClient  # the consultant system (R5)
    other: FhirClient  # a member system of an unrelated facility
    spoke_endpoint: Endpoint
    hub_endpoint: Endpoint


def _client(user: User, version: str) -> FhirClient:
    client = FhirClient(api_token_issue(user=user, name="t").raw)
    client.version = version  # type: ignore[attr-defined]
    return client


@pytest.fixture
def world(network: Network) -> World:
    submitter = UserFactory.create(facility=network.spoke, roles=[Role.MEMBER_SYSTEM])
    consultant = UserFactory.create(facility=network.hub, roles=[Role.MEMBER_SYSTEM])
    consultant.departments.add(network.pediatrics)
    outsider = UserFactory.create(facility=network.lao, roles=[Role.MEMBER_SYSTEM])
    hub_endpoint = EndpointFactory.create(
        facility=network.hub,
        base_url="https://nhi.example.org/fhir",
        fhir_version=Endpoint.FhirVersion.R5,
    )
    return World(
        network,
        submitter,
        consultant,
        outsider,
        _client(submitter, FHIR_R4),
        _client(consultant, FHIR_R5),
        _client(outsider, FHIR_R4),
        network.endpoint,
        hub_endpoint,
    )


def service_request(
    world: World,
    placer: str = "SR-1",
    *,
    version: str = "4.0",
    subject: str = "urn:uuid:patient-1",
    performer: bool = True,
    requester: str | None = None,
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "identifier": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                    ]
                },
                "system": PLACER,
                "value": placer,
            }
        ],
        "status": "active",
        "intent": "order",
        "priority": "urgent",
        "subject": {"reference": subject},
        "requester": {"reference": requester or f"Organization/{world.network.spoke.pk}"},
        "performerType": {
            "coding": [
                {"system": "http://snomed.info/sct", "code": PEDIATRICS, "display": "Pediatric"}
            ]
        },
    }
    question = {"text": "3-year-old, fever 5 days, rash: Kawasaki disease?"}
    if version == "4.0":
        resource["reasonCode"] = [question]
    else:
        resource["reason"] = [{"concept": question}]
    if performer:
        resource["performer"] = [{"reference": f"HealthcareService/{world.network.pediatrics.pk}"}]
    return resource


def patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_SYSTEM, "value": "P-0042"}],
        "name": [{"family": "Nguyen", "given": ["An"]}],  # not kept (minimum necessary)
        "gender": "female",
        "birthDate": "2022-03-14",
    }


def transaction(world: World, placer: str = "SR-1", **kwargs: Any) -> dict[str, Any]:
    version = kwargs.pop("version", "4.0")
    entries: list[dict[str, Any]] = [
        {"fullUrl": "urn:uuid:patient-1", "resource": patient()},
        {
            "fullUrl": "urn:uuid:sr-1",
            "resource": service_request(world, placer, version=version, **kwargs),
        },
        {
            "fullUrl": "urn:uuid:task-1",
            "resource": {
                "resourceType": "Task",
                "status": "requested",
                "intent": "order",
                "focus": {"reference": "urn:uuid:sr-1"},
                "for": {"reference": "urn:uuid:patient-1"},
                "requester": {"reference": f"Organization/{world.network.spoke.pk}"},
            },
        },
    ]
    for entry in entries:
        entry["request"] = {"method": "POST", "url": entry["resource"]["resourceType"]}
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


LETTER_PDF = b"%PDF-1.4\n% discharge letter\n%%EOF\n"


def with_binary_file(
    bundle: dict[str, Any],
    *,
    url: str = "urn:uuid:bin-1",
    attachment: dict[str, Any] | None = None,
    binary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``bundle`` with a case file sent as IHE MHD does: a Binary entry (``LETTER_PDF``)
    and the DocumentReference entry whose ``content.attachment.url`` names it (the Binary
    first: the order of entries does not matter)."""
    bundle["entry"].append(
        {
            "fullUrl": url,
            "request": {"method": "POST", "url": "Binary"},
            "resource": {
                "resourceType": "Binary",
                "contentType": "application/pdf",
                "securityContext": {"reference": "urn:uuid:sr-1"},
                "data": base64.b64encode(LETTER_PDF).decode(),
                **(binary or {}),
            },
        }
    )
    bundle["entry"].append(
        {
            "fullUrl": "urn:uuid:doc-1",
            "request": {"method": "POST", "url": "DocumentReference"},
            "resource": {
                "resourceType": "DocumentReference",
                "status": "current",
                "content": [
                    {
                        "attachment": attachment
                        if attachment is not None
                        else {"contentType": "application/pdf", "url": url, "title": "letter.pdf"}
                    }
                ],
            },
        }
    )
    return bundle


def with_case_file(bundle: dict[str, Any], attachment: dict[str, Any]) -> dict[str, Any]:
    """``bundle`` with one more entry: a case file (a DocumentReference, ``attachment``)."""
    bundle["entry"].append(
        {
            "fullUrl": f"urn:uuid:doc-{len(bundle['entry'])}",
            "request": {"method": "POST", "url": "DocumentReference"},
            "resource": {
                "resourceType": "DocumentReference",
                "status": "current",
                "content": [{"attachment": attachment}],
            },
        }
    )
    return bundle


def body(response: Any) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(response.content)
    return parsed


def submit(world: World, placer: str = "SR-1") -> dict[str, Any]:
    response = world.r4.post("/fhir", transaction(world, placer), content_type=FHIR_R4)
    assert response.status_code == 200, response.content
    return body(response)


def task_of(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Task")


def draft(world: World) -> Referral:
    """A draft of the submitter's (through the service: FHIR makes none), naming pediatrics."""
    referral, _ = services.referral_submit(
        actor=world.submitter,
        requester_facility=world.network.spoke,
        placer_system="urn:codao-his",
        placer_value="SR-DRAFT",
        specialty=world.network.pediatrics.specialty,
        clinical_question="Fever for 5 days.",
        department=world.network.pediatrics,
        draft=True,
    )
    return referral


# --- the Task workflow over FHIR (test_task_workflow, test_task_conference_counter) ----


def third_facility_expert(world: World, role: Role = Role.CONSULTANT) -> User:
    """A paediatrician of a third facility at home (no party to the cases): someone a
    conference may invite, whose grant lets the case's data reach them (the border rule,
    ``referrals.permissions.referral_expert_reach_filter``)."""
    clinic = FacilityFactory.create(country=world.network.spoke.country, tier=1)
    department = DepartmentFactory.create(
        facility=clinic, specialty=world.network.pediatrics.specialty, accepting=False
    )
    expert = UserFactory.create(facility=clinic, roles=[role])
    expert.departments.add(department)
    return expert


def member_client(user: User) -> FhirClient:
    return FhirClient(api_token_issue(user=user, name="t").raw)


def read_task(client: FhirClient, task_id: str, version: str = FHIR_R4) -> dict[str, Any]:
    response = client.get(f"/fhir/Task/{task_id}", Accept=version)
    assert response.status_code == 200, response.content
    return body(response)


def update_task(
    client: FhirClient,
    task_id: str,
    change: Callable[[dict[str, Any]], object],
    version: str = FHIR_R4,
    if_match: str | None = None,
) -> Any:
    """Read the Task, apply ``change`` to a copy, PUT it back with If-Match (the version
    read, unless ``if_match`` says otherwise)."""
    task = read_task(client, task_id, version)
    changed = copy.deepcopy(task)
    change(changed)
    return client.put(
        f"/fhir/Task/{task_id}",
        changed,
        content_type=version,
        Accept=version,
        **{"If-Match": if_match or f'W/"{task["meta"]["versionId"]}"'},
    )


def task_input(code: str, **value: Any) -> dict[str, Any]:
    return {"type": {"coding": [{"system": m.TASK_INPUT_SYSTEM, "code": code}]}, **value}


def consult_note(task_id: str) -> dict[str, Any]:
    """The consultant's advice as a DocumentReference (LOINC 11488-4) for ``task_id``."""
    return {
        "resourceType": "DocumentReference",
        "extension": [{"url": m.DISPOSITION_EXTENSION, "valueCode": "manage_locally"}],
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4"}]},
        "basedOn": [{"reference": f"ServiceRequest/{task_id}"}],
        "content": [{"attachment": {"contentType": "text/plain", "data": "SVZJRyAyZy9rZw=="}}],
    }


def message(task_id: str, text: str, in_response_to: str | None = None) -> dict[str, Any]:
    """An R4 Communication with ``text`` on ``task_id``'s referral, answering
    ``in_response_to`` (a reference) when given."""
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "payload": [{"contentString": text}],
    }
    if in_response_to:
        resource["inResponseTo"] = [{"reference": in_response_to}]
    return resource


def case_file(
    task_id: str | None, label: str = "a", *identifiers: dict[str, Any]
) -> dict[str, Any]:
    """A case file (one inline PDF whose bytes and title follow ``label``) for ``task_id``
    (None: a Bundle entry's, without a reference), carrying ``identifiers``."""
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "content": [
            {
                "attachment": {
                    "contentType": "application/pdf",
                    "title": f"{label}.pdf",
                    "data": base64.b64encode(f"%PDF-1.4 {label}\n%%EOF\n".encode()).decode(),
                }
            }
        ],
    }
    if task_id is not None:
        resource["context"] = {"related": [{"reference": f"Task/{task_id}"}]}
    if identifiers:
        resource["identifier"] = list(identifiers)
    return resource


def accepted(world: World, placer: str = "SR-1") -> str:
    """A referral submitted by the R4 system and accepted by the R5 one: its Task id."""
    task_id = str(task_of(submit(world, placer))["id"])
    response = update_task(world.r5, task_id, lambda t: t.update(status="accepted"), FHIR_R5)
    assert response.status_code == 200, response.content
    return task_id


def advised(world: World, placer: str = "SR-1") -> str:
    """Accepted, then e-consult advice (a consult note): a finished case."""
    task_id = accepted(world, placer)
    response = world.r5.post(
        "/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5, Accept=FHIR_R5
    )
    assert response.status_code == 201, response.content
    return task_id


def stored_files(path: str = "") -> set[str]:
    """Every file in the default storage (in memory under the test settings)."""
    directories, files = default_storage.listdir(path)
    found = {f"{path}/{name}".lstrip("/") for name in files}
    for directory in directories:
        found |= stored_files(f"{path}/{directory}".lstrip("/"))
    return found


__all__ = ["FHIR_R4", "FHIR_R5"]
