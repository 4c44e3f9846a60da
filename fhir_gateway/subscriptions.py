"""Topic-based Subscriptions for members that cannot receive pushes: they poll.

R5 (``Subscription``, ``SubscriptionTopic``, ``SubscriptionStatus``, the ``subscription-
notification`` Bundle) and R4 through the Subscriptions R5 Backport IG (``Subscription.criteria``
= the topic URL, a ``history`` Bundle whose first entry is a ``Parameters`` status).

What is offered, and no more:

- one topic, ``SubscriptionTopic/referral`` (R5 only; in R4 the topic is its canonical URL):
  every stored version of a referral's resources a party facility is told about;
- Subscriptions of one's own facility (member systems only): create, read, vread, search,
  update (its reason, name and content), delete. Channel ``rest-hook`` with **no endpoint**,
  content ``id-only`` (the default), ``full-resource`` (each event's version as stored,
  in the caller's FHIR version, where the calling account may read it: ``_readable``) or
  ``empty``: they are pulled with ``$events``. Push to a
  member is the registry Endpoint's outbox delivery (``delivery``), not a
  Subscription's; an endpoint, filters or an ``end`` are refused (422) rather than
  accepted and ignored;
- ``Subscription/{id}/$events`` (eventsSinceNumber / eventsUntilNumber / _count / content),
  ``Subscription/{id}/$status``, and ``/fhir/$events?since=<number>`` for the whole facility.

Events are the facility's feed (``feed``): event numbers are the facility's, dense and
increasing; a Subscription's events are those numbered after its creation.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from accounts.roles import Role
from core.values import digits_int
from fhir_gateway import handlers
from fhir_gateway.feed import (
    MAX_NUMBER,
    FeedItem,
    feed_last_number,
    feed_number,
    feed_page,
    feed_pruned_through,
)
from fhir_gateway.handlers import (
    Operation,
    OperationAnswer,
    OperationCall,
    ResourceHandler,
    WriteRequest,
)
from fhir_gateway.models import FeedSubscription, FhirResource
from fhir_gateway.outcomes import FhirError
from fhir_gateway.registry_projection import CONSILIUM
from fhir_gateway.retention import feed_retention_days
from fhir_gateway.storage import (
    WriteResult,
    _lock,
    content_hash,
    current_rows,
    dumps,
    fhir_instant,
    parse_if_match,
    parse_token,
    resource_current,
    resource_delete,
    split_escaped,
    store_version,
    validate_resource,
)
from fhir_gateway.versions import R4, R5

if TYPE_CHECKING:
    from accounts.models import User

TOPIC_ID = "referral"
TOPIC_URL = f"{CONSILIUM}/SubscriptionTopic/{TOPIC_ID}"
_TOPIC_DATE = "2026-11-25"  # when the topic's definition last changed
CHANNEL_TYPES = "http://terminology.hl7.org/CodeSystem/subscription-channel-type"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport"
BACKPORT_SUBSCRIPTION = f"{BACKPORT}/StructureDefinition/backport-subscription"
PAYLOAD_CONTENT = f"{BACKPORT}/StructureDefinition/backport-payload-content"
FILTER_CRITERIA = f"{BACKPORT}/StructureDefinition/backport-filter-criteria"
STATUS_R4_PROFILE = f"{BACKPORT}/StructureDefinition/backport-subscription-status-r4"
NOTIFICATION_R4_PROFILE = f"{BACKPORT}/StructureDefinition/backport-subscription-notification-r4"
EVENT_NUMBER_EXTENSION = f"{CONSILIUM}/StructureDefinition/feed-event-number"
# The identifier of a facility's own feed (R5 /fhir/$events: its status names no Subscription).
FACILITY_FEED_SYSTEM = f"{CONSILIUM}/sid/facility-feed"
# On the 410 issue when asked events retention pruned: the oldest event number still kept.
OLDEST_EVENT_EXTENSION = f"{CONSILIUM}/StructureDefinition/feed-oldest-event-number"
FHIR_JSON = "application/fhir+json"
DEFAULT_REASON = "Referral events for a member system that polls $events."
DEFAULT_COUNT = 50
MAX_COUNT = 500

# What the topic covers: what ``publish`` stores and the outbox pushes to a party's members.
_TRIGGERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "Task",
        ("create", "update"),
        "Every referral event: a new Task version (its version = the referral's version).",
    ),
    ("ServiceRequest", ("create", "update"), "The referral (order) changed."),
    ("Patient", ("create", "update"), "The referral's patient (minimum necessary) changed."),
    ("Communication", ("create",), "A message on the referral."),
    (
        "DocumentReference",
        ("create",),
        "A consult note (advice), or a case file (a file added to the referral).",
    ),
)


def topic_resource() -> dict[str, Any]:
    return {
        "resourceType": "SubscriptionTopic",
        "id": TOPIC_ID,
        "url": TOPIC_URL,
        "version": "1",
        "title": "Referral changes",
        "status": "active",
        "date": _TOPIC_DATE,
        "publisher": "Consilium",
        "description": (
            "Every stored version of a referral's resources that a party facility (the "
            "requester and the assigned department's facility) is told about: what the outbox "
            "pushes to the facility's registered Endpoints. Notifications are id-only, "
            "full-resource or empty (the Subscription's content); poll Subscription/{id}/$events."
        ),
        "resourceTrigger": [
            {
                "description": description,
                "resource": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
                "supportedInteraction": list(interactions),
            }
            for resource_type, interactions, description in _TRIGGERS
        ],
        "notificationShape": [
            {"resource": f"http://hl7.org/fhir/StructureDefinition/{resource_type}"}
            for resource_type, _i, _d in _TRIGGERS
        ],
    }


def _ensure_topic() -> None:
    """The topic is stored like every served resource; (re)stored when its definition
    changed (first use after a deployment), so reads splice stored JSON as elsewhere."""
    resource = topic_resource()
    digest = content_hash(resource)

    def stored() -> str | None:
        return (
            FhirResource.objects.filter(
                resource_type="SubscriptionTopic", logical_id=TOPIC_ID, is_current=True
            )
            .values_list("content_hash", flat=True)
            .first()
        )

    if stored() == digest:
        return
    with transaction.atomic():
        _lock(f"fhir:SubscriptionTopic/{TOPIC_ID}")
        if stored() == digest:  # another request stored it meanwhile
            return
        store_version(
            resource_type="SubscriptionTopic",
            logical_id=TOPIC_ID,
            resource=resource,
            fhir_version=R5,
            renderings={R5: resource},
            hash_value=digest,
            index_tokens=False,
        )


def _topic_visible(user: User) -> QuerySet[FhirResource]:
    _ensure_topic()
    return FhirResource.objects.filter(resource_type="SubscriptionTopic")


def _topic_search(user: User, params: dict[str, list[str]]) -> QuerySet[FhirResource]:
    _ensure_topic()
    rows = current_rows("SubscriptionTopic")
    for value in params.get("url", []):
        rows = rows.filter(logical_id=TOPIC_ID) if TOPIC_URL in value.split(",") else rows.none()
    return rows


# --------------------------------------------------------------------------- who


def _is_member_system(user: User) -> bool:
    return (
        user.facility_id is not None
        and user.has_role(Role.MEMBER_SYSTEM)
        and not user.has_role(Role.MINISTRY)
    )


def _feed_facility(user: User) -> int:
    """The caller's facility, whose feed it reads; only member systems of a facility."""
    if not _is_member_system(user):
        raise FhirError(
            403,
            "forbidden",
            "Subscriptions and $events are for member systems (role member-system) of a facility.",
        )
    return int(user.facility_id)  # type: ignore[arg-type]


