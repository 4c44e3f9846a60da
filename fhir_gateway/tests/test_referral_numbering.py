"""A referral's messages, consult notes and case files are numbered within the referral
(``referrals.numbering``): their FHIR ids tell a member nothing of the network's volumes,
and ids sent before the numbering keep naming the same resources."""

from __future__ import annotations

import importlib

import pytest
from django.db import connection, migrations

from fhir_gateway.tests.conftest import FHIR_R5
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    case_file,
    consult_note,
    message,
    read_task,
)
from referrals.models import Attachment, ConsultNote, Message

pytestmark = pytest.mark.django_db


def _post_message(world: World, task_id: str, text: str, answers: str | None = None) -> str:
    response = world.r4.post("/fhir/Communication", message(task_id, text, answers))
    assert response.status_code == 201, response.content
    return str(body(response)["id"])


def test_each_referral_numbers_its_own_messages_from_one(world: World) -> None:
    first, second = accepted(world, "SR-1"), accepted(world, "SR-2")
    assert [_post_message(world, first, t) for t in ("a", "b")] == [
        f"{first}-msg-1",
        f"{first}-msg-2",
    ]
    # The second referral starts again at 1: its id says nothing of the first's messages.
    assert _post_message(world, second, "c") == f"{second}-msg-1"
    assert Message.objects.count() == 3
    assert world.r4.get(f"/fhir/Communication/{second}-msg-1").status_code == 200
    assert world.r4.get(f"/fhir/Communication/{second}-msg-2").status_code == 404


def test_an_answer_names_the_message_it_answers_by_its_number(world: World) -> None:
    first, second = accepted(world, "SR-1"), accepted(world, "SR-2")
    _post_message(world, first, "a")
    _post_message(world, first, "b")
    asked = _post_message(world, second, "question")
    answer = _post_message(world, second, "answer", f"Communication/{asked}")
    read = body(world.r4.get(f"/fhir/Communication/{answer}"))
    assert read["inResponseTo"] == [{"reference": f"Communication/{asked}"}]
    stored = Message.objects.get(referral__filler_id=second, number=2)
    assert stored.in_response_to == Message.objects.get(referral__filler_id=second, number=1)


def test_an_answer_to_a_number_the_referral_does_not_have_is_refused(world: World) -> None:
    first, second = accepted(world, "SR-1"), accepted(world, "SR-2")
    _post_message(world, first, "a")
    _post_message(world, first, "b")
    before = list(Message.objects.values_list("pk", flat=True))
    # ``-msg-2`` exists on the first referral only.
    response = world.r4.post(
        "/fhir/Communication", message(second, "answer", f"Communication/{second}-msg-2")
    )
    assert response.status_code == 422, response.content
    assert list(Message.objects.values_list("pk", flat=True)) == before


def test_consult_notes_and_case_files_are_numbered_per_referral(world: World) -> None:
    first, second = accepted(world, "SR-1"), accepted(world, "SR-2")
    for task_id in (first, second):
        for label in ("x", "y"):
            response = world.r4.post("/fhir/DocumentReference", case_file(task_id, label))
            assert response.status_code == 201, response.content
    assert sorted(Attachment.objects.values_list("referral__filler_id", "number")) == sorted(
        [(first, 1), (first, 2), (second, 1), (second, 2)]
    )
    binary = world.r4.get(f"/fhir/Binary/{second}-att-2")
    assert binary.status_code == 200
    assert b"%PDF-1.4 y" in b"".join(binary.streaming_content)
    note = world.r5.post(
        "/fhir/DocumentReference", consult_note(second), content_type=FHIR_R5, Accept=FHIR_R5
    )
    assert note.status_code == 201, note.content
    assert body(note)["id"] == f"{second}-note-1"
    assert ConsultNote.objects.get().number == 1
    outputs = read_task(world.r4, second)["output"]
    assert outputs[0]["valueReference"] == {"reference": f"DocumentReference/{second}-note-1"}


def test_the_migration_numbers_stored_rows_by_their_database_key(world: World) -> None:
    """0010 keeps every id sent before it: a row stored before has its database key as its
    number; the referral's next row continues above it. (The suite builds its database
    without migrations, so this runs the migration's statements on rows whose numbers are
    not their keys; the whole migration was run by hand on PostgreSQL with data.)"""
    task_id = accepted(world)
    for text in ("a", "b"):
        _post_message(world, task_id, text)
    migration = importlib.import_module("referrals.migrations.0010_referral_numbering")
    statements = [
        str(op.sql) for op in migration.Migration.operations if isinstance(op, migrations.RunSQL)
    ]
    assert len(statements) == 3  # messages, consult notes, case files
    with connection.cursor() as cursor:  # keys far from the numbers, as on a network in use
        cursor.execute("UPDATE referrals_message SET id = id + 40, number = number + 7")
        for sql in statements:
            cursor.execute(sql)
    numbers = dict(Message.objects.values_list("pk", "number"))
    assert len(numbers) == 2 and all(pk == number for pk, number in numbers.items())
    assert _post_message(world, task_id, "c") == f"{task_id}-msg-{max(numbers) + 1}"
    answer = _post_message(world, task_id, "d", f"Communication/{task_id}-msg-{min(numbers)}")
    number = int(answer.rpartition("-")[2])
    assert Message.objects.get(number=number).in_response_to_id == min(numbers)
