"""DocumentReference search by ``type`` (a consult note's LOINC 11488-4; a case file's
own, when its member sent one) and ``date`` (when the note was written or the file
stored, as rendered), R4 and R5, in the caller's scope."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, tzinfo
from unittest import mock
from urllib.parse import quote

import pytest
from django.utils import timezone

from accounts.models import User
from fhir_gateway.handlers import HANDLERS
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    case_file,
    consult_note,
    task_of,
    transaction,
    update_task,
)
from referrals.models import Attachment, ConsultNote
from tests.factories import SupportLinkFactory

pytestmark = pytest.mark.django_db

LOINC = "http://loinc.org"


def _ids(client: FhirClient, query: str, accept: str = FHIR_R4) -> list[str]:
    response = client.get(f"/fhir/DocumentReference?{query}&_count=50", Accept=accept)
    assert response.status_code == 200, response.content
    return sorted(e["resource"]["id"] for e in body(response).get("entry", []))


def _documents(world: World) -> tuple[str, str, str, str]:
    """A case file and a consult note on one referral, a case file on another: ids, and
    the first referral's Task id."""
    task_id = accepted(world, "SR-1")
    other_task = accepted(world, "SR-2")
    made = world.r4.post("/fhir/DocumentReference", case_file(task_id, "a"))
    assert made.status_code == 201, made.content
    note = world.r5.post(
        "/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5, Accept=FHIR_R5
    )
    assert note.status_code == 201, note.content
    other = world.r4.post("/fhir/DocumentReference", case_file(other_task, "b"))
    assert other.status_code == 201, other.content
    return body(made)["id"], body(note)["id"], body(other)["id"], task_id


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5], ids=["R4", "R5"])
def test_type_finds_the_consult_notes(world: World, accept: str) -> None:
    file_id, note_id, _other, _ = _documents(world)
    client = world.r4 if accept == FHIR_R4 else world.r5
    note_type = body(client.get(f"/fhir/DocumentReference/{note_id}", Accept=accept))["type"]
    assert note_type["coding"][0]["code"] == "11488-4"  # what the search names
    assert "type" not in body(client.get(f"/fhir/DocumentReference/{file_id}", Accept=accept))
    assert _ids(client, "type=11488-4", accept) == [note_id]
    assert _ids(client, f"type={quote(LOINC)}|11488-4", accept) == [note_id]
    assert _ids(client, f"type={quote(LOINC)}|", accept) == [note_id]
    assert _ids(client, "type=http://snomed.info/sct|11488-4", accept) == []
    assert _ids(client, "type=|11488-4", accept) == []  # LOINC's code has a system
    assert _ids(client, "type=34133-9", accept) == []  # no document has that type
    assert _ids(client, "type=34133-9,11488-4", accept) == [note_id]


def test_type_not_finds_the_documents_without_that_type(world: World) -> None:
    file_id, note_id, other_id, task_id = _documents(world)
    assert _ids(world.r4, "type:not=11488-4") == sorted([file_id, other_id])
    assert _ids(world.r4, "type:not=34133-9") == sorted([file_id, note_id, other_id])
    assert _ids(world.r4, f"type:not=11488-4&related=ServiceRequest/{task_id}") == [file_id]
    assert _ids(world.r4, "type=11488-4&type:not=11488-4") == []


def test_type_and_date_keep_to_the_callers_scope(world: World) -> None:
    _documents(world)
    assert _ids(world.other, "type=11488-4") == []
    assert _ids(world.other, "type:not=11488-4") == []
    assert _ids(world.other, "date=ge1900-01-01") == []


