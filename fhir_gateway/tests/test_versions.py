"""Version negotiation: fhirVersion in Accept / Content-Type / _format; $versions."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from fhir_gateway.models import FhirResource
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import body, case_file, submit, task_of
from fhir_gateway.versions import normalise_version


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("4.0", "4.0"),
        ("4.0.1", "4.0"),
        ("5.0", "5.0"),
        ("5.0.0", "5.0"),
        ("4.3", None),
        ("3.0", None),
    ],
)
def test_version_aliases(raw, expected):
    assert normalise_version(raw) == expected


@pytest.mark.parametrize(
    ("accept", "version"),
    [
        (None, "4.0"),
        ("application/fhir+json", "4.0"),
        ("application/json", "4.0"),
        ("*/*", "4.0"),
        ("application/fhir+json; fhirVersion=4.0", "4.0"),
        ("application/fhir+json; fhirVersion=4.0.1", "4.0"),
        ("application/fhir+json; fhirVersion=5.0", "5.0"),
        ("application/fhir+json;fhirVersion=5.0.0", "5.0"),
        # The best acceptable range wins; an unsupported one with lower q is skipped.
        (
            "application/fhir+json; fhirVersion=4.3; q=0.5, application/fhir+json; fhirVersion=5.0",
            "5.0",
        ),
        ("text/html, application/fhir+json; fhirVersion=5.0; q=0.9", "5.0"),
    ],
)
def test_accept_chooses_the_answer_version(fhir, network, accept, version):
    headers = {"Accept": accept} if accept else {}
    response = fhir.get(f"/fhir/Organization/{network.hub.pk}", **headers)
    assert response.status_code == 200
    assert response["Content-Type"] == f"application/fhir+json; fhirVersion={version}"
    row = FhirResource.objects.get(resource_type="Organization", logical_id=str(network.hub.pk))
    assert response.content == row.json_for(version).encode()


@pytest.mark.parametrize(
    "accept",
    [
        "application/fhir+json; fhirVersion=4.3",
        "application/fhir+json; fhirVersion=3.0",
        "application/fhir+xml",
        "text/html",
    ],
)
def test_unsupported_accept_is_406_operation_outcome(fhir, network, accept):
    response = fhir.get(f"/fhir/Organization/{network.hub.pk}", Accept=accept)
    assert response.status_code == 406
    assert response["Content-Type"] == FHIR_R4
    issue = outcome_issue(response)
    assert issue["severity"] == "error"
    assert issue["code"] == "not-supported"


@pytest.mark.parametrize(
    ("fmt", "status", "version"),
    [
        ("json", 200, "4.0"),
        ("application/fhir+json", 200, "4.0"),
        ("application/fhir+json; fhirVersion=5.0", 200, "5.0"),
        ("xml", 406, "4.0"),
        ("application/fhir+json; fhirVersion=4.3", 406, "4.0"),
    ],
)
def test_format_parameter_overrides_accept(fhir, network, fmt, status, version):
    response = fhir.get(
        f"/fhir/Organization/{network.hub.pk}?_format={quote(fmt)}", Accept="application/fhir+xml"
    )
    assert response.status_code == status
    assert response["Content-Type"] == f"application/fhir+json; fhirVersion={version}"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/fhir+json; fhirVersion=4.3",
        "application/fhir+json; fhirVersion=6.0",
        "application/fhir+xml",
        "text/plain",
    ],
)
def test_unsupported_content_type_is_415_and_nothing_is_stored(
    fhir, communication_type, content_type
):
    body = {"resourceType": "Communication", "status": "completed"}
    response = fhir.post("/fhir/Communication", body, content_type=content_type)
    assert response.status_code == 415
    assert outcome_issue(response)["code"] == "not-supported"
    assert not FhirResource.objects.filter(resource_type="Communication").exists()


def test_body_in_r5_answer_in_r4_needs_a_rendering(fhir, communication_type):
    # Communication has no R5->R4 converter: stored in R5 only, so an R4 answer is minimal.
    body = {"resourceType": "Communication", "status": "completed"}
    response = fhir.post("/fhir/Communication", body, content_type=FHIR_R5, Accept=FHIR_R4)
    assert response.status_code == 201
    assert response.content == b""
    row = FhirResource.objects.get(resource_type="Communication")
    assert row.fhir_version == "5.0"
    assert row.json_r4 == ""
    assert json.loads(row.json_r5)["status"] == "completed"
    read = fhir.get(f"/fhir/Communication/{row.logical_id}", Accept=FHIR_R4)
    assert read.status_code == 406
    assert outcome_issue(read)["code"] == "not-supported"
    read5 = fhir.get(f"/fhir/Communication/{row.logical_id}", Accept=FHIR_R5)
    assert read5.content == row.json_r5.encode()


def test_content_type_without_version_follows_accept(fhir, communication_type):
    body = {"resourceType": "Communication", "status": "completed"}
    response = fhir.post(
        "/fhir/Communication", body, content_type="application/fhir+json", Accept=FHIR_R5
    )
    assert response.status_code == 201
    assert FhirResource.objects.get(resource_type="Communication").fhir_version == "5.0"


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5])
def test_versions_operation(anonymous, accept):
    response = anonymous.get("/fhir/$versions", Accept=accept)
    assert response.status_code == 200
    assert json.loads(response.content) == {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "version", "valueCode": "4.0"},
            {"name": "version", "valueCode": "5.0"},
            {"name": "default", "valueCode": "4.0"},
        ],
    }


# --------------------------------------------------------------------------- found by a review


@pytest.mark.django_db
def test_a_binary_read_skips_an_unsupported_fhir_version_as_other_reads_do(world):
    """It answered 406 on the first JSON range naming a version we do not speak, where
    the */* after it could be answered with the bytes."""
    task_id = str(task_of(submit(world))["id"])
    made = world.r4.post("/fhir/DocumentReference", case_file(task_id))
    assert made.status_code == 201, made.content
    doc_id = body(made)["id"]
    mixed = "application/fhir+json; fhirVersion=4.3, */*"
    assert world.r4.get(f"/fhir/ServiceRequest/{task_id}", Accept=mixed).status_code == 200
    read = world.r4.get(f"/fhir/Binary/{doc_id}", Accept=mixed)
    assert read.status_code == 200
    assert read["Content-Type"].startswith("application/pdf")
    only = world.r4.get(f"/fhir/Binary/{doc_id}", Accept="application/fhir+json; fhirVersion=4.3")
    assert only.status_code == 406


@pytest.mark.django_db
def test_format_takes_every_media_type_accept_takes(world):
    task_id = str(task_of(submit(world))["id"])
    for media in ("application/json+fhir", "application/json", "application/fhir+json", "json"):
        response = world.r4.get(f"/fhir/Task/{task_id}?_format={quote(media)}")
        assert response.status_code == 200, (media, response.content)


@pytest.mark.django_db
def test_an_r5_case_file_writes_its_size_as_integer64(world):
    """R5's Attachment.size is an integer64, a JSON string; R4's an unsignedInt."""
    from fhir_gateway.tests.conftest import FHIR_R5

    task_id = str(task_of(submit(world))["id"])
    doc_id = body(world.r4.post("/fhir/DocumentReference", case_file(task_id)))["id"]
    r4 = body(world.r4.get(f"/fhir/DocumentReference/{doc_id}"))
    r5 = body(world.r5.get(f"/fhir/DocumentReference/{doc_id}", Accept=FHIR_R5))
    size = r4["content"][0]["attachment"]["size"]
    assert isinstance(size, int)
    assert r5["content"][0]["attachment"]["size"] == str(size)
