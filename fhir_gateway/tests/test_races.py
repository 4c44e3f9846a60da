"""Races over the FHIR surface on PostgreSQL: two requests (or workers) acting on one
referral at once, released together by a barrier, each on its own database connection."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connections
from django.db.transaction import atomic as transaction_atomic
from django.db.transaction import on_commit as transaction_on_commit
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.roles import Role
from fhir_gateway import delivery, intake, referral_resources
from fhir_gateway import referral_mapping as m
from fhir_gateway.delivery import (
    endpoint_aggregate,
    outbox_deliver,
    outbox_drain,
    outbox_enqueue,
    outbox_prune,
    outbox_replay,
)
from fhir_gateway.intake import intake_drain
from fhir_gateway.models import IntakeJob, OutboxMessage
from fhir_gateway.storage import store_version
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient
from fhir_gateway.tests.referral_world import (
    HIS_PATIENT,
    PLACER,
    World,
    accepted,
    body,
    member_client,
    message,
    read_task,
    service_request,
    submit,
    task_input,
    transaction,
    update_task,
    with_case_file,
)
from referrals import services
from referrals.models import Attachment, Message, Referral, ReferralEvent
from tests.factories import PEDIATRICS, EndpointFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


def _together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Each call on a thread of its own, released at once: what each returned or raised,
    in the order of ``calls``."""
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            start.wait(10)
            results[index] = calls[index]()
        except Exception as exc:  # noqa: BLE001 (reported in the results, not hung)
            results[index] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _meet_after(monkeypatch: pytest.MonkeyPatch, name: str, parties: int = 2) -> None:
    """``referral_resources.<name>`` waits (at most 3 s) until ``parties`` requests reach
    it: the window in which both decided what to write widened to the whole request."""
    real = getattr(referral_resources, name)
    meeting = threading.Barrier(parties)

    def meet(*args: Any, **kwargs: Any) -> Any:
        answer = real(*args, **kwargs)
        # The other request may wait for a lock this one holds: then go on alone.
        with contextlib.suppress(threading.BrokenBarrierError):
            meeting.wait(3)
        return answer

    monkeypatch.setattr(referral_resources, name, meet)


def _pdf(text: str) -> str:
    return base64.b64encode(f"%PDF-1.4\n% {text}\n%%EOF\n".encode()).decode()


def _post(client: FhirClient, path: str, resource: dict[str, Any], **headers: str) -> Any:
    return client.post(path, resource, content_type=FHIR_R4, Accept=FHIR_R4, **headers)


def test_two_retries_of_a_bundle_adding_a_file_store_it_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The referral exists; a Bundle resent with one more case file (a client that timed
    out and sent again while the first was still being applied) arrives twice at once.
    Both matched their files against the stored ones before either stored its file: the
    file was stored twice (found by this review). One stores it, the other answers it."""
    submit(world)  # the referral, without files
    more = with_case_file(
        transaction(world), {"contentType": "application/pdf", "data": _pdf("b"), "title": "b.pdf"}
    )
    _meet_after(monkeypatch, "_resubmission_differences")
    clients = [member_client(world.submitter) for _ in range(2)]

    answers = _together([functools.partial(_post, c, "/fhir", more) for c in clients])

    assert [a.status_code for a in answers] == [200, 200], [a.content for a in answers]
    statuses = sorted(body(a)["entry"][3]["response"]["status"] for a in answers)
    assert statuses == ["200 OK", "201 Created"]
    locations = {body(a)["entry"][3]["response"]["location"] for a in answers}
    assert len(locations) == 1
    assert list(Attachment.objects.values_list("original_name", flat=True)) == ["b.pdf"]


def test_two_conditional_creates_of_one_service_request_make_one_referral(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST ServiceRequest with If-None-Exist, twice at once; the first insert is held
    open (its transaction commits only after both requests looked the identifier up)."""
    _meet_after(monkeypatch, "_if_none_exist_referral")
    resource = service_request(world, "SR-RACE", subject=HIS_PATIENT)
    clients = [member_client(world.submitter) for _ in range(2)]
    condition = {"If-None-Exist": f"identifier={PLACER}|SR-RACE"}

    answers = _together(
        [
            functools.partial(_post, c, "/fhir/ServiceRequest", resource, **condition)
            for c in clients
        ]
    )

    assert sorted(a.status_code for a in answers) == [200, 201], [a.content for a in answers]
    assert len({body(a)["id"] for a in answers}) == 1
    assert Referral.objects.filter(placer_value="SR-RACE").count() == 1
    assert ReferralEvent.objects.count() == 1


