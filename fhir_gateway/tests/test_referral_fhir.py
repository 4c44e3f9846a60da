"""The referral resources over FHIR: intake, workflow, reads, scope, outbox (R4 and R5)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from fhir_gateway import referral_mapping as m
from fhir_gateway.models import FhirResource, OutboxMessage
from fhir_gateway.storage import validate_resource
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import (
    HIS_PATIENT,
    PLACER,
    World,
    body,
    consult_note,
    message,
    service_request,
    submit,
    task_of,
    transaction,
)
from referrals.models import Priority, Referral, ReferralState
from tests.factories import FacilityIdentifierFactory

pytestmark = pytest.mark.django_db


def _task(world: World, bundle: dict[str, Any]) -> str:
    return str(task_of(bundle)["id"])


def _get(client: Any, path: str, version: str = FHIR_R4) -> dict[str, Any]:
    response = client.get(path, Accept=version)
    assert response.status_code == 200, response.content
    return body(response)


def _put_task(client: Any, task: dict[str, Any], version: str, etag: str | None) -> Any:
    headers = {"If-Match": etag} if etag else {}
    return client.put(
        f"/fhir/Task/{task['id']}", task, content_type=version, Accept=version, **headers
    )


# --------------------------------------------------------------------------- intake


def test_transaction_creates_the_referral_and_answers_the_assigned_owner(world: World) -> None:
    bundle = submit(world)

    assert bundle["type"] == "transaction-response"
    assert [e["response"]["status"] for e in bundle["entry"]] == ["201 Created"] * 3
    referral = Referral.objects.get()
    assert referral.state == ReferralState.SUBMITTED
    assert referral.assigned_department == world.network.pediatrics
    assert (referral.patient_ref, referral.patient_sex, referral.patient_birth_year) == (
        "https://codao.example.org/sid/pseudonym|P-0042",
        "female",
        2022,
    )
    patient, order, task = (e["resource"] for e in bundle["entry"])
    assert patient == {
        "resourceType": "Patient",
        "id": referral.filler_id,
        "meta": patient["meta"],
        "identifier": [{"system": "https://codao.example.org/sid/pseudonym", "value": "P-0042"}],
        "gender": "female",
        "birthDate": "2022",
    }
    assert order["performerType"]["coding"][0]["code"] == "394537008"
    assert order["reasonCode"] == [{"text": "3-year-old, fever 5 days, rash: Kawasaki disease?"}]
    assert task["status"] == "requested"
    assert task["owner"] == {"reference": f"HealthcareService/{world.network.pediatrics.pk}"}
    assert task["focus"] == {"reference": f"ServiceRequest/{referral.filler_id}"}
    assert task["restriction"]["period"]["end"]
    assert {
        "system": m.BSER_BUSINESS_STATUS,
        "code": "2.0",
        "display": "Service Request Created",
    } in task["businessStatus"]["coding"]
    assert task["meta"]["versionId"] == str(referral.version)


def test_transaction_enqueues_each_endpoint_in_its_version(world: World) -> None:
    submit(world)

    referral = Referral.objects.get()
    messages = list(OutboxMessage.objects.order_by("endpoint_id", "seq"))
    # Ordered per receiver: one endpoint's outage holds none of the other's messages.
    assert {(m.aggregate_key, m.endpoint_id, m.seq) for m in messages} == {
        (f"referral:{referral.pk}:endpoint:{e.pk}", e.pk, seq)
        for e in (world.spoke_endpoint, world.hub_endpoint)
        for seq in (1, 2, 3)
    }
    assert [(x.endpoint_id, x.resource_type) for x in messages] == [
        (e.pk, t)
        for e in sorted([world.spoke_endpoint, world.hub_endpoint], key=lambda e: e.pk)
        for t in ("Patient", "ServiceRequest", "Task")
    ]
    # Both renderings exist for every version delivered.
    for row in FhirResource.objects.filter(source_pk=referral.pk):
        assert row.json_r4 and row.json_r5


def test_resubmitted_transaction_answers_the_existing_referral(world: World) -> None:
    first = submit(world)
    again = submit(world)

    assert Referral.objects.count() == 1
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK"] * 3
    assert _task(world, again) == _task(world, first)
    assert FhirResource.objects.filter(resource_type="Task").count() == 1


def test_a_resubmission_with_other_content_says_the_first_stands(world: World) -> None:
    """Idempotent intake answers the first referral; a changed resubmission (an offline
    site that edited its referral) learns that its change was not applied."""
    first = submit(world)
    assert "outcome" not in first["entry"][1]["response"]
    again = submit(world)  # the same content: no warning
    assert "outcome" not in again["entry"][1]["response"]

    bundle = transaction(world)
    order = bundle["entry"][1]["resource"]
    order["reasonCode"] = [{"text": "Fever 7 days now, desquamation."}]
    order["priority"] = "stat"
    response = world.r4.post("/fhir", bundle, content_type=FHIR_R4)
    assert response.status_code == 200, response.content
    answer = json.loads(response.content)
    assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK"] * 3
    issue = answer["entry"][1]["response"]["outcome"]["issue"][0]
    assert (issue["severity"], issue["code"]) == ("warning", "business-rule")
    assert "clinical question" in issue["diagnostics"] and "priority" in issue["diagnostics"]
    assert "nothing of this one was applied" in issue["diagnostics"]
    referral = Referral.objects.get()
    assert referral.clinical_question == "3-year-old, fever 5 days, rash: Kawasaki disease?"
    validate_resource(answer, "4.0")  # a valid R4 transaction-response (raises if not)


def test_transaction_is_all_or_nothing(world: World) -> None:
    bundle = transaction(world)
    bundle["entry"].append(
        {
            "resource": {
                "resourceType": "DocumentReference",
                "status": "current",
                "content": [
                    {"attachment": {"contentType": "application/pdf", "data": "bm90IGEgcGRm"}}
                ],
            },
            "request": {"method": "POST", "url": "DocumentReference"},
        }
    )

    response = world.r4.post("/fhir", bundle)

    assert response.status_code in (400, 415, 422), response.content
    assert outcome_issue(response)["severity"] == "error"
    assert Referral.objects.count() == 0
    assert not FhirResource.objects.filter(
        resource_type__in=["Task", "ServiceRequest", "Patient"]
    ).exists()
    assert OutboxMessage.objects.count() == 0


def test_requester_of_another_facility_is_refused(world: World) -> None:
    bundle = transaction(world, requester=f"Organization/{world.network.hub.pk}")

    response = world.r4.post("/fhir", bundle)

    assert response.status_code == 403
    issue = outcome_issue(response)
    assert issue["code"] == "forbidden"
    assert "only request for your own facility" in issue["diagnostics"]
    assert Referral.objects.count() == 0


CODES = "https://consilium.example.org/fhir/sid/facility-code"


def _requester_cases(world: World) -> list[tuple[dict[str, Any], list[dict[str, Any]], int]]:
    """(requester, contained, status): every way of naming a facility is checked."""
    spoke, hub = world.network.spoke, world.network.hub
    FacilityIdentifierFactory.create(facility=hub, system="urn:moh", value="H-1")
    FacilityIdentifierFactory.create(facility=spoke, system="urn:moh", value="S-1")
    other = {"type": "Organization", "identifier": {"system": CODES, "value": hub.code}}
    return [
        (other, [], 403),
        ({"identifier": {"system": "urn:moh", "value": "H-1"}}, [], 403),
        ({"identifier": {"value": "H-1"}}, [], 403),  # no system: any of its identifiers
        ({"reference": f"Organization?identifier={CODES}|{hub.code}"}, [], 403),
        (
            {"reference": "#o1"},
            [{"resourceType": "Organization", "id": "o1", "identifier": [other["identifier"]]}],
            403,
        ),
        ({"identifier": {"system": "urn:moh", "value": "nobody"}}, [], 422),
        ({"reference": "Organization?name=Bench"}, [], 422),
        ({"reference": "#o1"}, [{"resourceType": "Organization", "id": "o1", "name": "x"}], 422),
        ({"identifier": {"system": CODES, "value": spoke.code}}, [], 201),
        # Review suspicion (ids as text or numbers, a check passing for another facility).
        # An id is a string: Organization/0<own> is not the caller's facility.
        ({"reference": f"Organization/0{spoke.pk}"}, [], 403),
        # The caller's Organization by reference, another facility by identifier: it passed.
        (
            {"reference": f"Organization/{spoke.pk}", "identifier": other["identifier"]},
            [],
            403,
        ),
        # What is no Organization nor a person of the sender cannot be checked: these
        # passed, the first two naming the other hospital (its Location, a department).
        ({"reference": f"Location/{hub.pk}"}, [], 422),
        ({"reference": f"HealthcareService/{world.network.pediatrics.pk}"}, [], 422),
        ({"reference": f"organization/{hub.pk}"}, [], 422),
        ({"reference": f"Organization/{hub.pk}/x"}, [], 422),
        ({"type": "Organization", "reference": str(hub.pk)}, [], 422),
        # An identifier we cannot tie to a facility beside the caller's own reference: the
        # reference is checked (a member's own name for itself).
        (
            {
                "reference": f"Organization/{spoke.pk}",
                "identifier": {"system": "urn:x", "value": "me"},
            },
            [],
            201,
        ),
        ({"reference": f"http://testserver/fhir/Organization/{spoke.pk}/_history/2"}, [], 201),
        ({"reference": "Device/scanner-3"}, [], 201),  # a device of the sender
        ({"reference": "Organization?identifier=urn:moh|S-1"}, [], 201),
        ({"type": "Practitioner", "identifier": {"system": "urn:npi", "value": "1"}}, [], 201),
        (
            {"reference": "#p1"},
            [{"resourceType": "Practitioner", "id": "p1", "name": [{"family": "Lê"}]}],
            201,
        ),
    ]


def test_a_requester_named_by_identifier_or_condition_is_checked_too(world: World) -> None:
    for i, (requester, contained, status) in enumerate(_requester_cases(world)):
        resource = service_request(world, f"SR-R{i}", subject=HIS_PATIENT)
        resource["requester"] = requester
        if contained:
            resource["contained"] = contained
        before = Referral.objects.count()

        response = world.r4.post("/fhir/ServiceRequest", resource)

        assert response.status_code == status, (requester, response.content)
        if status != 201:
            issue = outcome_issue(response)
            assert issue["code"] == ("forbidden" if status == 403 else "business-rule")
            assert issue["expression"] == ["ServiceRequest.requester"]
            assert Referral.objects.count() == before
        else:
            assert Referral.objects.count() == before + 1
            referral = Referral.objects.get(placer_value=f"SR-R{i}")
            assert referral.requester_facility_id == world.network.spoke.pk


def test_a_standalone_service_request_names_a_patient_we_can_keep(world: World) -> None:
    first = submit(world, "SR-P0")  # a transaction with its Patient (identifier, sex, year)
    referral = Referral.objects.get(placer_value="SR-P0")
    assert referral.patient_ref
    task_id = task_of(first)["id"]
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"identifier": {"system": "urn:his", "value": "P-99"}}, 201, "urn:his|P-99"),
        ({"reference": HIS_PATIENT}, 201, HIS_PATIENT),
        ({"reference": f"Patient/{task_id}"}, 201, referral.patient_ref),  # same patient
        ({"display": "a 3-year-old"}, 201, ""),  # de-identified
        ({"reference": "Patient/does-not-exist"}, 422, ""),
        ({"reference": "Group/1"}, 422, ""),
        ({"reference": "urn:uuid:p"}, 422, ""),
        ({"type": "Group", "identifier": {"value": "G-1"}}, 422, ""),
    ]
    for i, (subject, status, kept) in enumerate(cases):
        resource = service_request(world, f"SR-P{i + 1}")
        resource["subject"] = subject
        before = Referral.objects.count()

        response = world.r4.post("/fhir/ServiceRequest", resource)

        assert response.status_code == status, (subject, response.content)
        if status == 201:
            made = Referral.objects.get(placer_value=f"SR-P{i + 1}")
            assert made.patient_ref == kept
            if kept == referral.patient_ref:
                assert (made.patient_sex, made.patient_birth_year) == (
                    referral.patient_sex, referral.patient_birth_year
                )  # fmt: skip
        else:
            assert outcome_issue(response)["expression"] == ["ServiceRequest.subject"]
            assert Referral.objects.count() == before

    borrowed = service_request(world, "SR-P99")
    borrowed.pop("requester")
    borrowed["subject"] = {"reference": f"Patient/{task_id}"}
    outsider = world.other.post("/fhir/ServiceRequest", borrowed)  # not its referral's patient
    assert outsider.status_code == 422, outsider.content
    assert not Referral.objects.filter(placer_value="SR-P99").exists()


def test_a_retry_is_answered_with_the_first_whatever_its_subject(world: World) -> None:
    """Idempotent intake: a resubmission (by If-None-Exist or by the placer identifier) of a
    referral already stored is answered with it, not judged as a new one's subject."""
    submit(world, "SR-Q1")
    retry = service_request(world, "SR-Q1", subject="Patient/made-before-the-rule")
    condition = {"If-None-Exist": f"identifier={PLACER}|SR-Q1"}

    for headers in ({}, condition):
        response = world.r4.post("/fhir/ServiceRequest", retry, **headers)
        assert response.status_code == 200, response.content
    bundle = transaction(world, "SR-Q1")  # the same retry as a transaction without its Patient
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Patient"]
    bundle["entry"][0]["resource"]["subject"] = {"reference": "Patient/made-before-the-rule"}
    bundle["entry"][1]["resource"].pop("for")
    again = world.r4.post("/fhir", bundle)
    assert again.status_code == 200, again.content
    assert Referral.objects.count() == 1
    fresh = transaction(world, "SR-Q2")  # not a retry: refused
    fresh["entry"] = [e for e in fresh["entry"] if e["resource"]["resourceType"] != "Patient"]
    fresh["entry"][0]["resource"]["subject"] = {"reference": "Patient/made-before-the-rule"}
    fresh["entry"][1]["resource"].pop("for")
    refused = world.r4.post("/fhir", fresh)
    assert refused.status_code == 422
    assert outcome_issue(refused)["expression"] == ["ServiceRequest.subject"]
    assert Referral.objects.count() == 1