def _subscription_visible(user: User) -> QuerySet[FhirResource]:
    if not _is_member_system(user):
        return FhirResource.objects.none()
    return FhirResource.objects.filter(resource_type="Subscription", source_pk=user.facility_id)


def _subscription_search(user: User, params: dict[str, list[str]]) -> QuerySet[FhirResource]:
    if not _is_member_system(user):
        return FhirResource.objects.none()
    rows = current_rows("Subscription").filter(source_pk=user.facility_id)
    for value in params.get("status", []):
        if not _names_active(value):
            rows = rows.none()  # every stored Subscription is active until deleted
    for value in params.get("status:not", []):  # none of the values
        if _names_active(value):
            rows = rows.none()
    return rows


# Subscription.status's code system (R4 and R5).
SUBSCRIPTION_STATUS_SYSTEM = "http://hl7.org/fhir/subscription-status"


def _names_active(raw: str) -> bool:
    """Whether a ``status`` search value names ``active``: ``active``, its system's
    ``system|active`` or ``system|`` (every code), among comma-separated alternatives;
    another system, or ``|active`` (no system: the status has one), names nothing."""
    for value in split_escaped(raw, ","):
        system, code = parse_token(value)
        if value and system in (None, SUBSCRIPTION_STATUS_SYSTEM) and code in ("", "active"):
            return True
    return False


# --------------------------------------------------------------------------- create


def _refuse(element: str, detail: str) -> FhirError:
    return FhirError(422, "not-supported", f"{element}: {detail}", expression=[element])


def _extensions(element: Any, url: str) -> list[dict[str, Any]]:
    if not isinstance(element, dict):
        return []
    return [
        e for e in element.get("extension") or [] if isinstance(e, dict) and e.get("url") == url
    ]


CONTENTS = ("empty", "id-only", "full-resource")


def _check_content(value: Any, element: str) -> str:
    """The Subscription's content (none: id-only)."""
    if value not in (None, *CONTENTS):
        raise _refuse(element, f"content {value!r}: empty, id-only or full-resource.")
    return str(value or "id-only")


