"""The pull feed: Subscriptions, $events and $status (R4 Backport and R5), scope, order."""

from __future__ import annotations

import json
import re
import threading
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.db import connections, transaction

from accounts.roles import Role
from accounts.services import api_token_issue
from fhir_gateway.models import FeedEvent, FeedSubscription, FhirResource
from fhir_gateway.subscriptions import (
    CHANNEL_TYPES,
    EVENT_NUMBER_EXTENSION,
    NOTIFICATION_R4_PROFILE,
    PAYLOAD_CONTENT,
    STATUS_R4_PROFILE,
    TOPIC_URL,
)
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import World, body, submit, task_of
from fhir_gateway.tests.referral_world import transaction as bundle
from fhir_gateway.versions import model_class
from referrals.models import AuditEntry, Referral
from referrals.services import referral_transition
from tests.factories import SupportLinkFactory, UserFactory

pytestmark = pytest.mark.django_db


def _r4_subscription(**changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Our HIS cannot receive pushes; it polls.",
        "criteria": TOPIC_URL,
        "channel": {
            "type": "rest-hook",
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": "id-only"}]},
        },
    }
    resource.update(changes)
    return resource


def _r5_subscription(**changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "name": "worklist-poller",
        "topic": TOPIC_URL,
        "channelType": {"system": CHANNEL_TYPES, "code": "rest-hook"},
        "content": "id-only",
    }
    resource.update(changes)
    return resource


def _subscribe(client: FhirClient, version: str = FHIR_R4) -> str:
    resource = _r4_subscription() if version == FHIR_R4 else _r5_subscription()
    response = client.post("/fhir/Subscription", resource, content_type=version, Accept=version)
    assert response.status_code == 201, response.content
    return str(body(response)["id"])


def _get(client: FhirClient, path: str, version: str = FHIR_R4, status: int = 200) -> Any:
    response = client.get(path, Accept=version)
    assert response.status_code == status, response.content
    return body(response)


def _accept(world: World, task_id: str) -> None:
    referral = Referral.objects.get(filler_id=task_id)
    referral_transition(actor=world.consultant, referral_id=referral.pk, action="accept")


def _numbers(notification: dict[str, Any], version: str) -> list[int]:
    status = notification["entry"][0]["resource"]
    if version == FHIR_R5:
        return [int(e["eventNumber"]) for e in status.get("notificationEvent", [])]
    return [
        int(part["valueString"])
        for p in status["parameter"]
        if p["name"] == "notification-event"
        for part in p["part"]
        if part["name"] == "event-number"
    ]


def _ids(notification: dict[str, Any]) -> list[tuple[str, str]]:
    """(fullUrl path, etag) of the id-only entries after the status."""
    return [
        (urlsplit(e["fullUrl"]).path.removeprefix("/fhir/"), e["response"]["etag"])
        for e in notification["entry"][1:]
    ]


def _lao_transaction(world: World, placer: str) -> dict[str, Any]:
    lao = f"Organization/{world.network.lao.pk}"
    submission = bundle(world, placer, requester=lao)
    submission["entry"][2]["resource"]["requester"] = {"reference": lao}
    return submission


# --------------------------------------------------------------------------- feed rows


def test_publication_writes_one_feed_row_per_stored_version_and_party_facility(world: World):
    task_id = str(task_of(submit(world))["id"])
    _accept(world, task_id)

    rows = set(
        FeedEvent.objects.values_list("facility_id", "resource_type", "logical_id", "version_id")
    )
    spoke, hub = world.network.spoke.pk, world.network.hub.pk
    expected = {
        (facility, rtype, task_id, version)
        for facility in (spoke, hub)
        for rtype, version in (("Patient", 1), ("ServiceRequest", 1), ("Task", 1), ("Task", 2))
    }
    assert rows == expected
    # Numbered only when read (after commit).
    assert not FeedEvent.objects.filter(number__isnull=False).exists()


# --------------------------------------------------------------------------- Subscription CRUD


def test_member_subscribes_in_r4_and_reads_it_in_both_versions(world: World):
    response = world.r4.post("/fhir/Subscription", _r4_subscription())

    assert response.status_code == 201, response.content
    created = body(response)
    assert response["Location"].endswith(f"/fhir/Subscription/{created['id']}/_history/1")
    # Milliseconds, as every resource's (the models' dump wrote microseconds: integrator)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", created["meta"]["lastUpdated"])
    assert (created["status"], created["criteria"]) == ("active", TOPIC_URL)
    model_class("Subscription", "4.0").model_validate(created)
    r5 = _get(world.r4, f"/fhir/Subscription/{created['id']}", FHIR_R5)
    model_class("Subscription", "5.0").model_validate(r5)
    assert (r5["topic"], r5["content"], r5["channelType"]["code"]) == (
        TOPIC_URL,
        "id-only",
        "rest-hook",
    )
    assert "endpoint" not in r5
    assert r5["managingEntity"] == {"reference": f"Organization/{world.network.spoke.pk}"}
    found = _get(world.r4, "/fhir/Subscription")
    assert [e["resource"]["id"] for e in found["entry"]] == [created["id"]]
    assert _get(world.r4, "/fhir/Subscription?status=active")["total"] == 1
    assert _get(world.r4, "/fhir/Subscription?status=off")["total"] == 0
    state = FeedSubscription.objects.get()
    assert (state.logical_id, state.facility_id) == (created["id"], world.network.spoke.pk)


