"""Bearer authentication's prepared statement (PostgreSQL) keeps what Django's own cursors
give: the per-request health check, and no failure when a migration adds a column."""

from __future__ import annotations

import psycopg
import pytest
from django.core.signals import request_finished, request_started
from django.db import connection

from accounts.authentication import user_for_bearer
from accounts.services import api_token_issue
from tests.factories import UserFactory

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="the prepared statement is PostgreSQL's"
    ),
]


def _other_connection() -> psycopg.Connection[tuple[object, ...]]:
    dsn = "host={HOST} port={PORT} user={USER} dbname={NAME}".format(**connection.settings_dict)
    return psycopg.connect(dsn, autocommit=True)


def _request(raw: str) -> int:
    """One request's worth: Django's request signals around the authentication."""
    request_started.send(sender=None)
    try:
        user, _token = user_for_bearer(raw)
        return int(user.pk)
    finally:
        request_finished.send(sender=None)


def test_a_connection_the_server_dropped_is_replaced_not_failed_on() -> None:
    user = UserFactory.create()
    raw = api_token_issue(user=user, name="t").raw
    assert _request(raw) == user.pk  # prepared on this connection
    assert connection.connection is not None
    dropped = connection.connection.info.backend_pid
    with _other_connection() as other:  # a database restart or failover, as seen from here
        other.execute("SELECT pg_terminate_backend(%s)", [dropped])

    assert _request(raw) == user.pk
    assert connection.connection is not None
    assert connection.connection.info.backend_pid != dropped


def test_a_new_column_does_not_break_the_prepared_statement() -> None:
    user = UserFactory.create()
    raw = api_token_issue(user=user, name="t").raw
    assert _request(raw) == user.pk
    with _other_connection() as other:  # a migration, run while this worker lives on
        other.execute("ALTER TABLE accounts_user ADD COLUMN consilium_probe integer")
        try:
            assert _request(raw) == user.pk
        finally:
            other.execute("ALTER TABLE accounts_user DROP COLUMN consilium_probe")


def test_the_bearer_statement_is_the_requests_health_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Django would send ``SELECT 1`` before the request's first query; the bearer statement
    proves the connection instead, so an authenticated request makes no such round trip."""
    user = UserFactory.create()
    raw = api_token_issue(user=user, name="t").raw
    _request(raw)  # the connection is kept (CONN_MAX_AGE) from here on
    checks: list[bool] = []
    real_is_usable = connection.is_usable

    def counted() -> bool:
        checks.append(True)
        return real_is_usable()

    monkeypatch.setattr(connection, "is_usable", counted)
    request_started.send(sender=None)
    try:
        user_for_bearer(raw)
        assert type(user).objects.filter(pk=user.pk).exists()  # a later ORM query
    finally:
        request_finished.send(sender=None)
    assert checks == []
