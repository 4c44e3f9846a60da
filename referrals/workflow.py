"""The referral state machine: ONE table, ``TRANSITIONS``, defines every allowed change.

Services enforce it, the API lists and exposes it (one URL per action), and
``manage.py state_machine_doc`` renders docs/state-machine.md from it. This module is
pure: no database writes, so it can be imported anywhere (docs, tests, the FHIR mapping).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from accounts.roles import Role
from referrals.models import (
    ActorSide,
    CloseOutOutcome,
    DeclineReason,
    Disposition,
    Priority,
    Referral,
    ReferralState,
)
from registry.models import ConsultMode

S = ReferralState

# Who acts for each side. Ministry officials and stewards are on neither side.
REQUESTER_ROLES = frozenset({Role.REFERRER.value, Role.COORDINATOR.value})
REQUESTER_OR_SYSTEM_ROLES = REQUESTER_ROLES | {Role.MEMBER_SYSTEM.value}
ASSIGNEE_ROLES = frozenset({Role.CONSULTANT.value, Role.COORDINATOR.value})
# A hospital system may take the actions FHIR carries (Task.status / owner /
# businessStatus / input, the consult note, Communications, a counter-referral
# ServiceRequest); see docs/fhir.md.
ASSIGNEE_OR_SYSTEM_ROLES = ASSIGNEE_ROLES | {Role.MEMBER_SYSTEM.value}
NO_ROLES: frozenset[str] = frozenset()

TERMINAL_STATES = frozenset({S.DECLINED, S.CANCELLED, S.EXPIRED, S.CLOSED_LOCAL, S.COMPLETED})
# Terminal for people; only the system may reopen these (reroute after a decline).
REOPENABLE_BY_SYSTEM = frozenset({S.DECLINED})
# States a case is "finished" in: it may spawn a counter-referral back down.
FINISHED_STATES = frozenset({S.ADVISED, S.CLOSED_LOCAL, S.COMPLETED})


@dataclass(frozen=True)
class InputField:
    """One input of an action. ``kind`` decides how services parse it and how the API
    serializer and the OpenAPI schema describe it."""

    name: str
    kind: str  # text | choice | bool | datetime | department | users | url
    required: bool = True
    choices: tuple[str, ...] = ()
    help: str = ""


# A guard answers "why not?" (a message) or None when the action may go ahead.
# ``data`` is None when only the referral is known (listing available actions); the
# input-dependent part of a guard runs when the action is actually attempted.
Guard = Callable[[Referral, Mapping[str, Any] | None, datetime], str | None]


def _guard_forward_target(
    referral: Referral, data: Mapping[str, Any] | None, now: datetime
) -> str | None:
    if data is None:
        return None
    department = data["department"]
    if department.pk == referral.assigned_department_id:
        return "The referral is already assigned to that department."
    if not department.accepting:
        return "That department is not accepting referrals."
    if department.facility_id == referral.requester_facility_id:
        return "A referral cannot be forwarded to the requesting facility."
    # Routing's own rules, as at intake (for the department's specialty): the mode, a
    # higher tier or a support link, never across a border without a data-sharing
    # agreement, identifiable data only where the link allows it.
    return _routing_problem(referral, department, now)


def _routing_problem(referral: Referral, department: Any, now: datetime) -> str | None:
    """Would the intake take ``department`` for this case, for the department's own
    specialty (a case sent to the wrong specialty may move to the right one)?"""
    from referrals.routing import department_problem

    return department_problem(
        requester_facility_id=referral.requester_facility_id,
        specialty_id=department.specialty_id,
        mode=referral.mode,
        patient_ref=referral.patient_ref,
        department_id=department.pk,
        now=now,
    )


def _guard_submit_department(
    referral: Referral, data: Mapping[str, Any] | None, now: datetime
) -> str | None:
    """A draft that names its department is sent there only if the intake would still
    take it (the department may have stopped accepting, or left routing, meanwhile)."""
    department = referral.assigned_department
    if data is None or department is None:  # none: routing chooses when it is sent
        return None
    if not department.accepting:
        return "That department is not accepting referrals."
    return _routing_problem(referral, department, now)


def _guard_conference_in_future(
    referral: Referral, data: Mapping[str, Any] | None, now: datetime
) -> str | None:
    if data is None:
        return None
    if data["scheduled_at"] <= now:
        return "The conference must be scheduled in the future."
    # The experts invited are given the case: those the web form offers only (a referrer
    # of another hospital is no expert to invite).
    from referrals.selectors import referral_expert_candidates

    invited = {u.pk for u in data["experts"]}
    allowed = set(
        referral_expert_candidates(referral).filter(pk__in=invited).values_list("pk", flat=True)
    )
    if outsiders := sorted(invited - allowed):
        return (
            "Experts are consultants of a department of the referral's specialty or of its "
            "department's, at home or abroad where a support link's data-sharing agreement "
            f"lets the case go; these users are not: {', '.join(map(str, outsiders))}."
        )
    return None


def _guard_department_offers_transfer(
    referral: Referral, data: Mapping[str, Any] | None, now: datetime
) -> str | None:
    department = referral.assigned_department
    if department is None or not department.offers_transfer:
        return "The assigned department does not receive transfers."
    return None


def _guard_deadline_passed(
    referral: Referral, data: Mapping[str, Any] | None, now: datetime
) -> str | None:
    if referral.deadline is None or referral.deadline > now:
        return "The deadline has not passed."
    return None


def _guard_not_acknowledged(
    referral: Referral, data: Mapping[str, Any] | None, now: datetime
) -> str | None:
    if referral.acknowledged_at is not None:
        return "The department has already acknowledged this referral."
    return None


def _guard_counter_department(
    referral: Referral, data: Mapping[str, Any] | None, now: datetime
) -> str | None:
    if data is None:
        return None
    department = data["department"]
    if department.facility_id != referral.requester_facility_id:
        return "A counter-referral goes to a department of the original requesting facility."
    if not department.accepting:
        return "That department is not accepting referrals."
    mode = data.get("mode") or ConsultMode.ASYNC
    if mode not in department.modes:
        return f"That department does not offer {mode} consults."
    return None


def _guard_avoided_was_considered(
    referral: Referral, data: Mapping[str, Any] | None, now: datetime
) -> str | None:
    """A transfer counts as avoided (the reports' headline figure) only if one was
    considered: the two answers must not contradict each other."""
    if data is None:
        return None
    if data["outcome"] == CloseOutOutcome.AVOIDED and not data["transfer_originally_considered"]:
        return (
            "A transfer can only have been avoided if one was originally considered: tick "
            "'transfer originally considered', or choose another outcome."
        )
    return None


GUARDS: dict[str, Guard] = {
    "department_still_candidate": _guard_submit_department,
    "forward_target_valid": _guard_forward_target,
    "conference_in_future": _guard_conference_in_future,
    "department_offers_transfer": _guard_department_offers_transfer,
    "deadline_passed": _guard_deadline_passed,
    "counter_department_at_requester": _guard_counter_department,
    "not_acknowledged": _guard_not_acknowledged,
    "avoided_was_considered": _guard_avoided_was_considered,
}

GUARD_DESCRIPTIONS: dict[str, str] = {
    "department_still_candidate": "a chosen department still accepts and is a routing candidate",
    "forward_target_valid": "target department differs, accepts, is not the requester, "
    "and is a routing candidate for its specialty",
    "conference_in_future": "scheduled_at is in the future; the experts are consultants "
    "of the referral's specialty or of its department's",
    "department_offers_transfer": "assigned department receives transfers",
    "deadline_passed": "deadline has passed",
    "counter_department_at_requester": "department belongs to the original requester, "
    "accepting, offering the mode",
    "not_acknowledged": "not yet acknowledged by the department it is assigned to",
    "avoided_was_considered": "outcome `avoided` only with transfer_originally_considered",
}


def _choices(enum: Any) -> tuple[str, ...]:
    return tuple(str(value) for value in enum.values)


NOTE = InputField("note", "text", required=False)


@dataclass(frozen=True)
class Transition:
    action: str
    sources: frozenset[str]
    # None: the state does not change (counter_refer leaves the original where it is).
    target: str | None
    side: str  # ActorSide
    roles: frozenset[str]
    inputs: tuple[InputField, ...] = ()
    guard: str | None = None
    records: str = "event"
    description: str = ""

    def target_from(self, state: str) -> str:
        return self.target if self.target is not None else state

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.inputs if f.required)


TRANSITIONS: tuple[Transition, ...] = (
    Transition(
        "submit",
        frozenset({S.DRAFT}),
        S.SUBMITTED,
        ActorSide.REQUESTER,
        REQUESTER_OR_SYSTEM_ROLES,
        guard="department_still_candidate",
        description="Send the referral to its department (or to routing when none is chosen).",
    ),
    Transition(
        "acknowledge",
        frozenset({S.SUBMITTED}),
        None,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        guard="not_acknowledged",
        records="event + acknowledged_at on the referral (cleared when it is reassigned)",
        description="The department has the referral and is looking at it (FHIR Task.status "
        "received); the state does not change.",
    ),
    Transition(
        "accept",
        frozenset({S.SUBMITTED}),
        S.ACCEPTED,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        description="The department takes the case.",
    ),
    Transition(
        "decline",
        frozenset({S.SUBMITTED}),
        S.DECLINED,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        inputs=(InputField("reason_code", "choice", choices=_choices(DeclineReason)), NOTE),
        description="The system then offers it to the next routing candidate (reroute); "
        "with none left it stays declined.",
    ),
    Transition(
        "forward",
        frozenset({S.SUBMITTED, S.ACCEPTED}),
        S.SUBMITTED,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        inputs=(InputField("department", "department"), InputField("reason", "text")),
        guard="forward_target_valid",
        description="Hand the case to another department; it starts again as submitted there.",
    ),
    Transition(
        "cancel",
        frozenset({S.DRAFT, S.SUBMITTED, S.ACCEPTED, S.INFO_REQUESTED, S.SCHEDULED}),
        S.CANCELLED,
        ActorSide.REQUESTER,
        REQUESTER_OR_SYSTEM_ROLES,
        inputs=(InputField("reason", "text"),),
    ),
    Transition(
        "request_info",
        frozenset({S.ACCEPTED}),
        S.INFO_REQUESTED,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        inputs=(InputField("question", "text"),),
        records="event + Message",
    ),
    Transition(
        "provide_info",
        frozenset({S.INFO_REQUESTED}),
        S.ACCEPTED,
        ActorSide.REQUESTER,
        REQUESTER_OR_SYSTEM_ROLES,
        inputs=(InputField("text", "text", help="The answer to the question."),),
        records="event + Message (in response to the question)",
    ),
    Transition(
        "schedule",
        frozenset({S.ACCEPTED, S.SCHEDULED}),
        S.SCHEDULED,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        inputs=(
            InputField("scheduled_at", "datetime", help="ISO 8601 with a time zone, in 1900-2999"),
            InputField("experts", "users", help="user ids of the experts invited"),
            InputField("video_url", "url"),
        ),
        guard="conference_in_future",
        records="event + conference time, experts, link on the referral",
        description="Plan a live case conference (again from scheduled = reschedule).",
    ),
    Transition(
        "start_conference",
        frozenset({S.SCHEDULED}),
        S.IN_CONFERENCE,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
    ),
    Transition(
        "finish_conference",
        frozenset({S.IN_CONFERENCE}),
        S.ADVISED,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        inputs=(
            InputField("minutes", "text"),
            InputField("disposition", "choice", choices=_choices(Disposition)),
            InputField("text", "text", help="The advice for the referring clinician."),
        ),
        records="event + ConsultNote with minutes",
    ),
    Transition(
        "advise",
        frozenset({S.ACCEPTED}),
        S.ADVISED,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        inputs=(
            InputField("disposition", "choice", choices=_choices(Disposition)),
            InputField("text", "text", help="The advice for the referring clinician."),
        ),
        records="event + ConsultNote",
        description="Asynchronous advice (e-consult).",
    ),
    Transition(
        "close_local",
        frozenset({S.ADVISED}),
        S.CLOSED_LOCAL,
        ActorSide.REQUESTER,
        REQUESTER_OR_SYSTEM_ROLES,
        inputs=(
            InputField("transfer_originally_considered", "bool"),
            InputField("outcome", "choice", choices=_choices(CloseOutOutcome)),
        ),
        guard="avoided_was_considered",
        records="event + CloseOut",
        description="The requester manages the patient locally and answers the close-out.",
    ),
    Transition(
        "request_transfer",
        frozenset({S.ADVISED}),
        S.TRANSFER_REQUESTED,
        ActorSide.REQUESTER,
        REQUESTER_OR_SYSTEM_ROLES,
        inputs=(InputField("reason", "text"),),
        guard="department_offers_transfer",
    ),
    Transition(
        "accept_transfer",
        frozenset({S.TRANSFER_REQUESTED}),
        S.TRANSFER_ACCEPTED,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        inputs=(NOTE,),
    ),
    Transition(
        "depart",
        frozenset({S.TRANSFER_ACCEPTED}),
        S.IN_TRANSIT,
        ActorSide.REQUESTER,
        REQUESTER_OR_SYSTEM_ROLES,
        inputs=(NOTE,),
    ),
    Transition(
        "arrive",
        frozenset({S.IN_TRANSIT}),
        S.ARRIVED,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        inputs=(NOTE,),
    ),
    Transition(
        "complete",
        frozenset({S.ARRIVED}),
        S.COMPLETED,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        inputs=(NOTE,),
    ),
    Transition(
        "expire",
        frozenset({S.SUBMITTED}),
        S.EXPIRED,
        ActorSide.SYSTEM,
        NO_ROLES,
        guard="deadline_passed",
        description="Deadline job: not accepted within deadline + grace and no routing "
        "candidate left (or auto-forward off).",
    ),
    Transition(
        "escalation_notify",
        frozenset({S.SUBMITTED}),
        None,
        ActorSide.SYSTEM,
        NO_ROLES,
        guard="deadline_passed",
        records="event (notice to the department; the state does not change)",
        description="Deadline job: the deadline passed; the department is warned first.",
    ),
    Transition(
        "reroute",
        frozenset({S.SUBMITTED, S.DECLINED}),
        S.SUBMITTED,
        ActorSide.SYSTEM,
        NO_ROLES,
        inputs=(InputField("department", "department"), InputField("reason", "text")),
        guard="forward_target_valid",
        records="event with the routing score and reasons",
        description="Routing hands the case to the next candidate department: after "
        "deadline + grace (escalation) or after a decline.",
    ),
    Transition(
        "counter_refer",
        FINISHED_STATES,
        None,
        ActorSide.ASSIGNEE,
        ASSIGNEE_OR_SYSTEM_ROLES,
        inputs=(
            InputField("department", "department"),
            InputField("clinical_question", "text"),
            InputField(
                "priority",
                "choice",
                required=False,
                choices=tuple(p.label for p in Priority),
                help="The new referral's priority (routine when not given).",
            ),
            InputField(
                "mode",
                "choice",
                required=False,
                choices=_choices(ConsultMode),
                help="The new referral's consult mode (async when not given); the department "
                "must offer it.",
            ),
        ),
        guard="counter_department_at_requester",
        records="event + a new linked Referral (submitted) back down",
        description="Refer back down; the original keeps its state.",
    ),
)

TRANSITIONS_BY_ACTION: dict[str, Transition] = {t.action: t for t in TRANSITIONS}
ACTIONS: tuple[str, ...] = tuple(TRANSITIONS_BY_ACTION)
INITIAL_STATE = S.DRAFT


def transition_for(action: str) -> Transition | None:
    return TRANSITIONS_BY_ACTION.get(action)


def check_table() -> list[str]:
    """Problems in the table (a test asserts there are none)."""
    problems: list[str] = []
    states = set(S.values)
    if len(TRANSITIONS_BY_ACTION) != len(TRANSITIONS):
        problems.append("duplicate action names")
    for t in TRANSITIONS:
        if not t.sources <= states:
            problems.append(f"{t.action}: unknown source state")
        if t.target is not None and t.target not in states:
            problems.append(f"{t.action}: unknown target state")
        if t.guard is not None and t.guard not in GUARDS:
            problems.append(f"{t.action}: unknown guard {t.guard}")
        reopenable = REOPENABLE_BY_SYSTEM if t.side == ActorSide.SYSTEM else frozenset()
        if t.sources & (TERMINAL_STATES - reopenable) and t.target is not None:
            problems.append(f"{t.action}: leaves a terminal state")
        if (t.side == ActorSide.SYSTEM) != (not t.roles):
            problems.append(f"{t.action}: only system actions have no roles")
    return problems
