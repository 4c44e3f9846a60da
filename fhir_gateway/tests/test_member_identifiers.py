"""The identifiers a member gives the Communications and DocumentReferences it posts: kept
on the stored resource (every rendering, and what the outbox sends), searchable with
``identifier``, and a transaction Bundle's DocumentReference entries honour their own
``request.ifNoneExist`` as ``POST DocumentReference`` honours the header."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

import pytest

from fhir_gateway.delivery import _render
from fhir_gateway.models import CreateKey, FhirResource, FhirSearchToken, OutboxMessage
from fhir_gateway.storage import identify_new_resource
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    consult_note,
    transaction,
)
from referrals.models import Attachment, Message, Referral

pytestmark = pytest.mark.django_db

SYSTEM = "https://codao.example.org/sid/message"
MINE = {"system": SYSTEM, "value": "M-0001"}
KEY = f"{SYSTEM}|M-0002"


def _message(task_id: str, *identifiers: dict[str, str]) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "payload": [{"contentString": "Weight today?"}],
    }
    if identifiers:
        resource["identifier"] = list(identifiers)
    return resource


def _pdf(label: str) -> str:
    return base64.b64encode(f"%PDF-1.4 {label}\n%%EOF\n".encode()).decode()


def _case_file(task_id: str, label: str = "a", *identifiers: dict[str, str]) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "context": {"related": [{"reference": f"Task/{task_id}"}]},
        "content": [
            {
                "attachment": {
                    "contentType": "application/pdf",
                    "title": f"{label}.pdf",
                    "data": _pdf(label),
                }
            }
        ],
    }
    if identifiers:
        resource["identifier"] = list(identifiers)
    return resource


def _found(client: FhirClient, path: str, token: str, accept: str = FHIR_R4) -> list[str]:
    response = client.get(f"{path}?identifier={quote(token, safe='')}", Accept=accept)
    assert response.status_code == 200, response.content
    return [e["resource"]["id"] for e in body(response).get("entry", [])]


def _stored(logical_id: str) -> FhirResource:
    return FhirResource.objects.get(logical_id=logical_id, is_current=True)


def test_a_messages_identifier_reads_back_in_both_versions_and_is_sent(world: World) -> None:
    task_id = accepted(world)
    made = world.r4.post("/fhir/Communication", _message(task_id, MINE))
    assert made.status_code == 201, made.content
    message_id = body(made)["id"]
    assert body(made)["identifier"] == [MINE]

    r4 = body(world.r4.get(f"/fhir/Communication/{message_id}"))
    r5 = body(world.r5.get(f"/fhir/Communication/{message_id}", Accept=FHIR_R5))
    assert r4["identifier"] == r5["identifier"] == [MINE]
    assert list(r4)[:4] == ["resourceType", "id", "meta", "identifier"]  # FHIR's order
    row = _stored(message_id)
    assert row.version_id == 1  # carried on the version the create stored, not a second
    # The outbox sends the row as stored: both members get the identifier, each in its
    # own version.
    sent = OutboxMessage.objects.filter(resource_type="Communication", logical_id=message_id)
    assert sent.count() == 2
    for message in sent:
        version = message.endpoint.fhir_version
        assert json.loads(_render(message, version))["identifier"] == [MINE]


def test_a_message_is_found_by_its_identifier_and_only_by_its_readers(world: World) -> None:
    task_id = accepted(world)
    mine = body(world.r4.post("/fhir/Communication", _message(task_id, MINE)))["id"]
    other = body(
        world.r4.post("/fhir/Communication", _message(task_id, {**MINE, "value": "M-0009"}))
    )["id"]
    plain = body(world.r4.post("/fhir/Communication", _message(task_id)))["id"]
    assert len({mine, other, plain}) == 3

    assert _found(world.r4, "/fhir/Communication", f"{SYSTEM}|M-0001") == [mine]
    assert _found(world.r4, "/fhir/Communication", "M-0001") == [mine]  # any system
    assert _found(world.r4, "/fhir/Communication", "|M-0001") == []  # no system
    assert _found(world.r4, "/fhir/Communication", "https://elsewhere|M-0001") == []
    assert sorted(_found(world.r4, "/fhir/Communication", "M-0001,M-0009")) == sorted([mine, other])
    # The other party reads the referral, so it finds the message; an outsider does not.
    assert _found(world.r5, "/fhir/Communication", "M-0001", FHIR_R5) == [mine]
    assert _found(world.other, "/fhir/Communication", "M-0001") == []
    # With another parameter: both hold.
    both = world.r4.get(
        f"/fhir/Communication?part-of=Task/{task_id}&identifier={quote(SYSTEM)}%7CM-0001"
    )
    assert [e["resource"]["id"] for e in body(both)["entry"]] == [mine]


def test_the_if_none_exist_key_is_carried_once_and_is_a_search(world: World) -> None:
    task_id = accepted(world)
    # The key is not among the resource's identifiers: it is added, so the resource
    # matches its own condition.
    keyed = world.r4.post(
        "/fhir/Communication", _message(task_id, MINE), **{"If-None-Exist": f"identifier={KEY}"}
    )
    assert keyed.status_code == 201, keyed.content
    key_identifier = {"system": SYSTEM, "value": "M-0002"}
    assert body(keyed)["identifier"] == [MINE, key_identifier]
    assert _found(world.r4, "/fhir/Communication", KEY) == [body(keyed)["id"]]
    # The key is among them: carried once.
    again_key = f"{SYSTEM}|M-0003"
    own = {"system": SYSTEM, "value": "M-0003"}
    carried = world.r4.post(
        "/fhir/Communication",
        _message(task_id, own),
        **{"If-None-Exist": f"identifier={again_key}"},
    )
    assert body(carried)["identifier"] == [own]
    tokens = FhirSearchToken.objects.filter(resource__logical_id=body(carried)["id"])
    assert list(tokens.values_list("system", "value")) == [(SYSTEM, "M-0003")]
    # A retry answers the first resource as stored, and adds nothing.
    before = (
        Message.objects.count(),
        FhirResource.objects.count(),
        FhirSearchToken.objects.count(),
    )
    retry = world.r4.post(
        "/fhir/Communication", _message(task_id, MINE), **{"If-None-Exist": f"identifier={KEY}"}
    )
    assert retry.status_code == 200, retry.content
    assert body(retry) == body(keyed)
    after = (Message.objects.count(), FhirResource.objects.count(), FhirSearchToken.objects.count())
    assert after == before


def test_an_identifier_invalid_in_fhir_is_refused_and_nothing_is_posted(world: World) -> None:
    task_id = accepted(world)
    before = (Message.objects.count(), FhirResource.objects.count())
    response = world.r4.post(
        "/fhir/Communication",
        _message(task_id, {"system": SYSTEM, "value": 7}),  # type: ignore[dict-item]
    )
    assert response.status_code in (400, 422), response.content
    assert (Message.objects.count(), FhirResource.objects.count()) == before


def test_case_files_and_consult_notes_keep_their_identifiers(world: World) -> None:
    task_id = accepted(world)
    made = world.r4.post("/fhir/DocumentReference", _case_file(task_id, "a", MINE))
    assert made.status_code == 201, made.content
    file_id = body(made)["id"]
    assert body(world.r5.get(f"/fhir/DocumentReference/{file_id}", Accept=FHIR_R5))[
        "identifier"
    ] == [MINE]
    note = consult_note(task_id)
    note["identifier"] = [{"system": "https://hub.example.org/sid/note", "value": "N-1"}]
    advised = world.r5.post("/fhir/DocumentReference", note, content_type=FHIR_R5, Accept=FHIR_R5)
    assert advised.status_code == 201, advised.content
    note_id = body(advised)["id"]
    assert (
        body(world.r4.get(f"/fhir/DocumentReference/{note_id}"))["identifier"] == note["identifier"]
    )

    assert _found(world.r4, "/fhir/DocumentReference", "M-0001") == [file_id]
    assert _found(world.r5, "/fhir/DocumentReference", "N-1", FHIR_R5) == [note_id]
    assert _found(world.other, "/fhir/DocumentReference", "N-1") == []
    everything = body(world.r4.get("/fhir/DocumentReference"))
    assert {e["resource"]["id"] for e in everything["entry"]} == {file_id, note_id}


def test_only_a_version_its_create_stored_takes_identifiers(world: World) -> None:
    task_id = accepted(world)
    row = FhirResource.objects.get(resource_type="Task", logical_id=task_id, is_current=True)
    assert row.version_id > 1
    before = (row.json_r4, row.json_r5)
    with pytest.raises(ValueError, match="not a resource this transaction created"):
        identify_new_resource(row, [MINE])
    row.refresh_from_db()
    assert (row.json_r4, row.json_r5) == before


def test_metadata_states_the_identifier_searches(world: World) -> None:
    statement = body(world.r4.get("/fhir/metadata"))
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    for resource_type in ("Communication", "DocumentReference"):
        params = {p["name"] for p in resources[resource_type].get("searchParam", [])}
        assert "identifier" in params
        interactions = {i["code"] for i in resources[resource_type]["interaction"]}
        assert "search-type" in interactions


# --------------------------------------------------------------------------- Bundles


def _with_file(bundle: dict[str, Any], label: str, if_none_exist: Any = None) -> dict[str, Any]:
    request: dict[str, Any] = {"method": "POST", "url": "DocumentReference"}
    if if_none_exist is not None:
        request["ifNoneExist"] = if_none_exist
    bundle["entry"].append(
        {
            "fullUrl": f"urn:uuid:doc-{len(bundle['entry'])}",
            "request": request,
            "resource": {
                "resourceType": "DocumentReference",
                "status": "current",
                "content": [
                    {
                        "attachment": {
                            "contentType": "application/pdf",
                            "title": f"{label}.pdf",
                            "data": _pdf(label),
                        }
                    }
                ],
            },
        }
    )
    return bundle


def test_a_bundles_file_entry_honours_its_own_key(world: World) -> None:
    bundle = _with_file(transaction(world), "a", f"identifier={KEY}")
    first = world.r4.post("/fhir", bundle)
    assert first.status_code == 200, first.content
    entry = body(first)["entry"][3]
    assert entry["response"]["status"] == "201 Created"
    assert entry["resource"]["identifier"] == [{"system": SYSTEM, "value": "M-0002"}]
    location = entry["response"]["location"]
    assert CreateKey.objects.filter(resource_type="DocumentReference").count() == 1

    again = world.r4.post("/fhir", bundle)
    assert again.status_code == 200, again.content
    assert [e["response"]["status"] for e in body(again)["entry"]] == ["200 OK"] * 4
    assert body(again)["entry"][3]["response"]["location"] == location
    assert Attachment.objects.count() == 1
    # The key decides, not the bytes: the same file under another key is another file.
    other_key = json.loads(json.dumps(bundle))
    other_key["entry"][3]["request"]["ifNoneExist"] = f"identifier={SYSTEM}|M-0005"
    third = body(world.r4.post("/fhir", other_key))
    assert third["entry"][3]["response"]["status"] == "201 Created"
    assert third["entry"][3]["response"]["location"] != location
    assert Attachment.objects.count() == 2


def test_a_keyed_file_answers_no_entry_without_its_key(world: World) -> None:
    """A resubmission matches unkeyed entries to stored files by their bytes; a file stored
    under a key is not among them (it would answer two entries)."""
    bundle = _with_file(transaction(world), "a", f"identifier={KEY}")
    assert world.r4.post("/fhir", bundle).status_code == 200
    unkeyed = json.loads(json.dumps(bundle))
    del unkeyed["entry"][3]["request"]["ifNoneExist"]
    _with_file(unkeyed, "a", f"identifier={KEY}")  # the same bytes, keyed, after it
    answer = body(world.r4.post("/fhir", unkeyed))
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["200 OK"] * 3 + ["201 Created", "200 OK"]
    assert answer["entry"][3]["response"]["location"] != answer["entry"][4]["response"]["location"]
    assert Attachment.objects.count() == 2


@pytest.mark.parametrize(
    ("condition", "code"),
    [
        (7, "structure"),
        ("identifier=M-0001", "invalid"),  # no system
        ("status=current", "not-supported"),
    ],
)
def test_a_file_entry_key_it_cannot_use_refuses_the_bundle(
    world: World, condition: Any, code: str
) -> None:
    bundle = _with_file(transaction(world), "a", condition)
    before = (Referral.objects.count(), Attachment.objects.count(), FhirResource.objects.count())
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 400, response.content
    assert outcome_issue(response)["code"] == code
    after = (Referral.objects.count(), Attachment.objects.count(), FhirResource.objects.count())
    assert after == before


def test_a_bundle_file_keeps_the_identifiers_of_its_entry(world: World) -> None:
    bundle = _with_file(transaction(world), "a")
    bundle["entry"][3]["resource"]["identifier"] = [MINE]
    answer = body(world.r4.post("/fhir", bundle))
    file_id = answer["entry"][3]["resource"]["id"]
    assert answer["entry"][3]["resource"]["identifier"] == [MINE]
    assert _found(world.r4, "/fhir/DocumentReference", f"{SYSTEM}|M-0001") == [file_id]
