"""The referral resources under /fhir: ServiceRequest, Task, Patient, Communication,
DocumentReference, and transaction Bundles at POST /fhir.

Writes parse the member's resource (``referral_mapping``), call the referral services
(which project the new FHIR versions and the outbox messages in their transaction through
``publish``) and answer the stored version. Reads and searches answer stored JSON; the
scope is the referral scope (``referrals.selectors.referral_visible``) joined through
``FhirResource.source_pk`` = referral id, so a member sees only referrals its facility is
party to; anything else is 404.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import DEFAULT_DB_ALIAS, connection, transaction
from django.db.models import (
    Case,
    CharField,
    Exists,
    IntegerField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.functions import Cast, Concat

from core.atomic import atomic_in_unit
from core.errors import ApplicationError, Conflict
from core.memo import memoized
from core.rows import fetch_models
from core.values import digits_int
from fhir_gateway import handlers
from fhir_gateway import referral_mapping as m
from fhir_gateway.handlers import ResourceHandler, SearchParam, WriteRequest
from fhir_gateway.models import AppliedUpdate, FhirResource
from fhir_gateway.outcomes import FhirError
from fhir_gateway.patching import same_json
from fhir_gateway.publish import case_file_described, stored_versions
from fhir_gateway.registry_projection import FACILITY_CODE_SYSTEM
from fhir_gateway.registry_resources import reference_pk
from fhir_gateway.storage import (
    WriteResult,
    _lock,
    clean_identifiers,
    conditional_create,
    create_key,
    current_rows,
    dumps,
    fhir_instant,
    identify_new_resource,
    parse_if_match,
    parse_token,
    pruned,
    record_create_keys,
    resource_current,
    resource_version,
    split_escaped,
    token_matches,
    validate_resource,
)
from referrals.attachments import UPLOAD_ROLES
from referrals.models import (
    ActorSide,
    Attachment,
    ConsultNote,
    Message,
    Referral,
    ReferralEvent,
    ReferralState,
)
from referrals.numbering import last_number, lock_referral
from referrals.selectors import (
    referral_message_by_number,
    referral_open_question_id,
    referral_resubmission_differences,
    referral_scope_sql,
    referral_visible,
)
from referrals.services import (
    COUNTER_REFERRAL_SYSTEM,
    actor_sides,
    referral_message_post,
    referral_submit,
    referral_transition,
)
from referrals.workflow import transition_for
from registry.models import Department, Specialty
from registry.selectors import facility_ids_by_identifier

if TYPE_CHECKING:
    from accounts.models import User

_NOTHING = Q(pk__in=[])
_DATE_PREFIXES = {"eq", "gt", "lt", "ge", "le"}


# --------------------------------------------------------------------------- scope


def _visible_referrals(user: User) -> QuerySet[Referral]:
    return referral_visible(user)


def _scoped(resource_type: str, user: User, referrals: QuerySet[Referral] | None = None) -> Any:
    rows = current_rows(resource_type)
    source = referrals if referrals is not None else _visible_referrals(user)
    return rows.filter(source_pk__in=source.values("pk"))


def _visible(resource_type: str) -> Callable[[User], QuerySet[FhirResource]]:
    def visible(user: User) -> QuerySet[FhirResource]:
        return FhirResource.objects.filter(
            resource_type=resource_type, source_pk__in=_visible_referrals(user).values("pk")
        )

    return visible


def _referral_by_filler(user: User, logical_id: str) -> Referral:
    referral = (
        _visible_referrals(user)
        .select_related("assigned_department", "requester_facility")
        .filter(filler_id=logical_id)
        .first()
    )
    if referral is None:
        raise FhirError(404, "not-found", f"Referral {logical_id} is not known.")
    return referral


# --------------------------------------------------------------------------- search


def _alternatives(raw: str) -> list[str]:
    return [v for v in split_escaped(raw, ",") if v]


def _any(raw: str, one: Callable[[str], Q]) -> Q:
    condition = _NOTHING
    for value in _alternatives(raw):
        condition |= one(value)
    return condition


@dataclass(frozen=True)
class In:
    """A search condition that is "one referral column IN values": the ORM filter
    (``q``) and the hand-written search's SQL (``sql``) come from the same parse."""

    column: str
    values: tuple[Any, ...]

    def q(self) -> Q:
        return Q(**{f"{self.column}__in": self.values}) if self.values else _NOTHING

    def sql(self, alias: str) -> tuple[str, list[Any]]:
        if not self.values:
            return "FALSE", []
        return f"{alias}.{self.column} IN ({', '.join(['%s'] * len(self.values))})", list(
            self.values
        )


@dataclass(frozen=True)
class NotIn(In):
    """``:not``: none of ``inner``'s values (a referral with no value too: SQL's unknown,
    a NULL column, counts as no match)."""

    inner: In | None = None

    def q(self) -> Q:
        assert self.inner is not None
        return ~self.inner.q()

    def sql(self, alias: str) -> tuple[str, list[Any]]:
        assert self.inner is not None
        text, values = self.inner.sql(alias)
        return f"NOT COALESCE(({text}), FALSE)", values


@dataclass(frozen=True)
class IsNull(In):
    """``:missing``: the column is NULL (true) or is not (false); ``values`` holds the
    answers asked for (``missing=true,false``: either)."""

    def q(self) -> Q:
        condition = _NOTHING
        for missing in self.values:
            condition |= Q(**{f"{self.column}__isnull": missing})
        return condition

    def sql(self, alias: str) -> tuple[str, list[Any]]:
        if not self.values:
            return "FALSE", []
        tests = [f"{alias}.{self.column} IS {'' if v else 'NOT '}NULL" for v in self.values]
        return "(" + " OR ".join(tests) + ")", []


def _negated(build: Callable[[str], In]) -> Callable[[str], In]:
    def negated(raw: str) -> In:
        return NotIn("", (), build(raw))

    return negated


def _missing(column: str) -> Callable[[str], In]:
    def build(raw: str) -> In:  # "true" / "false" (checked by the view), commas: OR
        return IsNull(column, tuple(dict.fromkeys(v == "true" for v in _alternatives(raw))))

    return build


def _any_in(column: str, raw: str, one: Callable[[str], list[Any]]) -> In:
    values: list[Any] = []
    for value in _alternatives(raw):
        values += [v for v in one(value) if v not in values]
    return In(column, tuple(values))


def _ref_id(value: str, resource_type: str) -> str | None:
    kind, logical_id = m.split_reference(value)
    if kind and kind != resource_type:
        return None
    return logical_id


def _by_pk(field: str, resource_type: str) -> Callable[[str], In]:
    def build(raw: str) -> In:
        def one(value: str) -> list[Any]:
            pk = reference_pk(value, resource_type)
            return [pk] if pk is not None else []

        return _any_in(field, raw, one)

    return build


def _by_filler(resource_type: str) -> Callable[[str], In]:
    def build(raw: str) -> In:
        def one(value: str) -> list[Any]:
            logical_id = _ref_id(value, resource_type)
            return [logical_id] if logical_id else []

        return _any_in("filler_id", raw, one)

    return build


@dataclass(frozen=True)
class TaskStatusIn(In):
    """Task.status IN codes: the referral states, where ``submitted`` is ``requested``
    until its department acknowledges it and ``received`` after (``acknowledged``: which
    one is asked for; None, both or neither)."""

    acknowledged: bool | None = None

    @property
    def _others(self) -> list[Any]:
        return [v for v in self.values if v != ReferralState.SUBMITTED]

    def q(self) -> Q:
        if self.acknowledged is None:
            return super().q()
        others = self._others
        submitted = Q(state=ReferralState.SUBMITTED, acknowledged_at__isnull=not self.acknowledged)
        return (Q(state__in=others) | submitted) if others else submitted

    def sql(self, alias: str) -> tuple[str, list[Any]]:
        if self.acknowledged is None:
            return super().sql(alias)
        others = self._others
        null = "IS NOT NULL" if self.acknowledged else "IS NULL"
        text = f"({alias}.state = %s AND {alias}.acknowledged_at {null})"
        if others:
            text = f"({alias}.state IN ({', '.join(['%s'] * len(others))}) OR {text})"
        return text, [*others, ReferralState.SUBMITTED.value]


# The code systems of Task.status and ServiceRequest.status (FHIR ``code`` elements: a
# token search may name the system their value set binds).
TASK_STATUS_SYSTEM = "http://hl7.org/fhir/task-status"
REQUEST_STATUS_SYSTEM = "http://hl7.org/fhir/request-status"
_TASK_STATUS_CODES = tuple(dict.fromkeys([*m.TASK_STATUS.values(), "received"]))
_REQUEST_STATUS_CODES = tuple(
    dict.fromkeys(m.service_request_status(s) for s in ReferralState.values)
)
_BSER_CODES = tuple(dict.fromkeys(c for c, _d in m.BSER_CODES.values()))


def _token_codes(value: str, system: str, every: tuple[str, ...]) -> list[str]:
    """The codes one token search value names in ``system``: ``code`` (any system),
    ``system|code``, ``system|`` (every code); another system, or ``|code`` (no system:
    ours always have one), names none."""
    token_system, code = parse_token(value)
    if token_system is not None and token_system != system:
        return []
    return list(every) if code == "" else [code]


def _task_status(raw: str) -> In:
    codes = [
        code
        for value in _alternatives(raw)
        for code in _token_codes(value, TASK_STATUS_SYSTEM, _TASK_STATUS_CODES)
    ]
    states = In("state", tuple(dict.fromkeys(s for c in codes for s in m.task_statuses_for(c))))
    if ("received" in codes) == ("requested" in codes):  # both, or neither: the state says
        return states
    return TaskStatusIn("state", states.values, acknowledged="received" in codes)


def _service_request_status(raw: str) -> In:
    def one(value: str) -> list[Any]:
        codes = _token_codes(value, REQUEST_STATUS_SYSTEM, _REQUEST_STATUS_CODES)
        return [s for s in ReferralState.values if m.service_request_status(s) in codes]

    return _any_in("state", raw, one)


def _business_status(raw: str) -> In:
    """Task.businessStatus carries our state (REFERRAL_STATE_SYSTEM) and, where one
    fits, BSeR's code: either names the states."""

    def one(value: str) -> list[Any]:
        states = [
            code
            for code in _token_codes(value, m.REFERRAL_STATE_SYSTEM, tuple(ReferralState.values))
            if code in ReferralState.values
        ]
        for code in _token_codes(value, m.BSER_BUSINESS_STATUS, _BSER_CODES):
            states += [s for s, (c, _d) in m.BSER_CODES.items() if c == code]
        return states

    return _any_in("state", raw, one)


def _identifier(raw: str) -> Q:
    def one(value: str) -> Q:
        system, code = parse_token(value)
        if code == "":  # "system|": every identifier of that system
            return ~_NOTHING if system == m.FILLER_SYSTEM else Q(placer_system=system)
        filler = Q(filler_id=code) if system in (None, m.FILLER_SYSTEM) else _NOTHING
        placer = Q(placer_value=code)
        if system is not None:
            placer &= Q(placer_system=system)
        return filler | placer

    return _any(raw, one)


def _authored_on(raw: str) -> Q:
    from fhir_gateway.views import date_condition

    return date_condition("created_at", raw, "authored-on")


@dataclass(frozen=True)
class Own:
    """A search condition on the resource itself rather than on its referral (the
    identifiers a member gave its Communication or DocumentReference): the ORM path only."""

    q: Q


def _own_identifier(resource_type: str) -> Callable[[str], Own]:
    def build(raw: str) -> Own:
        return Own(Q(pk__in=token_matches(resource_type, "identifier", raw).values("resource_id")))

    return build


Filter = Callable[[str], "Q | In | Own"]


def _own_negated(build: Callable[[str], Own]) -> Callable[[str], Own]:
    return lambda raw: Own(~build(raw).q)


def _negated_q(build: Callable[[str], Q]) -> Callable[[str], Q]:
    return lambda raw: ~build(raw)


