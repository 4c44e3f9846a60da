"""Batch Bundles at POST /fhir (fhir_gateway/batch.py): each entry answered as the single
request would be (same account, version, scope, audit), independently of the others."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from django.db import connection

from fhir_gateway import handlers
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import (
    HIS_PATIENT,
    PLACER,
    World,
    accepted,
    body,
    message,
    service_request,
    submit,
    task_of,
    transaction,
)
from referrals.models import AuditEntry, Message, Referral, ReferralEvent

pytestmark = pytest.mark.django_db

UNKNOWN = "CSL-0123456789ABCDEF0123456789ABCDEF"


def batch(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "batch", "entry": list(entries)}


def note(task_id: str, text: str, version: str = FHIR_R4) -> dict[str, Any]:
    """A Communication on the referral in the batch's version."""
    resource = message(task_id, text)
    if version == FHIR_R5:
        resource["payload"] = [{"contentCodeableConcept": {"text": text}}]
    return resource


def get(url: str, **conditions: str) -> dict[str, Any]:
    return {"request": {"method": "GET", "url": url, **conditions}}


def post(url: str, resource: dict[str, Any], **conditions: str) -> dict[str, Any]:
    return {"resource": resource, "request": {"method": "POST", "url": url, **conditions}}


def put(url: str, resource: dict[str, Any], **conditions: str) -> dict[str, Any]:
    return {"resource": resource, "request": {"method": "PUT", "url": url, **conditions}}


def send(client: FhirClient, bundle: dict[str, Any], version: str = FHIR_R4, **headers: str) -> Any:
    response = client.post("/fhir", bundle, content_type=version, Accept=version, **headers)
    assert response.status_code == 200, response.content
    answer = body(response)
    assert answer["resourceType"] == "Bundle" and answer["type"] == "batch-response"
    assert len(answer["entry"]) == len(bundle["entry"])
    return answer["entry"]


def statuses(entries: list[dict[str, Any]]) -> list[str]:
    return [e["response"]["status"] for e in entries]


def state() -> tuple[Any, ...]:
    """What a refused or rolled-back write must leave as it was."""
    return (
        list(Referral.objects.order_by("pk").values_list("pk", "version", "state")),
        ReferralEvent.objects.count(),
        Message.objects.count(),
    )


def _without_request_ids(data: Any) -> None:
    """A search Bundle's own id, time and links, an OperationOutcome's id (the request's)
    say nothing of what was asked."""
    if isinstance(data, dict) and data.get("resourceType") in ("Bundle", "OperationOutcome"):
        for key in ("id", "meta", "link"):
            data.pop(key, None)


def _single(response: Any, logical_id: str | None = None) -> tuple[str, Any]:
    """A single request's answer as a batch entry holds it: the status line and the body
    (without a search Bundle's own id, time and links, and with the id replaced)."""
    from http import HTTPStatus

    text = response.content.decode()
    if logical_id:
        text = text.replace(logical_id, "<id>")
    data = json.loads(text) if text else None
    _without_request_ids(data)
    code = response.status_code
    return f"{code} {HTTPStatus(code).phrase}", data


def _entry(entry: dict[str, Any], logical_id: str | None = None) -> tuple[str, Any]:
    data = entry["response"].get("outcome") or entry.get("resource")
    text = json.dumps(data)
    if logical_id:
        text = text.replace(logical_id, "<id>")
    data = json.loads(text)
    _without_request_ids(data)
    return entry["response"]["status"], data