def test_others_subscriptions_are_404_and_refused_actions_change_nothing(world: World):
    sub = _subscribe(world.r4)
    before = list(FhirResource.objects.filter(resource_type="Subscription").values_list("pk"))

    for client in (world.other, world.r5):  # another facility; the referral's other party
        assert client.get(f"/fhir/Subscription/{sub}").status_code == 404
        assert client.get(f"/fhir/Subscription/{sub}/_history/1").status_code == 404
        assert client.get(f"/fhir/Subscription/{sub}/$events").status_code == 404
        assert client.get(f"/fhir/Subscription/{sub}/$status").status_code == 404
        response = client.delete(f"/fhir/Subscription/{sub}")
        assert response.status_code == 404
        assert outcome_issue(response)["code"] == "not-found"
        assert _get(client, "/fhir/Subscription")["total"] == 0

    assert list(FhirResource.objects.filter(resource_type="Subscription").values_list("pk")) == (
        before
    )
    assert _get(world.r4, f"/fhir/Subscription/{sub}")["status"] == "active"


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_a_subscription_update_changes_its_reason_and_name_and_keeps_its_events(
    world: World, version: str
) -> None:
    sub = _subscribe(world.r4)
    task_id = str(task_of(submit(world))["id"])
    start = FeedSubscription.objects.get(logical_id=sub).start_number
    before = _numbers(_get(world.r4, f"/fhir/Subscription/{sub}/$events"), FHIR_R4)
    assert before
    changed = (
        _r4_subscription(id=sub, reason="Polled by the new engine.")
        if version == FHIR_R4
        else _r5_subscription(id=sub, name="new-engine", reason="Polled by the new engine.")
    )
    response = world.r4.put(
        f"/fhir/Subscription/{sub}",
        changed,
        content_type=version,
        Accept=version,
        **{"If-Match": 'W/"1"'},
    )
    assert response.status_code == 200, response.content
    assert response["ETag"] == 'W/"2"'
    r4 = _get(world.r4, f"/fhir/Subscription/{sub}")
    r5 = _get(world.r4, f"/fhir/Subscription/{sub}", FHIR_R5)
    assert r4["reason"] == r5["reason"] == "Polled by the new engine."
    assert r4["status"] == r5["status"] == "active"
    if version == FHIR_R5:
        assert r5["name"] == "new-engine"
    assert _get(world.r4, f"/fhir/Subscription/{sub}/_history/1")["reason"] != r4["reason"]
    # Its events go on from where they began.
    assert FeedSubscription.objects.get(logical_id=sub).start_number == start
    _accept(world, task_id)
    after = _numbers(_get(world.r4, f"/fhir/Subscription/{sub}/$events"), FHIR_R4)
    assert after[: len(before)] == before and len(after) > len(before)


def test_a_subscription_update_that_does_not_fit_changes_nothing(world: World) -> None:
    sub = _subscribe(world.r4)
    path = f"/fhir/Subscription/{sub}"

    def versions() -> list[int]:
        return sorted(
            FhirResource.objects.filter(resource_type="Subscription", logical_id=sub).values_list(
                "version_id", flat=True
            )
        )

    cases = [
        (world.r4, _r4_subscription(id=sub, status="off"), {}, 422, "Subscription.status"),
        (
            world.r4,
            _r4_subscription(id=sub, channel={"type": "rest-hook", "endpoint": "https://x"}),
            {},
            422,
            "Subscription.channel.endpoint",
        ),
        (world.r4, _r4_subscription(id=sub), {"If-Match": 'W/"7"'}, 412, None),
        (world.other, _r4_subscription(id=sub), {}, 404, None),  # another facility's
        (world.r5, _r4_subscription(id=sub), {}, 404, None),  # the referral's other party
    ]
    for client, resource, headers, status, expression in cases:
        response = client.put(path, resource, **headers)
        assert response.status_code == status, (resource, response.content)
        if expression:
            assert outcome_issue(response)["expression"] == [expression]
        assert versions() == [1]
    unknown = world.r4.put("/fhir/Subscription/nope", _r4_subscription(id="nope"))
    assert unknown.status_code == 404
    assert not FhirResource.objects.filter(resource_type="Subscription", logical_id="nope").exists()
    world.r4.delete(path)
    assert world.r4.put(path, _r4_subscription(id=sub)).status_code == 404


def test_an_update_racing_a_delete_does_not_revive_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: the existence check ran apart from the write, so a DELETE landing
    between them was followed by an active version 3 (a create by update). The check is
    now made under the resource's lock, which a DELETE takes too."""
    from fhir_gateway import subscriptions

    sub = _subscribe(world.r4)
    real = subscriptions._check_r4
    deleted: list[int] = []

    def deleted_meanwhile(resource: dict[str, Any]) -> None:
        real(resource)
        deleted.append(world.r4.delete(f"/fhir/Subscription/{sub}").status_code)

    monkeypatch.setattr(subscriptions, "_check_r4", deleted_meanwhile)
    put = world.r4.put(f"/fhir/Subscription/{sub}", _r4_subscription(id=sub))
    monkeypatch.undo()
    assert deleted == [204]
    assert put.status_code == 404, put.content
    assert world.r4.get(f"/fhir/Subscription/{sub}").status_code == 410


def test_an_r4_update_keeps_the_name_an_r5_client_gave(world: World) -> None:
    """Found by a review: R4 has no Subscription.name, and an R4 update dropped it."""
    sub = _subscribe(world.r5, FHIR_R5)
    put = world.r5.put(
        f"/fhir/Subscription/{sub}",
        _r4_subscription(id=sub, reason="New."),
        content_type=FHIR_R4,
        Accept=FHIR_R4,
    )
    assert put.status_code == 200, put.content
    r5 = _get(world.r5, f"/fhir/Subscription/{sub}", FHIR_R5)
    assert (r5["name"], r5["reason"]) == ("worklist-poller", "New.")


def test_deleted_subscription_is_gone(world: World):
    sub = _subscribe(world.r4)

    assert world.r4.delete(f"/fhir/Subscription/{sub}").status_code == 204

    assert world.r4.get(f"/fhir/Subscription/{sub}").status_code == 410
    assert world.r4.get(f"/fhir/Subscription/{sub}/$events").status_code == 410
    assert _get(world.r4, "/fhir/Subscription")["total"] == 0


