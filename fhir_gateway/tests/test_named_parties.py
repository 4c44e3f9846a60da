"""What a member names in a resource is honoured or refused, never silently replaced:
the department asked for (performer / Task.owner), the patient a message or note is about
(subject), the sender of a message (found by an integrator following docs/fhir.md)."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_gateway import referral_mapping as m
from fhir_gateway.models import FhirResource
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    consult_note,
    submit,
    task_of,
    transaction,
    update_task,
    with_case_file,
)
from referrals.models import ConsultNote, Message, Referral
from tests.factories import DepartmentFactory

pytestmark = pytest.mark.django_db


def _post_bundle(world: World, bundle: dict[str, Any]) -> Any:
    return world.r4.post("/fhir", bundle, content_type=FHIR_R4, Accept=FHIR_R4)


def _nothing_submitted() -> None:
    assert not Referral.objects.exists()
    assert not FhirResource.objects.filter(resource_type="Task").exists()


def _naming_department(world: World, where: str, named: dict[str, Any]) -> dict[str, Any]:
    """A transaction naming the department by ``named`` alone, as the ServiceRequest's
    ``performer`` or the Task's ``owner`` (``where``)."""
    bundle = transaction(world, performer=False)
    if where == "owner":
        bundle["entry"][2]["resource"]["owner"] = named
    else:
        bundle["entry"][1]["resource"]["performer"] = [named]
    return bundle


def _refused(response: Any, element: str, diagnostics: str) -> None:
    """422 business-rule on ``element``, saying ``diagnostics``."""
    assert response.status_code == 422, response.content
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("business-rule", [element])
    assert diagnostics in issue["diagnostics"]


def _referral_and_task(task_id: str) -> tuple[Any, ...]:
    """What a refused forward must leave as it was: the referral's department, version and
    state, and its Task's current version."""
    referral = Referral.objects.get(filler_id=task_id)
    task = FhirResource.objects.get(resource_type="Task", logical_id=task_id, is_current=True)
    return referral.assigned_department_id, referral.version, referral.state, task.version_id


def _forward(world: World, task_id: str, reference: str) -> Any:
    """The owner's system forwards the Task to ``reference`` (R5)."""

    def forward(task: dict[str, Any]) -> None:
        task["owner"] = {"reference": reference}
        task["statusReason"] = {"concept": {"text": "Elsewhere, please."}}

    return update_task(world.r5, task_id, forward, FHIR_R5)


@pytest.mark.parametrize("where", ["performer", "owner"])
def test_a_department_named_as_an_organization_is_refused_not_ignored(
    world: World, where: str
) -> None:
    """Task.owner / ServiceRequest.performer = Organization/<the hub>: routing used to
    choose another hospital with no word."""
    bundle = transaction(world, performer=False)
    organization = {"reference": f"Organization/{world.network.hub.pk}"}
    if where == "owner":
        bundle["entry"][2]["resource"]["owner"] = organization
    else:
        bundle["entry"][1]["resource"]["performer"] = [organization]

    response = _post_bundle(world, bundle)

    assert response.status_code == 422, response.content
    issue = outcome_issue(response)
    element = "Task.owner" if where == "owner" else "ServiceRequest.performer"
    assert issue["code"] == "business-rule" and issue["expression"] == [element]
    assert (
        f"HealthcareService?organization=Organization/{world.network.hub.pk}"
        in (issue["diagnostics"])
    )
    _nothing_submitted()


def test_a_named_department_that_cannot_take_the_referral_is_422_business_rule(
    world: World,
) -> None:
    """A department of the requester's own facility is no routing candidate: 422 (it was
    400 'invalid', worded for the REST API)."""
    own = DepartmentFactory.create(
        facility=world.network.spoke, specialty=world.network.pediatrics.specialty
    )
    bundle = transaction(world, performer=False)
    bundle["entry"][2]["resource"]["owner"] = {"reference": f"HealthcareService/{own.pk}"}

    response = _post_bundle(world, bundle)

    assert response.status_code == 422, response.content
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("business-rule", ["Task.owner"])
    assert "not a routing candidate" in issue["diagnostics"]
    assert "GET the suggestions" not in issue["diagnostics"]
    _nothing_submitted()


