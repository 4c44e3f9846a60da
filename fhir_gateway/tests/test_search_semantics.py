"""FHIR search semantics on the referral resources: repeated parameters AND, commas OR
(dates too), the four token forms, absolute references, paging links that keep the
format (review findings: each of these answered otherwise before)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from django.core import signing

from fhir_gateway.referral_mapping import BSER_BUSINESS_STATUS, REFERRAL_STATE_SYSTEM
from fhir_gateway.registry_projection import project_registry
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import PLACER, World, body, submit, task_of, update_task
from referrals.models import Referral
from tests.factories import FacilityFactory

pytestmark = pytest.mark.django_db


def _ids(world: World, query: str) -> list[str]:
    response = world.r4.get(query, Accept=FHIR_R4)
    assert response.status_code == 200, response.content
    return sorted(
        e["resource"]["id"]
        for e in body(response).get("entry", [])
        if e["search"]["mode"] == "match"
    )


@pytest.fixture
def two(world: World) -> tuple[str, str]:
    """Two submitted referrals of the world's requester (Task ids, in id order)."""
    a = task_of(submit(world, "A"))["id"]
    b = task_of(submit(world, "B"))["id"]
    return a, b


def test_repeated_id_parameters_and(world: World, two: tuple[str, str]) -> None:
    a, b = two
    assert _ids(world, f"/fhir/Task?_id={a}&_id={b}") == []
    assert _ids(world, f"/fhir/Task?_id={a},{b}&_id={b}") == [b]
    assert _ids(world, f"/fhir/Task?_id={a},{b}") == sorted(two)


@pytest.mark.parametrize(("param", "field"), [("authored-on", "created_at"), ("_lastUpdated", "")])
def test_a_comma_in_a_date_parameter_is_or(
    world: World, two: tuple[str, str], param: str, field: str
) -> None:
    a, b = two
    if field:  # authored-on: the referral's creation; move one of them into 2020
        Referral.objects.filter(filler_id=a).update(created_at=datetime(2020, 6, 1, tzinfo=UTC))
        assert _ids(world, f"/fhir/Task?{param}=lt2021,ge2026-11-01") == sorted(two)
        assert _ids(world, f"/fhir/Task?{param}=lt2021") == [a]
        assert _ids(world, f"/fhir/Task?{param}=lt1990,ge2100") == []
        # Repeated: AND
        assert _ids(world, f"/fhir/Task?{param}=lt2021,ge2026-11-01&{param}=ge2021") == [b]
    else:
        assert _ids(world, f"/fhir/Task?{param}=lt1990-01-01,ge2000-01-01") == sorted(two)
        assert _ids(world, f"/fhir/Task?{param}=lt1990-01-01,gt2100-01-01") == []


def test_a_bad_date_names_its_parameter(world: World, two: tuple[str, str]) -> None:
    response = world.r4.get("/fhir/Task?authored-on=ge2026,yesterday", Accept=FHIR_R4)
    assert response.status_code == 400
    assert "authored-on 'yesterday'" in outcome_issue(response)["diagnostics"]


@pytest.mark.parametrize(
    ("value", "prefixed"),
    [
        (">=2020-01-01", "ge2020-01-01"),
        (">2020", "gt2020"),
        ("<=2030-05", "le2030-05"),
        ("<2030-01-01T10:00:00Z", "lt2030-01-01T10:00:00Z"),
        ("=2020", "eq2020"),
    ],
)
def test_a_comparison_operator_before_a_date_is_named_with_its_fhir_prefix(
    world: World, two: tuple[str, str], value: str, prefixed: str
) -> None:
    """fhirclient's search operators ({"$gte": "2020-01-01"}, from DSTU1) send ``>=2020-01-01``:
    still 400 (FHIR writes the prefix), but the refusal says what to send."""
    for param in ("authored-on", "_lastUpdated"):
        response = world.r4.get(f"/fhir/Task?{param}={quote(value)}", Accept=FHIR_R4)
        assert response.status_code == 400, response.content
        issue = outcome_issue(response)
        assert issue["code"] == "invalid"
        assert issue["diagnostics"] == (
            f"{param} {value!r} is not a FHIR date search value. FHIR writes a comparison "
            f"as a prefix (eq ge gt le lt): {prefixed!r}."
        )
        # What it names: both Tasks were made now (after 2020, before 2030)
        expected = [] if prefixed.startswith("eq") else sorted(two)
        assert _ids(world, f"/fhir/Task?{param}={quote(prefixed)}") == expected
    # A history window takes no prefix at all: the refusal says so, suggesting none.
    history = world.r4.get(f"/fhir/Task/{two[0]}/_history?_since={quote(value)}", Accept=FHIR_R4)
    assert history.status_code == 400
    assert outcome_issue(history)["diagnostics"] == (
        "_since takes a date or instant, without a prefix."
    )