@pytest.mark.parametrize(
    ("version", "resource", "element"),
    [
        (FHIR_R4, _r4_subscription(criteria="Task?status=requested"), "Subscription.criteria"),
        (
            FHIR_R4,
            _r4_subscription(
                channel={"type": "rest-hook", "endpoint": "https://his.example.org/notify"}
            ),
            "Subscription.channel.endpoint",
        ),
        (FHIR_R4, _r4_subscription(channel={"type": "websocket"}), "Subscription.channel.type"),
        (
            FHIR_R4,
            _r4_subscription(
                channel={
                    "type": "rest-hook",
                    "_payload": {
                        "extension": [{"url": PAYLOAD_CONTENT, "valueCode": "everything"}]
                    },
                }
            ),
            "Subscription.channel.payload",
        ),
        (
            FHIR_R4,
            _r4_subscription(
                channel={
                    "type": "rest-hook",
                    "_payload": {
                        "extension": [
                            {"url": PAYLOAD_CONTENT, "valueCode": "id-only"},
                            {"url": PAYLOAD_CONTENT, "valueCode": "full-resource"},
                        ]
                    },
                }
            ),
            "Subscription.channel.payload",
        ),
        (FHIR_R4, _r4_subscription(end="2030-01-01T00:00:00Z"), "Subscription.end"),
        (FHIR_R5, _r5_subscription(topic="http://example.org/Topic/x"), "Subscription.topic"),
        (
            FHIR_R5,
            _r5_subscription(endpoint="https://his.example.org/notify"),
            "Subscription.endpoint",
        ),
        (
            FHIR_R5,
            _r5_subscription(filterBy=[{"filterParameter": "status", "value": "requested"}]),
            "Subscription.filterBy",
        ),
        (FHIR_R5, _r5_subscription(content="everything"), "Subscription.content"),
        (
            FHIR_R5,
            _r5_subscription(channelType={"system": CHANNEL_TYPES, "code": "email"}),
            "Subscription.channelType",
        ),
    ],
)
def test_what_we_do_not_offer_is_refused_and_nothing_is_stored(
    world: World, version: str, resource: dict[str, Any], element: str
):
    response = world.r4.post("/fhir/Subscription", resource, content_type=version, Accept=version)

    assert response.status_code == 422, response.content
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("not-supported", [element])
    assert not FhirResource.objects.filter(resource_type="Subscription").exists()
    assert not FeedSubscription.objects.exists()


@pytest.mark.parametrize("role", [Role.REFERRER, Role.MINISTRY])
def test_only_member_systems_subscribe_and_poll(world: World, role: Role):
    person = UserFactory.create(facility=world.network.spoke, roles=[role])
    client = FhirClient(api_token_issue(user=person, name="t").raw)
    sub = _subscribe(world.r4)

    response = client.post("/fhir/Subscription", _r4_subscription())

    assert response.status_code == 403
    assert outcome_issue(response)["code"] == "forbidden"
    assert FhirResource.objects.filter(resource_type="Subscription").count() == 1
    assert client.get("/fhir/$events").status_code == 403
    assert client.get(f"/fhir/Subscription/{sub}").status_code == 404
    assert client.get(f"/fhir/Subscription/{sub}/$events").status_code == 403


def test_invalid_subscription_is_400_not_500(world: World):
    response = world.r4.post("/fhir/Subscription", _r4_subscription(channel="rest-hook"))

    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "structure"
    assert not FhirResource.objects.filter(resource_type="Subscription").exists()


# --------------------------------------------------------------------------- $events shapes


def test_r5_events_are_an_id_only_subscription_notification(world: World):
    sub = _subscribe(world.r5, FHIR_R5)  # the consultant system (hub)
    task_id = str(task_of(submit(world))["id"])
    _accept(world, task_id)

    notification = _get(world.r5, f"/fhir/Subscription/{sub}/$events", FHIR_R5)

    model_class("Bundle", "5.0").model_validate(notification)
    assert notification["type"] == "subscription-notification"
    status = notification["entry"][0]["resource"]
    assert status["resourceType"] == "SubscriptionStatus"
    assert (status["type"], status["status"], status["topic"]) == (
        "query-event",
        "active",
        TOPIC_URL,
    )
    assert status["eventsSinceSubscriptionStart"] == "4"
    assert status["subscription"]["reference"].endswith(f"/fhir/Subscription/{sub}")
    assert _numbers(notification, FHIR_R5) == [1, 2, 3, 4]
    # One entry per resource (its last version here): R5's bdl-7 allows a fullUrl twice
    # only with distinct meta.versionId, which id-only entries lack. The events' focus
    # names every version.
    assert sorted(_ids(notification)) == sorted(
        [
            (f"Patient/{task_id}", 'W/"1"'),
            (f"ServiceRequest/{task_id}", 'W/"1"'),
            (f"Task/{task_id}", 'W/"2"'),
        ]
    )
    assert [e["focus"]["reference"].split("/fhir/")[1] for e in status["notificationEvent"]][
        2:
    ] == [f"Task/{task_id}/_history/1", f"Task/{task_id}/_history/2"]
    last = notification["entry"][-1]
    assert last["request"] == {"method": "PUT", "url": f"Task/{task_id}"}
    assert "resource" not in last  # id-only
    focus = status["notificationEvent"][-1]["focus"]["reference"]
    assert focus.endswith(f"/fhir/Task/{task_id}/_history/2")
    # The member reads what it was told about.
    assert _get(world.r5, urlsplit(focus).path, FHIR_R5)["status"] == "accepted"


