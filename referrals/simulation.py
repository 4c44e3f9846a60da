"""Realistic referral histories over the demo network (``manage.py simulate_referrals``).

One lifecycle model (``plan_lifecycle``) decides what happens to a referral and when; two
executors play it:

- ``simulate_with_services`` (small N): every step goes through the real services
  (``referral_submit``, ``referral_transition``, the escalation job functions) with
  ``now=`` in the past, so events, deadlines, permissions and invariants are exactly what
  production writes;
- ``simulate_bulk`` (large N, e.g. 1,000,000 for benchmarks): the same model builds
  referral, event and close-out rows that are written in batches (PostgreSQL ``COPY``,
  ``bulk_create`` elsewhere). Every generated path is checked against
  ``workflow.TRANSITIONS`` before it is written. Consult notes, messages and conference
  experts are not generated on this path (the event payloads carry what reports need).

The mix (of all referrals): ~4% cancelled; ~8% declined (then re-routed by the system;
stays declined when no candidate is left); ~8% late (escalation notice, then re-routed,
1 in 8 of them expires); ~3% forwarded by the consultant; the rest accepted and advised
(~12% through a live case conference, ~10% with a request for information). After advice:
transfer through to completed (mostly ``transfer``-mode requests), ~4% still open, the rest
closed locally with the close-out answer, avoided in about half of all consults. A quarter
of the finished cases from hospitals that have departments themselves get a counter-referral
back down. Referrals start uniformly over the last ``days``; steps after "now" are cut
off, so recent cases are still in progress. Deterministic for a given ``seed``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from django.db import connection, transaction
from django.utils import timezone

from accounts.models import User
from accounts.roles import Role
from referrals import escalation, routing, services
from referrals.load import department_load_rebuild
from referrals.models import (
    CloseOut,
    Priority,
    Referral,
    ReferralEvent,
    ReferralState,
)
from referrals.workflow import INITIAL_STATE, TRANSITIONS_BY_ACTION
from registry.models import Department, Facility, OperationalStatus, Specialty, Tier

S = ReferralState
PLACER_SYSTEM = "urn:consilium:simulation"
QUESTIONS = (
    "Fever for 5 days, not responding to first-line antibiotics.",
    "Chest pain with ST changes on ECG; advice on management.",
    "Suspicious skin lesion, photo attached; excision needed?",
    "Newborn with jaundice on day 3; phototherapy threshold?",
    "Diabetic foot ulcer, worsening despite dressing.",
    "Head injury after a fall, GCS 14, no CT available locally.",
    "Pregnant woman at 32 weeks with raised blood pressure.",
    "Child with wheeze, third episode this month.",
)


@dataclass(frozen=True)
class Choice:
    """A department chosen for a referral (what the executors need to know about it)."""

    department_id: int
    facility_id: int
    sla_hours: int
    offers_transfer: bool
    routing: dict[str, Any]


# Picks the next department, given the departments already tried; None when none is left.
Picker = Callable[[frozenset[int], datetime], Choice | None]


@dataclass
class Step:
    action: str
    at: datetime
    from_state: str
    to_state: str
    department_id: int | None
    payload: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


@dataclass
class Lifecycle:
    steps: list[Step]
    mode: str
    priority: int
    deadline: datetime | None = None
    assigned_at: datetime | None = None
    department_id: int | None = None
    close_out: dict[str, Any] | None = None
    offers_transfer: bool = False  # the current department receives transfers
    counter: bool = False  # the planned last step is a counter-referral

    @property
    def state(self) -> str:
        return self.steps[-1].to_state if self.steps else str(INITIAL_STATE)


def _hours(rng: random.Random, low: float, high: float) -> timedelta:
    # Log-uniform: most answers come fast, a few take long.
    return timedelta(hours=low * (high / low) ** rng.random())


class _Builder:
    """Appends steps, checking each against the transition table."""

    def __init__(self, life: Lifecycle, now: datetime) -> None:
        self.life = life
        self.now = now
        self.t: datetime | None = None
        self.done = False

    def emit(self, action: str, at: datetime, **payload: Any) -> bool:
        if self.done or at > self.now:
            self.done = True
            return False
        transition = TRANSITIONS_BY_ACTION[action]
        state = self.life.state
        if state not in transition.sources:
            raise AssertionError(f"simulation bug: {action} from {state}")
        reason = str(payload.pop("reason", ""))
        self.life.steps.append(
            Step(
                action,
                at,
                state,
                transition.target_from(state),
                self.life.department_id,
                payload,
                reason,
            )
        )
        self.t = at
        return True

    def assign(self, choice: Choice, at: datetime) -> None:
        life = self.life
        life.department_id = choice.department_id
        life.offers_transfer = choice.offers_transfer
        life.assigned_at = at
        hours = choice.sla_hours
        cap = services.PRIORITY_MAX_HOURS.get(life.priority)
        if cap is not None:
            hours = min(hours, cap)
        life.deadline = at + timedelta(hours=hours)


def plan_lifecycle(
    rng: random.Random,
    *,
    start: datetime,
    now: datetime,
    mode: str,
    priority: int,
    pick: Picker,
    requester_has_departments: bool,
    grace: timedelta,
) -> Lifecycle:
    """What happens to one referral submitted at ``start`` (cut off at ``now``)."""
    life = Lifecycle(steps=[], mode=mode, priority=priority)
    b = _Builder(life, now)
    tried: set[int] = set()

    def move(action: str, at: datetime, **payload: Any) -> bool:
        if b.done or at > now:
            b.done = True
            return False
        choice = pick(frozenset(tried), at)
        if choice is None:
            return False
        tried.add(choice.department_id)
        previous = life.department_id
        b.assign(choice, at)
        return b.emit(
            action,
            at,
            from_department_id=previous,
            department_id=choice.department_id,
            routing=choice.routing,
            **payload,
        )

    first = pick(frozenset(), start)
    if first is None:  # as the service: the unrouted deadline, then expired (no candidate)
        life.deadline = services.referral_deadline(
            department=None, priority=life.priority, start=start
        )
        if b.emit("submit", start, department_id=None):
            b.emit("expire", life.deadline + timedelta(minutes=rng.randint(0, 1)))
        return life
    tried.add(first.department_id)
    b.assign(first, start)
    if not b.emit("submit", start, department_id=first.department_id, routing=first.routing):
        return life
    t = start
    fate = rng.random()
    if fate < 0.04:
        b.emit("cancel", t + _hours(rng, 1, 48), reason="Patient improved.")
        return life
    if fate < 0.12:
        t += _hours(rng, 0.5, 12)
        b.emit("decline", t, reason_code=rng.choice(["no_capacity", "outside_specialty"]))
        t += timedelta(minutes=rng.randint(1, 5))
        if b.done or not move("reroute", t, reason="Declined: routed to the next candidate."):
            return life
    elif fate < 0.20:
        assert life.deadline is not None
        t = life.deadline + timedelta(minutes=rng.randint(0, 1))
        if not b.emit("escalation_notify", t, deadline=life.deadline.isoformat()):
            return life
        t += grace + timedelta(minutes=1)
        late_again = rng.random() < 0.125
        if (
            late_again or not move("reroute", t, reason="Not accepted by the deadline.")
        ) and not b.done:
            b.emit("expire", t)
            return life
    elif fate < 0.23:
        t += _hours(rng, 0.5, 8)
        # No one to forward to: the first department keeps it.
        move("forward", t, reason="Better placed to answer.")
    if b.done:
        return life
    t = (b.t or t) + _hours(rng, 0.2, 20)
    if life.deadline is not None and t > life.deadline:  # accepted in time in this model
        t = life.deadline - timedelta(minutes=rng.randint(1, 30))
        t = max(t, (b.t or start) + timedelta(minutes=1))
    if not b.emit("accept", t):
        return life
    if rng.random() < 0.10:
        t += _hours(rng, 1, 6)
        b.emit("request_info", t, question="Latest lab results?")
        t += _hours(rng, 2, 24)
        b.emit("provide_info", t, text="Results attached.")
    wants_transfer = rng.random() < (0.7 if mode == "transfer" else 0.06)
    disposition = (
        "transfer"
        if wants_transfer
        else rng.choice(
            ["manage_locally", "manage_locally", "manage_locally", "further_tests", "follow_up"]
        )
    )
    if mode == "live" or rng.random() < 0.05:
        t += _hours(rng, 1, 24)
        at = t + _hours(rng, 20, 72)
        b.emit("schedule", t, scheduled_at=at.isoformat())
        t = at
        b.emit("start_conference", t)
        t += _hours(rng, 0.5, 1.5)
        b.emit("finish_conference", t, disposition=disposition)
    else:
        t += _hours(rng, 1, 48)
        b.emit("advise", t, disposition=disposition)
    if b.done:
        return life
    if wants_transfer and life.offers_transfer:
        for action, low, high in (
            ("request_transfer", 2, 24),
            ("accept_transfer", 0.5, 6),
            ("depart", 1, 12),
            ("arrive", 1, 10),
            ("complete", 24, 240),
        ):
            t += _hours(rng, low, high)
            payload = {"reason": "Needs surgery."} if action == "request_transfer" else {}
            if not b.emit(action, t, **payload):
                return life
    elif rng.random() < 0.04:
        return life  # advice given, close-out not answered yet
    else:
        considered = rng.random() < 0.75
        if considered:
            outcome = "avoided" if rng.random() < 0.82 else "still_needed"
        else:
            rng.random()  # (kept: the draws after it stay as they were)
            outcome = "not_applicable"  # "avoided" needs a transfer considered (a guard)
        t += _hours(rng, 1, 72)
        if not b.emit("close_local", t, transfer_originally_considered=considered, outcome=outcome):
            return life
        life.close_out = {
            "transfer_originally_considered": considered,
            "outcome": outcome,
            "answered_at": t,
        }
    if requester_has_departments and rng.random() < 0.25:
        t += _hours(rng, 24, 240)
        if b.emit("counter_refer", t, clinical_question="Follow-up at your hospital."):
            life.counter = True
    return life


# --- choosing requesters, specialties, departments ---------------------------------------


@dataclass
class Network:
    requesters: list[Facility]
    upper: list[Facility]  # requesters that have departments (counter-referrals possible)
    specialty_ids: list[int]
    departments: dict[int, Department]
    departments_at: dict[int, dict[int, Department]]  # facility -> specialty -> department


def load_network() -> Network:
    active = Facility.objects.filter(operational_status=OperationalStatus.ACTIVE)
    departments = {d.pk: d for d in Department.objects.all()}
    departments_at: dict[int, dict[int, Department]] = {}
    for d in departments.values():
        if d.accepting:
            departments_at.setdefault(d.facility_id, {})[d.specialty_id] = d
    lower = list(active.filter(tier__gte=Tier.DISTRICT).order_by("id"))
    lower += list(active.filter(tier=Tier.PROVINCIAL).exclude(country__code="VN").order_by("id"))
    upper = [
        f
        for f in active.filter(tier=Tier.PROVINCIAL, country__code="VN").order_by("id")
        if f.pk in departments_at
    ]
    specialty_ids = sorted({d.specialty_id for d in departments.values()})
    if not lower or not specialty_ids:
        raise ValueError("No network to simulate on: run manage.py seed_demo first.")
    return Network(lower + upper, upper, specialty_ids, departments, departments_at)


def _ranker(
    network: Network, live: bool
) -> Callable[[Facility, int, str, str, frozenset[int], datetime], Choice | None]:
    memo: dict[tuple[int, int, str, bool], list[routing.Suggestion]] = {}

    def choose(
        facility: Facility,
        specialty_id: int,
        mode: str,
        patient_ref: str,
        tried: frozenset[int],
        at: datetime,
    ) -> Choice | None:
        def probe() -> Referral:
            return Referral(
                requester_facility_id=facility.pk,
                specialty_id=specialty_id,
                mode=mode,
                patient_ref=patient_ref,
            )

        if live:
            ranked = routing.suggest_departments(probe(), limit=None, now=at, exclude=tried)
        else:
            key = (facility.pk, specialty_id, mode, bool(patient_ref))
            if key not in memo:
                memo[key] = routing.suggest_departments(probe(), limit=None, now=at, live=False)
            ranked = [s for s in memo[key] if s.department_id not in tried]
        for s in ranked:
            if s.allowed:
                d = network.departments[s.department_id]
                return Choice(d.pk, d.facility_id, d.sla_hours, d.offers_transfer, s.as_payload())
        return None

    return choose


@dataclass
class Draw:
    """The random facts of one referral."""

    facility: Facility
    specialty_id: int
    mode: str
    priority: int
    patient_ref: str
    patient_sex: str
    birth_year: int
    question: str
    start: datetime


def _draw(rng: random.Random, network: Network, now: datetime, days: int) -> Draw:
    if network.upper and rng.random() < 0.10:
        facility = rng.choice(network.upper)
    else:
        facility = rng.choice(network.requesters)
    mode_roll = rng.random()
    mode = "async" if mode_roll < 0.75 else ("live" if mode_roll < 0.88 else "transfer")
    priority = rng.choices(
        [Priority.ROUTINE, Priority.URGENT, Priority.ASAP, Priority.STAT], [70, 20, 8, 2]
    )[0]
    return Draw(
        facility=facility,
        specialty_id=rng.choice(network.specialty_ids),
        mode=mode,
        priority=int(priority),
        patient_ref=f"P-{rng.getrandbits(40):010x}" if rng.random() < 0.7 else "",
        patient_sex=rng.choice(["female", "male"]),
        birth_year=rng.randint(1935, 2025),
        question=rng.choice(QUESTIONS),
        start=now - timedelta(seconds=rng.uniform(0, days * 86400)),
    )


def _plan(
    rng: random.Random,
    draw: Draw,
    network: Network,
    choose: Callable[..., Choice | None],
    now: datetime,
    grace: timedelta,
) -> Lifecycle:
    def pick(tried: frozenset[int], at: datetime) -> Choice | None:
        return choose(draw.facility, draw.specialty_id, draw.mode, draw.patient_ref, tried, at)

    # Not every specialty is reachable from every facility: fall back to async, then to
    # another specialty, as a clinician would.
    for _ in range(4):
        if pick(frozenset(), draw.start) is not None:
            break
        if draw.mode != "async":
            draw.mode = "async"
            continue
        draw.specialty_id = rng.choice(network.specialty_ids)
    return plan_lifecycle(
        rng,
        start=draw.start,
        now=now,
        mode=draw.mode,
        priority=draw.priority,
        pick=pick,
        requester_has_departments=draw.facility.pk in network.departments_at,
        grace=grace,
    )


# --- executor 1: the real services -------------------------------------------------------


class _Actors:
    """Simulation users: one referrer per requesting facility, one consultant per
    department (created on first use, no usable password)."""

    def __init__(self) -> None:
        self.referrers: dict[int, User] = {}
        self.consultants: dict[int, User] = {}
        self.groups = {
            role: Group.objects.get_or_create(name=role.value)[0]
            for role in (Role.REFERRER, Role.CONSULTANT)
        }

    def _user(self, username: str, role: Role, facility_id: int) -> User:
        user, created = User.objects.get_or_create(
            username=username, defaults={"facility_id": facility_id}
        )
        if created:
            user.set_unusable_password()
            user.save(update_fields=["password"])
            user.groups.add(self.groups[role])
        return user

    def referrer(self, facility: Facility) -> User:
        if facility.pk not in self.referrers:
            self.referrers[facility.pk] = self._user(
                f"sim-referrer-{facility.code}", Role.REFERRER, facility.pk
            )
        return self.referrers[facility.pk]

    def consultant(self, department: Department) -> User:
        if department.pk not in self.consultants:
            user = self._user(
                f"sim-consultant-{department.pk}", Role.CONSULTANT, department.facility_id
            )
            user.departments.add(department)
            self.consultants[department.pk] = user
        return self.consultants[department.pk]


def _service_inputs(
    action: str, step: Step, network: Network, parent: Referral, actor: User
) -> dict[str, Any]:
    p = step.payload
    if action == "decline":
        return {"reason_code": p["reason_code"]}
    if action in ("cancel", "request_transfer", "forward"):
        extra = {"department": p["department_id"]} if action == "forward" else {}
        return {"reason": step.reason or "simulated", **extra}
    if action == "request_info":
        return {"question": p["question"]}
    if action == "provide_info":
        return {"text": p["text"]}
    if action == "schedule":
        return {
            "scheduled_at": p["scheduled_at"],
            "experts": [actor.pk],
            "video_url": "https://meet.example.org/simulated",
        }
    if action == "finish_conference":
        return {"minutes": "Case discussed.", "disposition": p["disposition"], "text": "Advice."}
    if action == "advise":
        return {"disposition": p["disposition"], "text": "Advice given."}
    if action == "close_local":
        return {
            "transfer_originally_considered": p["transfer_originally_considered"],
            "outcome": p["outcome"],
        }
    if action == "counter_refer":
        assert parent.assigned_department is not None
        back = network.departments_at.get(parent.requester_facility_id, {})
        department = back.get(parent.specialty_id) or next(iter(back.values()))
        return {"department": department.pk, "clinical_question": p["clinical_question"]}
    return {}


def simulate_with_services(
    *,
    count: int,
    seed: int = 1,
    days: int = 30,
    now: datetime | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict[str, int]:
    """``count`` referrals through the real services. Returns final states and counts."""
    now = now or timezone.now()
    rng = random.Random(seed)  # noqa: S311 - a reproducible simulation, not crypto
    network = load_network()
    choose = _ranker(network, live=True)
    grace = timedelta(minutes=settings.REFERRAL_ESCALATION_GRACE_MINUTES)
    actors = _Actors()
    tally: dict[str, int] = {}
    draws = sorted((_draw(rng, network, now, days) for _ in range(count)), key=lambda d: d.start)
    for index, draw in enumerate(draws):
        life = _plan(rng, draw, network, choose, now, grace)
        final = _play(index, seed, draw, life, network, actors)
        tally[final] = tally.get(final, 0) + 1
        if progress is not None:
            progress(1)
    return tally


def _play(
    index: int, seed: int, draw: Draw, life: Lifecycle, network: Network, actors: _Actors
) -> str:
    referrer = actors.referrer(draw.facility)
    submit = life.steps[0]
    department = (
        network.departments[submit.department_id] if submit.department_id is not None else None
    )
    referral, _ = services.referral_submit(
        actor=referrer,
        requester_facility=draw.facility,
        placer_system=PLACER_SYSTEM,
        placer_value=f"{seed}-{index}-{uuid.uuid4().hex[:8]}",
        specialty=Specialty.objects.get(pk=draw.specialty_id),
        clinical_question=draw.question,
        mode=life.mode,
        priority=draw.priority,
        patient_ref=draw.patient_ref,
        patient_sex=draw.patient_sex,
        patient_birth_year=draw.birth_year,
        department=None,  # routing assigns: the same choice the plan made
        now=submit.at,
    )
    if referral.assigned_department_id != (department.pk if department else None):
        return "diverged"
    for step in life.steps[1:]:
        referral.refresh_from_db()
        if step.action == "expire":
            with transaction.atomic():
                locked = Referral.objects.select_for_update().get(pk=referral.pk)
                services.referral_system_transition(referral=locked, action="expire", now=step.at)
            continue
        if step.action == "escalation_notify" or (
            step.action == "reroute" and step.from_state == S.SUBMITTED
        ):
            escalation.referral_escalate_one(referral_id=referral.pk, now=step.at)
            continue
        if step.action == "reroute":
            escalation.referral_reroute_declined(referral_id=referral.pk, now=step.at)
            continue
        transition = TRANSITIONS_BY_ACTION[step.action]
        if transition.side == "requester":
            actor = referrer
        else:
            assert referral.assigned_department is not None
            actor = actors.consultant(referral.assigned_department)
        services.referral_transition(
            actor=actor,
            referral_id=referral.pk,
            action=step.action,
            now=step.at,
            **_service_inputs(step.action, step, network, referral, actor),
        )
    referral.refresh_from_db()
    return referral.state


# --- executor 2: bulk rows ---------------------------------------------------------------


def _reserve_ids(model: type[Referral], n: int) -> list[int]:
    table = model._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
            [table, n],
        )
        return [row[0] for row in cursor.fetchall()]


def _copy(model: type[Any], objs: list[Any], *, with_id: bool) -> None:
    fields = [f for f in model._meta.concrete_fields if with_id or not f.primary_key]
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    table = connection.ops.quote_name(model._meta.db_table)
    with connection.cursor() as cursor:
        raw = cursor.cursor
        with raw.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for obj in objs:
                copy.write_row(
                    [f.get_db_prep_save(getattr(obj, f.attname), connection) for f in fields]
                )


def _rows(
    life: Lifecycle, draw: Draw, referral_id: int, seed: int, index: int
) -> tuple[Referral, list[ReferralEvent], CloseOut | None]:
    last = life.steps[-1].at
    referral = Referral(
        id=referral_id,
        placer_system=PLACER_SYSTEM,
        placer_value=f"{seed}-{index}",
        filler_id=f"CSL-SIM{seed:04d}{index:012d}",
        requester_facility_id=draw.facility.pk,
        patient_ref=draw.patient_ref,
        patient_sex=draw.patient_sex,
        patient_birth_year=draw.birth_year,
        specialty_id=draw.specialty_id,
        mode=life.mode,
        priority=draw.priority,
        clinical_question=draw.question,
        assigned_department_id=life.department_id,
        deadline=life.deadline,
        assigned_at=life.assigned_at,
        state=life.state,
        version=len(life.steps),
        created_at=life.steps[0].at,
        updated_at=last,
    )
    events = [
        ReferralEvent(
            referral_id=referral_id,
            seq=seq,
            actor_side=TRANSITIONS_BY_ACTION[s.action].side,
            at=s.at,
            action=s.action,
            from_state=s.from_state,
            to_state=s.to_state,
            department_id=s.department_id,
            reason=s.reason,
            payload=s.payload,
        )
        for seq, s in enumerate(life.steps, 1)
    ]
    close_out = None
    if life.close_out is not None:
        close_out = CloseOut(
            referral_id=referral_id,
            transfer_originally_considered=life.close_out["transfer_originally_considered"],
            outcome=life.close_out["outcome"],
            answered_at=life.close_out["answered_at"],
        )
    return referral, events, close_out


def validate_path(life: Lifecycle) -> None:
    """Every step is an edge of the table, starting from draft (raises otherwise)."""
    state = str(INITIAL_STATE)
    for step in life.steps:
        transition = TRANSITIONS_BY_ACTION[step.action]
        if step.from_state != state or state not in transition.sources:
            raise AssertionError(f"{step.action} from {state} is not in the table")
        if step.to_state != transition.target_from(state):
            raise AssertionError(f"{step.action} from {state} lands in {step.to_state}")
        state = step.to_state


def _counter_rows(
    life: Lifecycle,
    draw: Draw,
    parent: Referral,
    network: Network,
    rng: random.Random,
    referral_id: int,
    seed: int,
    index: int,
    now: datetime,
) -> tuple[Referral, list[ReferralEvent], CloseOut | None] | None:
    back = network.departments_at.get(draw.facility.pk, {})
    department = back.get(draw.specialty_id) or (next(iter(back.values())) if back else None)
    if department is None or parent.assigned_department_id is None:
        return None
    hub = network.departments[parent.assigned_department_id].facility_id
    start = life.steps[-1].at
    choice = Choice(department.pk, department.facility_id, department.sla_hours, False, {})
    child = Lifecycle(steps=[], mode="async", priority=int(Priority.ROUTINE))
    b = _Builder(child, now)
    b.assign(choice, start)
    b.emit("submit", start, department_id=department.pk)
    t = start + _hours(rng, 1, 24)
    b.emit("accept", t)
    t += _hours(rng, 1, 48)
    b.emit("advise", t, disposition="follow_up")
    child_draw = Draw(
        facility=Facility(pk=hub),
        specialty_id=department.specialty_id,
        mode="async",
        priority=int(Priority.ROUTINE),
        patient_ref=draw.patient_ref,
        patient_sex=draw.patient_sex,
        birth_year=draw.birth_year,
        question="Follow-up at your hospital.",
        start=start,
    )
    referral, events, _ = _rows(child, child_draw, referral_id, seed, index)
    referral.placer_system = services.COUNTER_REFERRAL_SYSTEM
    referral.placer_value = f"{parent.filler_id}/1"
    referral.parent_referral_id = parent.pk
    life.steps[-1].payload["counter_referral_id"] = referral_id
    life.steps[-1].payload["department_id"] = department.pk
    return referral, events, None


def iter_bulk_batches(
    *, count: int, seed: int, days: int, batch: int, now: datetime
) -> Iterator[tuple[list[Referral], list[ReferralEvent], list[CloseOut]]]:
    rng = random.Random(seed)  # noqa: S311 - a reproducible simulation, not crypto
    network = load_network()
    routing._current_network()  # the registry snapshot the ranking reads (live=False)
    choose = _ranker(network, live=False)
    grace = timedelta(minutes=settings.REFERRAL_ESCALATION_GRACE_MINUTES)
    postgres = connection.vendor == "postgresql"
    done = 0
    while done < count:
        n = min(batch, count - done)
        lives = []
        for i in range(n):
            draw = _draw(rng, network, now, days)
            life = _plan(rng, draw, network, choose, now, grace)
            validate_path(life)
            lives.append((done + i, draw, life))
        counters = sum(1 for _, _, life in lives if life.counter)
        # SQLite: unique negative placeholders, replaced at insert time.
        ids = (
            _reserve_ids(Referral, n + counters)
            if postgres
            else list(range(-(done + 1), -(done + n + counters) - 1, -1))
        )
        referrals: list[Referral] = []
        events: list[ReferralEvent] = []
        close_outs: list[CloseOut] = []
        spare = iter(ids[n:])
        for (index, draw, life), referral_id in zip(lives, ids[:n], strict=True):
            child_id = next(spare) if life.counter else None
            counter = None
            if life.counter:
                referral, _, _ = _rows(life, draw, referral_id or 0, seed, index)
                counter = _counter_rows(
                    life, draw, referral, network, rng, child_id or 0, seed, count + index, now
                )
                if counter is None:  # no department to send it back to: drop the step
                    life.steps.pop()
                    referral.version -= 1
            referral, evs, close_out = _rows(life, draw, referral_id or 0, seed, index)
            referrals.append(referral)
            events.extend(evs)
            if close_out is not None:
                close_outs.append(close_out)
            if life.counter and counter is not None:
                child, child_events, _ = counter
                referrals.append(child)
                events.extend(child_events)
        yield referrals, events, close_outs
        done += n


def simulate_bulk(
    *,
    count: int,
    seed: int = 1,
    days: int = 90,
    batch: int = 5000,
    now: datetime | None = None,
    progress: Callable[[int], object] | None = None,
) -> int:
    """Write ``count`` simulated referrals (plus their counter-referrals) in batches."""
    now = now or timezone.now()
    written = 0
    postgres = connection.vendor == "postgresql"
    for referrals, events, close_outs in iter_bulk_batches(
        count=count, seed=seed, days=days, batch=batch, now=now
    ):
        with transaction.atomic():
            if postgres:
                _copy(Referral, referrals, with_id=True)
                _copy(ReferralEvent, events, with_id=False)
                _copy(CloseOut, close_outs, with_id=False)
            else:
                _bulk_create_sqlite(referrals, events, close_outs)
        written += len(referrals)
        if progress is not None:
            progress(sum(1 for r in referrals if r.parent_referral_id is None))
    # The rows bypassed the services: derive routing's load counters from them.
    department_load_rebuild(days=None)
    return written


def _bulk_create_sqlite(
    referrals: list[Referral], events: list[ReferralEvent], close_outs: list[CloseOut]
) -> None:
    # No reserved ids here: insert one by one (parents before their counter-referrals),
    # then point the rows at the real ids. SQLite is the small demo database only.
    real: dict[int, int] = {}
    for referral in referrals:
        placeholder = referral.pk
        if referral.parent_referral_id is not None:
            referral.parent_referral_id = real[referral.parent_referral_id]
        referral.pk = None
        referral.save(force_insert=True)
        real[placeholder] = referral.pk
        Referral.objects.filter(pk=referral.pk).update(updated_at=referral.updated_at)
    for event in events:
        event.referral_id = real[event.referral_id]
        if "counter_referral_id" in event.payload:
            event.payload["counter_referral_id"] = real[event.payload["counter_referral_id"]]
    for close_out in close_outs:
        close_out.referral_id = real[close_out.referral_id]
    ReferralEvent.objects.bulk_create(events, batch_size=1000)
    CloseOut.objects.bulk_create(close_outs, batch_size=1000)