def _check_r4(resource: dict[str, Any]) -> str:
    """What an R4 (Backport IG) Subscription may ask for; its content."""
    if resource.get("criteria") != TOPIC_URL:
        raise _refuse(
            "Subscription.criteria",
            f"must be the topic {TOPIC_URL} (topic-based Subscriptions, R5 Backport IG); "
            "query criteria are not supported.",
        )
    if _extensions(resource.get("_criteria"), FILTER_CRITERIA):
        raise _refuse("Subscription.criteria", "filters are not supported (all events).")
    channel = resource.get("channel") or {}
    if channel.get("type") != "rest-hook" or (channel.get("_type") or {}).get("extension"):
        raise _refuse("Subscription.channel.type", "only rest-hook (pulled with $events).")
    if channel.get("endpoint"):
        raise _refuse(
            "Subscription.channel.endpoint",
            "Subscriptions here are pulled with $events; pushes go to your facility's "
            "registered Endpoint (the outbox). Leave the endpoint out.",
        )
    if channel.get("payload") not in (None, FHIR_JSON):
        raise _refuse("Subscription.channel.payload", f"only {FHIR_JSON}.")
    for extension in _extensions(channel.get("_payload"), PAYLOAD_CONTENT):
        values = [v for k, v in extension.items() if k.startswith("value")]
        if values != [extension.get("valueCode")]:  # a valueString "full-resource" too
            raise _refuse(
                "Subscription.channel.payload",
                "the content is a valueCode: id-only or full-resource.",
            )
    contents = [e.get("valueCode") for e in _extensions(channel.get("_payload"), PAYLOAD_CONTENT)]
    if len(contents) > 1:
        raise _refuse("Subscription.channel.payload", "one content extension at most.")
    return _check_content(contents[0] if contents else None, "Subscription.channel.payload")


def _check_r5(resource: dict[str, Any]) -> str:
    """What an R5 Subscription may ask for; its content."""
    if resource.get("topic") != TOPIC_URL:
        raise _refuse("Subscription.topic", f"the only topic is {TOPIC_URL}.")
    if resource.get("filterBy"):
        raise _refuse("Subscription.filterBy", "filters are not supported (all events).")
    channel = resource.get("channelType") or {}
    if channel.get("code") != "rest-hook" or channel.get("system") not in (None, CHANNEL_TYPES):
        raise _refuse("Subscription.channelType", "only rest-hook (pulled with $events).")
    if resource.get("endpoint"):
        raise _refuse(
            "Subscription.endpoint",
            "Subscriptions here are pulled with $events; pushes go to your facility's "
            "registered Endpoint (the outbox). Leave the endpoint out.",
        )
    if resource.get("contentType") not in (None, FHIR_JSON):
        raise _refuse("Subscription.contentType", f"only {FHIR_JSON}.")
    return _check_content(resource.get("content"), "Subscription.content")


