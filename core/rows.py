"""Row sources for list endpoints that build their output from tuples.

``django.core.paginator.Paginator`` needs ``count()`` and slicing; these give it both
without model instances: ``QueryRows`` over an ORM queryset (``values_list`` of the
columns), ``SqlRows`` over two hand-written statements (the count and the ordered page,
``LIMIT``/``OFFSET`` appended) for the few lists where the ORM's query building cost
more than the query (docs/performance.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import connection
from django.db.models import QuerySet


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
        with connection.cursor() as cursor:
            cursor.execute(self.count_sql, self.params)
            row = cursor.fetchone()
        return int(row[0]) if row else 0

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, window: slice) -> list[tuple[Any, ...]]:
        start = window.start or 0
        if window.stop is None or window.step not in (None, 1) or start < 0:
            raise ValueError("SqlRows takes a bounded forward slice")
        with connection.cursor() as cursor:
            cursor.execute(
                f"{self.page_sql} LIMIT %s OFFSET %s",
                [*self.page_params, window.stop - start, start],
            )
            return list(cursor.fetchall())