def test_a_consult_note_about_another_patient_is_refused(world: World) -> None:
    first = accepted(world, "SR-1")
    other = str(task_of(submit(world, "SR-2"))["id"])
    note = consult_note(first)
    note["subject"] = {"reference": f"Patient/{other}"}

    response = world.r5.post("/fhir/DocumentReference", note, content_type=FHIR_R5, Accept=FHIR_R5)

    assert response.status_code == 422, response.content
    issue = outcome_issue(response)
    assert issue["expression"] == ["DocumentReference.subject"]
    assert f"Patient/{first}" in issue["diagnostics"]
    assert not ConsultNote.objects.exists()
    assert Referral.objects.get(filler_id=first).state == "accepted"

    note["subject"] = {"reference": f"Patient/{first}"}  # its own patient: filed
    response = world.r5.post("/fhir/DocumentReference", note, content_type=FHIR_R5, Accept=FHIR_R5)
    assert response.status_code == 201, response.content
    assert body(response)["subject"] == {"reference": f"Patient/{first}"}


def _message(task_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "payload": [{"contentString": "Weight 14 kg."}],
        **extra,
    }


def test_a_message_about_another_patient_or_from_another_facility_is_refused(
    world: World,
) -> None:
    task_id = str(task_of(submit(world, "SR-1"))["id"])
    other = str(task_of(submit(world, "SR-2"))["id"])

    about_other = world.r4.post(
        "/fhir/Communication",
        _message(task_id, subject={"reference": f"Patient/{other}"}),
        content_type=FHIR_R4,
        Accept=FHIR_R4,
    )
    spoofed = world.r4.post(
        "/fhir/Communication",
        _message(task_id, sender={"reference": f"Organization/{world.network.hub.pk}"}),
        content_type=FHIR_R4,
        Accept=FHIR_R4,
    )

    assert about_other.status_code == 422, about_other.content
    assert outcome_issue(about_other)["expression"] == ["Communication.subject"]
    assert spoofed.status_code == 403, spoofed.content
    assert outcome_issue(spoofed)["expression"] == ["Communication.sender"]
    assert not Message.objects.exists()

    own = world.r4.post(
        "/fhir/Communication",
        _message(
            task_id,
            subject={"reference": f"Patient/{task_id}"},
            sender={"reference": f"Organization/{world.network.spoke.pk}"},
        ),
        content_type=FHIR_R4,
        Accept=FHIR_R4,
    )
    assert own.status_code == 201, own.content
    assert Message.objects.count() == 1
    # A person named by a staff identifier (no type) is not judged as a facility.
    person = world.r4.post(
        "/fhir/Communication",
        _message(
            task_id,
            sender={
                "identifier": {"system": "urn:oid:1.2.3.4.staff", "value": "dr-nguyen"},
                "display": "Dr Nguyen",
            },
        ),
        content_type=FHIR_R4,
        Accept=FHIR_R4,
    )
    assert person.status_code == 201, person.content
    contained = world.r4.post(
        "/fhir/Communication",
        _message(
            task_id,
            contained=[
                {
                    "resourceType": "Organization",
                    "id": "o",
                    "identifier": [
                        {
                            "system": "https://consilium.example.org/fhir/sid/facility-code",
                            "value": world.network.hub.code,
                        }
                    ],
                }
            ],
            sender={"reference": "#o"},
        ),
        content_type=FHIR_R4,
        Accept=FHIR_R4,
    )
    assert contained.status_code == 403, contained.content


def test_an_unknown_code_of_our_code_systems_is_refused_not_defaulted(world: World) -> None:
    """A consult mode 'teleport' was read as async, a decline reason 'zzz' as other."""
    bundle = transaction(world)
    bundle["entry"][1]["resource"]["code"] = {
        "coding": [{"system": m.CONSULT_MODE_SYSTEM, "code": "teleport"}]
    }
    response = _post_bundle(world, bundle)
    assert response.status_code == 422, response.content
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("code-invalid", ["ServiceRequest.code"])
    assert "async" in issue["diagnostics"]
    _nothing_submitted()

    task_id = str(task_of(submit(world))["id"])
    task = body(world.r5.get(f"/fhir/Task/{task_id}", Accept=FHIR_R5))
    task["status"] = "rejected"
    task["statusReason"] = {
        "concept": {"coding": [{"system": m.DECLINE_REASON_SYSTEM, "code": "zzz"}], "text": "?"}
    }
    response = world.r5.put(
        f"/fhir/Task/{task_id}", task, content_type=FHIR_R5, Accept=FHIR_R5, **{"If-Match": 'W/"1"'}
    )
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == ["Task.statusReason"]
    assert Referral.objects.get().state == "submitted"


def test_a_birth_date_in_the_future_is_refused(world: World) -> None:
    bundle = transaction(world)
    bundle["entry"][0]["resource"]["birthDate"] = "2099-01-01"
    response = _post_bundle(world, bundle)
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == ["Patient.birthDate"]
    _nothing_submitted()


