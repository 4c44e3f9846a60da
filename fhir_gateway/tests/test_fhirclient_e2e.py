"""End to end with SMART on FHIR's client-py (fhirclient 4.4.0, R4 models, strict parsing)
against the running server: the CapabilityStatement, a submission, the consultant system's
worklist, accept, a Communication, the consult note read back by the submitter, paging.

fhirclient has no setting for a bearer token nor for a request's headers (If-Match,
If-None-Exist): both go on its requests session (``server.session.headers``), as
docs/fhir.md shows. Where fhirclient and FHIR R4 disagree, the test shows what it sends
and what to send instead (docs/fhir.md, *Connecting a member system with fhirclient*)."""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from fhirclient import client as fhir_client
from fhirclient.models.bundle import Bundle
from fhirclient.models.capabilitystatement import CapabilityStatement
from fhirclient.models.communication import Communication
from fhirclient.models.documentreference import DocumentReference
from fhirclient.models.operationoutcome import OperationOutcome
from fhirclient.models.servicerequest import ServiceRequest
from fhirclient.models.task import Task
from fhirclient.server import FHIRServer, FHIRUnauthorizedException

from accounts.models import User
from accounts.services import api_token_issue
from fhir_gateway import referral_mapping as m
from fhir_gateway.tests.referral_world import PLACER, World, service_request, transaction
from referrals.models import Referral, ReferralState

MESSAGE_SYSTEM = "https://codao.example.org/sid/message"


@pytest.fixture
def connect(live_server: Any) -> Iterator[Callable[[User], FHIRServer]]:
    """A member system's fhirclient server with its bearer token on the session. The
    sessions are closed at the end, and the live server's threads that served them are
    waited for: a kept-alive connection holds a thread and its database connection, and
    the test database could not be dropped."""
    servers: list[FHIRServer] = []

    def connect(user: User) -> FHIRServer:
        smart = fhir_client.FHIRClient(
            settings={"app_id": "consilium-e2e", "api_base": f"{live_server.url}/fhir"}
        )
        token = api_token_issue(user=user, name="fhirclient").raw
        smart.server.session.headers["Authorization"] = f"Bearer {token}"
        servers.append(smart.server)
        return smart.server

    yield connect
    _close(servers)


def _close(servers: list[FHIRServer]) -> None:
    gc.collect()  # a refusal kept by pytest.raises holds its response, and so the socket
    for server in servers:
        server.session.close()
    for thread in threading.enumerate():  # each closes its database connection as it ends
        if "process_request_thread" in thread.name:
            thread.join(timeout=10)


@contextmanager
def header(server: FHIRServer, name: str, value: str) -> Iterator[None]:
    """A header on the requests made inside the block (fhirclient's create/update take
    none)."""
    server.session.headers[name] = value
    try:
        yield
    finally:
        del server.session.headers[name]


def if_match(server: FHIRServer, resource: Any) -> Any:
    return header(server, "If-Match", f'W/"{resource.meta.versionId}"')


def _state(task: Task) -> str:
    return next(c.code for c in task.businessStatus.coding if c.system == m.REFERRAL_STATE_SYSTEM)


def _refusal(error: requests.HTTPError) -> tuple[int, Any]:
    """The status and the OperationOutcome's issue of a refused request (parsed with
    fhirclient's model)."""
    assert error.response is not None
    outcome = OperationOutcome(error.response.json())
    return error.response.status_code, outcome.issue[0]


