"""Property-based fuzzing of /fhir: bad input never gives a 500.

Each test starts from a VALID request (checked by ``test_the_fuzzed_requests_start_valid``)
and applies random mutations to its JSON (drop a key, a value of another JSON type, unknown
keys, duplicated entries, mangled references, plausible values in the wrong place) or to its
query string / headers. Every answer must be < 500, and every 4xx an OperationOutcome in FHIR
JSON (``resourceType`` OperationOutcome, at least one issue with ``severity`` and ``code``).
An exception the server logs (``fhir_gateway`` loggers, e.g. ``views._fhir_view``'s "unexpected
error" or an intake job that raised) counts as a 500 even when the answer hides it.

A failure names the request and the server's traceback. What it found, each now fixed and
pinned by a test of its own in test_errors.py: a transaction entry whose ``request`` is not
an object, ``Bundle.entry`` not an array, a placer identifier over 255 characters, a NUL in
If-None-Exist, a newline in an ignored search parameter's name (echoed in a header), and a
newline in an unknown path (Django's HTML 404). ``FHIR_FUZZ_SCALE=6`` hunts longer.

Each example runs in a savepoint rolled back at its end (``rolled_back``), so examples do
not see each other's writes. Deterministic (``derandomize``); ~1,000 examples in all.
"""

from __future__ import annotations

import base64
import copy
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_gateway import referral_mapping as m
from fhir_gateway.handlers import HANDLERS
from fhir_gateway.intake import intake_drain
from fhir_gateway.registry_projection import project_registry
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient
from fhir_gateway.tests.referral_world import (
    HIS_PATIENT,
    PLACER,
    World,
    accepted,
    advised,
    body,
    consult_note,
    read_task,
    service_request,
    submit,
    task_input,
    task_of,
)
from fhir_gateway.tests.referral_world import (
    transaction as transaction_bundle,
)
from tests import fuzzing
from tests.factories import DepartmentFactory
from tests.fuzzing import (
    JSON,
    ErrorLog,
    Mutations,
    Path,
    Pool,
    Sent,
    assert_no_server_error,
    junk_values,
    logged_errors,
    rolled_back,
    wire,
)

pytestmark = pytest.mark.django_db


def fuzz_settings(max_examples: int) -> settings:
    """``FHIR_FUZZ_SCALE=10`` tries ten times as many examples (a longer hunt)."""
    return fuzzing.fuzz_settings(max_examples, "FHIR_FUZZ_SCALE")


# --------------------------------------------------------------------------- server errors


@pytest.fixture
def server_errors() -> Iterator[ErrorLog]:
    """Exceptions the FHIR gateway logs at ERROR (the 500 handler, the intake worker)."""
    with logged_errors("fhir_gateway") as log:
        yield log


def check(response: Any, sent: Sent, errors: ErrorLog) -> None:
    """The rule: < 500, and every 4xx is an OperationOutcome in FHIR JSON."""
    assert_no_server_error(response, sent, errors)
    status = response.status_code
    if 400 <= status < 500:
        assert response["Content-Type"].startswith("application/fhir+json"), (
            f"{status} with Content-Type {response['Content-Type']!r} for\n{sent}"
        )
        try:
            outcome = json.loads(response.content)
        except ValueError as exc:
            raise AssertionError(f"{status} answer not JSON for\n{sent}") from exc
        assert isinstance(outcome, dict), f"{status} answer not an object for\n{sent}"
        assert outcome.get("resourceType") == "OperationOutcome", f"{outcome}\n{sent}"
        issues = outcome.get("issue")
        assert isinstance(issues, list) and issues, f"{outcome}\n{sent}"
        assert any(isinstance(i, dict) and i.get("severity") and i.get("code") for i in issues), (
            f"{outcome}\n{sent}"
        )
    elif response.content and "json" in response.get("Content-Type", ""):
        json.loads(response.content)


def send(
    client: FhirClient, method: str, path: str, payload: JSON, content_type: str, **headers: str
) -> Any:
    """The request as a server gets it: the body as UTF-8 bytes, whatever charset the
    Content-Type names (Django's client.post would encode it with that charset)."""
    data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
    return client.client.generic(
        method,
        path,
        data=data,
        content_type=wire(content_type),
        headers=client._headers({k: wire(v) for k, v in headers.items()}),
    )


# --------------------------------------------------------------------------- junk values

NASTY_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "null",
    "0",
    "-1",
    "1e999",
    "NaN",
    "9" * 30,
    "x" * 20_000,
    "\uff58",  # a full-width x
    "\u0663",  # an Arabic-Indic digit: int() reads it as 3
    "Ω≈ç√∫ Hà Nội",
    "😀" * 10,
    "<script>",
    "'; DROP TABLE x;--",
    "%00",
    "../..",
    "\n\t",
    "urn:uuid:",
    'W/"1"',
    "2024-13-45",
    "2024-01-01T25:00:00Z",
    "0000-00-00",
    "9999-12-31T23:59:59+14:00",
    "2026-12-01T09:00:00",
    "-0001",
]

KEY_POOL = [
    "resourceType",
    "id",
    "meta",
    "extension",
    "modifierExtension",
    "reference",
    "contained",
    "_status",
    "fhir_comments",
    "bogus",
    "",
]

JUNK_REFERENCES = [
    "Organization/abc",
    "urn:uuid:",
    "",
    "HealthcareService/99999999999999999999",
    "HealthcareService/-1",
    "HealthcareService/0",
    "HealthcareService/1.5",
    "HealthcareService/\u0663",
    "HealthcareService/",
    "HealthcareService",
    "HealthcareService/1 ",
    "Organization/\x00",
    "/",
    "#x",
    "Patient/unknown",
    "urn:uuid:sr-1",
    "urn:uuid:task-1",
    "urn:uuid:patient-1",
    "urn:uuid:nope",
    "http://other.example.org/fhir/HealthcareService/1",
    "http://testserver/fhir/HealthcareService/1",
    "Task/CSL-nope",
    "ServiceRequest/" + "9" * 40,
    "Organization/1/_history/1",
    "Practitioner/1",
]

