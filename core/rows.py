"""Row sources for list endpoints that build their output from tuples.

``django.core.paginator.Paginator`` needs ``count()`` and slicing; these give it both
without model instances: ``QueryRows`` over an ORM queryset (``values_list`` of the
columns), ``SqlRows`` over two hand-written statements (the count and the ordered page,
``LIMIT``/``OFFSET`` appended) for the few lists where the ORM's query building cost
more than the query (docs/performance.md)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from django.db import DatabaseError, connection, models
from django.db.models import QuerySet

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=models.Model)


class QueryRows:
    def __init__(self, queryset: QuerySet[Any], columns: Sequence[str]) -> None:
        self.queryset = queryset
        self.columns = tuple(columns)

    def count(self) -> int:
        return self.queryset.count()

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, window: slice) -> list[tuple[Any, ...]]:
        return list(self.queryset.values_list(*self.columns)[window])


@contextmanager
def prepared_cursor() -> Iterator[psycopg.Cursor[Any]]:
    """A psycopg server-side binding cursor on Django's connection (PostgreSQL only), with
    what Django's own cursors do first: the per-request health check (``CONN_HEALTH_CHECKS``:
    a connection the server dropped is replaced, not failed on) and its error wrapping
    (psycopg errors become ``django.db`` ones and mark the connection, so a broken one is
    closed at the end of the request)."""
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    connection.validate_no_broken_transaction()  # as Django's own cursors: core.atomic
    raw = connection.connection
    assert raw is not None
    with connection.wrap_database_errors, psycopg.Cursor(raw) as cursor:
        yield cursor


def fetch_prepared_first(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """``fetch_prepared`` for a read that is the request's first statement (bearer
    authentication): the statement is the connection's health check. Run on the kept
    connection; if that fails because the server dropped it, reconnect and run it again (a
    read, outside any transaction: safe to repeat). Either way the request's later queries
    skip Django's ``SELECT 1`` (``health_check_done``): one round trip less per request."""
    check_here = (
        connection.vendor == "postgresql"
        and connection.health_check_enabled  # type: ignore[attr-defined]
        and not connection.health_check_done  # type: ignore[attr-defined]
        and connection.connection is not None
        and not connection.in_atomic_block
    )
    assert sql.lstrip().upper().startswith("SELECT"), "only a read may be repeated"
    if check_here:
        connection.health_check_done = True  # type: ignore[attr-defined]
        try:
            return fetch_prepared(sql, params)
        except DatabaseError:
            if connection.is_usable():
                raise  # the statement failed, not the connection
            logger.warning("kept database connection was dropped; reconnecting", exc_info=True)
            connection.close()
    return fetch_prepared(sql, params)


def fetch_prepared(
    sql: str, params: Sequence[Any], *, returning: bool = True, prepare: bool = True
) -> list[tuple[Any, ...]]:
    """Run a statement that is the same text on every call. On PostgreSQL it is a server-side
    prepared statement of the (persistent, ``CONN_MAX_AGE``) connection: planned once per
    connection (psycopg plans it again after any rollback) instead of per call — a page of a
    five-table join planned in ~1.4 ms and ran in ~0.4 ms. Such statements bypass Django's
    query log. Their texts must hold only constants and name their columns (``SELECT *``
    would fail with "cached plan must not change result type" once a column is added);
    values go in ``params``. ``returning=False``: a statement without rows (an INSERT
    without RETURNING); [] is returned. ``prepare=False``: the same server-side binding,
    planned for this call only (texts that vary too much to keep)."""
    if connection.vendor != "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall()) if returning else []
    # Django gives its connections a client-side binding cursor factory; prepared
    # statements need psycopg's server-side binding ``Cursor``.
    with prepared_cursor() as cursor:
        cursor.execute(sql, params, prepare=prepare)
        return list(cursor.fetchall()) if returning else []


class SqlRows:
    """``count_sql`` gives one integer; ``page_sql`` the ordered rows (without LIMIT)."""

    def __init__(
        self,
        count_sql: str,
        page_sql: str,
        params: Sequence[Any],
        page_params: Sequence[Any] | None = None,
    ) -> None:
        self.count_sql = count_sql
        self.page_sql = page_sql
        self.params = list(params)
        self.page_params = list(page_params if page_params is not None else params)

    def count(self) -> int:
        rows = fetch_prepared(self.count_sql, self.params)
        return int(rows[0][0]) if rows else 0

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, window: slice) -> list[tuple[Any, ...]]:
        start = window.start or 0
        if window.stop is None or window.step not in (None, 1) or start < 0:
            raise ValueError("SqlRows takes a bounded forward slice")
        # LIMIT/OFFSET as literals (ints): with them as parameters a prepared statement's
        # generic plan assumes a large share of the rows and picks joins for all of them.
        limit, offset = int(window.stop - start), int(start)
        return fetch_prepared(f"{self.page_sql} LIMIT {limit} OFFSET {offset}", self.page_params)


def _insert_fields(model: type[models.Model]) -> list[models.Field[Any, Any]]:
    return [f for f in model._meta.concrete_fields if not f.primary_key]