@pytest.mark.django_db(transaction=True)
def test_the_capability_statement_parses_with_fhirclients_strict_r4_models(
    live_server: Any, world: World, connect: Callable[[User], FHIRServer]
) -> None:
    smart = fhir_client.FHIRClient(
        settings={"app_id": "consilium-e2e", "api_base": f"{live_server.url}/fhir"}
    )
    try:
        assert smart.prepare()  # fetches /metadata: no SMART security, ready without OAuth
        statement = smart.server.capabilityStatement
    finally:
        smart.server.session.close()
    assert isinstance(statement, CapabilityStatement)
    assert (statement.fhirVersion, statement.kind, statement.format[0]) == (
        "4.0.1",
        "instance",
        "application/fhir+json",
    )
    rest = statement.rest[0]
    task = next(r for r in rest.resource if r.type == "Task")
    assert {i.code for i in task.interaction} >= {"read", "update", "search-type"}
    assert task.versioning == "versioned-update"  # PUT needs If-Match
    assert {p.name for p in task.searchParam} >= {"owner", "status", "identifier", "_lastUpdated"}
    assert "Bearer" in rest.security.description

    # fhirclient's OAuth2 state holding a token is no way to send ours: reading the
    # CapabilityStatement replaces the auth by what its security names (no SMART URIs:
    # none), and the next request goes without the token.
    token = api_token_issue(user=world.submitter, name="fhirclient").raw
    state = {
        "app_id": "consilium-e2e",
        "server": {
            "base_uri": f"{live_server.url}/fhir/",  # the slash: from a state it adds none
            "auth_type": "oauth2",
            "auth": {"access_token": token},
        },
    }
    oauth = fhir_client.FHIRClient(state=state)
    try:
        assert Bundle.read_from("Task", oauth.server).total == 0  # the token was sent
        oauth.server.get_capability(force=True)
        with pytest.raises(FHIRUnauthorizedException):
            Bundle.read_from("Task", oauth.server)
    finally:
        oauth.server.session.close()
    # On the session, it stays.
    server = connect(world.submitter)
    assert server.capabilityStatement.fhirVersion == "4.0.1"
    assert Bundle.read_from("Task", server).total == 0


@pytest.mark.django_db(transaction=True)
def test_referral_lifecycle_with_fhirclient(
    world: World, connect: Callable[[User], FHIRServer]
) -> None:
    submitter = connect(world.submitter)
    consultant = connect(world.consultant)
    owner = f"HealthcareService/{world.network.pediatrics.pk}"

    # The submitter posts a transaction Bundle (Patient + ServiceRequest + Task): create()
    # of a transaction Bundle posts to the base. It answers the JSON, and sets no id.
    answer = Bundle(Bundle(transaction(world, "FC-1")).create(submitter))
    assert answer.type == "transaction-response"
    assert [e.response.status for e in answer.entry] == ["201 Created"] * 3
    task_id = answer.entry[2].resource.id
    assert answer.entry[2].resource.owner.reference == owner

    # A second referral as a conditional create of the ServiceRequest alone (If-None-Exist
    # on the session): sent twice, one referral.
    order = ServiceRequest(
        service_request(world, "FC-2", subject="https://his.codao.example.org/fhir/Patient/9")
    )
    key = f"identifier={PLACER}|FC-2"
    with header(submitter, "If-None-Exist", key):
        first = order.create(submitter)
        again = order.create(submitter)
    assert first["id"] == again["id"] != task_id
    assert Referral.objects.count() == 2

    # The consultant system's worklist: owner + status (fhirclient's $or is FHIR's comma).
    worklist = Task.where(
        struct={"owner": owner, "status": {"$or": ["requested", "received"]}}
    ).perform_resources_iter(consultant)
    assert sorted(t.id for t in worklist) == sorted([task_id, first["id"]])
    with_orders = list(
        Task.where(struct={"_id": task_id}).include("focus").perform_resources_iter(consultant)
    )
    assert [(r.resource_type, r.id) for r in with_orders] == [
        ("Task", task_id),
        ("ServiceRequest", task_id),
    ]

    # Accept. fhirclient's update() sends no If-Match: the Task PUT is 412 (FHIR lets a
    # server require it) and nothing changes.
    task = Task.read(task_id, consultant)
    assert (task.status, task.meta.versionId) == ("requested", "1")
    task.status = "accepted"
    with pytest.raises(requests.HTTPError) as refused:
        task.update(consultant)
    status, issue = _refusal(refused.value)
    assert (status, issue.code) == (412, "conflict")
    assert 'If-Match: W/"<versionId>"' in issue.diagnostics
    assert Referral.objects.get(filler_id=task_id).state == ReferralState.SUBMITTED
    # With If-Match on the session, on the version read.
    with if_match(consultant, task):
        accepted = Task(task.update(consultant))
    assert (accepted.status, accepted.meta.versionId, _state(accepted)) == (
        "accepted",
        "2",
        "accepted",
    )
    # The same update on the stale version: 412 again (the ETag read is what it checks).
    task.status = "rejected"
    with if_match(consultant, task), pytest.raises(requests.HTTPError) as stale:
        task.update(consultant)
    assert _refusal(stale.value)[0] == 412

    # The consultant asks (a Communication: the Task goes on hold) ...
    question = Communication(
        {
            "resourceType": "Communication",
            "status": "completed",
            "partOf": [{"reference": f"Task/{task_id}"}],
            "payload": [{"contentString": "Any echocardiogram?"}],
        }
    )
    asked = Communication(question.create(consultant))
    assert Task.read(task_id, submitter).status == "on-hold"
    # ... the submitter answers, with its own key as If-None-Exist (a retry: one message).
    reply = Communication(
        {
            "resourceType": "Communication",
            "status": "completed",
            "partOf": [{"reference": f"Task/{task_id}"}],
            "inResponseTo": [{"reference": f"Communication/{asked.id}"}],
            "identifier": [{"system": MESSAGE_SYSTEM, "value": "R-1"}],
            "payload": [{"contentString": "Normal echo yesterday."}],
        }
    )
    with header(submitter, "If-None-Exist", f"identifier={MESSAGE_SYSTEM}|R-1"):
        answered = Communication(reply.create(submitter))
        assert Communication(reply.create(submitter)).id == answered.id
    assert answered.inResponseTo[0].reference == f"Communication/{asked.id}"
    assert Task.read(task_id, consultant).status == "accepted"

    # The consult note: a DocumentReference (R4: context.related = the ServiceRequest).
    note = DocumentReference(
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "extension": [{"url": m.DISPOSITION_EXTENSION, "valueCode": "manage_locally"}],
            "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4"}]},
            "context": {"related": [{"reference": f"ServiceRequest/{task_id}"}]},
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain",
                        "data": base64.b64encode(b"IVIG + aspirin").decode(),
                    }
                }
            ],
        }
    )
    note_id = note.create(consultant)["id"]

    # The submitter reads it back: the Task's output names the note.
    seen = Task.read(task_id, submitter)
    assert (seen.status, _state(seen)) == ("in-progress", "advised")
    reference = seen.output[0].valueReference.reference
    assert reference == f"DocumentReference/{note_id}"
    read = DocumentReference.read(reference.split("/", 1)[1], submitter)
    assert base64.b64decode(read.content[0].attachment.data) == b"IVIG + aspirin"
    assert read.extension[0].valueCode == "manage_locally"
    notes = DocumentReference.where(
        struct={"related": f"ServiceRequest/{task_id}", "type": "http://loinc.org|11488-4"}
    ).perform_resources_iter(submitter)
    assert [d.id for d in notes] == [note_id]
    assert Referral.objects.get(filler_id=task_id).state == ReferralState.ADVISED

    # The messages with the Task: _revinclude by its search parameter's name, in the
    # search dict. fhirclient's include(reverse=True) names the element (partOf), not
    # the parameter (part-of): ignored, and named in X-FHIR-Ignored-Parameters.
    found = list(
        Task.where(
            struct={"_id": task_id, "_revinclude": "Communication:part-of"}
        ).perform_resources_iter(submitter)
    )
    assert [r.resource_type for r in found] == ["Task", "Communication", "Communication"]
    assert {r.id for r in found[1:]} == {asked.id, answered.id}
    by_element = Task.where(struct={"_id": task_id}).include("partOf", Communication, reverse=True)
    assert by_element.construct().endswith("&_revinclude=Communication:partOf")
    response = submitter._get(by_element.construct())
    assert response.headers["X-FHIR-Ignored-Parameters"] == "_revinclude=Communication:partOf"
    assert [e["resource"]["resourceType"] for e in response.json()["entry"]] == ["Task"]