junk = junk_values(NASTY_STRINGS, KEY_POOL)


# --------------------------------------------------------------------------- mutations


OPS = [
    "drop",
    "junk",
    "reference",
    "plausible",
    "unknown_key",
    "duplicate",
    "wrap",
    "unwrap",
]


mutate = Mutations(junk, KEY_POOL, OPS)


# --------------------------------------------------------------------------- the world


class Cases:
    """The world, three referrals by state (their Task ids = ServiceRequest / Patient
    ids), a department of the spoke, and references to put into requests."""

    def __init__(
        self,
        world: World,
        submitted: str,
        accepted: str,
        advised: str,
        spoke_department: int,
        pool_references: list[str],
    ) -> None:
        self.world = world
        self.submitted = submitted
        self.accepted = accepted
        self.advised = advised
        self.spoke_department = spoke_department
        self.pool_references = pool_references

    def __repr__(self) -> str:  # hypothesis prints it with each falsifying example
        return f"Cases(submitted={self.submitted!r}, accepted={self.accepted!r}, ...)"

    def client(self, who: str) -> FhirClient:
        return {"r4": self.world.r4, "r5": self.world.r5, "other": self.world.other}[who]


@pytest.fixture
def cases(world: World, server_errors: ErrorLog) -> Cases:
    """Three referrals (submitted, accepted, advised) and a department of the spoke (a
    counter-referral's performer)."""
    spoke_department = DepartmentFactory.create(
        facility=world.network.spoke, specialty=world.network.pediatrics.specialty
    )
    project_registry()
    submitted = str(task_of(submit(world, "FZ-S"))["id"])
    ids = [submitted, accepted(world, "FZ-A"), advised(world, "FZ-D")]
    net = world.network
    real = [
        f"Organization/{net.spoke.pk}",
        f"Organization/{net.hub.pk}",
        f"Organization/{net.lao.pk}",
        f"HealthcareService/{net.pediatrics.pk}",
        f"HealthcareService/{net.cardiology.pk}",
        f"HealthcareService/{spoke_department.pk}",
        f"Location/{net.hub.pk}",
    ]
    for task_id in ids:
        real += [f"ServiceRequest/{task_id}", f"Task/{task_id}", f"Patient/{task_id}"]
    server_errors.records.clear()
    return Cases(world, ids[0], ids[1], ids[2], spoke_department.pk, real + JUNK_REFERENCES)


STATES = [
    "submitted",
    "accepted",
    "declined",
    "cancelled",
    "expired",
    "info_requested",
    "scheduled",
    "in_conference",
    "advised",
    "closed_local",
    "transfer_requested",
    "transfer_accepted",
    "in_transit",
    "arrived",
    "completed",
    "bogus",
]
TASK_STATUSES = [
    "requested",
    "accepted",
    "rejected",
    "cancelled",
    "completed",
    "in-progress",
    "on-hold",
    "draft",
    "failed",
    "received",
    "bogus",
]


def _inputs(cases: Cases) -> list[JSON]:
    user = cases.world.consultant.pk
    when = ["2099-12-01T09:00:00+07:00", "2000-01-01T00:00:00Z", "2099-12-01", "tomorrow", ""]
    one = [
        *(task_input("scheduled-at", valueDateTime=w) for w in when),
        task_input("scheduled-at", valueString="2099-12-01T09:00:00Z"),
        task_input("experts", valueIdentifier={"system": m.USER_SYSTEM, "value": str(user)}),
        task_input("experts", valueIdentifier={"system": m.USER_SYSTEM, "value": "9" * 25}),
        task_input("experts", valueIdentifier={"system": m.USER_SYSTEM, "value": "\u0663"}),
        task_input("experts", valueIdentifier={"value": "abc"}),
        task_input("video-url", valueUrl="https://meet.example.org/x"),
        task_input("video-url", valueUrl="javascript:alert(1)"),
        task_input("minutes", valueString="Echo reviewed."),
        task_input("disposition", valueCode="manage_locally"),
        task_input("disposition", valueCode="bogus"),
        task_input("disposition", valueCoding={"system": m.DISPOSITION_SYSTEM, "code": "transfer"}),
        task_input("text", valueString="IVIG + aspirin."),
        task_input("transfer-originally-considered", valueBoolean=True),
        task_input("transfer-originally-considered", valueString="yes"),
        task_input("outcome", valueCode="avoided"),
        task_input("outcome", valueCode="bogus"),
        task_input("bogus", valueString="x"),
        {"type": {"text": "no coding"}, "valueString": "x"},
    ]
    return [[i] for i in one] + [one[:3], one[6:10], one[10:14]]


