"""Writes to referrals. Every state change goes through ``referral_transition`` (or the
intake, ``referral_submit``), which enforces ``workflow.TRANSITIONS`` under a row lock and
appends one ``ReferralEvent`` per change in the same transaction."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from guardian.conf import settings as guardian_settings

from accounts.models import User
from core.errors import ApplicationError, Conflict, NotFound, PermissionDenied
from core.rows import fetch_prepared
from core.values import FIRST_YEAR, LAST_YEAR, row_id, year_supported
from referrals.load import department_load_move, load_slot
from referrals.models import (
    MIN_BIRTH_YEAR,
    ActorSide,
    CloseOut,
    ConsultNote,
    Message,
    PatientSex,
    Priority,
    Referral,
    ReferralEvent,
    ReferralState,
    latest_birth_year,
)
from referrals.notifications import notify_in_transaction, notify_transition_later
from referrals.numbering import next_number
from referrals.permissions import referral_experts_grant, referral_grants_revoke
from referrals.selectors import (
    referral_open_question_id,
    referral_scope_filter,
    sees_patient_data,
)
from referrals.workflow import (
    GUARDS,
    TERMINAL_STATES,
    TRANSITIONS,
    TRANSITIONS_BY_ACTION,
    InputField,
    Transition,
)
from registry.models import ConsultMode, Department, Facility, Practitioner, Specialty

# The acceptance deadline is the department's SLA, shortened for urgent cases.
PRIORITY_MAX_HOURS: dict[int, int | None] = {
    Priority.STAT: 1,
    Priority.ASAP: 4,
    Priority.URGENT: 24,
    Priority.ROUTINE: None,
}
COUNTER_REFERRAL_SYSTEM = "urn:consilium:counter-referral"
MAX_TEXT = 20_000


def referral_deadline(*, department: Department | None, priority: int, start: datetime) -> datetime:
    """The acceptance deadline: the department's SLA hours, or for a referral no
    department can take yet ``REFERRAL_UNROUTED_DEADLINE_HOURS`` (routed again until then,
    then expired: it must not wait unseen); both capped by the priority."""
    hours = (
        department.sla_hours
        if department is not None
        else int(settings.REFERRAL_UNROUTED_DEADLINE_HOURS)
    )
    cap = PRIORITY_MAX_HOURS.get(priority)
    if cap is not None:
        hours = min(hours, cap)
    return start + timedelta(hours=hours)


# --- who is acting -----------------------------------------------------------------------


def actor_sides(user: User | None, referral: Referral) -> frozenset[str]:
    if user is None:
        return frozenset({ActorSide.SYSTEM.value})
    sides: set[str] = set()
    if user.facility_id is not None and user.facility_id == referral.requester_facility_id:
        sides.add(ActorSide.REQUESTER.value)
    if referral.assigned_department_id in user.department_ids():
        sides.add(ActorSide.ASSIGNEE.value)
    return frozenset(sides)


def _permission_problem(
    transition: Transition, user: User | None, referral: Referral
) -> str | None:
    if transition.side not in actor_sides(user, referral):
        side = ActorSide(transition.side).label.lower()
        return f"Only the {side} may {transition.action.replace('_', ' ')} this referral."
    if user is not None and not (user.role_names() & transition.roles):
        return f"Your role may not {transition.action.replace('_', ' ')} referrals."
    return None


def referral_available_actions(
    user: User | None, referral: Referral, *, now: datetime | None = None
) -> list[str]:
    """The actions the caller may take now (input-dependent guard checks aside)."""
    now = now or timezone.now()
    available = []
    for transition in TRANSITIONS:
        if transition.side == ActorSide.SYSTEM and user is not None:
            continue
        if referral.state not in transition.sources:
            continue
        if _permission_problem(transition, user, referral) is not None:
            continue
        guard = GUARDS[transition.guard] if transition.guard else None
        if guard is not None and guard(referral, None, now) is not None:
            continue
        available.append(transition.action)
    return available


# --- inputs ------------------------------------------------------------------------------


def _parse_text(field: InputField, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a non-empty text is required")
    if len(value) > MAX_TEXT:
        raise ValueError(f"at most {MAX_TEXT} characters")
    if "\x00" in value:
        raise ValueError("a text without NUL characters")
    return value.strip()


def _parse_choice(field: InputField, value: Any) -> str:
    if value not in field.choices:
        raise ValueError(f"one of {', '.join(field.choices)}")
    return str(value)


def _parse_bool(field: InputField, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _parse_datetime(field: InputField, value: Any) -> datetime:
    parsed = parse_datetime(value) if isinstance(value, str) else value
    if not isinstance(parsed, datetime) or timezone.is_naive(parsed):
        raise ValueError("an ISO 8601 date-time with a time zone")
    if not year_supported(parsed):
        raise ValueError(f"a date-time between the years {FIRST_YEAR} and {LAST_YEAR}")
    return parsed


def _parse_department(field: InputField, value: Any) -> Department:
    if isinstance(value, Department):
        return value
    pk = row_id(value)
    department = Department.objects.select_related("facility").filter(pk=pk).first() if pk else None
    if department is None:
        raise ValueError("an existing department id")
    return department


def _parse_users(field: InputField, value: Any) -> list[User]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("a non-empty list of user ids")
    ids = {int(v.pk) if isinstance(v, User) else row_id(v) for v in value}
    if None in ids:
        raise ValueError("a list of user ids")
    # django-guardian's anonymous user is a row too: it is nobody to invite.
    users = list(
        User.objects.filter(pk__in=ids, is_active=True).exclude(
            username=guardian_settings.ANONYMOUS_USER_NAME
        )
    )
    if len(users) != len(ids):
        raise ValueError("unknown or inactive user ids")
    return users


def _parse_url(field: InputField, value: Any) -> str:
    try:
        URLValidator(schemes=["https", "http"])(value)
    except ValidationError as exc:
        raise ValueError("an http(s) URL") from exc
    if len(str(value)) > MAX_URL:
        raise ValueError(f"an http(s) URL of at most {MAX_URL} characters")
    return str(value)


MAX_URL = Referral._meta.get_field("conference_url").max_length or 500


PARSERS: dict[str, Callable[[InputField, Any], Any]] = {
    "text": _parse_text,
    "choice": _parse_choice,
    "bool": _parse_bool,
    "datetime": _parse_datetime,
    "department": _parse_department,
    "users": _parse_users,
    "url": _parse_url,
}


def parse_inputs(transition: Transition, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check and convert an action's inputs; a 400 lists every problem at once."""
    errors: dict[str, str] = {}
    known = {f.name for f in transition.inputs}
    for name in raw:
        if name not in known:
            errors[name] = "not an input of this action"
    data: dict[str, Any] = {}
    for field in transition.inputs:
        value = raw.get(field.name)
        if value is None or value == "":
            if field.required:
                errors[field.name] = "required"
            continue
        try:
            data[field.name] = PARSERS[field.kind](field, value)
        except ValueError as exc:
            errors[field.name] = str(exc)
    if errors:
        raise ApplicationError(
            f"Invalid input for {transition.action}.", code="invalid", extra={"errors": errors}
        )
    return data


