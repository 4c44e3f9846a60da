"""Intake, scope and race safety."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext

from core.errors import ApplicationError, Conflict, NotFound, PermissionDenied
from referrals import selectors, services
from referrals.attachments import attachment_upload
from referrals.models import Priority, Referral, ReferralEvent, ReferralState
from referrals.tests.conftest import World


def test_submit_creates_a_submitted_referral_with_deadline_and_event(world: World) -> None:
    referral, created = services.referral_submit(
        actor=world.referrer,
        requester_facility=world.district,
        placer_system="urn:his",
        placer_value="A1",
        specialty=world.paeds,
        clinical_question="Rash",
        priority=Priority.URGENT,
        department=world.hub_paeds,
    )
    assert created
    assert (referral.state, referral.version) == ("submitted", 1)
    assert referral.filler_id.startswith("CSL-")
    # urgent caps the department's 48 h SLA at 24 h
    assert referral.deadline is not None
    assert (referral.deadline - referral.created_at).total_seconds() == 24 * 3600
    event = ReferralEvent.objects.get(referral=referral)
    assert (event.seq, event.action, event.from_state, event.to_state) == (
        1,
        "submit",
        "draft",
        "submitted",
    )


def test_resubmission_returns_the_existing_referral(world: World) -> None:
    first = world.submit(placer_value="SAME")
    again, created = services.referral_submit(
        actor=world.referrer,
        requester_facility=world.district,
        placer_system="urn:district-his",
        placer_value="SAME",
        specialty=world.paeds,
        clinical_question="different text, same order",
    )
    assert not created
    assert again.pk == first.pk
    assert Referral.objects.filter(placer_value="SAME").count() == 1
    assert ReferralEvent.objects.filter(referral=first).count() == 1


def test_same_placer_id_from_another_facility_is_another_referral(world: World) -> None:
    world.submit(placer_value="SAME")
    other = world.submit(
        placer_value="SAME", actor=world.foreign_referrer, requester_facility=world.foreign_district
    )
    assert other.requester_facility == world.foreign_district
    assert Referral.objects.filter(placer_value="SAME").count() == 2


def test_submit_for_another_facility_is_refused(world: World) -> None:
    with pytest.raises(PermissionDenied):
        world.submit(actor=world.foreign_referrer)
    with pytest.raises(PermissionDenied):
        world.submit(actor=world.ministry)
    assert Referral.objects.count() == 0


@pytest.mark.parametrize("field", ["placer_system", "placer_value"])
def test_a_placer_identifier_longer_than_stored_is_refused(world: World, field: str) -> None:
    with pytest.raises(ApplicationError, match="at most 255"):
        overrides: dict[str, Any] = {field: "x" * 256}
        world.submit(**overrides)
    assert Referral.objects.count() == 0


def test_transition_inputs_the_database_cannot_store_are_refused(world: World) -> None:
    """A NUL in a text, a URL longer than the column: refused as input (400), nothing
    changed, instead of failing in the database."""
    referral = world.submit()
    before = (referral.state, referral.version)
    with pytest.raises(ApplicationError) as nul:
        world.act(referral, "decline", note="no\x00thanks")
    assert nul.value.extra["errors"] == {"note": "a text without NUL characters"}
    referral.refresh_from_db()
    assert (referral.state, referral.version) == before
    accepted = world.referral_in(ReferralState.ACCEPTED)
    with pytest.raises(ApplicationError) as long_url:
        world.act(accepted, "schedule", video_url="https://meet.example.org/" + "r" * 600)
    assert long_url.value.extra["errors"] == {
        "video_url": "an http(s) URL of at most 500 characters"
    }
    accepted.refresh_from_db()
    assert accepted.state == ReferralState.ACCEPTED


def test_submit_to_a_department_of_another_specialty_is_refused(world: World) -> None:
    from registry.models import Specialty

    cardio = Specialty.objects.create(code="394579002", display="Cardiology")
    with pytest.raises(ApplicationError):
        world.submit(specialty=cardio)
    assert Referral.objects.count() == 0


def test_submit_to_a_closed_department_is_a_conflict(world: World) -> None:
    world.hub_paeds.accepting = False
    world.hub_paeds.save()
    with pytest.raises(Conflict):
        world.submit()


def test_draft_then_submit(world: World) -> None:
    referral = world.submit(draft=True)
    assert (referral.state, referral.version, referral.deadline) == ("draft", 0, None)
    referral = world.act(referral, "submit")
    assert (referral.state, referral.version) == ("submitted", 1)
    assert referral.deadline is not None


# --- scope -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "visible"),
    [
        ("referrer", True),
        ("consultant", True),
        ("foreign_referrer", False),
        ("consultant2", False),
        ("ministry", False),
        ("ministry_at_hub", False),
        ("district_consultant", True),  # staff of the requesting facility
    ],
)
def test_referral_get_for_user_scope(world: World, who: str, visible: bool) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    user = getattr(world, who)
    if visible:
        assert selectors.referral_get_for_user(user, referral.pk).pk == referral.pk
    else:
        with pytest.raises(NotFound):
            selectors.referral_get_for_user(user, referral.pk)


@pytest.mark.parametrize("who", ["foreign_referrer", "consultant2", "ministry", "ministry_at_hub"])
def test_acting_outside_ones_scope_is_not_found(world: World, who: str) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    with pytest.raises(NotFound):
        services.referral_transition(
            actor=getattr(world, who), referral_id=referral.pk, action="accept"
        )
    assert Referral.objects.get(pk=referral.pk).state == "submitted"


def test_bad_ids_are_not_found(world: World) -> None:
    for bad in ("abc", None, 999999):
        with pytest.raises(NotFound):
            selectors.referral_get_for_user(world.referrer, bad)


def test_worklist_order_and_scope(world: World) -> None:
    routine = world.submit(priority=Priority.ROUTINE)
    stat = world.submit(priority=Priority.STAT)
    urgent = world.submit(priority=Priority.URGENT)
    asap = world.submit(priority=Priority.ASAP)
    declined = world.referral_in(ReferralState.DECLINED)
    rows = list(selectors.referral_worklist(world.consultant, world.hub_paeds))
    assert [r.pk for r in rows] == [stat.pk, asap.pk, urgent.pk, routine.pk]
    assert declined.pk not in [r.pk for r in rows]
    with pytest.raises(NotFound):
        selectors.referral_worklist(world.consultant2, world.hub_paeds)
    with pytest.raises(NotFound):
        selectors.referral_worklist(world.ministry_at_hub, world.hub_paeds)


def test_outgoing_lists_own_facility_newest_first(world: World) -> None:
    first = world.submit()
    second = world.submit()
    world.submit(actor=world.foreign_referrer, requester_facility=world.foreign_district)
    assert [r.pk for r in selectors.referral_outgoing(world.referrer)] == [second.pk, first.pk]
    assert list(selectors.referral_outgoing(world.ministry)) == []


def _touch(rows: list[Referral]) -> list[Any]:
    return [
        (r.requester_facility.name, r.specialty.display, r.assigned_department.facility.name)
        for r in rows
        if r.assigned_department is not None
    ]


def test_worklist_query_count_does_not_grow_with_rows(world: World) -> None:
    world.submit()
    # department ids and roles are cached on the user for the request (one read for both)
    world.consultant.department_ids()
    with CaptureQueriesContext(connection) as one:
        _touch(list(selectors.referral_worklist(world.consultant)))
    for _ in range(10):
        world.submit()
    with CaptureQueriesContext(connection) as eleven:
        assert len(_touch(list(selectors.referral_worklist(world.consultant)))) == 11
    assert len(one.captured_queries) == len(eleven.captured_queries) == 1


# --- races -------------------------------------------------------------------------------


def _in_parallel(count: int, call: Callable[[], Any]) -> list[Any]:
    """``call`` from ``count`` threads released together: what each returned or raised."""
    barrier = threading.Barrier(count)
    results: list[Any] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            barrier.wait()
            result = call()
        except Exception as exc:  # noqa: BLE001  # reported in the results, not hung
            result = exc
        finally:
            connection.close()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.mark.django_db(transaction=True)
def test_twenty_parallel_accepts_exactly_one_wins(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)

    results = _in_parallel(
        20,
        lambda: services.referral_transition(
            actor=world.consultant, referral_id=referral.pk, action="accept"
        ),
    )

    outcomes = [
        f"conflict:{r.extra['state']}"
        if isinstance(r, Conflict)
        else (f"error:{r!r}" if isinstance(r, Exception) else "ok")
        for r in results
    ]
    assert sorted(outcomes) == ["conflict:accepted"] * 19 + ["ok"]
    referral.refresh_from_db()
    assert (referral.state, referral.version) == ("accepted", 2)
    assert ReferralEvent.objects.filter(referral=referral, action="accept").count() == 1


@pytest.mark.django_db(transaction=True)
def test_parallel_posts_of_one_message_form_post_it_once(world: World) -> None:
    referral = world.submit()

    results = _in_parallel(
        8,
        lambda: services.referral_message_post(
            actor=world.referrer, referral_id=referral.pk, text="Weight?", client_key="k"
        ),
    )

    assert sorted(created for _r, _m, created in results) == [False] * 7 + [True]
    assert list(referral.messages.values_list("text", "client_key")) == [("Weight?", "k")]


@pytest.mark.django_db(transaction=True)
def test_parallel_messages_and_files_get_distinct_numbers(world: World) -> None:
    """The referral's row lock makes "the next number" one step with the insert: eight
    writers at once take 1..8 (``referrals.numbering``), messages and files alike."""
    referral = world.submit()
    texts = iter(range(8))

    results = _in_parallel(
        8,
        lambda: services.referral_message_post(
            actor=world.referrer, referral_id=referral.pk, text=f"Note {next(texts)}"
        ),
    )
    files = iter(range(6))
    uploads = _in_parallel(
        6,
        lambda: attachment_upload(
            actor=world.referrer,
            referral_id=referral.pk,
            upload=SimpleUploadedFile(
                "x.pdf", f"%PDF-1.4 {next(files)}\n%%EOF\n".encode(), "application/pdf"
            ),
        ),
    )

    assert not [r for r in [*results, *uploads] if isinstance(r, Exception)]
    assert sorted(referral.messages.values_list("number", flat=True)) == list(range(1, 9))
    assert sorted(referral.attachments.values_list("number", flat=True)) == list(range(1, 7))


@pytest.mark.django_db(transaction=True)
def test_parallel_identical_submissions_create_one_referral(world: World) -> None:
    results = _in_parallel(
        10,
        lambda: services.referral_submit(
            actor=world.referrer,
            requester_facility=world.district,
            placer_system="urn:his",
            placer_value="RETRY-1",
            specialty=world.paeds,
            clinical_question="q",
            department=world.hub_paeds,
        ),
    )

    assert sorted(created for _referral, created in results) == [False] * 9 + [True]
    assert Referral.objects.filter(placer_value="RETRY-1").count() == 1


@pytest.mark.parametrize("year", [1899, 2099])
def test_a_birth_year_outside_1900_to_now_is_refused(world: World, year: int) -> None:
    with pytest.raises(ApplicationError, match="birth year"):
        services.referral_submit(
            actor=world.referrer,
            requester_facility=world.district,
            placer_system="urn:his",
            placer_value="Y-1",
            specialty=world.paeds,
            clinical_question="q",
            patient_birth_year=year,
        )
    assert not Referral.objects.exists()


def test_a_file_is_refused_when_the_referral_closed_while_it_was_stored(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state and the sides were checked on a row read without the lock: a cancel
    committed while the file was stored still let it in (found by review)."""
    from referrals import attachments, numbering

    referral = world.referral_in(ReferralState.ACCEPTED)
    real_lock = numbering.lock_referral

    def lock_after_a_concurrent_cancel(locked: Referral) -> Referral:
        # what another transaction committed while this one waited for the row lock
        Referral.objects.filter(pk=locked.pk).update(state=ReferralState.CANCELLED)
        return real_lock(locked)

    monkeypatch.setattr(attachments, "lock_referral", lock_after_a_concurrent_cancel)
    with pytest.raises(Conflict) as refused:
        attachment_upload(
            actor=world.referrer,
            referral_id=referral.pk,
            upload=SimpleUploadedFile("x.pdf", b"%PDF-1.4\n%%EOF\n", "application/pdf"),
        )
    assert refused.value.code == "attachments_closed"
    assert not referral.attachments.exists()