def insert_rows(
    model: type[models.Model], rows: Sequence[dict[str, Any]], *, returning_ids: bool = False
) -> list[int]:
    """One multi-row ``INSERT`` of ``rows`` (field attname -> value; the model's defaults
    for the columns not given), the new ids in row order when ``returning_ids``.

    For the write path's small batches (a submission's outbox messages and feed rows):
    ``bulk_create`` built a model instance per row and compiled its statement each time.
    On PostgreSQL the statement is prepared once per connection and row count (and the
    integer widths psycopg picks for the values: a few variants; psycopg keeps at most 100
    statements per connection), and the values go as they are (psycopg adapts them);
    elsewhere through Django's cursor, each value prepared by its field. Fields are not
    ``pre_save``d: no ``auto_now`` on the models it writes."""
    if not rows:
        return []
    postgres = connection.vendor == "postgresql"
    sql, params = _insert_statement(model, rows, postgres=postgres)
    if returning_ids:
        sql += f" RETURNING {connection.ops.quote_name(model._meta.pk.column)}"
    found = fetch_prepared(sql, params, returning=returning_ids)
    # One statement: the ids ascend with the rows (one sequence; SQLite's rowid).
    return sorted(int(r[0]) for r in found)


def _insert_statement(
    model: type[models.Model], rows: Sequence[dict[str, Any]], *, postgres: bool
) -> tuple[str, list[Any]]:
    fields = _insert_fields(model)
    params: list[Any] = []
    for given in rows:
        for f in fields:
            value = given[f.attname] if f.attname in given else f.get_default()
            params.append(value if postgres else f.get_db_prep_save(value, connection))
    quote = connection.ops.quote_name
    one = f"({', '.join(['%s'] * len(fields))})"
    sql = (
        f"INSERT INTO {quote(model._meta.db_table)} "  # noqa: S608 (names from the model, values bound)
        f"({', '.join(quote(f.column) for f in fields)}) VALUES {', '.join([one] * len(rows))}"
    )
    return sql, params


Insert = tuple[type[models.Model], Sequence[dict[str, Any]], bool]  # model, rows, returning ids


def insert_many(inserts: Sequence[Insert]) -> list[list[int]]:
    """Several ``insert_rows`` in one round trip: on PostgreSQL one prepared statement whose
    INSERTs are data-modifying CTEs (each runs in full; none sees the others' rows, so
    their tables must not depend on each other within the call); elsewhere one
    ``insert_rows`` each. Each insert's new ids (when asked) in row order, [] otherwise."""
    wanted = [(i, model, rows, returning) for i, (model, rows, returning) in enumerate(inserts)]
    found: list[list[int]] = [[] for _ in inserts]
    if connection.vendor != "postgresql" or sum(1 for *_, rows, _r in wanted if rows) < 2:
        for i, model, rows, returning in wanted:
            found[i] = insert_rows(model, rows, returning_ids=returning)
        return found
    quote = connection.ops.quote_name
    parts: list[str] = []
    selects: list[str] = []
    params: list[Any] = []
    for i, model, rows, returning in wanted:
        if not rows:
            continue
        sql, values = _insert_statement(model, rows, postgres=True)
        if returning:
            sql += f" RETURNING {quote(model._meta.pk.column)} AS id"
            selects.append(f"SELECT {i}, id FROM i{i}")  # noqa: S608 (an index)
        parts.append(f"i{i} AS ({sql})")
        params += values
    tail = " UNION ALL ".join(selects) or "SELECT 0, 0 WHERE false"
    for i, pk in fetch_prepared(f"WITH {', '.join(parts)} {tail}", params):
        found[int(i)].append(int(pk))
    return [sorted(ids) for ids in found]


def fetch_models(model: type[M], where: str, params: Sequence[Any]) -> list[M]:
    """Instances of ``model`` whose rows match ``where`` (SQL over the table's own columns,
    values as ``%s``; an ORDER BY / LIMIT may follow), all concrete fields loaded, as the
    ORM would load them (each field's ``from_db_value``, e.g. JSON decoded). On PostgreSQL
    a prepared statement, for the one-table reads every submission makes (the ORM's
    compile cost more than the query); elsewhere the same SQL through ``raw()``, which
    applies the same field converters."""
    fields = model._meta.concrete_fields
    quote = connection.ops.quote_name
    sql = (
        f"SELECT {', '.join(quote(f.column) for f in fields)} "  # noqa: S608 (names from the model, values bound)
        f"FROM {quote(model._meta.db_table)} WHERE {where}"
    )
    if connection.vendor != "postgresql":
        return list(model._default_manager.raw(sql, params))
    converters = [(i, f) for i, f in enumerate(fields) if hasattr(f, "from_db_value")]
    names = [f.attname for f in fields]
    found = []
    for row in fetch_prepared(sql, params):
        values = list(row)
        for i, f in converters:
            values[i] = f.from_db_value(values[i], None, connection)
        found.append(model.from_db(connection.alias, names, values))
    return found