# --------------------------------------------------------------------------- mixed batches


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_reads_searches_creates_and_updates_one_failing_the_others_applied(
    world: World, version: str
) -> None:
    task_id = str(task_of(submit(world))["id"])
    task = body(world.r4.get(f"/fhir/Task/{task_id}", Accept=version))
    before_messages = Message.objects.count()
    entries = send(
        world.r4,
        batch(
            get(f"Task/{task_id}"),
            get(f"ServiceRequest?identifier={PLACER}|SR-1"),
            post("Communication", note(task_id, "Hb 9.1", version)),
            get("Task/" + UNKNOWN),  # fails alone
            put(  # the submitter cancels its referral (If-Match: the version read)
                f"Task/{task_id}",
                {**task, "status": "cancelled"},
                ifMatch=f'W/"{task["meta"]["versionId"]}"',
            ),
            post(
                "ServiceRequest",
                service_request(world, "SR-2", subject=HIS_PATIENT, version=version[-3:]),
                ifNoneExist=f"identifier={PLACER}|SR-2",
            ),
        ),
        version,
    )

    assert statuses(entries) == [
        "200 OK",
        "200 OK",
        "201 Created",
        "404 Not Found",
        "200 OK",
        "201 Created",
    ]
    read, search, created, missing, updated, conditional = entries
    assert read["resource"]["id"] == task_id
    assert read["fullUrl"].endswith(f"/fhir/Task/{task_id}")
    assert read["response"]["etag"] == f'W/"{task["meta"]["versionId"]}"'
    assert read["response"]["lastModified"].endswith("Z")
    assert search["resource"]["type"] == "searchset"
    assert search["resource"]["total"] == 1
    assert created["resource"]["resourceType"] == "Communication"
    assert "/fhir/Communication/" in created["response"]["location"]
    assert missing["response"]["outcome"]["issue"][0]["code"] == "not-found"
    assert "resource" not in missing
    assert updated["resource"]["status"] == "cancelled"
    assert updated["response"]["etag"] != read["response"]["etag"]
    assert conditional["resource"]["resourceType"] == "ServiceRequest"
    # the answers are in the batch's version (R5: Task.focus... R4: ServiceRequest.reasonCode)
    sr = conditional["resource"]
    assert ("reasonCode" in sr) == (version == FHIR_R4)
    assert ("reason" in sr) == (version == FHIR_R5)
    # applied: a message, the cancellation, a second referral
    assert Message.objects.count() == before_messages + 1
    assert Referral.objects.get(filler_id=task_id).state == "cancelled"
    assert Referral.objects.count() == 2

    # The same conditional create again is answered with the existing one (200), as alone.
    again = send(
        world.r4,
        batch(
            post(
                "ServiceRequest",
                service_request(world, "SR-2", subject=HIS_PATIENT, version=version[-3:]),
                ifNoneExist=f"identifier={PLACER}|SR-2",
            )
        ),
        version,
    )
    assert statuses(again) == ["200 OK"]
    assert again[0]["resource"]["id"] == conditional["resource"]["id"]
    assert Referral.objects.count() == 2


def test_a_failing_write_rolls_back_only_itself(world: World) -> None:
    task_id = accepted(world)
    task = body(world.r4.get(f"/fhir/Task/{task_id}"))
    stale = f'W/"{int(task["meta"]["versionId"]) - 1}"'
    before = state()

    entries = send(
        world.r4,
        batch(
            put(f"Task/{task_id}", {**task, "status": "cancelled"}, ifMatch=stale),  # 412
            post("Communication", message(task_id, "first")),
            post("Communication", {**message(task_id, "x"), "status": "bogus"}),  # invalid
            post("Communication", message(task_id, "second")),
        ),
    )

    assert statuses(entries) == [
        "412 Precondition Failed",
        "201 Created",
        "422 Unprocessable Entity",
        "201 Created",
    ]
    assert entries[0]["response"]["outcome"]["issue"][0]["code"] == "conflict"
    referrals, _events, messages = state()
    assert referrals == before[0]  # the stale cancel changed nothing
    assert messages == before[2] + 2
    assert sorted(Message.objects.values_list("text", flat=True))[-2:] == ["first", "second"]