def test_r4_events_follow_the_backport_ig(world: World):
    sub = _subscribe(world.r4)  # the submitter system (spoke)
    task_id = str(task_of(submit(world))["id"])
    _accept(world, task_id)

    notification = _get(world.r4, f"/fhir/Subscription/{sub}/$events")

    model_class("Bundle", "4.0").model_validate(notification)
    assert notification["type"] == "history"
    assert notification["meta"]["profile"] == [NOTIFICATION_R4_PROFILE]
    first = notification["entry"][0]
    assert first["resource"]["resourceType"] == "Parameters"
    assert first["resource"]["meta"]["profile"] == [STATUS_R4_PROFILE]
    assert first["request"]["url"].endswith(f"/fhir/Subscription/{sub}/$status")
    parameters = {p["name"]: p for p in first["resource"]["parameter"]}
    assert parameters["topic"]["valueCanonical"] == TOPIC_URL
    assert parameters["type"]["valueCode"] == "query-event"
    assert parameters["events-since-subscription-start"]["valueString"] == "4"
    assert _numbers(notification, FHIR_R4) == [1, 2, 3, 4]
    assert _ids(notification)[-1] == (f"Task/{task_id}", 'W/"2"')
    assert all("resource" not in e for e in notification["entry"][1:])


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_status_operation(world: World, version: str):
    sub = _subscribe(world.r4)
    submit(world)

    found = _get(world.r4, f"/fhir/Subscription/{sub}/$status", version)

    model_class("Bundle", version[-3:]).model_validate(found)
    assert (found["type"], found["total"]) == ("searchset", 1)
    status = found["entry"][0]["resource"]
    if version == FHIR_R5:
        assert (status["type"], status["eventsSinceSubscriptionStart"]) == ("query-status", "3")
    else:
        parameters = {p["name"]: p for p in status["parameter"]}
        assert parameters["type"]["valueCode"] == "query-status"
        assert parameters["events-since-subscription-start"]["valueString"] == "3"


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_type_level_status_answers_each_of_the_facility_s_subscriptions(world: World, version: str):
    """``Subscription/$status``: every Subscription of the caller's facility (or those
    named by ``id``), none of another facility's, none deleted."""
    first = _subscribe(world.r4)
    submit(world)  # 3 events
    second = _subscribe(world.r4, FHIR_R5)
    gone = _subscribe(world.r4)
    assert world.r4.delete(f"/fhir/Subscription/{gone}").status_code == 204
    theirs = _subscribe(world.other)

    def statuses(query: str = "") -> dict[str, str]:
        found = _get(world.r4, f"/fhir/Subscription/$status{query}", version)
        model_class("Bundle", version[-3:]).model_validate(found)
        assert found["type"] == "searchset"
        assert found["total"] == len(found.get("entry", []))
        out = {}
        for entry in found.get("entry", []):
            status = entry["resource"]
            if version == FHIR_R5:
                ref, since = (
                    status["subscription"]["reference"],
                    status["eventsSinceSubscriptionStart"],
                )
            else:
                parameters = {p["name"]: p for p in status["parameter"]}
                ref = parameters["subscription"]["valueReference"]["reference"]
                since = parameters["events-since-subscription-start"]["valueString"]
            out[ref.rsplit("/", 1)[1]] = since
        return out

    assert statuses() == {first: "3", second: "0"}
    assert statuses(f"?id={second}") == {second: "0"}
    assert statuses(f"?id={first},{theirs},{gone},nope") == {first: "3"}
    assert statuses(f"?id={first}&id={second}") == {first: "3", second: "0"}
    assert statuses("?status=active") == {first: "3", second: "0"}
    assert statuses("?status=off") == {}
    assert statuses("?status=http://example.org/x|active") == {}  # another system's code
    assert statuses("?status=http://hl7.org/fhir/subscription-status|active") == {
        first: "3",
        second: "0",
    }
    other = _get(world.other, "/fhir/Subscription/$status", version)
    assert [e["resource"]["id"] for e in other["entry"]] and other["total"] == 1
    # Not a member system: 403, as every feed call
    referrer = FhirClient(
        api_token_issue(
            user=UserFactory.create(facility=world.network.spoke, roles=[Role.REFERRER]), name="t"
        ).raw
    )
    assert referrer.get("/fhir/Subscription/$status").status_code == 403


def test_the_capability_statement_lists_status_once_for_both_levels(world: World):
    statement = _get(world.r4, "/fhir/metadata", FHIR_R5)
    subscription = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription")
    names = [o["name"] for o in subscription["operation"]]
    assert sorted(names) == ["events", "status"]
    status = next(o for o in subscription["operation"] if o["name"] == "status")
    assert "Subscription/$status" in status["documentation"]


# --------------------------------------------------------------------------- full-resource


