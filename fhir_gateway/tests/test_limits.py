"""Requests that name more values than any client needs are refused with a clear 4xx, on
both paths of a search (hand-written SQL binds each value; PostgreSQL takes 65,535)."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_gateway.models import FhirResource
from fhir_gateway.referral_resources import MAX_SPECIALTY_CODES
from fhir_gateway.tests.conftest import outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    case_file,
    service_request,
    transaction,
)
from fhir_gateway.views import MAX_SEARCH_VALUES
from referrals.models import Referral
from tests.factories import PEDIATRICS

pytestmark = pytest.mark.django_db

FORM = "application/x-www-form-urlencoded"
ORM_PATH = "&_lastUpdated=ge2000"  # a parameter the hand-written search does not take


@pytest.fixture
def document(world: World) -> tuple[str, str]:
    task_id = accepted(world)
    response = world.r4.post("/fhir/DocumentReference", case_file(task_id, "a"))
    assert response.status_code == 201, response.content
    return task_id, str(body(response)["id"])


def _search(world: World, query: str) -> Any:
    return world.r4.post("/fhir/DocumentReference/_search", query, content_type=FORM)


@pytest.mark.parametrize("path", ["", ORM_PATH], ids=["sql", "orm"])
def test_searches_take_up_to_the_limit_of_values(
    world: World, document: tuple[str, str], path: str
):
    task_id, doc_id = document
    junk = [f"x{i}" for i in range(MAX_SEARCH_VALUES - 1 - path.count("="))]  # _lastUpdated: 1
    values = ",".join([*junk, f"ServiceRequest/{task_id}"])

    response = _search(world, f"related={values}{path}")

    assert response.status_code == 200, response.content[:300]
    assert [e["resource"]["id"] for e in body(response)["entry"]] == [doc_id]


@pytest.mark.parametrize("path", ["", ORM_PATH], ids=["sql", "orm"])
@pytest.mark.parametrize("count", [MAX_SEARCH_VALUES + 1, 33_000])
def test_more_search_values_are_400_too_costly(
    world: World, document: tuple[str, str], path: str, count: int
):
    task_id, _doc_id = document
    values = ",".join([f"ServiceRequest/{task_id}"] * count)

    response = _search(world, f"related={values}{path}")

    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "too-costly"


def test_many_identifier_alternatives_match_as_few(world: World, document: tuple[str, str]):
    """The identifier search ORs its alternatives at once (one by one took quadratic time)."""
    _task_id, doc_id = document
    system = "https://district.example.org/sid/doc"
    stored = FhirResource.objects.get(resource_type="DocumentReference", logical_id=doc_id)
    assert stored  # a case file has no identifier: give one through a keyed create
    keyed = case_file(_task_id, "b", {"system": system, "value": "D-7"})
    response = world.r4.post("/fhir/DocumentReference", keyed)
    assert response.status_code == 201, response.content
    wanted = str(body(response)["id"])
    junk = [f"{system}|J-{i}" for i in range(MAX_SEARCH_VALUES - 3)] + ["J-x", "|J-y"]

    for values in ([f"{system}|D-7"], [*junk, f"{system}|D-7"], [*junk, "D-7"]):
        found = _search(world, "identifier=" + ",".join(values))
        assert [e["resource"]["id"] for e in body(found)["entry"]] == [wanted], len(values)
    assert body(_search(world, "identifier=" + ",".join(junk))).get("entry") is None


def test_a_service_request_with_too_many_specialty_codes_is_422(world: World):
    def with_codes(placer: str, codes: list[str]) -> dict[str, object]:
        bundle = transaction(world, placer)
        order = next(
            e["resource"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "ServiceRequest"
        )
        order["performerType"]["coding"] = [
            {"system": "http://snomed.info/sct", "code": c} for c in codes
        ]
        return bundle

    others = [str(900000 + i) for i in range(MAX_SPECIALTY_CODES - 1)]
    # Up to the limit (a repeated code counts once), the known one is found among them.
    ok = world.r4.post("/fhir", with_codes("SR-OK", [*others, *others[:5], PEDIATRICS]))
    assert ok.status_code == 200, ok.content[:300]
    before = Referral.objects.count()

    refused = world.r4.post("/fhir", with_codes("SR-NO", [*others, "1", PEDIATRICS]))
    assert refused.status_code == 422
    assert outcome_issue(refused)["code"] == "too-costly"
    direct = service_request(world, "SR-NO2")
    direct["performerType"]["coding"] = [{"code": str(i)} for i in range(66_000)]
    assert world.r4.post("/fhir/ServiceRequest", direct).status_code == 422
    assert Referral.objects.count() == before


@pytest.mark.parametrize(
    ("path", "name", "separator"),
    [("Organization", "identifier", "\\,"), ("Organization", "name", "\\,"), ("Task", "_id", ",")],
)
def test_every_comma_counts_escaped_or_not(world: World, path: str, name: str, separator: str):
    """Registry searches and _id split on escaped commas too: each counts."""
    value = separator.join(f"v{i}" for i in range(MAX_SEARCH_VALUES + 1))

    response = world.r4.post(f"/fhir/{path}/_search", f"{name}={value}", content_type=FORM)

    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "too-costly"


def test_includes_count_too(world: World):
    includes = "&".join(f"_include=Task:patient:T{i}" for i in range(MAX_SEARCH_VALUES + 1))

    response = world.r4.get(f"/fhir/Task?status=requested&{includes}")

    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "too-costly"


def _values(prefix: str, n: int) -> str:
    return ",".join(f"{prefix}{i}" for i in range(n))


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("Task", "identifier=" + _values("v", MAX_SEARCH_VALUES)),
        ("DocumentReference", "identifier=" + _values("https://d.example/sid|J-", MAX_SEARCH_VALUES)),
        ("Communication", "identifier=" + _values("|J-", MAX_SEARCH_VALUES)),
        ("Organization", "identifier=" + _values("v", MAX_SEARCH_VALUES)),
        ("Organization", "name=" + _values("v", MAX_SEARCH_VALUES)),
        ("Task", "&".join(f"authored-on=ge2020-01-{1 + i % 28:02d}" for i in range(MAX_SEARCH_VALUES))),
    ],
    ids=["task-identifier", "docref-identifier", "msg-identifier", "org-identifier", "org-name", "authored-on"],
)  # fmt: skip
def test_searches_at_the_limit_answer_on_either_database(world: World, path: str, query: str):
    """SQLite's expression trees stop at a depth of 1,000 (200 alternatives were past it)."""
    accepted(world)

    response = world.r4.post(f"/fhir/{path}/_search", query, content_type=FORM)

    assert response.status_code == 200, response.content[:300]
