"""The identifiers a member gives the Communications and DocumentReferences it posts: kept
on the stored resource (every rendering, and what the outbox sends), searchable with
``identifier``, and a transaction Bundle's DocumentReference entries honour their own
``request.ifNoneExist`` as ``POST DocumentReference`` honours the header."""

from __future__ import annotations

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
    case_file,
    consult_note,
    transaction,
)
from referrals.models import Attachment, Message, Referral
from tests.shared_data import FHIR_EXAMPLES

pytestmark = pytest.mark.django_db

SYSTEM = "https://codao.example.org/sid/message"
MINE = {"system": SYSTEM, "value": "M-0001"}
KEY = f"{SYSTEM}|M-0002"


def _message(task_id: str, *identifiers: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "payload": [{"contentString": "Weight today?"}],
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
        _message(task_id, {"system": SYSTEM, "value": 7}),
    )
    assert response.status_code in (400, 422), response.content
    assert (Message.objects.count(), FhirResource.objects.count()) == before


def test_case_files_and_consult_notes_keep_their_identifiers(world: World) -> None:
    task_id = accepted(world)
    made = world.r4.post("/fhir/DocumentReference", case_file(task_id, "a", MINE))
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


def test_a_referrals_documents_are_found_by_its_order(world: World) -> None:
    """``related`` (R4: context.related) and ``based-on`` (R5: basedOn) name the
    referral's ServiceRequest: its case files and consult notes, in the caller's scope."""
    task_id = accepted(world, "SR-1")
    other_id = accepted(world, "SR-2")
    mine = body(world.r4.post("/fhir/DocumentReference", case_file(task_id, "a")))["id"]
    other = body(world.r4.post("/fhir/DocumentReference", case_file(other_id, "b")))["id"]
    note = body(
        world.r5.post(
            "/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5, Accept=FHIR_R5
        )
    )["id"]
    for client, param, accept in (
        (world.r4, "related", FHIR_R4),
        (world.r5, "based-on", FHIR_R5),
    ):
        found = client.get(
            f"/fhir/DocumentReference?{param}=ServiceRequest/{task_id}", Accept=accept
        )
        assert found.status_code == 200, found.content
        assert sorted(e["resource"]["id"] for e in body(found)["entry"]) == sorted([mine, note])
    both = world.r4.get(f"/fhir/DocumentReference?related={task_id},{other_id}&_count=10")
    assert {e["resource"]["id"] for e in body(both)["entry"]} == {mine, other, note}
    outsider = world.other.get(f"/fhir/DocumentReference?related=ServiceRequest/{task_id}")
    assert body(outsider).get("entry", []) == []
    wrong_type = world.r4.get(f"/fhir/DocumentReference?related=Task/{task_id}")
    assert body(wrong_type).get("entry", []) == []  # the order is a ServiceRequest


def test_only_a_version_its_create_stored_takes_identifiers(world: World) -> None:
    task_id = accepted(world)
    row = FhirResource.objects.get(resource_type="Task", logical_id=task_id, is_current=True)
    assert row.version_id > 1
    before = (row.json_r4, row.json_r5)
    with pytest.raises(ValueError, match="not a resource this transaction created"):
        identify_new_resource(row, [MINE], "4.0")
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
            "resource": case_file(None, label),
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


def test_a_keyed_file_answers_its_key_before_any_entry_of_its_bytes(world: World) -> None:
    """A resubmission matches unkeyed entries to stored files by their bytes, after the
    keyed entries took theirs: the file the key answers answers no other entry."""
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
    # Without the keyed entry, the unkeyed one is answered by a stored file of its bytes.
    alone = json.loads(json.dumps(unkeyed))
    del alone["entry"][4]
    again = body(world.r4.post("/fhir", alone))
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK"] * 4
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


# --------------------------------------------------------------------------- a review's


def test_two_file_entries_with_one_key_refuse_the_bundle(world: World) -> None:
    """Found by a review: the second entry was answered with the first's file (200) and
    its own file was dropped."""
    bundle = _with_file(_with_file(transaction(world), "a", f"identifier={KEY}"), "b")
    bundle["entry"][4]["request"]["ifNoneExist"] = f"identifier={KEY}"
    before = (Referral.objects.count(), Attachment.objects.count(), FhirResource.objects.count())
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 400, response.content
    assert outcome_issue(response)["code"] == "duplicate"
    assert outcome_issue(response)["expression"] == ["Bundle.entry[4].request.ifNoneExist"]
    after = (Referral.objects.count(), Attachment.objects.count(), FhirResource.objects.count())
    assert after == before


