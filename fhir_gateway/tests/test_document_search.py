"""DocumentReference search by ``type`` (a consult note's LOINC 11488-4; a case file has
none) and ``date`` (when the note was written or the file stored, as rendered), R4 and
R5, in the caller's scope."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    case_file,
    consult_note,
)
from referrals.models import Attachment, ConsultNote

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
