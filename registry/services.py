"""Writes to the registry. Every facility change leaves a FacilityRevision."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import User
from accounts.roles import Role
from core.errors import ApplicationError, Conflict, PermissionDenied
from registry.models import (
    AdministrativeArea,
    AreaLevel,
    ChangeRequest,
    Department,
    Endpoint,
    Facility,
    FacilityIdentifier,
    FacilityRevision,
    Specialty,
    SupportLink,
)
from registry.permissions import is_steward
from registry.selectors import effective_support_links, upside_down_support_links

# Facility fields recorded in revisions (FK fields by their *_id column).
TRACKED_FIELDS: tuple[str, ...] = (
    "code",
    "name",
    "name_local",
    "country_id",
    "area_id",
    "tier",
    "facility_type",
    "ownership",
    "operational_status",
    "latitude",
    "longitude",
    "parent_id",
    "languages",
    "beds",
    "is_remote",
)


def area_province(area: AdministrativeArea | None) -> AdministrativeArea | None:
    """The level-1 ancestor of an area (the area itself when it is a province)."""
    seen = 0
    while area is not None and area.level != AreaLevel.PROVINCE and seen < 10:
        area = area.parent
        seen += 1
    return area if area is not None and area.level == AreaLevel.PROVINCE else None


def facility_snapshot(facility: Facility) -> dict[str, Any]:
    return {field: getattr(facility, field) for field in TRACKED_FIELDS}


def facility_identifier_keys(facility_id: int) -> list[str]:
    """A facility's identifiers as a revision records them (``system|value``, sorted), as
    the importer does."""
    rows = FacilityIdentifier.objects.filter(facility_id=facility_id).values_list("system", "value")
    return sorted(f"{system}|{value}" for system, value in rows)


# pg_advisory_xact_lock key: parent changes of facilities, one transaction at a time.
_PARENT_CHANGES_LOCK = 0x434F_5041  # "COPA"


def facility_parent_changes_lock() -> None:
    """Parent changes one transaction at a time, until it ends (PostgreSQL: a
    transaction-scoped advisory lock). Two transactions that each add half of a loop (A
    under B, B under A) would each find no loop in what the other has not committed; this
    way the second waits, then reads the first's parent (READ COMMITTED: each statement
    sees what was committed before it) and finds the loop. Registry edits are rare: every
    facility update takes it (an import: for its whole run; the admin: when it checks the
    parent), always before any row lock. SQLite runs one writer at a time anyway."""
    if connection.vendor == "postgresql" and connection.in_atomic_block:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_PARENT_CHANGES_LOCK])


def facility_parent_problem(facility: Facility) -> str | None:
    """Why ``facility.parent`` cannot be its parent: itself, or one of its own descendants
    (a loop the FHIR projection would publish as a ``partOf`` cycle). Takes the parent
    changes lock first, so the answer holds until the caller's transaction ends."""
    if facility.parent_id is None:
        return None
    if facility.pk is not None and facility.parent_id == facility.pk:
        return "A facility cannot be its own parent."
    if facility.pk is None:
        return None  # a new facility: no one is below it yet
    facility_parent_changes_lock()
    seen: set[int] = set()
    ancestor: int | None = facility.parent_id
    while ancestor is not None and ancestor not in seen:
        if ancestor == facility.pk:
            return "That parent is one of this facility's own descendants (a loop)."
        seen.add(ancestor)
        ancestor = Facility.objects.filter(pk=ancestor).values_list("parent_id", flat=True).first()
    return None


def _check_facility(facility: Facility) -> None:
    if problem := facility_parent_problem(facility):
        raise ApplicationError(problem, code="parent_loop", extra={"field": "parent"})


def _border_changes(facility: Facility) -> list[tuple[SupportLink, bool]]:
    """Each support link of ``facility`` with whether it crosses a border with the facility
    in its (possibly new) country."""
    links = SupportLink.objects.select_related("hub", "spoke").filter(
        Q(hub_id=facility.pk) | Q(spoke_id=facility.pk)
    )
    changes = []
    for link in links:
        hub_country = facility.country_id if link.hub_id == facility.pk else link.hub.country_id
        spoke_country = (
            facility.country_id if link.spoke_id == facility.pk else link.spoke.country_id
        )
        changes.append((link, hub_country != spoke_country))
    return changes