@pytest.mark.django_db(transaction=True)
def test_paging_with_fhirclient_follows_the_next_links(
    world: World, connect: Callable[[User], FHIRServer]
) -> None:
    submitter = connect(world.submitter)
    consultant = connect(world.consultant)
    submitted = {
        Bundle(Bundle(transaction(world, f"FC-P{n}")).create(submitter)).entry[2].resource.id
        for n in range(5)
    }

    # perform_iter follows each Bundle's next link (absolute, with the cursor).
    pages = list(Task.where(struct={"_count": "2"}).perform_iter(submitter))
    assert [len(page.entry) for page in pages] == [2, 2, 1]
    assert {page.total for page in pages} == {5}
    ids = [e.resource.id for page in pages for e in page.entry]
    assert sorted(ids) == sorted(submitted)
    next_link = next(link.url for link in pages[0].link if link.relation == "next")
    assert next_link.startswith(f"{submitter.base_uri}Task?") and "_cursor=" in next_link

    # The consultant system accepts each page's Tasks before following next: none skipped
    # (keyset paging), each accepted once.
    worklist = Task.where(struct={"status": "requested", "_count": "2"})
    accepted: list[str] = []
    for page in worklist.perform_iter(consultant):
        for entry in page.entry or []:
            task = entry.resource
            task.status = "accepted"
            with if_match(consultant, task):
                task.update(consultant)
            accepted.append(task.id)
    assert sorted(accepted) == sorted(submitted)
    states = set(Referral.objects.values_list("state", flat=True))
    assert states == {ReferralState.ACCEPTED}