def task_pool(cases: Cases) -> Pool:
    refs = cases.pool_references
    reasons: list[JSON] = [
        {"text": "Patient improved"},
        {"text": ""},
        {"coding": [{"system": m.DECLINE_REASON_SYSTEM, "code": "other"}], "text": "x"},
        {"coding": [{"system": m.DECLINE_REASON_SYSTEM, "code": "bogus"}]},
        {"concept": {"text": "Patient improved"}},
        {"concept": {"coding": [{"system": m.DECLINE_REASON_SYSTEM, "code": "other"}]}},
    ]
    business: list[JSON] = [
        {"coding": [{"system": m.REFERRAL_STATE_SYSTEM, "code": s}]} for s in STATES
    ]
    business += [
        {"coding": [{"system": m.BSER_BUSINESS_STATUS, "code": "3.0"}]},
        {"coding": [{"system": m.REFERRAL_STATE_SYSTEM, "code": "scheduled"}] * 2},
        {
            "coding": [
                {"system": m.REFERRAL_STATE_SYSTEM, "code": "scheduled"},
                {"system": m.REFERRAL_STATE_SYSTEM, "code": "advised"},
            ]
        },
        {"text": "scheduled"},
        {"coding": [{"code": "scheduled"}]},
    ]
    return Pool(
        references=refs,
        fields=[
            (("status",), TASK_STATUSES),
            (("businessStatus",), business),
            (("statusReason",), reasons),
            (("owner",), [{"reference": r} for r in refs]),
            (("input",), _inputs(cases)),
            (("output",), [[], [{"type": {"text": "x"}, "valueString": "y"}]]),
            (("id",), ["other", cases.submitted, "\u0663", ""]),
            (("meta", "versionId"), ["1", "99", "x", 1]),
            (("resourceType",), ["ServiceRequest", "task", ""]),
        ],
    )


def _text_fields(version: str) -> list[tuple[Path, list[JSON]]]:
    if version == FHIR_R4:
        return [(("payload",), [[{"contentString": s}] for s in ("x", "", "\x00", "x" * 20_000)])]
    return [
        (
            ("payload",),
            [
                [{"contentCodeableConcept": {"text": "x"}}],
                [{"contentAttachment": {"contentType": "text/plain", "data": "SGVsbG8="}}],
                [{"contentAttachment": {"contentType": "text/plain", "data": "!!notbase64"}}],
                [{"contentAttachment": {"contentType": "application/pdf", "data": "SGVsbG8="}}],
                [
                    {
                        "contentAttachment": {
                            "contentType": "text/plain; charset=nope",
                            "data": "/w==",
                        }
                    }
                ],
                [{"contentAttachment": {"contentType": "text/plain", "url": "http://x/y"}}],
            ],
        )
    ]


def _valid_communication(cases: Cases, kind: str, version: str) -> tuple[str, JSON]:
    """(client, body) of a Communication the server takes."""
    task = {"submitted": cases.submitted, "accepted": cases.accepted}[
        "accepted" if kind == "question" else "submitted"
    ]
    payload: list[dict[str, Any]] = (
        [{"contentString": "Echocardiogram done?"}]
        if version == FHIR_R4
        else [{"contentCodeableConcept": {"text": "Echocardiogram done?"}}]
    )
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task}"}],
        "payload": payload,
    }
    return ("r5" if kind == "question" else "r4"), resource


# --------------------------------------------------------------------------- 0. baseline


def test_the_fuzzed_requests_start_valid(cases: Cases, server_errors: ErrorLog) -> None:
    """Unmutated, each base request is accepted: the fuzzing starts from valid input."""
    world = cases.world
    for version, content_type in (("4.0", FHIR_R4), ("5.0", FHIR_R5)):
        with rolled_back():
            bundle = transaction_bundle(world, "FZ-NEW", version=version)
            response = world.r4.post("/fhir", bundle, content_type=content_type)
            assert response.status_code == 200, response.content
    with rolled_back():
        response = world.r4.post(
            "/fhir", transaction_bundle(world, "FZ-NEW"), Prefer="respond-async"
        )
        assert response.status_code == 202, response.content
        assert intake_drain() == 1
        poll = world.r4.get(response["Content-Location"].removeprefix("http://testserver"))
        assert body(poll)["entry"][0]["response"]["status"] == "200 OK", poll.content
    with rolled_back():
        task = read_task(world.r5, cases.submitted, FHIR_R5)
        task["status"] = "accepted"
        response = world.r5.put(
            f"/fhir/Task/{cases.submitted}",
            task,
            content_type=FHIR_R5,
            **{"If-Match": 'W/"1"'},
        )
        assert response.status_code == 200, response.content
    for kind in ("question", "message"):
        for version in (FHIR_R4, FHIR_R5):
            with rolled_back():
                who, resource = _valid_communication(cases, kind, version)
                response = cases.client(who).post(
                    "/fhir/Communication", resource, content_type=version
                )
                assert response.status_code == 201, response.content
    with rolled_back():
        response = world.r5.post(
            "/fhir/DocumentReference", consult_note(cases.accepted), content_type=FHIR_R5
        )
        assert response.status_code == 201, response.content
    with rolled_back():
        response = world.r4.post(
            "/fhir/ServiceRequest",
            service_request(world, "FZ-SR", subject=HIS_PATIENT),
            **{"If-None-Exist": f"identifier={PLACER}|FZ-SR"},
        )
        assert response.status_code == 201, response.content
    with rolled_back():
        response = world.r5.post(
            "/fhir/ServiceRequest",
            counter_referral(cases),
            content_type=FHIR_R5,
            **{"If-None-Exist": f"identifier=urn:consilium:counter-referral|{cases.advised}/1"},
        )
        assert response.status_code == 201, response.content
    assert not server_errors.records


# --------------------------------------------------------------------------- 1. transaction


CASE_FILE: dict[str, Any] = {
    "fullUrl": "urn:uuid:doc-1",
    "request": {"method": "POST", "url": "DocumentReference"},
    "resource": {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": "urn:uuid:patient-1"},
        "content": [
            {"attachment": {"contentType": "text/plain", "data": "SGVsbG8=", "title": "a.txt"}}
        ],
    },
}
ATTACHMENTS: list[JSON] = [
    {"contentType": "text/plain", "data": "!!notbase64"},
    {"contentType": "text/plain", "data": ""},
    {"contentType": "text/plain", "data": "SGVsbG8"},
    {"contentType": "application/pdf", "data": "JVBERi0xLjQK"},
    {"contentType": "image/png", "data": "SGVsbG8=", "title": "../../etc/passwd"},
    {"contentType": "", "data": "SGVsbG8=", "title": "\x00"},
    {"contentType": "text/plain", "url": "http://example.org/x"},
    {"contentType": "text/plain", "data": "SGVsbG8=", "size": -1, "hash": "x"},
    {"data": "SGVsbG8=", "title": "x" * 1000},
]