def _crossing_without_agreement(changes: list[tuple[SupportLink, bool]]) -> str | None:
    for link, cross_border in changes:
        if cross_border and not link.agreement_reference.strip():
            return (
                f"Support link #{link.pk} ({link}) would cross a border without a data-sharing "
                "agreement: give it an agreement reference (or delete it) first."
            )
    return None


def facility_border_problem(facility: Facility) -> str | None:
    """A facility moved to another country: why it may not (one of its support links would
    cross a border without a data-sharing agreement)."""
    if facility.pk is None:
        return None
    stored = Facility.objects.filter(pk=facility.pk).values_list("country_id", flat=True).first()
    if stored == facility.country_id:
        return None  # not a move: links already checked are not judged again
    return _crossing_without_agreement(_border_changes(facility))


def _support_links_tier_problem(facility: Facility) -> str | None:
    """One of ``facility``'s support links whose hub would be of a lower tier (a larger
    number) than its spoke with the facility at its (possibly new) tier, described."""
    links = (
        effective_support_links()
        .select_related("hub", "spoke")
        .filter(Q(hub_id=facility.pk) | Q(spoke_id=facility.pk))
    )
    for link in links.order_by("id"):
        hub_tier = facility.tier if link.hub_id == facility.pk else link.hub.tier
        spoke_tier = facility.tier if link.spoke_id == facility.pk else link.spoke.tier
        if hub_tier > spoke_tier:
            return _upside_down_text(link, hub_tier, spoke_tier)
    return None


def support_links_upside_down(facility_ids: Collection[int]) -> dict[int, str]:
    """For facilities whose stored tiers just changed (an import, judged once all rows are
    in): each one with a link in effect whose hub is now below its spoke, described (one
    query, whatever the number of facilities)."""
    links = upside_down_support_links().filter(
        Q(hub_id__in=facility_ids) | Q(spoke_id__in=facility_ids)
    )
    found: dict[int, str] = {}
    for link in links:
        for facility_id in (link.hub_id, link.spoke_id):
            if facility_id in facility_ids:
                found.setdefault(
                    facility_id, _upside_down_text(link, link.hub.tier, link.spoke.tier)
                )
    return found


def _upside_down_text(link: SupportLink, hub_tier: int, spoke_tier: int) -> str:
    return (
        f"Support link #{link.pk} ({link}) would have its hub (tier {hub_tier}) below its "
        f"spoke (tier {spoke_tier}): change or deactivate the link first."
    )


def facility_tier_problem(facility: Facility) -> str | None:
    """A facility whose tier changes: why it may not (a hub would then be of a lower tier
    than a spoke it supports)."""
    if facility.pk is None:
        return None
    stored = Facility.objects.filter(pk=facility.pk).values_list("tier", flat=True).first()
    if stored is None or stored == facility.tier:
        return None
    return _support_links_tier_problem(facility)


def facility_relink_country(facility: Facility) -> None:
    """A facility that moved to another country: its support links cross a border now (or
    no longer); one that would cross it without a data-sharing agreement refuses the move."""
    changes = _border_changes(facility)
    if problem := _crossing_without_agreement(changes):
        raise Conflict(problem, code="agreement_required")
    for link, cross_border in changes:
        if cross_border != link.is_cross_border:
            SupportLink.objects.filter(pk=link.pk).update(is_cross_border=cross_border)


def facility_record_revision(
    *,
    facility: Facility,
    before: Mapping[str, Any],
    identifiers_before: list[str] | None,
    actor: User | None,
    source: str,
    change_request: ChangeRequest | None = None,
) -> FacilityRevision | None:
    """Write the revision of a change to ``facility`` (None when nothing changed).
    ``identifiers_before`` None: a new facility."""
    changes = _diff(before, facility_snapshot(facility))
    identifiers = facility_identifier_keys(facility.pk)
    if identifiers != (identifiers_before or []):
        changes["identifiers"] = [identifiers_before, identifiers]
    if not changes:
        return None
    return FacilityRevision.objects.create(
        facility=facility,
        changed_by=actor,
        source=source,
        change_request=change_request,
        changes=changes,
    )


def _diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list[Any]]:
    return {k: [before.get(k), after[k]] for k in after if before.get(k) != after[k]}


def _require_steward(actor: User) -> None:
    if not is_steward(actor):
        raise PermissionDenied("Only registry stewards may change the registry.")