def test_a_transaction_subject_other_than_its_patient_entry_is_422(world: World) -> None:
    bundle = transaction(world, "SR-T1")
    bundle["entry"][1]["resource"]["subject"] = {"reference": HIS_PATIENT}

    response = world.r4.post("/fhir", bundle)

    assert response.status_code == 422
    assert outcome_issue(response)["expression"] == ["ServiceRequest.subject"]
    assert Referral.objects.count() == 0


def test_no_performer_type_is_422(world: World) -> None:
    resource = service_request(world)
    del resource["performerType"]

    response = world.r4.post("/fhir/ServiceRequest", resource)

    assert response.status_code == 422
    issue = outcome_issue(response)
    assert issue["expression"] == ["ServiceRequest.performerType"]
    assert "SNOMED CT practice-setting" in issue["diagnostics"]
    assert Referral.objects.count() == 0


def test_a_bundle_neither_transaction_nor_batch_is_refused(world: World) -> None:
    bundle = transaction(world)
    bundle["type"] = "collection"  # a batch is answered entry by entry (test_batch)
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 422
    assert "only transaction and batch" in outcome_issue(response)["diagnostics"]
    assert Referral.objects.count() == 0


def test_conditional_create_is_idempotent(world: World) -> None:
    resource = service_request(world, "SR-9", subject=HIS_PATIENT)
    condition = f"identifier={PLACER}|SR-9"

    first = world.r4.post("/fhir/ServiceRequest", resource, **{"If-None-Exist": condition})
    second = world.r4.post("/fhir/ServiceRequest", resource, **{"If-None-Exist": condition})

    assert (first.status_code, second.status_code) == (201, 200)
    assert body(first)["id"] == body(second)["id"]
    assert first["Location"].endswith("/_history/1")
    assert Referral.objects.count() == 1


