"""Binary entries in a transaction Bundle (as IHE MHD's Provide Document Bundle sends a
file): a DocumentReference entry's ``content.attachment.url`` names a Binary entry's
``fullUrl``; the Binary's bytes become that case file. Every refusal stores nothing."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest

from fhir_gateway import intake
from fhir_gateway.models import FhirResource, IntakeJob, OutboxMessage
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import (
    LETTER_PDF,
    World,
    body,
    stored_files,
    transaction,
    with_binary_file,
    with_case_file,
)
from referrals.models import Attachment, Referral

pytestmark = pytest.mark.django_db

PDF_BYTES = LETTER_PDF
PDF = base64.b64encode(PDF_BYTES).decode()


def _counts() -> tuple[int, int, int, int, int]:
    return (
        Referral.objects.count(),
        Attachment.objects.count(),
        FhirResource.objects.count(),
        OutboxMessage.objects.count(),
        len(stored_files()),
    )


@pytest.mark.parametrize("respond_async", [False, True])
def test_a_binary_entry_is_the_file_of_its_document_reference(
    world: World, respond_async: bool
) -> None:
    bundle = with_binary_file(transaction(world))
    headers = {"Prefer": "respond-async"} if respond_async else {}
    response = world.r4.post("/fhir", bundle, **headers)
    if respond_async:
        assert response.status_code == 202, response.content
        assert intake.intake_drain() == 1
        job = IntakeJob.objects.get()
        assert job.result_status == 200
        response = world.r4.get(str(response["Content-Location"]))
        assert response.status_code == 200
        answer = body(response)["entry"][0]["resource"]
    else:
        assert response.status_code == 200, response.content
        answer = body(response)
    binary, document = answer["entry"][3], answer["entry"][4]
    assert binary["response"]["status"] == document["response"]["status"] == "201 Created"
    doc_id = document["resource"]["id"]
    assert binary["response"]["location"] == f"Binary/{doc_id}/_history/1"
    assert binary["fullUrl"].endswith(f"/fhir/Binary/{doc_id}")
    assert "resource" not in binary  # the bytes are not echoed
    stored = document["resource"]["content"][0]["attachment"]
    assert stored["url"] == f"Binary/{doc_id}"
    assert (stored["contentType"], stored["title"], stored["size"]) == (
        "application/pdf",
        "letter.pdf",
        len(PDF_BYTES),
    )
    assert Attachment.objects.get().original_name == "letter.pdf"
    read = world.r4.get(f"/fhir/Binary/{doc_id}", Accept="application/pdf")
    assert read.status_code == 200
    assert b"".join(read.streaming_content) == PDF_BYTES


def test_a_resubmission_with_a_binary_entry_stores_the_file_once(world: World) -> None:
    bundle = with_binary_file(transaction(world))
    first = body(world.r4.post("/fhir", copy.deepcopy(bundle)))
    again = world.r4.post("/fhir", bundle)
    assert again.status_code == 200, again.content
    entries = body(again)["entry"]
    assert [e["response"]["status"] for e in entries] == ["200 OK"] * 5
    assert [e["response"]["location"] for e in entries] == [
        e["response"]["location"] for e in first["entry"]
    ]
    assert Attachment.objects.count() == 1


def test_an_r5_member_sends_a_binary_entry(world: World) -> None:
    bundle = with_binary_file(transaction(world, version="5.0"))
    response = world.r4.post("/fhir", bundle, content_type=FHIR_R5, Accept=FHIR_R5)
    assert response.status_code == 200, response.content
    doc_id = body(response)["entry"][4]["resource"]["id"]
    assert body(response)["entry"][3]["response"]["location"] == f"Binary/{doc_id}/_history/1"
    assert Attachment.objects.get().size == len(PDF_BYTES)


def _no_full_url(bundle: dict[str, Any]) -> None:
    del bundle["entry"][3]["fullUrl"]


def _named_twice(bundle: dict[str, Any]) -> None:
    second = copy.deepcopy(bundle["entry"][4])
    second["fullUrl"] = "urn:uuid:doc-2"
    bundle["entry"].append(second)


def _unreferenced(bundle: dict[str, Any]) -> None:
    bundle["entry"][4]["resource"]["content"][0]["attachment"]["url"] = "http://files/x.pdf"


@pytest.mark.parametrize(
    ("change", "status", "where", "diagnostic"),
    [
        (_no_full_url, 422, "Bundle.entry[3].fullUrl", "needs a fullUrl"),
        (_unreferenced, 422, "Bundle.entry[3]", "names this Binary"),
        (
            _named_twice,
            422,
            "Bundle.entry[5].resource.content[0].attachment.url",
            "each file needs its own Binary",
        ),
        (
            lambda b: b["entry"][4]["resource"]["content"][0]["attachment"].update(data=PDF),
            422,
            "Bundle.entry[4].resource.content[0].attachment",
            "both data and the url",
        ),
        (
            lambda b: b["entry"][4]["resource"]["content"][0]["attachment"].update(
                contentType="image/png"
            ),
            422,
            "Bundle.entry[4].resource.content[0].attachment.contentType",
            "is not the Binary's",
        ),
        (
            lambda b: b["entry"][3]["resource"].pop("data"),
            422,
            "Bundle.entry[3].resource.data",
            "must carry its bytes",
        ),
        (
            lambda b: b["entry"][3]["resource"].update(
                securityContext={"reference": "urn:uuid:patient-1"}
            ),
            422,
            "Bundle.entry[3].resource.securityContext",
            "ServiceRequest or Task entry",
        ),
        (
            lambda b: b["entry"][3]["resource"].update(
                securityContext={"reference": "ServiceRequest/CSL-someone-elses"}
            ),
            422,
            "Bundle.entry[3].resource.securityContext",
            "ServiceRequest or Task entry",
        ),
        (
            lambda b: b["entry"][3]["request"].update(method="PUT"),
            422,
            "Bundle.entry[3]",
            "PUT Binary",
        ),
    ],
    ids=[
        "no-full-url",
        "not-named",
        "named-twice",
        "data-and-url",
        "content-type-differs",
        "no-data",
        "context-the-patient",
        "context-another-referral",
        "not-a-post",
    ],
)
def test_a_binary_entry_that_is_no_documents_file_is_refused(
    world: World, change: Any, status: int, where: str, diagnostic: str
) -> None:
    bundle = with_binary_file(transaction(world))
    change(bundle)
    before = _counts()
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == status, response.content
    issue = outcome_issue(response)
    assert issue["expression"] == [where]
    assert diagnostic in issue["diagnostics"]
    assert _counts() == before


def test_a_binary_entry_with_bytes_that_are_not_base64_is_400(world: World) -> None:
    bundle = with_binary_file(transaction(world), binary={"data": "not base64!"})
    before = _counts()
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 400, response.content
    assert "Binary is not valid FHIR 4.0: data" in outcome_issue(response)["diagnostics"]
    assert _counts() == before


def test_a_binary_entry_of_a_type_the_store_refuses_stores_nothing(world: World) -> None:
    """The file goes through the attachments service's checks (type sniffing)."""
    bundle = with_binary_file(
        transaction(world),
        attachment={"url": "urn:uuid:bin-1", "title": "x.pdf"},
        binary={"contentType": "application/pdf", "data": base64.b64encode(b"MZ\x90\x00").decode()},
    )
    before = _counts()
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 415, response.content
    assert _counts() == before