def test_a_database_error_in_one_entry_does_not_reach_the_next(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry whose statement fails in PostgreSQL (an aborted transaction) after writing:
    its write is rolled back, and the next entry runs on a clean connection."""
    task_id = accepted(world)
    handler = handlers.HANDLERS["Communication"]
    real = handler.create
    assert real is not None

    def fails_after_writing(request: handlers.WriteRequest) -> Any:
        result = real(request)
        if "poison" in json.dumps(request.resource):
            with connection.cursor() as cursor:
                cursor.execute("SELECT * FROM no_such_table")  # aborts the transaction
        return result

    monkeypatch.setattr(handler, "create", fails_after_writing)
    before = Message.objects.count()

    entries = send(
        world.r4,
        batch(
            post("Communication", message(task_id, "poison")),
            post("Communication", message(task_id, "fine")),
            get(f"Task/{task_id}"),
        ),
    )

    assert statuses(entries) == ["500 Internal Server Error", "201 Created", "200 OK"]
    assert list(Message.objects.order_by("pk").values_list("text", flat=True))[before:] == ["fine"]


# --------------------------------------------------------------------------- scope


def _scoped_requests(task: dict[str, Any], logical_id: str) -> list[dict[str, Any]]:
    """Batch entries naming ``logical_id``: reads, a vread, a history, searches, an update
    and a create."""
    return [
        get(f"Task/{logical_id}"),
        get(f"Patient/{logical_id}"),
        get(f"Task/{logical_id}", ifNoneMatch='W/"3"'),
        get(f"Task/{logical_id}/_history/1"),
        get(f"Task/{logical_id}/_history"),
        get(f"Task?_id={logical_id}&_summary=count"),
        get(f"Communication?part-of=Task/{logical_id}"),
        put(
            f"Task/{logical_id}",
            {**task, "id": logical_id, "status": "cancelled"},
            ifMatch='W/"1"',
        ),
        post("Communication", message(logical_id, "x")),
    ]


def _sent_alone(client: FhirClient, entry: dict[str, Any]) -> Any:
    """The single request an entry stands for."""
    spec = entry["request"]
    path = "/fhir/" + spec["url"]
    headers = {
        header: spec[element]
        for element, header in (("ifMatch", "If-Match"), ("ifNoneMatch", "If-None-Match"))
        if element in spec
    }
    if spec["method"] == "GET":
        return client.get(path, **headers)
    if spec["method"] == "PUT":
        return client.put(path, entry["resource"], **headers)
    return client.post(path, entry["resource"], **headers)


def test_out_of_scope_entries_answer_as_the_single_requests(world: World) -> None:
    task_id = accepted(world)
    task = body(world.r4.get(f"/fhir/Task/{task_id}"))
    before = state()
    answers = {}
    for logical_id in (task_id, UNKNOWN):
        requests = _scoped_requests(task, logical_id)
        singles = [_sent_alone(world.other, entry) for entry in requests]
        entries = send(world.other, batch(*requests))
        for index, (single, entry) in enumerate(zip(singles, entries, strict=True)):
            assert _entry(entry, logical_id) == _single(single, logical_id), index
        answers[logical_id] = [_entry(e, logical_id) for e in entries]
    # an outsider learns nothing: the referral's ids answer as a never-issued one
    assert answers[task_id] == answers[UNKNOWN]
    assert {status for status, _ in answers[task_id]} == {"200 OK", "404 Not Found"}
    assert state() == before


def test_each_entry_is_audited_as_its_single_request(world: World) -> None:
    task_id = str(task_of(submit(world))["id"])
    pk = Referral.objects.get(filler_id=task_id).pk

    def entries_audited() -> list[tuple[Any, ...]]:
        return list(
            AuditEntry.objects.order_by("id").values_list(
                "user__username", "action", "referral_id", "detail", "ip_address"
            )
        )

    AuditEntry.objects.all().delete()
    world.r4.get(f"/fhir/Task/{task_id}")
    world.r4.get(f"/fhir/ServiceRequest/{task_id}")
    world.r4.post("/fhir/Communication", message(task_id, "one"))
    world.other.get(f"/fhir/Task/{task_id}")  # refused: not recorded
    alone = entries_audited()
    AuditEntry.objects.all().delete()

    send(
        world.r4,
        batch(
            get(f"Task/{task_id}"),
            get(f"ServiceRequest/{task_id}"),
            post("Communication", message(task_id, "two")),
        ),
    )
    send(world.other, batch(get(f"Task/{task_id}")))

    assert entries_audited() == alone
    assert [a[2] for a in alone] == [pk, pk, pk]


# --------------------------------------------------------------------------- refusals


def test_more_entries_than_the_limit_is_refused_whole(world: World, settings: Any) -> None:
    task_id = accepted(world)
    settings.FHIR_BATCH_MAX_ENTRIES = 2
    before = state()
    bundle = batch(*(post("Communication", message(task_id, str(i))) for i in range(3)))

    response = world.r4.post("/fhir", bundle)

    assert response.status_code == 413
    issue = outcome_issue(response)
    assert issue["code"] == "too-costly"
    assert "at most 2 entries" in issue["diagnostics"]
    assert state() == before
    # at the limit: processed
    assert statuses(send(world.r4, batch(*bundle["entry"][:2]))) == ["201 Created"] * 2


def test_entries_naming_each_other_refuse_the_bundle(world: World) -> None:
    """FHIR http.html#brules: no interdependencies between a batch's entries. The referral
    transaction sent as a batch (its ServiceRequest names the Patient entry's urn:uuid)."""
    bundle = {**transaction(world), "type": "batch"}

    response = world.r4.post("/fhir", bundle)

    assert response.status_code == 400
    issue = outcome_issue(response)
    assert issue["code"] == "invalid"
    assert "urn:uuid:patient-1" in issue["diagnostics"]
    assert issue["expression"] == ["Bundle.entry[1]"]
    assert Referral.objects.count() == 0

    # ... also when only a request names it (a conditional create)
    task_id = accepted(world)
    before = state()
    named = batch(
        {"fullUrl": "urn:uuid:m-1", **post("Communication", message(task_id, "a"))},
        post("Communication", message(task_id, "b"), ifNoneExist="identifier=urn:uuid:m-1"),
    )
    response = world.r4.post("/fhir", named)
    assert response.status_code == 400
    assert outcome_issue(response)["expression"] == ["Bundle.entry[1]"]
    assert state() == before
    # A fullUrl that only begins another's (urn:uuid:m-1 in urn:uuid:m-10) names nothing:
    # both run (it was refused as a dependency).
    apart = batch(
        {"fullUrl": "urn:uuid:m-1", **post("Communication", message(task_id, "a"))},
        post("Communication", message(task_id, "b"), ifNoneExist="identifier=urn:x|urn:uuid:m-10"),
    )
    answered = send(world.r4, apart)
    assert statuses(answered) == ["201 Created"] * 2, answered[1]


def test_malformed_entries_are_their_own_400(world: World) -> None:
    task_id = accepted(world)
    before = state()
    pdf = base64.b64encode(b"[]").decode()
    entries = send(
        world.r4,
        batch(
            {"resource": message(task_id, "no request")},
            {"request": {"method": "post", "url": "Communication"}},
            {"request": {"method": "GET"}},
            {"request": {"method": "GET", "url": 7}},
            "not an object",  # type: ignore[arg-type]
            get("https://elsewhere.example.org/fhir/Task"),
            {"request": {"method": "GET", "url": "Task", "ifNoneMatch": 3}},
            post("/", batch(get("Task"))),  # a nested batch
            post("http://testserver/fhir", {**transaction(world), "type": "transaction"}),
            {
                "request": {"method": "PATCH", "url": f"Task/{task_id}"},
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/json-patch+json",
                    "data": "not base64!",
                },
            },
            get(f"Task/{task_id}"),  # and a good one among them
            {
                "request": {"method": "PATCH", "url": f"Task/{task_id}"},
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/json-patch+json",
                    "data": pdf,
                },
            },  # an empty JSON Patch: nothing changed, 200
        ),
    )
    assert statuses(entries) == ["400 Bad Request"] * 10 + ["200 OK", "200 OK"]
    codes = [e["response"]["outcome"]["issue"][0]["code"] for e in entries[:10]]
    assert codes == [
        "required",
        "invalid",
        "required",
        "required",
        "structure",
        "not-supported",
        "invalid",
        "not-supported",
        "not-supported",
        "invalid",
    ]
    assert entries[-2]["resource"]["id"] == task_id
    assert state() == before