def _pin(model: type[ConsultNote] | type[Attachment], field: str, moment: datetime) -> None:
    assert model.objects.update(**{field: moment}) == 1


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5], ids=["R4", "R5"])
def test_date_compares_what_the_resource_shows(world: World, accept: str) -> None:
    task_id = accepted(world, "SR-1")
    made = world.r4.post("/fhir/DocumentReference", case_file(task_id, "a"))
    assert made.status_code == 201, made.content
    file_id = body(made)["id"]
    note_id = body(
        world.r5.post(
            "/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5, Accept=FHIR_R5
        )
    )["id"]
    # Microseconds in the database; the resources show milliseconds.
    _pin(Attachment, "created", datetime(2026, 3, 4, 10, 0, 0, 123456, tzinfo=UTC))
    _pin(ConsultNote, "created_at", datetime(2026, 3, 5, 8, 30, 0, 999999, tzinfo=UTC))
    client = world.r4 if accept == FHIR_R4 else world.r5
    # The search reads the rows the documents were made from (their stored renderings
    # keep the dates of their creation; test_date_is_the_rendered_date ties the two).
    assert _ids(client, "date=2026-03-04", accept) == [file_id]
    assert _ids(client, "date=2026-03-05", accept) == [note_id]
    assert _ids(client, "date=2026-03", accept) == sorted([file_id, note_id])
    shown = "2026-03-04T10:00:00.123Z"
    assert _ids(client, f"date={shown}", accept) == [file_id]
    assert _ids(client, f"date=eq{shown}", accept) == [file_id]
    assert _ids(client, f"date=gt{shown}", accept) == [note_id]
    assert _ids(client, f"date=ge{shown}", accept) == sorted([file_id, note_id])
    assert _ids(client, f"date=lt{shown}", accept) == []
    assert _ids(client, f"date=le{shown}", accept) == [file_id]
    assert _ids(client, "date=2026-03-04T10:00:00.124Z", accept) == []
    # Finer than a millisecond: the millisecond it falls in, which the resource shows
    assert _ids(client, "date=2026-03-04T10:00:00.123000Z", accept) == [file_id]
    assert _ids(client, "date=2026-03-05T08:30:00.999Z", accept) == [note_id]
    assert _ids(client, "date=2026-03-05T15:30:00.999%2B07:00", accept) == [note_id]
    assert _ids(client, "date=lt2026-03-05&date=ge2026-03-04", accept) == [file_id]  # AND
    assert _ids(client, "date=2026-03-04,2026-03-05", accept) == sorted([file_id, note_id])
    assert _ids(client, "date=gt2026-03-05", accept) == []


def test_date_is_the_rendered_date(world: World) -> None:
    """The value searched is the one each document carries in ``date``."""
    file_id, note_id, other_id, _ = _documents(world)
    for logical_id in (file_id, note_id, other_id):
        shown = body(world.r4.get(f"/fhir/DocumentReference/{logical_id}"))["date"]
        assert logical_id in _ids(world.r4, f"date={quote(shown)}")
        later = datetime.fromisoformat(shown.replace("Z", "+00:00")) + timedelta(milliseconds=1)
        stamp = later.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert logical_id not in _ids(world.r4, f"date=ge{quote(stamp)}")
        assert logical_id in _ids(world.r4, f"date=lt{quote(stamp)}")


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("date=2026-13-01", 400),
        ("date=yesterday", 400),
        ("date=sa2026-01-01", 400),
        ("date=2026-01-01T10:00:00%2B15:00", 400),  # beyond FHIR's ±14:00
        ("date=0999-01-01", 400),  # before the years searched
        ("type:text=consult", 400),
        ("type=11488-4%00", 400),
        ("date:missing=true", 400),
        ("date=ne2026-01-01", 400),  # prefixes the other date parameters refuse too
        ("date=ap2026-01-01", 400),
        ("date=eb2026-01-01", 400),
        ("date=2026-01-01%00", 400),
        ("date=2026-02-30", 400),
        ("date=ge", 400),
        ("date=,", 400),
        ("date:exact=2026", 400),
        ("type:missing=true", 400),
        ("type:above=11488-4", 400),
        ("type:not=11488-4%00", 400),
    ],
)
def test_bad_values_are_refused(world: World, query: str, status: int) -> None:
    response = world.r4.get(f"/fhir/DocumentReference?{query}")
    assert response.status_code == status, response.content
    assert outcome_issue(response)["severity"] == "error"


def test_the_capability_statement_names_both(world: World) -> None:
    statement = body(world.r4.get("/fhir/metadata"))
    (resource,) = (r for r in statement["rest"][0]["resource"] if r["type"] == "DocumentReference")
    params = {p["name"]: p for p in resource["searchParam"]}
    assert params["type"]["type"] == "token"
    assert params["type"]["documentation"].endswith("Modifiers: :not.")
    assert params["date"]["type"] == "date"