def transaction_pool(cases: Cases) -> Pool:
    sr = ("entry", 1, "resource")
    case_file = CASE_FILE
    consult_note_entry = copy.deepcopy(case_file)
    consult_note_entry["resource"]["type"] = {
        "coding": [{"system": "http://loinc.org", "code": "11488-4"}]
    }
    return Pool(
        references=cases.pool_references,
        fields=[
            (("type",), ["batch", "transaction", "document", "", None]),
            (("resourceType",), ["Parameters", "bundle"]),
            (("entry",), [[], {}, None]),
            (("entry", 3), [case_file, consult_note_entry]),
            (("entry", 3, "resource", "content", 0, "attachment"), ATTACHMENTS),
            (("entry", 3, "resource", "content"), [[], [{}], CASE_FILE["resource"]["content"] * 2]),
            (("entry", 0, "request", "method"), ["PUT", "DELETE", "GET", "PATCH", "post"]),
            (("entry", 1, "request", "url"), ["Task", "ServiceRequest/1", "", "Patient?x=1"]),
            (("entry", 1, "fullUrl"), ["urn:uuid:patient-1", "", "http://x/ServiceRequest/1"]),
            ((*sr, "priority"), ["routine", "stat", "asap", "bogus", ""]),
            ((*sr, "status"), ["draft", "revoked", "bogus"]),
            ((*sr, "intent"), ["plan", "bogus"]),
            ((*sr, "basedOn"), [[{"reference": f"ServiceRequest/{cases.advised}"}]]),
            (
                (*sr, "code"),
                [
                    {"coding": [{"system": m.CONSILIUM + "/CodeSystem/consult-mode", "code": c}]}
                    for c in ("async", "live", "transfer", "bogus")
                ]
                + [{"concept": {"text": "x"}}],
            ),
            (
                (*sr, "performerType"),
                [
                    {"coding": [{"system": "http://snomed.info/sct", "code": c}]}
                    for c in ("394537008", "394579002", "1", "")
                ]
                + [{"text": "Pediatrics"}],
            ),
            ((*sr, "identifier", 0, "value"), ["FZ-S", "", "x" * 300]),
            ((*sr, "identifier", 0, "system"), ["", "urn:x", m.FILLER_SYSTEM]),
            ((*sr, "reasonCode"), [[], [{}], [{"text": ""}], [{"coding": [{"display": "x"}]}]]),
            ((*sr, "reason"), [[{"concept": {"text": "x"}}], [{"reference": {"reference": "x"}}]]),
            ((*sr, "note"), [[{"text": "x"}], [{"text": ""}]]),
            (("entry", 0, "resource", "birthDate"), ["2022", "1800-01-01", "2999-01-01", "22"]),
            (("entry", 0, "resource", "gender"), ["other", "unknown", "bogus"]),
            (("entry", 0, "resource", "identifier"), [[], [{"value": "x"}], [{"system": "x"}]]),
        ],
    )


@fuzz_settings(max_examples=450)
@given(data=st.data())
def test_mutated_transaction_bundles_never_500(
    cases: Cases, server_errors: ErrorLog, data: st.DataObject
) -> None:
    world = cases.world
    version = data.draw(st.sampled_from(["4.0", "5.0"]), label="version")
    placer = data.draw(st.sampled_from(["FZ-NEW", "FZ-S", "FZ-A"]), label="placer")
    base = transaction_bundle(
        world, placer, version=version, performer=data.draw(st.booleans(), label="performer")
    )
    if data.draw(st.booleans(), label="with a case file"):
        base["entry"].append(copy.deepcopy(CASE_FILE))
    bundle = mutate(data, base, transaction_pool(cases))
    headers = {"Accept": data.draw(st.sampled_from([FHIR_R4, FHIR_R5]), label="accept")}
    content_type = FHIR_R4 if version == "4.0" else FHIR_R5
    is_async = data.draw(st.booleans(), label="async")
    if is_async:
        headers["Prefer"] = "respond-async"
    client = cases.client(data.draw(st.sampled_from(["r4", "r4", "r5", "other"]), label="who"))
    with rolled_back():
        response = send(client, "POST", "/fhir", bundle, content_type, **headers)
        sent = Sent("POST", "/fhir", {"Content-Type": content_type, **headers}, bundle)
        check(response, sent, server_errors)
        if is_async and response.status_code == 202:
            intake_drain()
            poll = client.get(response["Content-Location"].removeprefix("http://testserver"))
            check(poll, sent, server_errors)
            if poll.status_code == 200:
                status = body(poll)["entry"][0]["response"]["status"]
                assert not status.startswith("5"), f"job answered {status} for\n{sent}"


# --------------------------------------------------------------------------- 2. Task PUT


@fuzz_settings(max_examples=450)
@given(data=st.data())
def test_mutated_task_updates_never_500(
    cases: Cases, server_errors: ErrorLog, data: st.DataObject
) -> None:
    task_id = data.draw(
        st.sampled_from([cases.submitted, cases.accepted, cases.advised]), label="task"
    )
    who = data.draw(st.sampled_from(["r5", "r4", "other"]), label="who")
    version = data.draw(st.sampled_from([FHIR_R4, FHIR_R5]), label="version")
    with rolled_back():
        task = read_task(cases.world.r5, task_id, version)
        changed = mutate(data, task, task_pool(cases), most=5)
        current = task["meta"]["versionId"]
        if_match = data.draw(
            st.sampled_from([f'W/"{current}"'] * 4 + IF_MATCH_VALUES), label="if_match"
        )
        headers = {"If-Match": if_match, "Accept": version}
        path = f"/fhir/Task/{task_id}"
        response = send(cases.client(who), "PUT", path, changed, version, **headers)
        check(
            response,
            Sent("PUT", path, {"Content-Type": version, **headers}, changed),
            server_errors,
        )