def _set_identifiers(facility: Facility, identifiers: list[Mapping[str, str]]) -> None:
    wanted = {(i["system"], i["value"]) for i in identifiers}
    existing = {(i.system, i.value): i for i in facility.identifiers.all()}
    for key, identifier in existing.items():
        if key not in wanted:
            identifier.delete()
    for system, value in wanted - set(existing):
        taken = (
            FacilityIdentifier.objects.filter(system=system, value=value)
            .exclude(facility=facility)
            .exists()
        )
        if taken:
            raise Conflict(f"Identifier {system}|{value} already belongs to another facility.")
        FacilityIdentifier.objects.update_or_create(
            facility=facility, system=system, defaults={"value": value}
        )


@transaction.atomic
def facility_create(
    *,
    actor: User | None,
    data: Mapping[str, Any],
    source: str = "api",
    change_request: ChangeRequest | None = None,
) -> Facility:
    if actor is not None and change_request is None:
        _require_steward(actor)
    fields = dict(data)
    identifiers = fields.pop("identifiers", [])
    if Facility.objects.filter(code=fields["code"]).exists():
        raise Conflict(f"A facility with code {fields['code']!r} already exists.")
    facility = Facility(**fields)
    facility.province = area_province(facility.area)
    facility.full_clean(exclude=["search_name"])
    facility.save()
    _set_identifiers(facility, identifiers)
    facility_record_revision(
        facility=facility,
        before={},
        identifiers_before=None,
        actor=actor,
        source=source,
        change_request=change_request,
    )
    return facility


@transaction.atomic
def facility_update(
    *,
    actor: User | None,
    facility: Facility,
    data: Mapping[str, Any],
    source: str = "api",
    change_request: ChangeRequest | None = None,
) -> Facility:
    if actor is not None and change_request is None:
        _require_steward(actor)
    # Before any row lock, for every update (the parent check below takes it too, and it
    # must not come after our row lock: a concurrent parent change holding it may be
    # waiting for this very row, the foreign key of its new parent).
    facility_parent_changes_lock()
    facility = Facility.objects.select_for_update().get(pk=facility.pk)
    before = facility_snapshot(facility)
    identifiers_before = facility_identifier_keys(facility.pk)
    fields = dict(data)
    identifiers = fields.pop("identifiers", None)
    code = fields.get("code", facility.code)
    if code != facility.code and Facility.objects.filter(code=code).exists():
        raise Conflict(f"A facility with code {code!r} already exists.")
    for name, value in fields.items():
        setattr(facility, name, value)
    facility.province = area_province(facility.area)
    facility.full_clean(exclude=["search_name"])
    _check_facility(facility)
    if facility.tier != before["tier"] and (problem := _support_links_tier_problem(facility)):
        raise Conflict(problem, code="hub_below_spoke")
    if facility.country_id != before["country_id"]:
        facility_relink_country(facility)
    facility.save()
    if identifiers is not None:
        _set_identifiers(facility, identifiers)
    facility_record_revision(
        facility=facility,
        before=before,
        identifiers_before=identifiers_before,
        actor=actor,
        source=source,
        change_request=change_request,
    )
    return facility


@transaction.atomic
def facility_admin_saved(
    *,
    actor: User,
    facility: Facility,
    before: Mapping[str, Any] | None,
    identifiers_before: list[str] | None,
) -> None:
    """The Django admin saved ``facility`` and its inline rows (identifiers, departments):
    its links follow a move to another country, and the revision is recorded as the API
    does (``before`` None: it was added)."""
    if before and before["country_id"] != facility.country_id:
        facility_relink_country(facility)
    facility_record_revision(
        facility=facility,
        before=before or {},
        identifiers_before=identifiers_before,
        actor=actor,
        source="admin",
    )


# --- change requests: proposed by a facility admin, applied when a steward approves ---------


def change_request_check_may_propose(*, actor: User, facility: Facility | None) -> None:
    """Raises PermissionDenied unless ``actor`` may propose a change to ``facility`` (None: a
    new facility). Callers check this before validating the payload, so a refused caller
    learns nothing about it."""
    if not (actor.has_role(Role.FACILITY_ADMIN) or is_steward(actor)):
        raise PermissionDenied("Only facility administrators may propose registry changes.")
    if (
        facility is not None
        and not is_steward(actor)
        and (actor.facility_id is None or actor.facility_id != facility.pk)
    ):
        raise PermissionDenied("A facility administrator may only propose changes to own facility.")


