"""A case file's ``type`` and ``category``, as its member sent them (a discharge summary,
an ECG…): kept on the stored DocumentReference in both versions and searchable with
``type``."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from fhir_gateway.models import FhirResource
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    case_file,
    consult_note,
    transaction,
)
from referrals.models import Attachment

pytestmark = pytest.mark.django_db

LOINC = "http://loinc.org"
DISCHARGE = {
    "coding": [{"system": LOINC, "code": "18842-5", "display": "Discharge summary"}],
    "text": "Discharge letter",
}
ECG = {"coding": [{"system": LOINC, "code": "11524-6", "display": "EKG study"}]}
CATEGORY = [{"coding": [{"system": "http://example.org/doc-class", "code": "clinical"}]}]


def _typed(task_id: str | None, label: str, kind: dict[str, Any]) -> dict[str, Any]:
    resource = case_file(task_id, label)
    resource["type"] = kind
    resource["category"] = CATEGORY
    return resource


def _ids(world: World, query: str, accept: str = FHIR_R4) -> list[str]:
    client = world.r4 if accept == FHIR_R4 else world.r5
    response = client.get(f"/fhir/DocumentReference?{query}&_count=50", Accept=accept)
    assert response.status_code == 200, response.content
    return sorted(e["resource"]["id"] for e in body(response).get("entry", []))


def test_a_case_files_type_and_category_read_back_in_both_versions(
    world: World,
) -> None:
    task_id = accepted(world)
    made = world.r4.post("/fhir/DocumentReference", _typed(task_id, "a", DISCHARGE))
    assert made.status_code == 201, made.content
    file_id = body(made)["id"]
    assert body(made)["type"] == DISCHARGE
    r4 = body(world.r4.get(f"/fhir/DocumentReference/{file_id}"))
    r5 = body(world.r5.get(f"/fhir/DocumentReference/{file_id}", Accept=FHIR_R5))
    for shown in (r4, r5):
        assert shown["type"] == DISCHARGE
        assert shown["category"] == CATEGORY
        names = list(shown)
        assert names.index("status") < names.index("type") < names.index("category")
        assert names.index("category") < names.index("subject")  # FHIR's order
    assert FhirResource.objects.get(logical_id=file_id, is_current=True).version_id == 1


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5], ids=["R4", "R5"])
def test_type_finds_the_case_files_of_that_type_and_the_notes_still(
    world: World, accept: str
) -> None:
    task_id = accepted(world)
    discharge = body(world.r4.post("/fhir/DocumentReference", _typed(task_id, "a", DISCHARGE)))
    ecg = body(world.r4.post("/fhir/DocumentReference", _typed(task_id, "b", ECG)))
    plain = body(world.r4.post("/fhir/DocumentReference", case_file(task_id, "c")))
    note = world.r5.post(
        "/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5, Accept=FHIR_R5
    )
    assert note.status_code == 201, note.content
    ids = {"discharge": discharge["id"], "ecg": ecg["id"], "plain": plain["id"]}
    note_id = body(note)["id"]

    assert _ids(world, "type=18842-5", accept) == [ids["discharge"]]
    assert _ids(world, f"type={quote(LOINC)}|11524-6", accept) == [ids["ecg"]]
    assert _ids(world, "type=http://snomed.info/sct|11524-6", accept) == []
    assert _ids(world, f"type={quote(LOINC)}|", accept) == sorted(
        [ids["discharge"], ids["ecg"], note_id]
    )
    assert _ids(world, "type=18842-5,11488-4", accept) == sorted([ids["discharge"], note_id])
    assert _ids(world, "type=11488-4", accept) == [note_id]
    assert _ids(world, "type:not=18842-5", accept) == sorted([ids["ecg"], ids["plain"], note_id])
    assert _ids(world, f"type:not={quote(LOINC)}|", accept) == [ids["plain"]]
    # In the caller's scope only.
    outsider = world.other.get("/fhir/DocumentReference?type=18842-5")
    assert body(outsider).get("entry", []) == []


def test_a_bundles_file_entry_keeps_its_type(world: World) -> None:
    bundle = transaction(world)
    bundle["entry"].append(
        {
            "fullUrl": "urn:uuid:doc-3",
            "request": {"method": "POST", "url": "DocumentReference"},
            "resource": _typed(None, "a", ECG),
        }
    )
    answer = world.r4.post("/fhir", bundle)
    assert answer.status_code == 200, answer.content
    stored = body(answer)["entry"][3]["resource"]
    assert stored["type"] == ECG
    assert _ids(world, "type=11524-6") == [stored["id"]]


def test_an_invalid_type_is_refused_and_nothing_is_stored(world: World) -> None:
    task_id = accepted(world)
    bad = _typed(task_id, "a", {"coding": [{"system": LOINC, "code": {"nested": 1}}]})
    before = (Attachment.objects.count(), FhirResource.objects.count())
    response = world.r4.post("/fhir/DocumentReference", bad)
    assert response.status_code in (400, 422), response.content
    assert outcome_issue(response)["severity"] == "error"
    assert (Attachment.objects.count(), FhirResource.objects.count()) == before


def test_empty_elements_of_a_type_are_not_kept(world: World) -> None:
    task_id = accepted(world)
    sent = _typed(task_id, "a", {"coding": [{"system": LOINC, "code": "18842-5"}, {}]})
    sent["category"] = [{"coding": [{}]}]
    made = world.r4.post("/fhir/DocumentReference", sent)
    assert made.status_code == 201, made.content
    shown = body(world.r5.get(f"/fhir/DocumentReference/{body(made)['id']}", Accept=FHIR_R5))
    assert shown["type"] == {"coding": [{"system": LOINC, "code": "18842-5"}]}
    assert "category" not in shown
