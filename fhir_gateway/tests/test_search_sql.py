"""The hand-written FHIR searches (``ResourceHandler.search_sql``, two prepared statements)
find exactly what the ORM searches (``ResourceHandler.search``) find, in the same order,
for every kind of user and every parameter they take; parameters they cannot state fall
back to the ORM."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import connection

from accounts.models import User
from accounts.roles import Role
from fhir_gateway import views
from fhir_gateway.handlers import HANDLERS, SORTS
from fhir_gateway.models import FhirResource
from fhir_gateway.referral_mapping import BSER_BUSINESS_STATUS, REFERRAL_STATE_SYSTEM
from fhir_gateway.referral_resources import case_file_store
from referrals import services
from referrals.models import Referral, ReferralState
from referrals.permissions import referral_experts_grant
from referrals.tests.conftest import World, _user, build_world
from referrals.tests.people import people_around

pytestmark = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the hand-written searches are PostgreSQL only"
)


def _orm(
    user: User, resource_type: str, params: dict[str, list[str]], column: str
) -> list[tuple[str, str, str]]:
    handler = HANDLERS[resource_type]
    assert handler.search is not None
    return list(
        handler.search(user, params)
        .order_by("logical_id")
        .values_list("resource_type", "logical_id", column)
    )


def _sql(
    user: User,
    resource_type: str,
    params: dict[str, list[str]],
    column: str,
    count: int,
    offset: int,
    want_total: bool,
) -> tuple[int | None, list[tuple[Any, ...]]]:
    found = views._search_by_sql(
        user, HANDLERS[resource_type], params, {}, column, count, offset, want_total
    )
    assert found is not None, (resource_type, params)
    page = _as_orm(found)
    assert page is not None
    return page


def _as_orm(
    found: tuple[int | None, list[tuple[Any, ...]], list[int | None]] | None,
) -> tuple[int | None, list[tuple[Any, ...]]] | None:
    """``_search_by_sql``'s answer as ``_sorted_page``'s (total, rows), once its third
    part (each row's referral, for the audit) is checked against the stored rows."""
    if found is None:
        return None
    total, rows, sources = found
    current = FhirResource.objects.filter(is_current=True)
    stored = {
        (t, lid): pk
        for t, lid, pk in current.values_list("resource_type", "logical_id", "source_pk")
    }
    assert sources == [stored[(row[0], row[1])] for row in rows]
    assert all(pk is not None for pk in sources)
    return total, rows


@pytest.fixture
def world(db: Any) -> World:
    """The referral tests' network (the FHIR tests' own ``world`` is another one)."""
    return build_world()


@pytest.fixture
def users(world: World) -> dict[str, User]:
    people = people_around(world)
    return {
        **people.users,
        "district_consultant": world.district_consultant,
        "nobody": _user("nobody", Role.REFERRER, None),
    }


def test_hand_written_searches_equal_the_orm_for_every_user_and_parameter(
    world: World, users: dict[str, User]
) -> None:
    submitted = world.submit()
    world.referral_in(ReferralState.ACCEPTED)
    world.referral_in(ReferralState.DECLINED)
    forwarded = world.submit()
    world.act(forwarded, "forward")
    world.act(world.submit(), "acknowledge")  # submitted: Task.status received
    conference = world.referral_in(ReferralState.SCHEDULED)
    referral_experts_grant(referral=conference, experts=[users["invited_expert"]])
    world.submit(actor=world.foreign_referrer, requester_facility=world.foreign_district)
    services.referral_message_post(actor=world.consultant, referral_id=submitted.pk, text="Weight?")
    advised = world.referral_in(ReferralState.ADVISED)  # its consult note
    case_file_store(  # a case file of the submitted referral, as the gateway stores one
        world.referrer, submitted, b"%PDF-1.4 x\n%%EOF\n", content_type="", title="a.pdf"
    )
    unrouted = world.submit()  # as routing leaves one no department takes
    Referral.objects.filter(pk=unrouted.pk).update(assigned_department=None)
    ids = {r.pk: r.filler_id for r in Referral.objects.all()}
    hub, district = world.hub_paeds.pk, world.district.pk
    task_cases: list[dict[str, list[str]]] = [
        {},
        {"owner": [f"HealthcareService/{hub}"]},
        {"owner": [f"HealthcareService/{hub}"], "status": ["requested"]},
        {"owner": [f"{hub},HealthcareService/{world.hub2_paeds.pk}"]},
        {"owner": ["Organization/1"]},  # wrong type: nothing
        {"owner": ["not-a-reference"]},
        {"status": ["requested,accepted"]},
        {"status": ["rejected"]},
        {"business-status": ["scheduled"]},
        {"requester": [f"Organization/{district}"], "status": ["requested"]},
        {"focus": [f"ServiceRequest/{ids[submitted.pk]}"]},
        {"status": ["requested"], "owner": [f"HealthcareService/{hub}", f"{hub}"]},
        {"owner": [f"HealthcareService/{hub}"], "status": ["received"]},
        {"status": ["received,accepted"]},
        {"status": ["requested,received"]},
        {"status": ["requested,rejected"]},
        {"status": ["http://hl7.org/fhir/task-status|"]},  # every code of the system
        {"status": ["http://hl7.org/fhir/task-status|received"]},
        {"status": ["http://example.org/other|requested"]},  # another system: nothing
        {"status": ["|requested"]},  # no system: ours always has one
        {"business-status": [f"{REFERRAL_STATE_SYSTEM}|,{BSER_BUSINESS_STATUS}|"]},
        {"business-status": ["|submitted"]},
        {"business-status": [f"{BSER_BUSINESS_STATUS}|3.0"]},
        {"status:not": ["requested"]},
        {"status:not": ["received"]},  # submitted and acknowledged: the finer split
        {"status:not": ["requested,accepted"], "owner": [f"HealthcareService/{hub}"]},
        {"status:not": ["http://example.org/other|requested"]},  # excludes nothing
        {"status": ["requested,received"], "status:not": ["received"]},
        {"business-status:not": ["scheduled,submitted"]},
        {"owner:missing": ["true"]},
        {"owner:missing": ["false"], "status": ["requested"]},
        {"owner:missing": ["true,false"]},
    ]
    sr_cases: list[dict[str, list[str]]] = [
        {},
        {"performer": [f"HealthcareService/{hub}"]},
        {"status": ["active"]},
        {"status": ["http://hl7.org/fhir/request-status|"]},
        {"status": ["http://hl7.org/fhir/request-status|active,|revoked"]},
        {"requester": [f"Organization/{district}"]},
        {"status:not": ["active"]},
        {"performer:missing": ["true"]},
        {"performer:missing": ["false"], "status:not": ["revoked"]},
    ]
    communication_cases: list[dict[str, list[str]]] = [
        {},
        {"part-of": [f"Task/{ids[submitted.pk]}"]},
    ]
    document_cases: list[dict[str, list[str]]] = [
        {},
        {"related": [f"ServiceRequest/{ids[submitted.pk]}"]},
        {"based-on": [f"{ids[submitted.pk]}"]},
        {"related": [f"ServiceRequest/{ids[advised.pk]},ServiceRequest/{ids[submitted.pk]}"]},
        {"based-on": [f"ServiceRequest/{ids[advised.pk]}"]},
    ]
    nonempty = 0
    found: dict[str, int] = {}
    for name, user in users.items():
        for resource_type, cases in (
            ("Task", task_cases),
            ("ServiceRequest", sr_cases),
            ("Communication", communication_cases),
            ("DocumentReference", document_cases),
        ):
            for params in cases:
                for column in ("json_r4", "json_r5"):
                    expected = _orm(User.objects.get(pk=user.pk), resource_type, params, column)
                    n = len(expected)
                    # (count, offset, want_total) -> the ORM's answer: everything; the
                    # page without the count (_total=none); a middle page; past the end.
                    pages = {
                        (500, 0, True): (n, expected),
                        (500, 0, False): (None, expected),
                        (2, 1, True): (n, expected[1:3]),
                        (5, n + 3, True): (n, []),
                        (0, 0, True): (n, []),  # _count=0: the total alone
                    }
                    for (count, offset, want_total), answer in pages.items():
                        fresh = User.objects.get(pk=user.pk)
                        got = _sql(fresh, resource_type, params, column, count, offset, want_total)
                        assert (got[0], [tuple(r[:3]) for r in got[1]]) == answer, (
                            name,
                            resource_type,
                            params,
                            column,
                            count,
                            offset,
                            want_total,
                        )
                nonempty += bool(expected)
                found[resource_type] = found.get(resource_type, 0) + len(expected)
    assert nonempty > 30
    assert all(found[t] for t in ("Task", "ServiceRequest", "Communication", "DocumentReference"))


def test_parameters_sql_cannot_state_fall_back_to_the_orm(world: World) -> None:
    world.submit()
    handler = HANDLERS["Task"]
    assert handler.search_sql is not None
    user = User.objects.get(pk=world.consultant.pk)
    assert handler.search_sql(user, {"authored-on": ["ge2020-01-01"]}) is None
    assert handler.search_sql(user, {"identifier": ["urn:district-his|SR-1"]}) is None
    used: dict[str, list[str]] = {"_lastUpdated": ["ge2020-01-01"]}
    assert views._search_by_sql(user, handler, {}, used, "json_r4", 50, 0, True) is None


def test_the_endpoint_pages_the_hand_written_search_like_the_orm(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same Bundle (totals, links, entries) with the SQL path and with it switched off."""
    from django.test import Client

    from accounts.services import api_token_issue

    for _ in range(7):
        world.submit()
    token = api_token_issue(user=world.consultant, name="t").raw
    client = Client()
    url = f"/fhir/Task?owner=HealthcareService/{world.hub_paeds.pk}&status=requested&_count=3"

    def pages(path: str) -> list[dict[str, Any]]:
        out = []
        while path:
            response = client.get(path, HTTP_AUTHORIZATION=f"Bearer {token}")
            assert response.status_code == 200, response.content
            bundle = response.json()
            bundle.pop("id"), bundle.pop("meta")
            path = next((k["url"] for k in bundle["link"] if k["relation"] == "next"), "")
            for link in bundle["link"]:  # the cursor's signature carries the second it was made
                link["url"] = re.sub(r"(_cursor=[^&%:]*)(?:%3A|:)[^&]*", r"\1", link["url"])
            out.append(bundle)
        return out

    calls: list[int] = []
    original = views._search_by_sql

    def counting(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(views, "_search_by_sql", counting)
    fast = pages(url)
    assert calls and all(calls)
    monkeypatch.setattr(views, "_search_by_sql", lambda *a, **k: None)
    slow = pages(url)
    assert fast == slow
    assert [b["total"] for b in fast] == [7, 7, 7]
    assert sum(len(b["entry"]) for b in fast) == 7


@pytest.mark.parametrize(
    "sort",
    [
        [("priority", False), ("authored-on", False)],
        [("priority", True), ("authored-on", True)],
        [("_lastUpdated", True)],
        [("_id", True)],
        [("authored-on", False), ("priority", False)],
        [("status", False), ("priority", False)],
        [("status", True)],
        [("business-status", False), ("priority", False)],
        [("business-status", True), ("authored-on", True)],
    ],
)
def test_sorted_hand_written_searches_equal_the_orm(
    world: World, sort: list[tuple[str, bool]]
) -> None:
    """``_sort`` in SQL (``sort_sql``) pages exactly like the ORM (``sorts``), ties and all."""
    for priority in (4, 1, 3, 4, 2, 1, 3, 4):
        world.submit(priority=priority)
    world.act(world.submit(priority=2), "accept")
    world.act(world.submit(priority=3), "acknowledge")  # Task.status received
    user = User.objects.get(pk=world.consultant.pk)
    compared = []
    for resource_type, params in (
        ("Task", {}),
        ("Task", {"status": ["requested"]}),
        ("ServiceRequest", {}),
    ):
        handler = HANDLERS[resource_type]
        assert handler.search is not None
        keys = [("authored" if k == "authored-on" and resource_type == "ServiceRequest" else k, d)
                for k, d in sort]  # fmt: skip
        if any(k not in handler.sorts and k not in SORTS for k, _d in keys):
            continue  # business-status: Task only
        compared.append(resource_type)
        for count, offset in ((3, 0), (3, 3), (4, 7), (50, 0), (0, 0)):
            rows = handler.search(user, params)
            orm = views._sorted_page(handler, rows, keys, "json_r5", count, offset)
            for want_total in (True, False):
                found = _as_orm(views._search_by_sql(
                    user, handler, params, {}, "json_r5", count, offset, want_total, keys
                ))  # fmt: skip
                expected = (rows.count() if want_total else None, orm)
                assert found == expected, (resource_type, params, count, offset, want_total)
        # Keyset pages (a next link's _cursor: the last row's sort values) alike, and
        # together every match once, in the order
        everything = views._sorted_page(
            handler, handler.search(user, params), keys, "json_r5", 500, 0
        )
        walked: list[tuple[Any, ...]] = []
        after = None
        while True:
            rows = handler.search(user, params)
            orm = views._sorted_page(handler, rows, keys, "json_r5", 3, 0, after)
            found = _as_orm(
                views._search_by_sql(user, handler, params, {}, "json_r5", 3, 0, True, keys, after)
            )
            assert found == (rows.count(), orm), (resource_type, params, after)
            if not orm:
                break
            walked += orm
            after = list(orm[-1][3])
        assert walked == everything and len(everything) > 3
    assert "Task" in compared