def _stored(resource_type: str, logical_id: str, version_id: int, version: str) -> Any:
    row = FhirResource.objects.get(
        resource_type=resource_type, logical_id=logical_id, version_id=version_id
    )
    return json.loads(row.json_r5 if version == FHIR_R5 else row.json_r4)


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_events_with_full_resource_carry_each_version_as_stored(world: World, version: str):
    """content=full-resource: each event's version itself, in the caller's FHIR version,
    equal to its vread; the member need not read each one back."""
    sub = _subscribe(world.r4, version)
    task_id = str(task_of(submit(world))["id"])
    _accept(world, task_id)  # Task v2

    page = _get(world.r4, f"/fhir/Subscription/{sub}/$events?content=full-resource", version)
    resources = [e for e in page["entry"][1:] if "resource" in e]
    assert len(resources) == len(page["entry"]) - 1 >= 3  # every entry carries its resource
    for entry in resources:
        resource = entry["resource"]
        assert entry["fullUrl"].endswith(f"/{resource['resourceType']}/{resource['id']}")
        version_id = int(resource["meta"]["versionId"])
        assert resource == _stored(resource["resourceType"], resource["id"], version_id, version)
        vread = world.r4.get(
            f"/fhir/{resource['resourceType']}/{resource['id']}/_history/{version_id}",
            Accept=version,
        )
        assert vread.status_code == 200 and body(vread) == resource
        assert entry["response"]["etag"] == f'W/"{version_id}"'
    tasks = [e["resource"] for e in resources if e["resource"]["resourceType"] == "Task"]
    if version == FHIR_R4:  # a history Bundle: every version, in order
        assert [t["status"] for t in tasks] == ["requested", "accepted"]
    else:  # one entry per resource: its last version
        assert [t["status"] for t in tasks] == ["accepted"]
    # id-only (the default) still carries none
    plain = _get(world.r4, f"/fhir/Subscription/{sub}/$events", version)
    assert not any("resource" in e for e in plain["entry"][1:])
    assert len(plain["entry"]) == len(page["entry"])


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_a_full_resource_subscription_is_kept_and_answers_in_full(world: World, version: str):
    if version == FHIR_R4:
        resource = _r4_subscription()
        resource["channel"]["_payload"]["extension"][0]["valueCode"] = "full-resource"
    else:
        resource = _r5_subscription(content="full-resource")
    created = world.r4.post("/fhir/Subscription", resource, content_type=version, Accept=version)
    assert created.status_code == 201, created.content
    sub = body(created)["id"]
    r5 = _get(world.r4, f"/fhir/Subscription/{sub}", FHIR_R5)
    r4 = _get(world.r4, f"/fhir/Subscription/{sub}", FHIR_R4)
    assert r5["content"] == "full-resource"
    assert r4["channel"]["_payload"]["extension"][0]["valueCode"] == "full-resource"
    submit(world)

    page = _get(world.r4, f"/fhir/Subscription/{sub}/$events", version)
    assert len(page["entry"]) > 1 and all("resource" in e for e in page["entry"][1:])
    asked = _get(world.r4, f"/fhir/Subscription/{sub}/$events?content=id-only", version)
    assert not any("resource" in e for e in asked["entry"][1:])
    # An update may change it back
    r5["content"] = "id-only"
    put = world.r4.put(
        f"/fhir/Subscription/{sub}",
        r5,
        content_type=FHIR_R5,
        Accept=FHIR_R5,
        **{"If-Match": f'W/"{r5["meta"]["versionId"]}"'},
    )
    assert put.status_code == 200, put.content
    again = _get(world.r4, f"/fhir/Subscription/{sub}/$events", version)
    assert not any("resource" in e for e in again["entry"][1:])


def test_full_resource_events_of_another_facility_are_not_served(world: World):
    """A facility's feed holds only what it was told: full-resource changes nothing there."""
    mine = _subscribe(world.r4)
    theirs = _subscribe(world.other)
    submit(world)
    own = _get(world.r4, f"/fhir/Subscription/{mine}/$events?content=full-resource")
    assert len(own["entry"]) > 1
    other = _get(world.other, f"/fhir/Subscription/{theirs}/$events?content=full-resource")
    assert len(other["entry"]) == 1  # the status only
    assert (
        world.other.get(f"/fhir/Subscription/{mine}/$events?content=full-resource").status_code
        == 404
    )


def _full_resources(page: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in page["entry"][1:]
        if "resource" in e
    ]


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_full_resource_follows_the_direct_read_scope_not_the_facility(world: World, version: str):
    """The feed is the facility's, but a resource is sent in full only to an account that
    may read it: a system of the department's hospital not linked to the department gets
    the events id-only, and its read of the same Task is 404; the linked one gets both."""
    unlinked_user = UserFactory.create(facility=world.network.hub, roles=[Role.MEMBER_SYSTEM])
    unlinked = FhirClient(api_token_issue(user=unlinked_user, name="t").raw)
    linked_sub = _subscribe(world.r5, version)
    unlinked_sub = _subscribe(unlinked, version)
    task_id = str(task_of(submit(world))["id"])
    _accept(world, task_id)
    audited = AuditEntry.objects.count()

    url = "/fhir/Subscription/{}/$events?content=full-resource"
    linked_page = _get(world.r5, url.format(linked_sub), version)
    unlinked_page = _get(unlinked, url.format(unlinked_sub), version)

    # the linked system: every entry in full, and its direct read answers
    assert ("Task", task_id) in _full_resources(linked_page)
    assert len(_full_resources(linked_page)) == len(linked_page["entry"]) - 1
    assert world.r5.get(f"/fhir/Task/{task_id}", Accept=version).status_code == 200
    assert AuditEntry.objects.filter(user=world.consultant, detail="fhir $events").exists()
    # the unlinked one: the same events, id-only; a read of the Task is 404
    assert _numbers(unlinked_page, version) == _numbers(linked_page, version)
    assert _ids(unlinked_page) == _ids(linked_page)
    assert _full_resources(unlinked_page) == []
    for path in (f"Task/{task_id}", f"Task/{task_id}/_history/2", f"ServiceRequest/{task_id}"):
        assert unlinked.get(f"/fhir/{path}", Accept=version).status_code == 404
    assert not AuditEntry.objects.filter(user=unlinked_user).exists()  # nothing was read
    assert AuditEntry.objects.count() == audited + 2  # the linked read and its $events

    # once linked to the department, the same account gets the resources in full
    unlinked_user.departments.add(world.network.pediatrics)
    again = _get(unlinked, url.format(unlinked_sub), version)
    assert _full_resources(again) == _full_resources(linked_page)


def test_full_resource_ends_with_the_scope_a_forward_ends(world: World):
    """Evaluated at each call: after a forward to another department, the old
    department's system reads the Task no more (404) and its feed sends the versions it
    was told of id-only, no longer in full."""
    sub = _subscribe(world.r5)
    task_id = str(task_of(submit(world))["id"])
    url = f"/fhir/Subscription/{sub}/$events?content=full-resource"
    before = _get(world.r5, url)
    assert ("Task", task_id) in _full_resources(before)

    referral = Referral.objects.get(filler_id=task_id)
    referral_transition(
        actor=world.consultant,
        referral_id=referral.pk,
        action="forward",
        department=world.network.cardiology.pk,
        reason="Heart murmur.",
    )
    assert world.r5.get(f"/fhir/Task/{task_id}").status_code == 404
    after = _get(world.r5, f"{url}&eventsUntilNumber={_numbers(before, FHIR_R4)[-1]}")
    assert _ids(after) == _ids(before)
    assert _full_resources(after) == []


# --------------------------------------------------------------------------- paging, bounds