POINTER_JUNK: list[JSON] = [
    "",
    "/",
    "status",
    "/~2",
    "/~",
    "/input/-",
    "/input/99999999999999999999",
    "/input/-1",
    "/input/01",
    "/status/0",
    "/meta/versionId",
    "/\u0000",
    7,
    None,
    ["/status"],
]
PATCH_CONTENT_TYPES = [
    "application/json-patch+json",
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/json",
    FHIR_R4,
    FHIR_R5,
    "application/json-patch+json; fhirVersion=5.0",
    "application/json-patch+json; fhirVersion=9.9",
    "application/xml-patch+xml",
    "",
]


def _pointer(path: tuple[Any, ...]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


@fuzz_settings(max_examples=300)
@given(data=st.data())
def test_random_task_patches_never_500(
    cases: Cases, server_errors: ErrorLog, data: st.DataObject
) -> None:
    """JSON Patch operations on the Task's own paths (and junk ones) with values of the
    Task pool, merge patches, junk bodies, under every PATCH content type."""
    task_id = data.draw(
        st.sampled_from([cases.submitted, cases.accepted, cases.advised]), label="task"
    )
    who = data.draw(st.sampled_from(["r5", "r4", "other"]), label="who")
    version = data.draw(st.sampled_from([FHIR_R4, FHIR_R5]), label="version")
    pool = task_pool(cases)
    values = [v for _path, options in pool.fields for v in options]
    value = st.sampled_from(TASK_STATUSES) | st.sampled_from(values) | junk
    with rolled_back():
        task = read_task(cases.world.r5, task_id, version)
        pointers = [_pointer(p) for p in fuzzing.all_paths(task)]
        pointer = (
            st.sampled_from(["/status", "/businessStatus", "/statusReason", "/owner", "/input"])
            | st.sampled_from(pointers)
            | st.sampled_from(POINTER_JUNK)
        )
        operation = st.fixed_dictionaries(
            {
                "op": st.sampled_from(
                    ["replace"] * 4
                    + ["add"] * 2
                    + ["remove", "move", "copy", "test", "bogus", None, 3]
                ),
                "path": pointer,
            },
            optional={"value": value, "from": pointer, "extra": junk},
        )
        shape = data.draw(
            st.sampled_from(["workflow", "workflow", "json-patch", "merge", "junk"]),
            label="shape",
        )
        patch: JSON
        if shape == "workflow":  # a plausible step: a new status (and reason), one change
            patch = [
                {
                    "op": "replace",
                    "path": "/status",
                    "value": data.draw(st.sampled_from(TASK_STATUSES), label="status"),
                }
            ]
            if data.draw(st.booleans(), label="with a reason"):
                reason = data.draw(st.sampled_from(values), label="reason")
                patch.append({"op": "add", "path": "/statusReason", "value": reason})
        elif shape == "json-patch":
            patch = data.draw(
                st.lists(st.one_of(operation, operation, operation, junk), max_size=4),
                label="patch",
            )
        elif shape == "merge":
            patch = data.draw(
                st.dictionaries(
                    st.sampled_from(sorted(task)) | st.sampled_from(["input", "statusReason"]),
                    value | st.none(),
                    max_size=3,
                ),
                label="patch",
            )
        else:
            patch = data.draw(junk, label="patch")
        fitting = {
            "workflow": ["application/json-patch+json", "application/json"],
            "json-patch": ["application/json-patch+json", "application/json", version],
            "merge": ["application/merge-patch+json", "application/json"],
            "junk": [],
        }[shape]
        content_type = data.draw(
            st.sampled_from(fitting * 3 + PATCH_CONTENT_TYPES), label="content_type"
        )
        current = task["meta"]["versionId"]
        if_match = data.draw(
            st.sampled_from([f'W/"{current}"'] * 6 + [None] * 6 + IF_MATCH_VALUES),
            label="if_match",
        )
        headers = {"Accept": version, **({"If-Match": if_match} if if_match is not None else {})}
        path = f"/fhir/Task/{task_id}"
        response = send(cases.client(who), "PATCH", path, patch, content_type, **headers)
        check(
            response,
            Sent("PATCH", path, {"Content-Type": content_type, **headers}, patch),
            server_errors,
        )


# --------------------------------------------------------------------------- 3. creates


def counter_referral(cases: Cases) -> JSON:
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "basedOn": [{"reference": f"ServiceRequest/{cases.advised}"}],
        "subject": {"reference": f"Patient/{cases.advised}"},
        "performer": [{"reference": f"HealthcareService/{cases.spoke_department}"}],
        "reason": [{"concept": {"text": "Follow-up echo in 6 weeks."}}],
    }


def if_none_exist_values(cases: Cases) -> list[str]:
    counter = "identifier=urn:consilium:counter-referral|"
    return [
        f"identifier={PLACER}|FZ-SR",
        f"identifier={PLACER}|FZ-S",
        f"identifier={m.FILLER_SYSTEM}|{cases.submitted}",
        f"{counter}{cases.advised}/1",
        f"{counter}{cases.advised}/0",
        f"{counter}{cases.advised}/-1",
        f"{counter}{cases.advised}/99999999999999999999",
        f"{counter}{cases.advised}/\u0663",
        f"{counter}{cases.advised}/",
        f"{counter}{cases.advised}",
        f"{counter}{cases.submitted}/1",
        f"{counter}CSL-nope/1",
        f"{counter}/1",
        "identifier=",
        "identifier=|",
        "identifier=|x",
        "identifier=x|",
        "identifier=a|b|c",
        f"identifier={PLACER}|FZ-SR&identifier={PLACER}|FZ-S",
        f"identifier={PLACER}|FZ-SR,{PLACER}|FZ-S",
        "identifier:not=x|y",
        "_id=x",
        "foo=bar",
        "=",
        "",
        "%zz",
        "identifier=%00",
        "identifier=" + "x" * 5000,
    ]