def test_a_batch_with_respond_async_is_refused(world: World) -> None:
    task_id = accepted(world)
    before = state()
    response = world.r4.post(
        "/fhir", batch(post("Communication", message(task_id, "x"))), Prefer="respond-async"
    )
    assert response.status_code == 422
    assert "respond-async" in outcome_issue(response)["diagnostics"]
    assert "Content-Location" not in response
    assert state() == before


def test_an_absolute_url_on_this_server_and_an_encoded_query(world: World) -> None:
    task_id = str(task_of(submit(world))["id"])
    entries = send(
        world.r4,
        batch(
            get(f"http://testserver/fhir/Task/{task_id}"),
            get("ServiceRequest?identifier=" + PLACER.replace(":", "%3A") + "%7CSR-1"),
            get("Task?_count=1&bogus=1"),
            {"request": {"method": "HEAD", "url": f"Task/{task_id}"}},
            {"request": {"method": "POST", "url": "Task/_search"}},  # a form body: no entry
        ),
    )
    assert statuses(entries) == ["200 OK"] * 4 + ["415 Unsupported Media Type"]
    assert "resource" not in entries[3]
    assert entries[3]["response"]["etag"] == entries[0]["response"]["etag"]
    assert entries[0]["resource"]["id"] == task_id
    assert entries[1]["resource"]["total"] == 1
    # what the single search says in X-FHIR-Ignored-Parameters, the entry says as a warning
    warning = entries[2]["response"]["outcome"]["issue"][0]
    assert (warning["severity"], warning["diagnostics"]) == (
        "warning",
        "Parameters not read: bogus",
    )


