"""Binary: the bytes of case files over FHIR, scoped like their referral."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from accounts.roles import Role
from accounts.services import api_token_issue
from fhir_gateway.models import FhirResource
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import World, body, stored_files, submit, task_of
from fhir_gateway.versions import model_class
from referrals.models import Attachment, AuditEntry
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

FHIR_R4_TYPE = "application/fhir+json"
PDF = b"%PDF-1.4\n% synthetic lab report, no patient data\n1 0 obj <<>> endobj\n%%EOF\n"


def _upload(world: World, task_id: str, data: bytes = PDF) -> dict[str, Any]:
    document = {
        "resourceType": "DocumentReference",
        "status": "current",
        "content": [
            {
                "attachment": {
                    "contentType": "application/pdf",
                    "title": "echo-report.pdf",
                    "data": base64.b64encode(data).decode("ascii"),
                }
            }
        ],
        "context": {"related": [{"reference": f"ServiceRequest/{task_id}"}]},
    }
    response = world.r4.post("/fhir/DocumentReference", document)
    assert response.status_code == 201, response.content
    return body(response)


@pytest.fixture
def case_file(world: World) -> tuple[str, dict[str, Any]]:
    task_id = str(task_of(submit(world))["id"])
    return task_id, _upload(world, task_id)


def _binary_path(document: dict[str, Any]) -> str:
    return "/fhir/" + document["content"][0]["attachment"]["url"]


def test_document_reference_points_at_its_binary(world: World, case_file: Any):
    _task_id, document = case_file

    attachment = document["content"][0]["attachment"]
    assert attachment["url"] == f"Binary/{document['id']}"
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(PDF).digest()).decode()  # noqa: S324
    assert (attachment["contentType"], attachment["size"]) == ("application/pdf", len(PDF))
    model_class("DocumentReference", "4.0").model_validate(document)
    r5 = body(world.r4.get(f"/fhir/DocumentReference/{document['id']}", Accept=FHIR_R5))
    model_class("DocumentReference", "5.0").model_validate(r5)
    assert r5["content"][0]["attachment"]["url"] == f"Binary/{document['id']}"


@pytest.mark.parametrize("accept", [None, "*/*", "application/pdf", "application/*"])
def test_raw_bytes_with_the_stored_type_unless_fhir_json_is_asked(
    world: World, case_file: Any, accept: str | None
):
    _task_id, document = case_file
    headers = {"Accept": accept} if accept else {}

    response = world.r5.get(_binary_path(document), **headers)  # the consultant's system

    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert b"".join(response.streaming_content) == PDF
    assert (response["ETag"], response["X-Content-Type-Options"]) == ('W/"1"', "nosniff")
    assert response["Cache-Control"] == "private, no-store"
    entry = AuditEntry.objects.get(action="download")
    assert (entry.user, entry.object_type, entry.detail) == (
        world.consultant,
        "attachment",
        "fhir-binary",
    )


@pytest.mark.parametrize(
    ("accept", "version"),
    [
        (FHIR_R4, "4.0"),
        (FHIR_R5, "5.0"),
        ("application/fhir+json", "4.0"),
        ("application/json, */*", "4.0"),
    ],
)
def test_fhir_json_accept_gets_a_binary_resource(
    world: World, case_file: Any, accept: str, version: str
):
    _task_id, document = case_file

    response = world.r4.get(_binary_path(document), Accept=accept)

    assert response.status_code == 200
    assert response["Content-Type"] == f"application/fhir+json; fhirVersion={version}"
    binary = json.loads(response.content)
    model_class("Binary", version).model_validate(binary)
    assert (binary["id"], binary["contentType"]) == (document["id"], "application/pdf")
    assert base64.b64decode(binary["data"]) == PDF
    assert binary["securityContext"] == {"reference": f"DocumentReference/{document['id']}"}


def test_format_json_overrides_accept(world: World, case_file: Any):
    _task_id, document = case_file

    response = world.r4.get(_binary_path(document) + "?_format=json", Accept="*/*")

    assert json.loads(response.content)["resourceType"] == "Binary"


def test_outside_the_referral_scope_it_is_404_and_nothing_is_recorded(world: World, case_file: Any):
    _task_id, document = case_file
    ministry = UserFactory.create(facility=world.network.hub, roles=[Role.MINISTRY])
    stranger = UserFactory.create(facility=world.network.hub, roles=[Role.MEMBER_SYSTEM])

    for client in (
        world.other,  # another facility
        FhirClient(api_token_issue(user=ministry, name="t").raw),
        FhirClient(api_token_issue(user=stranger, name="t").raw),  # hub, not the department
    ):
        for accept in ("*/*", FHIR_R4):
            response = client.get(_binary_path(document), Accept=accept)
            assert response.status_code == 404
            assert outcome_issue(response)["code"] == "not-found"
    assert not AuditEntry.objects.filter(action="download").exists()


def test_unknown_and_mismatched_ids_are_404(world: World, case_file: Any):
    task_id, document = case_file
    other_task = str(task_of(submit(world, "SR-2"))["id"])
    pk = Attachment.objects.get().pk

    for logical_id, status in (
        ("nonsense", 404),
        (f"{task_id}-att-{pk + 100}", 404),
        (f"{other_task}-att-{pk}", 404),  # a visible referral, but not this file's
        (f"{task_id}-att-", 404),
        (f"{task_id}-att-0x1", 404),
        (f"{task_id}-att-\u0661", 400),  # an Arabic-Indic digit: not a FHIR id
    ):
        response = world.r4.get(f"/fhir/Binary/{logical_id}")
        assert response.status_code == status, logical_id
        assert outcome_issue(response)["code"] == ("not-found" if status == 404 else "invalid")
    assert world.r4.get(_binary_path(document)).status_code == 200


@pytest.mark.parametrize("zeros", ["0", "00"])
def test_a_case_file_number_with_a_leading_zero_names_no_binary(
    world: World, case_file: Any, zeros: str
):
    """Ids are strings (docs/fhir.md): …-att-01 is not …-att-1 (it was read as the number,
    serving that file under another id)."""
    # Given a case file's Binary id, its number written with a leading zero
    _task_id, document = case_file
    head, separator, number = _binary_path(document).rpartition("-att-")
    downloads = AuditEntry.objects.filter(action="download").count()

    # When it is read, as the bytes or as a Binary resource
    for accept in ("*/*", FHIR_R4):
        response = world.r4.get(f"{head}{separator}{zeros}{number}", Accept=accept)

        # Then it names nothing: 404, and no download is audited
        assert response.status_code == 404, accept
        assert outcome_issue(response)["code"] == "not-found"
    assert AuditEntry.objects.filter(action="download").count() == downloads


def test_an_accept_we_cannot_honour_is_406(world: World, case_file: Any):
    _task_id, document = case_file

    for accept in ("image/png", "application/xml", "application/fhir+json; fhirVersion=3.0"):
        response = world.r4.get(_binary_path(document), Accept=accept)
        assert response.status_code == 406, accept
        assert outcome_issue(response)["code"] == "not-supported"
    # Other types keep their strict negotiation.
    assert world.r4.get(f"/fhir/DocumentReference/{document['id']}", Accept="*/*").status_code == (
        200
    )
    assert world.r4.get(
        f"/fhir/DocumentReference/{document['id']}", Accept="application/pdf"
    ).status_code == (406)


def test_binary_has_no_update_delete_or_search(world: World, case_file: Any):
    _task_id, document = case_file
    path = _binary_path(document)

    assert world.r4.put(path, {"resourceType": "Binary"}).status_code == 405
    assert world.r4.delete(path).status_code == 405
    response = world.r4.get("/fhir/Binary")
    assert (response.status_code, response["Allow"]) == (405, "POST")
    assert world.r4.get(path).status_code == 200
    statement = body(world.r4.get("/fhir/metadata"))
    [binary] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Binary"]
    assert binary["interaction"] == [{"code": "read"}, {"code": "vread"}, {"code": "create"}]


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5])
def test_the_statement_declares_the_vread_a_created_location_names(world: World, accept: str):
    """A create's Location is …/Binary/<id>/_history/1 and that vread is served, but the
    statement declared only read and create (an integrator reading it would not follow the
    Location)."""
    statement = body(world.r4.get("/fhir/metadata", Accept=accept))
    [binary] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Binary"]

    assert {"code": "vread"} in binary["interaction"]
    assert binary["readHistory"] is True


# --------------------------------------------------------------------------- create


def _raw_post(client: FhirClient, data: bytes, context: str | None, **headers: str) -> Any:
    if context is not None:
        headers["X-Security-Context"] = context
    return client.post("/fhir/Binary", data, content_type="application/pdf", **headers)


def _state() -> tuple[Any, ...]:
    return (
        Attachment.objects.count(),
        FhirResource.objects.filter(resource_type="DocumentReference").count(),
        AuditEntry.objects.filter(action="create", object_type="attachment").count(),
        stored_files(),
    )


@pytest.fixture
def task_id(world: World) -> str:
    return str(task_of(submit(world))["id"])


def test_raw_create_stores_a_case_file_both_parties_read(world: World, task_id: str):
    response = _raw_post(world.r4, PDF, f"ServiceRequest/{task_id}")

    assert response.status_code == 201, response.content
    created = body(response)
    logical_id = created["id"]
    assert response["Location"] == f"http://testserver/fhir/Binary/{logical_id}/_history/1"
    assert response["ETag"] == 'W/"1"'
    assert response["Content-Type"] == f"{FHIR_R4_TYPE}; fhirVersion=4.0"
    model_class("Binary", "4.0").model_validate(created)
    assert (created["contentType"], base64.b64decode(created["data"])) == ("application/pdf", PDF)
    attachment = Attachment.objects.get()
    assert (attachment.uploaded_by, attachment.size) == (world.submitter, len(PDF))
    # Its DocumentReference, with the same id, points at it; the consultant reads both.
    document = body(world.r5.get(f"/fhir/DocumentReference/{logical_id}", Accept=FHIR_R5))
    assert document["content"][0]["attachment"]["url"] == f"Binary/{logical_id}"
    assert document["basedOn"] == [{"reference": f"ServiceRequest/{task_id}"}]
    read = world.r5.get(f"/fhir/Binary/{logical_id}", Accept="application/pdf")
    assert b"".join(read.streaming_content) == PDF
    entry = AuditEntry.objects.get(action="create", object_type="attachment")
    assert (entry.user, entry.object_type, entry.object_id, entry.detail) == (
        world.submitter,
        "attachment",
        str(attachment.pk),
        "fhir-binary",
    )


def test_fhir_json_create_reads_back_equal_in_either_version(world: World, task_id: str):
    binary = {
        "resourceType": "Binary",
        "contentType": "application/pdf",
        "securityContext": {"reference": f"Task/{task_id}"},
        "data": base64.b64encode(PDF).decode("ascii"),
    }

    # The consultant's R5 system, once the referral is its department's.
    response = world.r5.post("/fhir/Binary", binary, content_type=FHIR_R5, Accept=FHIR_R5)

    assert response.status_code == 201, response.content
    created = body(response)
    model_class("Binary", "5.0").model_validate(created)
    read = body(world.r4.get(f"/fhir/Binary/{created['id']}", Accept=FHIR_R4))
    assert read == created
    assert {k: read[k] for k in ("contentType", "data")} == {
        k: binary[k] for k in ("contentType", "data")
    }
    assert Attachment.objects.get().uploaded_by == world.consultant


def test_return_minimal_answers_without_a_body(world: World, task_id: str):
    response = _raw_post(world.r4, PDF, f"Task/{task_id}", Prefer="return=minimal")

    assert (response.status_code, response.content) == (201, b"")
    logical_id = response["Location"].split("/fhir/Binary/")[1].split("/")[0]
    assert world.r4.get(f"/fhir/Binary/{logical_id}").status_code == 200


def test_a_raw_file_may_exceed_the_fhir_json_body_limit(world: World, task_id: str, settings: Any):
    settings.FHIR_MAX_BODY_BYTES = 200
    large = PDF + b"%" + b"x" * 500 + b"\n"

    as_json = {
        "resourceType": "Binary",
        "contentType": "application/pdf",
        "securityContext": {"reference": f"Task/{task_id}"},
        "data": base64.b64encode(large).decode("ascii"),
    }
    assert world.r4.post("/fhir/Binary", as_json).status_code == 413
    response = _raw_post(world.r4, large, f"Task/{task_id}")

    assert response.status_code == 201, response.content
    assert Attachment.objects.get().size == len(large)


def _json(task_id: str, **changes: Any) -> dict[str, Any]:
    binary = {
        "resourceType": "Binary",
        "contentType": "application/pdf",
        "securityContext": {"reference": f"ServiceRequest/{task_id}"},
        "data": base64.b64encode(PDF).decode("ascii"),
    }
    binary.update(changes)
    return {k: v for k, v in binary.items() if v is not None}


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("raw, no security context", 422, "required"),
        ("raw, context not a referral", 422, "required"),
        ("raw, unknown referral", 404, "not-found"),
        ("raw, another facility's referral", 404, "not-found"),
        ("raw, empty body", 400, "structure"),
        ("raw, not an allowed file type", 415, "not-supported"),
        ("raw, declared type disagrees with the bytes", 415, "not-supported"),
        ("raw, no Content-Type", 415, "not-supported"),
        ("raw, larger than ATTACHMENT_MAX_BYTES", 413, "too-costly"),
        ("raw, conditional create", 400, "not-supported"),
        ("json, no data", 422, "required"),
        ("json, data not base64", 400, "structure"),
        ("json, no contentType", 400, "structure"),
        ("json, no security context", 422, "required"),
        ("json, another resource type", 400, "invalid"),
        ("json, a FHIR version we do not speak", 415, "not-supported"),
    ],
)
def test_refused_creates_store_nothing(
    world: World, task_id: str, settings: Any, case: str, status: int, code: str
):
    other_task = str(task_of(submit(world, "SR-OTHER"))["id"])
    settings.ATTACHMENT_MAX_BYTES = len(PDF) - 1 if "ATTACHMENT_MAX" in case else 10**6
    before = _state()
    pdf = "application/pdf"
    requests: dict[str, Callable[[], Any]] = {
        "raw, no security context": lambda: _raw_post(world.r4, PDF, None),
        "raw, context not a referral": lambda: _raw_post(world.r4, PDF, f"Patient/{task_id}"),
        "raw, unknown referral": lambda: _raw_post(world.r4, PDF, "ServiceRequest/nope"),
        "raw, another facility's referral": lambda: _raw_post(
            world.other, PDF, f"ServiceRequest/{other_task}"
        ),
        "raw, empty body": lambda: _post_environ(world, task_id, b"", CONTENT_LENGTH="0"),
        "raw, not an allowed file type": lambda: world.r4.post(
            "/fhir/Binary", b"plain words", content_type="text/plain",
            **{"X-Security-Context": f"Task/{task_id}"},
        ),
        "raw, declared type disagrees with the bytes": lambda: world.r4.post(
            "/fhir/Binary", PDF, content_type="image/png",
            **{"X-Security-Context": f"Task/{task_id}"},
        ),
        "raw, no Content-Type": lambda: world.r4.post(
            "/fhir/Binary", PDF, content_type="", **{"X-Security-Context": f"Task/{task_id}"}
        ),
        "raw, larger than ATTACHMENT_MAX_BYTES": lambda: _raw_post(world.r4, PDF, f"Task/{task_id}"),
        "raw, conditional create": lambda: _raw_post(
            world.r4, PDF, f"Task/{task_id}", **{"If-None-Exist": "identifier=a|b"}
        ),
        "json, no data": lambda: world.r4.post("/fhir/Binary", _json(task_id, data=None)),
        "json, data not base64": lambda: world.r4.post(
            "/fhir/Binary", _json(task_id, data="%%% not base64")
        ),
        "json, no contentType": lambda: world.r4.post(
            "/fhir/Binary", _json(task_id, contentType=None)
        ),
        "json, no security context": lambda: world.r4.post(
            "/fhir/Binary", _json(task_id, securityContext=None)
        ),
        "json, another resource type": lambda: world.r4.post(
            "/fhir/Binary", _json(task_id, resourceType="Basic")
        ),
        "json, a FHIR version we do not speak": lambda: world.r4.post(
            "/fhir/Binary", _json(task_id), content_type=f"{pdf[:0]}application/fhir+json; fhirVersion=3.0"
        ),
    }  # fmt: skip
    response = requests[case]()

    assert response.status_code == status, response.content
    assert outcome_issue(response)["code"] == code
    assert _state() == before


def test_only_a_party_with_an_upload_role_may_create(world: World, task_id: str):
    ministry = UserFactory.create(facility=world.network.spoke, roles=[Role.MINISTRY])
    admin = UserFactory.create(facility=world.network.spoke, roles=[Role.FACILITY_ADMIN])
    before = _state()

    # The requesting facility's administrator sees the referral but may not add files.
    response = _raw_post(
        FhirClient(api_token_issue(user=admin, name="t").raw), PDF, f"Task/{task_id}"
    )
    assert response.status_code == 403, response.content
    assert outcome_issue(response)["code"] == "forbidden"
    assert _state() == before

    response = _raw_post(
        FhirClient(api_token_issue(user=ministry, name="t").raw), PDF, f"Task/{task_id}"
    )

    assert response.status_code == 404  # outside its scope: as if unknown
    assert _state() == before


def test_no_file_for_a_closed_referral(world: World, task_id: str):
    from referrals.models import Referral, ReferralState

    Referral.objects.filter(filler_id=task_id).update(state=ReferralState.CANCELLED)
    before = _state()

    response = _raw_post(world.r4, PDF, f"Task/{task_id}")

    assert response.status_code == 409
    assert _state() == before


# --------------------------------------------------------------------------- the wire


def _post_environ(world: World, task_id: str, data: bytes, **environ: Any) -> Any:
    headers = world.r4._headers({"X-Security-Context": f"Task/{task_id}"})
    return world.r4.client.generic(
        "POST", "/fhir/Binary", data, content_type="application/pdf", headers=headers, **environ
    )


@pytest.mark.parametrize(
    ("length", "status"),
    [
        ("00" + str(len(PDF)), 201),  # leading zeros are legal
        ("0" * 5000 + str(len(PDF)), 400),  # but not past 19 digits (nor int()'s 4,300)
        ("9" * 5000, 400),
        ("1_0", 400),
        ("\u0661\u0662", 400),
    ],
)
def test_odd_content_lengths(world: World, task_id: str, length: str, status: int):
    before = _state()

    response = _post_environ(world, task_id, PDF, CONTENT_LENGTH=length)

    assert response.status_code == status, response.content
    if status != 201:
        assert _state() == before


def test_line_wrapped_base64_is_accepted(world: World, task_id: str):
    """FHIR's base64Binary may hold whitespace (MIME's 76-column lines)."""
    data = PDF * 4
    wrapped = base64.encodebytes(data).decode("ascii")
    assert "\n" in wrapped.strip()
    binary = {
        "resourceType": "Binary",
        "contentType": "application/pdf",
        "securityContext": {"reference": f"Task/{task_id}"},
        "data": wrapped,
    }

    response = world.r4.post("/fhir/Binary", binary)

    assert response.status_code == 201, response.content
    assert base64.b64decode(body(response)["data"]) == data


class _Chunked:
    """A server's stream of a chunked upload: ends where the body ends."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int = -1) -> bytes:
        chunk = self.data if size < 0 else self.data[:size]
        self.data = self.data[len(chunk) :]
        return chunk

    def readline(self, size: int = -1) -> bytes:
        return self.read(size)


