"""Stored canonical JSON: written once, served byte for byte; versions, ETags, conditions."""

from __future__ import annotations

import json
from typing import Any

from fhir_core.fhirabstractmodel import FHIRAbstractModel

from fhir_gateway import storage
from fhir_gateway.models import FhirResource, FhirSearchToken
from fhir_gateway.tests.conftest import FHIR_R5, outcome_issue

COMM = {
    "resourceType": "Communication",
    "identifier": [{"system": "urn:test:placer", "value": "A-1"}],
    "status": "in-progress",
}


def test_create_stores_validated_json_with_meta_and_answers_it(fhir, communication_type):
    response = fhir.post("/fhir/Communication", COMM)
    assert response.status_code == 201
    row = FhirResource.objects.get(resource_type="Communication")
    assert response.content == row.json_r4.encode()
    body = json.loads(row.json_r4)
    assert body["id"] == row.logical_id
    assert body["meta"] == {
        "versionId": "1",
        "lastUpdated": storage.fhir_instant(row.last_updated).replace("Z", "000Z"),
    }
    assert response["ETag"] == 'W/"1"'
    assert response["Location"] == (
        f"http://testserver/fhir/Communication/{row.logical_id}/_history/1"
    )
    assert (row.version_id, row.is_current, row.deleted, row.fhir_version) == (
        1,
        True,
        False,
        "4.0",
    )
    assert list(FhirSearchToken.objects.values_list("param", "system", "value")) == [
        ("identifier", "urn:test:placer", "A-1")
    ]


def test_read_vread_history_return_stored_bytes_without_fhir_resources(
    fhir, communication_type, monkeypatch
):
    created = json.loads(fhir.post("/fhir/Communication", COMM).content)
    logical_id = created["id"]
    update = {**COMM, "id": logical_id, "status": "completed"}
    assert (
        fhir.put(f"/fhir/Communication/{logical_id}", update, **{"If-Match": 'W/"1"'}).status_code
        == 200
    )
    v1, v2 = FhirResource.objects.filter(logical_id=logical_id).order_by("version_id")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fhir.resources was called on the read path")

    for name in ("model_dump_json", "model_dump", "model_validate", "model_validate_json"):
        monkeypatch.setattr(FHIRAbstractModel, name, refuse)

    read = fhir.get(f"/fhir/Communication/{logical_id}")
    assert read.status_code == 200
    assert read.content == v2.json_r4.encode()
    assert read["ETag"] == 'W/"2"'
    vread = fhir.get(f"/fhir/Communication/{logical_id}/_history/1")
    assert vread.content == v1.json_r4.encode()
    history = fhir.get(f"/fhir/Communication/{logical_id}/_history")
    assert history.status_code == 200
    assert v2.json_r4.encode() in history.content
    assert v1.json_r4.encode() in history.content
    bundle = json.loads(history.content)
    assert bundle["type"] == "history"
    assert bundle["total"] == 2
    assert [e["response"]["etag"] for e in bundle["entry"]] == ['W/"2"', 'W/"1"']
    assert [e["request"]["method"] for e in bundle["entry"]] == ["PUT", "POST"]
    search = fhir.get("/fhir/Communication?identifier=urn:test:placer|A-1")
    assert v2.json_r4.encode() in search.content
    assert json.loads(search.content)["total"] == 1


def test_update_with_matching_if_match_makes_version_2(fhir, communication_type):
    logical_id = json.loads(fhir.post("/fhir/Communication", COMM).content)["id"]
    update = {**COMM, "id": logical_id, "status": "completed"}
    response = fhir.put(f"/fhir/Communication/{logical_id}", update, **{"If-Match": 'W/"1"'})
    assert response.status_code == 200
    assert response["ETag"] == 'W/"2"'
    current = FhirResource.objects.get(logical_id=logical_id, is_current=True)
    assert current.version_id == 2
    assert FhirResource.objects.filter(logical_id=logical_id).count() == 2
    # Tokens describe the current version only.
    assert FhirSearchToken.objects.get().resource_id == current.pk


def test_update_of_unknown_resource_is_404_and_stores_nothing(fhir, communication_type):
    response = fhir.put("/fhir/Communication/nope", {**COMM, "id": "nope"})
    assert response.status_code == 404
    assert FhirResource.objects.count() == 0


def test_conditional_create_answers_the_existing_resource(fhir, communication_type):
    first = fhir.post(
        "/fhir/Communication", COMM, **{"If-None-Exist": "identifier=urn:test:placer|A-1"}
    )
    second = fhir.post(
        "/fhir/Communication",
        {**COMM, "status": "completed"},
        **{"If-None-Exist": "identifier=urn:test:placer|A-1"},
    )
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.content == first.content
    assert FhirResource.objects.count() == 1


def test_conditional_create_with_several_matches_is_412(fhir, communication_type):
    fhir.post("/fhir/Communication", COMM)
    fhir.post("/fhir/Communication", COMM)
    response = fhir.post("/fhir/Communication", COMM, **{"If-None-Exist": "identifier=A-1"})
    assert response.status_code == 412
    assert outcome_issue(response)["code"] == "multiple-matches"
    assert FhirResource.objects.count() == 2


def test_conditional_create_on_unindexed_parameter_is_400(fhir, communication_type):
    response = fhir.post("/fhir/Communication", COMM, **{"If-None-Exist": "status=completed"})
    assert response.status_code == 400
    assert FhirResource.objects.count() == 0


def test_storage_conditional_create_function(db):
    first = storage.resource_create(
        resource=COMM, fhir_version="4.0", if_none_exist="identifier=A-1"
    )
    again = storage.resource_create(
        resource=COMM, fhir_version="4.0", if_none_exist="identifier=A-1"
    )
    assert first.created and not again.created
    assert again.row.pk == first.row.pk


def test_delete_then_read_is_410_and_history_keeps_the_deletion(fhir, communication_type):
    logical_id = json.loads(fhir.post("/fhir/Communication", COMM).content)["id"]
    deleted = fhir.delete(f"/fhir/Communication/{logical_id}")
    assert deleted.status_code == 204 and "Content-Type" not in deleted  # no body: no type
    assert fhir.get(f"/fhir/Communication/{logical_id}").status_code == 410
    history = json.loads(fhir.get(f"/fhir/Communication/{logical_id}/_history").content)
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert "resource" not in history["entry"][0]
    assert fhir.delete("/fhir/Communication/never").status_code == 404
    # Deleted resources drop out of searches.
    assert json.loads(fhir.get("/fhir/Communication?identifier=A-1").content)["total"] == 0


def test_if_none_match_gives_304(fhir, communication_type):
    logical_id = json.loads(fhir.post("/fhir/Communication", COMM).content)["id"]
    response = fhir.get(f"/fhir/Communication/{logical_id}", **{"If-None-Match": 'W/"1"'})
    assert response.status_code == 304
    assert response.content == b""
    assert "Content-Type" not in response  # was text/html


def test_r5_write_is_stored_in_r5(fhir, communication_type):
    response = fhir.post("/fhir/Communication", COMM, content_type=FHIR_R5, Accept=FHIR_R5)
    assert response.status_code == 201
    row = FhirResource.objects.get()
    assert row.fhir_version == "5.0"
    assert response.content == row.json_r5.encode()


def test_prefer_return_minimal(fhir, communication_type):
    response = fhir.post("/fhir/Communication", COMM, Prefer="return=minimal")
    assert response.status_code == 201
    assert response.content == b""
    assert response["Location"].endswith("/_history/1")
