"""Reads of referrals. Every read that crosses a permission boundary goes through the
scope defined here: the requesting facility's staff and the assigned department's staff.
Anything outside one's scope is "not found" (404), never "forbidden", so ids leak nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models import Prefetch, Q, QuerySet
from django.utils import timezone

from accounts.models import User
from accounts.roles import Role
from core.errors import NotFound
from core.rows import QueryRows, SqlRows
from referrals.models import (
    Message,
    Referral,
    ReferralEvent,
    ReferralState,
    ReferralUserObjectPermission,
)
from referrals.permissions import (
    SENT,
    VIEW_REFERRAL,
    data_sharing_links,
    referral_grant_filter,
    referral_region_filter,
)
from referrals.workflow import TERMINAL_STATES
from registry.models import Department, Facility, Specialty, SupportLink

# The worklist shows cases the department still has to act on or follow.
OPEN_STATES: tuple[str, ...] = tuple(
    s for s in ReferralState.values if s not in TERMINAL_STATES and s != ReferralState.DRAFT
)


def sees_patient_data(user: User) -> bool:
    # Ministry officials work with aggregates only, whatever else they are attached to.
    return user.is_active and not user.has_role(Role.MINISTRY)


def referral_scope_filter(user: User) -> Q | None:
    """The rows a user may see, as a filter without joins (usable with FOR UPDATE);
    None when the user sees no referral at all."""
    if not sees_patient_data(user):
        return None
    scope = Q()
    if user.facility_id is not None:
        scope |= Q(requester_facility_id=user.facility_id)
    department_ids = user.department_ids()
    if department_ids:
        scope |= Q(assigned_department_id__in=department_ids) & SENT
    # Beyond the relationships: coordinators' region and explicit guardian grants
    # (invited conference experts); subqueries, still no joins. docs/permissions.md.
    region = referral_region_filter(user)
    if region is not None:
        scope |= region
    return scope | referral_grant_filter(user)


def referral_scope_sql(user: User, alias: str = "r") -> tuple[str, list[Any]]:
    """``referral_scope_filter`` as SQL over ``{alias}`` (a referral row), for the few
    hand-written hot reads (FHIR Task search). Same rules; a test compares both for every
    kind of user. ``FALSE`` when the user sees nothing."""
    if not sees_patient_data(user):
        return "FALSE", []
    parts: list[str] = []
    params: list[Any] = []
    if user.facility_id is not None:
        parts.append(f"{alias}.requester_facility_id = %s")
        params.append(user.facility_id)
    department_ids = sorted(user.department_ids())
    if department_ids:
        parts.append(
            f"({alias}.assigned_department_id IN ({', '.join(['%s'] * len(department_ids))})"
            f" AND {alias}.state <> %s)"
        )
        params += [*department_ids, ReferralState.DRAFT.value]
    if user.facility_id is not None and user.has_role(Role.COORDINATOR):
        # referral_region_filter: facilities (and their departments) in the province of
        # the coordinator's own facility; nothing when that facility has no province.
        province = f"(SELECT province_id FROM {_F} WHERE id = %s AND province_id IS NOT NULL)"  # noqa: S608
        parts.append(
            f"{alias}.requester_facility_id IN (SELECT id FROM {_F} WHERE province_id IN {province})"  # noqa: S608
        )
        parts.append(
            f"({alias}.assigned_department_id IN (SELECT d.id FROM {_D} d JOIN {_F} f "  # noqa: S608
            f"ON f.id = d.facility_id WHERE f.province_id IN {province}) AND {alias}.state <> %s)"
        )
        params += [user.facility_id, user.facility_id, ReferralState.DRAFT.value]
    grants, grant_params = _grants_sql(user, alias)
    parts.append(grants)
    params += grant_params
    return "(" + " OR ".join(parts) + ")", params


def referral_expert_candidates(referral: Referral) -> QuerySet[User]:
    """Who may be invited to a referral's case conference: active consultants working in
    a department of its specialty or of its department's (a case forwarded to another
    specialty, the right desk, invites that specialty's consultants). The web form's
    choices; the ``schedule`` guard. Only where the case's data may go
    (``_data_may_reach``)."""
    specialties = Q(specialty_id=referral.specialty_id)
    if referral.assigned_department_id is not None:
        assigned = Department.objects.filter(pk=referral.assigned_department_id)
        specialties |= Q(specialty_id__in=assigned.values("specialty_id"))
    departments = Department.objects.filter(specialties, _data_may_reach(referral))
    return User.objects.filter(
        departments__in=departments, is_active=True, groups__name=Role.CONSULTANT.value
    ).distinct()


def _data_may_reach(referral: Referral) -> Q:
    """The departments an invited expert may work in, by routing's border rule
    (``referrals.routing``): at home, or abroad at a facility with an active support link
    to the requester that carries a data-sharing agreement, one allowing identifiable data
    when the case carries a patient reference. An expert is granted the whole case, as a
    forward would hand it over: the same rule as the forward guard's. Checked again at
    every read of the case (``permissions.referral_expert_reach_filter``): the grant holds
    only while this rule still lets the data reach the expert."""
    links = data_sharing_links(timezone.localdate()).filter(spoke_id=referral.requester_facility_id)
    if referral.patient_ref:
        links = links.filter(identifiable_data_allowed=True)
    home = Facility.objects.filter(pk=referral.requester_facility_id).values("country_id")
    return Q(facility__country_id__in=home) | Q(facility_id__in=links.values("hub_id"))


def referral_reach_departments(referral: Referral) -> QuerySet[Department]:
    """The departments the case's data may reach now (``_data_may_reach``): an invited
    expert hears of the conference only while working in one (``notifications``), as
    they read it only then (``permissions.referral_expert_reach_filter``)."""
    return Department.objects.filter(_data_may_reach(referral))


def referral_open_question_id(referral: Referral) -> int | None:
    """The message of the last ``request_info``: the question an answer (``provide_info``)
    replies to."""
    found = (
        ReferralEvent.objects.filter(referral=referral, action="request_info")
        .order_by("-seq")
        .values_list("payload__message_id", flat=True)
        .first()
    )
    return int(found) if found is not None else None


def referral_message_by_number(referral: Referral, number: int) -> int | None:
    """The database id of the referral's message with this number (``referrals.numbering``);
    None when it has none."""
    return (
        Message.objects.filter(referral=referral, number=number)
        .values_list("pk", flat=True)
        .first()
    )


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
            Prefetch("messages", queryset=Message.objects.select_related("in_response_to")),
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


# The columns of a list row, in the order ``serializers.referral_list_data`` reads them.
LIST_COLUMNS: tuple[str, ...] = (
    "id",
    "filler_id",
    "placer_system",
    "placer_value",
    "state",
    "version",
    "priority",
    "mode",
    "specialty__system",
    "specialty__code",
    "specialty__display",
    "requester_facility_id",
    "requester_facility__code",
    "requester_facility__name",
    "assigned_department_id",
    "assigned_department__name",
    "assigned_department__facility_id",
    "assigned_department__facility__code",
    "assigned_department__facility__name",
    "deadline",
    "campaign",
    "parent_referral_id",
    "created_at",
)


def _list_queryset(queryset: QuerySet[Referral]) -> QuerySet[Referral]:
    return queryset.select_related(
        "requester_facility", "specialty", "assigned_department__facility"
    ).only(*_LIST_FIELDS)


def referral_outgoing(user: User, *, state: str | None = None) -> QuerySet[Referral]:
    """Referrals sent by the user's facility, newest first."""
    if user.facility_id is None or not sees_patient_data(user):
        return Referral.objects.none()
    queryset = Referral.objects.filter(requester_facility_id=user.facility_id)
    if state:
        queryset = queryset.filter(state=state)
    return _list_queryset(queryset).order_by("-created_at", "-id")


