"""Asynchronous transaction Bundles (Prefer: respond-async): accept, apply once, poll, cancel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import DatabaseError as DjangoDatabaseError
from django.db import OperationalError as DjangoOperationalError
from django.db import connection, connections
from django.db.transaction import atomic as transaction_atomic
from django.utils import timezone

from accounts.roles import Role
from fhir_gateway import handlers, intake, publish, referral_resources
from fhir_gateway.intake import intake_drain, intake_process, intake_process_next
from fhir_gateway.models import FhirResource, IntakeJob, OutboxMessage
from fhir_gateway.outcomes import FhirError
from fhir_gateway.retention import retention_prune
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import World, body, member_client, transaction
from referrals.load import department_load_matches
from referrals.models import DepartmentDayLoad, Referral
from tests.factories import UserFactory

ASYNC = {"Prefer": "respond-async"}


def _kick_off(client: FhirClient, bundle: Any, **headers: str) -> str:
    response = client.post("/fhir", bundle, **{**ASYNC, **headers})
    assert response.status_code == 202, response.content
    issue = outcome_issue(response)
    assert issue["severity"] == "information"
    location = str(response["Content-Location"])
    assert location.startswith("http://testserver/fhir/_async/")
    assert location in issue["diagnostics"]
    return location.removeprefix("http://testserver")


def _job(path: str) -> IntakeJob:
    return IntakeJob.objects.get(pk=path.rsplit("/", 1)[1])


def _answer(client: FhirClient, path: str, **headers: str) -> dict[str, Any]:
    """The one entry of the finished job's batch-response Bundle."""
    response = client.get(path, **headers)
    assert response.status_code == 200, response.content
    answer = body(response)
    assert answer["resourceType"] == "Bundle"
    assert answer["type"] == "batch-response"
    assert answer["timestamp"].endswith("Z")
    (entry,) = answer["entry"]
    return dict(entry)


def _referral_rows() -> tuple[int, int, int]:
    return (
        Referral.objects.count(),
        FhirResource.objects.filter(
            resource_type__in=["Patient", "ServiceRequest", "Task"]
        ).count(),
        OutboxMessage.objects.count(),
    )


# --------------------------------------------------------------------------- the pattern


@pytest.mark.django_db
def test_bundle_is_accepted_then_applied_once_and_answered(world: World) -> None:
    path = _kick_off(world.r4, transaction(world), Prefer="return=minimal, respond-async")

    assert _referral_rows() == (0, 0, 0)  # nothing applied at the kick-off
    pending = world.r4.get(path)
    assert pending.status_code == 202
    assert pending["Retry-After"] == "1"
    assert pending.content == b""

    assert intake_process(job_id=_job(path).pk) == "done"
    assert intake_process(job_id=_job(path).pk) == "skipped"  # applied once

    entry = _answer(world.r4, path)
    assert entry["response"] == {"status": "200 OK"}
    result = entry["resource"]
    assert result["type"] == "transaction-response"
    assert [e["response"]["status"] for e in result["entry"]] == ["201 Created"] * 3
    referral = Referral.objects.get()
    assert referral.placer_value == "SR-1"
    assert referral.assigned_department == world.network.pediatrics
    # What the answer holds reads back equal.
    for item in result["entry"]:
        location = item["response"]["location"].split("/_history/")[0]
        read = world.r4.get(f"/fhir/{location}", Accept=FHIR_R4)
        assert body(read) == item["resource"]
    job = _job(path)
    assert (job.status, job.result_status, job.attempts) == ("done", 200, 1)


@pytest.mark.django_db
def test_answer_comes_in_the_version_the_kick_off_accepted(world: World) -> None:
    path = _kick_off(world.r4, transaction(world), Accept=FHIR_R5)
    intake_process(job_id=_job(path).pk)

    response = world.r4.get(path)  # the poll's own Accept does not change the answer
    assert response["Content-Type"] == FHIR_R5
    result = body(response)["entry"][0]["resource"]
    order = next(
        e["resource"] for e in result["entry"] if e["resource"]["resourceType"] == "ServiceRequest"
    )
    assert "reason" in order and "reasonCode" not in order  # R5 shape
    assert order["code"]["concept"]  # CodeableReference in R5


@pytest.mark.django_db
def test_refusal_when_applied_is_answered_with_its_outcome_and_changes_nothing(
    world: World,
) -> None:
    bundle = transaction(world, requester=f"Organization/{world.network.hub.pk}")
    path = _kick_off(world.r4, bundle)

    assert intake_process(job_id=_job(path).pk) == "refused"

    entry = _answer(world.r4, path)
    assert "resource" not in entry
    assert entry["response"]["status"] == "403 Forbidden"
    issue = entry["response"]["outcome"]["issue"][0]
    assert issue["code"] == "forbidden"
    assert "only request for your own facility" in issue["diagnostics"]
    assert _referral_rows() == (0, 0, 0)
    assert _job(path).result_status == 403


@pytest.mark.django_db
def test_resent_bundle_is_applied_once(world: World) -> None:
    first = _kick_off(world.r4, transaction(world))
    again = _kick_off(world.r4, transaction(world))  # the 202 of the first was lost

    assert intake_drain() == 2

    statuses = [
        [e["response"]["status"] for e in _answer(world.r4, path)["resource"]["entry"]]
        for path in (first, again)
    ]
    assert statuses == [["201 Created"] * 3, ["200 OK"] * 3]
    assert Referral.objects.count() == 1
    assert FhirResource.objects.filter(resource_type="Task").count() == 1


@pytest.mark.django_db
def test_drain_applies_every_pending_job_oldest_first(world: World) -> None:
    paths = [_kick_off(world.r4, transaction(world, f"SR-{n}")) for n in range(3)]
    IntakeJob.objects.filter(pk=_job(paths[0]).pk).update(
        next_attempt_at=timezone.now()
    )  # the first sent is now the last due (as after a retry)

    assert intake_drain(max_jobs=2) == 2
    assert intake_drain() == 1
    assert intake_drain() == 0

    order = list(Referral.objects.order_by("pk").values_list("placer_value", flat=True))
    assert order == ["SR-1", "SR-2", "SR-0"]
    assert set(IntakeJob.objects.values_list("status", flat=True)) == {"done"}


# --------------------------------------------------------------------------- batches


def _placer(bundle: dict[str, Any]) -> str:
    return str(bundle["entry"][1]["resource"]["identifier"][0]["value"])


