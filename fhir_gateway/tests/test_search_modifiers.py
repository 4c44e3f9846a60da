"""Search modifiers a worklist and a registry browser use: ``:not`` on token parameters
(none of the values), ``:missing`` where a value may be absent (``Task?owner:missing=true``:
the referrals routing has not placed yet), ``name:exact`` on the registry. Each answers
exactly what it names; every other modifier stays a 400 (test_errors)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from fhir_gateway.registry_projection import project_registry
from fhir_gateway.tests.conftest import FHIR_R4, outcome_issue
from fhir_gateway.tests.referral_world import (
    PLACER,
    World,
    accepted,
    body,
    submit,
    task_of,
    transaction,
)
from referrals.models import Referral
from tests.factories import SpecialtyFactory

pytestmark = pytest.mark.django_db

DERMATOLOGY = "394582007"  # a specialty no department of the test network takes


def _ids(world: World, query: str) -> list[str]:
    response = world.r4.get(query, Accept=FHIR_R4)
    assert response.status_code == 200, response.content
    return sorted(
        e["resource"]["id"]
        for e in body(response).get("entry", [])
        if e["search"]["mode"] == "match"
    )


@pytest.fixture
def cases(world: World) -> dict[str, str]:
    """Three referrals of the world's requester: submitted, accepted, and one routing
    could not place (no department takes its specialty)."""
    submitted = task_of(submit(world, "S"))["id"]
    accepted_task = accepted(world, "A")
    SpecialtyFactory.create(code=DERMATOLOGY)
    bundle = transaction(world, "U", performer=False)
    order = bundle["entry"][1]["resource"]
    order["performerType"]["coding"] = [{"system": "http://snomed.info/sct", "code": DERMATOLOGY}]
    response = world.r4.post("/fhir", bundle, content_type=FHIR_R4)
    assert response.status_code == 200, response.content
    unrouted = task_of(body(response))
    assert "owner" not in unrouted
    assert Referral.objects.get(filler_id=unrouted["id"]).assigned_department_id is None
    return {"submitted": submitted, "accepted": accepted_task, "unrouted": unrouted["id"]}


def test_status_not_answers_every_task_but_the_named_statuses(
    world: World, cases: dict[str, str]
) -> None:
    every = sorted(cases.values())
    assert _ids(world, "/fhir/Task?status:not=accepted") == sorted(
        [cases["submitted"], cases["unrouted"]]
    )
    # Commas: none of them
    assert _ids(world, "/fhir/Task?status:not=accepted,requested") == []
    assert _ids(world, "/fhir/Task?status:not=completed") == every  # nobody completed
    # The token's system is honoured: another system names no status, so nothing is excluded
    assert _ids(world, "/fhir/Task?status:not=http://example.org/x|accepted") == every
    assert _ids(world, "/fhir/Task?status:not=http://hl7.org/fhir/task-status|") == []
    # Beside the plain parameter (repeated parameters AND)
    assert _ids(world, "/fhir/Task?status=requested,accepted&status:not=accepted") == sorted(
        [cases["submitted"], cases["unrouted"]]
    )


def test_business_status_and_service_request_status_not(
    world: World, cases: dict[str, str]
) -> None:
    assert _ids(world, "/fhir/Task?business-status:not=accepted") == sorted(
        [cases["submitted"], cases["unrouted"]]
    )
    assert _ids(world, "/fhir/ServiceRequest?status:not=active") == []
    assert _ids(world, "/fhir/ServiceRequest?status:not=revoked") == sorted(cases.values())


def test_identifier_not_leaves_out_the_named_referral(world: World, cases: dict[str, str]) -> None:
    placer = quote(PLACER)
    assert _ids(world, f"/fhir/Task?identifier:not={placer}|A") == sorted(
        [cases["submitted"], cases["unrouted"]]
    )
    assert _ids(world, f"/fhir/ServiceRequest?identifier:not={placer}|S,{placer}|U") == [
        cases["accepted"]
    ]
    assert _ids(world, f"/fhir/Task?_id:not={cases['accepted']}") == sorted(
        [cases["submitted"], cases["unrouted"]]
    )


def test_owner_missing_is_the_unrouted_worklist(world: World, cases: dict[str, str]) -> None:
    assert _ids(world, "/fhir/Task?owner:missing=true") == [cases["unrouted"]]
    assert _ids(world, "/fhir/Task?owner:missing=false") == sorted(
        [cases["submitted"], cases["accepted"]]
    )
    assert _ids(world, "/fhir/Task?owner:missing=true,false") == sorted(cases.values())
    assert _ids(world, "/fhir/ServiceRequest?performer:missing=true") == [cases["unrouted"]]
    # What the stored JSON says agrees with the search (the search reads the referral)
    for task_id in _ids(world, "/fhir/Task?owner:missing=false"):
        task = body(world.r4.get(f"/fhir/Task/{task_id}", Accept=FHIR_R4))
        assert "owner" in task


@pytest.mark.parametrize("value", ["yes", "1", "", "true,maybe", "TRUE"])
def test_missing_takes_only_true_or_false(world: World, cases: dict[str, str], value: str) -> None:
    response = world.r4.get(f"/fhir/Task?owner:missing={value}", Accept=FHIR_R4)
    if value == "":  # an empty value is no parameter (as for every parameter)
        assert response.status_code == 200
        assert len(body(response)["entry"]) == 3
        return
    assert response.status_code == 400, response.content
    assert outcome_issue(response)["code"] == "invalid"


@pytest.mark.parametrize(
    "query",
    [
        "Task?status:missing=true",  # Task.status is never absent: not offered
        "Task?owner:not=HealthcareService/1",  # :not is for tokens
        "Task?status:exact=accepted",
        "Task?status:not:not=accepted",
    ],
)
def test_modifiers_a_parameter_does_not_take_stay_400(
    world: World, cases: dict[str, str], query: str
) -> None:
    response = world.r4.get(f"/fhir/{query}", Accept=FHIR_R4)
    assert response.status_code == 400, response.content
    issue = outcome_issue(response)
    assert issue["code"] == "not-supported"
    assert "modifier" in issue["diagnostics"]


def test_registry_name_exact_type_not_and_partof_missing(
    fhir: Any, network: Any, member_user: Any
) -> None:
    def ids(query: str) -> list[str]:
        response = fhir.get(f"/fhir/{query}")
        assert response.status_code == 200, response.content
        return sorted(e["resource"]["id"] for e in body(response).get("entry", []))

    hub, spoke, lao = (str(f.pk) for f in (network.hub, network.spoke, network.lao))
    member = member_user.facility  # the caller's own facility, a fourth one
    member.tier = 2
    member.save(update_fields=["tier"])
    project_registry()
    member_id = str(member.pk)
    # :exact: the whole name (or local name) as written; the plain search contains
    assert ids("Organization?name:exact=Mahosot Hospital") == [lao]
    assert ids("Organization?name:exact=mahosot hospital") == []
    assert ids("Organization?name:exact=Mahosot") == []
    assert ids("Organization?name=mahosot") == [lao]
    assert ids(f"Organization?name:exact={quote(network.hub.name_local)}") == [hub]
    assert ids(f"Location?name:exact={quote(network.spoke.name)}") == [spoke]
    assert ids(f"HealthcareService?name:exact={quote(network.pediatrics.name)}") == [
        str(network.pediatrics.pk)
    ]
    # :not on a token: the tiers other than 1
    assert ids("Organization?type:not=1") == sorted([spoke, member_id])
    assert ids("Organization?type:not=1,2") == [spoke]
    assert ids(f"Organization?identifier:not={network.hub.code},MEMBER") == sorted([spoke, lao])
    assert ids("HealthcareService?specialty:not=394537008") == [str(network.cardiology.pk)]
    # :missing on partof: the facilities at the top of their tree
    assert ids("Organization?partof:missing=true") == sorted([hub, lao, member_id])
    assert ids("Organization?partof:missing=false") == [spoke]
    assert ids("Location?partof:missing=false") == [spoke]


def test_the_capability_statement_names_each_parameters_modifiers(fhir: Any) -> None:
    statement = body(fhir.get("/fhir/metadata"))
    params = {
        (r["type"], p["name"]): p["documentation"]
        for r in statement["rest"][0]["resource"]
        for p in r.get("searchParam", [])
    }
    assert params[("Task", "status")].endswith("Modifiers: :not.")
    assert params[("Task", "owner")].endswith("Modifiers: :missing.")
    assert params[("Organization", "name")].endswith("Modifiers: :contains, :exact.")
    assert params[("Organization", "partof")].endswith("Modifiers: :missing.")
    assert "Modifiers" not in params[("Task", "authored-on")]