@transaction.atomic
def change_request_propose(
    *, actor: User, facility: Facility | None, payload: Mapping[str, Any]
) -> ChangeRequest:
    change_request_check_may_propose(actor=actor, facility=facility)
    return ChangeRequest.objects.create(facility=facility, payload=dict(payload), proposed_by=actor)


def _lock_pending(change_request: ChangeRequest) -> ChangeRequest:
    locked = ChangeRequest.objects.select_for_update().get(pk=change_request.pk)
    if locked.status != ChangeRequest.Status.PENDING:
        raise Conflict(
            f"Change request #{locked.pk} is already {locked.status}.",
            extra={"current_status": locked.status},
        )
    return locked


@transaction.atomic
def change_request_approve(
    *,
    actor: User,
    change_request: ChangeRequest,
    data: Mapping[str, Any],
    comment: str = "",
) -> ChangeRequest:
    """Apply ``data`` (the request's payload, already parsed by the caller) and close it."""
    _require_steward(actor)
    if change_request.proposed_by_id == actor.pk:
        raise PermissionDenied(
            "A change request is approved by another steward than the one who proposed it."
        )
    locked = _lock_pending(change_request)
    if locked.facility is None:
        facility = facility_create(
            actor=actor, data=data, source="change-request", change_request=locked
        )
        locked.facility = facility
    else:
        facility_update(
            actor=actor,
            facility=locked.facility,
            data=data,
            source="change-request",
            change_request=locked,
        )
    locked.status = ChangeRequest.Status.APPROVED
    locked.reviewed_by = actor
    locked.reviewed_at = timezone.now()
    locked.review_comment = comment
    locked.save()
    return locked


@transaction.atomic
def change_request_reject(
    *, actor: User, change_request: ChangeRequest, comment: str
) -> ChangeRequest:
    _require_steward(actor)
    if not comment.strip():
        raise ApplicationError("A rejection needs a comment.", code="comment_required")
    locked = _lock_pending(change_request)
    locked.status = ChangeRequest.Status.REJECTED
    locked.reviewed_by = actor
    locked.reviewed_at = timezone.now()
    locked.review_comment = comment
    locked.save()
    return locked


# --- departments, endpoints, support links ------------------------------------------------


def department_problem(department: Department) -> ApplicationError | None:
    """What is wrong with ``department`` as it would be saved (the API and the admin)."""
    if not (department.offers_async or department.offers_live or department.offers_transfer):
        return ApplicationError("A department must offer at least one mode.", code="no_mode")
    if department.facility_id is not None and (
        Department.objects.filter(
            facility_id=department.facility_id, specialty_id=department.specialty_id
        )
        .exclude(pk=department.pk)
        .exists()
    ):
        return Conflict("This facility already has a department for that specialty.")
    return None


@transaction.atomic
def department_save(
    *, actor: User, data: Mapping[str, Any], department: Department | None = None
) -> Department:
    _require_steward(actor)
    department = department or Department()
    for name, value in data.items():
        setattr(department, name, value)
    if problem := department_problem(department):
        raise problem
    department.full_clean()
    department.save()
    return department


@transaction.atomic
def endpoint_save(
    *, actor: User, data: Mapping[str, Any], endpoint: Endpoint | None = None
) -> Endpoint:
    _require_steward(actor)
    endpoint = endpoint or Endpoint()
    for name, value in data.items():
        setattr(endpoint, name, value)
    endpoint.full_clean()
    endpoint.save()
    return endpoint


def _link_tier_problem(link: SupportLink) -> ApplicationError | None:
    """A hub of a lower tier than its spoke, judged when the link is effective after the
    save and is new, moves (another hub or spoke) or becomes effective: an edit of a link
    stored before the rule, or one that switches it off, is not refused by it. The two
    facilities' rows are locked (in a transaction) and their tiers read afresh, so a tier
    change committing meanwhile is waited for and judged."""
    today = timezone.localdate()
    effective = link.active and (link.valid_to is None or link.valid_to >= today)
    if not effective:
        return None
    if link.pk is not None:
        stored = (
            effective_support_links().filter(pk=link.pk).values_list("hub_id", "spoke_id").first()
        )
        if stored == (link.hub_id, link.spoke_id):
            return None  # was effective between the same two: judged when it became so
    facilities = Facility.objects.filter(pk__in=[link.hub_id, link.spoke_id]).order_by("pk")
    if connection.in_atomic_block:
        facilities = facilities.select_for_update()
    tiers = dict(facilities.values_list("pk", "tier"))
    hub_tier, spoke_tier = tiers.get(link.hub_id), tiers.get(link.spoke_id)
    if hub_tier is not None and spoke_tier is not None and hub_tier > spoke_tier:
        return ApplicationError(
            f"A hub (tier {hub_tier}) cannot support a spoke of a higher tier (tier "
            f"{spoke_tier}): are hub and spoke the wrong way round?",
            code="hub_below_spoke",
        )
    return None