def test_an_entry_url_on_this_server_written_otherwise_is_this_servers(world: World) -> None:
    """It was: an entry's absolute url was compared as text (scheme and host:port), so
    this server's base with the default port written (or the host in another case, for the
    scheme) was 400 'not on this server', though a reference written so names ours
    (docs/fhir.md, *References in writes*)."""
    # Given a referral
    task_id = str(task_of(submit(world))["id"])

    # When a batch reads its Task at URLs on this server's base, written otherwise
    entries = send(
        world.r4,
        batch(
            get(f"http://testserver:80/fhir/Task/{task_id}"),
            get(f"HTTP://TestServer/fhir/Task/{task_id}"),
            get(f"https://testserver/fhir/Task/{task_id}"),
        ),
    )

    # Then each is that Task; another scheme (another origin) is still not this server
    assert statuses(entries) == ["200 OK", "200 OK", "400 Bad Request"]
    assert entries[0]["resource"]["id"] == entries[1]["resource"]["id"] == task_id


def test_prefer_minimal_answers_entries_without_resources(world: World) -> None:
    task_id = accepted(world)
    entries = send(
        world.r4, batch(post("Communication", message(task_id, "x"))), Prefer="return=minimal"
    )
    assert statuses(entries) == ["201 Created"]
    assert "resource" not in entries[0]
    assert entries[0]["response"]["location"].startswith("http://testserver/fhir/Communication/")
    assert entries[0]["response"]["etag"] == 'W/"1"'


def test_an_empty_batch_answers_an_empty_batch_response(world: World) -> None:
    response = world.r4.post("/fhir", batch())
    assert response.status_code == 200
    assert body(response)["type"] == "batch-response"


# --------------------------------------------------------------------------- a real client