def test_the_r5_capability_statement_names_both(world: World) -> None:
    statement = body(world.r5.get("/fhir/metadata", Accept=FHIR_R5))
    (resource,) = (r for r in statement["rest"][0]["resource"] if r["type"] == "DocumentReference")
    params = {p["name"]: p for p in resource["searchParam"]}
    assert params["type"]["type"] == "token"
    assert params["type"]["documentation"].endswith("Modifiers: :not.")
    assert params["date"]["type"] == "date"
    assert "Modifiers" not in params["date"]["documentation"]  # date:missing etc. are 400


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5], ids=["R4", "R5"])
def test_type_search_agrees_with_the_rendered_type(world: World, accept: str) -> None:
    """Every document the caller sees is found by ``type`` exactly when it shows
    LOINC 11488-4, and by ``type:not`` exactly when it does not."""
    _documents(world)
    client = world.r4 if accept == FHIR_R4 else world.r5
    seen = _ids(client, "_id:not=none", accept)
    assert len(seen) == 3
    typed = set(_ids(client, "type=11488-4", accept))
    untyped = set(_ids(client, "type:not=11488-4", accept))
    for logical_id in seen:
        shown = body(client.get(f"/fhir/DocumentReference/{logical_id}", Accept=accept))
        codings = {(c["system"], c["code"]) for c in shown.get("type", {}).get("coding", [])}
        assert (logical_id in typed) == ((LOINC, "11488-4") in codings), logical_id
        assert (logical_id in untyped) == (logical_id not in typed), logical_id


def test_type_not_names_none_of_its_values(world: World) -> None:
    file_id, note_id, other_id, _ = _documents(world)
    files = sorted([file_id, other_id])
    assert _ids(world.r4, "type:not=34133-9,11488-4") == files  # none of them
    assert _ids(world.r4, f"type:not={quote(LOINC)}|") == files  # no LOINC type at all
    # Another system's 11488-4 is not the notes' type: it excludes nothing.
    assert _ids(world.r4, "type:not=http://snomed.info/sct|11488-4") == sorted(
        [file_id, note_id, other_id]
    )
    assert _ids(world.r4, "type:not=|11488-4") == sorted([file_id, note_id, other_id])


def test_type_and_date_with_based_on_in_r5(world: World) -> None:
    file_id, note_id, other_id, task_id = _documents(world)
    (other_task,) = (t for t in _task_ids(world) if t != task_id)  # the second referral
    mine, theirs = f"based-on=ServiceRequest/{task_id}", f"based-on=ServiceRequest/{other_task}"
    assert _ids(world.r5, f"type=11488-4&{mine}", FHIR_R5) == [note_id]
    assert _ids(world.r5, f"type=11488-4&{theirs}", FHIR_R5) == []
    assert _ids(world.r5, f"type:not=11488-4&{mine}", FHIR_R5) == [file_id]
    assert _ids(world.r5, f"date=ge2000-01-01&{theirs}", FHIR_R5) == [other_id]
    assert _ids(world.r5, f"date=lt2000-01-01&{mine}", FHIR_R5) == []
    assert _ids(world.r4, f"date=ge2000-01-01&related=ServiceRequest/{task_id}") == sorted(
        [file_id, note_id]
    )


def _task_ids(world: World) -> list[str]:
    """The spoke's referrals: their Task ids (their ServiceRequests' too)."""
    found = body(world.r4.get("/fhir/Task?_count=50"))
    return sorted(e["resource"]["id"] for e in found.get("entry", []))


