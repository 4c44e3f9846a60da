"""Conditional create (``If-None-Exist: identifier=<system>|<value>``) of a referral's
Communications and DocumentReferences: a member retrying after a lost answer gets what its
first request made, and nothing is posted twice."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connections

from accounts.roles import Role
from fhir_gateway import referral_resources
from fhir_gateway.models import CreateKey, FhirResource, OutboxMessage
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    case_file,
    consult_note,
    member_client,
    submit,
    task_of,
    third_facility_expert,
    transaction,
    update_task,
)
from referrals.models import Attachment, Message, Referral, ReferralState
from referrals.permissions import referral_experts_grant
from referrals.services import referral_forward
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

KEY = "https://codao.example.org/sid/message|M-0001"


def _message(task_id: str, text: str = "Weight today?", *, r5: bool = False) -> dict[str, Any]:
    payload: dict[str, Any] = (
        {"contentCodeableConcept": {"text": text}} if r5 else {"contentString": text}
    )
    return {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "payload": [payload],
    }


def _post(client: FhirClient, path: str, resource: dict[str, Any], key: str | None = KEY) -> Any:
    headers = {"If-None-Exist": f"identifier={key}"} if key else {}
    return client.post(path, resource, content_type=FHIR_R4, **headers)


def _post_r5(client: FhirClient, task_id: str, header: str) -> Any:
    return client.post(
        "/fhir/Communication",
        _message(task_id, "Echocardiogram done?", r5=True),
        content_type=FHIR_R5,
        Accept=FHIR_R5,
        **{"If-None-Exist": header},
    )


def _counts() -> tuple[int, int, int, int, int]:
    return (
        Message.objects.count(),
        Attachment.objects.count(),
        FhirResource.objects.count(),
        OutboxMessage.objects.count(),
        CreateKey.objects.count(),
    )


def test_a_retried_message_answers_the_first_and_posts_nothing(world: World) -> None:
    task_id = accepted(world)
    first = _post(world.r4, "/fhir/Communication", _message(task_id))
    assert first.status_code == 201, first.content
    before = _counts()

    again = _post(world.r4, "/fhir/Communication", _message(task_id))

    assert again.status_code == 200, again.content
    assert body(again)["id"] == body(first)["id"]
    assert again["Location"] == first["Location"]
    assert _counts() == before  # no message, version, outbox message or key added
    assert Message.objects.count() == 1


def test_another_key_or_no_key_posts_a_new_message(world: World) -> None:
    task_id = accepted(world)
    first = _post(world.r4, "/fhir/Communication", _message(task_id))
    other = _post(
        world.r4,
        "/fhir/Communication",
        _message(task_id),
        key="https://codao.example.org/sid/message|M-0002",
    )
    plain = _post(world.r4, "/fhir/Communication", _message(task_id), key=None)

    assert [first.status_code, other.status_code, plain.status_code] == [201, 201, 201]
    assert len({body(r)["id"] for r in (first, other, plain)}) == 3
    assert Message.objects.count() == 3
    assert CreateKey.objects.count() == 2


def test_the_key_is_scoped_to_the_referral(world: World) -> None:
    one = accepted(world, "SR-1")
    two = accepted(world, "SR-2")

    first = _post(world.r4, "/fhir/Communication", _message(one))
    second = _post(world.r4, "/fhir/Communication", _message(two))

    assert (first.status_code, second.status_code) == (201, 201)
    assert Message.objects.filter(referral__filler_id=one).count() == 1
    assert Message.objects.filter(referral__filler_id=two).count() == 1


def test_the_first_message_is_answered_even_after_the_state_moved_on(world: World) -> None:
    """The consultant's question moved the referral to info_requested; its retry must not
    be taken for a new message (nor refused because the state changed)."""
    task_id = accepted(world)
    asked = world.r5.post(
        "/fhir/Communication",
        _message(task_id, "Echocardiogram done?", r5=True),
        content_type=FHIR_R5,
        Accept=FHIR_R5,
        **{"If-None-Exist": f"identifier={KEY}"},
    )
    assert asked.status_code == 201, asked.content
    referral = Referral.objects.get()
    assert referral.state == ReferralState.INFO_REQUESTED
    events = referral.events.count()

    again = world.r5.post(
        "/fhir/Communication",
        _message(task_id, "Echocardiogram done?", r5=True),
        content_type=FHIR_R5,
        Accept=FHIR_R5,
        **{"If-None-Exist": f"identifier={KEY}"},
    )

    assert again.status_code == 200, again.content
    assert body(again)["id"] == body(asked)["id"]
    assert referral.events.count() == events
    assert Referral.objects.get().state == ReferralState.INFO_REQUESTED


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("identifier=M-0001", "invalid"),  # no system
        ("identifier=https://codao.example.org/sid/message|", "invalid"),  # no value
        ("identifier=|M-0001", "invalid"),
        ("identifier=a|1,a|2", "invalid"),  # several
        ("identifier=a|1&identifier=a|2", "not-supported"),
        ("status=completed", "not-supported"),
        ("", None),  # an empty header is no condition: a plain create
        ("identifier=a|" + "x" * 256, "invalid"),
        ("identifier=a|1%00", "invalid"),
        ("identifier=a|id-%ff", "invalid"),  # not UTF-8: %fe and %ff were one key (U+FFFD)
    ],
)
def test_a_key_it_cannot_use_is_400_and_changes_nothing(
    world: World, header: str, code: str | None
) -> None:
    task_id = accepted(world)
    before = _counts()

    response = world.r4.post(
        "/fhir/Communication", _message(task_id), content_type=FHIR_R4, **{"If-None-Exist": header}
    )

    if code is None:
        assert response.status_code == 201, response.content
        return
    assert response.status_code == 400, response.content
    assert outcome_issue(response)["code"] == code
    assert _counts() == before


def test_a_refused_message_records_no_key(world: World) -> None:
    """A create that fails (here: the outsider may not see the referral) keeps no key, so
    the same key later makes the message."""
    task_id = accepted(world)
    refused = _post(world.other, "/fhir/Communication", _message(task_id))
    assert refused.status_code == 404, refused.content
    assert CreateKey.objects.count() == 0
    assert Message.objects.count() == 0

    made = _post(world.r4, "/fhir/Communication", _message(task_id))
    assert made.status_code == 201, made.content


def test_the_other_members_equal_key_is_another_message(world: World) -> None:
    """A key is the member's own within the referral: the other party using the same
    identifier posts its own message (found by a review: it got the first member's message
    with 200, and its own text, and the transition it meant, were dropped)."""
    task_id = accepted(world)
    first = _post(world.r4, "/fhir/Communication", _message(task_id))
    by_other = world.r5.post(
        "/fhir/Communication",
        _message(task_id, "Echocardiogram done?", r5=True),
        content_type=FHIR_R5,
        Accept=FHIR_R5,
        **{"If-None-Exist": f"identifier={KEY}"},
    )
    assert (first.status_code, by_other.status_code) == (201, 201), by_other.content
    assert body(by_other)["id"] != body(first)["id"]
    assert Message.objects.count() == 2
    assert Referral.objects.get().state == ReferralState.INFO_REQUESTED  # its request_info


def test_a_reader_who_may_not_post_learns_nothing_from_a_used_key(world: World) -> None:
    """An invited expert may read the referral but not post: with a used key it got the
    message with 200 (found by a review), telling which keys exist. It is refused as
    without the header, and nothing changes."""
    task_id = accepted(world)
    assert _post(world.r4, "/fhir/Communication", _message(task_id)).status_code == 201
    expert = third_facility_expert(world, Role.MEMBER_SYSTEM)
    referral_experts_grant(referral=Referral.objects.get(), experts=[expert])
    client = member_client(expert)
    before = _counts()

    plain = _post(client, "/fhir/Communication", _message(task_id), key=None)
    keyed = _post(client, "/fhir/Communication", _message(task_id))

    assert (plain.status_code, keyed.status_code) == (403, 403), keyed.content
    assert _counts() == before


def test_a_department_member_without_a_facility_keys_as_its_side(world: World) -> None:
    """A party through its department only (an account without a facility): its key was
    ignored, so a retry posted a second message, and a malformed key was not refused
    (found by a review). The key is its side's (the department's facility)."""
    task_id = accepted(world)
    world.consultant.facility = None
    world.consultant.save(update_fields=["facility"])
    client = member_client(world.consultant)
    before = _counts()

    bad = _post_r5(client, task_id, "identifier=a|id-%ff")
    first = _post_r5(client, task_id, f"identifier={KEY}")
    again = _post_r5(client, task_id, f"identifier={KEY}")

    assert bad.status_code == 400, bad.content
    assert (first.status_code, again.status_code) == (201, 200), again.content
    assert body(again)["id"] == body(first)["id"]
    assert Message.objects.count() == before[0] + 1
    assert CreateKey.objects.get().facility_id == world.network.hub.pk


def test_a_party_who_may_not_upload_learns_nothing_from_a_used_key(world: World) -> None:
    """A facility administrator of the requesting facility is on the requester's side but
    may not add files: 403 without the header, and it got 200 with the file for a used
    key (found by a review). Refused alike now, nothing changed."""
    task_id = accepted(world)
    assert _post(world.r4, "/fhir/DocumentReference", case_file(task_id, "echo")).status_code == 201
    admin = UserFactory.create(facility=world.network.spoke, roles=[Role.FACILITY_ADMIN])
    client = member_client(admin)
    before = _counts()

    plain = _post(client, "/fhir/DocumentReference", case_file(task_id, "echo"), key=None)
    keyed = _post(client, "/fhir/DocumentReference", case_file(task_id, "echo"))

    assert (plain.status_code, keyed.status_code) == (403, 403), keyed.content
    assert _counts() == before


def test_a_retry_after_the_case_moved_to_another_department_is_refused(world: World) -> None:
    """Access moves with the assignment: the first department's system is no longer a
    party after a forward, and its retry is refused (404) like any request of a
    non-party, not answered."""
    task_id = str(task_of(submit(world, "SR-1"))["id"])
    client = member_client(world.consultant)
    assert _post_r5(client, task_id, f"identifier={KEY}").status_code == 201
    referral_forward(
        actor=world.consultant,
        referral_id=Referral.objects.get().pk,
        department=world.network.cardiology,
        reason="wrong specialty",
    )

    again = _post_r5(client, task_id, f"identifier={KEY}")

    assert again.status_code == 404, again.content
    assert Message.objects.count() == 1


def test_a_create_refused_inside_the_key_records_no_key(world: World) -> None:
    """The refusal comes after the key was looked up (the referral is cancelled: 409):
    no key and no message are kept, and a key never stands for nothing."""
    task_id = accepted(world)
    cancelled = update_task(
        world.r4,
        task_id,
        lambda t: t.update(status="cancelled", statusReason={"text": "Patient improved"}),
    )
    assert cancelled.status_code == 200, cancelled.content
    before = _counts()

    refused = _post(world.r4, "/fhir/Communication", _message(task_id))

    assert refused.status_code == 409, refused.content
    assert _counts() == before


def test_a_retried_case_file_is_stored_once(world: World) -> None:
    task_id = accepted(world)
    first = _post(world.r4, "/fhir/DocumentReference", case_file(task_id, "echo"))
    assert first.status_code == 201, first.content
    before = _counts()
    stored = Attachment.objects.get()

    again = _post(world.r4, "/fhir/DocumentReference", case_file(task_id, "echo"))

    assert again.status_code == 200, again.content
    assert body(again)["id"] == body(first)["id"]
    assert _counts() == before
    assert Attachment.objects.get().pk == stored.pk
    storage = stored.file.storage
    folder = stored.file.name.rsplit("/", 1)[0]
    assert len(storage.listdir(folder)[1]) == 1  # no second copy of the bytes


def test_a_retried_consult_note_answers_the_note(world: World) -> None:
    task_id = accepted(world)
    client = member_client(world.consultant)
    headers = {"If-None-Exist": f"identifier={KEY}"}
    first = client.post(
        "/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5, **headers
    )
    assert first.status_code == 201, first.content
    before = _counts()

    # Without the key the same note is a second advice: refused, the case is advised.
    plain = client.post("/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5)
    again = client.post(
        "/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5, **headers
    )

    assert plain.status_code == 409, plain.content
    assert again.status_code == 200, again.content
    assert body(again)["id"] == body(first)["id"]
    assert _counts() == before
    assert Referral.objects.get().consult_notes.count() == 1


def test_if_none_exist_on_a_transaction_is_refused(world: World) -> None:
    """The header was ignored on POST /fhir; the Bundle's own request.ifNoneExist is the
    place for it."""
    response = world.r4.post(
        "/fhir",
        transaction(world),
        content_type=FHIR_R4,
        **{"If-None-Exist": "identifier=https://codao.example.org/sid/referral|SR-1"},
    )
    assert response.status_code == 400, response.content
    assert outcome_issue(response)["code"] == "not-supported"
    assert not Referral.objects.exists()


def test_the_capability_statement_declares_it(world: World) -> None:
    statement = body(world.r4.get("/fhir/metadata"))
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert resources["Communication"]["conditionalCreate"] is True
    assert resources["DocumentReference"]["conditionalCreate"] is True


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_retries_post_the_message_once(world: World, monkeypatch: Any) -> None:
    """Both requests carry the same key and arrive together; the message is posted slowly
    (the window in which both could miss the key): one posts it, the other answers it."""
    task_id = accepted(world)
    real = referral_resources.referral_message_post

    def slow(**kwargs: Any) -> Any:
        made = real(**kwargs)
        time.sleep(0.3)
        return made

    monkeypatch.setattr(referral_resources, "referral_message_post", slow)
    token_clients = [member_client(world.submitter) for _ in range(2)]
    start = threading.Barrier(2)
    answers: list[Any] = []

    def post(client: FhirClient) -> None:
        try:
            start.wait(10)
            answers.append(_post(client, "/fhir/Communication", _message(task_id)))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=post, args=(c,)) for c in token_clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(a.status_code for a in answers) == [200, 201], [a.content for a in answers]
    assert len({body(a)["id"] for a in answers}) == 1
    assert Message.objects.count() == 1
    assert CreateKey.objects.count() == 1
