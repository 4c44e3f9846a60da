"""``_summary`` and ``_elements`` on searches, reads and vreads (FHIR's result parameters)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from fhir_gateway.subsetting import SUBSETTED
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    body,
    submit,
    task_of,
    transaction,
    with_case_file,
)
from referrals.models import AuditEntry

pytestmark = pytest.mark.django_db

PDF = base64.b64encode(b"%PDF-1.4\n% a letter\n%%EOF\n").decode()


def _subsetted(resource: dict[str, Any]) -> bool:
    return SUBSETTED in (resource.get("meta") or {}).get("tag", [])


def _two_referrals(world: World) -> list[str]:
    return sorted(task_of(submit(world, placer))["id"] for placer in ("SR-1", "SR-2"))


def test_summary_count_answers_the_total_and_no_resource(world: World) -> None:
    _two_referrals(world)
    AuditEntry.objects.all().delete()
    response = world.r4.get("/fhir/Task?status=requested&_summary=count&_total=none")
    assert response.status_code == 200, response.content
    bundle = body(response)
    assert bundle["total"] == 2
    assert "entry" not in bundle or bundle["entry"] == []
    assert "X-FHIR-Ignored-Parameters" not in response
    assert [link["relation"] for link in bundle["link"]] == ["self"]
    assert "_summary=count" in bundle["link"][0]["url"]
    assert AuditEntry.objects.count() == 0  # a number is no patient data


def test_summary_true_keeps_the_summary_and_mandatory_elements(world: World) -> None:
    ids = _two_referrals(world)
    full = body(world.r4.get(f"/fhir/Task/{ids[0]}"))
    assert "identifier" in full and "restriction" in full  # not summary elements in R4
    found = body(world.r4.get("/fhir/Task?_summary=true&_sort=_id"))
    tasks = [e["resource"] for e in found["entry"]]
    assert [t["id"] for t in tasks] == ids
    for task in tasks:
        assert _subsetted(task)
        assert {"status", "intent", "owner", "businessStatus", "focus", "for"} <= set(task)
        assert "identifier" not in task and "restriction" not in task
    self_link = next(link["url"] for link in found["link"] if link["relation"] == "self")
    assert "_summary=true" in self_link


def test_summary_data_drops_only_the_narrative(world: World) -> None:
    task_id = _two_referrals(world)[0]
    full = body(world.r4.get(f"/fhir/Task/{task_id}"))
    assert "text" not in full  # ours carry no narrative: nothing to drop, nothing tagged
    data = body(world.r4.get(f"/fhir/Task/{task_id}?_summary=data"))
    assert data == full
    text = body(world.r4.get(f"/fhir/Task/{task_id}?_summary=text"))
    assert set(text) == {"resourceType", "id", "meta", "status", "intent"}
    assert _subsetted(text)


def test_elements_cuts_the_matches_and_names_included_types(world: World) -> None:
    ids = _two_referrals(world)
    found = body(world.r4.get("/fhir/Task?_elements=owner&_include=Task:focus&_sort=_id"))
    matches = [e["resource"] for e in found["entry"] if e["search"]["mode"] == "match"]
    included = [e["resource"] for e in found["entry"] if e["search"]["mode"] == "include"]
    assert [t["id"] for t in matches] == ids
    for task in matches:  # the one asked for, plus the mandatory ones
        assert set(task) == {"resourceType", "id", "meta", "owner", "status", "intent"}
        assert _subsetted(task)
    assert included and not any(_subsetted(r) for r in included)  # not named: in full
    assert all("requester" in r for r in included)
    both = body(
        world.r4.get(
            "/fhir/Task?_elements=owner,ServiceRequest.subject&_include=Task:focus&_sort=_id"
        )
    )
    for entry in both["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "ServiceRequest":
            assert set(resource) == {"resourceType", "id", "meta", "subject", "status", "intent"}
    self_link = next(link["url"] for link in both["link"] if link["relation"] == "self")
    assert "_elements=owner%2CServiceRequest.subject" in self_link


def test_elements_on_a_read_and_a_vread_keep_the_etag(world: World) -> None:
    task_id = _two_referrals(world)[0]
    full = world.r4.get(f"/fhir/Task/{task_id}")
    cut = world.r4.get(f"/fhir/Task/{task_id}?_elements=businessStatus")
    assert cut.status_code == 200
    assert cut["ETag"] == full["ETag"]
    resource = body(cut)
    assert set(resource) == {"resourceType", "id", "meta", "businessStatus", "status", "intent"}
    assert _subsetted(resource)
    version = body(full)["meta"]["versionId"]
    old = body(world.r4.get(f"/fhir/Task/{task_id}/_history/{version}?_elements=owner"))
    assert set(old) == {"resourceType", "id", "meta", "owner", "status", "intent"}


def test_r5_subsets_use_the_r5_definitions(world: World) -> None:
    task_id = _two_referrals(world)[0]
    resource = body(world.r5.get(f"/fhir/Task/{task_id}?_summary=true", Accept=FHIR_R5))
    assert _subsetted(resource)
    assert "requestedPerformer" in body(world.r5.get(f"/fhir/Task/{task_id}", Accept=FHIR_R5))
    assert "requestedPerformer" not in resource  # not a summary element in R5
    assert {"status", "intent", "owner"} <= set(resource)


@pytest.mark.parametrize(
    ("query", "diagnostic"),
    [
        ("_summary=maybe", "_summary must be one of"),
        ("_summary=true&_elements=status", "cannot be used together"),
        ("_elements=status,1bad", "is not an element name"),
        ("_elements=" + ",".join(f"e{i}" for i in range(101)), "More than 100 _elements"),
    ],
)
def test_bad_subset_parameters_are_400_and_nothing_is_read(
    world: World, query: str, diagnostic: str
) -> None:
    task_id = _two_referrals(world)[0]
    AuditEntry.objects.all().delete()
    for path in (f"/fhir/Task?{query}", f"/fhir/Task/{task_id}?{query}"):
        response = world.r4.get(path)
        assert response.status_code == 400, (path, response.content)
        assert diagnostic in outcome_issue(response)["diagnostics"]
    assert AuditEntry.objects.count() == 0


def test_summary_count_is_for_searches(world: World) -> None:
    task_id = _two_referrals(world)[0]
    response = world.r4.get(f"/fhir/Task/{task_id}?_summary=count")
    assert response.status_code == 400
    assert "for searches" in outcome_issue(response)["diagnostics"]


def test_a_subset_keeps_modifier_extensions(world: World) -> None:
    """A modifier extension changes the meaning of the rest: never cut away. (The stored
    Task has none; a registry Organization read with a subset shows the rule on a JSON
    text built here.)"""
    from fhir_gateway.subsetting import Subset

    text = json.dumps(
        {
            "resourceType": "Task",
            "id": "x",
            "modifierExtension": [{"url": "http://example.org/negated", "valueBoolean": True}],
            "status": "requested",
            "intent": "order",
            "owner": {"reference": "HealthcareService/1"},
            "note": [{"text": "n"}],
        }
    )
    for subset in (Subset("true"), Subset(elements={"Task": frozenset({"note"})})):
        kept = json.loads(subset.apply(text, "Task", "4.0"))
        assert kept["modifierExtension"][0]["valueBoolean"] is True
        assert _subsetted(kept)


# --- found by a review of the first version ------------------------------------------------


@pytest.mark.parametrize("query", ["_summary=text", "_elements=status"])
def test_a_subset_keeps_mandatory_complex_elements(world: World, query: str) -> None:
    """A ServiceRequest's subject (1..1) is a complex element fhir.resources does not flag
    as required: it was cut away, and the subset was no valid resource."""
    from fhir_gateway.versions import model_class

    task_id = _two_referrals(world)[0]
    cut = body(world.r4.get(f"/fhir/ServiceRequest/{task_id}?{query}"))
    assert _subsetted(cut)
    assert "subject" in cut
    model_class("ServiceRequest", "4.0").model_validate(cut)


def test_endpoint_subsets_keep_their_mandatory_elements(world: World) -> None:
    found = body(world.r4.get("/fhir/Endpoint?_summary=text"))
    assert found["entry"]
    for entry in found["entry"]:
        assert {"connectionType", "payloadType", "address", "status"} <= set(entry["resource"])


@pytest.mark.parametrize(
    "query", ["_summary=bogus", "_summary=count", "_summary=true", "_elements=data"]
)
def test_binary_is_read_whole(world: World, query: str) -> None:
    """The raw read skipped the parameters: a bad value was a 200, and _summary=true sent
    the bytes untagged."""
    bundle = with_case_file(transaction(world), {"contentType": "application/pdf", "data": PDF})
    answer = body(world.r4.post("/fhir", bundle))
    url = answer["entry"][3]["resource"]["content"][0]["attachment"]["url"]
    AuditEntry.objects.all().delete()
    response = world.r4.get(f"/fhir/{url}?{query}", Accept=FHIR_R4)
    assert response.status_code == 400, response.status_code
    assert AuditEntry.objects.count() == 0
    assert world.r4.get(f"/fhir/{url}", Accept=FHIR_R4).status_code == 200


def test_element_names_do_not_count_as_search_values(world: World) -> None:
    _two_referrals(world)
    names = ",".join(f"e{i}" for i in range(99)) + ",status"
    response = world.r4.get(f"/fhir/Task?status=requested&_elements={names}")
    assert response.status_code == 200, response.content
    repeated = ",".join(["status"] * 150)  # one name, however often
    assert world.r4.get(f"/fhir/Task?_elements={repeated}").status_code == 200


@pytest.mark.parametrize("name", ["occurrence", "occurrence[x]", "ServiceRequest.occurrence"])
def test_a_choice_element_goes_by_its_name(name: str) -> None:
    from fhir_gateway.subsetting import subset_from

    text = json.dumps(
        {
            "resourceType": "ServiceRequest",
            "id": "x",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p"},
            "occurrenceDateTime": "2026-11-27",
            "priority": "urgent",
        }
    )
    subset = subset_from({"_elements": [name]}, resource_type="ServiceRequest", search=True)
    assert subset is not None
    kept = json.loads(subset.apply(text, "ServiceRequest", "4.0"))
    assert kept["occurrenceDateTime"] == "2026-11-27"
    assert "priority" not in kept


def test_history_takes_summary_and_elements(world: World) -> None:
    task_id = _two_referrals(world)[0]
    from fhir_gateway.tests.referral_world import update_task

    assert (
        update_task(world.r5, task_id, lambda t: t.update(status="accepted"), FHIR_R5).status_code
        == 200
    )
    AuditEntry.objects.all().delete()
    counted = body(world.r4.get(f"/fhir/Task/{task_id}/_history?_summary=count"))
    assert (counted["total"], counted.get("entry", [])) == (2, [])
    assert "_summary=count" in counted["link"][0]["url"]
    assert AuditEntry.objects.count() == 0
    cut = body(world.r4.get(f"/fhir/Task/{task_id}/_history?_elements=status&_count=1"))
    assert cut["total"] == 2
    [entry] = cut["entry"]
    assert set(entry["resource"]) == {"resourceType", "id", "meta", "status", "intent"}
    assert _subsetted(entry["resource"])
    assert entry["request"]["method"] in ("POST", "PUT")
    following = next(link["url"] for link in cut["link"] if link["relation"] == "next")
    assert "_elements=status" in following
    assert world.r4.get(f"/fhir/Task/{task_id}/_history?_summary=maybe").status_code == 400