IF_MATCH_VALUES = [
    'W/"1"',
    '"1"',
    "1",
    'W/"abc"',
    'W/"-1"',
    'W/"0"',
    'W/"99999999999999999999999"',
    'W/""',
    "W/",
    "*",
    "",
    'W/"1", W/"2"',
    'W/"\u0663"',
    'W/"1.0"',
    'W/" 1"',
]


@fuzz_settings(max_examples=300)
@given(data=st.data())
def test_mutated_communications_and_notes_never_500(
    cases: Cases, server_errors: ErrorLog, data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(["question", "message", "note"]), label="kind")
    version = data.draw(st.sampled_from([FHIR_R4, FHIR_R5]), label="version")
    if kind == "note":
        who, resource = "r5", consult_note(cases.accepted)
    else:
        who, resource = _valid_communication(cases, kind, version)
    who = data.draw(st.sampled_from([who, who, "r4", "r5", "other"]), label="who")
    pool = Pool(
        references=cases.pool_references,
        fields=[
            *_text_fields(version),
            (("partOf",), [[{"reference": r}] for r in cases.pool_references]),
            (
                ("inResponseTo",),
                [
                    [{"reference": f"Communication/{cases.accepted}-msg-1"}],
                    [{"reference": f"Communication/{cases.accepted}-msg-99999999999999999999"}],
                    [{"reference": "Communication/x"}],
                ],
            ),
            (("status",), ["preparation", "bogus", ""]),
            (("priority",), ["stat", "whenever"]),
            (("sent",), ["2024-01-01T00:00:00Z", "yesterday"]),
            (("extension", 0, "valueCode"), ["transfer", "bogus", "", None]),
            (("extension", 0, "url"), [m.DISPOSITION_EXTENSION + "x", ""]),
            (("category",), [[{"coding": [{"system": m.DISPOSITION_SYSTEM, "code": "transfer"}]}]]),
            (("content", 0, "attachment"), ATTACHMENTS),
            (("basedOn",), [[{"reference": r}] for r in cases.pool_references]),
            (("context", "related"), [[{"reference": f"ServiceRequest/{cases.accepted}"}]]),
            (("description",), ["x", ""]),
        ],
    )
    changed = mutate(data, resource, pool)
    headers = {"Accept": version}
    path = "/fhir/DocumentReference" if kind == "note" else "/fhir/Communication"
    with rolled_back():
        response = send(cases.client(who), "POST", path, changed, version, **headers)
        sent = Sent("POST", path, {"Content-Type": version, **headers}, changed)
        check(response, sent, server_errors)


@fuzz_settings(max_examples=300)
@given(data=st.data())
def test_mutated_service_request_creates_never_500(
    cases: Cases, server_errors: ErrorLog, data: st.DataObject
) -> None:
    world = cases.world
    counter = data.draw(st.booleans(), label="counter-referral")
    version = FHIR_R5 if counter else data.draw(st.sampled_from([FHIR_R4, FHIR_R5]))
    if counter:
        who, resource = "r5", counter_referral(cases)
    else:
        resource = service_request(
            world, "FZ-SR", version=version.rsplit("=", 1)[1], subject=HIS_PATIENT
        )
        who = "r4"
    who = data.draw(st.sampled_from([who, who, "r4", "r5", "other"]), label="who")
    pool = Pool(
        references=cases.pool_references,
        fields=[
            (("basedOn",), [[{"reference": r}] for r in cases.pool_references]),
            (("subject",), [{"reference": r} for r in cases.pool_references]),
            (("performer",), [[{"reference": r}] for r in cases.pool_references]),
            (("priority",), ["routine", "urgent", "bogus"]),
            (("code",), [{"concept": {"coding": [{"code": "live"}]}}, {"text": "x"}]),
            (("requester",), [{"reference": r} for r in cases.pool_references]),
            (("reason",), [[{"concept": {"text": ""}}], [{}], []]),
            (("performerType",), [{"coding": [{"system": "http://snomed.info/sct"}]}]),
        ],
    )
    changed = mutate(data, resource, pool)
    headers = {"Accept": version}
    if data.draw(st.integers(0, 4), label="with If-None-Exist") > 0:
        headers["If-None-Exist"] = data.draw(
            st.sampled_from(if_none_exist_values(cases)) | st.text(max_size=20),
            label="if_none_exist",
        )
    with rolled_back():
        response = send(
            cases.client(who), "POST", "/fhir/ServiceRequest", changed, version, **headers
        )
        sent = Sent("POST", "/fhir/ServiceRequest", {"Content-Type": version, **headers}, changed)
        check(response, sent, server_errors)


# --------------------------------------------------------------------------- 4. searches