@pytest.mark.parametrize(
    ("subject", "status"),
    [("Patient/someone-else", 422), ("urn:uuid:sr-1", 422), ("urn:uuid:patient-1", 201)],
)
def test_a_case_file_entry_is_about_the_bundles_patient(
    world: World, subject: str, status: int
) -> None:
    bundle = with_case_file(
        transaction(world),
        {"contentType": "application/pdf", "data": "JVBERi0xLjQKJSVFT0YK"},
    )
    bundle["entry"][-1]["resource"]["subject"] = {"reference": subject}

    response = _post_bundle(world, bundle)

    if status == 201:
        assert response.status_code == 200, response.content
        assert [e["response"]["status"] for e in body(response)["entry"]] == ["201 Created"] * 4
    else:
        assert response.status_code == 422, response.content
        _nothing_submitted()


@pytest.mark.parametrize("where", ["performer", "owner"])
def test_a_department_named_without_a_reference_is_refused(world: World, where: str) -> None:
    """A performer / owner given by display or identifier alone was left to routing."""
    bundle = transaction(world, performer=False)
    named = {"display": "Paediatrics, Children's Hospital"}
    if where == "owner":
        bundle["entry"][2]["resource"]["owner"] = named
    else:
        bundle["entry"][1]["resource"]["performer"] = [named]

    response = _post_bundle(world, bundle)

    assert response.status_code == 422, response.content
    expected = "Task.owner" if where == "owner" else "ServiceRequest.performer[0]"
    assert outcome_issue(response)["expression"] == [expected]
    _nothing_submitted()


# --- Task.owner beside ServiceRequest.performer (review suspicion) ---------------------
# Task.owner was read only when the ServiceRequest named no performer: an owner naming
# another department, or no department at all, was silently ignored.


def test_a_task_owner_contradicting_the_performer_is_refused(world: World) -> None:
    bundle = transaction(world)
    cardiology = world.network.cardiology
    bundle["entry"][2]["resource"]["owner"] = {"reference": f"HealthcareService/{cardiology.pk}"}

    response = _post_bundle(world, bundle)

    _refused(response, "Task.owner", f"HealthcareService/{world.network.pediatrics.pk}")
    _nothing_submitted()


def test_a_task_owner_that_is_no_department_is_refused_beside_a_performer(world: World) -> None:
    bundle = transaction(world)
    bundle["entry"][2]["resource"]["owner"] = {"reference": f"Organization/{world.network.hub.pk}"}

    response = _post_bundle(world, bundle)

    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == ["Task.owner"]
    _nothing_submitted()


def test_a_task_owner_naming_the_performer_is_taken(world: World) -> None:
    """The same department, however written (absolute, versioned), agrees."""
    bundle = transaction(world)
    pediatrics = world.network.pediatrics
    bundle["entry"][2]["resource"]["owner"] = {
        "reference": f"http://testserver/fhir/HealthcareService/{pediatrics.pk}/_history/1"
    }

    response = _post_bundle(world, bundle)

    assert response.status_code == 200, response.content
    assert Referral.objects.get().assigned_department_id == pediatrics.pk


# --- A department's id written with a leading zero (review suspicion) -------------------
# Logical ids are strings: HealthcareService/01 is not HealthcareService/1. It was read as
# a number, so it named that department.


@pytest.mark.parametrize("where", ["performer", "owner"])
def test_a_department_id_with_a_leading_zero_is_no_department(world: World, where: str) -> None:
    named = {"reference": f"HealthcareService/0{world.network.pediatrics.pk}"}
    bundle = _naming_department(world, where, named)

    response = _post_bundle(world, bundle)

    element = "Task.owner" if where == "owner" else "ServiceRequest.performer"
    _refused(response, element, "is not a department of the network")
    _nothing_submitted()


@pytest.mark.parametrize("department", ["cardiology", "pediatrics"])
def test_a_forward_to_a_department_id_with_a_leading_zero_is_refused(
    world: World, department: str
) -> None:
    """To another department (it was forwarded there) or the Task's own (it was a forward
    to where the case already is)."""
    task_id = str(task_of(submit(world))["id"])
    pk = getattr(world.network, department).pk
    before = _referral_and_task(task_id)

    response = _forward(world, task_id, f"HealthcareService/0{pk}")

    _refused(response, "Task.owner", "is not a department of the network")
    assert _referral_and_task(task_id) == before


# --- A requester naming a Bundle entry (review of the tightened requester check) --------
# A literal reference that is no Organization nor a person / device of the sender is 422;
# a urn:uuid: reference was read as no type at all, so the Bundle's own Patient entry (a
# patient asking for the referral: FHIR allows a Patient requester, as Patient/<id>) was
# refused.