# Filters by search parameter name, and by "name:modifier" for the modifiers a parameter
# declares (``SearchParam.modifiers``; the view refuses the others).
TASK_FILTERS: dict[str, Filter] = {
    "owner": _by_pk("assigned_department_id", "HealthcareService"),
    "owner:missing": _missing("assigned_department_id"),  # true: not routed yet
    "requester": _by_pk("requester_facility_id", "Organization"),
    "status": _task_status,
    "status:not": _negated(_task_status),
    "business-status": _business_status,
    "business-status:not": _negated(_business_status),
    "focus": _by_filler("ServiceRequest"),
    "patient": _by_filler("Patient"),
    "authored-on": _authored_on,
    "identifier": _identifier,
    "identifier:not": _negated_q(_identifier),
}
SERVICE_REQUEST_FILTERS: dict[str, Filter] = {
    "requester": _by_pk("requester_facility_id", "Organization"),
    "performer": _by_pk("assigned_department_id", "HealthcareService"),
    "performer:missing": _missing("assigned_department_id"),
    "status": _service_request_status,
    "status:not": _negated(_service_request_status),
    "identifier": _identifier,
    "identifier:not": _negated_q(_identifier),
    "patient": _by_filler("Patient"),
}
COMMUNICATION_FILTERS: dict[str, Filter] = {
    "part-of": _by_filler("Task"),
    "identifier": _own_identifier("Communication"),
    "identifier:not": _own_negated(_own_identifier("Communication")),
}


def _document_type(raw: str) -> Own:
    """DocumentReference.type: a consult note's is LOINC 11488-4 (its id carries
    ``NOTE_SEPARATOR``); a case file's is the one its member sent, if any (indexed when it
    was stored: ``_case_file_kinds``)."""
    codes = [
        code
        for value in _alternatives(raw)
        for code in _token_codes(value, m.LOINC, (m.CONSULT_NOTE_CODE,))
    ]
    note = m.CONSULT_NOTE_CODE in codes
    typed = Q(pk__in=token_matches("DocumentReference", "type", raw).values("resource_id"))
    return Own(Q(logical_id__contains=m.NOTE_SEPARATOR) | typed if note else typed)


def _document_id(separator: str) -> Concat:
    """The DocumentReference id of a consult note / case file row (``m.note_id``,
    ``m.case_file_id``), in SQL."""
    return Concat(
        "referral__filler_id",
        Value(separator),
        Cast("number", CharField()),
        output_field=CharField(),
    )


def _document_date(raw: str) -> Own:
    """DocumentReference.date: when the consult note was written (``ConsultNote.created_at``)
    or the case file stored (``Attachment.created``), as the resource renders it."""
    from fhir_gateway.views import date_condition

    def of(rows: QuerySet[Any], field: str, separator: str) -> Exists:
        return Exists(
            rows.filter(date_condition(field, raw, "date"), referral_id=OuterRef("source_pk"))
            .annotate(document_id=_document_id(separator))
            .filter(document_id=OuterRef("logical_id"))
        )

    return Own(
        Q(of(ConsultNote.objects.all(), "created_at", m.NOTE_SEPARATOR))
        | Q(of(Attachment.objects.all(), "created", m.CASE_FILE_SEPARATOR))
    )


DOCUMENT_REFERENCE_FILTERS: dict[str, Filter] = {
    "identifier": _own_identifier("DocumentReference"),
    "identifier:not": _own_negated(_own_identifier("DocumentReference")),
    "type": _document_type,
    "type:not": _own_negated(_document_type),
    "date": _document_date,
    # The referral's order: R4 context.related (search "related"), R5 basedOn ("based-on").
    "related": _by_filler("ServiceRequest"),
    "based-on": _by_filler("ServiceRequest"),
}


def _conditions(filters: dict[str, Filter], params: dict[str, list[str]]) -> list[Q | In | Own]:
    out: list[Q | In | Own] = []
    for name, values in params.items():
        for raw in values:
            if "\x00" in raw:
                raise FhirError(400, "invalid", f"{name} contains a NUL character.")
            out.append(filters[name](raw))
    return out


def _search(resource_type: str, filters: dict[str, Filter]) -> handlers.SearchFunc:
    def search(user: User, params: dict[str, list[str]]) -> QuerySet[FhirResource]:
        referrals = _visible_referrals(user)
        own: list[Q] = []
        for condition in _conditions(filters, params):
            if isinstance(condition, Own):
                own.append(condition.q)
            else:
                referrals = referrals.filter(
                    condition.q() if isinstance(condition, In) else condition
                )
        rows = _scoped(resource_type, user, referrals)
        for q in own:
            rows = rows.filter(q)
        return rows

    return search


_FR = FhirResource._meta.db_table
_RR = Referral._meta.db_table


def _search_sql(resource_type: str, filters: dict[str, Filter]) -> handlers.SearchSqlFunc:
    """``_search`` by hand, for the searches a member's worklist polls all day: the
    FROM/WHERE over current resources ``f`` joined to their referral ``r``, or None when a
    parameter is not a plain column condition (the ORM path answers those). Same scope
    (``referral_scope_sql``) and conditions (``In``); a test compares both paths."""

    def search_sql(user: User, params: dict[str, list[str]]) -> tuple[str, list[Any]] | None:
        conditions = _conditions(filters, params)
        if not all(isinstance(c, In) for c in conditions):
            return None
        scope, values = referral_scope_sql(user, "r")
        parts = [
            f"f.resource_type = '{resource_type}'",
            "f.is_current",
            "NOT f.deleted",
            scope,
        ]
        for condition in conditions:
            assert isinstance(condition, In)
            text, more = condition.sql("r")
            parts.append(text)
            values += more
        body = f"FROM {_FR} f JOIN {_RR} r ON r.id = f.source_pk WHERE " + " AND ".join(parts)
        return body, values

    return search_sql


def _referral_column(name: str) -> Subquery:
    """A column of the referral a resource projects (``source_pk``), for ``_sort``."""
    return Subquery(Referral.objects.filter(pk=OuterRef("source_pk")).values(name)[:1])


def _status_codes(resource_type: str) -> tuple[dict[str, str], str | None]:
    """The status code each referral state renders as (Task: ``TASK_STATUS``, a submitted
    referral its department acknowledged being ``received``; ServiceRequest:
    ``service_request_status``), and the code of an acknowledged submitted Task."""
    if resource_type == "Task":
        return dict(m.TASK_STATUS), "received"
    return {s: m.service_request_status(s) for s in ReferralState.values}, None


def _status_sort(resource_type: str) -> Subquery:
    """``_sort=status``: by the status code as rendered, as text (FHIR sorts a token by its
    code): Task accepted, cancelled, completed, draft, failed, in-progress, on-hold,
    received, rejected, requested."""
    codes, acknowledged = _status_codes(resource_type)
    whens = [When(state=state, then=Value(code)) for state, code in codes.items()]
    if acknowledged is not None:
        whens.insert(
            0,
            When(
                state=ReferralState.SUBMITTED,
                acknowledged_at__isnull=False,
                then=Value(acknowledged),
            ),
        )
    code = Case(*whens, output_field=CharField())
    rows = Referral.objects.filter(pk=OuterRef("source_pk")).annotate(status_code=code)
    return Subquery(rows.values("status_code")[:1])


def _status_sort_sql(resource_type: str) -> str:
    """``_status_sort`` over the hand-written search's referral ``r``; the codes are ours
    (no quotes in them), written as literals so the statement stays one prepared text."""
    codes, acknowledged = _status_codes(resource_type)
    whens = [f"WHEN r.state = '{state}' THEN '{code}'" for state, code in codes.items()]
    if acknowledged is not None:
        whens.insert(
            0,
            f"WHEN r.state = '{ReferralState.SUBMITTED.value}' "
            f"AND r.acknowledged_at IS NOT NULL THEN '{acknowledged}'",
        )
    assert all("'" not in v for v in [*codes, *codes.values()])
    return "(CASE " + " ".join(whens) + " END)"


# ``_sort=business-status`` (Task): by our state's code, the first coding of
# Task.businessStatus (FHIR sorts a token by its code), in code-point order whatever the
# database's collation (``in_conference`` before ``info_requested``): each state's rank
# among the codes sorted. The codes are ours, written as literals in the SQL.
_STATE_RANKS: dict[str, int] = {
    state: rank for rank, state in enumerate(sorted(ReferralState.values))
}


def _business_status_sort() -> Subquery:
    rank = Case(
        *[When(state=state, then=Value(n)) for state, n in _STATE_RANKS.items()],
        output_field=IntegerField(),
    )
    rows = Referral.objects.filter(pk=OuterRef("source_pk")).annotate(state_rank=rank)
    return Subquery(rows.values("state_rank")[:1])


def _business_status_sort_sql() -> str:
    assert all(state.isidentifier() for state in _STATE_RANKS)  # no quotes to escape
    whens = " ".join(f"WHEN '{state}' THEN {n}" for state, n in _STATE_RANKS.items())
    return f"(CASE r.state {whens} END)"


# ``_sort`` keys of the referral types, named as their search parameters (Task
# ``authored-on``, ServiceRequest ``authored``): when it was authored, its urgency (the
# request-priority codes in clinical order: stat, asap, urgent, routine), its status, and
# (Task) its business status.
def _referral_sorts(resource_type: str, authored: str) -> dict[str, Any]:
    sorts = {
        authored: _referral_column("created_at"),
        "priority": _referral_column("priority"),
        "status": _status_sort(resource_type),
    }
    if resource_type == "Task":
        sorts["business-status"] = _business_status_sort()
    return sorts


# The same over the hand-written search's referral ``r`` (``_search_sql``).
def _referral_sorts_sql(resource_type: str, authored: str) -> dict[str, str]:
    sorts = {
        authored: "r.created_at",
        "priority": "r.priority",
        "status": _status_sort_sql(resource_type),
    }
    if resource_type == "Task":
        sorts["business-status"] = _business_status_sort_sql()
    return sorts


def _same_referral(resource_type: str) -> handlers.IncludeFunc:
    """``_include`` / ``_revinclude`` between a referral's ServiceRequest, Task and Patient:
    the three share the referral's filler id as logical id (in the caller's scope)."""

    def rows(user: User, logical_ids: list[str]) -> QuerySet[FhirResource]:
        return _scoped(resource_type, user).filter(logical_id__in=logical_ids)

    return rows


def _revinclude_communications(user: User, task_ids: list[str]) -> QuerySet[FhirResource]:
    """``Task?_revinclude=Communication:part-of``: the messages of the page's referrals."""
    referrals = _visible_referrals(user).filter(filler_id__in=task_ids)
    return _scoped("Communication", user, referrals)


# --------------------------------------------------------------------------- intake


def _caller_facility(user: User) -> int:
    if user.facility_id is None:
        raise FhirError(403, "forbidden", "Your account belongs to no facility.")
    return int(user.facility_id)


# Reference.type values that name a person of the sender, not a facility: such a requester
# is accepted and not kept (the requesting facility is the caller's).
_PERSON_TYPES = frozenset({"Practitioner", "PractitionerRole", "Patient", "RelatedPerson"})
# What else a literal requester reference may name: a device of the sender (FHIR allows
# one as requester / sender), accepted and not kept as a person is.
_SENDER_TYPES = _PERSON_TYPES | {"Device"}