@pytest.mark.django_db(transaction=True)
def test_where_fhirclient_and_fhir_r4_disagree_the_refusal_says_what_to_send(
    world: World, connect: Callable[[User], FHIRServer]
) -> None:
    submitter = connect(world.submitter)
    task_id = Bundle(Bundle(transaction(world, "FC-1")).create(submitter)).entry[2].resource.id
    Bundle(transaction(world, "FC-2")).create(submitter)

    # A nested search dict is a chain (focus.identifier): refused, never ignored (ignored,
    # it answered both Tasks). A Task takes the placer identifier itself.
    chained = Task.where(struct={"focus": {"identifier": f"{PLACER}|FC-1"}})
    assert chained.construct().startswith("Task?focus.identifier=")
    with pytest.raises(requests.HTTPError) as refused:
        list(chained.perform_resources_iter(submitter))
    status, issue = _refusal(refused.value)
    assert (status, issue.code) == (400, "not-supported")
    assert "identifier=<system>|<value>" in issue.diagnostics
    by_placer = Task.where(struct={"identifier": f"{PLACER}|FC-1"})
    assert [t.id for t in by_placer.perform_resources_iter(submitter)] == [task_id]

    # fhirclient's operators ($gte…) send DSTU1's ">=": 400, naming FHIR's prefix.
    since = Task.where(struct={"authored-on": {"$gte": "2020-01-01"}})
    assert since.construct() == "Task?authored-on=>=2020-01-01"
    with pytest.raises(requests.HTTPError) as refused:
        list(since.perform_resources_iter(submitter))
    status, issue = _refusal(refused.value)
    assert (status, issue.code) == (400, "invalid")
    assert issue.diagnostics.endswith("'ge2020-01-01'.")
    prefixed = Task.where(struct={"authored-on": "ge2020-01-01"})
    assert len(list(prefixed.perform_resources_iter(submitter))) == 2

    # $desc sends _sort:desc (DSTU1): not FHIR R4's _sort=-key; ignored and named.
    descending = Task.where(struct={"_sort": {"$desc": "_lastUpdated"}})
    response = submitter._get(descending.construct())
    assert response.headers["X-FHIR-Ignored-Parameters"] == "_sort:desc"
    newest_first = Task.where(struct={"_sort": "-_lastUpdated"}).perform_resources_iter(submitter)
    assert [t.identifier[0].value for t in newest_first] == ["FC-2", "FC-1"]

    # fhirclient quotes every value as a string: _count=2 (an int) fails in the client.
    with pytest.raises(TypeError):
        Task.where(struct={"_count": 2}).construct()


DOC = Path(__file__).resolve().parents[2] / "docs" / "fhir.md"
EXAMPLE = "### Connecting a member system with fhirclient (SMART on FHIR client-py)"


@pytest.mark.django_db(transaction=True)
def test_the_docs_fhirclient_example_runs_as_written(live_server: Any, world: World) -> None:
    """docs/fhir.md's fhirclient block, only the base URL and the tokens replaced, on the
    test network (its hub and paediatrics are the demo network's)."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(EXAMPLE + "\n")
    match = re.compile(r"```python\n(.*?)\n```", re.S).search(text, start)
    assert match is not None
    code = "\n" * text.count("\n", 0, match.start(1)) + match.group(1)  # the doc's lines
    for old, new in (
        ('"https://consilium.example.org/fhir"', f'"{live_server.url}/fhir"'),
        ('"<token>"', f'"{api_token_issue(user=world.submitter, name="doc").raw}"'),
        ('"<hub token>"', f'"{api_token_issue(user=world.consultant, name="doc").raw}"'),
    ):
        assert old in code, old
        code = code.replace(old, new)
    out = io.StringIO()
    namespace: dict[str, Any] = {}
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the doc's example
    finally:  # its sessions, also when it failed half-way (see connect)
        _close([namespace[name] for name in ("r4", "hub_side") if name in namespace])
    department = world.network.pediatrics
    assert out.getvalue().splitlines() == ["4.0.1", f"HealthcareService/{department.pk}"]
    referral = Referral.objects.get()
    assert (referral.assigned_department, referral.state) == (department, ReferralState.ACCEPTED)
    assert referral.requester_facility == world.network.spoke
