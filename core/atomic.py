"""One savepoint per unit of work instead of one per nested block.

Each ``transaction.atomic()`` nested in another costs two round trips (SAVEPOINT, RELEASE).
An intake batch applies each job in a savepoint of its own (``unit_atomic``), and the job's
work opens its own all-or-nothing block right inside it (``atomic_in_unit``): that second
savepoint adds nothing, because an error in it always leaves the unit too, whose savepoint
then rolls back the job's writes.

Contract of ``unit_atomic``: the code directly inside it lets every exception out of the
unit (it may catch one only within an ``atomic`` block of its own). If it caught one and
went on, the next query is refused (Django's ``TransactionManagementError``; also for the
prepared statements of ``core.rows``), and so is the unit's end if no query came: loud,
never a job answered as applied whose writes were rolled back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from django.db import connection, transaction
from django.db.transaction import TransactionManagementError

# How many atomic blocks were open just inside the innermost unit (None: no unit).
_unit_depth: ContextVar[int | None] = ContextVar("unit_depth", default=None)


@contextmanager
def unit_atomic() -> Iterator[None]:
    """``transaction.atomic()`` (a savepoint when nested) whose errors always leave it."""
    with transaction.atomic():
        token = _unit_depth.set(len(connection.atomic_blocks))
        try:
            yield
        finally:
            _unit_depth.reset(token)
        if connection.needs_rollback:  # an error was caught inside and the unit went on
            raise TransactionManagementError(
                "An error inside this unit of work was caught and the unit went on; its "
                "writes are rolled back (core.atomic)."
            )


def atomic_in_unit() -> transaction.Atomic:
    """``transaction.atomic()``; without a savepoint of its own when it opens directly
    inside a ``unit_atomic`` (no other block between them), which rolls back for it."""
    directly = _unit_depth.get() == len(connection.atomic_blocks)
    return transaction.atomic(savepoint=not directly)