def _writes_then(outcomes: dict[str, Exception]) -> Any:
    """The transaction interaction, which for the placers in ``outcomes`` writes the
    referral and then raises their exception (so the writes must be rolled back)."""
    real = handlers.SYSTEM_INTERACTIONS["transaction"]

    def apply(*args: Any) -> handlers.TransactionAnswer:
        text = real(*args)
        if (exc := outcomes.get(_placer(args[1]))) is not None:
            raise exc
        return text

    return apply


@pytest.mark.django_db
def test_a_batch_applies_each_job_on_its_own(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs leased together share one transaction; a refusal and a bug roll back only their
    own writes, and the jobs beside them are applied and answered."""
    monkeypatch.setitem(
        handlers.SYSTEM_INTERACTIONS,
        "transaction",
        _writes_then(
            {
                "SR-refused": FhirError(409, "conflict", "Refused after writing."),
                "SR-bug": RuntimeError("disk on fire"),
            }
        ),
    )
    placers = ["SR-a", "SR-refused", "SR-bug", "SR-b"]
    paths = [_kick_off(world.r4, transaction(world, p)) for p in placers]

    batch = intake.intake_process_next(limit=10)

    assert [(_placer(json.loads(job.body)), outcome) for job, outcome in batch] == [
        ("SR-a", "done"),
        ("SR-refused", "refused"),
        ("SR-bug", "error"),
        ("SR-b", "done"),
    ]
    assert sorted(Referral.objects.values_list("placer_value", flat=True)) == ["SR-a", "SR-b"]
    assert FhirResource.objects.filter(resource_type="Task").count() == 2
    refused = _answer(world.r4, paths[1])["response"]
    assert (refused["status"], refused["outcome"]["issue"][0]["code"]) == (
        "409 Conflict",
        "conflict",
    )
    bug = _job(paths[2])
    assert (bug.status, bug.attempts, bug.last_error) == (
        "pending",
        1,
        "RuntimeError: disk on fire",
    )
    assert [_job(p).status for p in (paths[0], paths[3])] == ["done", "done"]
    assert department_load_matches()


# The lookups of a submission (not routing's snapshot, which has its own cache): prepared
# statements on PostgreSQL (core.rows.fetch_models), so counted where they are made.
_LOOKUPS = (
    (referral_resources, "_department_by_pk"),
    (referral_resources, "_specialty_by_codes"),
    (publish, "_live_endpoints"),
)


@pytest.mark.django_db
def test_a_batch_reads_the_registry_rows_its_jobs_share_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The department, the specialty and the members' endpoints (core.memo), read per job
    before; every job is applied and published all the same."""
    reads = [0, 0, 0]
    for n, (module, name) in enumerate(_LOOKUPS):
        real = getattr(module, name)

        def counted(*args: Any, _n: int = n, _real: Any = real) -> Any:
            reads[_n] += 1
            return _real(*args)

        monkeypatch.setattr(module, name, counted)
    for placer in ("SR-1", "SR-2", "SR-3", "SR-4"):
        _kick_off(world.r4, transaction(world, placer))
    assert [o for _job, o in intake.intake_process_next(limit=10)] == ["done"] * 4
    assert reads == [1, 1, 1]
    assert Referral.objects.count() == 4
    # Each referral's versions went to both members' endpoints, as one by one.
    endpoints = world.network.hub.endpoints.count() + world.network.spoke.endpoints.count()
    assert OutboxMessage.objects.count() == 4 * 3 * endpoints
    # Outside a batch (a synchronous request) nothing is kept: each reads anew.
    reads[:] = [0, 0, 0]
    for placer in ("SR-5", "SR-6"):
        assert world.r4.post("/fhir", transaction(world, placer)).status_code == 200
    assert reads == [2, 2, 2]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("error", "attempts"),
    [(RuntimeError("bug at the end"), 1), (DjangoOperationalError("deadlock detected"), 0)],
)
def test_a_batch_that_fails_as_a_whole_writes_nothing_and_its_jobs_go_alone_next(
    world: World, monkeypatch: pytest.MonkeyPatch, error: Exception, attempts: int
) -> None:
    """Something that breaks the batch's transaction (here: at its end, after every job was
    applied) rolls every job back; each counts the attempt (a transient error gives it
    back) and, once tried, is leased alone."""

    real = intake.department_load_deferred
    failures = [error]  # once: the batch breaks, the retries do not

    @contextmanager
    def fails_at_the_end() -> Iterator[None]:
        with real():
            yield
            if failures:
                raise failures.pop()

    monkeypatch.setattr(intake, "department_load_deferred", fails_at_the_end)
    paths = [_kick_off(world.r4, transaction(world, f"SR-{n}")) for n in range(3)]

    outcomes = [outcome for _job, outcome in intake.intake_process_next(limit=10)]

    assert outcomes == ["error"] * 3
    assert _referral_rows() == (0, 0, 0)
    assert not DepartmentDayLoad.objects.exists()
    for path in paths:
        job = _job(path)
        assert (job.status, job.attempts) == ("pending", attempts)
        assert job.last_error == f"{type(error).__name__}: {error}"
    if attempts:  # tried before: one job per lease from now on
        IntakeJob.objects.update(next_attempt_at=timezone.now())
        assert [len(intake.intake_process_next(limit=10)) for _ in range(4)] == [1, 1, 1, 0]
        assert Referral.objects.count() == 3


