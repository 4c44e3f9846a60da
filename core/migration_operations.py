"""Migration operations that keep large tables writable on PostgreSQL and still run on
SQLite (``make run``), where Django's ``AddIndexConcurrently`` / ``RemoveIndexConcurrently``
refuse to. Used by migrations that set ``atomic = False``.

A concurrent index build that stops half-way (cancelled, a lock wait) leaves an INVALID
index and the migration unrecorded; the build here makes a re-run possible: it keeps a
valid index of that name already there and drops an invalid one before building it."""

from __future__ import annotations

from typing import Any

from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations


def _on_postgres(schema_editor: Any) -> bool:
    return bool(schema_editor.connection.vendor == "postgresql")


class AddIndexConcurrentlyOnPostgres(AddIndexConcurrently):
    """``CREATE INDEX CONCURRENTLY`` on PostgreSQL (re-runnable, see the module); a plain
    index elsewhere."""

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        if not _on_postgres(schema_editor):
            migrations.AddIndex.database_forwards(
                self, app_label, schema_editor, from_state, to_state
            )
            return
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = %s",
                [self.index.name],
            )
            found = cursor.fetchone()
        if found is not None and found[0]:
            return  # built by a run that stopped later
        if found is not None:
            schema_editor.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{self.index.name}"')
        super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        if _on_postgres(schema_editor):
            super().database_backwards(app_label, schema_editor, from_state, to_state)
        else:
            migrations.AddIndex.database_backwards(
                self, app_label, schema_editor, from_state, to_state
            )


class RemoveIndexConcurrentlyOnPostgres(RemoveIndexConcurrently):
    """``DROP INDEX CONCURRENTLY IF EXISTS`` on PostgreSQL; a plain drop elsewhere."""

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        if _on_postgres(schema_editor):
            super().database_forwards(app_label, schema_editor, from_state, to_state)
        else:
            migrations.RemoveIndex.database_forwards(
                self, app_label, schema_editor, from_state, to_state
            )

    def database_backwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        if _on_postgres(schema_editor):
            super().database_backwards(app_label, schema_editor, from_state, to_state)
        else:
            migrations.RemoveIndex.database_backwards(
                self, app_label, schema_editor, from_state, to_state
            )
