"""Writes to the registry. Every facility change leaves a FacilityRevision."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import transaction
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
    FacilityRevision.objects.create(
        facility=facility,
        changed_by=actor,
        source=source,
        change_request=change_request,
        changes=_diff({}, facility_snapshot(facility)),
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
    facility = Facility.objects.select_for_update().get(pk=facility.pk)
    before = facility_snapshot(facility)
    fields = dict(data)
    identifiers = fields.pop("identifiers", None)
    code = fields.get("code", facility.code)
    if code != facility.code and Facility.objects.filter(code=code).exists():
        raise Conflict(f"A facility with code {code!r} already exists.")
    for name, value in fields.items():
        setattr(facility, name, value)
    facility.province = area_province(facility.area)
    facility.full_clean(exclude=["search_name"])
    facility.save()
    if identifiers is not None:
        _set_identifiers(facility, identifiers)
    changes = _diff(before, facility_snapshot(facility))
    if changes:
        FacilityRevision.objects.create(
            facility=facility,
            changed_by=actor,
            source=source,
            change_request=change_request,
            changes=changes,
        )
    return facility


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


@transaction.atomic
def department_save(
    *, actor: User, data: Mapping[str, Any], department: Department | None = None
) -> Department:
    _require_steward(actor)
    department = department or Department()
    for name, value in data.items():
        setattr(department, name, value)
    if not (department.offers_async or department.offers_live or department.offers_transfer):
        raise ApplicationError("A department must offer at least one mode.", code="no_mode")
    if (
        Department.objects.filter(facility=department.facility, specialty=department.specialty)
        .exclude(pk=department.pk)
        .exists()
    ):
        raise Conflict("This facility already has a department for that specialty.")
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
    if link.hub_id == link.spoke_id:
        raise ApplicationError("A facility cannot support itself.", code="self_link")
    cross_border = link.hub.country_id != link.spoke.country_id
    if cross_border and not link.agreement_reference.strip():
        raise ApplicationError(
            "A cross-border support link needs a data-sharing agreement reference.",
            code="agreement_required",
        )
    duplicate = (
        SupportLink.objects.filter(hub=link.hub, spoke=link.spoke, valid_from=link.valid_from)
        .exclude(pk=link.pk)
        .exists()
    )
    if duplicate:
        raise Conflict("This hub already supports this spoke from that date.")
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


def area_save(*, area: AdministrativeArea) -> None:
    """Save an administrative area (a rename, say): the facilities in it or below it show
    its name in their address, so their ``updated_at`` moves too."""
    with transaction.atomic():
        area.save()
        below = Q(area_id=area.pk) | Q(province_id=area.pk)
        path = "area__parent"
        for _ in range(len(AreaLevel.choices) - 1):  # areas are this many levels deep
            below |= Q(**{f"{path}_id": area.pk})
            path += "__parent"
        Facility.objects.filter(below).update(updated_at=timezone.now())