def test_a_facility_finds_only_its_own_documents(world: World) -> None:
    """Another facility's referral to the same hub, with a case file and a consult note:
    each sender finds its own documents by type and date, never the other's; the hub,
    party to both, finds both."""
    # Lao may refer to the hub too; linked before any submission, as routing holds the
    # support links in memory for REFERRAL_ROUTING_CACHE_SECONDS.
    SupportLinkFactory.create(
        hub=world.network.hub,
        spoke=world.network.lao,
        specialties=[world.network.pediatrics.specialty],
        agreement_reference="MoU VN-LA 2024/7",
    )
    file_id, note_id, other_id, task_id = _documents(world)
    lao = f"Organization/{world.network.lao.pk}"
    submission = transaction(world, "L-1", requester=lao)
    submission["entry"][2]["resource"]["requester"] = {"reference": lao}  # the Task's
    response = world.other.post("/fhir", submission, content_type=FHIR_R4)
    assert response.status_code == 200, response.content
    lao_task = str(task_of(body(response))["id"])
    accept = update_task(world.r5, lao_task, lambda t: t.update(status="accepted"), FHIR_R5)
    assert accept.status_code == 200, accept.content
    made = world.other.post("/fhir/DocumentReference", case_file(lao_task, "l"))
    assert made.status_code == 201, made.content
    lao_file = body(made)["id"]
    note = world.r5.post(
        "/fhir/DocumentReference", consult_note(lao_task), content_type=FHIR_R5, Accept=FHIR_R5
    )
    assert note.status_code == 201, note.content
    lao_note = body(note)["id"]

    assert _ids(world.other, "type=11488-4") == [lao_note]
    assert _ids(world.other, "type:not=11488-4") == [lao_file]
    assert _ids(world.other, "date=ge2000-01-01") == sorted([lao_file, lao_note])
    assert _ids(world.other, f"type:not=11488-4&related=ServiceRequest/{task_id}") == []
    assert _ids(world.other, f"date=ge2000-01-01&related=ServiceRequest/{task_id}") == []
    assert _ids(world.r4, "type=11488-4") == [note_id]
    assert _ids(world.r4, "type:not=11488-4") == sorted([file_id, other_id])
    assert _ids(world.r4, "date=ge2000-01-01") == sorted([file_id, note_id, other_id])
    assert _ids(world.r5, "type=11488-4", FHIR_R5) == sorted([note_id, lao_note])
    assert _ids(world.r5, "type:not=11488-4", FHIR_R5) == sorted([file_id, other_id, lao_file])


def test_type_and_date_are_answered_by_the_orm(world: World) -> None:
    """The hand-written worklist SQL cannot state them: it declines (None) and the ORM
    search, which reads the documents' own rows, answers."""
    _documents(world)
    handler = HANDLERS["DocumentReference"]
    assert handler.search_sql is not None and handler.search is not None
    user = User.objects.get(pk=world.submitter.pk)
    for params in (
        {"type": ["11488-4"]},
        {"type:not": ["11488-4"]},
        {"date": ["ge2000-01-01"]},
        {"type": ["11488-4"], "related": ["ServiceRequest/x"]},
    ):
        assert handler.search_sql(user, params) is None, params
    assert handler.search(user, {"type": ["11488-4"]}).count() == 1
    assert handler.search(user, {"type:not": ["11488-4"]}).count() == 2
    assert handler.search(user, {"date": ["ge2000-01-01"]}).count() == 3