def _check_requester(
    user: User,
    resource: dict[str, Any],
    where: str,
    element: str = "requester",
    entry_types: dict[str, str] | None = None,
    *,
    base: str,
) -> None:
    """The requesting facility is the caller's own: a requester (or ``element``: a
    Communication's sender) that names another one is
    refused (403), however it names it: ``Organization/<id>`` (relative, absolute,
    versioned), a logical ``identifier`` (our facility code or one of the facility's
    identifiers), a conditional reference ``Organization?identifier=<system>|<value>``, or
    a contained Organization with such an identifier; ``Organization/<id>`` with an
    identifier beside it, by either. An Organization it names by none of these, or by an
    identifier we cannot tie to one facility, is 422: we cannot check it; so is a literal
    reference to anything but an Organization or a person or device of the sender (a
    Location, a HealthcareService, a malformed path). Ids are strings: ``Organization/07``
    is not ``Organization/7``. A person of the sender (Practitioner, PractitionerRole) is
    accepted and not kept. ``entry_types``: a transaction's entries by ``fullUrl`` (a
    ``urn:uuid:`` reference names an entry of that type: the Bundle's Patient is a person).
    An ``Organization/<id>`` on another server than ``base`` is no facility of ours: 422
    (``m.own_reference``; it was read as ours); a person of the sender may be on its own
    server."""
    value = resource.get(element)
    if not isinstance(value, dict):
        return
    own = _caller_facility(user)
    reference = m.reference_of(value)
    declared = str(value.get("type") or "")
    if reference.startswith("#"):  # a contained resource
        contained = _contained(resource, reference)
        kind = str((contained or {}).get("resourceType") or declared)
        if kind in _PERSON_TYPES:
            return
        identifiers = (contained or {}).get("identifier") or []
        _check_requester_identifiers(own, identifiers, where, "a contained Organization")
        return
    if "?" in reference:  # a conditional reference: Organization?identifier=...
        kind, query = _conditional(reference)
        if kind in _PERSON_TYPES:
            return
        names = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "identifier"]
        if kind != "Organization" or len(names) != 1:
            raise FhirError(
                422,
                "business-rule",
                f"{where}: a conditional reference must be Organization?identifier=<system>|"
                "<value>, naming your facility.",
                expression=[where],
            )
        system, _, code = names[0].rpartition("|")
        _check_requester_identifiers(
            own, [{"system": system, "value": code}], where, "the conditional reference"
        )
        return
    if reference:
        kind, logical_id = m.split_reference(reference)
        if entry_types and reference in entry_types:  # a Bundle entry: its type (review)
            kind = entry_types[reference]
        elif kind not in _SENDER_TYPES:  # an absolute URL: ours only under our base, else 422
            kind, logical_id = m.split_reference(m.own_reference(reference, base, where))
        if kind in _SENDER_TYPES:
            return
        if kind != "Organization":
            # Anything else (a Location, a HealthcareService, a malformed path) passed
            # unchecked, though it could name another facility (review).
            raise FhirError(
                422,
                "business-rule",
                f"{where} {reference[:100]!r} names no Organization we can check: name your "
                f"facility as Organization/{own} (or a person of yours).",
                expression=[where],
            )
        if logical_id != str(own):  # ids are strings: Organization/07 is not Organization/7
            raise FhirError(
                403,
                "forbidden",
                f"{where} names Organization/{logical_id}; you may only request for your own "
                f"facility (Organization/{own}).",
                expression=[where],
            )
        identifier = value.get("identifier")
        if isinstance(identifier, dict) and identifier.get("value"):
            # Beside the reference, an identifier tied to another facility contradicts it
            # (it passed); one we cannot tie to a facility is the sender's own affair.
            system, code = str(identifier.get("system") or ""), str(identifier["value"])
            ids = facility_ids_by_identifier(system, code, code_system=FACILITY_CODE_SYSTEM)
            if len(ids) == 1 and ids[0] != own:
                raise FhirError(
                    403,
                    "forbidden",
                    f"{where}: its identifier names Organization/{ids[0]}; you may only "
                    f"request for your own facility (Organization/{own}).",
                    expression=[where],
                )
        return
    if declared in _PERSON_TYPES:
        return
    identifier = value.get("identifier")
    if isinstance(identifier, dict):
        _check_requester_identifiers(own, [identifier], where, "its identifier")


def _contained(resource: dict[str, Any], reference: str) -> dict[str, Any] | None:
    """The contained resource a ``#id`` reference names, if any."""
    return next(
        (
            c
            for c in resource.get("contained") or []
            if isinstance(c, dict) and f"#{c.get('id')}" == reference
        ),
        None,
    )


def _conditional(reference: str) -> tuple[str, str]:
    """A conditional reference ``[base/]Type?query``: (its type, its query)."""
    path, _, query = reference.partition("?")
    return path.rstrip("/").rpartition("/")[2], query


def _names_organization(resource: dict[str, Any], element: str) -> bool:
    """Whether ``element`` names an Organization for sure (its ``type``, a literal or
    conditional ``Organization`` reference, a contained Organization). A sender named by
    an identifier alone is most often a person (a staff number): not judged as a facility."""
    value = resource.get(element)
    if not isinstance(value, dict):
        return False
    if value.get("type") == "Organization":
        return True
    reference = m.reference_of(value)
    if reference.startswith("#"):
        kind = str((_contained(resource, reference) or {}).get("resourceType") or "")
    elif "?" in reference:
        kind = _conditional(reference)[0]
    else:
        kind = m.split_reference(reference)[0] if reference else ""
    return kind == "Organization"


def _check_subject(
    referral: Referral,
    resource: dict[str, Any],
    where: str,
    *,
    base: str,
    element: str = "subject",
) -> None:
    """A message or document about a referral is about its patient: a ``subject`` that
    references another Patient (or anything but a Patient) is 422, nothing stored — it
    was filed on the referral and its subject silently rewritten, so a note written for
    one child could end up on another's case. A subject without a reference (identifier
    or display only) is not checked: it is replaced by the referral's patient.
    ``element``: a transaction's Task names its patient in ``for``."""
    value = resource.get(element)
    reference = m.reference_of(value)
    if not reference:
        return
    kind, logical_id = m.split_reference(m.own_reference(reference, base, where))
    expected = m.patient_id(referral)
    if kind != "Patient" or logical_id != expected:
        raise FhirError(
            422,
            "business-rule",
            f"{where} {reference[:100]} is not the patient of the referral it is filed on "
            f"(Patient/{expected}); send it on that patient's referral, or leave {where} out.",
            expression=[where],
        )


def _check_requester_identifiers(own: int, identifiers: Any, where: str, how: str) -> None:
    """Each identifier must name the caller's facility (and at least one must name it)."""
    found: set[int] = set()
    for identifier in identifiers if isinstance(identifiers, list) else []:
        if not isinstance(identifier, dict) or not identifier.get("value"):
            continue
        system, code = str(identifier.get("system") or ""), str(identifier["value"])
        ids = facility_ids_by_identifier(system, code, code_system=FACILITY_CODE_SYSTEM)
        if len(ids) != 1:
            raise FhirError(
                422,
                "business-rule",
                f"{where}: {how} ({system}|{code}) names "
                f"{'no facility we know' if not ids else 'several facilities'}; name your "
                f"facility as Organization/{own}.",
                expression=[where],
            )
        found.add(ids[0])
    if not found:
        raise FhirError(
            422,
            "business-rule",
            f"{where}: {how} has no identifier to check; name your facility as Organization/{own}.",
            expression=[where],
        )
    if found != {own}:
        other = sorted(found - {own})[0]
        raise FhirError(
            403,
            "forbidden",
            f"{where}: {how} names Organization/{other}; you may only request for your own "
            f"facility (Organization/{own}).",
            expression=[where],
        )


def _subject_into_intake(user: User, subject: Any, intake: m.Intake) -> None:
    """Who a referral is for, when ``ServiceRequest.subject`` names no Patient entry of a
    transaction (those are read from the entry):

    - a logical reference (``identifier``, type Patient or none): kept as the patient
      reference, as a Patient entry's identifier is;
    - an absolute URL of a Patient (on the sender's server): kept as the patient reference,
      which the sender resolves;
    - ``Patient/<id>`` of a referral the caller may read: that referral's patient (its
      reference, sex and birth year): another referral for the same patient;
    - a ``display`` alone: a de-identified referral (no patient reference).

    Anything else is 422: a Patient we do not have, a Group, another type."""
    where = "ServiceRequest.subject"
    value = subject if isinstance(subject, dict) else {}
    reference = m.reference_of(value)
    declared = str(value.get("type") or "Patient")
    identifier = value.get("identifier")
    named = isinstance(identifier, dict) and identifier.get("value")
    if not reference and declared == "Patient" and named:
        assert isinstance(identifier, dict)
        intake.patient_ref = m.patient_ref_of(identifier, f"{where}.identifier")
        return
    kind, logical_id = m.split_reference(reference) if reference else ("", "")
    if kind == "Patient" and reference.startswith(("http://", "https://")):
        if len(reference) > 128:
            raise FhirError(
                422, "too-long", f"{where} must be at most 128 characters.", expression=[where]
            )
        intake.patient_ref = reference
        return
    if kind == "Patient" and reference.count("/") in (1, 3) and "?" not in reference:
        same = _visible_referrals(user).filter(filler_id=logical_id).first()
        if same is not None:
            intake.patient_ref = same.patient_ref
            intake.patient_sex = same.patient_sex
            intake.patient_birth_year = same.patient_birth_year
            return
    if not reference and not identifier and value.get("display"):
        return  # de-identified: the sender shares no way to the patient
    raise FhirError(
        422,
        "business-rule",
        f"{where} ({reference or 'no reference'}) names no Patient we can keep: send the "
        "Patient in a transaction, name it by identifier or by its URL on your server, or "
        "name the Patient of one of your referrals here (Patient/<id>); a display alone "
        "makes a de-identified referral.",
        expression=[where],
    )


def _specialty(intake: m.Intake) -> Specialty:
    codes = [code for system, code in intake.specialty_codes if system in ("", Specialty.SNOMED)]
    specialty = memoized(  # an intake batch reads it once (core.memo)
        ("specialty", *codes), lambda: _specialty_by_codes(codes)
    )
    if specialty is None:
        raise FhirError(
            422,
            "code-invalid",
            "ServiceRequest.performerType has no SNOMED CT practice-setting specialty we "
            f"know ({', '.join(f'{s}|{c}' for s, c in intake.specialty_codes)}).",
            expression=["ServiceRequest.performerType"],
        )
    return specialty


def _department_by_pk(pk: int) -> Department | None:
    found = fetch_models(Department, "id = %s", [pk])  # prepared: every submission asks
    return found[0] if found else None


# More specialty codes than any ServiceRequest needs: refused (each is a value to look up).
MAX_SPECIALTY_CODES = 100


def _specialty_by_codes(codes: list[str]) -> Specialty | None:
    codes = list(dict.fromkeys(codes))
    if not codes:
        return None
    if len(codes) > MAX_SPECIALTY_CODES:
        raise FhirError(
            422,
            "too-costly",
            f"ServiceRequest.performerType has more than {MAX_SPECIALTY_CODES} codes.",
            expression=["ServiceRequest.performerType"],
        )
    # Specialty's default ordering (display), which the ORM's .first() follows. On
    # PostgreSQL one array: one prepared statement whatever the number of codes.
    if connection.vendor == "postgresql":
        where, params = "system = %s AND code = ANY(%s)", [Specialty.SNOMED, codes]
    else:
        where = f"system = %s AND code IN ({', '.join(['%s'] * len(codes))})"
        params = [Specialty.SNOMED, *codes]
    found = fetch_models(Specialty, where + " ORDER BY display, id LIMIT 1", params)
    return found[0] if found else None


def _department(references: list[str], where: str, base: str) -> Department | None:
    """The department a performer / owner names, None when none is named (routing
    chooses). Anything else named there (an Organization, a Practitioner, …) is refused:
    ignoring it would send the referral where the sender did not ask; so is a department
    on another server than ``base`` (``m.own_reference``: it was read as ours)."""
    named = [m.own_reference(r, base, where) for r in references if r]
    for reference in named:
        kind, logical_id = m.split_reference(reference)
        if kind != "HealthcareService":
            hint = (
                f" (its departments: GET HealthcareService?organization={kind}/{logical_id})"
                if kind == "Organization"
                else ""
            )
            raise FhirError(
                422,
                "business-rule",
                f"{where} {reference[:100]} is not a department: name the department as a "
                f"HealthcareService{hint}, or leave {where} out to let routing choose.",
                expression=[where],
            )
    if not named:
        return None
    pk = reference_pk(named[0], "HealthcareService")
    department = (
        memoized(("department", pk), functools.partial(_department_by_pk, pk))
        if pk is not None
        else None
    )
    if department is None:
        raise FhirError(
            422,
            "business-rule",
            f"{where} {named[0]} is not a department of the network.",
            expression=[where],
        )
    return department


def _if_none_exist_referral(user: User, if_none_exist: str) -> Referral | None:
    criteria = parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True)
    if not criteria or any(name != "identifier" for name, _v in criteria):
        raise FhirError(
            400,
            "not-supported",
            "If-None-Exist on ServiceRequest takes identifier=<system>|<value> only.",
        )
    condition = Q()
    for _name, value in criteria:
        if "\x00" in value:
            raise FhirError(400, "invalid", "If-None-Exist contains a NUL character.")
        if any(parse_token(v)[1] == "" for v in _alternatives(value)) or not value:
            # "system|" searches every identifier of that system: no key of one submission
            raise FhirError(
                400,
                "invalid",
                "If-None-Exist on ServiceRequest needs an identifier with a value "
                "(<system>|<value>).",
            )
        condition &= _identifier(value)
    matches = list(  # within what the caller may read (a ministry official: nothing)
        _visible_referrals(user).filter(condition, requester_facility_id=_caller_facility(user))[:2]
    )
    if len(matches) > 1:
        raise FhirError(
            412, "multiple-matches", f"If-None-Exist {if_none_exist!r} matches several."
        )
    return matches[0] if matches else None