def _renderings(
    logical_id: str, facility_id: int, reason: str, name: str, content: str
) -> dict[str, dict[str, Any]]:
    r4: dict[str, Any] = {
        "resourceType": "Subscription",
        "id": logical_id,
        "meta": {"profile": [BACKPORT_SUBSCRIPTION]},
        "status": "active",
        "reason": reason or DEFAULT_REASON,
        "criteria": TOPIC_URL,
        "channel": {
            "type": "rest-hook",
            "payload": FHIR_JSON,
            "_payload": {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": content}]},
        },
    }
    r5: dict[str, Any] = {
        "resourceType": "Subscription",
        "id": logical_id,
        **({"name": name} if name else {}),
        "status": "active",
        "topic": TOPIC_URL,
        "managingEntity": {"reference": f"Organization/{facility_id}"},
        **({"reason": reason} if reason else {}),
        "channelType": {"system": CHANNEL_TYPES, "code": "rest-hook"},
        "contentType": FHIR_JSON,
        "content": content,
    }
    return {R4: r4, R5: r5}


def _subscription_create(req: WriteRequest) -> WriteResult:
    facility = _feed_facility(req.user)
    validate_resource(req.resource, req.fhir_version)
    if req.resource.get("end") is not None:  # 0 is an end too (a date, to the models)
        raise _refuse("Subscription.end", "not supported; delete the Subscription instead.")
    content = (_check_r4 if req.fhir_version == R4 else _check_r5)(req.resource)
    logical_id = uuid.uuid4().hex
    renderings = _renderings(
        logical_id,
        facility,
        str(req.resource.get("reason") or ""),
        str(req.resource.get("name") or ""),
        content,
    )
    with transaction.atomic():
        feed_number(facility)
        start = feed_last_number(facility)
        row = store_version(
            resource_type="Subscription",
            logical_id=logical_id,
            resource=renderings[req.fhir_version],
            fhir_version=req.fhir_version,
            renderings=renderings,
            source_pk=facility,
            index_tokens=False,
        )
        FeedSubscription.objects.create(
            logical_id=logical_id, facility_id=facility, start_number=start
        )
    return WriteResult(row, created=True)


def _subscription_update(req: WriteRequest) -> WriteResult:
    """PUT of one of the facility's Subscriptions: its ``reason``, ``name`` and content
    change; the rest is held to what a create accepts (the topic, a rest-hook channel
    without an endpoint) and its events go on from where they began. ``status`` may be
    requested or active (it stays active; ``off`` is a DELETE); no create by update."""
    facility = _feed_facility(req.user)
    assert req.logical_id is not None
    validate_resource(req.resource, req.fhir_version)
    if req.resource.get("end") is not None:  # 0 is an end too (a date, to the models)
        raise _refuse("Subscription.end", "not supported; delete the Subscription instead.")
    if req.resource.get("status") not in (None, "requested", "active"):
        raise _refuse(
            "Subscription.status",
            f"{req.resource.get('status')!r}: a Subscription here is active until deleted "
            "(DELETE it to stop it).",
        )
    content = (_check_r4 if req.fhir_version == R4 else _check_r5)(req.resource)
    with transaction.atomic():
        # Under the resource's lock (store_version's, taken by a DELETE too): a DELETE
        # committed first leaves nothing to update (404, no create by update, nothing
        # revived); one coming later waits and deletes this version.
        _lock(f"fhir:Subscription/{req.logical_id}")
        current = (
            current_rows("Subscription")
            .filter(source_pk=facility, logical_id=req.logical_id)
            .first()
        )
        if current is None:
            raise FhirError(
                404,
                "not-found",
                f"Subscription/{req.logical_id} is not known; create Subscriptions with POST.",
            )
        name = str(req.resource.get("name") or "")
        if req.fhir_version == R4:  # R4 has no name: the one an R5 client gave stays
            name = str(json.loads(current.json_r5 or "{}").get("name") or "")
        renderings = _renderings(
            req.logical_id, facility, str(req.resource.get("reason") or ""), name, content
        )
        row = store_version(
            resource_type="Subscription",
            logical_id=req.logical_id,
            resource=renderings[req.fhir_version],
            fhir_version=req.fhir_version,
            renderings=renderings,
            source_pk=facility,
            # None (no If-Match, or "*"): the version just read, so a racing change is seen;
            # W/"0" is a version no Subscription has: 412 (it was read as none, review)
            expected_version=_expected_version(req.if_match, current.version_id),
            index_tokens=False,
        )
    return WriteResult(row, created=False)


def _expected_version(if_match: str | None, current: int) -> int:
    """The version an update must find: the one ``If-Match`` names, else ``current``."""
    named = parse_if_match(if_match) if if_match else None
    return current if named is None else named


def _subscription_delete(user: User, logical_id: str, if_match: str | None) -> FhirResource | None:
    if not _subscription_visible(user).filter(logical_id=logical_id).exists():
        raise FhirError(404, "not-found", f"Subscription/{logical_id} is not known.")
    return resource_delete(resource_type="Subscription", logical_id=logical_id, if_match=if_match)


# --------------------------------------------------------------------------- operations


def _last(params: dict[str, list[str]], name: str) -> str | None:
    values = [v for v in params.get(name, []) if v != ""]
    return values[-1] if values else None


def _number(params: dict[str, list[str]], name: str) -> int | None:
    raw = _last(params, name)
    if raw is None:
        return None
    number = digits_int(raw)
    if number is None or number > MAX_NUMBER:
        raise FhirError(
            400, "invalid", f"{name} must be an event number (0 or more), not {raw[:40]!r}."
        )
    return number


def _count(params: dict[str, list[str]]) -> int:
    count = _number(params, "_count")
    if count == 0:
        # A page of no events without a next link read as "caught up" while events waited
        # (a poller asking so never moved on); how many there are is $status's to say.
        raise FhirError(
            400,
            "invalid",
            f"_count must be 1 to {MAX_COUNT}: a page of events carries events. How many "
            "happened since the Subscription started: $status (eventsSinceSubscriptionStart).",
        )
    return DEFAULT_COUNT if count is None else min(count, MAX_COUNT)


def _content(params: dict[str, list[str]], default: str = "id-only") -> str:
    """``$events``' content: asked for, else the Subscription's own."""
    content = _last(params, "content") or default
    if content not in CONTENTS:
        raise FhirError(400, "invalid", "content must be empty, id-only or full-resource.")
    return content


def _subscription_content(logical_id: str) -> str:
    """The content the Subscription asked for (its stored R5 rendering says it)."""
    text = (
        current_rows("Subscription")
        .filter(logical_id=logical_id)
        .values_list("json_r5", flat=True)
        .first()
    )
    content = json.loads(text).get("content") if text else None
    return content if content in CONTENTS else "id-only"


def _readable(user: User, items: list[FeedItem]) -> list[FeedItem]:
    """The page's events whose resource the caller may read directly now, by the read's
    own check (each type's ``visible``: the referral scope, ``referral_visible``).
    ``full-resource`` sends only these in full; the others stay id-only. The feed is the
    facility's (every party facility hears of every event), but what a resource says is
    for the accounts that may read it: a system of the department's hospital not linked
    to the department, or of a department the case was forwarded away from, gets the
    event and the id (a read of it is 404), never the resource. Evaluated at each call, so
    a scope that ended (a forward, a finished case's grants) holds back what it already
    covered. One query per resource type in the page."""
    wanted: dict[str, set[str]] = {}
    for item in items:
        wanted.setdefault(item.resource_type, set()).add(item.logical_id)
    readable: set[tuple[str, str]] = set()
    for resource_type, logical_ids in wanted.items():
        handler = handlers.HANDLERS.get(resource_type)
        if handler is None or handler.visible is None:  # no scope to follow: never in full
            continue
        found = (
            handler.visible(user)
            .filter(logical_id__in=logical_ids)
            .order_by()
            .values_list("logical_id", flat=True)
            .distinct()
        )
        readable.update((resource_type, logical_id) for logical_id in found)
    return [i for i in items if (i.resource_type, i.logical_id) in readable]


def _stored_versions(items: list[FeedItem], column: str) -> dict[tuple[str, str, int], str]:
    """The stored JSON (``column``: the caller's version) of each event's version, for
    ``full-resource``: one query over the page's ids and version numbers, matched here
    (an OR of hundreds of triples is past SQLite's expression depth)."""
    wanted = {(i.resource_type, i.logical_id, i.version_id) for i in items}
    rows = FhirResource.objects.filter(
        resource_type__in={t for t, _i, _v in wanted},
        logical_id__in={i for _t, i, _v in wanted},
        version_id__in={v for _t, _i, v in wanted},
    ).values_list("resource_type", "logical_id", "version_id", column)
    return {
        (rtype, lid, vid): text for rtype, lid, vid, text in rows if (rtype, lid, vid) in wanted
    }


def _refuse_pruned(facility_id: int, first: int, *, cursor: str) -> None:
    """410 when event ``first`` may have been pruned (the member named a number it
    expects): serving the oldest kept events instead would hide the gap. Checked
    **after** the page was read, so a prune committing in between cannot slip a gap
    into an answer (it can only turn it into this 410)."""
    pruned = feed_pruned_through(facility_id)
    if first > pruned:
        return
    oldest = pruned + 1
    # eventsSinceNumber is inclusive (the oldest kept); since= is the last one seen.
    resume = f"{cursor}={oldest if cursor == 'eventsSinceNumber' else pruned}"
    raise FhirError(
        410,
        "deleted",
        f"Events up to number {pruned} of this feed are no longer kept (events are kept "
        f"{feed_retention_days()} days); event {first} is one of them. The oldest event "
        f"still available is {oldest}: read the current state of the referrals you follow "
        f"(e.g. search Task by _lastUpdated), then continue with {resume}.",
        extension=[{"url": OLDEST_EVENT_EXTENSION, "valueString": str(oldest)}],
    )


def _subscription(call: OperationCall) -> FeedSubscription:
    assert call.logical_id is not None
    facility = _feed_facility(call.user)
    if not _subscription_visible(call.user).filter(logical_id=call.logical_id).exists():
        raise FhirError(404, "not-found", f"Subscription/{call.logical_id} is not known.")
    resource_current("Subscription", call.logical_id)  # 410 once deleted
    state = FeedSubscription.objects.filter(
        logical_id=call.logical_id, facility_id=facility
    ).first()
    if state is None:  # stored without feed state: not one of ours
        raise FhirError(404, "not-found", f"Subscription/{call.logical_id} is not known.")
    return state


def _entry(
    base: str, item: FeedItem, stored: dict[tuple[str, str, int], str] | None = None
) -> dict[str, Any]:
    """An event's entry; with ``stored`` (full-resource) the version itself, where it has a
    rendering in the caller's version."""
    first = item.version_id == 1
    path = f"{item.resource_type}/{item.logical_id}"
    text = (stored or {}).get((item.resource_type, item.logical_id, item.version_id))
    return {
        "fullUrl": f"{base}/{path}",
        **({"resource": json.loads(text)} if text else {}),
        "request": {
            "method": "POST" if first else "PUT",
            "url": item.resource_type if first else path,
        },
        "response": {
            "status": "201 Created" if first else "200 OK",
            "etag": f'W/"{item.version_id}"',
            "lastModified": fhir_instant(item.occurred_at),
        },
    }


def _r5_entries(
    base: str, items: list[FeedItem], stored: dict[tuple[str, str, int], str] | None = None
) -> list[dict[str, Any]]:
    """A subscription-notification's entries: one per resource (its last version here). R5's
    bdl-7 allows a fullUrl twice only with distinct meta.versionId, which id-only entries do
    not have; each version is still named by its event's focus (full-resource: the last
    version in full, as the page's latest word on that resource)."""
    last: dict[tuple[str, str], FeedItem] = {}
    for item in items:
        last.pop((item.resource_type, item.logical_id), None)  # re-insert: latest order
        last[(item.resource_type, item.logical_id)] = item
    return [_entry(base, item, stored) for item in last.values()]


def _subscription_ref(call: OperationCall) -> dict[str, Any]:
    return {"reference": f"{call.base}/Subscription/{call.logical_id}"}


def _focus(base: str, item: FeedItem) -> str:
    return f"{base}/{item.resource_type}/{item.logical_id}/_history/{item.version_id}"


def _status_resource(
    version: str,
    *,
    base: str,
    subscription: dict[str, Any],
    kind: str,
    since_start: int,
    events: list[FeedItem] | None = None,
    with_focus: bool = True,
) -> dict[str, Any]:
    status_id = uuid.uuid4().hex
    events = events or []
    if version == R5:
        return {
            "resourceType": "SubscriptionStatus",
            "id": status_id,
            "status": "active",
            "type": kind,
            "eventsSinceSubscriptionStart": str(since_start),
            **(
                {
                    "notificationEvent": [
                        {
                            "eventNumber": str(item.number),
                            "timestamp": fhir_instant(item.occurred_at),
                            **({"focus": {"reference": _focus(base, item)}} if with_focus else {}),
                        }
                        for item in events
                    ]
                }
                if events
                else {}
            ),
            "subscription": subscription,
            "topic": TOPIC_URL,
        }
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": subscription},
        {"name": "topic", "valueCanonical": TOPIC_URL},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(since_start)},
    ]
    for item in events:
        part: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(item.number)},
            {"name": "timestamp", "valueInstant": fhir_instant(item.occurred_at)},
        ]
        if with_focus:
            part.append({"name": "focus", "valueReference": {"reference": _focus(base, item)}})
        parameters.append({"name": "notification-event", "part": part})
    return {
        "resourceType": "Parameters",
        "id": status_id,
        "meta": {"profile": [STATUS_R4_PROFILE]},
        "parameter": parameters,
    }