@pytest.mark.django_db(transaction=True)
def test_fhirpy_sends_a_batch_to_the_running_server(live_server: Any, world: World) -> None:
    """fhirpy (no batch helper: ``execute`` POSTs the Bundle to the base) against the live
    server, where each entry commits on its own (no test transaction around them); the
    answer parses with fhirclient's strict R4 Bundle model."""
    from fhirclient.models.bundle import Bundle as StrictBundle
    from fhirpy import SyncFHIRClient

    from accounts.services import api_token_issue

    task_id = str(task_of(submit(world))["id"])
    token = api_token_issue(user=world.submitter, name="fhirpy").raw
    client = SyncFHIRClient(f"{live_server.url}/fhir", authorization=f"Bearer {token}")
    before = Message.objects.count()

    answer = client.execute(
        "",
        method="post",
        data=batch(
            get(f"Task/{task_id}"),
            post("Communication", message(task_id, "over fhirpy")),
            post("Communication", {**message(task_id, "x"), "status": "bogus"}),
            get("Task?status=requested&_count=5"),
        ),
    )

    assert answer["type"] == "batch-response"
    assert statuses(answer["entry"]) == [
        "200 OK",
        "201 Created",
        "422 Unprocessable Entity",
        "200 OK",
    ]
    parsed = StrictBundle(answer)  # strict: raises on anything R4 does not define
    assert parsed.entry[0].resource.id == task_id
    assert parsed.entry[2].response.outcome.issue[0].severity == "error"
    assert list(Message.objects.values_list("text", flat=True))[before:] == ["over fhirpy"]


def test_junk_entries_are_answered_never_with_a_500(world: World) -> None:
    """(A NUL anywhere in the batch's body refuses it whole, as any body: 400.)"""
    task_id = accepted(world)
    before = state()
    urls: list[Any] = [
        None,
        "",
        " \n",
        "%",
        "%ZZ",
        "Task/%00",
        "Task?_id=%00",
        "Task?_id=\u00e4",
        "http://",
        "//elsewhere/fhir/Task",
        "Task#fragment",
        "../../admin/",
        "Task/" + "a" * 5000,
        "\u00c4/\u00f6",
        "$versions",
        "metadata",
        "_async/nope",
        "Task/_history",
        f"Task/{task_id}/_history/x",
        f"Task/{task_id}/$nope",
        "urn:uuid:1",
    ]
    junk: list[dict[str, Any]] = [
        {"request": {"method": method, "url": url}} for method in ("GET", "DELETE") for url in urls
    ]
    bodies: list[Any] = [None, [], "x", {}, {"resourceType": 1}, message(task_id, "y" * 70000)]
    junk += [
        {"request": {"method": method, "url": url}, "resource": resource}
        for method in ("POST", "PUT", "PATCH")
        for url in ("Communication", f"Task/{task_id}", "Binary")
        for resource in bodies
    ]
    junk += [
        {"request": {"method": m, "url": "Task"}} for m in (None, 1, "", "GET ", "get", "TRACE")
    ]
    junk += [
        {"request": {"method": "GET", "url": f"Task/{task_id}", "ifNoneMatch": value}}
        for value in ("", "*", "W/", "\n", 'W/"99999999999999999999"')
    ]

    for start in range(0, len(junk), 100):
        entries = send(world.r4, batch(*junk[start : start + 100]))
        for sent, entry in zip(junk[start : start + 100], entries, strict=True):
            assert not entry["response"]["status"].startswith("5"), (sent, entry)
    assert state() == before


def test_a_batch_patch_binary_may_wrap_its_base64_as_fhir_allows(world: World) -> None:
    """FHIR's base64Binary may hold whitespace (MIME's 76-column lines), dropped as every
    other base64 read here (referral_mapping.attachment_bytes); a batch PATCH entry's
    Binary was refused with 400 'not base64' (found by review)."""
    task_id = str(task_of(submit(world))["id"])
    patch = json.dumps([{"op": "replace", "path": "/status", "value": "received"}]).encode()
    data = base64.b64encode(patch).decode()
    wrapped = "\n".join(data[i : i + 76] for i in range(0, len(data), 76))
    assert "\n" in wrapped
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "request": {"method": "PATCH", "url": f"Task/{task_id}"},
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/json-patch+json",
                    "data": wrapped,
                },
            }
        ],
    }
    response = world.r5.post("/fhir", bundle, content_type=FHIR_R5, Accept=FHIR_R5)
    assert response.status_code == 200, response.content
    (entry,) = body(response)["entry"]
    assert entry["response"]["status"] == "200 OK", entry
    assert Referral.objects.get(filler_id=task_id).acknowledged_at is not None