def support_link_problem(link: SupportLink) -> ApplicationError | None:
    """What is wrong with ``link`` as it would be saved (the API and the admin)."""
    if link.hub_id == link.spoke_id:
        return ApplicationError("A facility cannot support itself.", code="self_link")
    if problem := _link_tier_problem(link):
        return problem
    cross_border = link.hub.country_id != link.spoke.country_id
    if cross_border and not link.agreement_reference.strip():
        return ApplicationError(
            "A cross-border support link needs a data-sharing agreement reference.",
            code="agreement_required",
        )
    duplicate = (
        SupportLink.objects.filter(hub=link.hub, spoke=link.spoke, valid_from=link.valid_from)
        .exclude(pk=link.pk)
        .exists()
    )
    if duplicate:
        return Conflict("This hub already supports this spoke from that date.")
    return None


@transaction.atomic
def support_link_save(
    *,
    actor: User,
    data: Mapping[str, Any],
    specialties: list[Specialty] | None = None,
    link: SupportLink | None = None,
) -> SupportLink:
    _require_steward(actor)
    link = link or SupportLink()
    for name, value in data.items():
        setattr(link, name, value)
    if problem := support_link_problem(link):
        raise problem
    link.save()
    if specialties is not None:
        link.specialties.set(specialties)
    return link


# --- changes that reach a facility through another row ------------------------------------
# ``Facility.updated_at`` must move whenever what a facility shows changes: readers of
# "changed since" (the FHIR registry projection) go by it. These two changes reach it
# through another row, so they move it here, explicitly (the admin calls them).


def facility_delete(*, facility: Facility) -> None:
    """Delete a facility. Its children lose their parent (``SET_NULL``, a bulk UPDATE that
    skips ``auto_now``): their ``updated_at`` moves with it."""
    with transaction.atomic():
        Facility.objects.filter(parent_id=facility.pk).update(updated_at=timezone.now())
        facility.delete()


def area_problem(area: AdministrativeArea) -> str | None:
    """Why ``area`` cannot be saved as it is: its parent is of a higher level (a smaller
    number) in the same country, and its children of a lower one in the same country, so
    the levels strictly increase down every chain (never itself, nor a loop)."""
    if area.pk is not None:
        children = AdministrativeArea.objects.filter(parent_id=area.pk)
        if children.exclude(country_id=area.country_id).exists():
            return "Areas below this one are in its country: it cannot move to another."
        if children.filter(level__lte=area.level).exists():
            return "Areas below this one are of a lower level: it cannot take theirs."
    if area.parent_id is None:
        return None
    parent = AdministrativeArea.objects.filter(pk=area.parent_id).first()
    if parent is None:
        return "The parent area does not exist."
    if parent.pk == area.pk:
        return "An area cannot be its own parent."
    if parent.country_id != area.country_id:
        return "The parent area is in another country."
    if parent.level >= area.level:
        return "The parent area must be of a higher level (a province above a district...)."
    return None


def area_save(*, area: AdministrativeArea) -> None:
    """Save an administrative area: the facilities in it or below it show its name in their
    address, and their province is derived from it (a district moved to another province
    moves its facilities), so they are rewritten too (``updated_at`` moves with them).
    Levels strictly increase down a chain (``area_problem``), so every area below this one
    has this one's province."""
    if problem := area_problem(area):
        raise ApplicationError(problem, code="invalid_area", extra={"field": "parent"})
    with transaction.atomic():
        area.save()
        below = Q(area_id=area.pk)
        path = "area__parent"
        for _ in range(len(AreaLevel.choices) - 1):  # areas are this many levels deep
            below |= Q(**{f"{path}_id": area.pk})
            path += "__parent"
        Facility.objects.filter(below).update(
            province=area_province(area), updated_at=timezone.now()
        )