def test_a_chunked_upload_is_read_when_the_server_ends_the_stream(world: World, task_id: str):
    chunked = {"wsgi.input": _Chunked(PDF), "CONTENT_TYPE": "application/pdf"}

    response = _post_environ(world, task_id, b"", **chunked, **{"wsgi.input_terminated": True})
    assert response.status_code == 201, response.content
    assert Attachment.objects.get().size == len(PDF)

    before = _state()
    response = _post_environ(world, task_id, b"", **{**chunked, "wsgi.input": _Chunked(PDF)})
    assert response.status_code == 411, response.content
    assert _state() == before


class _Disconnecting(_Chunked):
    """A client that goes away half-way through its upload."""

    def read(self, size: int = -1) -> bytes:
        raise OSError("connection reset by peer")


def test_a_client_going_away_mid_upload_is_400_and_stores_nothing(world: World, task_id: str):
    before = _state()
    environ = {"wsgi.input": _Disconnecting(PDF), "CONTENT_LENGTH": "5000"}

    response = _post_environ(world, task_id, b"", **environ, CONTENT_TYPE="application/pdf")

    assert (response.status_code, outcome_issue(response)["code"]) == (400, "structure")
    assert _state() == before


def test_an_outsider_is_refused_before_the_file_is_read(world: World, task_id: str):
    class Unread(_Chunked):
        def read(self, size: int = -1) -> bytes:
            raise AssertionError("the body was read")

    environ: dict[str, Any] = {"wsgi.input": Unread(PDF), "CONTENT_LENGTH": str(len(PDF))}
    headers = world.other._headers({"X-Security-Context": f"Task/{task_id}"})

    response = world.other.client.generic(
        "POST", "/fhir/Binary", b"", content_type="application/pdf", headers=headers, **environ
    )

    assert response.status_code == 404