def test_a_bundle_and_its_resend_at_once_make_one_referral_and_one_file(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first submission and a resend of it (its answer lost) applied at once, each
    with a case file: one referral, one file, one 201 and one 200 for each entry."""
    bundle = with_case_file(
        transaction(world, "SR-TWICE"),
        {"contentType": "application/pdf", "data": _pdf("a"), "title": "a.pdf"},
    )
    _meet_after(monkeypatch, "_if_none_exist_referral")
    bundle["entry"][1]["request"]["ifNoneExist"] = f"identifier={PLACER}|SR-TWICE"
    clients = [member_client(world.submitter) for _ in range(2)]

    answers = _together([functools.partial(_post, c, "/fhir", bundle) for c in clients])

    assert [a.status_code for a in answers] == [200, 200], [a.content for a in answers]
    per_answer = sorted(tuple(e["response"]["status"] for e in body(a)["entry"]) for a in answers)
    assert per_answer == [("200 OK",) * 4, ("201 Created",) * 4]
    assert Referral.objects.filter(placer_value="SR-TWICE").count() == 1
    assert Attachment.objects.count() == 1


@pytest.mark.parametrize("failing", [False, True], ids=["answered", "some-fail"])
def test_two_drains_and_the_hand_offs_at_once_send_in_order_and_apply_once(
    stub_member: Any, settings: Any, failing: bool
) -> None:
    """Beat's drain in two workers at once, while two more workers run the on-commit
    hand-offs of every message (as duplicated tasks would): each aggregate's messages
    reach the member in their order (a failed one is sent again before the next), each
    is applied once, and none is sent again once it was answered."""
    settings.FHIR_OUTBOX_BACKOFF_BASE_SECONDS = 0
    settings.FHIR_OUTBOX_MAX_ATTEMPTS = 50
    answers: list[Any] = [("slow", 0.02)] * 200
    if failing:
        answers[1::4] = [500] * len(answers[1::4])  # every fourth request fails
    stub = stub_member(answers)
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    other = EndpointFactory.create(base_url=stub.base_url)
    messages: list[OutboxMessage] = []
    for subject in ("referral:1", "referral:2", "referral:3"):
        for n in range(5):
            with transaction_atomic():
                row = store_version(
                    resource_type="Communication",
                    logical_id=f"{subject.replace(':', '-')}-{n}",
                    resource={"resourceType": "Communication", "status": "completed"},
                    fhir_version="4.0",
                )
                for target in (endpoint, other):
                    messages.append(
                        outbox_enqueue(
                            endpoint=target,
                            aggregate_key=endpoint_aggregate(subject, target.pk),
                            resource_type=row.resource_type,
                            logical_id=row.logical_id,
                            version_id=row.version_id,
                            schedule=False,
                        )
                    )

    def hand_offs() -> None:
        for message in messages:
            outbox_deliver(message_id=message.pk)

    results = _together(
        [
            lambda: outbox_drain(limit=4, concurrency=2, max_batches=100),
            lambda: outbox_drain(limit=4, concurrency=2, max_batches=100),
            hand_offs,
            hand_offs,
        ]
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    for _ in range(10):  # what the others' runs left due (a failure's retry)
        if not outbox_drain(limit=50, concurrency=1).claimed:
            break

    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {"delivered"}
    by_key = {m.idempotency_key: m for m in messages}
    sent: dict[str, list[int]] = {}
    for request in stub.requests:
        message = by_key[request["key"]]
        sent.setdefault(message.aggregate_key, []).append(message.seq)
    assert len(sent) == 6
    # In order: a message is sent (again) only until it is answered, never after the next.
    assert all(seqs == sorted(seqs) for seqs in sent.values()), sent
    assert sorted(stub.applied) == sorted(by_key)
    applied: dict[str, list[int]] = {}
    for key in stub.applied:
        applied.setdefault(by_key[key].aggregate_key, []).append(by_key[key].seq)
    assert all(seqs == [1, 2, 3, 4, 5] for seqs in applied.values()), applied
    if not failing:
        assert Counter(r["key"] for r in stub.requests) == Counter(dict.fromkeys(by_key, 1))


def test_two_async_resends_adding_a_file_applied_at_once_store_it_once(
    world: World, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """The same as two synchronous retries, for ``Prefer: respond-async``: a member that
    never saw the 202 sends again, and two workers apply the two jobs at once (each in a
    batch of its own)."""
    settings.FHIR_INTAKE_BATCH = 1
    submit(world)
    more = with_case_file(
        transaction(world), {"contentType": "application/pdf", "data": _pdf("b"), "title": "b.pdf"}
    )
    for _ in range(2):
        response = world.r4.post("/fhir", more, Prefer="respond-async")
        assert response.status_code == 202, response.content
    _meet_after(monkeypatch, "_resubmission_differences")

    results = _together([intake_drain, intake_drain])

    assert results == [1, 1], results
    statuses = sorted(
        json.loads(job.result)["entry"][3]["response"]["status"] for job in IntakeJob.objects.all()
    )
    assert statuses == ["200 OK", "201 Created"]
    assert list(Attachment.objects.values_list("original_name", flat=True)) == ["b.pdf"]


@pytest.mark.parametrize("side", ["assignee", "requester"])
def test_a_communication_is_judged_by_the_state_it_meets_not_the_one_it_read(
    world: World, monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    """A Communication is a question, an answer or a plain message by the referral's state
    (docs/fhir.md). The state was read before the referral's lock: a colleague's question
    (or the requester's own answer in the web) committed in between made it a transition
    from a state the referral had left, refused 409, where either order of the two gives a
    message (found by this review). Judged on the locked row, it is a plain message."""
    task_id = accepted(world)
    referral = Referral.objects.get(filler_id=task_id)
    if side == "requester":
        services.referral_request_info(
            actor=world.consultant, referral_id=referral.pk, question="Weight?"
        )
    client = world.r5 if side == "assignee" else member_client(world.submitter)
    other_change_committed = threading.Event()
    real = referral_resources._message_post

    def after_the_other_change(*args: Any) -> Any:
        other_change_committed.wait(10)
        return real(*args)

    monkeypatch.setattr(referral_resources, "_message_post", after_the_other_change)

    def other_change() -> Referral:
        try:
            if side == "assignee":  # a colleague asks in the web
                return services.referral_request_info(
                    actor=world.consultant, referral_id=referral.pk, question="Height?"
                )
            return services.referral_provide_info(  # the requester answers in the web
                actor=world.submitter, referral_id=referral.pk, text="12 kg"
            )
        finally:
            other_change_committed.set()

    posted, changed = _together(
        [
            functools.partial(
                _post, client, "/fhir/Communication", message(task_id, "Also: no allergies.")
            ),
            other_change,
        ]
    )

    assert isinstance(changed, Referral), changed
    assert posted.status_code == 201, posted.content
    referral.refresh_from_db()
    expected = "info_requested" if side == "assignee" else "accepted"
    assert referral.state == expected
    last = Message.objects.filter(referral=referral).order_by("number").last()
    assert last is not None and last.text == "Also: no allergies."
    assert body(posted)["id"] == f"{task_id}-msg-{last.number}"


def test_a_created_service_request_is_answered_with_the_version_it_created(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer of a create was read after its commit: a cancel committed in between
    (the requester's web form, the same instant) made the 201 carry the revoked version 2
    as the one this request created (found by this review)."""
    created, cancelled = threading.Event(), threading.Event()
    real = referral_resources._submit

    def then_a_cancel(*args: Any) -> Any:
        made = real(*args)

        def committed() -> None:  # before the request reads anything for its answer
            created.set()
            cancelled.wait(10)

        transaction_on_commit(committed)
        return made

    monkeypatch.setattr(referral_resources, "_submit", then_a_cancel)

    def cancel() -> Referral:
        try:
            assert created.wait(10)
            referral = Referral.objects.get(placer_value="SR-NEW")
            return services.referral_cancel(
                actor=world.submitter, referral_id=referral.pk, reason="entered in error"
            )
        finally:
            cancelled.set()

    answer, cancelled_referral = _together(
        [
            functools.partial(
                _post,
                world.r4,
                "/fhir/ServiceRequest",
                service_request(world, "SR-NEW", subject=HIS_PATIENT),
            ),
            cancel,
        ]
    )

    assert isinstance(cancelled_referral, Referral), cancelled_referral
    assert answer.status_code == 201, answer.content
    assert answer["Location"].endswith("/_history/1")
    made = body(answer)
    assert (made["meta"]["versionId"], made["status"]) == ("1", "active")


def test_one_job_leased_by_two_workers_at_once_is_applied_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``intake_process`` takes a pending job whatever its lease (an operator's "apply
    now", a duplicated task): two workers lease the same job, and only then apply it
    (each waits for the other to have leased it). The status re-checked under the job's
    lock lets one apply it; the other finds it done."""
    response = world.r4.post("/fhir", transaction(world, "SR-ONCE"), Prefer="respond-async")
    assert response.status_code == 202, response.content
    job = IntakeJob.objects.get()
    real_claim, real_process = intake._claim, intake._process
    one_claim_at_a_time, leased = threading.Lock(), threading.Barrier(2)

    def claim_in_turn(*args: Any) -> list[IntakeJob]:  # (at once, one would skip the other)
        with one_claim_at_a_time:
            return real_claim(*args)

    def after_both_leased(jobs: list[IntakeJob]) -> list[str]:
        leased.wait(10)
        return real_process(jobs)

    monkeypatch.setattr(intake, "_claim", claim_in_turn)
    monkeypatch.setattr(intake, "_process", after_both_leased)

    outcomes = _together([functools.partial(intake.intake_process, job_id=job.pk)] * 2)

    assert sorted(outcomes) == ["done", "skipped"], outcomes
    assert Referral.objects.filter(placer_value="SR-ONCE").count() == 1
    assert ReferralEvent.objects.count() == 1
    job.refresh_from_db()
    assert (job.status, job.result_status, job.attempts) == ("done", 200, 2)  # leased twice


def test_a_keyed_file_posted_while_a_resend_stores_its_keyed_files_does_not_deadlock(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resend of a Bundle with two keyed case files (K1, K2) while the member posts the
    second file alone under K2. The Bundle took K1's lock, then the referral's (storing
    the file), then asked for K2's; the lone post took K2's, then asked for the
    referral's: PostgreSQL broke the deadlock by failing one request with a 500 (found by
    this review). Taken in one order (the referral first), one waits for the other."""
    submit(world, "SR-KEYS")
    referral = Referral.objects.get(placer_value="SR-KEYS")
    resend = transaction(world, "SR-KEYS")
    for label in ("k1", "k2"):
        with_case_file(
            resend, {"contentType": "application/pdf", "data": _pdf(label), "title": f"{label}.pdf"}
        )
        resend["entry"][-1]["request"]["ifNoneExist"] = f"identifier=urn:his:doc|{label}"
    alone = {
        "resourceType": "DocumentReference",
        "status": "current",
        "context": {"related": [{"reference": f"Task/{referral.filler_id}"}]},
        "content": [
            {
                "attachment": {
                    "contentType": "application/pdf",
                    "data": _pdf("k2"),
                    "title": "k2.pdf",
                }
            }
        ],
    }
    from referrals import attachments

    real = attachments.attachment_upload
    bundle_stored_first, alone_holds_its_key = threading.Event(), threading.Event()

    def in_turns(**kwargs: Any) -> Any:
        if threading.current_thread().name == "alone":
            alone_holds_its_key.set()  # (its key's lock is held by now)
            return real(**kwargs)
        made = real(**kwargs)
        if not bundle_stored_first.is_set():  # the Bundle holds the referral's row now
            bundle_stored_first.set()
            alone_holds_its_key.wait(3)
        return made

    monkeypatch.setattr(attachments, "attachment_upload", in_turns)

    def post_alone() -> Any:
        threading.current_thread().name = "alone"
        assert bundle_stored_first.wait(10)
        return _post(
            member_client(world.submitter),
            "/fhir/DocumentReference",
            alone,
            **{"If-None-Exist": "identifier=urn:his:doc|k2"},
        )

    bundle_answer, alone_answer = _together(
        [functools.partial(_post, member_client(world.submitter), "/fhir", resend), post_alone]
    )

    assert bundle_answer.status_code == 200, bundle_answer.content
    assert alone_answer.status_code in (200, 201), alone_answer.content
    assert sorted(Attachment.objects.values_list("original_name", flat=True)) == [
        "k1.pdf",
        "k2.pdf",
    ]


def test_a_replay_while_retention_prunes_its_message(
    stub_member: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator replays a delivered message the hourly retention is deleting at that
    moment: the replay read the message without a lock, the prune deleted it, and the
    replay's link to it failed the commit (IntegrityError, a 500 in the admin; found by
    this review). The replay holds the message: the prune skips it this time."""
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    with transaction_atomic():
        row = store_version(
            resource_type="Communication",
            logical_id="old-1",
            resource={"resourceType": "Communication", "status": "completed"},
            fhir_version="4.0",
        )
        original = outbox_enqueue(
            endpoint=endpoint,
            aggregate_key=endpoint_aggregate("referral:9", endpoint.pk),
            resource_type=row.resource_type,
            logical_id=row.logical_id,
            version_id=row.version_id,
            schedule=False,
        )
    assert outbox_deliver(message_id=original.pk) == "delivered"
    long_ago = timezone.now() - timedelta(days=60)
    OutboxMessage.objects.filter(pk=original.pk).update(created_at=long_ago, delivered_at=long_ago)
    real = delivery.outbox_enqueue
    pruned: list[Any] = []

    def while_retention_runs(**kwargs: Any) -> Any:
        prune = threading.Thread(
            target=lambda: pruned.append(
                _together([lambda: outbox_prune(before=timezone.now(), limit=10)])[0]
            )
        )
        prune.start()
        prune.join(10)
        return real(**kwargs)

    monkeypatch.setattr(delivery, "outbox_enqueue", while_retention_runs)

    (replay,) = _together([lambda: outbox_replay(message_id=original.pk)])

    assert isinstance(replay, OutboxMessage), replay
    assert pruned == [0]
    assert replay.replay_of_id == original.pk
    assert OutboxMessage.objects.filter(pk=original.pk).exists()


def test_the_same_placer_through_rest_and_fhir_at_once_makes_one_referral(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One order sent by the hospital system over FHIR (a transaction) and over REST at
    the same moment (a migration between interfaces, a retry on the other channel): one
    referral, created by one, answered to the other. The Bundle's insert is held open
    until the REST request looked the identifier up."""
    looked_up = threading.Event()
    real_submit = referral_resources._submit

    def submit_then_wait(*args: Any) -> Any:
        made = real_submit(*args)
        looked_up.wait(3)  # the REST request then waits on the unique index, not before
        return made

    monkeypatch.setattr(referral_resources, "_submit", submit_then_wait)
    from referrals import services as referral_services

    real_find = referral_services._find_existing

    def find_and_tell(*args: Any) -> Any:
        found = real_find(*args)
        if threading.current_thread().name == "rest":
            looked_up.set()
        return found

    monkeypatch.setattr(referral_services, "_find_existing", find_and_tell)
    rest = APIClient()
    rest.credentials(HTTP_AUTHORIZATION=f"Bearer {world.r4.token}")

    def over_rest() -> Any:
        threading.current_thread().name = "rest"
        return rest.post(
            "/api/v1/referrals/",
            {
                "placer_system": PLACER,
                "placer_value": "SR-BOTH",
                "specialty": PEDIATRICS,
                "clinical_question": "3-year-old, fever 5 days, rash: Kawasaki disease?",
                "department": world.network.pediatrics.pk,
            },
            format="json",
        )

    fhir, api = _together(
        [
            functools.partial(
                _post, member_client(world.submitter), "/fhir", transaction(world, "SR-BOTH")
            ),
            over_rest,
        ]
    )

    assert fhir.status_code == 200, fhir.content
    fhir_status = body(fhir)["entry"][1]["response"]["status"].split()[0]
    assert sorted([fhir_status, str(api.status_code)]) == ["200", "201"], api.content
    (referral,) = Referral.objects.filter(placer_value="SR-BOTH")
    assert api.json()["id"] == referral.pk
    assert ReferralEvent.objects.count() == 1


def _the_same_put_twice_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch, task: dict[str, Any], if_match: str
) -> list[Any]:
    """The consultant system's PUT of ``task`` sent twice at once, both past the digest of
    the body (the point a retry is recognised from) before either writes."""
    _meet_after(monkeypatch, "_update_digest")
    clients = [member_client(world.consultant) for _ in range(2)]

    def put(client: FhirClient) -> Any:
        return client.put(
            f"/fhir/Task/{task['id']}", task, content_type=FHIR_R5, Accept=FHIR_R5,
            **{"If-Match": if_match},
        )  # fmt: skip

    return _together([functools.partial(put, c) for c in clients])


def _assert_applied_once(answers: list[Any], task_id: str, events_before: int) -> None:
    """One new event and Task version; both answers that version, byte for byte."""
    assert [a.status_code for a in answers] == [200, 200], [a.content for a in answers]
    assert answers[0].content == answers[1].content
    assert ReferralEvent.objects.count() == events_before + 1
    referral = Referral.objects.get(filler_id=task_id)
    assert json.loads(answers[0].content)["meta"]["versionId"] == str(referral.version)


def test_an_accept_sent_twice_at_once_is_applied_once_and_both_get_its_answer(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consultant system that timed out sends its accept again while the first is still
    being applied: both read the same version; the second waits on the referral's lock and
    then finds the version moved. It is answered as the first was (200, the version the
    first made), not 412; one event, one new Task version."""
    task_id = str(submit(world)["entry"][2]["resource"]["id"])
    task = read_task(world.r5, task_id, FHIR_R5)
    task["status"] = "accepted"
    events_before = ReferralEvent.objects.count()

    answers = _the_same_put_twice_at_once(
        world, monkeypatch, task, f'W/"{task["meta"]["versionId"]}"'
    )

    _assert_applied_once(answers, task_id, events_before)


def test_a_reschedule_sent_twice_at_once_with_if_match_star_is_applied_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If-Match: * and a change the table allows again from the state it makes (schedule:
    scheduled -> scheduled). Both read the same version; the second waits on the referral's
    lock. It was applied a second time (another schedule event, a second new version);
    now it is answered as the first was (docs/fhir.md: "Two such requests at once")."""
    expert = UserFactory.create(facility=world.network.hub, roles=[Role.CONSULTANT])
    expert.departments.add(world.network.pediatrics)
    task_id = accepted(world)
    first_at = (timezone.now() + timedelta(days=1)).replace(microsecond=0)

    def schedule(task: dict[str, Any]) -> None:
        task["businessStatus"] = {
            "coding": [{"system": m.REFERRAL_STATE_SYSTEM, "code": "scheduled"}]
        }
        task["input"] = [
            task_input("scheduled-at", valueDateTime=first_at.isoformat()),
            task_input("experts", valueIdentifier={"system": m.USER_SYSTEM, "value": str(expert.pk)}),
            task_input("video-url", valueUrl="https://meet.example.org/room-42"),
        ]  # fmt: skip

    assert update_task(world.r5, task_id, schedule, FHIR_R5).status_code == 200
    task = read_task(world.r5, task_id, FHIR_R5)
    later = (timezone.now() + timedelta(days=3)).replace(microsecond=0)
    task["input"][0]["valueDateTime"] = later.isoformat()
    events_before = ReferralEvent.objects.count()

    answers = _the_same_put_twice_at_once(world, monkeypatch, task, "*")

    _assert_applied_once(answers, task_id, events_before)