def _holds_null_or_empty(value: Any) -> bool:
    if value is None or value == {} or value == []:
        return True
    if isinstance(value, dict):
        return any(_holds_null_or_empty(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_null_or_empty(v) for v in value)
    return False


@pytest.mark.parametrize(
    ("identifiers", "kept"),
    [
        ([{"system": SYSTEM, "value": None}], [{"system": SYSTEM}]),
        ([{}, MINE], [MINE]),
        ([{**MINE, "period": {}}], [MINE]),
        (
            [{**MINE, "type": {"coding": [{}], "text": "Message"}}],
            [{**MINE, "type": {"text": "Message"}}],
        ),
    ],
)
def test_stored_identifiers_hold_no_null_or_empty_element(
    world: World, identifiers: list[Any], kept: list[Any]
) -> None:
    """Found by a review: nulls and empty objects (which FHIR JSON forbids) were stored and
    sent as the member gave them."""
    task_id = accepted(world)
    made = world.r4.post("/fhir/Communication", _message(task_id, *identifiers))
    assert made.status_code == 201, made.content
    row = _stored(body(made)["id"])
    for text in (row.json_r4, row.json_r5):
        stored = json.loads(text)
        assert stored["identifier"] == kept
        assert not _holds_null_or_empty(stored)


@pytest.mark.parametrize(
    ("identifier", "status", "code", "expression"),
    [
        ({**MINE, "use": "bogus"}, 400, "code-invalid", "Communication.identifier[0].use"),
        (
            {"system": SYSTEM, "value": "L" * 256},
            400,
            "invalid",
            "Communication.identifier[0].value",
        ),
        (
            {**MINE, "assigner": {"reference": "#org"}},
            422,
            "business-rule",
            "Communication.identifier[0].assigner.reference",
        ),
    ],
)
def test_an_identifier_we_could_not_keep_as_sent_is_refused(
    world: World, identifier: dict[str, Any], status: int, code: str, expression: str
) -> None:
    """A use outside its value set; a value longer than the search index holds (a review
    found it unfindable by its value, and found by another); an assigner nothing resolves."""
    task_id = accepted(world)
    before = (Message.objects.count(), FhirResource.objects.count())
    response = world.r4.post("/fhir/Communication", _message(task_id, identifier))
    assert response.status_code == status, response.content
    assert outcome_issue(response)["code"] == code
    assert outcome_issue(response)["expression"] == [expression]
    assert (Message.objects.count(), FhirResource.objects.count()) == before


def test_a_bundle_file_naming_an_entry_as_assigner_is_refused(world: World) -> None:
    """Found by a review: ``urn:uuid:`` in identifier.assigner was stored and sent as it
    was, naming nothing once the transaction was done."""
    bundle = _with_file(transaction(world), "a")
    patient = bundle["entry"][0]["fullUrl"]
    assert patient.startswith("urn:uuid:")
    bundle["entry"][3]["resource"]["identifier"] = [{**MINE, "assigner": {"reference": patient}}]
    before = (Referral.objects.count(), Attachment.objects.count(), FhirResource.objects.count())
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == [
        "DocumentReference.identifier[0].assigner.reference"
    ]
    after = (Referral.objects.count(), Attachment.objects.count(), FhirResource.objects.count())
    assert after == before


def test_search_values_take_fhirs_escapes(world: World) -> None:
    """Found by a review: a value with a comma could not be searched (every comma split)."""
    task_id = accepted(world)
    comma = body(
        world.r4.post("/fhir/Communication", _message(task_id, {"system": SYSTEM, "value": "A,B"}))
    )["id"]
    pipe = body(
        world.r4.post("/fhir/Communication", _message(task_id, {"system": "s|x", "value": "C"}))
    )["id"]
    assert _found(world.r4, "/fhir/Communication", f"{SYSTEM}|A\\,B") == [comma]
    assert _found(world.r4, "/fhir/Communication", "A\\,B") == [comma]
    assert _found(world.r4, "/fhir/Communication", f"{SYSTEM}|A,B") == []  # A or B
    assert _found(world.r4, "/fhir/Communication", "s\\|x|C") == [pipe]
    assert sorted(_found(world.r4, "/fhir/Communication", "A\\,B,s\\|x|C")) == sorted([comma, pipe])


def test_a_resubmitted_file_is_answered_by_the_file_with_its_identifiers(world: World) -> None:
    """Found by a review: two files of the same bytes were matched by bytes alone, so each
    entry of a resubmission in another order got the other's file."""
    one, two = {**MINE, "value": "DOC-1"}, {**MINE, "value": "DOC-2"}
    first = _with_file(_with_file(transaction(world), "same"), "same")
    first["entry"][3]["resource"]["identifier"] = [one]
    first["entry"][4]["resource"]["identifier"] = [two]
    assert world.r4.post("/fhir", first).status_code == 200
    again = json.loads(json.dumps(first))
    again["entry"][3]["resource"]["identifier"] = [two]
    again["entry"][4]["resource"]["identifier"] = [one]
    answer = body(world.r4.post("/fhir", again))
    assert Attachment.objects.count() == 2
    assert [e["response"]["status"] for e in answer["entry"][3:]] == ["200 OK"] * 2
    assert answer["entry"][3]["resource"]["identifier"] == [two]
    assert answer["entry"][4]["resource"]["identifier"] == [one]


def test_identifiers_r4_cannot_hold_are_422_and_nothing_is_posted(world: World) -> None:
    """Found by a review: an R5-only element in an R5 request's identifier was a 400 saying
    the request was not valid FHIR 4.0."""
    task_id = accepted(world)
    message = _message(
        task_id,
        {**MINE, "extension": [{"url": "https://x.example/n", "valueInteger64": "5"}]},
    )
    message["payload"] = [{"contentCodeableConcept": {"text": "Weight today?"}}]
    before = (Message.objects.count(), FhirResource.objects.count())
    response = world.r5.post("/fhir/Communication", message, content_type=FHIR_R5, Accept=FHIR_R5)
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["code"] == "not-supported"
    assert "FHIR 4.0" in outcome_issue(response)["diagnostics"]
    assert (Message.objects.count(), FhirResource.objects.count()) == before


def test_if_none_exist_finds_a_message_that_carries_the_identifier(world: World) -> None:
    """Found by a review: the search found the message, the conditional create did not
    and posted a second. The first resource carrying an identifier answers it."""
    task_id = accepted(world)
    first = world.r4.post("/fhir/Communication", _message(task_id, MINE))
    twin = world.r4.post("/fhir/Communication", _message(task_id, MINE))  # a plain create
    assert (first.status_code, twin.status_code) == (201, 201)
    before = (Message.objects.count(), FhirResource.objects.count())
    again = world.r4.post(
        "/fhir/Communication",
        _message(task_id, MINE),
        **{"If-None-Exist": f"identifier={SYSTEM}|M-0001"},
    )
    assert again.status_code == 200, again.content
    assert body(again)["id"] == body(first)["id"]
    assert (Message.objects.count(), FhirResource.objects.count()) == before
    # The other party's identifier is its own: its conditional create makes a message.
    other = world.r5.post(
        "/fhir/Communication",
        {**_message(task_id, MINE), "payload": [{"contentCodeableConcept": {"text": "Hi"}}]},
        content_type=FHIR_R5,
        Accept=FHIR_R5,
        **{"If-None-Exist": f"identifier={SYSTEM}|M-0001"},
    )
    assert other.status_code == 201, other.content


def test_an_r4_master_identifier_is_kept_and_searchable(world: World) -> None:
    """R4's DocumentReference.masterIdentifier (a review: dropped): kept as that in R4, the
    first identifier in R5 (which has no such element), found by ``identifier`` (whose R4
    definition covers both)."""
    task_id = accepted(world)
    master = {"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.3.6.1.4.1.21367.2005.3.7"}
    document = case_file(task_id, "a", MINE)
    document["masterIdentifier"] = master
    made = world.r4.post("/fhir/DocumentReference", document)
    assert made.status_code == 201, made.content
    doc_id = body(made)["id"]
    r4 = body(world.r4.get(f"/fhir/DocumentReference/{doc_id}"))
    r5 = body(world.r5.get(f"/fhir/DocumentReference/{doc_id}", Accept=FHIR_R5))
    assert (r4["masterIdentifier"], r4["identifier"]) == (master, [MINE])
    assert list(r4).index("masterIdentifier") < list(r4).index("identifier")
    assert "masterIdentifier" not in r5 and r5["identifier"] == [master, MINE]
    assert _found(world.r4, "/fhir/DocumentReference", master["value"]) == [doc_id]
    assert _found(world.r5, "/fhir/DocumentReference", "M-0001", FHIR_R5) == [doc_id]
    # A conditional create naming it answers this document.
    again = world.r4.post(
        "/fhir/DocumentReference",
        document,
        **{"If-None-Exist": f"identifier={master['system']}|{master['value']}"},
    )
    assert again.status_code == 200, again.content
    assert body(again)["id"] == doc_id
    assert Attachment.objects.count() == 1


@pytest.mark.parametrize(
    ("version", "name"),
    [
        ("4.0", "R4/Communication-example.json"),
        ("5.0", "R5/communication-example.json"),
        ("4.0", "R4/DocumentReference-example.json"),
        ("5.0", "R5/documentreference-example.json"),
    ],
)
def test_an_adapted_official_example_reads_back_its_identifiers(
    world: World, version: str, name: str
) -> None:
    """The official examples, fitted to a referral (its Task, our text / an inline file):
    what they identify themselves by reads back equal, in the version sent."""
    task_id = accepted(world)
    example = json.loads((FHIR_EXAMPLES / name).read_text())
    media = FHIR_R5 if version == "5.0" else FHIR_R4
    client = world.r4 if example["resourceType"] == "DocumentReference" else world.r5
    if example["resourceType"] == "Communication":
        sent = _message(task_id, *example["identifier"])
        if version == "5.0":
            sent["payload"] = [{"contentCodeableConcept": {"text": "Weight today?"}}]
    else:
        sent = case_file(task_id, "example", *example["identifier"])
        if version == "4.0":
            sent["masterIdentifier"] = example["masterIdentifier"]
        else:
            sent.pop("context")
            sent["basedOn"] = [{"reference": f"ServiceRequest/{task_id}"}]
    made = client.post(f"/fhir/{example['resourceType']}", sent, content_type=media, Accept=media)
    assert made.status_code == 201, made.content
    read = body(client.get(f"/fhir/{example['resourceType']}/{body(made)['id']}", Accept=media))
    for element in ("identifier", "masterIdentifier"):
        assert read.get(element) == sent.get(element), element