def _worklist_departments(
    user: User, department: Department | int | None
) -> tuple[frozenset[int], bool]:
    """The departments a worklist shows and whether it includes the user's expert grants;
    NotFound for a department the user does not work in (or for ministry users)."""
    if not sees_patient_data(user):
        raise NotFound("No such department.")
    department_ids = user.department_ids()
    if department is None:
        # Conferences the user is invited to as an expert (guardian grants), same query.
        return department_ids, True
    department_id = department.pk if isinstance(department, Department) else department
    if department_id not in department_ids:
        raise NotFound("No such department.")
    return frozenset({department_id}), False


def referral_worklist(
    user: User, department: Department | int | None = None, *, states: tuple[str, ...] | None = None
) -> QuerySet[Referral]:
    """A department's open referrals: stat > asap > urgent > routine, then deadline.

    Without ``department``: all the user's departments. A department the user does not
    work in is "not found"."""
    department_ids, grants = _worklist_departments(user, department)
    scope = Q(assigned_department_id__in=department_ids)
    if grants:
        scope |= referral_grant_filter(user)
    queryset = Referral.objects.filter(scope, state__in=states or OPEN_STATES)
    return _list_queryset(queryset).order_by("priority", "deadline", "id")


# LIST_COLUMNS read by hand: the worklist is the page a consultant reloads all day, and the
# ORM's compilation of this five-table query cost more than running it. Same scope, order
# and columns as ``referral_worklist`` (a test compares both on every kind of row).
_R = Referral._meta.db_table
_WORKLIST_SELECT = f"""
SELECT r.id, r.filler_id, r.placer_system, r.placer_value, r.state, r.version, r.priority,
       r.mode, s.system, s.code, s.display, r.requester_facility_id, rf.code, rf.name,
       r.assigned_department_id, d.name, d.facility_id, df.code, df.name, r.deadline,
       r.campaign, r.parent_referral_id, r.created_at
FROM {_R} r
JOIN {Specialty._meta.db_table} s ON s.id = r.specialty_id
JOIN {Facility._meta.db_table} rf ON rf.id = r.requester_facility_id
LEFT JOIN {Department._meta.db_table} d ON d.id = r.assigned_department_id
LEFT JOIN {Facility._meta.db_table} df ON df.id = d.facility_id
"""  # noqa: S608 - table names only
_F = Facility._meta.db_table
_D = Department._meta.db_table
_L = SupportLink._meta.db_table
_GRANTS = (
    f"r.id IN (SELECT g.content_object_id FROM {ReferralUserObjectPermission._meta.db_table} g "  # noqa: S608
    f"JOIN {Permission._meta.db_table} p ON p.id = g.permission_id "
    "WHERE g.user_id = %s AND p.codename = %s)"
)