def test_a_resubmitted_service_request_with_other_content_says_the_first_stands(
    world: World,
) -> None:
    """The single-resource create answers as the transaction does: the first referral, and
    a warning when this one says otherwise (a header; the OperationOutcome when asked)."""
    resource = service_request(world, "SR-10", subject=HIS_PATIENT)
    condition = f"identifier={PLACER}|SR-10"
    first = world.r4.post("/fhir/ServiceRequest", resource, **{"If-None-Exist": condition})
    same = world.r4.post("/fhir/ServiceRequest", resource, **{"If-None-Exist": condition})
    assert (first.status_code, same.status_code) == (201, 200)
    assert "X-FHIR-Warning" not in first and "X-FHIR-Warning" not in same

    changed = {**resource, "priority": "stat"}
    header = world.r4.post("/fhir/ServiceRequest", changed, **{"If-None-Exist": condition})
    by_identifier = world.r4.post("/fhir/ServiceRequest", changed)  # the placer id alone
    outcome = world.r4.post(
        "/fhir/ServiceRequest",
        changed,
        **{"If-None-Exist": condition, "Prefer": "return=OperationOutcome"},
    )

    for answer in (header, by_identifier):
        assert answer.status_code == 200
        assert body(answer)["id"] == body(first)["id"]
        assert body(answer)["priority"] == "urgent"  # the first stands
        assert "priority" in answer["X-FHIR-Warning"]
        assert "nothing of this one was applied" in answer["X-FHIR-Warning"]
    assert outcome.status_code == 200
    issue = body(outcome)["issue"][0]
    assert (issue["severity"], issue["code"]) == ("warning", "business-rule")
    assert "priority" in issue["diagnostics"]
    assert Referral.objects.get().priority == Priority.URGENT
    assert Referral.objects.count() == 1


def test_r5_submission_routes_without_a_chosen_department(world: World) -> None:
    bundle = transaction(world, version="5.0", performer=False)
    del bundle["entry"][2]["resource"]["requester"]

    response = world.r4.post("/fhir", bundle, content_type=FHIR_R5, Accept=FHIR_R5)

    assert response.status_code == 200, response.content
    task = task_of(body(response))
    assert task["owner"] == {"reference": f"HealthcareService/{world.network.pediatrics.pk}"}
    assert task["requestedPerformer"][0]["concept"]["coding"][0]["code"] == "394537008"
    order = body(response)["entry"][1]["resource"]
    assert order["reason"] == [
        {"concept": {"text": "3-year-old, fever 5 days, rash: Kawasaki disease?"}}
    ]


# --------------------------------------------------------------------------- workflow


def test_owner_accepts_over_r5_and_the_requester_reads_it_in_r4(world: World) -> None:
    task_id = _task(world, submit(world))
    task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
    task["status"] = "accepted"

    response = _put_task(world.r5, task, FHIR_R5, 'W/"1"')

    assert response.status_code == 200, response.content
    assert body(response)["status"] == "accepted"
    assert Referral.objects.get().state == ReferralState.ACCEPTED
    seen = _get(world.r4, f"/fhir/Task/{task_id}")
    assert (seen["status"], seen["meta"]["versionId"]) == ("accepted", "2")
    assert seen["businessStatus"]["coding"][0]["code"] == "accepted"


def test_stale_if_match_is_412_and_changes_nothing(world: World) -> None:
    task_id = _task(world, submit(world))
    task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
    task["status"] = "accepted"

    response = _put_task(world.r5, task, FHIR_R5, 'W/"7"')

    assert response.status_code == 412
    assert outcome_issue(response)["code"] == "conflict"
    assert Referral.objects.get().state == ReferralState.SUBMITTED


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_a_task_update_without_if_match_is_412_and_star_takes_the_current(
    world: World, version: str
) -> None:
    """A PUT is the whole Task as its sender read it: without the version, a stale copy
    would undo a newer change unseen. ``*`` says "whatever is current", knowingly. The
    same answer in R4 and R5: FHIR asks no 428 for a missing If-Match (docs/fhir.md,
    *A missing If-Match*)."""
    task_id = _task(world, submit(world))
    task = _get(world.r5, f"/fhir/Task/{task_id}", version)
    task["status"] = "accepted"
    referral_version = Referral.objects.get().version
    outbox = OutboxMessage.objects.count()

    missing = _put_task(world.r5, task, version, None)

    assert missing.status_code == 412
    issue = outcome_issue(missing)
    assert issue["code"] == "conflict" and "needs If-Match" in issue["diagnostics"]
    assert Referral.objects.get().state == ReferralState.SUBMITTED
    assert Referral.objects.get().version == referral_version
    assert FhirResource.objects.get(resource_type="Task", is_current=True).version_id == 1
    assert OutboxMessage.objects.count() == outbox

    star = _put_task(world.r5, task, version, "*")

    assert star.status_code == 200, star.content
    assert Referral.objects.get().state == ReferralState.ACCEPTED


def test_other_task_changes_are_422(world: World) -> None:
    task_id = _task(world, submit(world))
    task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
    task["status"] = "accepted"
    task["priority"] = "stat"

    response = _put_task(world.r5, task, FHIR_R5, 'W/"1"')

    assert response.status_code == 422
    assert outcome_issue(response)["expression"] == ["Task.priority"]
    assert Referral.objects.get().state == ReferralState.SUBMITTED