def _bundle(
    bundle_type: str,
    links: list[dict[str, str]],
    entries: list[dict[str, Any]],
    *,
    profile: str = "",
    total: int | None = None,
) -> str:
    now = fhir_instant(timezone.now())
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "meta": {**({"profile": [profile]} if profile else {}), "lastUpdated": now},
        "type": bundle_type,
        "timestamp": now,
    }
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    if entries:
        bundle["entry"] = entries
    return dumps(bundle)


def _link(relation: str, url: str, query: list[tuple[str, str]]) -> dict[str, str]:
    return {"relation": relation, "url": f"{url}?{urlencode(query)}" if query else url}


def subscription_events(call: OperationCall) -> OperationAnswer:
    """``GET Subscription/{id}/$events``: the subscription's events, oldest first."""
    state = _subscription(call)
    since = _number(call.params, "eventsSinceNumber")
    until = _number(call.params, "eventsUntilNumber")
    count = _count(call.params)
    content = _content(call.params, _subscription_content(state.logical_id))
    feed_number(state.facility_id)
    first = max(since if since is not None else 0, state.start_number + 1)
    if since is None:  # no number asked for: from the oldest event still kept
        first = max(first, feed_pruned_through(state.facility_id) + 1)
    items, more = feed_page(state.facility_id, first=first, last=until, count=count)
    _refuse_pruned(state.facility_id, first, cursor="eventsSinceNumber")
    if since is None and until is not None and until > state.start_number:
        # From the start up to a pruned number: an empty page would hide the gap (review).
        _refuse_pruned(state.facility_id, until, cursor="eventsSinceNumber")
    since_start = max(0, feed_last_number(state.facility_id) - state.start_number)
    status = _status_resource(
        call.version,
        base=call.base,
        subscription=_subscription_ref(call),
        kind="query-event",
        since_start=since_start,
        events=items,
        with_focus=content != "empty",
    )
    url = f"{call.base}/Subscription/{call.logical_id}/$events"
    bound = [("eventsUntilNumber", str(until))] if until is not None else []
    if "content" in call.params:  # the links ask for what was asked for
        bound.append(("content", str(_last(call.params, "content"))))
    links = [
        _link("self", url, [("eventsSinceNumber", str(first)), *bound, ("_count", str(count))])
    ]
    if more and items:
        links.append(
            _link(
                "next",
                url,
                [("eventsSinceNumber", str(items[-1].number + 1)), *bound, ("_count", str(count))],
            )
        )
    status_entry: dict[str, Any] = {"fullUrl": f"urn:uuid:{status['id']}", "resource": status}
    if call.version == R4:
        # A history Bundle's entries carry request/response (bdl-3); entry 0 as the
        # Backport IG shows it: the $status call that would return this status.
        status_entry["request"] = {
            "method": "GET",
            "url": f"{call.base}/Subscription/{call.logical_id}/$status",
        }
        status_entry["response"] = {"status": "200"}
    entries = [status_entry]
    stored = None
    if content == "full-resource":
        readable = _readable(call.user, items)
        stored = _stored_versions(readable, "json_r5" if call.version == R5 else "json_r4")
    if call.version == R4:
        if content != "empty":
            entries += [_entry(call.base, item, stored) for item in items]
        bundle = _bundle("history", links, entries, profile=NOTIFICATION_R4_PROFILE)
    else:
        if content != "empty":
            entries += _r5_entries(call.base, items, stored)
        bundle = _bundle("subscription-notification", links, entries)
    # Resources sent in full are read as a search's are (docs/permissions.md)
    read = [
        (e["resource"]["resourceType"], e["resource"]["id"]) for e in entries[1:] if "resource" in e
    ]
    return OperationAnswer(bundle, read=tuple(dict.fromkeys(read)))