def _grants_sql(user: User, alias: str = "r") -> tuple[str, list[Any]]:
    """``permissions.referral_grant_filter`` as SQL over ``{alias}``: the user's grants,
    while the case's data may still reach them (``referral_expert_reach_filter``). Same
    rule; the scope test compares both."""
    department_ids = sorted(user.department_ids())
    if not department_ids:
        return "FALSE", []
    marks = ", ".join(["%s"] * len(department_ids))
    facilities = f"SELECT facility_id FROM {_D} WHERE id IN ({marks})"  # noqa: S608
    today = connection.ops.adapt_datefield_value(timezone.localdate())
    links = (
        f"SELECT l.spoke_id FROM {_L} l WHERE l.active AND l.valid_from <= %s "  # noqa: S608
        f"AND (l.valid_to IS NULL OR l.valid_to >= %s) AND l.agreement_reference <> '' "
        f"AND l.hub_id IN ({facilities})"
    )
    links_params = [today, today, *department_ids]
    requester = f"{alias}.requester_facility_id"
    sql = (
        f"({_GRANTS.replace('r.id', f'{alias}.id', 1)} AND ("  # noqa: S608 (names, bound values)
        f"{requester} IN (SELECT id FROM {_F} WHERE country_id IN "
        f"(SELECT country_id FROM {_F} WHERE id IN ({facilities})))"
        f" OR ({requester} IN ({links}) AND ({alias}.patient_ref = '' OR "
        f"{requester} IN ({links} AND l.identifiable_data_allowed)))))"
    )
    params = [user.pk, VIEW_REFERRAL, *department_ids, *links_params, *links_params]
    return sql, params


