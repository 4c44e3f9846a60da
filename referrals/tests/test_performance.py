"""Cost guards of the hot paths (issue 3 targets): queries per submit, per transition and
per routing call, the plan of a department's worklist page, and the background sends."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from core import dispatch
from core.rows import SqlRows
from referrals import routing, selectors, services
from referrals.models import WORKLIST_STATES, Referral
from referrals.tests.conftest import World


def test_the_worklist_index_covers_exactly_the_open_states() -> None:
    # The partial index is used only when the query's states imply its condition.
    assert set(WORKLIST_STATES) == set(selectors.OPEN_STATES)


def test_department_worklist_page_is_an_ordered_index_range_scan(world: World) -> None:
    for _ in range(3):
        world.submit()
    queryset = selectors.referral_worklist(world.consultant, world.hub_paeds.pk)[:50]
    with connection.cursor() as cursor:
        # Tiny tables favour a sequential scan; forbid it and sorting to see whether the
        # index can serve the filter and the ORDER BY on its own.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_sort = off")
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        sql, params = queryset.query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "referral_open_worklist" in plan, plan
    assert "Sort" not in plan, plan
    assert [r.pk for r in queryset] == [
        r.pk
        for r in Referral.objects.filter(assigned_department=world.hub_paeds).order_by(
            "priority", "deadline", "id"
        )
    ]


def test_submit_and_accept_query_counts(world: World) -> None:
    world.submit()  # the routing snapshot and statistics are per process: warm them
    with CaptureQueriesContext(connection) as submit:
        referral = world.submit()
    with CaptureQueriesContext(connection) as accept:
        services.referral_transition(
            actor=world.consultant, referral_id=referral.pk, action="accept"
        )
    # submit: idempotency lookup, routing (one query), one INSERT of the referral, the
    # event, the FHIR projection (Patient, ServiceRequest, Task, outbox) and BEGIN/COMMIT.
    assert len(submit.captured_queries) <= 22, [q["sql"] for q in submit.captured_queries]
    # accept: roles, departments, the locked row with specialty and department, UPDATE,
    # event, FHIR Task version and outbox; no lazy loads.
    assert len(accept.captured_queries) <= 17, [q["sql"] for q in accept.captured_queries]
    sqls = [q["sql"] for q in accept.captured_queries]
    assert not any(s.startswith('SELECT "registry_specialty"') for s in sqls)
    assert not any(
        s.startswith('SELECT "registry_department"') and "accounts_user_departments" not in s
        for s in sqls
    )


def test_routing_is_one_query_per_warm_call(world: World) -> None:
    routing.routing_cache_clear()
    referral = world.submit(department=None)
    assert referral.assigned_department_id is not None
    routing.suggest_departments(referral)  # warm
    with CaptureQueriesContext(connection) as one:
        routing.suggest_departments(referral)
    assert len(one.captured_queries) == 1
    probe = Referral(
        requester_facility=world.district, specialty=world.paeds, mode="async", patient_ref=""
    )
    with CaptureQueriesContext(connection) as new:
        routing.suggest_departments(probe)
    assert len(new.captured_queries) == 1


def test_background_sends_leave_the_calling_thread(settings: Any) -> None:
    settings.CELERY_SEND_IN_BACKGROUND = True
    seen: list[tuple[str, int]] = []
    release = threading.Event()

    def send(n: int) -> None:
        release.wait(5)
        seen.append((threading.current_thread().name, n))

    def fail(n: int) -> None:
        raise ConnectionError("broker down")

    dispatch.send_later(fail, 0)  # logged on the thread, never raised to the caller
    dispatch.send_later(send, 1)
    dispatch.send_later(send, 2)
    assert seen == []  # the caller did not wait
    release.set()
    assert dispatch.flush(timeout=5)
    assert seen == [("consilium-send", 1), ("consilium-send", 2)]


def test_inline_sends_when_configured(settings: Any) -> None:
    settings.CELERY_SEND_IN_BACKGROUND = False
    seen: list[str] = []
    dispatch.send_later(lambda: seen.append(threading.current_thread().name))
    assert seen == [threading.current_thread().name]


@pytest.mark.parametrize("department", [True, False])
def test_a_draft_is_inserted_once_and_a_submission_once(world: World, department: bool) -> None:
    extra: dict[str, Any] = {} if department else {"department": None}
    with CaptureQueriesContext(connection) as draft:
        world.submit(draft=True, **extra)
    with CaptureQueriesContext(connection) as submitted:
        referral = world.submit(**extra)
    for captured in (draft, submitted):
        writes = [
            q["sql"].split(" ")[0]
            for q in captured.captured_queries
            if '"referrals_referral"' in q["sql"].split(" (")[0]
            and q["sql"].startswith(("INSERT", "UPDATE"))
        ]
        assert writes == ["INSERT"]
    assert (referral.state, referral.version) == ("submitted", 1)
    assert Referral.objects.get(pk=referral.pk).state == "submitted"


def test_the_hand_written_worklist_page_keeps_the_index_in_a_generic_plan(world: World) -> None:
    # The page is a prepared statement: after a few runs PostgreSQL may use a generic plan
    # (parameters unknown). The states are literals, so even that plan can use the partial
    # index, ordered, without a sort.
    for _ in range(3):
        world.submit()
    rows = selectors.referral_worklist_rows(world.consultant, world.hub_paeds.pk)
    assert isinstance(rows, SqlRows)
    sql = f"{rows.page_sql} LIMIT 50 OFFSET 0"  # as core.rows.SqlRows runs it
    parts = sql.split("%s")
    numbered = "".join(f"{part}${n}" for n, part in enumerate(parts[:-1], 1)) + parts[-1]
    params = list(rows.page_params)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_sort = off")
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute(f"PREPARE worklist_probe AS {numbered}")
        try:
            marks = ", ".join(["%s"] * len(params))
            cursor.execute(f"EXPLAIN EXECUTE worklist_probe({marks})", params)
            plan = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            cursor.execute("DEALLOCATE worklist_probe")
    assert "referral_open_worklist" in plan, plan
    assert "Sort" not in plan, plan
    assert [r[0] for r in rows[0:50]] == [
        r.pk
        for r in Referral.objects.filter(assigned_department=world.hub_paeds).order_by(
            "priority", "deadline", "id"
        )
    ]


def test_the_worklist_statements_are_prepared_once_per_connection(world: World) -> None:
    world.submit()
    rows = selectors.referral_worklist_rows(world.consultant, world.hub_paeds.pk)
    for _ in range(3):
        assert rows.count() == 1
        assert len(rows[0:50]) == 1
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    page = [s for s in prepared if "ORDER BY r.priority, r.deadline, r.id LIMIT 50 OFFSET 0" in s]
    count = [s for s in prepared if s.startswith("SELECT COUNT(*) FROM referrals_referral r")]
    assert (len(page), len(count)) == (1, 1), prepared
    # Django's own statements (the submit above: dozens) are never prepared; the
    # submission's placer lookup (services._find_existing) is.
    placer = [s for s in prepared if s == services._PLACER_LOOKUP.replace("%s", "$1", 1)
              .replace("%s", "$2", 1).replace("%s", "$3", 1)]  # fmt: skip
    assert len(placer) == 1, prepared
    # So are its multi-row inserts of versions, feed rows and outbox messages (one
    # statement for a new referral) and its reads
    # of registry rows (core.rows.insert_rows, fetch_models), and its notifications
    # (referrals.notifications.notify_in_transaction); nothing else.
    hand_written = [
        s
        for s in prepared
        if s.startswith('INSERT INTO "fhir_gateway_')
        or s.startswith('WITH i0 AS (INSERT INTO "fhir_gateway_')  # core.rows.insert_many
        or 'FROM "registry_' in s
    ]
    notifications = [s for s in prepared if s.startswith('INSERT INTO "referrals_notification"')]
    assert len(notifications) == 1, prepared
    assert len(prepared) == 3 + len(hand_written) + len(notifications), prepared
