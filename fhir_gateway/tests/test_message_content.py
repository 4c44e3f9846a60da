"""What a member's Patient identifier, Communication and consult note carry reads back as
sent, or is refused: identifiers holding ``|``, answers naming the message they answer,
text in its declared charset, files that are not text (review findings)."""

from __future__ import annotations

import base64
import codecs
from typing import Any

import pytest

from fhir_gateway.tests.conftest import FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import (
    LETTER_PDF,
    World,
    accepted,
    body,
    consult_note,
    message,
    task_of,
    transaction,
)
from referrals.models import Message, Referral, ReferralState

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "sent",
    [
        {"system": "https://codao.example.org/sid/pseudonym", "value": "P-42|2"},
        {"value": "MRN|0042"},
        {"value": "MRN-0042"},
        {"system": "urn:oid:1.2.3", "value": "a|b|c"},
    ],
)
def test_a_patient_identifier_reads_back_as_sent(world: World, sent: dict[str, str]) -> None:
    bundle = transaction(world)
    bundle["entry"][0]["resource"]["identifier"] = [sent]
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 200, response.content
    task_id = task_of(body(response))["id"]
    for client, version in ((world.r4, None), (world.r5, FHIR_R5)):
        headers = {"Accept": version} if version else {}
        patient = body(client.get(f"/fhir/Patient/{task_id}", **headers))
        assert patient["identifier"] == [sent]


def test_a_patient_identifier_system_with_a_bar_is_refused(world: World) -> None:
    bundle = transaction(world)
    bundle["entry"][0]["resource"]["identifier"] = [{"system": "MRN|x", "value": "1"}]
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == ["Patient.identifier.system"]
    assert not Referral.objects.exists()


def _post(world: World, resource: dict[str, Any]) -> Any:
    return world.r5.post(
        f"/fhir/{resource['resourceType']}", resource, content_type=FHIR_R5, Accept=FHIR_R5
    )


def _ask(world: World, task_id: str) -> str:
    """The consultant (the R5 system) asks for information: the question's id."""
    question = {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "payload": [{"contentCodeableConcept": {"text": "Echocardiogram done?"}}],
    }
    asked = _post(world, question)
    assert asked.status_code == 201, asked.content
    assert Referral.objects.get().state == ReferralState.INFO_REQUESTED
    return str(body(asked)["id"])


def test_an_answer_to_no_message_is_refused_while_info_is_requested(world: World) -> None:
    task_id = accepted(world)
    _ask(world, task_id)
    before = Message.objects.count()
    response = world.r4.post(
        "/fhir/Communication", message(task_id, "Echo normal.", f"Communication/{task_id}-msg-9")
    )
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == ["Communication.inResponseTo"]
    assert Message.objects.count() == before
    assert Referral.objects.get().state == ReferralState.INFO_REQUESTED


def test_an_answer_to_the_question_answers_it(world: World) -> None:
    task_id = accepted(world)
    question = _ask(world, task_id)
    sent = f"Communication/{question}"
    response = world.r4.post("/fhir/Communication", message(task_id, "Echo normal.", sent))
    assert response.status_code == 201, response.content
    assert body(response)["inResponseTo"] == [{"reference": sent}]
    assert Referral.objects.get().state == ReferralState.ACCEPTED  # provide_info


def test_a_reply_to_another_message_keeps_what_it_answers(world: World) -> None:
    task_id = accepted(world)
    first = world.r4.post("/fhir/Communication", message(task_id, "Labs tomorrow."))
    assert first.status_code == 201, first.content
    _ask(world, task_id)
    sent = f"Communication/{body(first)['id']}"
    response = world.r4.post("/fhir/Communication", message(task_id, "Correction.", sent))
    assert response.status_code == 201, response.content
    assert body(response)["inResponseTo"] == [{"reference": sent}]
    # One more message: the question stays open
    assert Referral.objects.get().state == ReferralState.INFO_REQUESTED


def _text_message(task_id: str, content_type: str, data: bytes) -> dict[str, Any]:
    return {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "payload": [
            {
                "contentAttachment": {
                    "contentType": content_type,
                    "data": base64.b64encode(data).decode(),
                }
            }
        ],
    }