def test_the_created_answer_is_not_cached_nor_sniffed(world: World, task_id: str):
    response = _raw_post(world.r4, PDF, f"Task/{task_id}")

    assert response["Cache-Control"] == "private, no-store"
    assert response["X-Content-Type-Options"] == "nosniff"


def test_head_on_a_binary_answers_its_headers_and_leaves_the_request_whole(world: World) -> None:
    """HEAD of a file: the GET's headers, no bytes; the file is closed without ending the
    request early (the response's own close() sends request_finished, which closed the
    database connection in the middle of the request)."""
    task_id = str(task_of(submit(world))["id"])
    logical_id = _upload(world, task_id)["id"]
    audits = AuditEntry.objects.count()

    head = world.r5.client.generic(
        "HEAD",
        f"/fhir/Binary/{logical_id}",
        headers=world.r5._headers({"Accept": "application/pdf"}),
    )

    assert head.status_code == 200
    assert head.content == b""
    assert head["Content-Type"] == "application/pdf"
    assert head["Content-Length"] == str(len(PDF))
    assert Attachment.objects.count() == 1  # the connection still works
    assert AuditEntry.objects.count() == audits + 1  # a HEAD is a read, recorded


def test_the_location_of_a_created_binary_can_be_read(world: World, task_id: str):
    """The create's Location (…/_history/1) answered 405 'vread is not supported'."""
    created = _raw_post(world.r4, PDF, f"ServiceRequest/{task_id}")
    location = created["Location"].removeprefix("http://testserver")

    as_bytes = world.r4.get(location, Accept="application/pdf")
    assert as_bytes.status_code == 200 and b"".join(as_bytes.streaming_content) == PDF
    as_fhir = world.r5.get(location, Accept=FHIR_R5)
    other = world.r4.get(location.replace("_history/1", "_history/2"), Accept=FHIR_R4)
    outsider = world.other.get(location, Accept="application/pdf")

    assert as_fhir.status_code == 200
    assert base64.b64decode(body(as_fhir)["data"]) == PDF
    assert other.status_code == 404
    assert outsider.status_code == 404


def test_a_binary_the_client_holds_is_not_sent_again(world: World, task_id: str):
    """If-None-Match W/"1" was ignored (the file sent again, a download recorded)."""
    logical_id = body(_raw_post(world.r4, PDF, f"ServiceRequest/{task_id}"))["id"]
    downloads = AuditEntry.objects.filter(action="download").count()

    held = world.r4.get(
        f"/fhir/Binary/{logical_id}", Accept="application/pdf", **{"If-None-Match": 'W/"1"'}
    )
    other = world.other.get(f"/fhir/Binary/{logical_id}", **{"If-None-Match": 'W/"1"'})

    assert held.status_code == 304 and held.content == b"" and held["ETag"] == 'W/"1"'
    assert "Content-Type" not in held
    assert other.status_code == 404  # outside the referral's scope: nothing told
    assert AuditEntry.objects.filter(action="download").count() == downloads
