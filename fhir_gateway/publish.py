"""Projection on write (decisions 1 and 2): every referral change stores the new FHIR
versions and the outbox messages in the transaction of the ``ReferralEvent``.

``referrals.services`` calls ``referral_changed`` right after it appends an event; a FHIR
write that creates no event calls ``message_posted`` (a plain message) or
``case_file_stored`` (a case file, from ``referrals.attachments``). Resources are built
as JSON dicts by ``referral_mapping`` and stored without a fhir.resources round trip (the
tests validate every rendering with the R4B and R5 models); the write path therefore adds
a handful of INSERTs and no serialisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from django.db.models import Q

from core.memo import memoized
from core.rows import fetch_models, insert_many
from fhir_gateway import referral_mapping as m
from fhir_gateway.delivery import outbox_enqueue_versions, outbox_rows, outbox_scheduled
from fhir_gateway.feed import feed_record, feed_rows
from fhir_gateway.models import FeedEvent, FhirResource, OutboxMessage
from fhir_gateway.storage import (
    add_tokens,
    coding_tokens,
    content_hash,
    first_version_rows,
    store_version,
    stored_rows,
)
from referrals.models import (
    Attachment,
    ConsultNote,
    Message,
    Referral,
    ReferralEvent,
    ReferralState,
)
from referrals.workflow import FINISHED_STATES
from registry.models import Endpoint

# The versions stored inside a ``stored_versions`` block, in order (None: no block).
_collected: ContextVar[list[FhirResource] | None] = ContextVar("collected", default=None)
# The ``type`` and ``category`` a member sent with the case file stored in a
# ``case_file_described`` block (FHIR only; the REST API sends none).
_case_file_kinds: ContextVar[dict[str, Any] | None] = ContextVar("case_file_kinds", default=None)


@contextmanager
def stored_versions() -> Iterator[list[FhirResource]]:
    """The versions the projection stores inside the block: a caller answering with them
    (a transaction Bundle's response) need not read them back. An enclosing block sees
    them too once this one ends without an exception (one that raises rolls its writes
    back: they were never stored)."""
    outer = _collected.get()
    rows: list[FhirResource] = []
    token = _collected.set(rows)
    try:
        yield rows
    finally:
        _collected.reset(token)
    if outer is not None:
        outer.extend(rows)


@contextmanager
def case_file_described(kinds: dict[str, Any]) -> Iterator[None]:
    """The case file stored inside the block (``case_file_stored``) carries ``kinds``."""
    token = _case_file_kinds.set(kinds)
    try:
        yield
    finally:
        _case_file_kinds.reset(token)


def _collect(rows: list[FhirResource]) -> list[FhirResource]:
    collected = _collected.get()
    if collected is not None:
        collected.extend(rows)
    return rows


def aggregate_key(referral: Referral) -> str:
    """The referral's outbox subject; each endpoint's messages about it are ordered apart
    (``delivery.endpoint_aggregate``)."""
    return f"referral:{referral.pk}"


def _store_if_changed(
    referral: Referral,
    renderings: dict[str, dict[str, Any]],
    *,
    current_hashes: dict[tuple[str, str], str],
    force: bool = False,
) -> FhirResource | None:
    r4 = renderings[m.R4]
    resource_type, logical_id = r4["resourceType"], r4["id"]
    digest = content_hash(r4)
    if not force and current_hashes.get((resource_type, logical_id)) == digest:
        return None
    return store_version(
        resource_type=resource_type,
        logical_id=logical_id,
        resource=r4,
        fhir_version=m.R4,
        renderings=renderings,
        validate=False,
        source_pk=referral.pk,
        hash_value=digest,
        index_tokens=False,
    )


def _current_hashes(referral: Referral, ids: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    condition = Q()
    for resource_type, logical_id in ids:
        condition |= Q(resource_type=resource_type, logical_id=logical_id)
    rows = FhirResource.objects.filter(condition, is_current=True).values_list(
        "resource_type", "logical_id", "content_hash"
    )
    return {(t, i): h for t, i, h in rows}


def party_facility_ids(referral: Referral) -> list[int]:
    """The requester facility and the assigned department's facility (once each)."""
    facility_ids = [int(referral.requester_facility_id)]
    if referral.assigned_department_id is not None:
        department = referral.assigned_department
        assert department is not None
        if department.facility_id not in facility_ids:
            facility_ids.append(int(department.facility_id))
    return facility_ids


def member_endpoints(referral: Referral, facility_ids: list[int] | None = None) -> list[Endpoint]:
    """The endpoints of both parties that are not off (each receives its own FHIR
    version); read once per intake batch (core.memo). A suspended or failing endpoint is
    sent its messages too: they wait until it is active again (``delivery``), in order —
    queueing only for active ones lost what changed meanwhile (review)."""
    facilities = tuple(facility_ids or party_facility_ids(referral))
    return list(memoized(("endpoints", *facilities), lambda: _live_endpoints(facilities)))


def _live_endpoints(facilities: tuple[int, ...]) -> list[Endpoint]:
    if not facilities:
        return []
    return fetch_models(  # prepared (core.rows): every change asks
        Endpoint,
        f"facility_id IN ({', '.join(['%s'] * len(facilities))}) AND status <> %s ORDER BY id",
        [*facilities, Endpoint.Status.OFF.value],
    )


def _enqueue(referral: Referral, rows: list[FhirResource], *, first: bool = False) -> None:
    """Outbox messages for the parties' endpoints (push) and feed rows for the parties
    (pull, ``$events``), in the transaction of the change."""
    if rows:
        facility_ids = party_facility_ids(referral)
        outbox_enqueue_versions(
            aggregate_key=aggregate_key(referral),
            items=[
                (endpoint, row)
                for endpoint in member_endpoints(referral, facility_ids)
                for row in rows
            ],
            new_aggregate=first,
        )
        feed_record(facility_ids=facility_ids, rows=rows, referral_id=referral.pk)


def _task_context(referral: Referral, event: ReferralEvent) -> m.TaskContext:
    code, text = "", ""
    if referral.state == ReferralState.DECLINED and event.action == "decline":
        code, text = str(event.payload.get("reason_code") or ""), event.reason
    elif referral.state == ReferralState.CANCELLED and event.action == "cancel":
        text = event.reason
    notes = (
        []
        if referral.version <= 1  # created in this transaction: no consult note yet
        else list(
            ConsultNote.objects.filter(referral=referral)
            .order_by("number")
            .values_list("number", flat=True)
        )
    )
    # The planned conference (Task.input) and the counter-referrals (Task.output): read
    # only in the states that show them, so the other events pay no query.
    experts = (
        list(referral.conference_experts.order_by("pk").values_list("pk", flat=True))
        if referral.state in m.CONFERENCE_STATES and referral.conference_at is not None
        else []
    )
    counter_referrals = (
        list(
            Referral.objects.filter(parent_referral=referral)
            .order_by("pk")
            .values_list("filler_id", flat=True)
        )
        if referral.state in FINISHED_STATES and referral.version > 1
        else []
    )
    return m.TaskContext(
        last_modified=event.at,
        status_reason_code=code,
        status_reason_text=text,
        consult_note_numbers=notes,
        conference_expert_ids=experts,
        counter_referral_ids=counter_referrals,
    )


def referral_changed(
    *, referral: Referral, event: ReferralEvent, new: bool = False
) -> list[FhirResource]:
    """Store the referral's new FHIR versions and enqueue them for both members. ``new``:
    the referral row was inserted in this transaction (it can have no files yet).

    Runs inside the transaction that wrote ``event``. The Task gets a version on every
    event (its version id then equals ``referral.version``, which is what If-Match checks);
    Patient and ServiceRequest only when their content changed.
    """
    if referral.state == ReferralState.DRAFT:
        return []  # drafts are not shared
    if event.from_state == ReferralState.DRAFT and event.action != "submit":
        # A draft cancelled unsent: no one was ever told of it, and the department it names
        # must not hear of it, nor of its files (referrals.permissions).
        return []
    patient = m.referral_to_patient(referral)
    order = m.referral_to_service_request(referral)
    task = m.referral_to_task(referral, _task_context(referral, event))
    extra: list[dict[str, dict[str, Any]]] = []
    author_facility = event.actor.facility_id if event.actor is not None else None
    message_pk = event.payload.get("message_id")
    if message_pk:
        message = Message.objects.select_related("in_response_to").get(pk=message_pk)
        extra.append(
            m.message_to_communication(referral, message, author_facility_id=author_facility)
        )
    note_pk = event.payload.get("consult_note_id")
    if note_pk:
        note = ConsultNote.objects.get(pk=note_pk)
        extra.append(
            m.consult_note_to_document_reference(referral, note, author_facility_id=author_facility)
        )
    files: list[Attachment] = []
    if event.from_state == ReferralState.DRAFT and not new:
        # A draft submitted: the files added to it are shared now, with the referral. (A
        # referral inserted in this transaction has none: no query for them.)
        files = list(Attachment.objects.filter(referral=referral).order_by("number"))
    if referral.version == 1 and not extra and not files:
        # Created (not as a draft) in this transaction: nothing of it is stored or queued
        # yet. Version 1 of the three resources, their outbox messages and feed rows in
        # one statement (core.rows.insert_many: one round trip instead of three).
        values = first_version_rows(
            [(r, content_hash(r[m.R4])) for r in (patient, order, task)],
            fhir_version=m.R4,
            source_pk=referral.pk,
        )
        pending = [FhirResource(**v) for v in values]  # what the other rows name
        facility_ids = party_facility_ids(referral)
        outbox = outbox_rows(
            aggregate_key(referral),
            [(e, row) for e in member_endpoints(referral, facility_ids) for row in pending],
        )
        feed = feed_rows(facility_ids=facility_ids, rows=pending, referral_id=referral.pk)
        version_ids, outbox_ids, _ = insert_many(
            [(FhirResource, values, True), (OutboxMessage, outbox, True), (FeedEvent, feed, False)]
        )
        outbox_scheduled(outbox_ids, outbox)
        return _collect(stored_rows(pending, version_ids))
    ids = [(r[m.R4]["resourceType"], r[m.R4]["id"]) for r in (patient, order)]
    hashes = _current_hashes(referral, ids)
    rows = [
        row
        for row in (
            _store_if_changed(referral, patient, current_hashes=hashes),
            _store_if_changed(referral, order, current_hashes=hashes),
            *(_store_if_changed(referral, r, current_hashes={}, force=True) for r in extra),
            *(_case_file_row(referral, attachment) for attachment in files),
            _store_if_changed(referral, task, current_hashes={}, force=True),
        )
        if row is not None
    ]
    _introduce(referral, event, rows)
    _enqueue(referral, rows)
    return _collect(rows)


def _introduce(referral: Referral, event: ReferralEvent, rows: list[FhirResource]) -> None:
    """A facility that becomes a party with this change (a forward, a reroute to another
    facility's department) is first sent what it was never told: the current version of
    each of the referral's resources this change does not store anew (the Patient the
    new Task names, the case files, consult notes and messages so far), to its endpoints
    and feed, ahead of the change's own versions. Without it a forward's new side got a
    Task naming a Patient it was never sent, and never heard of the files (review)."""
    # Only a forward or reroute moves a referral (their effects record the department it
    # left): no query on the other changes.
    if "from_department_id" not in event.payload or referral.assigned_department_id is None:
        return
    facility = referral.assigned_department.facility_id  # type: ignore[union-attr]
    if facility == referral.requester_facility_id:
        return
    # Whether it was a party before: the event log (the department each event left).
    earlier = (
        ReferralEvent.objects.filter(referral=referral, department__facility_id=facility)
        .exclude(pk=event.pk)
        .exists()
    )
    if earlier:
        return
    fresh = {(r.resource_type, r.logical_id) for r in rows}
    order = {"Patient": 0, "ServiceRequest": 1, "Communication": 2, "DocumentReference": 2}
    known = sorted(
        (
            r
            for r in FhirResource.objects.filter(
                source_pk=referral.pk,
                resource_type__in=m.REFERRAL_TYPES,
                is_current=True,
                deleted=False,
            )
            if (r.resource_type, r.logical_id) not in fresh
        ),
        key=lambda r: (order.get(r.resource_type, 3), r.last_updated, r.pk),
    )
    if not known:
        return
    outbox_enqueue_versions(
        aggregate_key=aggregate_key(referral),
        items=[(e, row) for e in member_endpoints(referral, [facility]) for row in known],
    )
    feed_record(facility_ids=[facility], rows=known, referral_id=referral.pk)


def _case_file_row(referral: Referral, attachment: Attachment) -> FhirResource:
    kinds = _case_file_kinds.get()
    rendering = m.case_file_to_document_reference(referral, attachment, kinds)
    row = _store_if_changed(referral, rendering, current_hashes={}, force=True)
    assert row is not None
    if kinds and "type" in kinds:  # DocumentReference?type reads the token table
        add_tokens(row, coding_tokens("type", [kinds["type"]]))
    return row


def case_file_stored(*, referral: Referral, attachment: Attachment) -> FhirResource | None:
    """A case file (whichever way it came: FHIR or the REST API): its
    DocumentReference, for both members (push and feed), in the upload's transaction. A
    draft's files wait for its submission (``referral_changed``): drafts are not shared."""
    if referral.state == ReferralState.DRAFT:
        return None
    row = _case_file_row(referral, attachment)
    _enqueue(referral, [row])
    _collect([row])
    return row


def case_files_unpublished(*, referral: Referral) -> list[Attachment]:
    """The case files of a referral its members were told of (its Task is stored: not a
    draft, nor a draft cancelled unsent, which stay the requester's alone) that have no
    DocumentReference stored: uploaded through the REST API before uploads were
    published (2026-11-29)."""
    shared = FhirResource.objects.filter(resource_type="Task", source_pk=referral.pk)
    if referral.state == ReferralState.DRAFT or not shared.exists():
        return []
    by_id = {
        m.case_file_id(referral.filler_id, a.number): a
        for a in Attachment.objects.filter(referral=referral).order_by("number")
    }
    stored = set(
        FhirResource.objects.filter(
            resource_type="DocumentReference",
            is_current=True,
            source_pk=referral.pk,
            logical_id__in=list(by_id),
        ).values_list("logical_id", flat=True)
    )
    return [a for doc_id, a in by_id.items() if doc_id not in stored]


def case_files_backfill(*, referral: Referral) -> int:
    """Publish the case files ``case_files_unpublished`` finds, as ``case_file_stored``
    does at upload (stored, pushed to both parties' endpoints, in their feeds); how many.
    The caller holds the referral's row lock (as an upload does) in its transaction; a
    draft's files wait for its submission."""
    missing = case_files_unpublished(referral=referral)
    for attachment in missing:
        case_file_stored(referral=referral, attachment=attachment)
    return len(missing)


def message_posted(*, referral: Referral, message: Message) -> FhirResource:
    """A message outside any transition (no event): its Communication, for both members."""
    author_facility = message.author.facility_id if message.author is not None else None
    rendering = m.message_to_communication(referral, message, author_facility_id=author_facility)
    row = _store_if_changed(referral, rendering, current_hashes={}, force=True)
    assert row is not None
    _enqueue(referral, [row])
    _collect([row])
    return row