@pytest.mark.parametrize(
    ("content_type", "data"),
    [
        ("text/plain; charset=iso-8859-1", "Fièvre, éruption".encode("latin-1")),
        ("text/plain;charset=UTF-16", "Fièvre, éruption".encode("utf-16")),
        ('text/plain; charset="utf-8"', "Fièvre, éruption".encode()),
        ("text/plain", "Fièvre, éruption".encode()),
        ("text/plain; charset=utf-16", "Fièvre, éruption".encode("utf-16-be")),  # no BOM
        (
            "text/plain; charset=utf-16",
            codecs.BOM_UTF16_LE + "Fièvre, éruption".encode("utf-16-le"),
        ),
        ("text/plain; charset=windows-1258", "Fièvre, éruption".encode("cp1258")),
        ("text/plain; charset=utf-8", codecs.BOM_UTF8 + "Fièvre, éruption".encode()),
        ("text/plain", codecs.BOM_UTF8 + "Fièvre, éruption".encode()),
    ],
    ids=[
        "latin-1",
        "utf-16",
        "quoted-utf-8",
        "default-utf-8",
        "utf-16-no-bom",
        "utf-16le-bom",
        "windows-1258",
        "utf-8-bom",
        "default-utf-8-bom",
    ],
)
def test_text_is_read_in_its_declared_charset(world: World, content_type: str, data: bytes) -> None:
    task_id = accepted(world)
    response = _post(world, _text_message(task_id, content_type, data))
    assert response.status_code == 201, response.content
    assert Message.objects.get().text == "Fièvre, éruption"


@pytest.mark.parametrize(
    ("content_type", "data", "status"),
    [
        ("text/plain; charset=klingon", b"abc", 422),
        ("text/plain; charset=base64", b"abc", 422),  # a codec, not of text
        ("text/plain; charset=utf-8", b"\xff\xfe\xfa", 400),
        ("application/pdf", LETTER_PDF, 422),  # a file, not text
        ("text/plain; charset=utf-7", b"Echo +2AA-", 422),  # no charset we read
        ("text/plain; charset=unicode_escape", b"Echo \\ud800", 422),
        ("text/plain; charset=utf-16-be", b"\xd8\x00\x00A", 400),  # a lone surrogate
    ],
    ids=[
        "unknown-charset",
        "codec-not-of-text",
        "not-utf-8",
        "pdf",
        "utf-7",
        "escapes",
        "surrogate",
    ],
)
def test_text_that_cannot_be_read_is_refused(
    world: World, content_type: str, data: bytes, status: int
) -> None:
    task_id = accepted(world)
    response = _post(world, _text_message(task_id, content_type, data))
    assert response.status_code == status, response.content
    assert not Message.objects.exists()


def test_a_pdf_consult_note_is_refused_not_stored_as_its_title(world: World) -> None:
    task_id = accepted(world)
    note = consult_note(task_id)
    note["content"] = [
        {
            "attachment": {
                "contentType": "application/pdf",
                "data": base64.b64encode(LETTER_PDF).decode(),
                "title": "Consult.pdf",
            }
        }
    ]
    response = _post(world, note)
    assert response.status_code == 422, response.content
    assert "not text" in outcome_issue(response)["diagnostics"]
    referral = Referral.objects.get()
    assert referral.state == ReferralState.ACCEPTED
    assert not referral.consult_notes.exists()


def test_a_message_part_of_two_referrals_is_refused(world: World) -> None:
    """It was filed on the first Task named and the second dropped without a word (found
    by an integrator)."""
    first, second = accepted(world, "SR-1"), accepted(world, "SR-2")
    resource = message(first, "Which one?")
    resource["partOf"] = [{"reference": f"Task/{second}"}, {"reference": f"Task/{first}"}]
    response = world.r4.post("/fhir/Communication", resource)
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == ["Communication.partOf"]
    assert not Message.objects.exists()
    # Its Task and ServiceRequest together name one referral
    resource["partOf"] = [{"reference": f"Task/{first}"}, {"reference": f"ServiceRequest/{first}"}]
    assert world.r4.post("/fhir/Communication", resource).status_code == 201
    assert Message.objects.get().referral.filler_id == first