# --- effects: what each action changes besides the state ---------------------------------

Effect = Callable[[Referral, User | None, dict[str, Any], datetime], dict[str, Any]]


def _effect_submit(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    routed: dict[str, Any] | None = None
    if referral.assigned_department is None:
        # No department chosen: routing assigns the best candidate; with none the
        # referral stays submitted and unassigned (the deadline job retries it).
        from referrals.routing import best_department

        best = best_department(referral, now=now)
        if best is not None:
            referral.assigned_department = Department.objects.get(pk=best.department_id)
            routed = best.as_payload()
    if referral.assigned_department is not None:
        referral.assigned_at = now
    referral.deadline = referral_deadline(
        department=referral.assigned_department, priority=referral.priority, start=now
    )
    payload: dict[str, Any] = {"department_id": referral.assigned_department_id}
    if routed is not None:
        payload["routing"] = routed
    return payload


def _effect_decline(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    # After commit, routing offers the case to the next candidate (referrals.escalation).
    from referrals.escalation import reroute_declined_later

    transaction.on_commit(lambda: reroute_declined_later(referral.pk))
    return {"reason_code": data["reason_code"], "department_id": referral.assigned_department_id}


def _effect_forward(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    department: Department = data["department"]
    previous = referral.assigned_department_id
    referral.assigned_department = department
    referral.assigned_at = now
    referral.acknowledged_at = None  # the new department has not seen it yet
    # The new department gets its own SLA from now; access moves with the assignment.
    referral.deadline = referral_deadline(
        department=department, priority=referral.priority, start=now
    )
    return {"from_department_id": previous, "department_id": department.pk}


def _effect_reroute(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    payload = _effect_forward(referral, actor, data, now)
    if data.get("routing"):
        payload["routing"] = data["routing"]
    return payload


def _effect_acknowledge(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    referral.acknowledged_at = now
    return {"department_id": referral.assigned_department_id}


def _effect_escalation_notify(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    assert referral.deadline is not None  # the guard checked it passed
    return {
        "department_id": referral.assigned_department_id,
        "deadline": referral.deadline.isoformat(),
    }


def _effect_request_info(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    message = Message.objects.create(
        referral=referral,
        author=actor,
        text=data["question"],
        created_at=now,
        number=next_number(Message, referral),
    )
    return {"message_id": message.pk}


def _effect_provide_info(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    question = referral_open_question_id(referral)
    message = Message.objects.create(
        referral=referral,
        author=actor,
        text=data["text"],
        in_response_to_id=question,
        created_at=now,
        number=next_number(Message, referral),
    )
    return {"message_id": message.pk, "in_response_to": question}


def _effect_schedule(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    referral.conference_at = data["scheduled_at"]
    referral.conference_url = data["video_url"]
    experts: list[User] = data["experts"]
    referral.conference_experts.set(experts)
    referral_experts_grant(referral=referral, experts=experts)  # guardian view grants
    return {
        "scheduled_at": data["scheduled_at"].isoformat(),
        "video_url": data["video_url"],
        "experts": sorted(u.pk for u in experts),
    }


def _consult_note(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    note = ConsultNote.objects.create(
        referral=referral,
        author=actor,
        disposition=data["disposition"],
        text=data["text"],
        conference_minutes=data.get("minutes", ""),
        created_at=now,
        number=next_number(ConsultNote, referral),
    )
    return {"consult_note_id": note.pk, "disposition": note.disposition}


def _effect_close_local(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    CloseOut.objects.create(
        referral=referral,
        transfer_originally_considered=data["transfer_originally_considered"],
        outcome=data["outcome"],
        answered_by=actor,
        answered_at=now,
    )
    return {
        "transfer_originally_considered": data["transfer_originally_considered"],
        "outcome": data["outcome"],
    }


def _effect_counter_refer(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    department: Department = data["department"]
    assert referral.assigned_department is not None  # the guard side check implies it
    sequence = referral.counter_referrals.count() + 1
    child = _referral_create(
        actor=actor,
        requester_facility=referral.assigned_department.facility,
        placer_system=COUNTER_REFERRAL_SYSTEM,
        placer_value=f"{referral.filler_id}/{sequence}",
        specialty=department.specialty,
        clinical_question=data["clinical_question"],
        mode=data.get("mode") or ConsultMode.ASYNC,
        priority=Priority.from_code(data.get("priority") or Priority.ROUTINE.label),
        patient_ref=referral.patient_ref,
        patient_sex=referral.patient_sex,
        patient_birth_year=referral.patient_birth_year,
        department=department,
        campaign=referral.campaign,
        parent_referral=referral,
        draft=False,
        now=now,
    )
    return {"counter_referral_id": child.pk, "department_id": department.pk}


def _no_effect(
    referral: Referral, actor: User | None, data: dict[str, Any], now: datetime
) -> dict[str, Any]:
    return {}


EFFECTS: dict[str, Effect] = {
    "submit": _effect_submit,
    "decline": _effect_decline,
    "forward": _effect_forward,
    "request_info": _effect_request_info,
    "provide_info": _effect_provide_info,
    "schedule": _effect_schedule,
    "finish_conference": _consult_note,
    "advise": _consult_note,
    "close_local": _effect_close_local,
    "counter_refer": _effect_counter_refer,
    "reroute": _effect_reroute,
    "escalation_notify": _effect_escalation_notify,
    "acknowledge": _effect_acknowledge,
}

# Inputs stored as the event's free-text reason.
REASON_INPUTS = ("reason", "note")
PLACER_MAX_LENGTH = Referral._meta.get_field("placer_value").max_length or 255


def _apply(
    *,
    referral: Referral,
    transition: Transition,
    actor: User | None,
    side: str,
    data: dict[str, Any],
    now: datetime,
) -> ReferralEvent:
    """Change the state, run the effect, bump the version, append the event. The caller
    holds the row lock and has checked everything."""
    from_state = referral.state
    inserted = referral.pk is None  # a submission built unsaved (``_create``)
    load_before = load_slot(referral)
    payload = EFFECTS.get(transition.action, _no_effect)(referral, actor, data, now)
    referral.state = transition.target_from(from_state)
    referral.version += 1
    referral.save()
    reason = next((data[name] for name in REASON_INPUTS if data.get(name)), "")
    if referral.state in TERMINAL_STATES and referral.conference_at is not None:
        referral_grants_revoke(referral=referral)  # invited experts lose access at the end
    event = ReferralEvent.objects.create(
        referral=referral,
        seq=referral.version,
        actor=actor,
        actor_side=side,
        at=now,
        action=transition.action,
        from_state=from_state,
        to_state=referral.state,
        department_id=referral.assigned_department_id,
        reason=reason,
        payload=payload,
    )
    # In-app notifications commit with the event; e-mail goes after the commit (and a beat
    # sweep catches a lost hand-off). See referrals/notifications.py.
    notify_in_transaction(event, referral)
    transaction.on_commit(lambda: notify_transition_later(event.pk))
    # FHIR projection + outbox in this transaction (decisions 1, 2); imported here so the
    # referral domain does not load the FHIR gateway at import time.
    from fhir_gateway.publish import referral_changed

    referral_changed(referral=referral, event=event, new=inserted)
    # Routing's live load, last: its counter row stays locked only until the commit.
    department_load_move(before=load_before, after=load_slot(referral), referral_id=referral.pk)
    return event


def _state_conflict(referral: Referral, message: str, code: str) -> Conflict:
    return Conflict(
        message, code=code, extra={"state": referral.state, "version": referral.version}
    )


def referral_transition(
    *,
    actor: User | None,
    referral_id: int,
    action: str,
    expected_version: int | None = None,
    now: datetime | None = None,
    **inputs: Any,
) -> Referral:
    """Take one action on a referral. ``actor`` None is the system (deadline job).

    Refusals raise and change nothing: 404 outside the caller's scope, 403 for the wrong
    side or role, 409 (code ``version_mismatch``) when ``expected_version`` is stale,
    409 (``transition_not_allowed``) from the wrong state, 400 for bad inputs, 409
    (``guard_failed``) when the guard says no."""
    transition = TRANSITIONS_BY_ACTION.get(action)
    if transition is None:
        raise ApplicationError(f"Unknown action {action!r}.", code="unknown_action")
    now = now or timezone.now()
    with transaction.atomic():
        # The FHIR projection reads the specialty and the department (endpoints): loaded
        # with the locked row (only the referral row is locked).
        queryset = Referral.objects.select_for_update(of=("self",)).select_related(
            "specialty", "assigned_department"
        )
        if actor is not None:
            scope = referral_scope_filter(actor)
            if scope is None:
                raise NotFound("No such referral.")
            queryset = queryset.filter(scope)
        try:
            referral = queryset.get(pk=referral_id)
        except Referral.DoesNotExist as exc:
            raise NotFound("No such referral.") from exc

        problem = _permission_problem(transition, actor, referral)
        if problem is not None:
            raise PermissionDenied(problem)
        if expected_version is not None and expected_version != referral.version:
            raise _state_conflict(
                referral,
                f"The referral changed (version {referral.version}, you had {expected_version}).",
                "version_mismatch",
            )
        if referral.state not in transition.sources:
            raise _state_conflict(
                referral,
                f"Cannot {action.replace('_', ' ')} a referral that is {referral.get_state_display().lower()}.",
                "transition_not_allowed",
            )
        data = parse_inputs(transition, inputs)
        if transition.guard is not None:
            refusal = GUARDS[transition.guard](referral, data, now)
            if refusal is not None:
                raise _state_conflict(referral, refusal, "guard_failed")
        side = transition.side
        _apply(referral=referral, transition=transition, actor=actor, side=side, data=data, now=now)
    return referral


def referral_system_transition(
    *, referral: Referral, action: str, now: datetime, **data: Any
) -> ReferralEvent:
    """Take a system action on a referral the caller has already locked (``SELECT ... FOR
    UPDATE``, e.g. with SKIP LOCKED) in the current transaction. Used by the deadline job
    and routing, which also record details a public input cannot carry (``routing``).
    Checks the table (system side, source state, guard) like ``referral_transition``."""
    transition = TRANSITIONS_BY_ACTION[action]
    if transition.side != ActorSide.SYSTEM:
        raise ApplicationError(f"{action} is not a system action.", code="unknown_action")
    if referral.state not in transition.sources:
        raise _state_conflict(
            referral,
            f"Cannot {action.replace('_', ' ')} a referral that is {referral.get_state_display().lower()}.",
            "transition_not_allowed",
        )
    if transition.guard is not None:
        refusal = GUARDS[transition.guard](referral, data, now)
        if refusal is not None:
            raise _state_conflict(referral, refusal, "guard_failed")
    return _apply(
        referral=referral,
        transition=transition,
        actor=None,
        side=ActorSide.SYSTEM,
        data=data,
        now=now,
    )


# --- intake ------------------------------------------------------------------------------


def _referral_create(
    *,
    actor: User | None,
    requester_facility: Facility,
    placer_system: str,
    placer_value: str,
    specialty: Specialty,
    clinical_question: str,
    mode: str,
    priority: int,
    patient_ref: str,
    patient_sex: str,
    patient_birth_year: int | None,
    department: Department | None,
    campaign: str,
    parent_referral: Referral | None = None,
    requester_practitioner: Practitioner | None = None,
    draft: bool,
    now: datetime,
) -> Referral:
    # Built unsaved: a draft is inserted here, a submission by ``_apply`` (one INSERT of
    # the submitted row instead of an INSERT of the draft and an UPDATE).
    referral = Referral(
        placer_system=placer_system,
        placer_value=placer_value,
        requester_facility=requester_facility,
        requester=actor,
        requester_practitioner=requester_practitioner,
        patient_ref=patient_ref,
        patient_sex=patient_sex,
        patient_birth_year=patient_birth_year,
        specialty=specialty,
        mode=mode,
        priority=priority,
        clinical_question=clinical_question,
        assigned_department=department,
        campaign=campaign,
        parent_referral=parent_referral,
        state=ReferralState.DRAFT,
        created_at=now,
    )
    if draft:
        referral.save(force_insert=True)
    else:
        _apply(
            referral=referral,
            transition=TRANSITIONS_BY_ACTION["submit"],
            actor=actor,
            side=ActorSide.REQUESTER,
            data={},
            now=now,
        )
    return referral


_PLACER_LOOKUP = (
    f"SELECT id FROM {Referral._meta.db_table} "  # noqa: S608 (the table from the model)
    "WHERE requester_facility_id = %s AND placer_system = %s AND placer_value = %s"
)


def _find_existing(
    requester_facility: Facility, placer_system: str, placer_value: str
) -> Referral | None:
    """The referral this placer identifier already made, if any. Every submission asks
    and almost every answer is none: a prepared id lookup over the unique index, the
    row read only when there is one."""
    found = fetch_prepared(_PLACER_LOOKUP, [requester_facility.pk, placer_system, placer_value])
    return Referral.objects.get(pk=found[0][0]) if found else None


def referral_submit(
    *,
    actor: User,
    requester_facility: Facility,
    placer_system: str,
    placer_value: str,
    specialty: Specialty,
    clinical_question: str,
    mode: str = ConsultMode.ASYNC,
    priority: int = Priority.ROUTINE,
    patient_ref: str = "",
    patient_sex: str = PatientSex.UNKNOWN,
    patient_birth_year: int | None = None,
    requester_practitioner: Practitioner | None = None,
    department: Department | None = None,
    campaign: str = "",
    draft: bool = False,
    now: datetime | None = None,
) -> tuple[Referral, bool]:
    """Intake. Idempotent: the same placer identifier from the same facility returns the
    existing referral and ``created`` False (offline sites retry), whatever else differs."""
    now = now or timezone.now()
    submit = TRANSITIONS_BY_ACTION["submit"]
    if not actor.role_names() & submit.roles:
        raise PermissionDenied(
            f"Your role may not submit referrals (that takes one of: "
            f"{', '.join(sorted(submit.roles))})."
        )
    if actor.facility_id != requester_facility.pk:
        raise PermissionDenied("You may only submit referrals for your own facility.")
    if not sees_patient_data(actor):  # a ministry official could not read what it made
        raise PermissionDenied("Ministry officials do not submit referrals.")
    if not placer_system or not placer_value:
        raise ApplicationError("A placer identifier (system and value) is required.")
    if max(len(placer_system), len(placer_value)) > PLACER_MAX_LENGTH:
        raise ApplicationError(
            f"The placer identifier's system and value must be at most {PLACER_MAX_LENGTH} "
            "characters."
        )
    existing = _find_existing(requester_facility, placer_system, placer_value)
    if existing is not None:
        return existing, False
    if not clinical_question.strip():
        raise ApplicationError("A clinical question is required.")
    if patient_birth_year is not None and not (
        MIN_BIRTH_YEAR <= patient_birth_year <= latest_birth_year(now)
    ):
        raise ApplicationError(
            f"The patient's birth year must be between {MIN_BIRTH_YEAR} and this year.",
            code="invalid",
        )
    if department is not None:
        if department.specialty_id != specialty.pk:
            raise ApplicationError(
                "The department does not offer the requested specialty.",
                code="department_not_candidate",
            )
        if mode not in department.modes:
            raise ApplicationError(
                f"The department does not offer {mode} consults.", code="department_not_candidate"
            )
        if not department.accepting:
            raise Conflict("That department is not accepting referrals.", code="not_accepting")
        from referrals.routing import department_problem

        problem = department_problem(
            requester_facility_id=requester_facility.pk,
            specialty_id=specialty.pk,
            mode=mode,
            patient_ref=patient_ref,
            department_id=department.pk,
            now=now,
        )
        if problem is not None:
            raise ApplicationError(problem, code="department_not_candidate")
    try:
        with transaction.atomic():
            referral = _referral_create(
                actor=actor,
                requester_facility=requester_facility,
                placer_system=placer_system,
                placer_value=placer_value,
                specialty=specialty,
                clinical_question=clinical_question,
                mode=mode,
                priority=priority,
                patient_ref=patient_ref,
                patient_sex=patient_sex,
                patient_birth_year=patient_birth_year,
                requester_practitioner=requester_practitioner,
                department=department,
                campaign=campaign,
                draft=draft,
                now=now,
            )
    except IntegrityError:
        # A concurrent retry of the same submission won the insert.
        existing = _find_existing(requester_facility, placer_system, placer_value)
        if existing is None:
            raise
        return existing, False
    return referral, True


# --- named wrappers ----------------------------------------------------------------------


def _wrapper(action: str) -> Callable[..., Referral]:
    def run(
        *, actor: User | None, referral_id: int, expected_version: int | None = None, **inputs: Any
    ) -> Referral:
        return referral_transition(
            actor=actor,
            referral_id=referral_id,
            action=action,
            expected_version=expected_version,
            **inputs,
        )

    run.__name__ = f"referral_{action}"
    run.__doc__ = f"Take the {action!r} action (see workflow.TRANSITIONS)."
    return run


referral_accept = _wrapper("accept")
referral_decline = _wrapper("decline")
referral_forward = _wrapper("forward")
referral_cancel = _wrapper("cancel")
referral_request_info = _wrapper("request_info")
referral_provide_info = _wrapper("provide_info")
referral_schedule = _wrapper("schedule")
referral_advise = _wrapper("advise")
referral_close_local = _wrapper("close_local")
referral_request_transfer = _wrapper("request_transfer")
referral_counter_refer = _wrapper("counter_refer")


# --- messages outside a transition ---------------------------------------------------------


def referral_message_post(
    *,
    actor: User,
    referral_id: int,
    text: str,
    in_response_to_id: int | None = None,
    client_key: str = "",
) -> tuple[Referral, Message, bool]:
    """A message between the two parties that changes no state (no event). Either side of
    a referral that is not finished may post; 404 outside the caller's scope.

    ``client_key`` (the web form's token): the same key from the same author on the same
    referral with the same text answers the first message (``created`` False) instead of
    posting it again; with another text it is refused (409 ``message_key_used``): the
    form was used again (the back button), and its new text must not be taken for the
    first."""
    key_length = Message._meta.get_field("client_key").max_length or 0
    if len(client_key) > key_length:
        raise ApplicationError(
            f"A message key has at most {key_length} characters.", code="message_key_invalid"
        )
    if "\x00" in client_key:  # PostgreSQL text holds no NUL: the key's lookup was a 500
        raise ApplicationError(
            "A message key cannot hold NUL characters.", code="message_key_invalid"
        )
    text = text.strip() if isinstance(text, str) else ""
    if not text:
        raise ApplicationError("A message needs a text.", code="invalid")
    if len(text) > MAX_TEXT:
        raise ApplicationError(f"A message has at most {MAX_TEXT} characters.", code="invalid")
    if "\x00" in text:
        raise ApplicationError("A message cannot hold NUL characters.", code="invalid")
    with transaction.atomic():
        scope = referral_scope_filter(actor)
        if scope is None:
            raise NotFound("No such referral.")
        try:
            referral = Referral.objects.select_for_update().filter(scope).get(pk=referral_id)
        except Referral.DoesNotExist as exc:
            raise NotFound("No such referral.") from exc
        if not actor_sides(actor, referral):
            raise PermissionDenied("Only the two parties of a referral may post messages.")
        if client_key:
            # Under the referral's row lock: a second post with the key waits for the first.
            earlier = Message.objects.filter(
                referral=referral, author=actor, client_key=client_key
            ).first()
            if earlier is not None and earlier.text == text:
                return referral, earlier, False
            if earlier is not None:  # a form used again for another text (the back button)
                raise Conflict(
                    "This form already sent another message; yours was not sent. Send it again.",
                    code="message_key_used",
                )
        if referral.state in TERMINAL_STATES:
            raise Conflict(
                f"Messages cannot be posted on a referral that is {referral.get_state_display().lower()}.",
                code="transition_not_allowed",
            )
        if referral.state == ReferralState.DRAFT:
            # A draft is its requester's alone: a message would be sent to the department
            # it names before the case is (and then its submit could not be published).
            raise Conflict(
                "A draft has no other side yet: submit it first, then send the message.",
                code="transition_not_allowed",
            )
        if (
            in_response_to_id is not None
            and not Message.objects.filter(pk=in_response_to_id, referral=referral).exists()
        ):
            raise ApplicationError("inResponseTo is not a message of this referral.")
        message = Message.objects.create(
            referral=referral,
            author=actor,
            text=text,
            in_response_to_id=in_response_to_id,
            client_key=client_key,
            number=next_number(Message, referral),
        )
        from fhir_gateway.publish import message_posted

        message_posted(referral=referral, message=message)
    return referral, message, True
