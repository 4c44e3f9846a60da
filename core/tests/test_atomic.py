"""core.atomic: a block opened directly inside a unit of work shares the unit's savepoint;
anywhere else it is a plain ``transaction.atomic``."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from django.db import connection, transaction
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext

from core.atomic import atomic_in_unit, unit_atomic

pytestmark = pytest.mark.django_db


def _savepoints(queries: CaptureQueriesContext) -> int:
    return sum(q["sql"].startswith("SAVEPOINT") for q in queries.captured_queries)


class Refused(Exception):
    pass


def _names() -> set[str]:
    return set(Group.objects.values_list("name", flat=True))


def test_a_block_directly_in_a_unit_opens_no_savepoint_of_its_own() -> None:
    with CaptureQueriesContext(connection) as queries, unit_atomic(), atomic_in_unit():
        Group.objects.create(name="in")
    assert _savepoints(queries) == 1  # the unit's (the test runs in a transaction)
    with CaptureQueriesContext(connection) as plain, transaction.atomic(), transaction.atomic():
        Group.objects.create(name="plain")
    assert _savepoints(plain) == 2
    assert _names() == {"in", "plain"}


def test_an_error_in_the_block_rolls_back_the_unit_and_nothing_before_it() -> None:
    Group.objects.create(name="before")
    with pytest.raises(Refused), unit_atomic():
        Group.objects.create(name="unit")
        with atomic_in_unit():
            Group.objects.create(name="block")
            raise Refused
    assert _names() == {"before"}  # and the transaction is usable
    Group.objects.create(name="after")
    assert _names() == {"before", "after"}


def test_with_another_block_between_it_keeps_its_savepoint() -> None:
    with CaptureQueriesContext(connection) as queries, unit_atomic(), transaction.atomic():
        Group.objects.create(name="kept")
        try:
            with atomic_in_unit():
                Group.objects.create(name="undone")
                raise Refused
        except Refused:
            pass
        Group.objects.create(name="also kept")  # the middle block goes on
    assert _savepoints(queries) == 3
    assert _names() == {"kept", "also kept"}


def test_outside_a_unit_it_is_a_plain_atomic_block() -> None:
    with transaction.atomic():
        Group.objects.create(name="kept")
        try:
            with atomic_in_unit():
                Group.objects.create(name="undone")
                raise Refused
        except Refused:
            pass
        Group.objects.create(name="also kept")
    assert _names() == {"kept", "also kept"}


def test_catching_an_error_directly_in_a_unit_is_refused_loudly() -> None:
    """The unit's contract: the code directly inside lets errors out. Going on after
    catching one is refused by Django, never a half-applied unit."""
    with pytest.raises(TransactionManagementError), unit_atomic():
        try:
            with atomic_in_unit():
                Group.objects.create(name="undone")
                raise Refused
        except Refused:
            pass
        Group.objects.create(name="refused")
    assert _names() == set()


def test_a_prepared_write_after_a_caught_error_is_refused_loudly() -> None:
    """Found by a review: core.rows' prepared statements skipped Django's check, so a
    write after a caught error went through (and vanished with the unit)."""
    from core.rows import insert_rows
    from fhir_gateway.models import FeedEvent

    with pytest.raises(TransactionManagementError), unit_atomic():
        try:
            with atomic_in_unit():
                Group.objects.create(name="undone")
                raise Refused
        except Refused:
            pass
        insert_rows(
            FeedEvent,
            [{"facility_id": 1, "resource_type": "Task", "logical_id": "t", "version_id": 1}],
        )
    assert not FeedEvent.objects.exists()


def test_a_unit_that_catches_an_error_and_returns_is_refused_loudly() -> None:
    """Found by a review: with no query after the caught error, the unit ended without a
    word and its writes were rolled back silently (an intake job would have been recorded
    as applied)."""
    with pytest.raises(TransactionManagementError), unit_atomic():
        Group.objects.create(name="made before the block")
        try:
            with atomic_in_unit():
                raise Refused
        except Refused:
            pass
    assert not connection.needs_rollback  # and the transaction goes on
    assert _names() == set()
    Group.objects.create(name="after")
    assert _names() == {"after"}