def referral_worklist_rows(
    user: User, department: Department | int | None = None, *, states: tuple[str, ...] | None = None
) -> QueryRows | SqlRows:
    """``referral_worklist`` as list rows (``LIST_COLUMNS``), for the API."""
    department_ids, grants = _worklist_departments(user, department)
    wanted = states or OPEN_STATES
    if connection.vendor != "postgresql":
        return QueryRows(referral_worklist(user, department, states=states), LIST_COLUMNS)
    parts: list[str] = []
    params: list[Any] = []
    if department_ids:
        parts.append(f"r.assigned_department_id IN ({', '.join(['%s'] * len(department_ids))})")
        params += sorted(department_ids)
    if grants:
        grant_sql, grant_params = _grants_sql(user)
        parts.append(grant_sql)
        params += grant_params
    if not parts:
        parts.append("FALSE")
    # The states as literals (enum values, checked), not parameters: also in a prepared
    # statement's generic plan the planner then proves the partial index
    # ``referral_open_worklist`` applies.
    if not set(wanted) <= set(ReferralState.values):
        raise ValueError(f"unknown states: {sorted(set(wanted) - set(ReferralState.values))}")
    literals = ", ".join(f"'{state}'" for state in sorted(wanted))
    where = f"({' OR '.join(parts)}) AND r.state IN ({literals})"
    return SqlRows(
        count_sql=f"SELECT COUNT(*) FROM {_R} r WHERE {where}",  # noqa: S608
        page_sql=f"{_WORKLIST_SELECT} WHERE {where} ORDER BY r.priority, r.deadline, r.id",
        params=params,
    )


def referral_outgoing_rows(user: User, *, state: str | None = None) -> QueryRows:
    """``referral_outgoing`` as list rows (``LIST_COLUMNS``), for the API."""
    return QueryRows(referral_outgoing(user, state=state), LIST_COLUMNS)


# A web intake that repeats one of the user's own within this many minutes is held back for
# a confirmation (the back button re-renders the form with a new submission id).
DUPLICATE_WINDOW_MINUTES = 30


def referral_recent_duplicate(
    user: User,
    *,
    specialty_id: int,
    clinical_question: str,
    patient_ref: str,
    now: datetime | None = None,
) -> Referral | None:
    """The user's own referral of the last ``DUPLICATE_WINDOW_MINUTES`` with the same
    specialty, clinical question and patient reference, if any (newest first)."""
    since = (now or timezone.now()) - timedelta(minutes=DUPLICATE_WINDOW_MINUTES)
    return (
        Referral.objects.filter(
            requester=user,
            requester_facility_id=user.facility_id,
            specialty_id=specialty_id,
            clinical_question=clinical_question,
            patient_ref=patient_ref,
            created_at__gte=since,
        )
        .order_by("-created_at", "-id")
        .first()
    )


def message_recent_duplicate(
    user: User, *, referral_id: int, text: str, client_key: str, now: datetime | None = None
) -> Message | None:
    """The referral's latest message, when it is the user's own of the last
    ``DUPLICATE_WINDOW_MINUTES`` with the same text under another form key: the same
    message sent again from a page the back button showed again (a new key, the browser's
    restored text). A double click (the same key) is the service's "already sent"."""
    latest = Message.objects.filter(referral_id=referral_id).order_by("-number", "-id").first()
    since = (now or timezone.now()) - timedelta(minutes=DUPLICATE_WINDOW_MINUTES)
    if (
        latest is None
        or latest.author_id != user.pk
        or latest.text != text.strip()
        or latest.created_at < since
        or (client_key and latest.client_key == client_key)
    ):
        return None
    return latest


def referral_resubmission_differences(
    referral: Referral,
    *,
    clinical_question: str,
    priority: int,
    mode: str,
    specialty_id: int | None,
    patient_ref: str = "",
) -> list[str]:
    """What a resubmission (the placer identifier of an existing referral: idempotent
    intake answers that referral, decision 5) says otherwise than the referral: the
    field names, in this order. None of it was applied; the caller tells its sender."""
    differs = []
    if clinical_question.strip() != referral.clinical_question.strip():
        differs.append("clinical_question")
    if priority != referral.priority:
        differs.append("priority")
    if mode != referral.mode:
        differs.append("mode")
    if patient_ref and patient_ref != referral.patient_ref:
        differs.append("patient")
    if specialty_id != referral.specialty_id:
        differs.append("specialty")
    return differs