def subscription_status(call: OperationCall) -> OperationAnswer:
    """``GET Subscription/{id}/$status``: a searchset Bundle with the status."""
    state = _subscription(call)
    feed_number(state.facility_id)
    since_start = max(0, feed_last_number(state.facility_id) - state.start_number)
    status = _status_resource(
        call.version,
        base=call.base,
        subscription=_subscription_ref(call),
        kind="query-status",
        since_start=since_start,
    )
    url = f"{call.base}/Subscription/{call.logical_id}/$status"
    entry = {"fullUrl": f"urn:uuid:{status['id']}", "resource": status, "search": {"mode": "match"}}
    return OperationAnswer(_bundle("searchset", [_link("self", url, [])], [entry], total=1))


def subscriptions_status(call: OperationCall) -> OperationAnswer:
    """``GET Subscription/$status?id=&status=``: the status of each of the facility's
    Subscriptions (``id``: those only, comma-separated or repeated; ``status``: every one
    is ``active``, another status matches none), as a searchset Bundle in id order. An id
    that is not one of the facility's live Subscriptions is left out (FHIR's
    ``Subscription-status`` answers the statuses it has)."""
    facility = _feed_facility(call.user)
    rows = current_rows("Subscription").filter(source_pk=facility)
    ids = [i for value in call.params.get("id", []) for i in split_escaped(value, ",") if i]
    if ids:
        rows = rows.filter(logical_id__in=ids)
    for value in call.params.get("status", []):
        if not _names_active(value):
            rows = rows.none()
    logical_ids = sorted(rows.values_list("logical_id", flat=True))
    starts = dict(
        FeedSubscription.objects.filter(
            facility_id=facility, logical_id__in=logical_ids
        ).values_list("logical_id", "start_number")
    )
    feed_number(facility)
    last = feed_last_number(facility)
    entries = []
    for logical_id in logical_ids:
        if logical_id not in starts:  # stored without feed state: not one of ours
            continue
        status = _status_resource(
            call.version,
            base=call.base,
            subscription={"reference": f"{call.base}/Subscription/{logical_id}"},
            kind="query-status",
            since_start=max(0, last - starts[logical_id]),
        )
        entries.append(
            {"fullUrl": f"urn:uuid:{status['id']}", "resource": status, "search": {"mode": "match"}}
        )
    query = [(name, value) for name in ("id", "status") for value in call.params.get(name, [])]
    url = f"{call.base}/Subscription/$status"
    return OperationAnswer(
        _bundle("searchset", [_link("self", url, query)], entries, total=len(entries))
    )