def test_events_page_and_bound_by_number(world: World):
    sub = _subscribe(world.r5, FHIR_R5)
    for n in range(2):
        _accept(world, str(task_of(submit(world, f"SR-{n}"))["id"]))  # 4 events each

    page = _get(world.r5, f"/fhir/Subscription/{sub}/$events?_count=3", FHIR_R5)
    seen = _numbers(page, FHIR_R5)
    while next_link := [link for link in page["link"] if link["relation"] == "next"]:
        url = urlsplit(next_link[0]["url"])
        page = _get(world.r5, f"{url.path}?{url.query}", FHIR_R5)
        seen += _numbers(page, FHIR_R5)
    assert seen == list(range(1, 9))

    bounded = _get(
        world.r5,
        f"/fhir/Subscription/{sub}/$events?eventsSinceNumber=3&eventsUntilNumber=5",
        FHIR_R5,
    )
    assert _numbers(bounded, FHIR_R5) == [3, 4, 5]
    assert len(bounded["entry"]) == 3  # the status; Task v1 and v2 as one entry; a Patient
    empty = _get(world.r5, f"/fhir/Subscription/{sub}/$events?content=empty", FHIR_R5)
    assert len(empty["entry"]) == 1  # the status only
    assert all("focus" not in e for e in empty["entry"][0]["resource"]["notificationEvent"])


@pytest.mark.parametrize(
    "query",
    [
        "eventsSinceNumber=abc",
        "eventsSinceNumber=-1",
        "eventsSinceNumber=1.5",
        "eventsUntilNumber=99999999999999999999",
        "eventsSinceNumber=%EF%BC%91",  # a full-width digit one
        "_count=x",
        "content=everything",
    ],
)
def test_bad_event_numbers_are_400_and_number_nothing(world: World, query: str):
    sub = _subscribe(world.r4)
    submit(world)

    response = world.r4.get(f"/fhir/Subscription/{sub}/$events?{query}")

    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "invalid"
    assert not FeedEvent.objects.filter(number__isnull=False).exists()


@pytest.mark.parametrize("path", ["/fhir/Subscription/{}/$events", "/fhir/$events?since=0"])
@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_a_count_of_zero_events_is_400(world: World, path: str, version: str):
    """Review suspicion: ``_count=0`` answered a page of no events and no ``next`` link (the
    R4 facility feed: an empty Bundle), which reads as "caught up" while events wait; a
    poller configured so never moves on. An events page carries events: 1 to 500."""
    sub = _subscribe(world.r4)
    submit(world)
    url = path.format(sub)

    response = world.r4.get(f"{url}{'&' if '?' in url else '?'}_count=0", Accept=version)

    assert response.status_code == 400, response.content
    issue = outcome_issue(response)
    assert issue["code"] == "invalid"
    assert "_count" in issue["diagnostics"] and "$status" in issue["diagnostics"]
    assert not FeedEvent.objects.filter(number__isnull=False).exists()


@pytest.mark.parametrize("since", ["abc", "-3", "1e3", "18446744073709551616"])
def test_bad_feed_cursor_is_400(world: World, since: str):
    submit(world)

    response = world.r4.get(f"/fhir/$events?since={since}")

    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "invalid"
    assert not FeedEvent.objects.filter(number__isnull=False).exists()


# --------------------------------------------------------------------------- scope


def test_another_facilitys_events_never_appear(world: World):
    spoke_sub = _subscribe(world.r4)
    lao_sub = _subscribe(world.other)
    SupportLinkFactory.create(  # Lao may refer to the hub too (across a border)
        hub=world.network.hub,
        spoke=world.network.lao,
        specialties=[world.network.pediatrics.specialty],
        agreement_reference="MoU VN-LA 2024/7",
    )
    ours = str(task_of(submit(world))["id"])
    response = world.other.post("/fhir", _lao_transaction(world, "L-1"))
    assert response.status_code == 200, response.content
    theirs = str(task_of(body(response))["id"])
    assert ours != theirs

    def logical_ids(client: FhirClient, path: str) -> set[str]:
        return {p.rpartition("/")[2] for p, _etag in _ids(_get(client, path))}

    assert logical_ids(world.r4, f"/fhir/Subscription/{spoke_sub}/$events") == {ours}
    assert logical_ids(world.other, f"/fhir/Subscription/{lao_sub}/$events") == {theirs}
    hub = {
        urlsplit(e["fullUrl"]).path.rpartition("/")[2]
        for e in _get(world.r5, "/fhir/$events").get("entry", [])
    }
    assert hub == {ours, theirs}  # the hub is a party to both
    spoke = _get(world.r4, "/fhir/$events")
    assert {urlsplit(e["fullUrl"]).path.rpartition("/")[2] for e in spoke["entry"]} == {ours}


def test_a_subscription_sees_only_events_after_it_was_created(world: World):
    before = str(task_of(submit(world, "SR-before"))["id"])
    sub = _subscribe(world.r4)
    after = str(task_of(submit(world, "SR-after"))["id"])

    notification = _get(world.r4, f"/fhir/Subscription/{sub}/$events")

    assert {p.rpartition("/")[2] for p, _e in _ids(notification)} == {after}
    assert _numbers(notification, FHIR_R4) == [4, 5, 6]  # the facility's numbers
    assert before != after