def test_owner_rejects_with_a_status_reason(world: World) -> None:
    task_id = _task(world, submit(world))
    task = _get(world.r4, f"/fhir/Task/{task_id}")  # the consultant system may speak R4 too
    task["status"] = "rejected"
    task["statusReason"] = {
        "coding": [{"system": m.DECLINE_REASON_SYSTEM, "code": "no_capacity"}],
        "text": "Ward full this week",
    }

    response = _put_task(world.r5, task, FHIR_R4, 'W/"1"')

    assert response.status_code == 200, response.content
    referral = Referral.objects.get()
    assert referral.state in (
        ReferralState.DECLINED,
        ReferralState.SUBMITTED,
    )  # reroute after commit
    declined = json.loads(FhirResource.objects.get(resource_type="Task", version_id=2).json_r5)
    assert declined["status"] == "rejected"
    assert declined["statusReason"] == {
        "concept": {
            "coding": [
                {"system": m.DECLINE_REASON_SYSTEM, "code": "no_capacity", "display": "No capacity"}
            ],
            "text": "Ward full this week",
        }
    }


def test_only_the_owner_accepts_and_the_requester_cancels(world: World) -> None:
    task_id = _task(world, submit(world))
    task = _get(world.r4, f"/fhir/Task/{task_id}")

    task["status"] = "accepted"
    refused = _put_task(world.r4, task, FHIR_R4, 'W/"1"')
    task["status"] = "cancelled"
    task["statusReason"] = {"text": "Patient improved"}
    cancelled = _put_task(world.r4, task, FHIR_R4, 'W/"1"')

    assert refused.status_code == 403
    assert cancelled.status_code == 200, cancelled.content
    assert body(cancelled)["status"] == "cancelled"
    assert body(cancelled)["statusReason"] == {"text": "Patient improved"}


def test_communications_request_and_provide_information(world: World) -> None:
    task_id = _task(world, submit(world))
    task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
    task["status"] = "accepted"
    assert _put_task(world.r5, task, FHIR_R5, 'W/"1"').status_code == 200
    question = {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "payload": [{"contentCodeableConcept": {"text": "Echocardiogram done?"}}],
    }

    asked = world.r5.post("/fhir/Communication", question, content_type=FHIR_R5, Accept=FHIR_R5)
    assert asked.status_code == 201, asked.content
    assert _get(world.r4, f"/fhir/Task/{task_id}")["status"] == "on-hold"
    answer = {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "inResponseTo": [{"reference": f"Communication/{body(asked)['id']}"}],
        "payload": [{"contentString": "Not yet; tomorrow."}],
    }
    answered = world.r4.post("/fhir/Communication", answer)

    assert answered.status_code == 201, answered.content
    assert body(answered)["inResponseTo"] == answer["inResponseTo"]
    assert body(answered)["payload"] == answer["payload"]
    assert _get(world.r4, f"/fhir/Task/{task_id}")["status"] == "accepted"
    found = _get(world.r5, f"/fhir/Communication?part-of=Task/{task_id}", FHIR_R5)
    assert found["total"] == 2
    assert Referral.objects.get().messages.count() == 2


def test_consult_note_advises_and_is_task_output(world: World) -> None:
    task_id = _task(world, submit(world))
    task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
    task["status"] = "accepted"
    assert _put_task(world.r5, task, FHIR_R5, 'W/"1"').status_code == 200
    note = consult_note(task_id)

    response = world.r5.post("/fhir/DocumentReference", note, content_type=FHIR_R5, Accept=FHIR_R5)

    assert response.status_code == 201, response.content
    referral = Referral.objects.get()
    assert referral.state == ReferralState.ADVISED
    assert referral.consult_notes.get().text == "IVIG 2g/kg"
    seen = _get(world.r4, f"/fhir/Task/{task_id}")
    assert seen["output"] == [
        {
            "type": {
                "coding": [
                    {"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}
                ]
            },
            "valueReference": {"reference": f"DocumentReference/{body(response)['id']}"},
        }
    ]
    r4_note = _get(world.r4, f"/fhir/DocumentReference/{body(response)['id']}")
    assert r4_note["context"]["related"] == [{"reference": f"ServiceRequest/{task_id}"}]


def test_consult_note_without_disposition_is_422(world: World) -> None:
    task_id = _task(world, submit(world))
    task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
    task["status"] = "accepted"
    _put_task(world.r5, task, FHIR_R5, 'W/"1"')
    note = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4"}]},
        "context": {"related": [{"reference": f"Task/{task_id}"}]},
        "content": [{"attachment": {"contentType": "text/plain", "data": "SVZJRw=="}}],
    }
    response = world.r5.post("/fhir/DocumentReference", note)
    assert response.status_code == 422
    assert "disposition" in outcome_issue(response)["diagnostics"]
    assert Referral.objects.get().state == ReferralState.ACCEPTED


# --------------------------------------------------------------------------- reads


def test_outsiders_get_404_and_empty_searches(world: World) -> None:
    task_id = _task(world, submit(world))

    for path in (
        f"/fhir/Task/{task_id}",
        f"/fhir/Task/{task_id}/_history/1",
        f"/fhir/Patient/{task_id}",
        f"/fhir/ServiceRequest/{task_id}",
        f"/fhir/Task/{task_id}/_history",
    ):
        response = world.other.get(path)
        assert response.status_code == 404, path
    assert _get(world.other, "/fhir/Task")["total"] == 0
    assert _get(world.other, "/fhir/ServiceRequest")["total"] == 0


def test_task_searches(world: World) -> None:
    first = _task(world, submit(world, "A"))
    second = _task(world, submit(world, "B"))
    task = _get(world.r5, f"/fhir/Task/{second}", FHIR_R5)
    task["status"] = "accepted"
    _put_task(world.r5, task, FHIR_R5, 'W/"1"')
    owner = f"HealthcareService/{world.network.pediatrics.pk}"

    def ids(query: str) -> list[str]:
        found = _get(world.r5, f"/fhir/Task?{query}", FHIR_R5)
        return sorted(
            e["resource"]["id"] for e in found.get("entry", []) if e["search"]["mode"] == "match"
        )

    assert ids(f"owner={owner}") == sorted([first, second])
    assert ids("status=requested") == [first]
    assert ids("status=accepted,requested") == sorted([first, second])
    assert ids(f"business-status={m.BSER_BUSINESS_STATUS}|3.0") == [second]
    assert ids("business-status=submitted") == [first]
    assert ids(f"focus=ServiceRequest/{first}") == [first]
    assert ids(f"patient=Patient/{second}") == [second]
    assert ids(f"requester=Organization/{world.network.spoke.pk}") == sorted([first, second])
    assert ids("authored-on=ge2000-01-01") == sorted([first, second])
    assert ids("authored-on=lt2000-01-01") == []
    assert ids("_lastUpdated=ge2000-01-01&status=accepted") == [second]
    assert ids(f"identifier={PLACER}|A") == [first]
    page = _get(world.r5, "/fhir/Task?_count=1", FHIR_R5)
    assert page["total"] == 2 and len(page["entry"]) == 1
    assert [link["relation"] for link in page["link"]] == ["self", "next"]
    included = _get(world.r5, f"/fhir/Task?_id={first}&_include=Task:focus", FHIR_R5)
    assert [(e["resource"]["resourceType"], e["search"]["mode"]) for e in included["entry"]] == [
        ("Task", "match"),
        ("ServiceRequest", "include"),
    ]