@pytest.mark.parametrize(
    ("query", "matches"),
    [
        ("status=requested", True),
        ("status=http://hl7.org/fhir/task-status|requested", True),
        ("status=http://hl7.org/fhir/task-status|", True),  # every code of the system
        ("status=http://example.org/not-task-status|requested", False),
        ("status=|requested", False),  # no system: Task.status always has one
        ("status=http://hl7.org/fhir/task-status|accepted", False),
        ("business-status=submitted", True),
        ("business-status=|submitted", False),
        (f"business-status={quote(REFERRAL_STATE_SYSTEM)}|", True),
        (f"business-status={quote(BSER_BUSINESS_STATUS)}|", True),
        (f"business-status={quote(BSER_BUSINESS_STATUS)}|2.0", True),
        (f"business-status={quote(BSER_BUSINESS_STATUS)}|submitted", False),
        (f"identifier={quote(PLACER)}|", True),  # every identifier of that system
        ("identifier=https://consilium.example.org/fhir/sid/referral|", True),
        ("identifier=https://other.example.org/sid|", False),
    ],
)
def test_the_four_token_forms(
    world: World, two: tuple[str, str], query: str, matches: bool
) -> None:
    assert _ids(world, f"/fhir/Task?{query}") == (sorted(two) if matches else [])


@pytest.mark.parametrize(
    ("query", "matches"),
    [
        ("status=active", True),
        ("status=http://hl7.org/fhir/request-status|", True),
        ("status=http://hl7.org/fhir/request-status|active", True),
        ("status=|active", False),
        ("status=http://example.org/x|active", False),
        (f"identifier={quote(PLACER)}|", True),
        (f"identifier={quote(PLACER)}|A", "A"),
    ],
)
def test_the_four_token_forms_on_service_request(
    world: World, two: tuple[str, str], query: str, matches: bool | str
) -> None:
    expected = sorted(two) if matches is True else [] if matches is False else [two[0]]
    assert _ids(world, f"/fhir/ServiceRequest?{query}") == expected


def test_an_absolute_reference_matches_only_on_this_server(
    world: World, two: tuple[str, str]
) -> None:
    a, _b = two
    foreign = f"https://other.example.org/fhir/ServiceRequest/{a}"
    assert _ids(world, f"/fhir/Task?focus={foreign}") == []
    assert _ids(world, f"/fhir/Task?focus=http://testserver/fhir/ServiceRequest/{a}") == [a]
    assert _ids(world, f"/fhir/Task?focus={foreign},ServiceRequest/{a}") == [a]
    for ours in (  # the same base written otherwise
        f"http://testserver:80/fhir/ServiceRequest/{a}",
        f"HTTP://TestServer/fhir/ServiceRequest/{a}",
    ):
        assert _ids(world, f"/fhir/Task?focus={ours}") == [a], ours
    for theirs in (
        f"http://testserver:8080/fhir/ServiceRequest/{a}",
        f"https://testserver/fhir/ServiceRequest/{a}",
        f"http://testserver/other/ServiceRequest/{a}",
        f"http://testserver:x/fhir/ServiceRequest/{a}",
        f"http://[::1/fhir/ServiceRequest/{a}",
    ):
        assert _ids(world, f"/fhir/Task?focus={quote(theirs)}") == [], theirs
    owner = task_of(submit(world, "C"))["owner"]["reference"]  # HealthcareService/<pk>
    mine = _ids(world, f"/fhir/Task?owner=http://testserver/fhir/{owner}")
    assert len(mine) == 3
    assert _ids(world, f"/fhir/Task?owner=https://other.example.org/fhir/{owner}") == []


def test_paging_links_keep_the_format(world: World, two: tuple[str, str]) -> None:
    fmt = quote("application/fhir+json; fhirVersion=5.0")
    first = world.r4.get(f"/fhir/Task?_count=1&_format={fmt}")  # no Accept header
    assert first.status_code == 200
    assert "fhirVersion=5.0" in first["Content-Type"]
    links: dict[str, Any] = {link["relation"]: link["url"] for link in body(first)["link"]}
    second = world.r4.get(links["next"].removeprefix("http://testserver"))
    assert second.status_code == 200
    assert "fhirVersion=5.0" in second["Content-Type"], links["next"]
    assert [e["resource"]["id"] for e in body(second)["entry"]] == [max(two)]


def _walk(world: World, url: str, between: Any = None) -> list[str]:
    """Every match of a search, page by page along its next links (``between`` runs on
    each page before the next is read)."""
    seen: list[str] = []
    while url:
        response = world.r5.get(url.removeprefix("http://testserver"), Accept=FHIR_R5)
        assert response.status_code == 200, response.content
        bundle = body(response)
        page = [e["resource"]["id"] for e in bundle.get("entry", [])]
        seen += page
        if between is not None:
            between(page)
        url = next((k["url"] for k in bundle["link"] if k["relation"] == "next"), "")
    return seen