# --------------------------------------------------------------------------- system $events


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_facility_feed_replays_from_any_cursor(world: World, version: str):
    _accept(world, str(task_of(submit(world))["id"]))

    everything = _get(world.r4, "/fhir/$events", version)
    model_class("Bundle", version[-3:]).model_validate(everything)
    # R4: a history Bundle, each entry numbered. R5's history Bundle must carry each POST /
    # PUT entry's resource (bdl-3b): R5 gets a subscription-notification, as $events.
    assert everything["type"] == ("history" if version == FHIR_R4 else "subscription-notification")

    def numbers(page: dict[str, Any]) -> list[int]:
        if version == FHIR_R5:
            status = page["entry"][0]["resource"]
            return [int(e["eventNumber"]) for e in status.get("notificationEvent", [])]
        return [
            int(x["valueString"])
            for e in page.get("entry", [])
            for x in e["extension"]
            if x["url"] == EVENT_NUMBER_EXTENSION
        ]

    assert numbers(everything) == [1, 2, 3, 4]
    assert numbers(_get(world.r4, "/fhir/$events?since=2", version)) == [3, 4]
    skip = 0 if version == FHIR_R4 else 1  # R5: the status (a new id each time) first
    assert (
        _get(world.r4, "/fhir/$events?since=2", version)["entry"][skip:]
        == (_get(world.r4, "/fhir/$events?since=2", version)["entry"][skip:])
    )
    first = _get(world.r4, "/fhir/$events?since=0&_count=3", version)
    assert numbers(first) == [1, 2, 3]
    [next_link] = [link["url"] for link in first["link"] if link["relation"] == "next"]
    assert next_link.endswith("/fhir/$events?since=3&_count=3")
    assert numbers(_get(world.r4, "/fhir/$events?since=4", version)) == []


# --------------------------------------------------------------------------- order


@pytest.mark.django_db(transaction=True)
def test_a_transaction_that_commits_later_never_lands_behind_a_served_number(world: World):
    """Two real connections. A writes its feed rows first (lower ids) but commits last; B
    writes and commits in between and is served. Paging by id, a reader past B would have
    lost A for good; here A, once committed, comes after everything already served."""
    sub = _subscribe(world.r5, FHIR_R5)
    first = str(task_of(submit(world, "SR-A"))["id"])
    second = str(task_of(submit(world, "SR-B"))["id"])
    events = f"/fhir/Subscription/{sub}/$events"
    assert _numbers(_get(world.r5, events, FHIR_R5), FHIR_R5) == [1, 2, 3, 4, 5, 6]

    written, release, failures = threading.Event(), threading.Event(), []

    def slow_transaction() -> None:
        try:
            with transaction.atomic():
                _accept(world, first)
                written.set()
                assert release.wait(30)
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            failures.append(exc)
            written.set()
        finally:
            connections.close_all()

    thread = threading.Thread(target=slow_transaction)
    thread.start()
    try:
        assert written.wait(30) and not failures
        assert not FeedEvent.objects.filter(logical_id=first, version_id=2).exists()  # unseen
        _accept(world, second)  # B: its own transaction, committed now
        while_a_runs = _get(world.r5, f"{events}?eventsSinceNumber=7", FHIR_R5)
        system = _get(world.r5, "/fhir/$events?since=6", FHIR_R5)
    finally:
        release.set()
        thread.join(30)
    assert not failures
    assert _numbers(while_a_runs, FHIR_R5) == [7]
    assert _ids(while_a_runs) == [(f"Task/{second}", 'W/"2"')]
    assert [urlsplit(e["fullUrl"]).path for e in system["entry"][1:]] == [f"/fhir/Task/{second}"]

    after = _get(world.r5, f"{events}?eventsSinceNumber=8", FHIR_R5)

    assert _numbers(after, FHIR_R5) == [8]
    assert _ids(after) == [(f"Task/{first}", 'W/"2"')]
    hub = world.network.hub.pk
    a_row = FeedEvent.objects.get(facility_id=hub, logical_id=first, version_id=2)
    b_row = FeedEvent.objects.get(facility_id=hub, logical_id=second, version_id=2)
    assert a_row.id < b_row.id and a_row.number == 8 and b_row.number == 7
    # Replaying from the start: every event once, numbers dense.
    replay = _get(world.r5, f"{events}?eventsSinceNumber=1", FHIR_R5)
    assert _numbers(replay, FHIR_R5) == list(range(1, 9))
    focus = [e["focus"]["reference"] for e in replay["entry"][0]["resource"]["notificationEvent"]]
    assert len(set(focus)) == 8  # every version once (the entries: each resource once)


# --------------------------------------------------------------------------- topic, metadata


def test_topic_is_served_in_r5_and_stored_once(world: World):
    topic = _get(world.r5, "/fhir/SubscriptionTopic/referral", FHIR_R5)
    model_class("SubscriptionTopic", "5.0").model_validate(topic)
    assert topic["url"] == TOPIC_URL
    assert {t["resource"].rpartition("/")[2] for t in topic["resourceTrigger"]} >= {"Task"}
    found = _get(world.r5, f"/fhir/SubscriptionTopic?url={TOPIC_URL}", FHIR_R5)
    assert found["total"] == 1
    assert _get(world.r5, "/fhir/SubscriptionTopic?url=http://x.org/t", FHIR_R5)["total"] == 0
    assert world.r4.get("/fhir/SubscriptionTopic/referral", Accept=FHIR_R4).status_code == 404
    assert FhirResource.objects.filter(resource_type="SubscriptionTopic").count() == 1


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_every_declared_feed_interaction_and_operation_is_served(world: World, version: str):
    sub = _subscribe(world.r5, FHIR_R5)
    statement = _get(world.r5, "/fhir/metadata", version)
    samples = {"Subscription": sub, "SubscriptionTopic": "referral"}
    values = {"token": "active", "uri": TOPIC_URL, "date": "ge2020-01-01"}
    checked = []
    for entry in statement["rest"][0]["resource"]:
        rtype = entry["type"]
        if rtype not in samples:
            continue
        paths = {
            "read": f"/fhir/{rtype}/{samples[rtype]}",
            "vread": f"/fhir/{rtype}/{samples[rtype]}/_history/1",
            "search-type": f"/fhir/{rtype}",
        }
        for interaction in entry["interaction"]:
            if interaction["code"] in paths:
                assert world.r5.get(paths[interaction["code"]], Accept=version).status_code == 200
                checked.append((rtype, interaction["code"]))
        for param in entry.get("searchParam", []):
            response = world.r5.get(
                f"/fhir/{rtype}?{param['name']}={values.get(param['type'], sub)}",
                Accept=version,
                Prefer="handling=strict",
            )
            assert response.status_code == 200, (rtype, param["name"], response.content)
        for operation in entry.get("operation", []):
            path = f"/fhir/{rtype}/{samples[rtype]}/${operation['name']}"
            assert world.r5.get(path, Accept=version).status_code == 200, path
            checked.append((rtype, operation["name"]))
    for operation in statement["rest"][0]["operation"]:
        assert world.r5.get(f"/fhir/${operation['name']}", Accept=version).status_code == 200
    assert ("Subscription", "events") in checked and ("Subscription", "status") in checked
    assert (("SubscriptionTopic", "read") in checked) == (version == FHIR_R5)
    assert (
        json.loads(world.r5.get(f"/fhir/Subscription/{sub}/$nothing").content)["resourceType"]
        == "OperationOutcome"
    )