@contextmanager
def _clock_at(moment: datetime) -> Iterator[None]:
    """``timezone.now()`` is ``moment`` (the rows' defaults and the stored versions'
    lastUpdated read it)."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return moment.astimezone(tz) if tz is not None else moment.replace(tzinfo=None)

    with mock.patch("django.utils.timezone.datetime", Frozen):
        yield


def _shown_ms(moment: datetime) -> str:
    """``moment`` as an instant renders: its millisecond, truncated."""
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5], ids=["R4", "R5"])
def test_the_rendered_date_at_the_millisecond_edge(world: World, accept: str) -> None:
    """Documents made when the clock had microseconds past the millisecond (as it almost
    always has): the date they show, to the millisecond, is what eq finds and gt/lt
    exclude; a search value finer than a millisecond is the millisecond it falls in."""
    task_id = accepted(world, "SR-1")
    base = (timezone.now() + timedelta(hours=1)).astimezone(UTC)
    file_at = base.replace(microsecond=123456)
    note_at = base.replace(microsecond=999999) + timedelta(seconds=1)
    with _clock_at(file_at):
        made = world.r4.post("/fhir/DocumentReference", case_file(task_id, "a"))
    assert made.status_code == 201, made.content
    with _clock_at(note_at):
        note = world.r5.post(
            "/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5, Accept=FHIR_R5
        )
    assert note.status_code == 201, note.content
    file_id, note_id = body(made)["id"], body(note)["id"]
    assert Attachment.objects.get().created == file_at  # microseconds in the database
    assert ConsultNote.objects.get().created_at == note_at
    client = world.r4 if accept == FHIR_R4 else world.r5

    for logical_id, moment in ((file_id, file_at), (note_id, note_at)):
        resource = body(client.get(f"/fhir/DocumentReference/{logical_id}", Accept=accept))
        shown = resource["date"]
        assert shown == _shown_ms(moment)  # truncated: .999999 shows .999, not the next second
        at, after = quote(shown), quote(_shown_ms(moment + timedelta(milliseconds=1)))
        before = quote(_shown_ms(moment - timedelta(milliseconds=1)))
        assert logical_id in _ids(client, f"date={at}", accept)
        assert logical_id in _ids(client, f"date=eq{at}", accept)
        assert logical_id in _ids(client, f"date=ge{at}", accept)
        assert logical_id in _ids(client, f"date=le{at}", accept)
        assert logical_id not in _ids(client, f"date=gt{at}", accept)
        assert logical_id not in _ids(client, f"date=lt{at}", accept)
        assert logical_id not in _ids(client, f"date=eq{after}", accept)
        assert logical_id not in _ids(client, f"date=eq{before}", accept)
        assert logical_id in _ids(client, f"date=lt{after}", accept)
        assert logical_id in _ids(client, f"date=gt{before}", accept)
        # Finer than the millisecond shown: that millisecond, whatever the digits after.
        for digits in ("000", "456", "999"):
            finer = quote(shown.replace("Z", f"{digits}Z"))
            assert logical_id in _ids(client, f"date={finer}", accept), finer
            assert logical_id not in _ids(client, f"date=gt{finer}", accept), finer
        # meta.lastUpdated, in milliseconds too, the same way (_lastUpdated).
        updated = quote(resource["meta"]["lastUpdated"])
        assert logical_id in _ids(client, f"_lastUpdated={updated}", accept)
        assert logical_id not in _ids(client, f"_lastUpdated=gt{updated}", accept)
        finer = quote(resource["meta"]["lastUpdated"].replace("Z", "999Z"))
        assert logical_id in _ids(client, f"_lastUpdated={finer}", accept)
    assert _ids(client, f"date={quote(_shown_ms(file_at))}", accept) == [file_id]
    assert _ids(client, f"date=gt{quote(_shown_ms(file_at))}", accept) == [note_id]
    assert _ids(client, f"date=lt{quote(_shown_ms(note_at))}", accept) == [file_id]


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5], ids=["R4", "R5"])
def test_a_case_files_sent_type_is_kept_so_searched(world: World, accept: str) -> None:
    """The type search's premise, from the write side: a case file sent with a type of its
    own (a discharge summary, LOINC 18842-5) shows it, so ``type`` finds it and
    ``type:not`` of that type leaves it out (test_case_file_type.py has the rest)."""
    task_id = accepted(world, "SR-1")
    sent = {**case_file(task_id, "a"), "type": {"coding": [{"system": LOINC, "code": "18842-5"}]}}
    made = world.r4.post("/fhir/DocumentReference", sent)
    assert made.status_code == 201, made.content
    file_id = body(made)["id"]
    client = world.r4 if accept == FHIR_R4 else world.r5
    shown = body(client.get(f"/fhir/DocumentReference/{file_id}", Accept=accept))
    assert shown["type"] == sent["type"]
    assert _ids(client, "type=18842-5", accept) == [file_id]
    assert _ids(client, f"type={quote(LOINC)}|18842-5", accept) == [file_id]
    assert _ids(client, "type:not=18842-5", accept) == []
    assert _ids(client, "type:not=11488-4", accept) == [file_id]


def test_paging_keeps_type_not_and_date(world: World) -> None:
    """The ``next`` link carries ``type:not`` and ``date``: the second page is the rest of
    the same search, not of every document."""
    file_id, _note_id, other_id, _ = _documents(world)
    first = body(world.r4.get("/fhir/DocumentReference?type:not=11488-4&date=ge2000-01&_count=1"))
    assert first["total"] == 2
    (next_url,) = (link["url"] for link in first["link"] if link["relation"] == "next")
    second = body(world.r4.get(next_url))
    ids = [e["resource"]["id"] for page in (first, second) for e in page["entry"]]
    assert sorted(ids) == sorted([file_id, other_id])
    assert not [link for link in second["link"] if link["relation"] == "next"]