def _if_none_exist_counter_referral(
    user: User, ask: m.CounterReferralAsk, if_none_exist: str
) -> str | None:
    """``identifier=urn:consilium:counter-referral|<original id>/<n>``: the n-th
    counter-referral of the referral the ServiceRequest is based on (its id), or None when n
    is the next one (create it). Any other n, or another referral, is refused (412), so a
    retry can never make a second one. The original's row is locked first: two retries of
    the same request wait for each other."""
    criteria = parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True)
    prefix = f"{COUNTER_REFERRAL_SYSTEM}|{ask.original_id}/"
    value = criteria[0][1] if len(criteria) == 1 and criteria[0][0] == "identifier" else ""
    number = digits_int(value[len(prefix) :]) if value.startswith(prefix) else None
    if number is None or number < 1:
        raise FhirError(
            412,
            "business-rule",
            f"If-None-Exist on a counter-referral takes identifier={prefix}<n> only (the n-th "
            "counter-referral of the referral in basedOn).",
        )
    original = _referral_by_filler(user, ask.original_id)
    list(Referral.objects.select_for_update().filter(pk=original.pk).values_list("pk"))
    made = dict(original.counter_referrals.values_list("placer_value", "filler_id"))
    found = made.get(f"{ask.original_id}/{number}")
    if found is not None and not _visible_referrals(user).filter(filler_id=found).exists():
        raise FhirError(  # as a read of it would be; its id is not named
            404,
            "not-found",
            f"Referral {ask.original_id} has no counter-referral {number} that you may read.",
        )
    if found is None and number != len(made) + 1:
        raise FhirError(
            412,
            "business-rule",
            f"Referral {ask.original_id} has {len(made)} counter-referral(s): "
            f"If-None-Exist names number {number}; the next is {len(made) + 1}.",
        )
    return found


def _submit(
    user: User, intake: m.Intake, department: Department | None, where: str
) -> tuple[Referral, bool]:
    """``referral_submit``; a named department (``where``: the element that named it) the
    referral cannot go to is 422 business-rule, in FHIR's words."""
    from registry.models import Facility

    # Only the id is used (the user's own facility, which exists: a foreign key): a deferred
    # instance, as ``.only("id")`` would give, saves the round trip; a field read loads it.
    facility = Facility.from_db(DEFAULT_DB_ALIAS, ["id"], [_caller_facility(user)])
    try:
        return referral_submit(
            actor=user,
            requester_facility=facility,
            placer_system=intake.placer_system,
            placer_value=intake.placer_value,
            specialty=_specialty(intake),
            clinical_question=intake.clinical_question,
            mode=intake.mode,
            priority=intake.priority,
            patient_ref=intake.patient_ref,
            patient_sex=intake.patient_sex,
            patient_birth_year=intake.patient_birth_year,
            department=department,
        )
    except ApplicationError as exc:
        if department is None or exc.code != "department_not_candidate":
            raise
        raise FhirError(
            422,
            "business-rule",
            f"{where} HealthcareService/{department.pk}: {exc.message} "
            f"Leave {where} out to let routing choose.",
            expression=[where],
        ) from exc


def _service_request_create(req: WriteRequest) -> WriteResult:
    validate_resource(req.resource, req.fhir_version)
    _check_requester(req.user, req.resource, "ServiceRequest.requester", base=req.base)
    counter = m.based_on_referral(req.resource, req.base) is not None
    ask = (
        m.service_request_to_counter_referral(req.resource, req.fhir_version, req.base)
        if counter
        else None
    )
    intake = (
        None if counter else m.service_request_to_intake(req.resource, req.fhir_version, req.base)
    )
    with transaction.atomic():
        if ask is not None:
            if req.if_none_exist:
                made = _if_none_exist_counter_referral(req.user, ask, req.if_none_exist)
                if made is not None:
                    return WriteResult(_current("ServiceRequest", made), created=False)
            return _counter_referral_create(req.user, ask, req.base)
        assert intake is not None
        existing = (
            _if_none_exist_referral(req.user, req.if_none_exist) if req.if_none_exist else None
        )
        _subject_unless_retry(req.user, req.resource.get("subject"), intake, existing)
        fresh: list[FhirResource] = []
        if existing is not None:
            referral, created = existing, False
        else:
            department = _department(
                intake.performer_references, "ServiceRequest.performer", req.base
            )
            with stored_versions() as fresh:
                referral, created = _submit(
                    req.user, intake, department, "ServiceRequest.performer"
                )
        differs = [] if created else _resubmission_differences(intake, referral)
    # A new referral is answered with the version it stored: read after the commit, a
    # change committed in between (a cancel) was answered as this create's (review).
    own = [
        r
        for r in fresh
        if (r.resource_type, r.logical_id) == ("ServiceRequest", referral.filler_id)
    ]
    return WriteResult(
        own[-1] if created and own else _current("ServiceRequest", referral.filler_id),
        created=created,
        warning=_resubmission_text(referral, differs) if differs else None,
    )


def _subject_unless_retry(
    user: User, subject: Any, intake: m.Intake, existing: Referral | None
) -> None:
    """``_subject_into_intake``, except that a retry — matched by a condition
    (``existing``), or by the placer identifier alone, which ``referral_submit`` answers with
    the first — is answered as before whatever its subject (idempotent intake). The placer
    is looked up only when the subject is refused: a new referral's path pays nothing."""
    try:
        _subject_into_intake(user, subject, intake)
    except FhirError:
        if existing is None and not _resubmitted(user, intake):
            raise


def _resubmitted(user: User, intake: m.Intake) -> bool:
    """Whether the caller's facility already submitted a referral under this placer id."""
    return (
        _visible_referrals(user)
        .filter(
            requester_facility_id=_caller_facility(user),
            placer_system=intake.placer_system,
            placer_value=intake.placer_value,
        )
        .exists()
    )


def _current(resource_type: str, logical_id: str) -> FhirResource:
    return resource_current(resource_type, logical_id)


# --------------------------------------------------------------------------- workflow


def _transition(
    user: User, referral: Referral, action: str, expected: int | None, **inputs: Any
) -> Referral:
    try:
        return referral_transition(
            actor=user,
            referral_id=referral.pk,
            action=action,
            expected_version=expected,
            **inputs,
        )
    except Conflict as exc:
        if exc.code == "version_mismatch":
            raise FhirError(412, "conflict", exc.message) from exc
        if exc.code == "guard_failed":
            # The inputs break a rule of the action (a conference in the past, a department
            # that does not accept): a business rule, FHIR's 422. The wrong state stays 409.
            raise FhirError(422, "business-rule", exc.message) from exc
        raise
    except ApplicationError as exc:
        if exc.status_code == 400:
            errors = exc.extra.get("errors") or {}
            # Named as Task.input codes are (the action's input names, "-" for "_").
            detail = "; ".join(f"{k.replace('_', '-')}: {v}" for k, v in errors.items())
            raise FhirError(422, "business-rule", f"{exc.message} {detail}".strip()) from exc
        raise


# What the server sets on every Task version: a body sent again (its answer lost) carries
# the values of the version it was made from, not the current one's.
_SERVER_SET = frozenset({"meta", "lastModified"})


def _same_content(current: dict[str, Any], sent: dict[str, Any]) -> bool:
    """The same resource apart from what the server sets (``meta``: versionId,
    lastUpdated; ``lastModified``)."""
    return same_json(
        {k: v for k, v in current.items() if k not in _SERVER_SET},
        {k: v for k, v in sent.items() if k not in _SERVER_SET},
    )


def _task_update(req: WriteRequest) -> WriteResult:
    assert req.logical_id is not None
    validate_resource(req.resource, req.fhir_version)
    referral = _referral_by_filler(req.user, req.logical_id)
    row = _current("Task", req.logical_id)
    if not req.if_match:
        # A PUT is the whole Task as the sender last read it: without the version it read,
        # a stale copy would silently undo a newer change (a reschedule, an owner's
        # answer). FHIR lets a server require If-Match by answering 412 without it.
        raise FhirError(
            412,
            "conflict",
            f'A Task update needs If-Match: W/"<versionId>" of the version you read (Task/'
            f'{req.logical_id} is at W/"{row.version_id}"), or If-Match: * to apply it to '
            "whatever version is current. (A PATCH may leave it out.)",
        )
    expected_task = parse_if_match(req.if_match)  # None for "*": the current version
    digest = _update_digest(req)
    if expected_task is not None and expected_task != row.version_id:
        if (replay := _replayed(req, digest, base_version=expected_task)) is not None:
            return replay
        raise FhirError(
            412,
            "conflict",
            f"Task/{req.logical_id} is at version {row.version_id}, not {expected_task}.",
        )
    current = json.loads(row.json_for(req.fhir_version) or row.json_r4)
    if _same_content(current, req.resource):
        # The Task as it is (a retry with If-Match: * of an update that went through, or
        # a client saving what it read): answered with the current version, as a PATCH
        # that changes nothing is; no new version.
        return WriteResult(row, created=False, unchanged=True)
    if expected_task is None and (replay := _replayed(req, digest, result_version=row.version_id)):
        return replay  # If-Match: * sent again after the update that made this version
    change = m.task_to_transition(current, req.resource, req.fhir_version, req.base)
    # Task versions follow the referral's events one to one: the If-Match version is the
    # referral version the member saw (not the referral read above: a change committed
    # between the two reads would make a right If-Match fail), and the answer is the
    # version this update stored (a change committed since would be the current one).
    try:
        with transaction.atomic():
            if expected_task is None:
                # If-Match: * names no version for the twin to find moved: a change the
                # table allows again from the state it makes (a reschedule) would be
                # applied twice. Under the referral's lock (the one the transition takes),
                # a version made meanwhile by this very update is the twin's answer.
                locked = lock_referral(referral).version
                if locked != row.version_id and (
                    replay := _replayed(req, digest, result_version=locked)
                ):
                    return replay
            done = _transition(req.user, referral, change.action, expected_task, **change.inputs)
            AppliedUpdate.objects.create(
                resource_type="Task",
                logical_id=req.logical_id,
                base_version=done.version - 1,
                result_version=done.version,
                user=req.user,
                digest=digest,
            )
    except (FhirError, ApplicationError):
        # The same request sent twice at once: the twin that waited on the referral's lock
        # finds the version moved (412) or the state (409/422); it was applied once.
        base = expected_task if expected_task is not None else row.version_id
        if (replay := _replayed(req, digest, base_version=base)) is not None:
            return replay
        raise
    return WriteResult(resource_version("Task", req.logical_id, done.version), created=False)