@pytest.mark.parametrize("element", ["ServiceRequest.requester", "Task.requester"])
def test_a_requester_naming_the_bundles_patient_entry_is_accepted(
    world: World, element: str
) -> None:
    # Given a transaction whose requester is its own Patient entry
    bundle = transaction(world)
    index = 1 if element.startswith("ServiceRequest") else 2
    bundle["entry"][index]["resource"]["requester"] = {"reference": "urn:uuid:patient-1"}

    # When it is posted
    response = _post_bundle(world, bundle)

    # Then the referral is submitted for the caller's facility
    assert response.status_code == 200, response.content
    assert Referral.objects.get().requester_facility_id == world.network.spoke.pk


# --- A reference on another server's base (review suspicion) ----------------------------
# Only the type and id of an absolute URL were read: https://evil.example/fhir/
# HealthcareService/<pk> was taken as our department, Organization/<own> on another server
# as the caller's facility. A write needing one of ours refuses another server's (422);
# one on this server's base (scheme and host in any case, the default port written or not)
# is ours, as searches read it.

FOREIGN = "https://evil.example/fhir"
OURS_WRITTEN_OTHERWISE = "HTTP://TestServer:80/fhir"


@pytest.mark.parametrize("where", ["performer", "owner"])
def test_a_department_on_another_server_is_refused(world: World, where: str) -> None:
    # Given a transaction naming the department by a URL on another server
    pediatrics = world.network.pediatrics.pk
    named = {"reference": f"{FOREIGN}/HealthcareService/{pediatrics}"}
    bundle = _naming_department(world, where, named)

    # When it is posted
    response = _post_bundle(world, bundle)

    # Then it is 422 naming the element, and nothing is submitted
    element = "Task.owner" if where == "owner" else "ServiceRequest.performer"
    _refused(response, element, "on another server")
    _nothing_submitted()

    # And the same department on this server's base, written otherwise, is taken
    named["reference"] = f"{OURS_WRITTEN_OTHERWISE}/HealthcareService/{pediatrics}"
    response = _post_bundle(world, bundle)
    assert response.status_code == 200, response.content
    assert Referral.objects.get().assigned_department_id == pediatrics


def test_a_forward_to_a_department_on_another_server_is_refused(world: World) -> None:
    # Given a submitted referral's Task
    task_id = str(task_of(submit(world))["id"])
    cardiology = world.network.cardiology.pk
    before = _referral_and_task(task_id)

    # When it is forwarded to another server's HealthcareService/<cardiology>
    response = _forward(world, task_id, f"{FOREIGN}/HealthcareService/{cardiology}")

    # Then it is 422 on Task.owner, and the referral and its Task are unchanged
    _refused(response, "Task.owner", "on another server")
    assert _referral_and_task(task_id) == before

    # And to cardiology on this server's base, written otherwise, it is forwarded
    response = _forward(world, task_id, f"{OURS_WRITTEN_OTHERWISE}/HealthcareService/{cardiology}")
    assert response.status_code == 200, response.content
    assert Referral.objects.get(filler_id=task_id).assigned_department_id == cardiology


@pytest.mark.parametrize("element", ["ServiceRequest.requester", "Task.requester"])
def test_a_requester_on_another_server_is_refused(world: World, element: str) -> None:
    # Given a transaction whose requester is the caller's facility id on another server
    bundle = transaction(world)
    index = 1 if element.startswith("ServiceRequest") else 2
    spoke = world.network.spoke.pk
    requester = {"reference": f"{FOREIGN}/Organization/{spoke}"}
    bundle["entry"][index]["resource"]["requester"] = requester

    # When it is posted
    response = _post_bundle(world, bundle)

    # Then it is 422 naming the element, and nothing is submitted
    _refused(response, element, "on another server")
    _nothing_submitted()

    # And the caller's facility on this server's base, written otherwise, is taken
    requester["reference"] = f"{OURS_WRITTEN_OTHERWISE}/Organization/{spoke}"
    response = _post_bundle(world, bundle)
    assert response.status_code == 200, response.content
    assert Referral.objects.get().requester_facility_id == spoke


def test_a_message_on_a_referral_of_another_server_is_refused(world: World) -> None:
    # Given a referral, and a message whose partOf is its Task id on another server
    task_id = str(task_of(submit(world))["id"])
    on_another_server = {
        **_message(task_id),
        "partOf": [{"reference": f"{FOREIGN}/Task/{task_id}"}],
    }

    # When it is posted
    response = world.r4.post(
        "/fhir/Communication", on_another_server, content_type=FHIR_R4, Accept=FHIR_R4
    )

    # Then it is 422 on Communication.partOf, and no message is filed
    assert response.status_code == 422, response.content
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("business-rule", ["Communication.partOf"])
    assert not Message.objects.exists()