# Every search parameter each searchable type declares (what metadata lists, too).
SEARCH_PARAMS: dict[str, list[str]] = {
    name: [p.name for p in handler.search_params]
    for name, handler in HANDLERS.items()
    if handler.supports("search-type")
}
COMMON_PARAMS = [
    "_id",
    "_lastUpdated",
    "_count",
    "_offset",
    "_total",
    "_format",
    "_include",
    "_pretty",
    "_sort",
    "_elements",
    "_summary",
    "_revinclude",
    "_has:Task:focus:status",
    "colour",
]
MODIFIERS = [
    "",
    "",
    "",
    ":exact",
    ":missing",
    ":not",
    ":contains",
    ":text",
    ":above",
    ":below",
    ":identifier",
    ":Task",
    ":",
    ":missing:exact",
]
PLAUSIBLE_VALUES = [
    "1",
    "0",
    "-1",
    "500",
    "501",
    "99999999999999999999",
    "1e3",
    "\u0663",
    "true",
    "false",
    "accurate",
    "none",
    "estimate",
    "json",
    "xml",
    "application/fhir+json; fhirVersion=5.0",
    "Task:focus",
    "Task:patient",
    "ServiceRequest:patient",
    "Communication:part-of",
    "priority",
    "-authored-on,priority",
    "-_lastUpdated",
    "_id,,-_id",
    "-",
    "--priority",
    "Task:owner",
    "Task:*",
    "*",
    "ServiceRequest:requester",
    "ge2000-01-01",
    "lt2099",
    "eq2024-02-30",
    "sa2024-01-01",
    "ap2024",
    "2024-01-01T10:00",
    "2024-01-01T10:00:00+25:00",
    "gt2024-01-01T10:00:00.1234567891Z",
    "le0000-01-01",
    "9999-12-31",
    "ge9999-12-31T23:59Z",
    "ge9999-12-31T23:59:59Z",
    "requested",
    "accepted,requested",
    "submitted",
    f"{m.BSER_BUSINESS_STATUS}|3.0",
    "|submitted",
    "|",
    f"{PLACER}|FZ-S",
    f"{PLACER}|",
    "a|b|c",
    "VN",
    "Viet",
    "21|105|10|km",
    "21|105",
    "91|0|10|km",
    "21|105|-5|km",
    "21|105|1e308|km",
    "nan|nan|1|km",
    "21|105|10|mi",
    "394537008",
    "http://snomed.info/sct|394537008",
    "active",
    ",",
    ",,,",
    "x,",
]


def search_values(cases: Cases) -> st.SearchStrategy[str]:
    ids = [cases.submitted, cases.accepted, cases.advised, "CSL-nope"]
    return st.one_of(
        st.sampled_from(PLAUSIBLE_VALUES),
        st.sampled_from(cases.pool_references + ids),
        st.sampled_from(NASTY_STRINGS),
        st.text(max_size=10),
    )


@fuzz_settings(max_examples=300)
@given(data=st.data())
def test_random_searches_never_500(
    cases: Cases, server_errors: ErrorLog, data: st.DataObject
) -> None:
    resource_type = data.draw(st.sampled_from(sorted(SEARCH_PARAMS)), label="type")
    names = SEARCH_PARAMS[resource_type] + COMMON_PARAMS
    pairs = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(names) | st.text(max_size=6),
                st.sampled_from(MODIFIERS),
                search_values(cases),
            ),
            max_size=5,
        ),
        label="params",
    )
    query = urllib.parse.urlencode(
        [(n + mod, v) for n, mod, v in pairs], quote_via=urllib.parse.quote, errors="surrogatepass"
    )
    how = data.draw(st.sampled_from(["GET", "GET", "GET", "POST", "raw"]), label="how")
    headers: dict[str, str] = {
        "Accept": data.draw(st.sampled_from([FHIR_R4, FHIR_R5]), label="accept")
    }
    if data.draw(st.integers(0, 4), label="strict") == 0:
        headers["Prefer"] = "handling=strict"
    client = cases.client(data.draw(st.sampled_from(["r4", "r5", "other"]), label="who"))
    with rolled_back():
        if how == "POST":
            path = f"/fhir/{resource_type}/_search"
            response = client.client.post(
                path,
                data=query,
                content_type="application/x-www-form-urlencoded",
                headers=client._headers(headers),
            )
            sent = Sent("POST", path, headers, query)
        else:
            if how == "raw":  # unencoded: stray %, &, ; and unicode as they come
                query = "&".join(f"{n}{mod}={v}" for n, mod, v in pairs)
                query = urllib.parse.quote(query, safe="=&%;,|:/+", errors="surrogatepass")
            path = f"/fhir/{resource_type}?{query}"
            response = client.get(path, **headers)
            sent = Sent("GET", path, headers)
        check(response, sent, server_errors)


@fuzz_settings(max_examples=300)
@given(data=st.data())
def test_random_reads_and_operations_never_500(
    cases: Cases, server_errors: ErrorLog, data: st.DataObject
) -> None:
    """Reads, vreads, histories and operations with junk ids, versions and parameters."""
    ids = [cases.submitted, cases.accepted, f"{cases.advised}-note-1", f"{cases.accepted}-msg-1"]
    ids += [str(cases.world.network.hub.pk), "referral", "avoided", "CSL-nope"]
    segment = st.sampled_from(ids) | st.sampled_from(NASTY_STRINGS[:12]) | st.text(max_size=8)
    types = [*sorted(SEARCH_PARAMS), "Patient", "DocumentReference", "Binary", "Nonsense"]
    resource_type = data.draw(st.sampled_from(types), label="type")
    logical_id = urllib.parse.quote(data.draw(segment, label="id"), safe="", errors="surrogatepass")
    kind = data.draw(
        st.sampled_from(["read", "history", "vread", "events", "status", "evaluate", "async"]),
        label="kind",
    )
    value = urllib.parse.quote(
        data.draw(search_values(cases), label="value"), safe="", errors="surrogatepass"
    )
    path = {
        "read": f"/fhir/{resource_type}/{logical_id}",
        "history": f"/fhir/{resource_type}/{logical_id}/_history",
        "vread": f"/fhir/{resource_type}/{logical_id}/_history/{value}",
        "events": f"/fhir/$events?since={value}&_count={value}",
        "status": f"/fhir/Subscription/{logical_id}/$status",
        "evaluate": f"/fhir/Measure/{logical_id}/$evaluate-measure?periodStart={value}"
        f"&periodEnd=2026&stratifier={value}",
        "async": f"/fhir/_async/{logical_id}",
    }[kind]
    headers = {"Accept": data.draw(st.sampled_from([FHIR_R4, FHIR_R5, "*/*", "application/pdf"]))}
    client = cases.client(data.draw(st.sampled_from(["r4", "r5", "other"]), label="who"))
    with rolled_back():
        check(client.get(path, **headers), Sent("GET", path, headers), server_errors)