def facility_events(call: OperationCall) -> OperationAnswer:
    """``GET /fhir/$events?since=<number>&_count=n``: the caller's facility feed after
    event ``since`` (none: from the oldest event still kept), as an id-only history
    Bundle. Each entry carries its event number (extension); poll again with the last
    one. A ``since`` behind the retention is 410 (``_refuse_pruned``)."""
    facility = _feed_facility(call.user)
    asked = _number(call.params, "since")
    count = _count(call.params)
    feed_number(facility)
    # No cursor: from the oldest event still kept. A cursor: from it, or 410 if pruned.
    since = asked if asked is not None else feed_pruned_through(facility)
    items, more = feed_page(facility, first=since + 1, count=count)
    if asked is not None:
        _refuse_pruned(facility, since + 1, cursor="since")
    url = f"{call.base}/$events"
    links = [_link("self", url, [("since", str(since)), ("_count", str(count))])]
    if more and items:
        links.append(_link("next", url, [("since", str(items[-1].number)), ("_count", str(count))]))
    if call.version == R5:
        # R5's history Bundle must carry the resource of each POST / PUT entry (bdl-3b):
        # R5 gets the notification an R5 $events answers, for the facility's own feed.
        status = _status_resource(
            R5,
            base=call.base,
            subscription={
                "identifier": {"system": FACILITY_FEED_SYSTEM, "value": str(facility)},
                "display": "The facility's feed (GET [base]/$events)",
            },
            kind="query-event",
            since_start=feed_last_number(facility),
            events=items,
        )
        notification: list[dict[str, Any]] = [
            {"fullUrl": f"urn:uuid:{status['id']}", "resource": status}
        ]
        notification += _r5_entries(call.base, items)
        return OperationAnswer(_bundle("subscription-notification", links, notification))
    entries = [
        {
            "extension": [{"url": EVENT_NUMBER_EXTENSION, "valueString": str(item.number)}],
            **_entry(call.base, item),
        }
        for item in items
    ]
    return OperationAnswer(_bundle("history", links, entries))