def _entries(bundle: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (e["resource"]["resourceType"], e["resource"]["id"], e["search"]["mode"])
        for e in bundle.get("entry", [])
    ]


def _message(client: Any, task_id: str, text: str) -> str:
    sent = client.post(
        "/fhir/Communication",
        {
            "resourceType": "Communication",
            "status": "completed",
            "partOf": [{"reference": f"Task/{task_id}"}],
            "payload": [{"contentString": text}],
        },
    )
    assert sent.status_code == 201, sent.content
    return str(body(sent)["id"])


def test_includes_and_revincludes_of_a_worklist(world: World) -> None:
    """A worklist page with its orders, patients and messages in one round trip."""
    first = _task(world, submit(world, "A"))
    second = _task(world, submit(world, "B"))
    message = _message(world.r4, first, "Echo done yesterday.")

    tasks = _get(
        world.r5,
        f"/fhir/Task?_id={first}&_include=Task:focus&_include=Task:patient"
        "&_revinclude=Communication:part-of",
        FHIR_R5,
    )
    assert _entries(tasks) == [
        ("Task", first, "match"),
        ("ServiceRequest", first, "include"),
        ("Patient", first, "include"),
        ("Communication", message, "include"),
    ]
    assert tasks["total"] == 1  # included resources are not counted
    orders = _get(
        world.r4,
        "/fhir/ServiceRequest?_revinclude=Task:focus&_include=ServiceRequest:patient&_count=1",
    )
    next_page = next(link["url"] for link in orders["link"] if link["relation"] == "next")
    assert "_revinclude=Task%3Afocus" in next_page  # the next page includes the same
    later = _get(world.r4, next_page.removeprefix("http://testserver"))
    pages = [_entries(orders), _entries(later)]
    assert sorted(page[0][1] for page in pages) == sorted([first, second])
    for page in pages:  # each page: its order, then that referral's Patient and Task
        referral_id = page[0][1]
        assert page == [
            ("ServiceRequest", referral_id, "match"),
            ("Patient", referral_id, "include"),
            ("Task", referral_id, "include"),
        ]


def test_include_and_revinclude_iterate_follow_the_included_resources(world: World) -> None:
    """``:iterate`` applies an include to the included resources too (FHIR search): a
    Task page with its orders and, through them, their patients; an order page with its
    Tasks and, through them, their messages."""
    first = _task(world, submit(world, "A"))
    second = _task(world, submit(world, "B"))
    message = _message(world.r4, first, "Echo done yesterday.")

    tasks = _get(
        world.r4,
        f"/fhir/Task?_id={first}&_include=Task:focus&_include:iterate=ServiceRequest:patient",
    )
    assert _entries(tasks) == [
        ("Task", first, "match"),
        ("ServiceRequest", first, "include"),
        ("Patient", first, "include"),
    ]
    # Without :iterate, ServiceRequest:patient is no include of a Task search.
    plain = world.r4.get(f"/fhir/Task?_id={first}&_include=ServiceRequest:patient")
    assert _entries(body(plain)) == [("Task", first, "match")]
    assert plain["X-FHIR-Ignored-Parameters"] == "_include=ServiceRequest:patient"

    orders = _get(
        world.r5,
        "/fhir/ServiceRequest?_revinclude=Task:focus"
        "&_revinclude:iterate=Communication:part-of&_count=1",
        FHIR_R5,
    )
    assert orders["total"] == 2
    next_page = next(link["url"] for link in orders["link"] if link["relation"] == "next")
    assert "_revinclude%3Aiterate=Communication%3Apart-of" in next_page
    later = _get(world.r5, next_page.removeprefix("http://testserver"), FHIR_R5)
    by_order = {page[0][1]: page for page in (_entries(orders), _entries(later))}
    assert by_order[first] == [
        ("ServiceRequest", first, "match"),
        ("Task", first, "include"),
        ("Communication", message, "include"),
    ]
    assert by_order[second] == [("ServiceRequest", second, "match"), ("Task", second, "include")]
    # An outsider's search matches nothing, so nothing is included either.
    outsider = _get(
        world.other,
        f"/fhir/Task?_id={first}&_include=Task:focus&_include:iterate=ServiceRequest:patient",
    )
    assert _entries(outsider) == []


def test_includes_may_name_their_target_type(world: World) -> None:
    """FHIR's three-part form (``Task:focus:ServiceRequest``: what fhirpy's ``include()``
    sends): an include keeps the targets of that type; a revinclude names the type it
    starts from."""
    first = _task(world, submit(world, "A"))
    message = _message(world.r4, first, "Echo done yesterday.")
    found = _get(
        world.r4,
        f"/fhir/Task?_id={first}&_include=Task:focus:ServiceRequest"
        "&_include:iterate=ServiceRequest:patient:Patient"
        "&_revinclude=Communication:part-of:Task",
    )
    assert _entries(found) == [
        ("Task", first, "match"),
        ("ServiceRequest", first, "include"),
        ("Communication", message, "include"),
        ("Patient", first, "include"),
    ]
    other_type = world.r4.get(f"/fhir/Task?_id={first}&_include=Task:focus:Patient")
    assert _entries(body(other_type)) == [("Task", first, "match")]  # no focus is a Patient
    assert "X-FHIR-Ignored-Parameters" not in other_type
    elsewhere = world.r4.get(
        f"/fhir/Task?_id={first}&_revinclude=Communication:part-of:ServiceRequest"
    )
    assert _entries(body(elsewhere)) == [("Task", first, "match")]
    assert elsewhere["X-FHIR-Ignored-Parameters"] == (
        "_revinclude=Communication:part-of:ServiceRequest"
    )


def test_an_iterate_value_no_type_offers_is_ignored_or_refused(world: World) -> None:
    first = _task(world, submit(world, "A"))
    path = f"/fhir/Task?_id={first}&_include:iterate=Patient:link"
    lenient = world.r4.get(path)
    assert lenient.status_code == 200
    assert _entries(body(lenient)) == [("Task", first, "match")]
    assert lenient["X-FHIR-Ignored-Parameters"] == "_include:iterate=Patient:link"
    strict = world.r4.get(path, Prefer="handling=strict")
    assert strict.status_code == 400
    assert "_include:iterate=Patient:link is not supported" in outcome_issue(strict)["diagnostics"]


def test_an_include_named_twice_answers_each_resource_once(world: World) -> None:
    first = _task(world, submit(world, "A"))
    found = _get(world.r4, f"/fhir/Task?_id={first}&_include=Task:focus&_include=Task:focus")
    assert _entries(found) == [("Task", first, "match"), ("ServiceRequest", first, "include")]


