"""Reads of referrals. Every read that crosses a permission boundary goes through the
scope defined here: the requesting facility's staff and the assigned department's staff.
Anything outside one's scope is "not found" (404), never "forbidden", so ids leak nothing.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch, Q, QuerySet

from accounts.models import User
from accounts.roles import Role
from core.errors import NotFound
from referrals.models import Referral, ReferralEvent, ReferralState
from referrals.permissions import referral_grant_filter, referral_region_filter
from referrals.workflow import TERMINAL_STATES
from registry.models import Department

# The worklist shows cases the department still has to act on or follow.
OPEN_STATES: tuple[str, ...] = tuple(
    s for s in ReferralState.values if s not in TERMINAL_STATES and s != ReferralState.DRAFT
)


def user_department_ids(user: User) -> frozenset[int]:
    """The departments a user works in, cached on the user object for the request."""
    return user.department_ids()


def _sees_patient_data(user: User) -> bool:
    # Ministry officials work with aggregates only, whatever else they are attached to.
    return user.is_active and not user.has_role(Role.MINISTRY)


def referral_scope_filter(user: User) -> Q | None:
    """The rows a user may see, as a filter without joins (usable with FOR UPDATE);
    None when the user sees no referral at all."""
    if not _sees_patient_data(user):
        return None
    scope = Q()
    if user.facility_id is not None:
        scope |= Q(requester_facility_id=user.facility_id)
    department_ids = user_department_ids(user)
    if department_ids:
        scope |= Q(assigned_department_id__in=department_ids)
    # Beyond the relationships: coordinators' region and explicit guardian grants
    # (invited conference experts); subqueries, still no joins. docs/permissions.md.
    region = referral_region_filter(user)
    if region is not None:
        scope |= region
    return scope | referral_grant_filter(user)


def referral_visible(user: User) -> QuerySet[Referral]:
    scope = referral_scope_filter(user)
    if scope is None:
        return Referral.objects.none()
    return Referral.objects.filter(scope)


def _parse_id(referral_id: Any) -> int:
    try:
        return int(referral_id)
    except (TypeError, ValueError) as exc:
        raise NotFound("No such referral.") from exc


def referral_get_for_user(user: User, referral_id: Any) -> Referral:
    """The ONE way views load a referral (with what the detail page shows)."""
    queryset = (
        referral_visible(user)
        .select_related(
            "requester_facility",
            "requester",
            "specialty",
            "assigned_department__facility",
            "assigned_department__specialty",
            "close_out",
        )
        .prefetch_related(
            Prefetch("events", queryset=ReferralEvent.objects.select_related("actor")),
            "consult_notes",
            "messages",
            "conference_experts",
        )
    )
    try:
        return queryset.get(pk=_parse_id(referral_id))
    except Referral.DoesNotExist as exc:
        raise NotFound("No such referral.") from exc


# What a list row shows (API list serializer, web tables): the referral without its
# clinical question, and the few columns of the joined rows. Loading whole facilities
# (coordinates, languages, timestamps) cost more Python time than the query itself.
_LIST_FIELDS: tuple[str, ...] = (
    *(f.name for f in Referral._meta.concrete_fields if f.name != "clinical_question"),
    "requester_facility__code",
    "requester_facility__name",
    "specialty__system",
    "specialty__code",
    "specialty__display",
    "assigned_department__name",
    "assigned_department__facility__code",
    "assigned_department__facility__name",
)


def _list_queryset(queryset: QuerySet[Referral]) -> QuerySet[Referral]:
    return queryset.select_related(
        "requester_facility", "specialty", "assigned_department__facility"
    ).only(*_LIST_FIELDS)


def referral_outgoing(user: User, *, state: str | None = None) -> QuerySet[Referral]:
    """Referrals sent by the user's facility, newest first."""
    if user.facility_id is None or not _sees_patient_data(user):
        return Referral.objects.none()
    queryset = Referral.objects.filter(requester_facility_id=user.facility_id)
    if state:
        queryset = queryset.filter(state=state)
    return _list_queryset(queryset).order_by("-created_at", "-id")


def referral_worklist(
    user: User, department: Department | int | None = None, *, states: tuple[str, ...] | None = None
) -> QuerySet[Referral]:
    """A department's open referrals: stat > asap > urgent > routine, then deadline.

    Without ``department``: all the user's departments. A department the user does not
    work in is "not found"."""
    if not _sees_patient_data(user):
        raise NotFound("No such department.")
    department_ids = user_department_ids(user)
    if department is not None:
        department_id = department.pk if isinstance(department, Department) else department
        if department_id not in department_ids:
            raise NotFound("No such department.")
        department_ids = frozenset({department_id})
    scope = Q(assigned_department_id__in=department_ids)
    if department is None:
        # Conferences the user is invited to as an expert (guardian grants), same query.
        scope |= referral_grant_filter(user)
    queryset = Referral.objects.filter(scope, state__in=states or OPEN_STATES)
    return _list_queryset(queryset).order_by("priority", "deadline", "id")