# --- found by a review of the first version ------------------------------------------------


@pytest.mark.parametrize("bad", [["urn:uuid:sr-1"], {"a": 1}])
@pytest.mark.parametrize("entry", [1, 2], ids=["ServiceRequest", "Task"])
def test_a_non_string_full_url_beside_a_binary_entry_is_no_500(
    world: World, bad: Any, entry: int
) -> None:
    """It was: an unhashable fullUrl broke the set of the referral's entries (a 500, and
    an asynchronous job retried as a bug)."""
    bundle = with_binary_file(transaction(world))
    del bundle["entry"][3]["resource"]["securityContext"]
    # No focus: naming the ServiceRequest entry needs its fullUrl, and another order is
    # 422 (test_a_task_entry_focused_on_another_referral_is_422) before the case files.
    del bundle["entry"][2]["resource"]["focus"]
    bundle["entry"][entry]["fullUrl"] = bad
    before = _counts()
    response = world.r4.post("/fhir", bundle)
    assert response.status_code < 500, response.content
    if response.status_code >= 400:
        assert _counts() == before
    job = world.r4.post("/fhir", bundle, Prefer="respond-async")
    assert job.status_code == 202
    intake.intake_drain()
    answered = IntakeJob.objects.get()
    assert (answered.status, answered.last_error) == (IntakeJob.Status.DONE, "")