def test_revincludes_stay_in_the_callers_scope(world: World) -> None:
    """The include functions themselves apply the caller's scope (given the ids of a page
    someone else could see, an unrelated facility gets nothing), and an empty page costs
    no include query."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from fhir_gateway.handlers import HANDLERS

    first = _task(world, submit(world, "A"))
    _message(world.r4, first, "Echo done yesterday.")
    task, order = HANDLERS["Task"], HANDLERS["ServiceRequest"]
    functions = [*task.includes.values(), *task.revincludes.values()]
    functions += [*order.includes.values(), *order.revincludes.values()]
    for include in functions:
        assert include(world.submitter, [first]).exists(), include
        assert not include(world.outsider, [first]).exists(), include
    world.other.get("/fhir/Task?_id=x")  # the token's last use is written once
    with CaptureQueriesContext(connection) as plain:
        world.other.get(f"/fhir/Task?_id={first}")
    with CaptureQueriesContext(connection) as included:
        found = world.other.get(f"/fhir/Task?_id={first}&_revinclude=Communication:part-of")
    assert body(found)["total"] == 0 and "entry" not in body(found)
    assert len(included) == len(plain)


def test_unknown_revincludes_are_ignored_or_refused_when_strict(world: World) -> None:
    first = _task(world, submit(world, "A"))
    lenient = world.r4.get(f"/fhir/Task?_id={first}&_revinclude=Provenance:target")
    assert lenient.status_code == 200
    assert lenient["X-FHIR-Ignored-Parameters"] == "_revinclude=Provenance:target"
    assert _entries(body(lenient)) == [("Task", first, "match")]
    strict = world.r4.get(
        f"/fhir/Task?_id={first}&_revinclude=Provenance:target", Prefer="handling=strict"
    )
    assert strict.status_code == 400
    assert outcome_issue(strict)["code"] == "not-supported"


def test_metadata_declares_the_includes_and_revincludes(world: World) -> None:
    statement = _get(world.r4, "/fhir/metadata")
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert by_type["Task"]["searchInclude"] == ["Task:focus", "Task:patient"]
    assert by_type["Task"]["searchRevInclude"] == ["Communication:part-of"]
    assert by_type["ServiceRequest"]["searchInclude"] == ["ServiceRequest:patient"]
    assert by_type["ServiceRequest"]["searchRevInclude"] == ["Task:focus"]


def _submitted_with(world: World, placer: str, priority: str) -> str:
    bundle = transaction(world, placer)
    bundle["entry"][1]["resource"]["priority"] = priority
    response = world.r4.post("/fhir", bundle, content_type=FHIR_R4)
    assert response.status_code == 200, response.content
    return _task(world, body(response))


def test_sort_a_worklist_by_priority_age_or_last_change(world: World) -> None:
    routine = _submitted_with(world, "A", "routine")
    stat = _submitted_with(world, "B", "stat")
    urgent = _submitted_with(world, "C", "urgent")
    also_urgent = _submitted_with(world, "D", "urgent")

    def ids(query: str, client: Any = world.r5) -> list[str]:
        found = _get(client, f"/fhir/Task?{query}")
        return [e["resource"]["id"] for e in found.get("entry", [])]

    assert ids("_sort=priority,authored-on") == [stat, urgent, also_urgent, routine]
    assert ids("_sort=priority,-authored-on") == [stat, also_urgent, urgent, routine]
    assert ids("_sort=-authored-on") == [also_urgent, urgent, stat, routine]
    assert ids("_sort=authored-on&_sort=priority") == [routine, stat, urgent, also_urgent]
    # The last change first: the routine one is accepted now.
    task = _get(world.r5, f"/fhir/Task/{routine}", FHIR_R5)
    task["status"] = "accepted"
    assert _put_task(world.r5, task, FHIR_R5, 'W/"1"').status_code == 200
    assert ids("_sort=-_lastUpdated")[0] == routine
    orders = _get(world.r4, "/fhir/ServiceRequest?_sort=priority")
    assert [e["resource"]["id"] for e in orders["entry"]][:1] == [stat]
    newest = _get(world.r4, "/fhir/ServiceRequest?_sort=-authored")  # its parameter's name
    assert [e["resource"]["id"] for e in newest["entry"]] == [also_urgent, urgent, stat, routine]

    # Paging keeps the order: the next link carries _sort.
    first = _get(world.r5, "/fhir/Task?_sort=priority,authored-on&_count=3")
    next_url = next(link["url"] for link in first["link"] if link["relation"] == "next")
    assert "_sort=priority%2Cauthored-on" in next_url
    rest = _get(world.r5, next_url.removeprefix("http://testserver"))
    assert [e["resource"]["id"] for e in first["entry"] + rest["entry"]] == [
        stat,
        urgent,
        also_urgent,
        routine,
    ]


def test_sort_by_status_orders_by_the_rendered_code(world: World) -> None:
    """``_sort=status``: by the status code as rendered, as text; a submitted referral its
    department acknowledged sorts as ``received`` (before ``requested``)."""
    waiting = _submitted_with(world, "A", "routine")
    acknowledged = _submitted_with(world, "B", "routine")
    accepted_ = _submitted_with(world, "C", "routine")
    for task_id, status in ((acknowledged, "received"), (accepted_, "accepted")):
        task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
        task["status"] = status
        assert _put_task(world.r5, task, FHIR_R5, 'W/"1"').status_code == 200

    def statuses(query: str, resource_type: str = "Task") -> list[tuple[str, str]]:
        found = _get(world.r5, f"/fhir/{resource_type}?{query}")
        return [(e["resource"]["status"], e["resource"]["id"]) for e in found.get("entry", [])]

    assert statuses("_sort=status") == [
        ("accepted", accepted_),
        ("received", acknowledged),
        ("requested", waiting),
    ]
    assert statuses("_sort=-status") == [
        ("requested", waiting),
        ("received", acknowledged),
        ("accepted", accepted_),
    ]
    # ServiceRequest: all three are active; the tie goes by id
    assert statuses("_sort=status", "ServiceRequest") == [
        ("active", i) for i in sorted([waiting, acknowledged, accepted_])
    ]


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_sort_by_business_status_orders_by_our_state_code_and_pages(
    world: World, version: str
) -> None:
    """``Task?_sort=business-status``: by our state's code (the first coding of
    businessStatus), both ways, ties by id (an acknowledged Task is ``received`` but still
    ``submitted``), and following ``next`` keeps the order across pages."""
    waiting = _submitted_with(world, "A", "routine")
    acknowledged = _submitted_with(world, "B", "routine")
    accepted_ = _submitted_with(world, "C", "routine")
    cancelled = _submitted_with(world, "D", "routine")
    for task_id, status in ((acknowledged, "received"), (accepted_, "accepted")):
        task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
        task["status"] = status
        assert _put_task(world.r5, task, FHIR_R5, 'W/"1"').status_code == 200
    task = _get(world.r4, f"/fhir/Task/{cancelled}")
    task.update(status="cancelled", statusReason={"text": "Seen locally."})
    assert _put_task(world.r4, task, FHIR_R4, 'W/"1"').status_code == 200
    client = world.r4 if version == FHIR_R4 else world.r5
    ties = sorted([waiting, acknowledged])

    def walk(query: str, count: int) -> list[tuple[str, str]]:
        """Every page of the search, following ``next``: (state code, id) of each Task."""
        found: list[tuple[str, str]] = []
        url: str | None = f"/fhir/Task?{query}&_count={count}"
        while url is not None:
            page = _get(client, url, version)
            found += [
                (e["resource"]["businessStatus"]["coding"][0]["code"], e["resource"]["id"])
                for e in page.get("entry", [])
            ]
            url = next(
                (
                    link["url"].removeprefix("http://testserver")
                    for link in page["link"]
                    if link["relation"] == "next"
                ),
                None,
            )
            assert url is None or "_sort=business-status" in url or "-business-status" in url
        return found

    ascending = [("accepted", accepted_), ("cancelled", cancelled)]
    ascending += [("submitted", i) for i in ties]
    descending = [("submitted", i) for i in ties] + [
        ("cancelled", cancelled),
        ("accepted", accepted_),
    ]
    for count in (1, 2, 3, 50):
        assert walk("_sort=business-status", count) == ascending, count
        assert walk("_sort=-business-status", count) == descending, count
    # A second key orders the ties: the last authored first among the submitted.
    newest_first = walk("_sort=business-status,-authored-on", 2)
    assert [i for _c, i in newest_first] == [accepted_, cancelled, acknowledged, waiting]


def test_organizations_sort_by_tier(fhir: Any, network: Any) -> None:
    """``Organization?_sort=type``: central facilities first (the tier), ties by id."""

    def tiers(query: str) -> list[tuple[int, int]]:
        found = _get(fhir, f"/fhir/Organization?{query}&_count=50")
        return [
            (
                next(
                    int(c["code"])
                    for t in e["resource"]["type"]
                    for c in t["coding"]
                    if c["system"].endswith("facility-tier")
                ),
                int(e["resource"]["id"]),
            )
            for e in found["entry"]
        ]

    ascending = tiers("_sort=type")
    assert len({tier for tier, _id in ascending}) >= 2
    assert ascending == sorted(ascending)
    assert ascending != tiers("_sort=_id")  # the tiers are not in the rows' order
    descending = tiers("_sort=-type")
    assert descending == sorted(descending, key=lambda row: (-row[0], row[1]))


def test_unknown_sort_keys_are_ignored_or_refused_when_strict(world: World) -> None:
    first = _submitted_with(world, "A", "routine")
    lenient = world.r4.get("/fhir/Task?_sort=-colour,priority", Accept=FHIR_R4)
    assert lenient.status_code == 200
    assert lenient["X-FHIR-Ignored-Parameters"] == "_sort=-colour"
    assert [e["resource"]["id"] for e in body(lenient)["entry"]] == [first]
    self_url = next(link["url"] for link in body(lenient)["link"] if link["relation"] == "self")
    assert "_sort=priority" in self_url and "colour" not in self_url
    strict = world.r4.get("/fhir/Task?_sort=colour", Prefer="handling=strict")
    assert strict.status_code == 400
    assert outcome_issue(strict)["code"] == "not-supported"


def test_service_request_searches(world: World) -> None:
    first = _task(world, submit(world, "A"))

    def total(query: str) -> int:
        return int(_get(world.r4, f"/fhir/ServiceRequest?{query}")["total"])

    assert total(f"requester=Organization/{world.network.spoke.pk}") == 1
    assert total(f"performer=HealthcareService/{world.network.pediatrics.pk}") == 1
    assert total(f"performer=HealthcareService/{world.network.cardiology.pk}") == 0
    assert total("status=active") == 1
    assert total("status=revoked") == 0
    assert total(f"identifier={PLACER}|A") == 1
    assert total(f"identifier={m.FILLER_SYSTEM}|{first}") == 1


def test_task_history_lists_every_state(world: World) -> None:
    task_id = _task(world, submit(world))
    task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
    task["status"] = "accepted"
    _put_task(world.r5, task, FHIR_R5, 'W/"1"')

    history = _get(world.r4, f"/fhir/Task/{task_id}/_history")

    assert [e["resource"]["status"] for e in history["entry"]] == ["accepted", "requested"]
    assert _get(world.r4, f"/fhir/Task/{task_id}/_history/1")["status"] == "requested"


def test_task_history_windows_by_since_and_at(world: World) -> None:
    """``_since`` / ``_at`` were ignored without a word: a client polling with ``_since``
    got every version again."""
    task_id = _task(world, submit(world))
    for version, status in ((1, "received"), (2, "accepted")):
        task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
        task["status"] = status
        assert _put_task(world.r5, task, FHIR_R5, f'W/"{version}"').status_code == 200
    made = {1: "2030-01-01T10:00:00Z", 2: "2030-01-02T10:00:00Z", 3: "2030-01-03T10:00:00Z"}
    for version, at in made.items():
        FhirResource.objects.filter(
            resource_type="Task", logical_id=task_id, version_id=version
        ).update(last_updated=datetime.fromisoformat(at))

    def versions(query: str) -> list[str]:
        history = _get(world.r4, f"/fhir/Task/{task_id}/_history?{query}")
        entries = history.get("entry", [])
        assert history["total"] == len(entries)
        return [e["resource"]["meta"]["versionId"] for e in entries]

    assert versions("_since=2030-01-02T10:00:00Z") == ["3", "2"]
    assert versions("_since=2030-01-02T10:00:01Z") == ["3"]
    assert versions("_since=2031-01-01") == []
    assert versions("_at=2030-01-02") == ["2", "1"]  # 1 was current until 10:00 that day
    assert versions("_at=2030-01-01T09:00:00Z") == []
    assert versions("_at=2030-06") == ["3"]
    assert versions("_since=2030-01-02T00:00:00Z&_at=2030-01-02") == ["2"]
    paged = _get(world.r4, f"/fhir/Task/{task_id}/_history?_since=2030-01-01&_count=1")
    next_url = next(link["url"] for link in paged["link"] if link["relation"] == "next")
    assert "_since=2030-01-01" in next_url

    bad = world.r4.get(f"/fhir/Task/{task_id}/_history?_since=ge2030-01-01", Accept=FHIR_R4)
    assert bad.status_code == 400
    unknown = world.r4.get(f"/fhir/Task/{task_id}/_history?_list=x", Accept=FHIR_R4)
    assert unknown.status_code == 200 and unknown["X-FHIR-Ignored-Parameters"] == "_list"
    strict = world.r4.get(
        f"/fhir/Task/{task_id}/_history?_list=x", Accept=FHIR_R4, Prefer="handling=strict"
    )
    assert strict.status_code == 400


def test_every_stored_rendering_validates_in_its_version(world: World) -> None:
    """The write path stores built JSON without validating; this proves it is valid."""
    task_id = _task(world, submit(world, "A"))
    task = _get(world.r5, f"/fhir/Task/{task_id}", FHIR_R5)
    task["status"] = "accepted"
    assert _put_task(world.r5, task, FHIR_R5, 'W/"1"').status_code == 200
    world.r5.post(
        "/fhir/Communication",
        {
            "resourceType": "Communication",
            "status": "completed",
            "partOf": [{"reference": f"Task/{task_id}"}],
            "payload": [{"contentString": "Q?"}],
        },
    )
    world.r4.post(
        "/fhir/Communication",
        {
            "resourceType": "Communication",
            "status": "completed",
            "partOf": [{"reference": f"Task/{task_id}"}],
            "payload": [{"contentString": "A."}],
        },
    )
    world.r5.post(
        "/fhir/DocumentReference",
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "extension": [{"url": m.DISPOSITION_EXTENSION, "valueCode": "transfer"}],
            "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4"}]},
            "context": {"related": [{"reference": f"Task/{task_id}"}]},
            "content": [{"attachment": {"contentType": "text/plain", "data": "VHJhbnNmZXI="}}],
        },
    )
    case_file = {  # with its member's type and category (kept as sent)
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}], "text": "D"},
        "category": [{"coding": [{"system": "http://example.org/c", "code": "clinical"}]}],
        "context": {"related": [{"reference": f"Task/{task_id}"}]},
        "content": [{"attachment": {"contentType": "application/pdf", "data": "JVBERi0xLjQK"}}],
    }
    assert world.r4.post("/fhir/DocumentReference", case_file).status_code == 201
    other = _get(world.r4, f"/fhir/Task/{_task(world, submit(world, 'B'))}")
    other["status"] = "cancelled"
    assert _put_task(world.r4, other, FHIR_R4, 'W/"1"').status_code == 200

    rows = list(
        FhirResource.objects.filter(source_pk__isnull=False).exclude(
            resource_type__in=[
                "Organization",
                "Location",
                "HealthcareService",
                "Endpoint",
                "OrganizationAffiliation",
                "PractitionerRole",
            ]
        )
    )
    assert {r.resource_type for r in rows} == {
        "Patient",
        "ServiceRequest",
        "Task",
        "Communication",
        "DocumentReference",
    }
    assert any(m.CASE_FILE_SEPARATOR in r.logical_id for r in rows)  # the case file too
    for row in rows:
        for version, text in (("4.0", row.json_r4), ("5.0", row.json_r5)):
            validate_resource(json.loads(text), version)


def test_every_declared_referral_interaction_and_search_param_is_served(world: World) -> None:
    """Driven by /metadata: every interaction and search parameter of the referral types."""
    task_id = _task(world, submit(world))
    world.r4.post(
        "/fhir/Communication",
        {
            "resourceType": "Communication",
            "status": "completed",
            "partOf": [{"reference": f"Task/{task_id}"}],
            "payload": [{"contentString": "Hello"}],
        },
    )
    communication = FhirResource.objects.get(resource_type="Communication").logical_id
    statement = _get(world.r4, "/fhir/metadata")
    samples = {
        "Task": task_id,
        "ServiceRequest": task_id,
        "Patient": task_id,
        "Communication": communication,
    }
    values = {"token": "x", "reference": "Organization/1", "date": "ge2020-01-01"}
    seen = set()
    for entry in statement["rest"][0]["resource"]:
        rtype = entry["type"]
        if rtype not in samples:
            continue
        seen.add(rtype)
        pk = samples[rtype]
        paths = {
            "read": f"/fhir/{rtype}/{pk}",
            "vread": f"/fhir/{rtype}/{pk}/_history/1",
            "history-instance": f"/fhir/{rtype}/{pk}/_history",
            "search-type": f"/fhir/{rtype}",
        }
        for interaction in entry["interaction"]:
            if interaction["code"] in paths:
                response = world.r4.get(paths[interaction["code"]])
                assert response.status_code == 200, (rtype, interaction)
        for param in entry.get("searchParam", []):
            response = world.r4.get(
                f"/fhir/{rtype}?{param['name']}={values[param['type']]}",
                Prefer="handling=strict",
            )
            assert response.status_code == 200, (rtype, param["name"], response.content)
    assert seen == set(samples)


def test_a_reply_to_a_message_id_with_superscript_digits_is_422(world: World) -> None:
    """Found by a fuzz hunt: "…-msg-²" passed ``str.isdigit`` and failed ``int`` (500)."""
    task_id = _task(world, submit(world))
    before = Referral.objects.get().messages.count()
    response = world.r4.post(
        "/fhir/Communication",
        {
            "resourceType": "Communication",
            "status": "completed",
            "partOf": [{"reference": f"Task/{task_id}"}],
            "inResponseTo": [{"reference": f"Communication/{task_id}-msg-\u00b2"}],
            "payload": [{"contentString": "Reply."}],
        },
    )
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["code"] == "business-rule"
    assert Referral.objects.get().messages.count() == before


def test_a_reply_to_a_message_number_with_a_leading_zero_is_422(world: World) -> None:
    """Ids are strings: "…-msg-01" is not "…-msg-1" (it was read as the number, filing the
    reply as an answer to message 1)."""
    # Given a referral with one message
    task_id = _task(world, submit(world))
    asked = world.r4.post("/fhir/Communication", message(task_id, "Echo done?"))
    assert asked.status_code == 201, asked.content
    head, separator, number = body(asked)["id"].rpartition("-msg-")
    before = Referral.objects.get().messages.count()

    # When a reply names that message with its number written 01
    reply = message(task_id, "Yes.", in_response_to=f"Communication/{head}{separator}0{number}")
    response = world.r4.post("/fhir/Communication", reply)

    # Then it is refused as naming no message of the referral; nothing is stored
    assert response.status_code == 422, response.content
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == (
        "business-rule",
        ["Communication.inResponseTo"],
    )
    assert Referral.objects.get().messages.count() == before


def test_total_none_is_kept_by_the_paging_links_and_empty_means_the_default(
    world: World,
) -> None:
    submit(world, "A")
    submit(world, "B")
    page = _get(world.r4, "/fhir/Task?_total=none&_count=1")
    assert "total" not in page
    next_url = next(link["url"] for link in page["link"] if link["relation"] == "next")
    assert "_total=none" in next_url
    assert "total" not in _get(world.r4, next_url.removeprefix("http://testserver"))
    assert _get(world.r4, "/fhir/Task?_total=")["total"] == 2


def test_authored_on_past_year_9999_is_400(world: World) -> None:
    """Found by a review: the end of 9999-12-31 overflowed (a 500)."""
    submit(world)
    for value in ("9999-12-31", "le9999-12-31T23:59:59Z"):
        response = world.r4.get(f"/fhir/Task?authored-on={value}")
        assert response.status_code == 400, value
        assert outcome_issue(response)["code"] == "invalid"


def test_a_time_zone_beyond_fourteen_hours_is_400(world: World) -> None:
    submit(world)
    beyond = world.r4.get("/fhir/Task?authored-on=ge2026-01-01T00:00:00%2B15:00")
    assert beyond.status_code == 400 and "14:00" in outcome_issue(beyond)["diagnostics"]
    within = world.r4.get("/fhir/Task?authored-on=ge2026-01-01T00:00:00%2B14:00")
    assert within.status_code == 200