# --------------------------------------------------------------------------- found by a review


def _distinct_full_urls(bundle: dict[str, Any]) -> bool:
    urls = [e["fullUrl"] for e in bundle.get("entry", [])]
    return len(urls) == len(set(urls))


def test_r5_notifications_name_each_resource_once(world: World):
    """R5's bdl-7: a fullUrl twice only with distinct meta.versionId (id-only entries have
    none). An accept put Task v1 and v2 in one page: nearly every poll broke it."""
    sub = _subscribe(world.r5, FHIR_R5)
    _accept(world, str(task_of(submit(world))["id"]))
    for path in (f"/fhir/Subscription/{sub}/$events", "/fhir/$events"):
        client = world.r5 if "Subscription" in path else world.r4
        bundle = _get(client, path, FHIR_R5)
        assert bundle["type"] == "subscription-notification"
        assert _distinct_full_urls(bundle), [e["fullUrl"] for e in bundle["entry"]]
        assert len(bundle["entry"][0]["resource"]["notificationEvent"]) == 4


def test_r5_facility_events_follow_the_notification_rules(world: World):
    """R5's history Bundle must carry the resource of each POST / PUT entry (bdl-3b): the
    id-only facility feed broke it; R5 now gets a subscription-notification."""
    _accept(world, str(task_of(submit(world))["id"]))
    bundle = _get(world.r4, "/fhir/$events", FHIR_R5)
    model_class("Bundle", "5.0").model_validate(bundle)
    status = bundle["entry"][0]["resource"]
    assert (status["resourceType"], status["type"], status["topic"]) == (
        "SubscriptionStatus",
        "query-event",
        TOPIC_URL,
    )
    assert status["subscription"]["identifier"]["value"] == str(world.network.spoke.pk)
    assert status["eventsSinceSubscriptionStart"] == "4"
    assert all("resource" not in e for e in bundle["entry"][1:])  # id-only
    r4 = _get(world.r4, "/fhir/$events", FHIR_R4)
    assert r4["type"] == "history" and len(r4["entry"]) == 4  # R4 unchanged


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_paging_links_keep_the_content_asked_for(world: World, version: str):
    sub = _subscribe(world.r5, FHIR_R5)
    _accept(world, str(task_of(submit(world))["id"]))  # 4 events
    first = _get(world.r5, f"/fhir/Subscription/{sub}/$events?content=empty&_count=2", version)
    assert len(first["entry"]) == 1  # the status only
    self_link = next(link["url"] for link in first["link"] if link["relation"] == "self")
    assert "content=empty" in self_link
    [following] = [link["url"] for link in first["link"] if link["relation"] == "next"]
    url = urlsplit(following)
    second = _get(world.r5, f"{url.path}?{url.query}", version)
    assert len(second["entry"]) == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.update(end=0),  # the models read 0 as 1970: it was accepted
        lambda r: r["channel"].update(
            _payload={"extension": [{"url": PAYLOAD_CONTENT, "valueString": "full-resource"}]}
        ),
    ],
    ids=["end-zero", "payload-content-as-string"],
)
def test_unsupported_subscription_values_are_refused_whatever_their_type(world: World, change):
    subscription = _r4_subscription()
    change(subscription)
    before = FhirResource.objects.filter(resource_type="Subscription").count()
    response = world.r4.post("/fhir/Subscription", subscription)
    assert response.status_code == 422, response.content
    assert FhirResource.objects.filter(resource_type="Subscription").count() == before


def test_parameters_an_events_operation_does_not_read_are_named_or_refused(world: World):
    """The two $events name their cursor differently (eventsSinceNumber / since): the other
    one's name is not silently read as "from the start"."""
    submit(world)
    sub = _subscribe(world.r4)
    cases = [
        (f"/fhir/Subscription/{sub}/$events?since=9999&_count=3", "since"),
        ("/fhir/$events?eventsSinceNumber=20&_count=3", "eventsSinceNumber"),
        (f"/fhir/Subscription/{sub}/$status?snice=5", "snice"),
    ]
    for path, name in cases:
        lenient = world.r4.get(path)
        strict = world.r4.get(path, Prefer="handling=strict")

        assert lenient.status_code == 200, lenient.content
        assert lenient["X-FHIR-Ignored-Parameters"] == name
        assert strict.status_code == 400
        issue = outcome_issue(strict)
        assert issue["code"] == "not-supported" and name in issue["diagnostics"]

    known = world.r4.get("/fhir/$events?since=0&_count=3&_format=json")
    assert known.status_code == 200 and "X-FHIR-Ignored-Parameters" not in known


def test_a_subscription_update_with_if_match_version_0_is_412(world: World) -> None:
    """No Subscription is ever at version 0: a stale If-Match (W/"0" was read as none, the
    update applied; found by review)."""
    sub = _subscribe(world.r4)

    response = world.r4.put(
        f"/fhir/Subscription/{sub}",
        {**_r4_subscription(), "id": sub, "reason": "Changed by a stale client."},
        **{"If-Match": 'W/"0"'},
    )

    assert response.status_code == 412, response.content
    current = world.r4.get(f"/fhir/Subscription/{sub}", Accept=FHIR_R4)
    assert body(current)["meta"]["versionId"] == "1"