def _update_digest(req: WriteRequest) -> str:
    """What a retry of the same update sends again: the body (without what the server sets
    on each version) in its FHIR version."""
    sent = {k: v for k, v in req.resource.items() if k not in _SERVER_SET}
    text = json.dumps([req.fhir_version, sent], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _replayed(
    req: WriteRequest,
    digest: str,
    *,
    base_version: int | None = None,
    result_version: int | None = None,
) -> WriteResult | None:
    """The answer the first of these updates had (the version it made; no new one), when
    this account already sent this body to this version of the Task (``AppliedUpdate``)."""
    found = AppliedUpdate.objects.filter(
        resource_type="Task", logical_id=req.logical_id, user=req.user, digest=digest
    )
    if base_version is not None:
        found = found.filter(base_version=base_version)
    if result_version is not None:
        found = found.filter(result_version=result_version)
    made = found.values_list("result_version", flat=True).first()
    if made is None:
        return None
    assert req.logical_id is not None
    return WriteResult(
        resource_version("Task", req.logical_id, made), created=False, unchanged=True
    )


def update_replay_days() -> int:
    """How long an applied Task update answers its retry (``AppliedUpdate``); 0 or less:
    forever."""
    return int(getattr(settings, "FHIR_UPDATE_REPLAY_DAYS", 7))


def applied_update_prune(*, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` records of Task updates applied before ``before``, oldest
    first (beat's retention, ``retention.retention_prune``). A retry of such an update is
    then answered as any request: with ``If-Match`` on the version it was applied to,
    stale (412); with ``If-Match: *`` the Task as it is when nothing changed since (200),
    else a new change from the current state. Rows a concurrent run holds are skipped."""
    with transaction.atomic():
        ids = list(
            AppliedUpdate.objects.select_for_update(skip_locked=True)
            .filter(at__lt=before)
            .order_by("at")
            .values_list("pk", flat=True)[:limit]
        )
        if not ids:
            return 0
        deleted, _ = AppliedUpdate.objects.filter(pk__in=ids).delete()
    return deleted


def _counter_referral_create(user: User, ask: m.CounterReferralAsk, base: str) -> WriteResult:
    """counter_refer on the referral the ServiceRequest is based on; the answer is the new
    referral's ServiceRequest (its Task and Patient have the same id)."""
    original = _referral_by_filler(user, ask.original_id)
    subject = m.own_reference(ask.subject_reference, base, "ServiceRequest.subject")
    kind, patient = m.split_reference(subject)
    if kind != "Patient" or patient != m.patient_id(original):  # a Group, a urn:uuid: no
        raise FhirError(
            422,
            "business-rule",
            f"A counter-referral is for the referral's patient (Patient/"
            f"{m.patient_id(original)}), not {ask.subject_reference or 'nobody'}.",
            expression=["ServiceRequest.subject"],
        )
    department = _department(ask.performer_references, "ServiceRequest.performer", base)
    assert department is not None  # the mapping requires a HealthcareService
    specialty = department.specialty
    if ask.specialty_codes and (specialty.system, specialty.code) not in [
        (system or Specialty.SNOMED, code) for system, code in ask.specialty_codes
    ]:
        raise FhirError(
            422,
            "business-rule",
            f"ServiceRequest.performerType does not name the specialty of "
            f"HealthcareService/{department.pk} ({specialty.system}|{specialty.code}).",
            expression=["ServiceRequest.performerType"],
        )
    referral = _transition(
        user,
        original,
        "counter_refer",
        None,
        department=department,
        clinical_question=ask.clinical_question,
        priority=ask.priority,
        mode=ask.mode,
    )
    child = Referral.objects.values_list("filler_id", flat=True).get(
        pk=_latest_payload(referral, "counter_referral_id")
    )
    return WriteResult(
        _current("ServiceRequest", child),
        created=True,
        transitioned=((original.pk, "counter_refer"),),
    )


def referral_from_references(user: User, references: list[str], where: str, base: str) -> Referral:
    """The one referral ``references`` name (its Task and ServiceRequest share an id); 422
    when they name none, or two (it was filed on the first, the second dropped unsaid),
    or one on another server than ``base`` (``m.own_reference``: it was read as ours)."""
    named = []
    for reference in references:
        kind, logical_id = m.split_reference(reference)
        if kind in ("Task", "ServiceRequest"):
            kind, logical_id = m.split_reference(m.own_reference(reference, base, where))
        if kind in ("Task", "ServiceRequest") and logical_id not in named:
            named.append(logical_id)
    if len(named) > 1:
        raise FhirError(
            422,
            "business-rule",
            f"{where} names {len(named)} referrals; a resource belongs to one.",
            expression=[where],
        )
    if named:
        return _referral_by_filler(user, named[0])
    raise FhirError(
        422,
        "required",
        f"{where} must reference the referral's Task or ServiceRequest.",
        expression=[where],
    )


def _latest_payload(referral: Referral, key: str) -> Any:
    return (
        ReferralEvent.objects.filter(referral=referral)
        .order_by("-seq")
        .values_list(f"payload__{key}", flat=True)
        .first()
    )


def _communication_create(req: WriteRequest) -> WriteResult:
    validate_resource(req.resource, req.fhir_version)
    if req.resource.get("status") not in (None, "completed", "in-progress"):
        raise FhirError(
            422,
            "business-rule",
            "Communication.status must be completed (a sent message).",
            expression=["Communication.status"],
        )
    part_of = [m.reference_of(r) for r in req.resource.get("partOf") or []]
    referral = referral_from_references(req.user, part_of, "Communication.partOf", req.base)
    _check_subject(referral, req.resource, "Communication.subject", base=req.base)
    if req.user.facility_id is not None and _names_organization(req.resource, "sender"):
        # (a department-only account's sender is its department's facility)
        _check_requester(
            req.user, req.resource, "Communication.sender", element="sender", base=req.base
        )
    text = m.communication_text(req.resource)
    if not text:
        raise FhirError(
            422,
            "required",
            "Communication.payload needs the message text (R4 contentString; R5 a text/plain "
            "contentAttachment or contentCodeableConcept.text).",
            expression=["Communication.payload"],
        )
    answered: int | None = None
    for reference in req.resource.get("inResponseTo") or []:
        written = m.reference_of(reference)
        where = "Communication.inResponseTo"
        _kind, logical_id = m.split_reference(m.own_reference(written, req.base, where))
        number = m.message_number(referral, logical_id)
        answered = referral_message_by_number(referral, number) if number is not None else None
        if answered is None:
            raise FhirError(
                422,
                "business-rule",
                "Communication.inResponseTo must be a Communication of this referral.",
                expression=["Communication.inResponseTo"],
            )
    return _keyed_create(
        req.user,
        req.if_none_exist,
        referral,
        req.resource,
        lambda: _message_post(req.user, referral, text, answered),
        req.fhir_version,
    )


def _member_identifiers(resource: dict[str, Any], key: tuple[str, str] | None) -> list[Any]:
    """The identifiers a member gave the resource it posts (``storage.clean_identifiers``),
    and its If-None-Exist key when the resource does not already carry it (the resource
    then matches its own condition)."""
    where = f"{resource['resourceType']}.identifier"
    items = clean_identifiers(resource.get("identifier"), where)
    if key is not None and not any((i.get("system"), i.get("value")) == key for i in items):
        items.append({"system": key[0], "value": key[1]})
    return items


def _keyed_create(
    user: User,
    if_none_exist: str | None,
    referral: Referral,
    resource: dict[str, Any],
    create: Callable[[], WriteResult],
    fhir_version: str,
    roles: frozenset[str] | None = None,
    side: str | None = None,
) -> WriteResult:
    """A create with its If-None-Exist key (``storage.conditional_create``); the resource
    made carries the member's identifiers (``_member_identifiers``), and each of them
    (system and value) is a key of the party too, once: the first resource carrying it
    answers a later If-None-Exist naming it, as a search would.

    The key is looked up only for a caller the create itself would let through: a party to
    the referral (``side``: that one), with one of ``roles`` when the create needs them.
    Anyone else gets the create's own refusal, not an answer telling which keys were used.
    A key is its party's (the requester facility, or the assigned department's facility):
    the other party's equal key is another resource; accounts without a facility of their
    own (a department's member) share their side's."""
    resource_type = str(resource["resourceType"])
    key = create_key(if_none_exist, resource_type) if if_none_exist else None
    identifiers = _member_identifiers(resource, key)
    masters = clean_identifiers(
        [resource.get("masterIdentifier")], f"{resource_type}.masterIdentifier"
    )
    master = masters[0] if masters else None  # R4 DocumentReference
    sides = actor_sides(user, referral)
    allowed = (
        bool(sides)
        and (side is None or side in sides)
        and (roles is None or bool(user.role_names() & roles))
    )
    party_facility: int | None = None
    if allowed:
        if ActorSide.REQUESTER.value in sides and side != ActorSide.ASSIGNEE.value:
            party_facility = int(referral.requester_facility_id)
        else:
            department = referral.assigned_department
            assert department is not None  # an assignee side needs one
            party_facility = int(department.facility_id)

    def identified() -> WriteResult:
        if not identifiers and master is None:
            return create()
        with transaction.atomic():
            result = create()
            identify_new_resource(result.row, identifiers, fhir_version, master)
            if party_facility is not None:
                record_create_keys(
                    resource_type=resource_type,
                    source_pk=referral.pk,
                    facility_id=party_facility,
                    keys=[
                        (i.get("system"), i.get("value"))
                        for i in ([master] if master else []) + identifiers
                    ],
                    logical_id=result.row.logical_id,
                    user=user,
                )
        return result

    if key is None or party_facility is None:
        return identified()  # a plain create; or refused by the create, as without the header
    with transaction.atomic():
        # The referral's row lock before the key's, the order of a Bundle resent with
        # several keyed files (it holds the row once it stored one): a key's lock taken
        # first, storing the resource (which locks the row) deadlocked with it (review).
        lock_referral(referral)
        return conditional_create(
            resource_type=resource_type,
            source_pk=referral.pk,
            facility_id=party_facility,
            key=key,
            user=user,
            create=identified,
        )


def _message_post(user: User, referral: Referral, text: str, answered: int | None) -> WriteResult:
    with transaction.atomic():
        # Question, answer or plain message by the state the referral is in once locked:
        # judged on the row read before, a change committed in between (a colleague's
        # question, the answer given in the web) made it a transition from a state the
        # referral had left, refused 409 (review).
        referral = lock_referral(referral)
        sides = actor_sides(user, referral)
        if "assignee" in sides and referral.state == ReferralState.ACCEPTED and answered is None:
            referral = _transition(user, referral, "request_info", None, question=text)
            number = last_number(Message, referral)  # the question it just stored
        elif (
            "requester" in sides
            and referral.state == ReferralState.INFO_REQUESTED
            and answered in (None, referral_open_question_id(referral))
        ):  # the answer; a reply to another message is one more message (checked there)
            referral = _transition(user, referral, "provide_info", None, text=text)
            number = last_number(Message, referral)  # the answer it just stored
        else:
            referral, message, _created = referral_message_post(
                actor=user, referral_id=referral.pk, text=text, in_response_to_id=answered
            )
            number = message.number
    return WriteResult(_current("Communication", m.message_id(referral, number)), created=True)


def _is_consult_note(resource: dict[str, Any]) -> bool:
    codes = m.codes_of([resource.get("type") or {}])
    return (m.LOINC, m.CONSULT_NOTE_CODE) in codes


def _document_references(resource: dict[str, Any]) -> list[str]:
    context = resource.get("context")
    if isinstance(context, dict):  # R4: context.related
        refs = [m.reference_of(r) for r in context.get("related") or []]
    else:  # R5: context is a list of references
        refs = [m.reference_of(r) for r in context or []]
    refs += [m.reference_of(r) for r in resource.get("basedOn") or []]
    return [r for r in refs if r]


def _document_reference_create(req: WriteRequest) -> WriteResult:
    validate_resource(req.resource, req.fhir_version)
    referral = referral_from_references(
        req.user,
        _document_references(req.resource),
        "DocumentReference.context.related"
        if req.fhir_version == m.R4
        else "DocumentReference.basedOn",
        req.base,
    )
    _check_subject(referral, req.resource, "DocumentReference.subject", base=req.base)
    roles, side = _document_rights(req.resource)
    return _keyed_create(
        req.user,
        req.if_none_exist,
        referral,
        req.resource,
        lambda: _document_reference_for(req.user, referral, req.resource),
        req.fhir_version,
        roles=roles,
        side=side,
    )


def _document_rights(resource: dict[str, Any]) -> tuple[frozenset[str], str | None]:
    """Who may make this document: (roles, side) for ``_keyed_create``."""
    if _is_consult_note(resource):  # advice: the assignee's, with the advise roles
        advise = transition_for("advise")
        assert advise is not None
        return frozenset(advise.roles), advise.side
    return frozenset(UPLOAD_ROLES), None  # a case file: either party, with an upload role


def _document_reference_for(
    user: User, referral: Referral, resource: dict[str, Any]
) -> WriteResult:
    contents = [c.get("attachment") or {} for c in resource.get("content") or []]
    if not _is_consult_note(resource):
        return _attachment_store(user, referral, contents, _case_file_kinds(resource))
    disposition = m.disposition_of(resource)
    text = "\n".join(
        m.attachment_text(a, "DocumentReference.content.attachment") for a in contents
    ).strip() or str(resource.get("description") or "")
    with transaction.atomic():
        referral = _transition(
            user, referral, "advise", None, disposition=disposition or None, text=text
        )
        number = last_number(ConsultNote, referral)  # the note it just stored
    return WriteResult(_current("DocumentReference", m.note_id(referral, number)), created=True)


# A case file's own description, kept as its member sent it (FHIR's order: after status).
_CASE_FILE_KINDS = ("type", "category")


def _case_file_kinds(resource: dict[str, Any]) -> dict[str, Any]:
    """The ``type`` and ``category`` a member gave its case file (a discharge summary, an
    ECG…), without nulls and empty elements (FHIR JSON has neither). Both are
    CodeableConcepts in R4 and R5 (``category`` a list), so each version can hold them."""
    kinds: dict[str, Any] = {}
    for element in _CASE_FILE_KINDS:
        value = pruned(resource.get(element))
        if value:
            kinds[element] = value
    return kinds


def _attachment_store(
    user: User,
    referral: Referral,
    contents: list[dict[str, Any]],
    kinds: dict[str, Any] | None = None,
) -> WriteResult:
    """A case file: stored by the referral attachments service; its DocumentReference
    (metadata, the member's ``type`` and ``category``, and the url of its bytes:
    ``Binary/<same id>``, see ``binary``) is stored here."""
    if len(contents) != 1 or not contents[0].get("data"):
        raise FhirError(
            422,
            "business-rule",
            "A DocumentReference that is not a consult note (LOINC 11488-4) must carry one "
            "file inline (content.attachment.data).",
            expression=["DocumentReference.content"],
        )
    attachment = contents[0]
    where = "DocumentReference.content.attachment"
    data = m.attachment_bytes(attachment, where)
    _check_declared(attachment, data, where)
    return case_file_store(
        user,
        referral,
        data,
        content_type=str(attachment.get("contentType") or ""),
        title=str(attachment.get("title") or ""),
        kinds=kinds,
    ).result


def _check_declared(attachment: dict[str, Any], data: bytes, where: str) -> None:
    """A file's declared ``size`` and ``hash`` (base64 SHA-1), when sent, must be the
    bytes' (as IHE MHD recipients check): else 422, nothing stored."""
    size = attachment.get("size")  # R5's integer64 is a JSON string
    if size is not None and digits_int(str(size)) != len(data):
        raise FhirError(
            422,
            "business-rule",
            f"{where}.size {str(size)[:30]!r} is not the file's {len(data)} bytes.",
            expression=[f"{where}.size"],
        )
    digest = attachment.get("hash")
    if digest is not None:
        try:
            sent = base64.b64decode("".join(str(digest).split()), validate=True)
        except (binascii.Error, ValueError):
            sent = b""
        if sent != hashlib.sha1(data).digest():  # noqa: S324 (FHIR's hash is SHA-1)
            raise FhirError(
                422,
                "business-rule",
                f"{where}.hash is not the SHA-1 (base64) of the file.",
                expression=[f"{where}.hash"],
            )


@dataclass(frozen=True)
class StoredCaseFile:
    result: WriteResult  # the DocumentReference
    attachment: Attachment


def case_file_store(
    user: User,
    referral: Referral,
    data: bytes,
    *,
    content_type: str,
    title: str,
    kinds: dict[str, Any] | None = None,
) -> StoredCaseFile:
    """Store ``data`` as a case file of ``referral`` (``referrals.attachments``: its checks,
    type sniffing and size limit; the upload stores its DocumentReference through
    ``publish.case_file_stored``, and ``Binary/<same id>`` is the bytes). ``kinds``: the
    member's ``type`` and ``category`` (``_case_file_kinds``), as the request validated
    them: CodeableConcept is the same in R4 and R5, so both renderings hold them. For a
    DocumentReference with an inline file, and for a Binary create."""
    from referrals.attachments import attachment_upload, clean_name

    if referral.state == ReferralState.DRAFT:
        # Not shared yet: its files get their DocumentReferences when it is submitted
        # (``publish.referral_changed``), so there is none to answer with. Refused before a
        # byte is stored, as a message on a draft is. (No transition leads back to draft: a
        # referral read here as not one is not one under the upload's lock either, which
        # then publishes its file.)
        raise FhirError(
            409,
            "conflict",
            "A draft has no other side yet: submit it first, then send the file.",
        )
    name = clean_name(title or "attachment")  # ".", "a/": no name
    upload = SimpleUploadedFile(name, data, content_type=content_type)
    with case_file_described(kinds or {}), stored_versions() as fresh:
        stored = attachment_upload(actor=user, referral_id=referral.pk, upload=upload)
    doc_id = m.case_file_id(referral.filler_id, stored.number)
    (row,) = (r for r in fresh if r.resource_type == "DocumentReference" and r.logical_id == doc_id)
    return StoredCaseFile(WriteResult(row, created=True), stored)


# --------------------------------------------------------------------------- transaction


_BUNDLE_TYPES = ("Patient", "ServiceRequest", "Task", "DocumentReference", "Binary")


def _is_create_url(url: Any, rtype: str) -> bool:
    """Whether a transaction entry's ``request.url`` names the type its POST creates:
    ``rtype`` relative to the base (a leading or trailing ``/`` allowed), or an absolute
    http(s) URL whose path ends in ``/<rtype>``. A relative path ending in the type
    (``Task/ServiceRequest``, ``Patient/1/ServiceRequest``) names something else."""
    if not isinstance(url, str) or "?" in url or "#" in url:
        return False
    scheme, _, rest = url.partition("://")
    if not rest:
        return url.strip("/") == rtype
    if scheme.lower() not in ("http", "https"):
        return False
    _host, slash, path = rest.partition("/")
    return bool(slash) and path.rstrip("/").rsplit("/", 1)[-1] == rtype


def transaction_bundle(
    user: User, bundle: dict[str, Any], version: str, answer_version: str, base: str
) -> handlers.TransactionAnswer:
    """One referral per transaction: Patient + ServiceRequest (+ Task, + DocumentReference).

    All or nothing: any refusal rolls everything back and answers the OperationOutcome.
    The caller (``views.root``) checked that ``bundle`` is a Bundle of type transaction.
    """
    entries = bundle.get("entry") or []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):  # answered 1:1, so an entry cannot be skipped
            raise FhirError(
                400,
                "structure",
                f"Bundle.entry[{index}] must be an object.",
                expression=[f"Bundle.entry[{index}]"],
            )
    by_type: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for index, entry in enumerate(entries):
        resource = entry.get("resource") or {}
        request = entry.get("request")
        method = request.get("method") if isinstance(request, dict) else None
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        if method != "POST" or rtype not in _BUNDLE_TYPES:
            raise FhirError(
                422,
                "not-supported",
                f"Bundle.entry[{index}]: {method} {rtype or 'without resource'} — a transaction "
                "here is one referral: POST Patient, ServiceRequest, Task, DocumentReference "
                "(and Binary, the bytes of a DocumentReference entry).",
                expression=[f"Bundle.entry[{index}]"],
            )
        url = request.get("url") if isinstance(request, dict) else None
        # A POST's url is the type it creates (FHIR: relative to the base; an absolute one
        # names the type last). Another type, an id or a search there was never read.
        if not _is_create_url(url, str(rtype)):
            raise FhirError(
                400,
                "invalid",
                f"Bundle.entry[{index}].request.url must be {rtype!r} (a POST creates a "
                f"{rtype}), not {url!r}.",
                expression=[f"Bundle.entry[{index}].request.url"],
            )
        by_type.setdefault(str(rtype), []).append((index, resource))
    if len(by_type.get("ServiceRequest", [])) != 1:
        raise FhirError(
            422,
            "business-rule",
            "A transaction must hold exactly one ServiceRequest (the referral).",
        )
    if any(len(by_type.get(t, [])) > 1 for t in ("Patient", "Task")):
        raise FhirError(422, "business-rule", "At most one Patient and one Task per transaction.")
    _check_bundle_references(entries)
    for entry in entries:
        validate_resource(entry["resource"], version)
    binaries = _inline_binaries(entries, by_type)
    sr_index, service_request = by_type["ServiceRequest"][0]
    # A requester may name an entry (the Bundle's Patient) by its fullUrl.
    entry_types = {
        str(entry["fullUrl"]): str(entry["resource"].get("resourceType"))
        for entry in entries
        if isinstance(entry.get("fullUrl"), str)
    }
    _check_requester(
        user, service_request, "ServiceRequest.requester", entry_types=entry_types, base=base
    )
    intake = m.service_request_to_intake(service_request, version, base)
    task = by_type.get("Task", [(None, {})])[0][1]
    if task:
        _check_requester(user, task, "Task.requester", entry_types=entry_types, base=base)
    patient = by_type.get("Patient", [(None, {})])[0][1]
    if patient:
        m.patient_into_intake(intake, patient)
    subject = service_request.get("subject")
    if not m.reference_of(subject).startswith(_ENTRY_REFERENCE):
        if patient:
            raise FhirError(
                422,
                "business-rule",
                "ServiceRequest.subject must reference the Bundle's Patient entry.",
                expression=["ServiceRequest.subject"],
            )
        _subject_unless_retry(user, subject, intake, None)
    # The ServiceRequest entry's conditional create (FHIR's request.ifNoneExist), as the
    # If-None-Exist header of a POST ServiceRequest.
    condition = _entry_condition(entries, sr_index)
    # The DocumentReference entries' own keys (as the header of a POST DocumentReference):
    # read before anything is written, so a malformed one refuses the Bundle at once.
    document_keys = {
        index: _entry_condition(entries, index) for index, _ in by_type.get("DocumentReference", [])
    }
    used: dict[tuple[str, str], int] = {}
    for index, key_condition in document_keys.items():
        if not key_condition:
            continue
        key = create_key(key_condition, "DocumentReference")
        if key in used:  # the second would be answered with the first's file: one dropped
            raise FhirError(
                400,
                "duplicate",
                f"Bundle.entry[{index}] has the ifNoneExist key of Bundle.entry[{used[key]}]; "
                "each file needs its own.",
                expression=[f"Bundle.entry[{index}].request.ifNoneExist"],
            )
        used[key] = index
    fresh: list[FhirResource] = []
    with atomic_in_unit():  # an intake job's savepoint is this block's (core.atomic)
        existing = _if_none_exist_referral(user, condition) if condition else None
        if existing is not None:
            referral, created = existing, False
        else:
            where = "ServiceRequest.performer"
            department = _department(intake.performer_references, where, base)
            owner = task.get("owner") if task else None
            if owner:
                # Either names the department; both: the same one, else 422 (the owner was
                # ignored beside a performer, so the sender's own data disagreed unseen).
                named = _department(
                    [m.department_reference(owner, "Task.owner")], "Task.owner", base
                )
                if department is None:
                    where, department = "Task.owner", named
                elif named is not None and named.pk != department.pk:
                    raise FhirError(
                        422,
                        "business-rule",
                        f"Task.owner {m.reference_of(owner)[:100]} is not the department "
                        f"ServiceRequest.performer names (HealthcareService/{department.pk}): "
                        "name one department, or leave Task.owner out.",
                        expression=["Task.owner"],
                    )
            with stored_versions() as fresh:
                referral, created = _submit(user, intake, department, where)
        if task:
            _check_task_focus(referral, task, entries, sr_index, by_type["Task"][0][0], base)
            for_ = m.reference_of(task.get("for"))
            if not for_.startswith(_ENTRY_REFERENCE) and for_ != m.reference_of(subject):
                # Not the Patient entry (checked above) nor the ServiceRequest's subject:
                # the referral's patient, or 422 (it was stored as the Task of the
                # Bundle's referral, read back for its patient; review).
                at = f"Bundle.entry[{by_type['Task'][0][0]}].resource.for"
                _check_subject(referral, task, at, base=base, element="for")
        outcomes: dict[int, tuple[FhirResource, str]] = {}
        status = "201 Created" if created else "200 OK"
        notes: dict[int, dict[str, Any]] = {}
        if not created and (differs := _resubmission_differences(intake, referral)):
            notes[sr_index] = _resubmission_warning(referral, differs)
        wanted = ["ServiceRequest"] + [t for t in ("Patient", "Task") if by_type.get(t)]
        # A new referral's versions, as the projection just stored them (the last of each);
        # else as stored.
        current = {
            row.resource_type: row
            for row in fresh
            if row.logical_id == referral.filler_id and row.resource_type in wanted
        }
        if created is False or set(current) != set(wanted):
            current = {
                row.resource_type: row
                for row in FhirResource.objects.filter(
                    resource_type__in=wanted, logical_id=referral.filler_id, is_current=True
                )
            }
        for rtype in wanted:  # missing (404) or deleted (410): answered as _current does
            if rtype not in current or current[rtype].deleted:
                _current(rtype, referral.filler_id)
        sr_row = current["ServiceRequest"]
        outcomes[sr_index] = (sr_row, status)
        for rtype in ("Patient", "Task"):
            for index, _res in by_type.get(rtype, []):
                outcomes[index] = (current[rtype], status)
        # A resubmission answers each case file with the one of the same bytes the
        # requester side already stored (the one with the entry's identifiers first) and
        # stores the others: a file is neither dropped nor stored twice. An entry with its
        # own key (request.ifNoneExist) is answered by that key alone; those go first, and
        # a stored file answers one entry at most.
        documents = by_type.get("DocumentReference", [])
        stored: dict[str, list[FhirResource]] = {}
        if not created and any(not document_keys[index] for index, _d in documents):
            # Resends of one referral match their unkeyed files one at a time, each seeing
            # what the one before committed: two at once both missed a file neither had
            # stored yet and both stored it (review). Only here: no other path takes it.
            _lock(f"fhir-case-files:{referral.pk}")
            stored = _case_files(referral)
        taken: set[str] = set()  # the stored files answering an entry
        own_urls = [
            entries[i].get("fullUrl")
            for i, _r in [*by_type["ServiceRequest"], *by_type.get("Task", [])]
        ]
        own = {url for url in own_urls if isinstance(url, str)}
        for index, document in sorted(documents, key=lambda d: not document_keys[d[0]]):
            if not m.reference_of(document.get("subject")).startswith(_ENTRY_REFERENCE):
                # Not the Patient entry (checked above): the referral's patient, or 422.
                at = f"Bundle.entry[{index}].resource.subject"
                _check_subject(referral, document, at, base=base)
            _check_own_referral(referral, document, own, index, base)
            if not document_keys[index]:
                same = [
                    r for r in stored.get(_inline_sha256(document), []) if r.logical_id not in taken
                ]
                if same:
                    wanted_ids = _member_identifiers(document, None)
                    pick = next((r for r in same if _stored_identifiers(r) == wanted_ids), same[0])
                    taken.add(pick.logical_id)
                    outcomes[index] = (pick, "200 OK")
                    continue
            roles, side = _document_rights(document)
            result = _keyed_create(
                user,
                document_keys[index],
                referral,
                document,
                functools.partial(_document_reference_for, user, referral, document),
                version,
                roles=roles,
                side=side,
            )
            taken.add(result.row.logical_id)
            outcomes[index] = (result.row, "201 Created" if result.created else "200 OK")
        for index, document_index in binaries.items():  # the bytes of that entry's file
            outcomes[index] = outcomes[document_index]
    wrote = any(status.startswith("201") for _row, status in outcomes.values())
    return handlers.TransactionAnswer(
        _transaction_response(entries, outcomes, answer_version, base, set(binaries), notes),
        referral.pk,
        wrote,
    )


def _check_own_referral(
    referral: Referral, document: dict[str, Any], own_entries: set[str], index: int, base: str
) -> None:
    """422 when a transaction's case file names another referral than the Bundle's (its
    ``context.related`` / ``basedOn``: the ServiceRequest or Task entry, or the referral's
    own ``ServiceRequest/<id>`` / ``Task/<id>`` on a resubmission). It was filed on the
    Bundle's referral whatever it named, and read back naming that one (review)."""
    for reference in _document_references(document):
        if reference in own_entries:
            continue
        where = f"Bundle.entry[{index}].resource"
        rtype, rid = m.split_reference(m.own_reference(reference, base, where))
        if rtype in ("ServiceRequest", "Task") and rid == referral.filler_id:
            continue
        raise FhirError(
            422,
            "business-rule",
            f"Bundle.entry[{index}]: the case file names {reference[:120]!r}; a "
            "transaction's case files belong to its own referral (its ServiceRequest or "
            "Task entry). Send a file for another referral as a DocumentReference of its own.",
            expression=[f"Bundle.entry[{index}].resource"],
        )


def _check_task_focus(
    referral: Referral,
    task: dict[str, Any],
    entries: list[dict[str, Any]],
    sr_index: int,
    index: int,
    base: str,
) -> None:
    """422 when a transaction's ``Task.focus`` names another order than the Bundle's own:
    the ServiceRequest entry, or the referral's own ``ServiceRequest/<id>`` (however
    written: versioned, absolute on this server's ``base``; on another server it is that
    server's order, ``m.own_reference``), as a resubmission may. It was checked only when
    it named an entry (``urn:uuid:``); one naming another referral's ServiceRequest was
    stored as the Task of the Bundle's referral, read back focused on that one (review).
    A focus ``identifier`` (alone or beside the reference) must be one of the order's:
    the Bundle's ServiceRequest placer identifier, or the referral's placer or filler
    identifier (system and value); it was never read, so another referral's passed."""
    where = f"Bundle.entry[{index}].resource.focus"
    focus = task.get("focus")
    identifier = focus.get("identifier") if isinstance(focus, dict) else None
    if isinstance(identifier, dict) and identifier.get("value"):
        named = (str(identifier.get("system") or ""), str(identifier["value"]))
        own = {
            m.placer_identifier(entries[sr_index].get("resource") or {}),
            (referral.placer_system, referral.placer_value),
            (m.FILLER_SYSTEM, referral.filler_id),
        }
        if named not in own:
            raise FhirError(
                422,
                "business-rule",
                f"{where}.identifier {named[0][:100]}|{named[1][:60]} is not an identifier "
                "of the Bundle's ServiceRequest (its placer identifier, system and value): a "
                "transaction's Task is the workflow of its own referral. Name its "
                "ServiceRequest entry in focus.reference (or leave focus out).",
                expression=[where],
            )
    reference = m.reference_of(focus)
    if not reference or reference == entries[sr_index].get("fullUrl"):
        return
    if m.split_reference(m.own_reference(reference, base, where)) == (
        "ServiceRequest",
        referral.filler_id,
    ):
        return
    raise FhirError(
        422,
        "business-rule",
        f"{where} names {reference[:120]!r}; a transaction's Task is the workflow of its own "
        "referral: its focus is the Bundle's ServiceRequest entry (or leave it out). Change "
        "another referral by updating its own Task.",
        expression=[where],
    )


def _inline_binaries(
    entries: list[dict[str, Any]], by_type: dict[str, list[tuple[int, dict[str, Any]]]]
) -> dict[int, int]:
    """Binary entries (as IHE MHD sends them): each is the file of the one DocumentReference
    entry whose ``content.attachment.url`` is the Binary's ``fullUrl``. Puts each Binary's
    bytes inline in (a copy of) its DocumentReference, which is then stored as one sent
    inline would be, and answers {Binary entry index: DocumentReference entry index}."""
    binaries = by_type.pop("Binary", [])
    if not binaries:
        return {}
    referral_urls = {
        url
        for t in ("ServiceRequest", "Task")
        for i, _ in by_type.get(t, [])
        if isinstance(url := entries[i].get("fullUrl"), str) and url
    }
    by_url: dict[str, tuple[int, dict[str, Any]]] = {}
    for index, binary in binaries:
        where = f"Bundle.entry[{index}]"
        full_url = entries[index].get("fullUrl")
        if not isinstance(full_url, str) or not full_url:
            raise FhirError(
                422,
                "business-rule",
                f"{where}: a Binary entry needs a fullUrl, named by the content.attachment.url "
                "of the DocumentReference entry it is the file of.",
                expression=[f"{where}.fullUrl"],
            )
        if not binary.get("data"):
            raise FhirError(
                422,
                "required",
                f"{where}: a Binary entry must carry its bytes (Binary.data).",
                expression=[f"{where}.resource.data"],
            )
        m.attachment_bytes(binary, f"{where}.resource")  # base64, else 400 naming it
        by_url[full_url] = (index, binary)
    used: dict[int, int] = {}
    documents = by_type.get("DocumentReference", [])
    for position, (doc_index, document) in enumerate(documents):
        contents = document.get("content")
        if not isinstance(contents, list):
            continue
        inlined: list[Any] = []
        for n, content in enumerate(contents):
            attachment = content.get("attachment") if isinstance(content, dict) else None
            url = attachment.get("url") if isinstance(attachment, dict) else None
            if not isinstance(url, str) or url not in by_url:
                inlined.append(content)
                continue
            assert isinstance(attachment, dict)
            where = f"Bundle.entry[{doc_index}].resource.content[{n}].attachment"
            index, binary = by_url[url]
            if index in used:
                raise FhirError(
                    422,
                    "business-rule",
                    f"{where}.url names the Binary of Bundle.entry[{used[index]}]'s file "
                    "too; each file needs its own Binary.",
                    expression=[f"{where}.url"],
                )
            if attachment.get("data"):
                raise FhirError(
                    422,
                    "business-rule",
                    f"{where} has both data and the url of a Binary entry; send one.",
                    expression=[where],
                )
            declared, sent = attachment.get("contentType"), binary.get("contentType")
            if declared and declared != sent:
                raise FhirError(
                    422,
                    "business-rule",
                    f"{where}.contentType {str(declared)[:100]!r} is not the Binary's "
                    f"{str(sent)[:100]!r}.",
                    expression=[f"{where}.contentType"],
                )
            used[index] = doc_index
            file = {k: v for k, v in attachment.items() if k != "url"}
            inlined.append(
                {**content, "attachment": {**file, "contentType": sent, "data": binary["data"]}}
            )
        documents[position] = (doc_index, {**document, "content": inlined})
    for index, binary in binaries:
        if index not in used:
            raise FhirError(
                422,
                "business-rule",
                f"Bundle.entry[{index}]: no DocumentReference entry's content.attachment.url "
                "names this Binary; a Binary here is the file of a DocumentReference entry.",
                expression=[f"Bundle.entry[{index}]"],
            )
        # What the file belongs to: the referral, or the DocumentReference it is the file of
        # (as this server's own Binary reads name it).
        context = m.reference_of(binary.get("securityContext"))
        if context and context not in referral_urls | {entries[used[index]].get("fullUrl")}:
            raise FhirError(
                422,
                "business-rule",
                f"Bundle.entry[{index}].resource.securityContext must be this transaction's "
                "ServiceRequest or Task entry, or the DocumentReference entry the file is of.",
                expression=[f"Bundle.entry[{index}].resource.securityContext"],
            )
    return used


def _stored_identifiers(row: FhirResource) -> list[Any]:
    return list(json.loads(row.json_r4 or row.json_r5).get("identifier") or [])


def _entry_condition(entries: list[dict[str, Any]], index: int) -> str | None:
    """An entry's conditional create (FHIR's ``request.ifNoneExist``), if any."""
    condition = entries[index]["request"].get("ifNoneExist")
    if condition is not None and not isinstance(condition, str):
        raise FhirError(
            400,
            "structure",
            f"Bundle.entry[{index}].request.ifNoneExist must be a string.",
            expression=[f"Bundle.entry[{index}].request.ifNoneExist"],
        )
    return condition or None


# How a reference names another entry of the same transaction Bundle.
_ENTRY_REFERENCE = ("urn:uuid:", "urn:oid:")
# Within a transaction, what these elements must point at when they name an entry.
_REFERENCE_TARGETS = {
    ("ServiceRequest", "subject"): "Patient",
    ("Task", "focus"): "ServiceRequest",
    ("Task", "for"): "Patient",
    ("DocumentReference", "subject"): "Patient",
}


def _check_bundle_references(entries: list[dict[str, Any]]) -> None:
    """FHIR transaction rules: ``fullUrl`` unique, and every ``urn:uuid:`` / ``urn:oid:``
    reference resolves to an entry (of the type the element takes, where we read it)."""
    types: dict[str, str] = {}
    for index, entry in enumerate(entries):
        full_url = entry.get("fullUrl")
        if not isinstance(full_url, str) or not full_url:
            continue
        if full_url in types:
            raise FhirError(
                400,
                "invalid",
                f"Bundle.entry[{index}].fullUrl {full_url[:100]!r} is also an earlier entry's.",
                expression=[f"Bundle.entry[{index}].fullUrl"],
            )
        types[full_url] = str(entry["resource"].get("resourceType"))
    for index, entry in enumerate(entries):
        resource = entry["resource"]
        stack: list[tuple[Any, str]] = [(resource, "")]
        while stack:
            item, path = stack.pop()
            if isinstance(item, list):
                stack.extend((child, path) for child in item)
                continue
            if not isinstance(item, dict):
                continue
            reference = item.get("reference")
            if isinstance(reference, str) and reference.startswith(_ENTRY_REFERENCE):
                where = f"Bundle.entry[{index}].resource{path}"
                if reference not in types:
                    raise FhirError(
                        400,
                        "invalid",
                        f"{where} references {reference[:100]!r}, which no entry's fullUrl is.",
                        expression=[where],
                    )
                wanted = _REFERENCE_TARGETS.get((resource["resourceType"], path.lstrip(".")))
                if wanted and types[reference] != wanted:
                    raise FhirError(
                        422,
                        "business-rule",
                        f"{where} must reference a {wanted}, not the {types[reference]} entry "
                        f"{reference[:100]!r}.",
                        expression=[where],
                    )
            stack.extend(
                (value, f"{path}.{key}")
                for key, value in item.items()
                if isinstance(value, dict | list)
            )


def _case_files(referral: Referral) -> dict[str, list[FhirResource]]:
    """The current DocumentReferences of the case files the requester side stored, by the
    SHA-256 of their bytes, oldest first."""
    files = list(
        Attachment.objects.filter(
            referral=referral, uploaded_by__facility_id=referral.requester_facility_id
        )
        .order_by("number")
        .values_list("number", "sha256")
    )
    ids = {m.case_file_id(referral.filler_id, number): sha for number, sha in files}
    by_id = {
        row.logical_id: row
        for row in FhirResource.objects.filter(
            resource_type="DocumentReference", logical_id__in=list(ids), is_current=True
        ).exclude(deleted=True)
    }
    found: dict[str, list[FhirResource]] = {}
    for logical_id, sha in ids.items():
        if logical_id in by_id:
            found.setdefault(sha, []).append(by_id[logical_id])
    return found


def _inline_sha256(document: dict[str, Any]) -> str:
    """The SHA-256 of a case-file entry's one inline file; "" for anything else (a consult
    note, several or no contents, no data), which is then stored or refused as a first
    submission's would be."""
    contents = document.get("content") or []
    if _is_consult_note(document) or not isinstance(contents, list) or len(contents) != 1:
        return ""
    attachment = contents[0].get("attachment") if isinstance(contents[0], dict) else None
    if not isinstance(attachment, dict) or not attachment.get("data"):
        return ""
    where = "DocumentReference.content.attachment"
    data = m.attachment_bytes(attachment, where)
    _check_declared(attachment, data, where)  # refused as a first submission's would be
    return hashlib.sha256(data).hexdigest()


# The FHIR elements of selectors.referral_resubmission_differences' fields.
_RESUBMISSION_ELEMENTS = {
    "clinical_question": "the clinical question (reasonCode / reason)",
    "priority": "priority",
    "mode": "the consult mode",
    "patient": "the patient (subject)",
    "specialty": "the specialty (performerType)",
}


def _resubmission_differences(intake: m.Intake, referral: Referral) -> list[str]:
    """What a resubmission (the placer identifier of an existing referral) says otherwise
    than the referral it is answered with: the elements, by their FHIR names."""
    try:
        specialty_id: int | None = _specialty(intake).pk
    except FhirError:
        specialty_id = None  # no specialty we know: differs
    differs = referral_resubmission_differences(
        referral,
        clinical_question=intake.clinical_question,
        priority=intake.priority,
        mode=intake.mode,
        specialty_id=specialty_id,
        patient_ref=intake.patient_ref,
    )
    return [_RESUBMISSION_ELEMENTS[field] for field in differs]


def _resubmission_text(referral: Referral, differs: list[str]) -> str:
    return (
        f"This placer identifier names referral {referral.filler_id}, submitted before; this "
        f"submission differs in {', '.join(differs)}. The first submission stands and nothing "
        "of this one was applied: send what changed as a Communication on the Task, or cancel "
        "the Task and submit anew with another placer identifier."
    )


def _resubmission_warning(referral: Referral, differs: list[str]) -> dict[str, Any]:
    """The OperationOutcome of a resubmission whose content changed: the first submission
    stands (idempotent intake), and the sender learns its change was not applied."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "warning",
                "code": "business-rule",
                "diagnostics": _resubmission_text(referral, differs),
                "expression": ["ServiceRequest"],
            }
        ],
    }


def _transaction_response(
    entries: list[dict[str, Any]],
    outcomes: dict[int, tuple[FhirResource, str]],
    version: str,
    base: str,
    binaries: set[int] | frozenset[int] = frozenset(),
    notes: dict[int, dict[str, Any]] | None = None,
) -> str:
    """The transaction-response; a Binary entry (in ``binaries``) is answered with where
    its bytes are (``Binary/<its DocumentReference's id>``, see ``binary``), without them;
    an entry in ``notes`` carries that OperationOutcome as its ``response.outcome``."""
    parts = []
    for index in range(len(entries)):
        row, status = outcomes[index]
        text = row.json_for(version)
        modified = fhir_instant(row.last_updated)
        rtype, version_id = row.resource_type, row.version_id
        if index in binaries:  # the file's: a case file's DocumentReference is dated by it
            rtype, version_id = "Binary", 1
            modified = str(json.loads(text).get("date") or modified)
            text = ""
        location = f"{rtype}/{row.logical_id}/_history/{version_id}"
        response: dict[str, Any] = {
            "status": status,
            "location": location,
            "etag": f'W/"{version_id}"',
            "lastModified": modified,
        }
        if notes and index in notes:
            response["outcome"] = notes[index]
        entry = '{"fullUrl":' + json.dumps(f"{base}/{rtype}/{row.logical_id}")
        if text:
            entry += ',"resource":' + text
        entry += ',"response":' + dumps(response) + "}"
        parts.append(entry)
    head = {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "type": "transaction-response",
    }
    return dumps(head)[:-1] + ',"entry":[' + ",".join(parts) + "]}"


# --------------------------------------------------------------------------- registration


def _sp(name: str, type_: str, doc: str, resource_type: str) -> SearchParam:
    """A search parameter, with the modifiers its type's filters define (``name:not``
    for tokens, ``name:missing`` where a referral may have no value)."""
    filters = _FILTERS_OF[resource_type]
    modifiers = frozenset(key.partition(":")[2] for key in filters if key.startswith(f"{name}:"))
    return SearchParam(
        name,
        type_,
        doc,
        f"http://hl7.org/fhir/SearchParameter/{resource_type}-{name}",
        modifiers,
    )


_FILTERS_OF: dict[str, dict[str, Filter]] = {
    "Task": TASK_FILTERS,
    "ServiceRequest": SERVICE_REQUEST_FILTERS,
    "Communication": COMMUNICATION_FILTERS,
    "DocumentReference": DOCUMENT_REFERENCE_FILTERS,
}


def referral_handlers() -> list[ResourceHandler]:
    r, v, h, s, c, u, p = (
        handlers.READ,
        handlers.VREAD,
        handlers.HISTORY,
        handlers.SEARCH,
        handlers.CREATE,
        handlers.UPDATE,
        handlers.PATCH,
    )
    return [
        ResourceHandler(
            "ServiceRequest",
            (r, v, h, s, c),
            documentation="A referral (the order). Create = submit; conditional create with "
            "If-None-Exist: identifier=<placer system>|<value> is idempotent. Create with "
            "basedOn = ServiceRequest/<id> (performer = a department of its requester) = "
            "counter-referral of that referral. _sort: priority (most urgent first), "
            "authored, status (by code), _lastUpdated, _id; - for descending.",
            search_params=(
                _sp("requester", "reference", "Requesting Organization.", "ServiceRequest"),
                _sp("performer", "reference", "Assigned HealthcareService.", "ServiceRequest"),
                _sp("status", "token", "active | draft | revoked | completed.", "ServiceRequest"),
                _sp("identifier", "token", "Placer or filler identifier.", "ServiceRequest"),
                _sp("patient", "reference", "The referral's Patient.", "ServiceRequest"),
            ),
            search=_search("ServiceRequest", SERVICE_REQUEST_FILTERS),
            search_sql=_search_sql("ServiceRequest", SERVICE_REQUEST_FILTERS),
            create=_service_request_create,
            conditional_create=True,
            renders_all_versions=True,
            visible=_visible("ServiceRequest"),
            includes={"ServiceRequest:patient": _same_referral("Patient")},
            sorts=_referral_sorts("ServiceRequest", "authored"),
            sort_sql=_referral_sorts_sql("ServiceRequest", "authored"),
            revincludes={"Task:focus": _same_referral("Task")},
        ),
        ResourceHandler(
            "Task",
            (r, v, h, s, u, p),
            documentation="The referral's workflow. Update with If-Match: status received | "
            "accepted | rejected (+statusReason) | cancelled; owner (+statusReason) = forward; "
            "businessStatus scheduled | in_conference | advised (from in_conference) | "
            "closed_local | transfer_requested | transfer_accepted | in_transit | arrived | "
            "completed (+input, statusReason); a scheduled Task with a new input scheduled-at "
            "/ experts / video-url = reschedule. PATCH (JSON Patch, JSON Merge Patch) = the "
            "PUT of its result. _sort: priority (most urgent first), authored-on, "
            "status (by code), business-status (by our state's code), _lastUpdated, _id; "
            "- for descending.",
            search_params=(
                _sp("owner", "reference", "Assigned HealthcareService.", "Task"),
                _sp("requester", "reference", "Requesting Organization.", "Task"),
                _sp("status", "token", "Task.status.", "Task"),
                _sp("business-status", "token", "Our state or the BSeR code.", "Task"),
                _sp("focus", "reference", "The ServiceRequest.", "Task"),
                _sp("patient", "reference", "The Patient (Task.for).", "Task"),
                _sp("authored-on", "date", "When the referral was created.", "Task"),
                _sp("identifier", "token", "Placer or filler identifier.", "Task"),
            ),
            search=_search("Task", TASK_FILTERS),
            search_sql=_search_sql("Task", TASK_FILTERS),
            update=_task_update,
            renders_all_versions=True,
            visible=_visible("Task"),
            includes={
                "Task:focus": _same_referral("ServiceRequest"),
                "Task:patient": _same_referral("Patient"),
            },
            revincludes={"Communication:part-of": _revinclude_communications},
            sorts=_referral_sorts("Task", "authored-on"),
            sort_sql=_referral_sorts_sql("Task", "authored-on"),
        ),
        ResourceHandler(
            "Patient",
            (r, v),
            documentation="Only as part of a referral; minimum necessary (identifier, gender, "
            "birth year).",
            renders_all_versions=True,
            visible=_visible("Patient"),
        ),
        ResourceHandler(
            "Communication",
            (r, v, s, c),
            documentation="Messages of a referral: partOf = its Task; inResponseTo. "
            "Conditional create with If-None-Exist: identifier=<system>|<value> (a key the "
            "member makes per message) is idempotent within the referral.",
            search_params=(
                _sp("part-of", "reference", "The referral's Task.", "Communication"),
                _sp(
                    "identifier",
                    "token",
                    "An identifier the member gave the message (Communication.identifier, "
                    "or its If-None-Exist key).",
                    "Communication",
                ),
            ),
            search=_search("Communication", COMMUNICATION_FILTERS),
            search_sql=_search_sql("Communication", COMMUNICATION_FILTERS),
            create=_communication_create,
            conditional_create=True,
            renders_all_versions=True,
            visible=_visible("Communication"),
        ),
        ResourceHandler(
            "DocumentReference",
            (r, v, s, c),
            documentation="Consult note (LOINC 11488-4, disposition extension) = advise; "
            "other documents = case files (inline data). Conditional create with "
            "If-None-Exist: identifier=<system>|<value> (a key the member makes per "
            "document) is idempotent within the referral.",
            search_params=(
                _sp(
                    "identifier",
                    "token",
                    "An identifier the member gave the document (DocumentReference.identifier, "
                    "or its If-None-Exist key).",
                    "DocumentReference",
                ),
                _sp(
                    "related",
                    "reference",
                    "The referral's ServiceRequest (R4 context.related).",
                    "DocumentReference",
                ),
                _sp(
                    "based-on",
                    "reference",
                    "The referral's ServiceRequest (R5 basedOn).",
                    "DocumentReference",
                ),
                _sp(
                    "type",
                    "token",
                    "A consult note's LOINC 11488-4; a case file's type as its member sent it.",
                    "DocumentReference",
                ),
                _sp(
                    "date",
                    "date",
                    "When the note was written or the file stored (DocumentReference.date).",
                    "DocumentReference",
                ),
            ),
            search=_search("DocumentReference", DOCUMENT_REFERENCE_FILTERS),
            search_sql=_search_sql("DocumentReference", DOCUMENT_REFERENCE_FILTERS),
            create=_document_reference_create,
            conditional_create=True,
            renders_all_versions=True,
            visible=_visible("DocumentReference"),
        ),
    ]


def register_all() -> None:
    for handler in referral_handlers():
        handlers.register(handler)
    handlers.SYSTEM_INTERACTIONS["transaction"] = transaction_bundle