# --------------------------------------------------------------------------- 5. headers

CONTENT_TYPES = [
    FHIR_R4,
    FHIR_R5,
    "application/fhir+json",
    "application/fhir+json; fhirVersion=4.3",
    "application/fhir+json; fhirVersion=",
    "application/fhir+json; fhirVersion",
    "application/fhir+json;;;",
    'application/fhir+json; fhirVersion="5.0"',
    "application/fhir+json; fhirversion=5.0; fhirVersion=4.0",
    "application/fhir+json; fhirVersion=4.0.1, application/fhir+json; fhirVersion=5.0",
    "application/fhir+json; charset=latin-1",
    "application/fhir+json; charset=utf-16",
    "application/fhir+json; charset=nope",
    "application/fhir+json; q=abc",
    "application/fhir+json; q=nan",
    "application/fhir+json; q=1e999",
    "application/fhir+json; fhirVersion=5.0; q=0",
    "application/json+fhir; fhirVersion=4.0.1",
    "application/json",
    "application/xml",
    "application/fhir+xml",
    "text/plain",
    "",
    ";",
    "=",
    "*/*",
    "*/*; q=0",
    "application/*; fhirVersion=5.0",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "APPLICATION/FHIR+JSON; FHIRVERSION=5.0",
    "application/fhir+json; fhirVersion=\u0665.0",
    "application/fhir+json; fhirVersion=" + "5" * 5000,
]
PREFER = [
    "respond-async",
    "return=minimal",
    "return=representation",
    "return=OperationOutcome",
    "handling=strict",
    "handling=lenient",
    "respond-async, return=minimal",
    "respond-async; wait=10",
    "",
    "junk",
    "=,=,",
]
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=30)


@fuzz_settings(max_examples=400)
@given(data=st.data())
def test_odd_headers_never_500(cases: Cases, server_errors: ErrorLog, data: st.DataObject) -> None:
    """Valid requests with odd Content-Type / Accept / _format / If-* / Prefer headers."""
    world = cases.world
    kind = data.draw(
        st.sampled_from(
            ["read", "search", "transaction", "communication", "task", "sr", "binary", "file"]
        ),
        label="request",
    )
    headers: dict[str, str] = {}
    for name, values in (
        ("Accept", CONTENT_TYPES),
        ("If-Match", IF_MATCH_VALUES),
        ("If-None-Match", IF_MATCH_VALUES),
        ("If-None-Exist", if_none_exist_values(cases)),
        ("Prefer", PREFER),
    ):
        if data.draw(st.integers(0, 2), label=f"with {name}") == 0:
            headers[name] = data.draw(st.sampled_from(values) | header_text, label=name)
    content_type = data.draw(st.sampled_from(CONTENT_TYPES) | header_text, label="Content-Type")
    fmt = ""
    if data.draw(st.integers(0, 3), label="with _format") == 0:
        fmt = "_format=" + urllib.parse.quote(
            data.draw(st.sampled_from(CONTENT_TYPES) | header_text, label="_format"), safe=""
        )
    r5 = "5.0" in content_type
    with rolled_back():
        if kind in ("read", "search"):
            path = (
                f"/fhir/Task/{cases.submitted}" if kind == "read" else "/fhir/Task?status=requested"
            )
            path += ("&" if "?" in path else "?") + fmt if fmt else ""
            response = world.r4.get(path, **headers)
            sent = Sent("GET", path, headers)
        else:
            if kind == "transaction":
                client, path = world.r4, "/fhir"
                payload: JSON = transaction_bundle(world, "FZ-NEW", version="5.0" if r5 else "4.0")
            elif kind == "communication":
                who, payload = _valid_communication(cases, "message", FHIR_R5 if r5 else FHIR_R4)
                client, path = cases.client(who), "/fhir/Communication"
            elif kind == "sr":
                client, path = world.r4, "/fhir/ServiceRequest"
                payload = service_request(
                    world, "FZ-SR", version="5.0" if r5 else "4.0", subject=HIS_PATIENT
                )
            elif kind == "binary":  # a FHIR JSON Binary: a case file
                client, path = world.r4, "/fhir/Binary"
                payload = {
                    "resourceType": "Binary",
                    "contentType": "application/pdf",
                    "securityContext": {"reference": f"ServiceRequest/{cases.accepted}"},
                    "data": base64.b64encode(b"%PDF-1.4 fuzz\n%%EOF\n").decode(),
                }
            elif kind == "file":  # the file itself (raw Binary create)
                client, path = world.r4, "/fhir/Binary"
                payload = b"%PDF-1.4 fuzz\n%%EOF\n"
                headers.setdefault("X-Security-Context", f"Task/{cases.accepted}")
            else:
                client, path = world.r5, f"/fhir/Task/{cases.submitted}"
                payload = read_task(world.r5, cases.submitted, FHIR_R5 if r5 else FHIR_R4)
                payload["status"] = "accepted"
            if fmt:
                path += "?" + fmt
            method = "PUT" if kind == "task" else "POST"
            response = send(client, method, path, payload, content_type, **headers)
            sent = Sent(method, path, {"Content-Type": content_type, **headers}, payload)
        check(response, sent, server_errors)
        if response.status_code == 202 and "Content-Location" in response:
            intake_drain()
            poll_path = response["Content-Location"].removeprefix("http://testserver")
            check(world.r4.get(poll_path), sent, server_errors)
