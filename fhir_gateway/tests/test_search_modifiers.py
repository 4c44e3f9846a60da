"""Search modifiers a worklist and a registry browser use: ``:not`` on token parameters
(none of the values), ``:missing`` where a value may be absent (``Task?owner:missing=true``:
the referrals routing has not placed yet), ``name:exact`` on the registry. Each answers
exactly what it names; every other modifier stays a 400 (test_errors)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from fhir_gateway.registry_projection import project_registry
from fhir_gateway.subscriptions import TOPIC_URL
from fhir_gateway.tests.conftest import FHIR_R4, outcome_issue
from fhir_gateway.tests.referral_world import (
    PLACER,
    World,
    accepted,
    body,
    message,
    submit,
    task_of,
    transaction,
)
from referrals.models import Referral
from tests.factories import (
    FacilityIdentifierFactory,
    PractitionerRoleFactory,
    SpecialtyFactory,
)

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


@pytest.mark.parametrize(
    ("query", "what"),
    [
        # fhirclient's nested search dict {"focus": {"identifier": …}}: the Task of one
        # referral by its placer identifier, through its ServiceRequest. It was ignored
        # (X-FHIR-Ignored-Parameters) and every Task of the caller answered.
        (f"Task?focus.identifier={quote(PLACER)}|A", "Chained search (focus.…)"),
        (f"Task?patient:Patient.identifier={quote(PLACER)}|A", "Chained search (patient.…)"),
        (f"ServiceRequest?requester.identifier={quote(PLACER)}|A", "Chained search"),
        ("Task?_has:Communication:part-of:identifier=x|1", "Reverse chaining (_has)"),
    ],
)
def test_a_chained_search_is_400_never_ignored(
    world: World, cases: dict[str, str], query: str, what: str
) -> None:
    response = world.r4.get(f"/fhir/{query}", Accept=FHIR_R4)
    assert response.status_code == 400, response.content
    issue = outcome_issue(response)
    assert issue["code"] == "not-supported"
    assert issue["diagnostics"].startswith(what), issue["diagnostics"]
    assert issue["expression"] == [query.split("?")[1].split("=")[0]]
    # What to send instead, where the type has it: the placer identifier finds the one.
    if query.startswith("Task?focus"):
        assert "identifier=<system>|<value>" in issue["diagnostics"]
        assert _ids(world, f"/fhir/Task?identifier={quote(PLACER)}|A") == [cases["accepted"]]


def test_a_chain_on_the_registry_is_400_and_an_unknown_dotted_name_still_ignored(
    fhir: Any, network: Any
) -> None:
    chained = fhir.get("/fhir/HealthcareService?organization.name=Mahosot", Accept=FHIR_R4)
    assert chained.status_code == 400, chained.content
    assert outcome_issue(chained)["diagnostics"].startswith("Chained search (organization.…)")
    # A name that is no parameter of the type, dotted or not, is ignored as before.
    unknown = fhir.get("/fhir/HealthcareService?colour.name=red", Accept=FHIR_R4)
    assert unknown.status_code == 200, unknown.content
    assert unknown["X-FHIR-Ignored-Parameters"] == "colour.name"
    assert body(unknown)["total"] == 2


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


# --------------------------------------------------------------------------- review


def test_registry_identifier_not_names_one_identifier_not_a_system_and_a_value_apart(
    fhir: Any, network: Any
) -> None:
    """Found by a review: ``~Q(identifiers__system=…, identifiers__value=…)`` is Django's
    exclude over a multi-valued relation, whose conditions need not hold on the same
    identifier: a facility with ``moh|01-001`` and ``other|X-1`` was left out of
    ``identifier:not=moh|X-1`` although it has no such identifier."""
    FacilityIdentifierFactory.create(
        facility=network.hub, system="https://other.example/x", value="X-1"
    )
    project_registry()
    hub = str(network.hub.pk)

    def ids(query: str) -> list[str]:
        response = fhir.get(f"/fhir/{query}")
        assert response.status_code == 200, response.content
        return [e["resource"]["id"] for e in body(response).get("entry", [])]

    for resource_type in ("Organization", "Location"):
        assert hub in ids(f"{resource_type}?identifier:not=https://moh.gov.vn/fac|X-1")
        assert hub in ids(f"{resource_type}?identifier:not=https://other.example/x|01-001")
        # The identifier it has, by system and value, or its system: left out
        assert hub not in ids(f"{resource_type}?identifier:not=https://moh.gov.vn/fac|01-001")
        assert hub not in ids(f"{resource_type}?identifier:not=https://other.example/x|")
        assert hub not in ids(f"{resource_type}?identifier:not=X-1")
        # The plain search is unchanged
        assert ids(f"{resource_type}?identifier=https://other.example/x|X-1") == [hub]
        assert ids(f"{resource_type}?identifier=https://moh.gov.vn/fac|X-1") == []


def test_affiliation_specialty_not_names_one_specialty(fhir: Any, network: Any) -> None:
    """Found by a review: as the identifiers, a support link's specialties are many; a link
    for SNOMED pediatrics and ``other|X`` was left out of ``specialty:not=other|<pediatrics>``."""
    network.link.specialties.add(
        SpecialtyFactory.create(system="https://other.example/spec", code="X")
    )
    project_registry()
    link = str(network.link.pk)
    pediatrics = network.pediatrics.specialty.code

    def ids(query: str) -> list[str]:
        response = fhir.get(f"/fhir/OrganizationAffiliation?{query}")
        assert response.status_code == 200, response.content
        return [e["resource"]["id"] for e in body(response).get("entry", [])]

    assert ids(f"specialty:not=https://other.example/spec|{pediatrics}") == [link]
    assert ids("specialty:not=http://snomed.info/sct|X") == [link]
    assert ids(f"specialty:not=http://snomed.info/sct|{pediatrics}") == []
    assert ids("specialty:not=X") == []
    assert ids("specialty:not=https://other.example/spec|") == []
    assert ids("specialty=https://other.example/spec|X") == [link]
    assert ids(f"specialty=https://other.example/spec|{pediatrics}") == []
    # A role without a department has no specialty: :not keeps it (FHIR's rule)
    loose = PractitionerRoleFactory.create(facility=network.spoke, department=None)
    project_registry()
    response = fhir.get(f"/fhir/PractitionerRole?specialty:not={pediatrics}")
    assert [e["resource"]["id"] for e in body(response)["entry"]] == [str(loose.pk)]


def test_a_member_identifier_system_alone_names_every_value_of_it(world: World) -> None:
    """Found by a review: ``identifier=<system>|`` (FHIR: any identifier of that system)
    matched no Communication, so ``identifier:not=<system>|`` left none out, the message
    carrying one included."""
    task_id = accepted(world)
    system = "https://codao.example.org/sid/message"
    sent = message(task_id, "Weight today?")
    sent["identifier"] = [{"system": system, "value": "M-1"}]
    keyed = body(world.r4.post("/fhir/Communication", sent))["id"]
    plain = body(world.r4.post("/fhir/Communication", message(task_id, "And now?")))["id"]
    assert _ids(world, f"/fhir/Communication?identifier={quote(system)}|") == [keyed]
    assert _ids(world, f"/fhir/Communication?identifier:not={quote(system)}|") == [plain]
    assert _ids(world, "/fhir/Communication?identifier:not=https://elsewhere|") == sorted(
        [keyed, plain]
    )
    assert _ids(world, "/fhir/Communication?identifier=|") == []  # neither system nor value


@pytest.mark.parametrize(
    "query",
    [
        "Organization?_id:not=%00",
        "Organization?identifier:not=a%00",
        "Organization?name:exact=%00",
        "HealthcareService?specialty:not=%00",
        "Endpoint?status:not=%00",
        "Task?_id:not=a%00",
        "Organization?_id=%00",
    ],
)
def test_a_nul_in_a_modified_search_value_is_400_invalid(
    fhir: Any, network: Any, query: str
) -> None:
    """Found by a review: PostgreSQL refused the value (422) where docs/fhir.md promises
    400 ``invalid`` for a NUL in a search value (the referral filters check it, the
    registry's and ``_id`` did not)."""
    response = fhir.get(f"/fhir/{query}")
    assert response.status_code == 400, response.content
    assert outcome_issue(response)["code"] == "invalid"


def test_subscription_status_takes_not_as_every_token_parameter(world: World) -> None:
    """Found by a review: docs/fhir.md promises ``:not`` on every token parameter; the
    Subscription's ``status`` refused it (400)."""
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Our HIS polls.",
        "criteria": TOPIC_URL,
        "channel": {"type": "rest-hook", "payload": "application/fhir+json"},
    }
    created = world.r4.post("/fhir/Subscription", subscription)
    assert created.status_code == 201, created.content
    sub = body(created)["id"]
    assert _ids(world, "/fhir/Subscription?status:not=off") == [sub]
    assert _ids(world, "/fhir/Subscription?status:not=active") == []
    assert _ids(world, "/fhir/Subscription?status:not=off,active") == []
    # The token's system counts (it was ignored: any system's "active" was ours)
    status_system = "http://hl7.org/fhir/subscription-status"
    assert _ids(world, f"/fhir/Subscription?status={status_system}|active") == [sub]
    assert _ids(world, f"/fhir/Subscription?status={status_system}|") == [sub]
    assert _ids(world, "/fhir/Subscription?status=http://example.org/x|active") == []
    assert _ids(world, "/fhir/Subscription?status=|active") == []
    assert _ids(world, "/fhir/Subscription?status:not=http://example.org/x|active") == [sub]
    assert _ids(world, f"/fhir/Subscription?status:not={status_system}|active") == []
    statement = body(world.r4.get("/fhir/metadata"))
    (subscription,) = (r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription")
    (status,) = (p for p in subscription["searchParam"] if p["name"] == "status")
    assert status["documentation"].endswith("Modifiers: :not.")


def test_name_exact_undoes_fhirs_escapes(fhir: Any, network: Any) -> None:
    """Found by a review: ``name:exact`` undid ``\\,`` only; ``\\|``, ``\\$`` and ``\\\\``
    (FHIR's other escapes in a search value) stayed two characters and matched nothing."""
    network.lao.name = "Mahosot | East $ wing \\ B, C"
    network.lao.save(update_fields=["name"])
    project_registry()
    escaped = quote("Mahosot \\| East \\$ wing \\\\ B\\, C")
    response = fhir.get(f"/fhir/Organization?name:exact={escaped}")
    assert [e["resource"]["id"] for e in body(response)["entry"]] == [str(network.lao.pk)]


def test_address_country_contains_is_contains(fhir: Any, network: Any) -> None:
    """Found by a review: ``:contains`` on every string parameter was the parameter's own
    search, and the CapabilityStatement names it; ``address-country``'s own is the ISO
    code or a name's start, so ``address-country:contains=PDR`` missed "Lao PDR"."""
    lao = str(network.lao.pk)

    def ids(query: str) -> list[str]:
        response = fhir.get(f"/fhir/{query}")
        assert response.status_code == 200, response.content
        return sorted(e["resource"]["id"] for e in body(response).get("entry", []))

    assert ids("Organization?address-country=PDR") == []  # the plain one: a name's start
    assert ids("Organization?address-country:contains=PDR") == [lao]
    assert ids("Location?address-country:contains=pdr") == [lao]
    assert ids("Organization?address-country:contains=a") == ids("Organization")  # LA, Viet Nam
    assert ids("HealthcareService?address-country:contains=Nam") == sorted(
        [str(network.pediatrics.pk), str(network.cardiology.pk)]
    )
    assert ids("HealthcareService?address-country:contains=PDR") == []


@pytest.mark.parametrize(
    "query",
    [
        "Task?status:not=completed",
        "Task?business-status:not=completed",
        "Task?owner:missing=true,false",
        "Task?identifier:not=x",
        "Task?_id:not=x",
        "ServiceRequest?status:not=revoked",
        "ServiceRequest?performer:missing=true,false",
        "ServiceRequest?identifier:not=x",
        "Communication?identifier:not=x",
        "DocumentReference?identifier:not=x",
    ],
)
def test_negations_stay_within_the_callers_referrals(
    world: World, cases: dict[str, str], query: str
) -> None:
    """Checked by a review (no leak found): a negation is a condition inside the referral
    scope, on the ORM path and the hand-written SQL alike; an unrelated facility finds
    nothing, the department only the referrals routed to it."""
    response = world.other.get(f"/fhir/{query}", Accept=FHIR_R4)
    assert response.status_code == 200, response.content
    assert body(response)["total"] == 0
    response = world.r5.get(f"/fhir/{query}", Accept=FHIR_R4)
    found = {e["resource"]["id"] for e in body(response).get("entry", [])}
    assert cases["unrouted"] not in found


def test_the_type_modifier_of_a_reference_parameter_names_the_type(
    world: World, cases: dict[str, str]
) -> None:
    """``focus:ServiceRequest=<id>`` is ``focus=ServiceRequest/<id>`` (FHIR's ``[type]``
    modifier, which fhirclient-style clients send); it was 400 "modifier not supported"."""
    accepted_id, submitted_id = cases["accepted"], cases["submitted"]
    assert _ids(world, f"/fhir/Task?focus:ServiceRequest={accepted_id}") == [accepted_id]
    assert _ids(world, f"/fhir/Task?focus:ServiceRequest={accepted_id},{submitted_id}") == sorted(
        [accepted_id, submitted_id]
    )
    # A reference of that type, relative or absolute, is taken as it is.
    assert _ids(world, f"/fhir/Task?focus:ServiceRequest=ServiceRequest/{accepted_id}") == [
        accepted_id
    ]
    absolute = f"http://testserver/fhir/ServiceRequest/{accepted_id}"
    assert _ids(world, f"/fhir/Task?focus:ServiceRequest={quote(absolute)}") == [accepted_id]
    # Another type: nothing of it is the focus of these Tasks.
    assert _ids(world, f"/fhir/Task?focus:Patient={accepted_id}") == []
    # Beside the plain parameter: both hold (AND).
    both = f"/fhir/Task?focus=ServiceRequest/{accepted_id}&focus:ServiceRequest={submitted_id}"
    assert _ids(world, both) == []
    # The paging links name it the plain way.
    response = world.r4.get(f"/fhir/Task?focus:ServiceRequest={accepted_id}", Accept=FHIR_R4)
    self_link = next(link["url"] for link in body(response)["link"] if link["relation"] == "self")
    assert f"focus=ServiceRequest%2F{accepted_id}" in self_link


def test_a_type_modifier_whose_reference_names_another_type_is_400(
    world: World, cases: dict[str, str]
) -> None:
    response = world.r4.get(
        f"/fhir/Task?focus:ServiceRequest=Patient/{cases['accepted']}", Accept=FHIR_R4
    )
    assert response.status_code == 400, response.content
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("invalid", ["focus:ServiceRequest"])
    # A lower-case modifier is no type: still an unsupported modifier.
    lower = world.r4.get(f"/fhir/Task?focus:servicerequest={cases['accepted']}", Accept=FHIR_R4)
    assert lower.status_code == 400
    assert outcome_issue(lower)["code"] == "not-supported"


def test_a_reference_id_with_a_leading_zero_names_no_row(
    world: World, cases: dict[str, str]
) -> None:
    """Logical ids are strings: ``HealthcareService/01`` is not ``HealthcareService/1``
    (review suspicion). They were read as numbers, so the search found that row's cases."""
    department, facility = world.network.pediatrics.pk, world.network.spoke.pk
    routed = sorted([cases["submitted"], cases["accepted"]])
    assert _ids(world, f"/fhir/Task?owner=HealthcareService/{department}") == routed
    assert _ids(world, f"/fhir/Task?owner=HealthcareService/0{department}") == []
    assert _ids(world, f"/fhir/ServiceRequest?performer=HealthcareService/0{department}") == []
    assert _ids(world, f"/fhir/Task?requester=Organization/0{facility}") == []
    assert _ids(world, f"/fhir/Task?requester=Organization/{facility}") == sorted(cases.values())
    assert (
        _ids(world, f"/fhir/HealthcareService?organization=Organization/0{world.network.hub.pk}")
        == []
    )
