"""Rules of conditional creates, transactions and case files that a review found broken
(each test names what it was): no 500 on an over-long number or a file title without a
name, no referral handed to someone outside its scope, nothing dropped or kept on a
refusal, FHIR's transaction rules for references and ``request.ifNoneExist``."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from django.utils import timezone

from accounts.roles import Role
from accounts.services import api_token_issue
from fhir_gateway.models import FhirResource, IntakeJob, OutboxMessage
from fhir_gateway.referral_mapping import FILLER_SYSTEM
from fhir_gateway.tests.conftest import FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import (
    HIS_PATIENT,
    PLACER,
    World,
    accepted,
    advised,
    body,
    member_client,
    stored_files,
    submit,
    task_of,
    third_facility_expert,
    transaction,
    with_case_file,
)
from referrals.models import Attachment, Referral
from registry.models import Department
from tests.factories import NEUROLOGY, DepartmentFactory, SpecialtyFactory, UserFactory

pytestmark = pytest.mark.django_db

BIG = "1" * 4400  # past Python's 4,300-digit limit of int()
PDF = base64.b64encode(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n").decode()
COUNTER = "urn:consilium:counter-referral"


def _spoke_department(world: World) -> Department:
    return DepartmentFactory.create(
        facility=world.network.spoke, specialty=SpecialtyFactory.create(code=NEUROLOGY)
    )


def _counter_referral(task_id: str, department: Department) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "basedOn": [{"reference": f"ServiceRequest/{task_id}"}],
        "subject": {"reference": f"Patient/{task_id}"},
        "performer": [{"reference": f"HealthcareService/{department.pk}"}],
        "reasonCode": [{"text": "Follow-up EEG, please."}],
    }


def _counts() -> tuple[int, int, int, int]:
    return (
        Referral.objects.count(),
        Attachment.objects.count(),
        FhirResource.objects.count(),
        OutboxMessage.objects.count(),
    )


# --------------------------------------------------------------------------- 500s


def test_an_over_long_counter_referral_number_is_412(world: World) -> None:
    task_id = advised(world)
    department = _spoke_department(world)
    before = _counts()
    response = member_client(world.consultant).post(
        "/fhir/ServiceRequest",
        _counter_referral(task_id, department),
        **{"If-None-Exist": f"identifier={COUNTER}|{task_id}/{BIG}"},
    )
    assert response.status_code == 412, response.content
    assert outcome_issue(response)["code"] == "business-rule"
    assert _counts() == before


def test_an_over_long_message_number_in_in_response_to_is_422(world: World) -> None:
    task_id = accepted(world)
    before = _counts()
    message = {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "inResponseTo": [{"reference": f"Communication/{task_id}-msg-{BIG}"}],
        "payload": [{"contentString": "hello"}],
    }
    response = world.r4.post("/fhir/Communication", message)
    assert response.status_code == 422, response.content
    assert _counts() == before


def test_over_long_event_numbers_are_400(world: World) -> None:
    subscription = world.r4.post(
        "/fhir/Subscription",
        {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "poll",
            "criteria": "https://consilium.example.org/fhir/SubscriptionTopic/referral",
            "channel": {"type": "rest-hook"},
        },
    )
    assert subscription.status_code == 201, subscription.content
    sid = body(subscription)["id"]
    for path in (
        f"/fhir/$events?since={BIG}",
        f"/fhir/Subscription/{sid}/$events?eventsSinceNumber={BIG}",
        f"/fhir/Subscription/{sid}/$events?eventsUntilNumber={BIG}",
    ):
        response = world.r4.get(path)
        assert response.status_code == 400, path
        assert outcome_issue(response)["code"] == "invalid", path


@pytest.mark.parametrize("title", [".", "..", "scans/"])
def test_a_case_file_title_that_is_no_file_name_is_stored_as_file(world: World, title: str) -> None:
    bundle = with_case_file(
        transaction(world), {"contentType": "application/pdf", "data": PDF, "title": title}
    )
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 200, response.content
    assert list(Attachment.objects.values_list("original_name", flat=True)) == ["file"]
    task_id = accepted(world, "SR-2")
    document = {
        "resourceType": "DocumentReference",
        "status": "current",
        "context": {"related": [{"reference": f"ServiceRequest/{task_id}"}]},
        "content": [
            {"attachment": {"contentType": "application/pdf", "data": PDF, "title": title}}
        ],
    }
    assert world.r4.post("/fhir/DocumentReference", document).status_code == 201


# --------------------------------------------------------------------------- scope


def test_if_none_exist_never_hands_a_counter_referral_to_whom_may_not_read_it(
    world: World,
) -> None:
    from referrals.permissions import referral_experts_grant

    task_id = advised(world)
    department = _spoke_department(world)
    made = member_client(world.consultant).post(
        "/fhir/ServiceRequest", _counter_referral(task_id, department)
    )
    assert made.status_code == 201, made.content
    child = body(made)["id"]
    expert = third_facility_expert(world, Role.CONSULTANT)
    referral_experts_grant(referral=Referral.objects.get(filler_id=task_id), experts=[expert])
    condition = {"If-None-Exist": f"identifier={COUNTER}|{task_id}/1"}
    before = _counts()
    # The requester's system and an invited expert of a third facility read the original
    # but not the counter-referral: asking for it by condition is 404, as a read is.
    for client in (world.r4, member_client(expert)):
        assert client.get(f"/fhir/ServiceRequest/{task_id}").status_code == 200
        assert client.get(f"/fhir/ServiceRequest/{child}").status_code == 404
        response = client.post(
            "/fhir/ServiceRequest", _counter_referral(task_id, department), **condition
        )
        assert response.status_code == 404, response.content
        assert child not in response.content.decode()
    # Its maker gets it back (the idempotent retry).
    again = member_client(world.consultant).post(
        "/fhir/ServiceRequest", _counter_referral(task_id, department), **condition
    )
    assert (again.status_code, body(again)["id"]) == (200, child)
    assert _counts() == before


def test_a_ministry_official_gets_no_referral_by_condition_or_resubmission(world: World) -> None:
    submit(world)
    first = Referral.objects.get()
    official = UserFactory.create(
        facility=world.network.spoke, roles=[Role.MINISTRY, Role.MEMBER_SYSTEM]
    )
    client = FhirClient(api_token_issue(user=official, name="t").raw)
    assert client.get(f"/fhir/Task/{first.filler_id}").status_code == 404
    before = _counts()
    order = transaction(world, "SR-1")["entry"][1]["resource"]
    order["subject"] = {"reference": HIS_PATIENT}
    conditional = client.post(
        "/fhir/ServiceRequest", order, **{"If-None-Exist": f"identifier={PLACER}|SR-1"}
    )
    resubmitted = client.post("/fhir", transaction(world, "SR-1"))
    for response in (conditional, resubmitted):
        assert response.status_code == 403, response.content
        assert first.filler_id not in response.content.decode()
        assert first.clinical_question not in response.content.decode()
    assert _counts() == before


# --------------------------------------------------------------------------- transactions


def _pdf(text: str) -> str:
    return base64.b64encode(f"%PDF-1.4\n% {text}\n%%EOF\n".encode()).decode()


def test_a_resubmission_answers_its_stored_case_files_and_stores_the_new_ones(
    world: World,
) -> None:
    with_file = with_case_file(
        transaction(world), {"contentType": "application/pdf", "data": _pdf("a"), "title": "a.pdf"}
    )
    first = body(world.r4.post("/fhir", with_file))
    stored = first["entry"][3]["response"]["location"]
    assert stored.startswith("DocumentReference/")
    again = body(world.r4.post("/fhir", with_file))
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK"] * 4
    assert again["entry"][3]["response"]["location"] == stored
    assert Attachment.objects.count() == 1
    # Another file of the requester's, sent on its own meanwhile, answers no entry (found
    # by a review: entries were matched to the stored files by position).
    task_id = again["entry"][2]["resource"]["id"]
    lab = {
        "resourceType": "DocumentReference",
        "status": "current",
        "context": {"related": [{"reference": f"ServiceRequest/{task_id}"}]},
        "content": [{"attachment": {"contentType": "application/pdf", "data": _pdf("lab"),
                                    "title": "lab.pdf"}}],
    }  # fmt: skip
    assert world.r4.post("/fhir/DocumentReference", lab).status_code == 201
    # A retry that carries one more file stores that one (a file is never dropped).
    more = with_case_file(
        json.loads(json.dumps(with_file)),
        {"contentType": "application/pdf", "data": _pdf("b"), "title": "b.pdf"},
    )
    third = body(world.r4.post("/fhir", more))
    assert [e["response"]["status"] for e in third["entry"]] == ["200 OK"] * 4 + ["201 Created"]
    assert third["entry"][3]["response"]["location"] == stored
    assert third["entry"][4]["resource"]["content"][0]["attachment"]["title"] == "b.pdf"
    assert sorted(Attachment.objects.values_list("original_name", flat=True)) == [
        "a.pdf",
        "b.pdf",
        "lab.pdf",
    ]


def test_a_draft_service_request_is_422_and_nothing_is_published(world: World) -> None:
    bundle = transaction(world)
    bundle["entry"][1]["resource"]["status"] = "draft"
    before = _counts()
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == ["ServiceRequest.status"]
    assert _counts() == before


def test_an_entry_if_none_exist_is_honoured(world: World) -> None:
    submit(world, "SR-1")
    first = Referral.objects.get()
    bundle = transaction(world, "SR-2")
    bundle["entry"][1]["request"]["ifNoneExist"] = f"identifier={PLACER}|SR-1"
    before = _counts()
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 200, response.content
    assert [e["response"]["status"] for e in body(response)["entry"]] == ["200 OK"] * 3
    assert {e["resource"]["id"] for e in body(response)["entry"]} == {first.filler_id}
    assert _counts() == before
    bundle["entry"][1]["request"]["ifNoneExist"] = 7
    assert world.r4.post("/fhir", bundle).status_code == 400
    assert _counts() == before


@pytest.mark.parametrize("subject", ["Group/1", "urn:uuid:abc", "Patient/someone-else"])
def test_a_counter_referral_is_for_the_referrals_patient(world: World, subject: str) -> None:
    task_id = advised(world)
    order = _counter_referral(task_id, _spoke_department(world))
    order["subject"] = {"reference": subject}
    before = _counts()
    response = member_client(world.consultant).post("/fhir/ServiceRequest", order)
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == ["ServiceRequest.subject"]
    assert _counts() == before


@pytest.mark.parametrize(
    ("change", "status", "diagnostic"),
    [
        (
            lambda b: b["entry"][1]["resource"].update(subject={"reference": "urn:uuid:none"}),
            400,
            "which no entry's fullUrl is",
        ),
        (
            lambda b: b["entry"][1]["resource"].update(subject={"reference": "urn:uuid:task-1"}),
            422,
            "must reference a Patient, not the Task entry",
        ),
        (  # a case file under the Patient's fullUrl: every reference still resolves
            lambda b: with_case_file(b, {"contentType": "application/pdf", "data": PDF})["entry"][
                3
            ].update(fullUrl="urn:uuid:patient-1"),
            400,
            "is also an earlier entry's",
        ),
    ],
    ids=["dangling", "a-task-as-subject", "duplicate-full-urls"],
)
def test_transaction_references_must_resolve(
    world: World, change: Any, status: int, diagnostic: str
) -> None:
    bundle = transaction(world)
    change(bundle)
    before = _counts()
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == status, response.content
    assert diagnostic in outcome_issue(response)["diagnostics"]
    assert _counts() == before


@pytest.mark.parametrize("respond_async", [False, True])
def test_a_refused_transaction_keeps_no_case_file(world: World, respond_async: bool) -> None:
    """Found by a review: the first file's bytes stayed in storage, with no row naming
    them, when a later entry was refused (the rollback reaches rows, not files)."""
    from fhir_gateway import intake

    bundle = with_case_file(
        transaction(world), {"contentType": "application/pdf", "data": PDF, "title": "a.pdf"}
    )
    with_case_file(bundle, {"contentType": "text/plain", "data": PDF, "title": "b"})  # refused
    headers = {"Prefer": "respond-async"} if respond_async else {}
    files_before = stored_files()
    response = world.r4.post("/fhir", bundle, **headers)
    if respond_async:
        assert response.status_code == 202
        intake.intake_drain()
        assert IntakeJob.objects.get().result_status == 415
    else:
        assert response.status_code == 415
    assert (Referral.objects.count(), Attachment.objects.count()) == (0, 0)
    assert stored_files() == files_before


@pytest.mark.django_db(transaction=True)
def test_a_case_file_whose_document_reference_fails_is_not_kept(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A case file's row and its DocumentReference are one transaction (the upload
    publishes it, ``publish.case_file_stored``): when the DocumentReference cannot be
    stored, neither the row nor the bytes are kept. (Found by a review of the rollback
    cleanup, when the row committed first: the file was deleted and the committed row
    named nothing, its downloads 500s.)"""
    from django.db import OperationalError

    from fhir_gateway import publish

    task_id = accepted(world)
    real = publish.store_version

    def failing(**kwargs: Any) -> Any:
        if kwargs.get("resource_type") == "DocumentReference":
            raise OperationalError("statement timeout")
        return real(**kwargs)

    monkeypatch.setattr(publish, "store_version", failing)
    files_before = stored_files()
    document = {
        "resourceType": "DocumentReference",
        "status": "current",
        "context": {"related": [{"reference": f"ServiceRequest/{task_id}"}]},
        "content": [{"attachment": {"contentType": "application/pdf", "data": PDF}}],
    }
    assert world.r4.post("/fhir/DocumentReference", document).status_code >= 400
    assert not Attachment.objects.exists()
    assert stored_files() == files_before
    assert not OutboxMessage.objects.filter(resource_type="DocumentReference").exists()