def test_a_worklist_that_accepts_what_it_sees_skips_nothing(world: World) -> None:
    # Given five requested Tasks for the R5 system's department
    tasks = sorted(task_of(submit(world, f"W{n}"))["id"] for n in range(5))

    def accept(page: list[str]) -> None:  # what a worklist client does with a page
        for task_id in page:
            response = update_task(
                world.r5, task_id, lambda t: t.update(status="accepted"), FHIR_R5
            )
            assert response.status_code == 200, response.content

    # When it pages through status=requested, accepting each page before the next
    seen = _walk(world, "/fhir/Task?status=requested&_count=2", accept)
    # Then it saw every Task once (by offsets it saw 1, 2, then page 2 began at the 5th)
    assert seen == tasks


@pytest.mark.parametrize(
    ("sort", "again"),
    [("-_lastUpdated", False), ("priority,-authored-on", False), ("_lastUpdated", True)],
)
def test_keyset_pages_hold_when_a_sort_value_moves(world: World, sort: str, again: bool) -> None:
    tasks = [task_of(submit(world, f"S{n}"))["id"] for n in range(4)]
    expected = _walk(world, f"/fhir/Task?_sort={sort}&_count=50")
    assert sorted(expected) == sorted(tasks)
    touched: list[str] = []

    def touch_first(page: list[str]) -> None:  # a new version: _lastUpdated moves on
        if not touched:
            touched.append(page[0])
            response = update_task(
                world.r5, page[0], lambda t: t.update(status="accepted"), FHIR_R5
            )
            assert response.status_code == 200, response.content

    # The page after the first starts after the values the first row had when it was
    # read; a row that changed after it was seen shows again at its new place when that
    # lies ahead (ascending _lastUpdated: at the end), else not
    seen = _walk(world, f"/fhir/Task?_sort={sort}&_count=1", touch_first)
    assert seen == expected + (touched if again else [])


def test_registry_keyset_pages_walk_every_row_once(fhir: Any, network: Any) -> None:
    for n in range(5):
        FacilityFactory.create(code=f"K{n}", name=f"Keyset {n % 2}")
    project_registry()
    for sort in ("name", "-name", "_id"):
        url = f"/fhir/Organization?name=keyset&_sort={sort}&_count=2"
        everything = body(fhir.get(f"/fhir/Organization?name=keyset&_sort={sort}"))
        expected = [e["resource"]["id"] for e in everything["entry"]]
        seen: list[str] = []
        while url:
            bundle = body(fhir.get(url.removeprefix("http://testserver")))
            seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
            assert bundle["total"] == 5
            url = next((k["url"] for k in bundle["link"] if k["relation"] == "next"), "")
        assert seen == expected and len(seen) == 5


def _next_cursor(world: World, query: str) -> str:
    bundle = body(world.r4.get(query, Accept=FHIR_R4))
    url = next(k["url"] for k in bundle["link"] if k["relation"] == "next")
    return dict(parse_qsl(urlsplit(url).query))["_cursor"]


def test_a_cursor_we_did_not_give_for_this_search_is_400(world: World) -> None:
    for n in range(3):
        submit(world, f"C{n}")
    ours = _next_cursor(world, "/fhir/Task?_count=1")
    by_priority = _next_cursor(world, "/fhir/Task?_count=1&_sort=priority")
    forged = signing.dumps([["s", "x"]], salt="another")
    for query in (
        "_count=1&_cursor=%25%25%25",  # not even base64
        f"_count=1&_cursor={forged}",  # signed, not by us for cursors
        f"_count=1&_cursor={ours[:-2]}",  # a changed signature
        f"_count=1&_sort=priority&_cursor={ours}",  # another sort's
        f"_count=1&_cursor={by_priority}",
        "_count=1&_cursor=" + "x" * 3000,
        "_count=0&_cursor=garbage",  # checked when no page is asked for too
        "_summary=count&_cursor=garbage",
    ):
        response = world.r4.get(f"/fhir/Task?{query}", Accept=FHIR_R4)
        assert response.status_code == 400, (query, response.content)
        assert outcome_issue(response)["expression"] == ["_cursor"]
    # Ours for another type is refused too, and ours for this search pages on
    response = world.r4.get(f"/fhir/ServiceRequest?_count=1&_cursor={ours}", Accept=FHIR_R4)
    assert response.status_code == 400
    response = world.r4.get(f"/fhir/Task?_count=1&_cursor={ours}", Accept=FHIR_R4)
    assert response.status_code == 200
    assert len(body(response)["entry"]) == 1
