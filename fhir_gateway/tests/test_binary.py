"""Binary: the bytes of case files over FHIR, scoped like their referral."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from accounts.roles import Role
from accounts.services import api_token_issue
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import World, body, submit, task_of
from fhir_gateway.versions import model_class
from referrals.models import Attachment, AuditEntry
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PDF = b"%PDF-1.4\n% synthetic lab report, no patient data\n1 0 obj <<>> endobj\n%%EOF\n"


def _upload(world: World, task_id: str, data: bytes = PDF) -> dict[str, Any]:
    document = {
        "resourceType": "DocumentReference",
        "status": "current",
        "content": [
            {
                "attachment": {
                    "contentType": "application/pdf",
                    "title": "echo-report.pdf",
                    "data": base64.b64encode(data).decode("ascii"),
                }
            }
        ],
        "context": {"related": [{"reference": f"ServiceRequest/{task_id}"}]},
    }
    response = world.r4.post("/fhir/DocumentReference", document)
    assert response.status_code == 201, response.content
    return body(response)


@pytest.fixture
def case_file(world: World) -> tuple[str, dict[str, Any]]:
    task_id = str(task_of(submit(world))["id"])
    return task_id, _upload(world, task_id)


def _binary_path(document: dict[str, Any]) -> str:
    return "/fhir/" + document["content"][0]["attachment"]["url"]


def test_document_reference_points_at_its_binary(world: World, case_file: Any):
    _task_id, document = case_file

    attachment = document["content"][0]["attachment"]
    assert attachment["url"] == f"Binary/{document['id']}"
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(PDF).digest()).decode()  # noqa: S324
    assert (attachment["contentType"], attachment["size"]) == ("application/pdf", len(PDF))
    model_class("DocumentReference", "4.0").model_validate(document)
    r5 = body(world.r4.get(f"/fhir/DocumentReference/{document['id']}", Accept=FHIR_R5))
    model_class("DocumentReference", "5.0").model_validate(r5)
    assert r5["content"][0]["attachment"]["url"] == f"Binary/{document['id']}"


@pytest.mark.parametrize("accept", [None, "*/*", "application/pdf", "application/*"])
def test_raw_bytes_with_the_stored_type_unless_fhir_json_is_asked(
    world: World, case_file: Any, accept: str | None
):
    _task_id, document = case_file
    headers = {"Accept": accept} if accept else {}

    response = world.r5.get(_binary_path(document), **headers)  # the consultant's system

    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert b"".join(response.streaming_content) == PDF
    assert (response["ETag"], response["X-Content-Type-Options"]) == ('W/"1"', "nosniff")
    assert response["Cache-Control"] == "private, no-store"
    entry = AuditEntry.objects.get(action="download")
    assert (entry.user, entry.object_type, entry.detail) == (
        world.consultant,
        "attachment",
        "fhir-binary",
    )


@pytest.mark.parametrize(
    ("accept", "version"),
    [
        (FHIR_R4, "4.0"),
        (FHIR_R5, "5.0"),
        ("application/fhir+json", "4.0"),
        ("application/json, */*", "4.0"),
    ],
)
def test_fhir_json_accept_gets_a_binary_resource(
    world: World, case_file: Any, accept: str, version: str
):
    _task_id, document = case_file

    response = world.r4.get(_binary_path(document), Accept=accept)

    assert response.status_code == 200
    assert response["Content-Type"] == f"application/fhir+json; fhirVersion={version}"
    binary = json.loads(response.content)
    model_class("Binary", version).model_validate(binary)
    assert (binary["id"], binary["contentType"]) == (document["id"], "application/pdf")
    assert base64.b64decode(binary["data"]) == PDF
    assert binary["securityContext"] == {"reference": f"DocumentReference/{document['id']}"}


def test_format_json_overrides_accept(world: World, case_file: Any):
    _task_id, document = case_file

    response = world.r4.get(_binary_path(document) + "?_format=json", Accept="*/*")

    assert json.loads(response.content)["resourceType"] == "Binary"


def test_outside_the_referral_scope_it_is_404_and_nothing_is_recorded(world: World, case_file: Any):
    _task_id, document = case_file
    ministry = UserFactory.create(facility=world.network.hub, roles=[Role.MINISTRY])
    stranger = UserFactory.create(facility=world.network.hub, roles=[Role.MEMBER_SYSTEM])

    for client in (
        world.other,  # another facility
        FhirClient(api_token_issue(user=ministry, name="t").raw),
        FhirClient(api_token_issue(user=stranger, name="t").raw),  # hub, not the department
    ):
        for accept in ("*/*", FHIR_R4):
            response = client.get(_binary_path(document), Accept=accept)
            assert response.status_code == 404
            assert outcome_issue(response)["code"] == "not-found"
    assert not AuditEntry.objects.filter(action="download").exists()


def test_unknown_and_mismatched_ids_are_404(world: World, case_file: Any):
    task_id, document = case_file
    other_task = str(task_of(submit(world, "SR-2"))["id"])
    pk = Attachment.objects.get().pk

    for logical_id, status in (
        ("nonsense", 404),
        (f"{task_id}-att-{pk + 100}", 404),
        (f"{other_task}-att-{pk}", 404),  # a visible referral, but not this file's
        (f"{task_id}-att-", 404),
        (f"{task_id}-att-0x1", 404),
        (f"{task_id}-att-\u0661", 400),  # an Arabic-Indic digit: not a FHIR id
    ):
        response = world.r4.get(f"/fhir/Binary/{logical_id}")
        assert response.status_code == status, logical_id
        assert outcome_issue(response)["code"] == ("not-found" if status == 404 else "invalid")
    assert world.r4.get(_binary_path(document)).status_code == 200


def test_an_accept_we_cannot_honour_is_406(world: World, case_file: Any):
    _task_id, document = case_file

    for accept in ("image/png", "application/xml", "application/fhir+json; fhirVersion=3.0"):
        response = world.r4.get(_binary_path(document), Accept=accept)
        assert response.status_code == 406, accept
        assert outcome_issue(response)["code"] == "not-supported"
    # Other types keep their strict negotiation.
    assert world.r4.get(f"/fhir/DocumentReference/{document['id']}", Accept="*/*").status_code == (
        200
    )
    assert world.r4.get(
        f"/fhir/DocumentReference/{document['id']}", Accept="application/pdf"
    ).status_code == (406)


def test_binary_is_read_only(world: World, case_file: Any):
    _task_id, document = case_file
    path = _binary_path(document)

    assert world.r4.put(path, {"resourceType": "Binary"}).status_code == 405
    assert world.r4.delete(path).status_code == 405
    assert world.r4.get("/fhir/Binary").status_code == 405
    assert world.r4.post("/fhir/Binary", {"resourceType": "Binary"}).status_code == 405
    assert world.r4.get(path).status_code == 200
    statement = body(world.r4.get("/fhir/metadata"))
    [binary] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Binary"]
    assert binary["interaction"] == [{"code": "read"}]