@pytest.mark.django_db
def test_a_batch_rolled_back_after_its_job_keeps_no_case_file(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's own cleanup ended with its savepoint; the batch that then failed rolled
    its rows back and left the file (stored again by the retry)."""
    from fhir_gateway import intake

    bundle = with_case_file(
        transaction(world), {"contentType": "application/pdf", "data": PDF, "title": "a.pdf"}
    )
    assert world.r4.post("/fhir", bundle, Prefer="respond-async").status_code == 202
    files_before = stored_files()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the batch's last statement failed")

    with monkeypatch.context() as patch:
        patch.setattr(intake, "_finish_all", broken)
        assert [o for _job, o in intake.intake_process_next(limit=10)] == ["error"]
    assert (Referral.objects.count(), Attachment.objects.count()) == (0, 0)
    assert stored_files() == files_before
    IntakeJob.objects.update(next_attempt_at=timezone.now())
    assert [o for _job, o in intake.intake_process_next(limit=10)] == ["done"]
    (attachment,) = Attachment.objects.all()
    assert stored_files() - files_before == {attachment.file.name}


@pytest.mark.django_db(transaction=True)
def test_a_committed_bundle_keeps_its_case_files_when_its_answer_fails(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: the cleanup still held the Bundle's files after its transaction
    committed, and an error while rendering the answer deleted them."""
    from fhir_gateway import referral_resources

    def failing(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("rendering the answer failed")

    monkeypatch.setattr(referral_resources, "_transaction_response", failing)
    files_before = stored_files()
    bundle = with_case_file(
        transaction(world), {"contentType": "application/pdf", "data": PDF, "title": "a.pdf"}
    )
    assert world.r4.post("/fhir", bundle).status_code == 500
    (attachment,) = Attachment.objects.all()
    assert stored_files() - files_before == {attachment.file.name}


def test_a_resubmission_refuses_the_entries_a_first_submission_refuses(world: World) -> None:
    """Found by a review: an entry of two contents matched a stored file by its first one
    and was answered 200 where a first submission is 422."""
    bundle = with_case_file(
        transaction(world), {"contentType": "application/pdf", "data": PDF, "title": "a.pdf"}
    )
    assert world.r4.post("/fhir", bundle).status_code == 200
    twice = json.loads(json.dumps(bundle))
    content = twice["entry"][3]["resource"]["content"]
    content.append(content[0])
    before = _counts()
    response = world.r4.post("/fhir", twice)
    assert response.status_code == 422, response.content
    assert _counts() == before


@pytest.mark.parametrize(
    "url",
    [
        "Task",
        "ServiceRequest/1",
        "ServiceRequest?identifier=x",
        None,
        # A relative url is the type itself: a path ending in it names something else.
        "Task/ServiceRequest",
        "Patient/1/ServiceRequest",
        "ServiceRequest/1/ServiceRequest",
    ],
)
def test_an_entry_whose_request_url_is_not_its_type_is_400(world: World, url: Any) -> None:
    """A ServiceRequest entry POSTed to another type (or an id, a search, nothing) was
    accepted: request.url was never read."""
    bundle = transaction(world)
    bundle["entry"][1]["request"]["url"] = url
    before = _counts()
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 400, response.content
    issue = outcome_issue(response)
    assert issue["code"] == "invalid"
    assert issue["expression"] == ["Bundle.entry[1].request.url"]
    assert _counts() == before


@pytest.mark.parametrize("form", ["http://testserver/fhir/{}", "/{}", "{}/"])
def test_an_absolute_request_url_naming_the_type_is_taken(world: World, form: str) -> None:
    bundle = transaction(world)
    for entry in bundle["entry"]:
        entry["request"]["url"] = form.format(entry["resource"]["resourceType"])
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 200, response.content


# --- Task.focus naming another referral (review suspicion) -------------------------------


def _versions(filler_id: str) -> dict[str, int]:
    """The current version of each of a referral's resources."""
    return dict(
        FhirResource.objects.filter(logical_id=filler_id, is_current=True).values_list(
            "resource_type", "version_id"
        )
    )


def _refused(response: Any, element: str, diagnostics: str) -> None:
    """422 business-rule on ``element``, saying ``diagnostics``."""
    assert response.status_code == 422, response.content
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("business-rule", [element])
    assert diagnostics in issue["diagnostics"]


@pytest.mark.parametrize(
    "form",
    [
        "ServiceRequest/{}",
        "http://testserver/fhir/ServiceRequest/{}",
        "ServiceRequest/{}/_history/1",
        "Task/{}",
    ],
)
@pytest.mark.parametrize("resubmission", [False, True])
def test_a_task_entry_focused_on_another_referral_is_422(
    world: World, form: str, resubmission: bool
) -> None:
    """It was: Task.focus was checked only when it named an entry (urn:uuid:); one naming
    another referral's ServiceRequest was stored as a Task of the Bundle's referral."""
    other = str(task_of(submit(world, "SR-OTHER"))["id"])
    if resubmission:
        submit(world, "SR-2")
    bundle = transaction(world, "SR-2")
    bundle["entry"][2]["resource"]["focus"] = {"reference": form.format(other)}
    before, versions = _counts(), _versions(other)

    response = world.r4.post("/fhir", bundle)

    _refused(response, "Bundle.entry[2].resource.focus", form.format(other))
    assert _counts() == before
    assert _versions(other) == versions


def test_a_task_entry_may_name_its_own_service_request(world: World) -> None:
    """The ServiceRequest entry, or (a resubmission) the referral's ServiceRequest/<id>."""
    first = submit(world)
    own = str(task_of(first)["id"])
    bundle = transaction(world)
    bundle["entry"][2]["resource"]["focus"] = {"reference": f"ServiceRequest/{own}"}

    response = world.r4.post("/fhir", bundle)

    assert response.status_code == 200, response.content
    assert [e["response"]["status"] for e in body(response)["entry"]] == ["200 OK"] * 3


# --- References on another server's base (review suspicion) -----------------------------
# Only the type and id of an absolute URL were read: another server's
# …/ServiceRequest/<our filler id> was taken as our referral's order.

FOREIGN = "https://evil.example/fhir"


def test_a_task_entry_focused_on_an_order_of_another_server_is_422(world: World) -> None:
    # Given a referral, and its resubmission whose Task.focus is the referral's
    # ServiceRequest id on another server
    own = str(task_of(submit(world))["id"])
    bundle = transaction(world)
    bundle["entry"][2]["resource"]["focus"] = {"reference": f"{FOREIGN}/ServiceRequest/{own}"}
    before, versions = _counts(), _versions(own)

    # When it is posted
    response = world.r4.post("/fhir", bundle)

    # Then it is 422 on the focus, and nothing changed
    _refused(response, "Bundle.entry[2].resource.focus", "on another server")
    assert _counts() == before
    assert _versions(own) == versions

    # And the same order on this server's base (host in capitals, default port) is its own
    written = f"HTTP://TESTSERVER:80/fhir/ServiceRequest/{own}"
    bundle["entry"][2]["resource"]["focus"] = {"reference": written}
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 200, response.content


@pytest.mark.parametrize("element", ["performer", "subject"])
def test_a_counter_referral_naming_another_servers_resources_is_422(
    world: World, element: str
) -> None:
    # Given a counter-referral whose department or patient is ours by id, on another server
    task_id = advised(world)
    department = _spoke_department(world)
    order = _counter_referral(task_id, department)
    if element == "performer":
        order["performer"] = [{"reference": f"{FOREIGN}/HealthcareService/{department.pk}"}]
    else:
        order["subject"] = {"reference": f"{FOREIGN}/Patient/{task_id}"}
    before = _counts()

    # When it is posted
    response = member_client(world.consultant).post("/fhir/ServiceRequest", order)

    # Then it is 422 naming the element, and nothing is stored
    _refused(response, f"ServiceRequest.{element}", "on another server")
    assert _counts() == before
    assert Referral.objects.get(filler_id=task_id).state == "advised"


# --- Task.focus given by identifier alone (review suspicion) ----------------------------
# An identifier-only focus was never read: one naming another referral's order was taken,
# and the Task stored for the Bundle's referral.


@pytest.mark.parametrize("system", [PLACER, FILLER_SYSTEM])
@pytest.mark.parametrize("beside_the_entry", [False, True])
def test_a_task_entry_focused_by_another_referrals_identifier_is_422(
    world: World, system: str, beside_the_entry: bool
) -> None:
    # Given another referral, and a transaction whose Task.focus names that referral's
    # order by its placer or filler identifier (alone, or beside the ServiceRequest entry)
    other = str(task_of(submit(world, "SR-OTHER"))["id"])
    value = "SR-OTHER" if system == PLACER else other
    bundle = transaction(world, "SR-2")
    focus: dict[str, Any] = {"identifier": {"system": system, "value": value}}
    if beside_the_entry:
        focus["reference"] = "urn:uuid:sr-1"
    bundle["entry"][2]["resource"]["focus"] = focus
    before, versions = _counts(), _versions(other)

    # When it is posted
    response = world.r4.post("/fhir", bundle)

    # Then it is 422 on the focus, and nothing changed
    _refused(response, "Bundle.entry[2].resource.focus", f"{system}|{value}")
    assert _counts() == before
    assert _versions(other) == versions

    # And the Bundle's own placer identifier is its order
    focus["identifier"] = {"system": PLACER, "value": "SR-2"}
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 200, response.content
    assert [e["response"]["status"] for e in body(response)["entry"]] == ["201 Created"] * 3


# --- Task.for naming another referral's patient (review of 31460c8) ----------------------
# Task.for was checked only when it named an entry (urn:uuid:): one naming another
# referral's Patient was stored as the Task of the Bundle's referral, read back for its
# patient (as Task.focus and a case file's subject were).


@pytest.mark.parametrize(
    "form",
    ["Patient/{}", "http://testserver/fhir/Patient/{}", f"{FOREIGN}/Patient/{{own}}"],
)
@pytest.mark.parametrize("resubmission", [False, True])
def test_a_task_entry_for_another_referrals_patient_is_422(
    world: World, form: str, resubmission: bool
) -> None:
    # Given another referral, and a transaction whose Task.for names that referral's
    # Patient (or, on a resubmission, the referral's own Patient id on another server)
    other = str(task_of(submit(world, "SR-OTHER"))["id"])
    own = str(task_of(submit(world, "SR-2"))["id"]) if resubmission else other
    bundle = transaction(world, "SR-2")
    written = form.format(other, own=own)
    bundle["entry"][2]["resource"]["for"] = {"reference": written}
    before, versions = _counts(), _versions(other)

    # When it is posted
    response = world.r4.post("/fhir", bundle)

    # Then it is 422 on Task.for, and nothing changed
    _refused(response, "Bundle.entry[2].resource.for", written)
    assert _counts() == before
    assert _versions(other) == versions

    # And the referral's own Patient, however written on this server's base, or the
    # ServiceRequest's subject as written, is taken
    if resubmission:
        written = f"HTTP://TESTSERVER:80/fhir/Patient/{own}/_history/1"
        bundle["entry"][2]["resource"]["for"] = {"reference": written}
    else:
        del bundle["entry"][0]  # no Patient entry: the patient on the member's server
        bundle["entry"][0]["resource"]["subject"] = {"reference": HIS_PATIENT}
        bundle["entry"][1]["resource"]["for"] = {"reference": HIS_PATIENT}
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 200, response.content
    statuses = [e["response"]["status"] for e in body(response)["entry"]]
    assert statuses == (["200 OK"] * 3 if resubmission else ["201 Created"] * 2)