@pytest.mark.django_db(transaction=True)  # the batch's transaction is the outermost
def test_a_refusal_answered_over_a_broken_transaction_fails_the_batch(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a job's savepoint cannot be rolled back (the connection is going), Django
    marks the transaction for rollback and the refusal still comes back as an answer: it
    must not be stored; the whole batch fails and nothing of it stays."""
    real = handlers.SYSTEM_INTERACTIONS["transaction"]

    def cannot_roll_back(sid: str) -> None:
        raise DjangoDatabaseError("server closed the connection unexpectedly")

    def breaks(*args: Any) -> handlers.TransactionAnswer:
        text = real(*args)
        if _placer(args[1]) == "SR-broken":
            monkeypatch.setattr(connection, "savepoint_rollback", cannot_roll_back)
            raise FhirError(409, "conflict", "Refused over a broken transaction.")
        return text

    monkeypatch.setitem(handlers.SYSTEM_INTERACTIONS, "transaction", breaks)
    paths = [_kick_off(world.r4, transaction(world, p)) for p in ("SR-a", "SR-broken")]

    outcomes = [outcome for _job, outcome in intake.intake_process_next(limit=10)]

    assert outcomes == ["error", "error"]
    assert _referral_rows() == (0, 0, 0)
    assert [(_job(p).status, _job(p).attempts) for p in paths] == [("pending", 0)] * 2
    assert {_job(p).last_error for p in paths} == {
        "OperationalError: The batch's transaction can no longer be used."
    }


@pytest.mark.django_db
def test_a_job_tried_before_is_leased_alone_ahead_of_its_batch(world: World) -> None:
    """A job whose worker died with it (attempts counted, nothing finished) may be the one
    that kills workers: it is leased alone, then the jobs beside it go on in a batch."""
    paths = [_kick_off(world.r4, transaction(world, f"SR-{n}")) for n in range(4)]
    IntakeJob.objects.filter(pk=_job(paths[2]).pk).update(attempts=1)

    claims = [
        [_placer(json.loads(job.body)) for job, _outcome in intake.intake_process_next(limit=10)]
        for _ in range(3)
    ]

    assert claims == [["SR-2"], ["SR-0", "SR-1", "SR-3"], []]
    assert [_job(p).attempts for p in paths] == [1, 1, 2, 1]
    assert Referral.objects.count() == 4


@pytest.mark.django_db
def test_a_retried_job_holds_back_neither_its_member_nor_the_batches(
    world: World, settings: Any
) -> None:
    """Member A has a backlog; member B's oldest job, sent after it, failed once (a
    transient error: attempt given back, error kept). B's retry goes alone first, then
    the batches take both members in turn again: no batch is cut down at the retry."""
    other = member_client(
        UserFactory.create(facility=world.network.spoke, roles=[Role.MEMBER_SYSTEM])
    )
    for n in range(6):
        _kick_off(world.r4, transaction(world, f"SR-A-{n}"))
    retried = _kick_off(other, transaction(world, "SR-B-retried"))
    IntakeJob.objects.filter(pk=_job(retried).pk).update(last_error="OperationalError: x")
    for n in range(2):
        _kick_off(other, transaction(world, f"SR-B-{n}"))

    claims = [
        [_placer(json.loads(job.body)) for job, _outcome in intake.intake_process_next(limit=4)]
        for _ in range(4)
    ]

    assert claims == [
        ["SR-B-retried"],
        ["SR-A-0", "SR-B-0", "SR-A-1", "SR-B-1"],
        ["SR-A-2", "SR-A-3", "SR-A-4", "SR-A-5"],
        [],
    ]
    assert Referral.objects.count() == 9


@pytest.mark.django_db(transaction=True)
def test_a_claim_beside_another_takes_the_next_jobs_not_none(world: World) -> None:
    """Another worker's claim holds its jobs (locked, lease not yet committed): this claim
    takes the next ones instead of coming back empty and ending its drain, also when the
    jobs are spread over several members (a claim locks only the jobs it leases)."""
    clients = [world.r4] + [
        member_client(UserFactory.create(facility=world.network.spoke, roles=[Role.MEMBER_SYSTEM]))
        for _ in range(2)
    ]
    paths = [
        _kick_off(client, transaction(world, f"SR-{m}-{n}"))
        for m, client in enumerate(clients)
        for n in range(2)
    ]
    holding, release = threading.Event(), threading.Event()
    held: list[str] = []

    def other_claim() -> None:
        try:
            with transaction_atomic():
                held.extend(str(job.pk) for job in intake._due_jobs(None, 3))
                holding.set()
                release.wait(30)
        finally:
            connections.close_all()

    worker = threading.Thread(target=other_claim)
    worker.start()
    try:
        assert holding.wait(30)
        mine = [str(job.pk) for job, _outcome in intake.intake_process_next(limit=3)]
    finally:
        release.set()
        worker.join(30)

    assert len(held) == 3
    assert len(mine) == 3
    assert not set(held) & set(mine)
    assert {str(_job(p).pk) for p in paths} == set(held) | set(mine)


@pytest.mark.django_db
def test_the_drain_leases_batches_of_the_configured_size(world: World, settings: Any) -> None:
    settings.FHIR_INTAKE_BATCH = 2
    for n in range(5):
        _kick_off(world.r4, transaction(world, f"SR-{n}"))
    sizes: list[int] = []
    real = intake._process

    def spy(jobs: list[IntakeJob]) -> list[str]:
        sizes.append(len(jobs))
        return real(jobs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(intake, "_process", spy)
        assert intake_drain(max_jobs=4) == 4
        assert intake_drain() == 1
    assert sizes == [2, 2, 1]
    assert Referral.objects.count() == 5


# --------------------------------------------------------------------------- refusals at kick-off


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ("not-json", 400, "structure"),
        ("not-a-bundle", 400, "invalid"),
        ("batch", 422, "not-supported"),  # a batch is answered at once, never async
        ("no-token", 401, "login"),
        ("bad-token", 401, "login"),
        ("no-facility", 403, "forbidden"),
        ("fhir-3", 415, "not-supported"),
    ],
)
def test_kick_off_refusals_store_nothing(world: World, change: str, status: int, code: str) -> None:
    client, content_type = world.r4, FHIR_R4
    data: dict[str, Any] | str = transaction(world)
    if change == "not-json":
        data = "{not json"
    elif change == "not-a-bundle":
        data = {"resourceType": "Patient"}
    elif change == "batch":
        data = {**transaction(world), "type": "batch"}
    elif change == "no-token":
        client = FhirClient(None)
    elif change == "bad-token":
        client = FhirClient("nope")
    elif change == "no-facility":
        client = member_client(UserFactory.create(facility=None))
    elif change == "fhir-3":
        content_type = "application/fhir+json; fhirVersion=3.0"

    response = client.post("/fhir", data, content_type=content_type, **ASYNC)

    assert response.status_code == status, response.content
    assert outcome_issue(response)["code"] == code
    assert "Content-Location" not in response
    assert IntakeJob.objects.count() == 0
    assert _referral_rows() == (0, 0, 0)


@pytest.mark.django_db
def test_too_large_bundle_is_413_without_a_job(world: World, settings: Any) -> None:
    settings.FHIR_MAX_BODY_BYTES = 200
    response = world.r4.post("/fhir", transaction(world), **ASYNC)
    assert response.status_code == 413
    assert IntakeJob.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda text: b"\xef\xbb\xbf" + text.encode(), id="utf-8 with BOM"),
        pytest.param(lambda text: text.encode("utf-16"), id="utf-16"),
        pytest.param(
            lambda text: text.replace("Kawasaki", "\\ud800").encode(), id="escaped lone surrogate"
        ),
        pytest.param(
            lambda text: text.replace("Kawasaki", "Kawa\u00df\u1ebfaki").encode(), id="non-ascii"
        ),
    ],
)
def test_any_json_encoding_is_answered_as_the_synchronous_request_would_be(
    world: World, encode: Any
) -> None:
    synchronous = world.r4.post("/fhir", encode(json.dumps(transaction(world, "SR-sync"))))
    data = encode(json.dumps(transaction(world, "SR-async")))

    path = _kick_off(world.r4, data)
    assert intake_process(job_id=_job(path).pk) in ("done", "refused")

    entry = _answer(world.r4, path)
    assert entry["response"]["status"].split()[0] == str(synchronous.status_code)
    if synchronous.status_code == 200:
        order = next(
            e["resource"]
            for e in entry["resource"]["entry"]
            if e["resource"]["resourceType"] == "ServiceRequest"
        )
        sent = json.loads(data.decode("utf-8-sig") if not data.startswith(b"\xff\xfe") else data)
        question = sent["entry"][1]["resource"]["reasonCode"][0]["text"]
        assert order["reasonCode"][0]["text"] == question


@pytest.fixture(autouse=True)
def _fresh_cap_counts() -> Iterator[None]:
    intake._pending_seen.clear()
    yield
    intake._pending_seen.clear()


@pytest.mark.django_db
def test_a_member_may_not_queue_more_than_the_cap(
    world: World, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.FHIR_INTAKE_MAX_PENDING_PER_USER = 2
    monkeypatch.setattr(intake, "CAP_COUNT_SECONDS", 0)  # count on every request
    first = _kick_off(world.r4, transaction(world, "SR-1"))
    _kick_off(world.r4, transaction(world, "SR-2"))

    refused = world.r4.post("/fhir", transaction(world, "SR-3"), **ASYNC)

    assert refused.status_code == 429
    assert refused["Retry-After"] == "60"
    assert outcome_issue(refused)["code"] == "throttled"
    assert IntakeJob.objects.count() == 2
    colleague = member_client(
        UserFactory.create(facility=world.network.spoke, roles=[Role.MEMBER_SYSTEM])
    )
    _kick_off(colleague, transaction(world, "SR-other"))  # the cap is per account
    intake_process(job_id=_job(first).pk)
    _kick_off(world.r4, transaction(world, "SR-3"))  # room again
    assert IntakeJob.objects.filter(status="pending").count() == 3


@pytest.mark.django_db
def test_the_cap_counts_once_a_second_and_adds_what_it_accepted(
    world: World, settings: Any, django_assert_num_queries: Any
) -> None:
    settings.FHIR_INTAKE_MAX_PENDING_PER_USER = 3
    world.r4.get("/fhir/_async/none")  # the token's first use stamps it (a query of its own)
    with django_assert_num_queries(1):  # the count (token and INSERT: prepared statements)
        _kick_off(world.r4, transaction(world, "SR-1"))
    with django_assert_num_queries(0):
        _kick_off(world.r4, transaction(world, "SR-2"))
        _kick_off(world.r4, transaction(world, "SR-3"))
        refused = world.r4.post("/fhir", transaction(world, "SR-4"), **ASYNC)
    assert refused.status_code == 429
    assert IntakeJob.objects.count() == 3


@pytest.mark.django_db
def test_a_deactivated_sender_is_refused_when_applied(world: World) -> None:
    path = _kick_off(world.r4, transaction(world))
    type(world.submitter).objects.filter(pk=world.submitter.pk).update(is_active=False)

    assert intake_process(job_id=_job(path).pk) == "refused"

    job = _job(path)
    assert job.result_status == 403
    assert "no longer active" in job.result
    assert _referral_rows() == (0, 0, 0)


@pytest.mark.django_db
def test_a_job_whose_attempts_all_died_is_given_up_without_another(
    world: World, settings: Any
) -> None:
    """Attempts are counted when a job is leased: a Bundle that kills every worker taking
    it (no exception, no record) is answered 500 after FHIR_INTAKE_MAX_ATTEMPTS leases."""
    settings.FHIR_INTAKE_MAX_ATTEMPTS = 3
    path = _kick_off(world.r4, transaction(world))
    IntakeJob.objects.update(attempts=3)  # three workers died on it

    assert intake_drain() == 1

    job = _job(path)
    assert (job.status, job.result_status, job.attempts) == ("done", 500, 3)
    assert _referral_rows() == (0, 0, 0)


# --------------------------------------------------------------------------- poll and cancel


@pytest.mark.django_db
def test_only_the_sender_may_poll_or_cancel(world: World) -> None:
    path = _kick_off(world.r4, transaction(world))
    colleague = member_client(world.submitter.__class__.objects.get(pk=world.submitter.pk))

    for client in (world.other, world.r5):
        assert client.get(path).status_code == 404
        assert client.delete(path).status_code == 404
    assert colleague.get(path).status_code == 202  # the same account, another token
    same_facility = member_client(
        UserFactory.create(facility=world.network.spoke, roles=[Role.MEMBER_SYSTEM])
    )
    assert same_facility.get(path).status_code == 404  # another account of the same facility
    assert same_facility.delete(path).status_code == 404
    assert world.r4.get("/fhir/_async/not-a-uuid").status_code == 404
    assert world.r4.get("/fhir/_async/00000000-0000-0000-0000-000000000000").status_code == 404
    assert FhirClient(None).get(path).status_code == 401
    assert _job(path).status == "pending"


@pytest.mark.django_db
def test_cancelled_job_is_never_applied(world: World) -> None:
    path = _kick_off(world.r4, transaction(world))

    assert world.r4.delete(path).status_code == 202

    assert world.r4.get(path).status_code == 404
    assert world.r4.delete(path).status_code == 404
    assert intake_process(job_id=_job(path).pk) == "skipped"
    assert intake_drain() == 0
    assert _referral_rows() == (0, 0, 0)
    assert _job(path).status == "cancelled"


@pytest.mark.django_db
def test_deleting_a_finished_job_forgets_its_answer_not_the_referral(world: World) -> None:
    path = _kick_off(world.r4, transaction(world))
    intake_process(job_id=_job(path).pk)

    late = world.r4.delete(path)  # a cancel that came too late says what was done

    assert late.status_code == 200
    (entry,) = body(late)["entry"]
    assert entry["response"]["status"] == "200 OK"
    assert entry["resource"]["type"] == "transaction-response"
    assert world.r4.get(path).status_code == 404
    assert IntakeJob.objects.count() == 0
    assert Referral.objects.count() == 1


@pytest.mark.django_db
def test_post_and_put_on_the_poll_location_are_405(world: World) -> None:
    path = _kick_off(world.r4, transaction(world))
    response = world.r4.post(path, {})
    assert response.status_code == 405
    assert response["Allow"] == "GET, DELETE, HEAD"
    assert _job(path).status == "pending"


# --------------------------------------------------------------------------- failures


@pytest.mark.django_db
def test_unexpected_error_keeps_the_job_then_finishes_it_with_500(
    world: World, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.FHIR_INTAKE_MAX_ATTEMPTS = 2
    real = handlers.SYSTEM_INTERACTIONS["transaction"]

    def applies_then_breaks(*args: Any) -> str:
        real(*args)  # the referral is written ...
        raise RuntimeError("disk on fire")  # ... and the bug rolls it back

    monkeypatch.setitem(handlers.SYSTEM_INTERACTIONS, "transaction", applies_then_breaks)
    path = _kick_off(world.r4, transaction(world))

    assert intake_process(job_id=_job(path).pk) == "error"
    job = _job(path)
    assert (job.status, job.attempts, job.last_error) == (
        "pending",
        1,
        "RuntimeError: disk on fire",
    )
    assert _referral_rows() == (0, 0, 0)
    assert world.r4.get(path).status_code == 202
    assert intake_drain() == 0  # not before its backoff
    assert job.next_attempt_at > timezone.now() + timedelta(seconds=5)
    IntakeJob.objects.filter(pk=job.pk).update(next_attempt_at=timezone.now())
    assert intake_drain() == 1  # the second attempt is the last

    entry = _answer(world.r4, path)
    assert entry["response"]["status"] == "500 Internal Server Error"
    assert entry["response"]["outcome"]["issue"][0]["code"] == "exception"
    assert str(job.pk) in entry["response"]["outcome"]["issue"][0]["diagnostics"]
    assert _referral_rows() == (0, 0, 0)


@pytest.mark.django_db
def test_a_transient_database_error_gives_the_attempt_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def deadlocked(*args: Any) -> str:
        raise DjangoOperationalError("deadlock detected")

    monkeypatch.setitem(handlers.SYSTEM_INTERACTIONS, "transaction", deadlocked)
    path = _kick_off(world.r4, transaction(world))

    assert intake_process(job_id=_job(path).pk) == "error"

    job = _job(path)
    assert (job.status, job.attempts) == ("pending", 0)
    assert job.last_error == "OperationalError: deadlock detected"
    assert job.next_attempt_at > timezone.now() + timedelta(seconds=5)  # the backoff

    IntakeJob.objects.update(next_attempt_at=timezone.now())
    assert intake_process(job_id=job.pk) == "error"
    assert _job(path).attempts == 1  # a second one counts: no retrying for ever


@pytest.mark.django_db
def test_an_apply_that_runs_past_the_timeout_is_ended_and_counted(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def hangs(*args: Any) -> str:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(5)")
        return "{}"

    monkeypatch.setattr(intake, "APPLY_TIMEOUT", "200ms")
    monkeypatch.setitem(handlers.SYSTEM_INTERACTIONS, "transaction", hangs)
    path = _kick_off(world.r4, transaction(world))

    assert intake_process(job_id=_job(path).pk) == "error"

    job = _job(path)
    assert (job.status, job.attempts) == ("pending", 1)
    assert "statement timeout" in job.last_error
    assert _referral_rows() == (0, 0, 0)


# --------------------------------------------------------------------------- PostgreSQL


@contextmanager
def _half_applied_elsewhere(
    monkeypatch: pytest.MonkeyPatch, job_id: uuid.UUID
) -> Iterator[tuple[int, list[Any]]]:
    """``intake_process(job_id)`` in another thread, stopped half-way (its writes done, not
    committed) while the block runs. Yields that thread's database backend pid and its
    results (its return value or exception, there once the block has ended)."""
    started, release = threading.Event(), threading.Event()
    backend: list[int] = []
    results: list[Any] = []
    real = handlers.SYSTEM_INTERACTIONS["transaction"]

    def slow(*args: Any) -> handlers.TransactionAnswer:
        text = real(*args)
        backend.append(connection.connection.info.backend_pid)
        started.set()
        release.wait(30)
        return text

    def run() -> None:
        try:
            results.append(intake_process(job_id=job_id))
        except Exception as exc:  # noqa: BLE001 (recorded for the assertion)
            results.append(exc)
        finally:
            connections.close_all()

    monkeypatch.setitem(handlers.SYSTEM_INTERACTIONS, "transaction", slow)
    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert started.wait(30)
        yield backend[0], results
    finally:
        release.set()
        worker.join(30)


@pytest.mark.django_db(transaction=True)
def test_a_job_being_applied_is_skipped_by_others_and_cannot_be_cancelled(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _kick_off(world.r4, transaction(world))
    job_id = _job(path).pk
    with _half_applied_elsewhere(monkeypatch, job_id) as (_backend, results):
        assert intake_process(job_id=job_id) == "skipped"
        assert intake_drain() == 0
        refused = world.r4.delete(path)
        assert refused.status_code == 409
        assert outcome_issue(refused)["code"] == "conflict"
        assert world.r4.get(path).status_code == 202
    assert results == ["done"]
    assert Referral.objects.count() == 1
    assert _job(path).status == "done"


@pytest.mark.django_db(transaction=True)
def test_worker_session_killed_half_way_loses_nothing_and_applies_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _kick_off(world.r4, transaction(world))
    with (
        _half_applied_elsewhere(monkeypatch, _job(path).pk) as (backend, results),
        connection.cursor() as cursor,
    ):
        cursor.execute("SELECT pg_terminate_backend(%s)", [backend])  # the worker's session dies
    assert results and results[0] != "done"
    assert _referral_rows() == (0, 0, 0)
    assert _job(path).status == "pending"

    monkeypatch.undo()
    # The lease counted the attempt (1); a worker that lived on to see the error as a
    # transient one gives it back (0). Due now, as if the backoff ran out.
    assert _job(path).attempts in (0, 1)
    IntakeJob.objects.update(next_attempt_at=timezone.now())
    assert intake_drain() == 1
    assert Referral.objects.count() == 1
    assert [e["response"]["status"] for e in _answer(world.r4, path)["resource"]["entry"]] == [
        "201 Created"
    ] * 3


def _kill_when_applied(script: str, *args: str) -> None:
    """Run ``script`` in a worker process of its own (its own interpreter and database
    connection) and SIGKILL it once it printed "applied" (its writes done, not committed)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": "postgres://{USER}@{HOST}:{PORT}/{NAME}".format(**connection.settings_dict),
    }
    worker = subprocess.Popen(
        [sys.executable, "-c", "import sys, django; django.setup(); exec(sys.argv[1])",
         script, *args],
        cwd=django_settings.BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        assert line == "applied\n", line + (worker.stderr.read() if worker.stderr else "")
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()


KILLED_WORKER = """
import sys, time
from fhir_gateway import handlers
from fhir_gateway.intake import intake_process
real = handlers.SYSTEM_INTERACTIONS["transaction"]
def applied_then_hangs(*args):
    text = real(*args)
    print("applied", flush=True)  # the referral is written, not committed
    time.sleep(120)
    return text
handlers.SYSTEM_INTERACTIONS["transaction"] = applied_then_hangs
intake_process(job_id=sys.argv[2])  # python -c: argv[1] is this script
"""


@pytest.mark.django_db(transaction=True)
def test_worker_process_killed_mid_apply_loses_nothing_and_applies_once(world: World) -> None:
    """A real worker process (its own interpreter and connection) SIGKILLed after it wrote
    the referral and before it committed: PostgreSQL rolls its transaction back."""
    path = _kick_off(world.r4, transaction(world))
    _kill_when_applied(KILLED_WORKER, str(_job(path).pk))
    assert _referral_rows() == (0, 0, 0)
    job = _job(path)
    # The attempt was counted when the job was leased: it is retried after the backoff.
    assert (job.status, job.attempts) == ("pending", 1)
    assert job.next_attempt_at > timezone.now()
    IntakeJob.objects.update(next_attempt_at=timezone.now())  # the backoff ran out

    deadline = time.monotonic() + 30  # until PostgreSQL ended the dead worker's session
    while (finished := intake_drain()) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert finished == 1
    assert Referral.objects.count() == 1
    assert _job(path).status == "done"


KILLED_BATCH = """
import sys, time
from fhir_gateway import handlers
from fhir_gateway.intake import intake_drain
real = handlers.SYSTEM_INTERACTIONS["transaction"]
applied = []
def second_hangs(*args):
    text = real(*args)
    applied.append(1)
    if len(applied) == 2:
        print("applied", flush=True)  # two referrals written, not committed
        time.sleep(120)
    return text
handlers.SYSTEM_INTERACTIONS["transaction"] = second_hangs
intake_drain()
"""


@pytest.mark.django_db(transaction=True)
def test_worker_killed_mid_batch_loses_nothing_and_each_job_is_applied_once(
    world: World,
) -> None:
    paths = [_kick_off(world.r4, transaction(world, f"SR-{n}")) for n in range(3)]
    _kill_when_applied(KILLED_BATCH)
    assert _referral_rows() == (0, 0, 0)
    assert [(_job(p).status, _job(p).attempts) for p in paths] == [("pending", 1)] * 3
    IntakeJob.objects.update(next_attempt_at=timezone.now())  # the backoff ran out

    deadline = time.monotonic() + 30  # until PostgreSQL ended the dead worker's session
    finished = 0
    while finished < 3 and time.monotonic() < deadline:
        finished += intake_drain()
        time.sleep(0.05)
    assert finished == 3
    assert sorted(Referral.objects.values_list("placer_value", flat=True)) == [
        "SR-0",
        "SR-1",
        "SR-2",
    ]
    assert [(_job(p).status, _job(p).attempts) for p in paths] == [("done", 2)] * 3
    assert department_load_matches()


@pytest.mark.django_db(transaction=True)
def test_concurrent_drains_share_the_jobs_and_apply_each_once(world: World, settings: Any) -> None:
    """Four workers' batches at once, all routed to one department (its counter rows are
    the contended ones): every job applied once, the counters equal a fresh count."""
    settings.FHIR_INTAKE_BATCH = 3
    paths = [_kick_off(world.r4, transaction(world, f"SR-{n}")) for n in range(24)]
    results: list[Any] = []
    start = threading.Barrier(4)

    def drain() -> None:
        try:
            start.wait(10)
            results.append(intake_drain())
        except Exception as exc:  # noqa: BLE001 (recorded for the assertion)
            results.append(exc)
        finally:
            connections.close_all()

    workers = [threading.Thread(target=drain) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)

    assert all(isinstance(r, int) for r in results), results
    assert sum(results) == 24
    assert {_job(p).status for p in paths} == {"done"}
    assert Referral.objects.count() == 24
    assert len(set(Referral.objects.values_list("placer_value", flat=True))) == 24
    assert department_load_matches()


def _kills_its_session(placers: set[str]) -> Any:
    """The transaction interaction, which for ``placers`` writes the referral and then has
    PostgreSQL end its own database session."""
    real = handlers.SYSTEM_INTERACTIONS["transaction"]

    def apply(*args: Any) -> handlers.TransactionAnswer:
        text = real(*args)
        if _placer(args[1]) in placers:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return text

    return apply


@pytest.mark.django_db(transaction=True)
def test_a_bundle_that_kills_its_session_in_a_batch_holds_back_no_other_job(
    world: World, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """The batch dies with the session (a transient error: attempts given back); then
    every job is leased alone: the others are applied, and the culprit, killing its
    session each time, is given up after its attempts."""
    settings.FHIR_INTAKE_MAX_ATTEMPTS = 3
    monkeypatch.setitem(
        handlers.SYSTEM_INTERACTIONS, "transaction", _kills_its_session({"SR-poison"})
    )
    paths = [_kick_off(world.r4, transaction(world, p)) for p in ("SR-a", "SR-poison", "SR-b")]

    history = []
    for _round in range(4):  # as beat's drains, each a task of its own
        IntakeJob.objects.update(next_attempt_at=timezone.now())  # the backoff ran out
        intake_drain()
        connections.close_all()
        history.append([(_job(p).status, _job(p).attempts) for p in paths])

    assert history == [
        [("pending", 0), ("pending", 0), ("pending", 0)],  # the whole batch, given back
        [("done", 1), ("pending", 1), ("done", 1)],  # alone: the second one counts
        [("done", 1), ("pending", 2), ("done", 1)],
        [("done", 1), ("done", 3), ("done", 1)],  # given up
    ]
    assert sorted(Referral.objects.values_list("placer_value", flat=True)) == ["SR-a", "SR-b"]
    assert _answer(world.r4, paths[1])["response"]["status"] == "500 Internal Server Error"
    assert department_load_matches()


@pytest.mark.django_db
def test_jobs_with_a_single_attempt_are_not_batched(settings: Any) -> None:
    settings.FHIR_INTAKE_BATCH = 20
    settings.FHIR_INTAKE_MAX_ATTEMPTS = 1
    assert intake.batch_size() == 1
    settings.FHIR_INTAKE_MAX_ATTEMPTS = 2
    assert intake.batch_size() == 20


# --------------------------------------------------------------------------- retention, beat


@pytest.mark.django_db
def test_retention_forgets_old_answers_and_keeps_pending_jobs(world: World) -> None:
    old, recent, waiting = (_kick_off(world.r4, transaction(world, f"SR-{n}")) for n in range(3))
    intake_process(job_id=_job(old).pk)
    intake_process(job_id=_job(recent).pk)
    long_ago = timezone.now() - timedelta(days=8)
    IntakeJob.objects.filter(pk=_job(old).pk).update(finished_at=long_ago)
    IntakeJob.objects.filter(pk=_job(waiting).pk).update(created_at=long_ago)

    report = retention_prune()

    assert report.intake_deleted == 1
    assert set(IntakeJob.objects.values_list("pk", flat=True)) == {
        _job(recent).pk,
        _job(waiting).pk,
    }
    assert Referral.objects.count() == 2


@pytest.mark.django_db
def test_members_take_turns_so_a_backlog_holds_back_no_other_member(
    world: World, settings: Any
) -> None:
    """A member uploading a backlog and another sending two Bundles after it: each batch
    takes the members' oldest jobs in turn, not the backlog first."""
    settings.FHIR_INTAKE_BATCH = 4
    other = member_client(
        UserFactory.create(facility=world.network.spoke, roles=[Role.MEMBER_SYSTEM])
    )
    backlog = [_kick_off(world.r4, transaction(world, f"SR-backlog-{n}")) for n in range(6)]
    late = [_kick_off(other, transaction(world, f"SR-late-{n}")) for n in range(2)]

    first = intake.intake_process_next(limit=4)

    assert [(_placer(json.loads(job.body)), outcome) for job, outcome in first] == [
        ("SR-backlog-0", "done"),
        ("SR-late-0", "done"),
        ("SR-backlog-1", "done"),
        ("SR-late-1", "done"),
    ]
    assert intake_drain() == 4  # the rest of the backlog, oldest first
    order = list(Referral.objects.order_by("pk").values_list("placer_value", flat=True))
    assert order[4:] == [f"SR-backlog-{n}" for n in range(2, 6)]
    assert {_job(p).status for p in backlog + late} == {"done"}


@pytest.mark.django_db
def test_a_members_urgent_bundle_goes_before_its_own_backlog_not_before_others(
    world: World, settings: Any
) -> None:
    """Three urgent Bundles, then a stat one from the same member, then another member's
    urgent one: the stat one is applied first, the other member still gets its turn."""
    settings.FHIR_INTAKE_BATCH = 3
    other = member_client(
        UserFactory.create(facility=world.network.spoke, roles=[Role.MEMBER_SYSTEM])
    )
    backlog = [_kick_off(world.r4, transaction(world, f"SR-routine-{n}")) for n in range(3)]
    stat = transaction(world, "SR-stat")
    stat["entry"][1]["resource"]["priority"] = "stat"
    urgent = _kick_off(world.r4, stat)
    theirs = _kick_off(other, transaction(world, "SR-theirs"))
    assert [_job(p).priority for p in (*backlog, urgent, theirs)] == [3, 3, 3, 1, 3]

    first = intake.intake_process_next(limit=3)

    assert [_placer(json.loads(job.body)) for job, _outcome in first] == [
        "SR-stat",
        "SR-theirs",
        "SR-routine-0",
    ]
    assert intake_drain() == 2
    order = list(Referral.objects.order_by("pk").values_list("placer_value", flat=True))
    assert order == ["SR-stat", "SR-theirs", "SR-routine-0", "SR-routine-1", "SR-routine-2"]
    assert Referral.objects.get(placer_value="SR-stat").priority == 1


def _bundle_with(*priorities: Any, other: Any = None) -> dict[str, Any]:
    entries: list[Any] = [
        {"resource": {"resourceType": "ServiceRequest", "priority": p}} for p in priorities
    ]
    if other is not None:
        entries.append({"resource": {"resourceType": "Task", "priority": other}})
    return {"resourceType": "Bundle", "entry": [*entries, "junk", {"resource": 3}]}


@pytest.mark.django_db
def test_a_members_stat_bundles_go_at_their_own_age_among_members(
    world: World, settings: Any
) -> None:
    """Member A: a routine job due 100 minutes ago, then three stat ones due just now;
    member B: one due 50 minutes ago. One job per claim: B's goes first (A puts its stat
    jobs forward, and they are younger), then A's stat ones, then A's routine one. A
    member's stat Bundles never hold another member back."""
    settings.FHIR_INTAKE_BATCH = 1
    other = member_client(
        UserFactory.create(facility=world.network.spoke, roles=[Role.MEMBER_SYSTEM])
    )
    old = _kick_off(world.r4, transaction(world, "SR-A-old"))
    stats = []
    for n in range(3):
        bundle = transaction(world, f"SR-A-stat-{n}")
        bundle["entry"][1]["resource"]["priority"] = "stat"
        stats.append(_kick_off(world.r4, bundle))
    theirs = _kick_off(other, transaction(world, "SR-B"))
    now = timezone.now()
    for minutes, path in ((100, old), (50, theirs), *((3 - n, p) for n, p in enumerate(stats))):
        IntakeJob.objects.filter(pk=_job(path).pk).update(
            next_attempt_at=now - timedelta(minutes=minutes)
        )

    order = []
    while claimed := intake.intake_process_next(limit=1):
        order += [_placer(json.loads(job.body)) for job, _outcome in claimed]

    assert order == ["SR-B", "SR-A-stat-0", "SR-A-stat-1", "SR-A-stat-2", "SR-A-old"]


@pytest.mark.parametrize(
    ("bundle", "rank"),
    [
        ({"resourceType": "Bundle"}, 4),
        ({"resourceType": "Bundle", "entry": None}, 4),
        (_bundle_with("routine"), 4),
        (_bundle_with("urgent"), 3),
        (_bundle_with("asap", "urgent"), 2),
        (_bundle_with("stat", "routine"), 1),
        (_bundle_with("bogus"), 4),
        (_bundle_with(1), 4),
        (_bundle_with("STAT"), 4),
        (_bundle_with(None), 4),
        (_bundle_with("routine", other="stat"), 4),  # only the referral's own priority
    ],
)
def test_the_priority_of_a_bundle_is_its_most_urgent_service_request(
    bundle: dict[str, Any], rank: int
) -> None:
    assert intake.priority_of(bundle) == rank


@pytest.mark.django_db
def test_a_job_not_yet_due_waits_for_its_time(world: World) -> None:
    path = _kick_off(world.r4, transaction(world))
    IntakeJob.objects.update(next_attempt_at=timezone.now() + timedelta(minutes=1))

    assert intake_drain() == 0
    assert _referral_rows() == (0, 0, 0)
    IntakeJob.objects.update(next_attempt_at=timezone.now())
    assert intake_drain() == 1
    assert _job(path).status == "done"


def test_beat_drains_the_intake(settings: Any) -> None:
    from config.celery import app
    from fhir_gateway.tasks import intake_drain_task

    entry = settings.CELERY_BEAT_SCHEDULE["fhir-intake-drain"]
    assert entry["task"] == intake_drain_task.name == "fhir_gateway.intake_drain"
    assert entry["options"]["expires"] > entry["schedule"]
    assert app.tasks["fhir_gateway.intake_drain"].name == intake_drain_task.name


@pytest.mark.django_db
def test_an_insert_of_the_code_before_the_priority_column_still_works(world: World) -> None:
    """While migration 0007 is deployed, web processes of the code before it insert jobs
    without the column: the database default makes them routine."""
    job = IntakeJob(user=world.submitter, body="{}", fhir_version="4.0", answer_version="4.0")
    fields = [f for f in IntakeJob._meta.concrete_fields if f.name != "priority"]
    values = [f.get_db_prep_save(getattr(job, f.attname), connection) for f in fields]
    columns = ", ".join(f.column for f in fields)
    marks = ", ".join(["%s"] * len(fields))
    sql = f"INSERT INTO {IntakeJob._meta.db_table} ({columns}) VALUES ({marks})"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
    assert IntakeJob.objects.get(pk=job.pk).priority == 4


@pytest.mark.django_db
@pytest.mark.parametrize("answer", [FHIR_R4, FHIR_R5])
def test_an_applied_batch_answers_each_bundle_with_its_stored_versions(
    world: World, answer: str
) -> None:
    """The transaction-response is built from the versions the projection stored (not
    read back): each entry equals what reading its location returns, also when several
    jobs share the batch's transaction and the second is a resubmission."""
    paths = [
        _kick_off(world.r4, transaction(world, placer), Accept=answer)
        for placer in ("SR-1", "SR-2", "SR-1")
    ]
    assert intake_drain() == 3
    for path in paths:
        for entry in _answer(world.r4, path, Accept=answer)["resource"]["entry"]:
            location = entry["response"]["location"]
            read = world.r4.get(f"/fhir/{location}", Accept=answer)
            assert read.status_code == 200, read.content
            assert entry["resource"] == body(read)
            assert entry["response"]["etag"] == read["ETag"]


@pytest.mark.django_db
def test_a_refusal_repeating_a_lone_surrogate_breaks_neither_its_batch_nor_its_answer(
    world: World,
) -> None:
    """Found by a review: a refusal whose diagnostics repeat a lone surrogate (a JSON
    ``\\ud800`` escape) could not be encoded when the batch's answers were written, which
    rolled back every job of the batch; the synchronous answer was a 500."""
    good, bad = transaction(world, "SR-1"), transaction(world, "SR-2")
    bad["entry"][0]["request"]["method"] = "\ud800"  # json.dumps sends the escape
    paths = [_kick_off(world.r4, bundle) for bundle in (good, bad)]
    outcomes = [outcome for _job, outcome in intake_process_next(limit=10)]
    assert outcomes == ["done", "refused"]
    assert Referral.objects.count() == 1
    refused = _answer(world.r4, paths[1])
    assert refused["response"]["status"].startswith("4")
    assert "\ud800" in refused["response"]["outcome"]["issue"][0]["diagnostics"]
    synchronous = world.r4.post("/fhir", bad)
    assert synchronous.status_code == int(refused["response"]["status"].split()[0])
    assert "\ud800" in outcome_issue(synchronous)["diagnostics"]


# --------------------------------------------------------------------------- found by a review


@pytest.mark.django_db
@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_a_bom_less_utf16_or_32_body_is_applied_as_the_synchronous_one(
    world: World, codec: str
) -> None:
    """It decoded as UTF-8 (NUL bytes and all): PostgreSQL refused the text (422), SQLite
    kept it and every attempt failed to parse it (a 500 after five)."""
    synchronous = world.r4.post("/fhir", json.dumps(transaction(world, "SR-sync")).encode(codec))
    assert synchronous.status_code == 200, synchronous.content
    path = _kick_off(world.r4, json.dumps(transaction(world, "SR-async")).encode(codec))
    assert intake_process(job_id=_job(path).pk) == "done"
    assert _job(path).result_status == 200
    assert "\x00" not in _job(path).body


@pytest.mark.django_db
def test_two_deletes_racing_on_a_pending_job(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second found the row cancelled under its lock and answered it as finished: a
    200 whose body was not JSON (a 500 for a job never applied), and the row deleted."""
    path = _kick_off(world.r4, transaction(world))
    real_job_of = intake._job_of

    def job_of_then_other_cancel(user: Any, job_id: str) -> IntakeJob:
        job = real_job_of(user, job_id)  # read pending
        monkeypatch.setattr(intake, "_job_of", real_job_of)
        assert world.r4.delete(path).status_code == 202  # the other DELETE commits
        return job

    monkeypatch.setattr(intake, "_job_of", job_of_then_other_cancel)
    second = world.r4.delete(path)
    assert second.status_code == 404, second.content[:300]
    job = IntakeJob.objects.get()
    assert job.status == IntakeJob.Status.CANCELLED  # kept: the first cancel's record


@pytest.mark.django_db
def test_a_lease_outlives_the_longest_apply(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first lease was 10 s while an apply may run 60 s: a slow batch's jobs fell due
    again while it held them, and every other drain found them locked and ended empty."""
    path = _kick_off(world.r4, transaction(world))
    seen: list[Any] = []
    real_apply = intake._apply

    def watching(job: IntakeJob) -> tuple[int, str]:
        seen.append(IntakeJob.objects.get(pk=job.pk).next_attempt_at)
        return real_apply(job)

    monkeypatch.setattr(intake, "_apply", watching)
    started = timezone.now()
    assert intake_process(job_id=_job(path).pk) == "done"
    assert seen and seen[0] >= started + timedelta(seconds=intake.APPLY_TIMEOUT_SECONDS)