def test_a_binary_entrys_last_modified_is_its_files(world: World) -> None:
    answer = body(world.r4.post("/fhir", with_binary_file(transaction(world))))
    doc_id = answer["entry"][4]["resource"]["id"]
    read = body(world.r4.get(f"/fhir/Binary/{doc_id}", Accept=FHIR_R4))
    assert answer["entry"][3]["response"]["lastModified"] == read["meta"]["lastUpdated"]


def test_a_binary_may_name_its_document_reference_as_security_context(world: World) -> None:
    """As this server's own Binary reads do (securityContext = DocumentReference/<id>)."""
    bundle = with_binary_file(
        transaction(world), binary={"securityContext": {"reference": "urn:uuid:doc-1"}}
    )
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 200, response.content
    assert Attachment.objects.count() == 1


@pytest.mark.parametrize("binary_backed", [False, True])
def test_a_non_string_attachment_url_is_400(world: World, binary_backed: bool) -> None:
    """It was a 500 inside the FHIR models' URL validator."""
    attachment = {"contentType": "application/pdf", "url": 5, "title": "x.pdf"}
    if binary_backed:
        bundle = with_binary_file(transaction(world), attachment=attachment)
    else:
        bundle = with_case_file(transaction(world), {**attachment, "data": PDF})
    before = _counts()
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 400, response.content
    assert _counts() == before


SHA1 = base64.b64encode(__import__("hashlib").sha1(PDF_BYTES).digest()).decode()


@pytest.mark.parametrize(
    ("declared", "status"),
    [
        ({"size": len(PDF_BYTES), "hash": SHA1}, 200),
        ({"size": str(len(PDF_BYTES))}, 200),  # R5's integer64 is a string
        ({"size": len(PDF_BYTES) + 1}, 422),
        ({"hash": base64.b64encode(b"\0" * 20).decode()}, 422),
        ({"size": "1" * 5000}, 400),  # not an unsignedInt: the model refuses it
        ({"hash": "not base64!"}, 400),
    ],
    ids=["both-right", "size-as-string", "size-wrong", "hash-wrong", "size-huge", "hash-junk"],
)
@pytest.mark.parametrize("binary_backed", [False, True])
def test_a_declared_size_and_hash_must_be_the_files(
    world: World, declared: dict[str, Any], status: int, binary_backed: bool
) -> None:
    """As IHE MHD recipients check them: a file that is not what its sender says it is
    is refused, nothing stored (inline and Binary-backed alike, and on a resubmission)."""
    attachment = {"contentType": "application/pdf", "title": "letter.pdf", **declared}
    if binary_backed:
        bundle = with_binary_file(
            transaction(world), attachment={**attachment, "url": "urn:uuid:bin-1"}
        )
    else:
        bundle = with_case_file(transaction(world), {**attachment, "data": PDF})
    before = _counts()
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == status, response.content
    if status == 200:
        assert Attachment.objects.count() == 1
        return
    assert _counts() == before
    if status == 400:
        return
    field = "size" if "size" in declared else "hash"
    assert outcome_issue(response)["expression"] == [
        f"DocumentReference.content.attachment.{field}"
    ]
    # A resubmission of the same bytes (stored meanwhile, declared rightly) with the wrong
    # declaration is refused as the first one was.
    right = copy.deepcopy(bundle)
    for entry in right["entry"]:
        if entry["resource"]["resourceType"] == "DocumentReference":
            for key in ("size", "hash"):
                entry["resource"]["content"][0]["attachment"].pop(key, None)
    assert world.r4.post("/fhir", right).status_code == 200
    stored = _counts()
    assert world.r4.post("/fhir", bundle).status_code == 422
    assert _counts() == stored