# --------------------------------------------------------------------------- registration


def register_all() -> None:
    r, v, s, c, u, d = (
        handlers.READ,
        handlers.VREAD,
        handlers.SEARCH,
        handlers.CREATE,
        handlers.UPDATE,
        handlers.DELETE,
    )
    handlers.register(
        ResourceHandler(
            "SubscriptionTopic",
            (r, v, s),
            documentation=f"One topic, {TOPIC_URL}: referral changes (R5 only; in R4 the "
            "topic is its canonical URL).",
            search_params=(
                handlers.SearchParam(
                    "url",
                    "uri",
                    "The topic's canonical URL.",
                    "http://hl7.org/fhir/SearchParameter/SubscriptionTopic-url",
                ),
            ),
            search=_topic_search,
            visible=_topic_visible,
            renders_all_versions=True,
            fhir_versions=(R5,),
        )
    )
    handlers.register(
        ResourceHandler(
            "Subscription",
            (r, v, s, c, u, d),
            documentation="Your facility's Subscriptions to the referral topic (member "
            "systems): rest-hook without endpoint, content id-only (default), full-resource or "
            "empty, pulled with $events. Update changes reason, name and content.",
            profile="",
            search_params=(
                handlers.SearchParam(
                    "status",
                    "token",
                    "active (every stored Subscription is active until deleted).",
                    "http://hl7.org/fhir/SearchParameter/Subscription-status",
                    frozenset({"not"}),
                ),
            ),
            search=_subscription_search,
            create=_subscription_create,
            update=_subscription_update,
            delete=_subscription_delete,
            visible=_subscription_visible,
            renders_all_versions=True,
        )
    )
    handlers.register_operation(
        Operation(
            name="events",
            level=handlers.INSTANCE_LEVEL,
            resource_type="Subscription",
            func=subscription_events,
            parameters=frozenset({"eventsSinceNumber", "eventsUntilNumber", "_count", "content"}),
            definition="http://hl7.org/fhir/OperationDefinition/Subscription-events",
            definition_r4=f"{BACKPORT}/OperationDefinition/backport-subscription-events",
            documentation="Events numbered after the Subscription's creation: "
            "eventsSinceNumber, eventsUntilNumber (inclusive), _count (1 to 500, default 50), "
            "content id-only | full-resource | empty (default: the Subscription's). Numbers older than the feed's retention: 410, with "
            "the oldest kept number (extension feed-oldest-event-number).",
        )
    )
    handlers.register_operation(
        Operation(
            name="status",
            level=handlers.INSTANCE_LEVEL,
            resource_type="Subscription",
            func=subscription_status,
            parameters=frozenset(),
            definition="http://hl7.org/fhir/OperationDefinition/Subscription-status",
            definition_r4=f"{BACKPORT}/OperationDefinition/backport-subscription-status",
        )
    )
    handlers.register_operation(
        Operation(
            name="status",
            level=handlers.TYPE_LEVEL,
            resource_type="Subscription",
            func=subscriptions_status,
            parameters=frozenset({"id", "status"}),
            definition="http://hl7.org/fhir/OperationDefinition/Subscription-status",
            definition_r4=f"{BACKPORT}/OperationDefinition/backport-subscription-status",
            documentation="Subscription/{id}/$status: that Subscription's status; "
            "Subscription/$status: each of your facility's (id: those only, comma-separated "
            "or repeated; status: active), in id order.",
        )
    )
    handlers.register_operation(
        Operation(
            name="events",
            level=handlers.SYSTEM_LEVEL,
            func=facility_events,
            parameters=frozenset({"since", "_count"}),
            definition=f"{CONSILIUM}/OperationDefinition/facility-events",
            documentation="Your facility's feed after event number `since` (none: from the "
            "oldest event kept), id-only, _count (1 to 500, default 50). R4: a history Bundle, each "
            "entry's extension feed-event-number the cursor for the next call; R5: a "
            "subscription-notification Bundle (SubscriptionStatus query-event, the event "
            "numbers in notificationEvent). A cursor older than the feed's retention "
            "(0 too, once anything was pruned): 410 (extension feed-oldest-event-number).",
        )
    )
