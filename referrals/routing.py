"""Routing: which departments should answer a referral, best first, and why.

``suggest_departments(referral)`` ranks the departments that may take the case, each with
short reason codes and a score. Eligibility (all must hold):

- the department offers the referral's specialty and mode, is accepting, its facility is
  active, it is not at the requesting facility and was not tried for this referral before
  (any department in the referral's events: declined, expired, forwarded from, current);
- **and** its facility is of a higher tier than the requester (numerically lower) in the
  same country, **or** a valid, active support link hub -> requester covers the specialty
  (a link with no specialties covers all);
- across a border (hub country != requester country) only a support link with a
  data-sharing agreement qualifies, never the tier alone.

A link that forbids identifiable data (``identifiable_data_allowed`` False) still carries
de-identified consults: a referral is *identifiable* when it carries a ``patient_ref`` (a
pseudonym the sender can resolve is still personal data). Such a department is listed for
an identifiable referral with ``allowed`` False and the reason
``identifiable_data_not_allowed`` (after every allowed one), so the requester sees that
removing the patient reference would open it; routing never assigns it. For a de-identified
referral it is a normal candidate with the reason ``deidentified_only``.

Score (higher is better), a weighted sum (``WEIGHTS``):

    score = 30·support_link + 5·(requester tier - hub tier, when higher)
          + 20·(capacity left today / daily capacity)   or -100 when the capacity is used up
          - 4·(distance km / 100)                         (unknown distance: 500 km)
          + 15·shared_language
          - 0.5·median response hours over 30 days        (no data: half the SLA)

A full department is demoted below every department with capacity, not excluded: when all
are full, the least bad one still answers. Ties: nearer first, then the lower id.

Speed (p95 <= 2 ms at national scale): the registry side (departments by specialty, every
facility's tier/country/coordinates/languages, support links by spoke) is held in memory
per process; it is rebuilt when the department table changes (its watermark: count, max id,
accepting count, max ``updated_at``) and at the latest every
``REFERRAL_ROUTING_CACHE_SECONDS`` (facility and link edits). Median response times come
from ``DepartmentResponseTime``, which the beat job ``referrals.response_times_refresh``
recomputes every ``REFERRAL_ROUTING_STATS_SECONDS`` with one grouped query over the event
log (seconds at 1M referrals): a request only reads the small table, at most once per
``REFERRAL_ROUTING_CACHE_SECONDS`` per process.
Per call, ONE query (``_live_state``, three ``UNION ALL`` parts) reads what must be live:
the department watermark (221 rows at national scale), today's load of the candidate
departments (their ``DepartmentDayLoad`` rows, kept by the transitions: referrals/load.py)
and the referral's tried departments (its events; left out for a new referral). So a department edit, also a
bulk ``UPDATE``, is seen by the next call in every process (no staleness); only when the
watermark moved does a call rebuild the snapshot and ask again (a second query).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from referrals.load import department_load_add_pending
from referrals.models import DepartmentDayLoad, DepartmentResponseTime, Referral, ReferralEvent
from registry.geo import haversine_km
from registry.models import ConsultMode, Department, Facility, OperationalStatus, SupportLink

WEIGHTS: dict[str, float] = {
    "support_link": 30.0,
    "tier_gap": 5.0,  # per tier level above the requester
    "capacity_left": 20.0,  # times the share of today's capacity still free
    "capacity_full": -100.0,
    "distance_per_100km": -4.0,
    "shared_language": 15.0,
    "response_per_hour": -0.5,
}
DISTANCE_UNKNOWN_KM = 500.0
RESPONSE_WINDOW = timedelta(days=30)
# Events that hand the case to a department; the response time runs from the last one.
ASSIGNING_ACTIONS = ("submit", "forward", "reroute")


@dataclass(frozen=True, slots=True)
class _Department:
    id: int
    name: str
    facility_id: int
    facility_name: str
    tier: int
    country_id: int
    country_code: str
    latitude: float | None
    longitude: float | None
    languages: frozenset[str]
    modes: frozenset[str]
    accepting: bool
    daily_capacity: int
    sla_hours: int


@dataclass(frozen=True, slots=True)
class _Facility:
    tier: int
    country_id: int
    latitude: float | None
    longitude: float | None
    languages: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Link:
    hub_id: int
    specialty_ids: frozenset[int]  # empty = all
    valid_from: date
    valid_to: date | None
    cross_border: bool
    agreement: str
    identifiable_allowed: bool

    def covers(self, specialty_id: int, day: date) -> bool:
        if self.valid_from > day or (self.valid_to is not None and self.valid_to < day):
            return False
        return not self.specialty_ids or specialty_id in self.specialty_ids


@dataclass
class _Network:
    watermark: tuple[Any, ...]
    built_at: float
    by_specialty: dict[int, tuple[_Department, ...]]
    facilities: dict[int, _Facility]
    links_by_spoke: dict[int, tuple[_Link, ...]]


@dataclass
class _Stats:
    built_at: float
    median_hours: dict[int, float] = field(default_factory=dict)


@dataclass
class Suggestion:
    department_id: int
    department_name: str
    facility_id: int
    facility_name: str
    facility_tier: int
    country: str
    score: float
    allowed: bool
    reasons: list[str]
    distance_km: float | None
    capacity_left: int
    median_response_hours: float | None

    def as_payload(self) -> dict[str, Any]:
        """What an event records about the choice (kept small)."""
        return {
            "department_id": self.department_id,
            "score": self.score,
            "reasons": self.reasons,
        }


_lock = threading.Lock()
_network: _Network | None = None
_stats: _Stats | None = None


def routing_cache_clear() -> None:
    """Forget the cached registry and statistics (tests; registry bulk edits)."""
    global _network, _stats
    with _lock:
        _network = None
        _stats = None


# ``accepting`` is counted too: it is often flipped with a bulk UPDATE (no updated_at).
# One SQL text for both readers (``_watermark``, ``_live_state``), so the tuples compare.
_DEPARTMENT_TABLE = Department._meta.db_table
_WATERMARK_SQL = (
    "SELECT 0, COUNT(*), MAX(id), SUM(CASE WHEN accepting THEN 1 ELSE 0 END), MAX(updated_at) "
    "FROM " + _DEPARTMENT_TABLE
)


def _watermark() -> tuple[Any, ...]:
    with connection.cursor() as cursor:
        cursor.execute(_WATERMARK_SQL)
        row = cursor.fetchone()
    return tuple(row[1:])


def _build_network(watermark: tuple[Any, ...]) -> _Network:
    facilities: dict[int, _Facility] = {}
    active: set[int] = set()
    for pk, tier, country_id, lat, lon, languages, status in Facility.objects.values_list(
        "id", "tier", "country_id", "latitude", "longitude", "languages", "operational_status"
    ).iterator(chunk_size=5000):
        facilities[pk] = _Facility(tier, country_id, lat, lon, frozenset(languages or ()))
        if status == OperationalStatus.ACTIVE:
            active.add(pk)

    by_specialty: dict[int, list[_Department]] = defaultdict(list)
    rows = Department.objects.values_list(
        "id",
        "name",
        "facility_id",
        "facility__name",
        "facility__country__code",
        "specialty_id",
        "offers_async",
        "offers_live",
        "offers_transfer",
        "accepting",
        "daily_capacity",
        "sla_hours",
        "languages",
    ).order_by("id")
    for row in rows:
        facility_id = row[2]
        if facility_id not in active:
            continue
        facility = facilities[facility_id]
        modes = frozenset(
            m for m, on in zip(("async", "live", "transfer"), row[6:9], strict=True) if on
        )
        by_specialty[row[5]].append(
            _Department(
                id=row[0],
                name=row[1],
                facility_id=facility_id,
                facility_name=row[3],
                tier=facility.tier,
                country_id=facility.country_id,
                country_code=row[4],
                latitude=facility.latitude,
                longitude=facility.longitude,
                languages=facility.languages | frozenset(row[12] or ()),
                modes=modes,
                accepting=row[9],
                daily_capacity=row[10],
                sla_hours=row[11],
            )
        )

    link_specialties: dict[int, set[int]] = defaultdict(set)
    through = SupportLink.specialties.through
    for link_id, specialty_id in through.objects.values_list("supportlink_id", "specialty_id"):
        link_specialties[link_id].add(specialty_id)
    links_by_spoke: dict[int, list[_Link]] = defaultdict(list)
    for pk, hub_id, spoke_id, valid_from, valid_to, agreement, identifiable in (
        SupportLink.objects.filter(active=True)
        .values_list(
            "id",
            "hub_id",
            "spoke_id",
            "valid_from",
            "valid_to",
            "agreement_reference",
            "identifiable_data_allowed",
        )
        .iterator(chunk_size=10000)
    ):
        hub, spoke = facilities.get(hub_id), facilities.get(spoke_id)
        if hub is None or spoke is None:
            continue
        links_by_spoke[spoke_id].append(
            _Link(
                hub_id=hub_id,
                specialty_ids=frozenset(link_specialties.get(pk, ())),
                valid_from=valid_from,
                valid_to=valid_to,
                # Derived here too: bulk-created links may not have the stored flag right.
                cross_border=hub.country_id != spoke.country_id,
                agreement=agreement,
                identifiable_allowed=identifiable,
            )
        )
    return _Network(
        watermark=watermark,
        built_at=time.monotonic(),
        by_specialty={k: tuple(v) for k, v in by_specialty.items()},
        facilities=facilities,
        links_by_spoke={k: tuple(v) for k, v in links_by_spoke.items()},
    )


def _current_network(watermark: tuple[Any, ...] | None = None) -> _Network:
    """The snapshot; rebuilt when missing, older than the TTL, or when ``watermark`` (the
    department table's, read by the caller) differs from the one it was built at."""
    global _network
    ttl = float(getattr(settings, "REFERRAL_ROUTING_CACHE_SECONDS", 60))
    network = _network
    if (
        network is None
        or (watermark is not None and network.watermark != watermark)
        or time.monotonic() - network.built_at > ttl
    ):
        with _lock:
            network = _build_network(watermark if watermark is not None else _watermark())
            _network = network
    return network


def _median_response_hours(now: datetime) -> dict[int, tuple[float, int]]:
    """Median hours from assignment (submit/forward/reroute) to accept, per department,
    over the last 30 days: one grouped query."""
    since = now - RESPONSE_WINDOW
    table = ReferralEvent._meta.db_table
    assigning = ", ".join(f"'{a}'" for a in ASSIGNING_ACTIONS)
    inner = f"""
        SELECT department_id, action, at,
               LAG(at) OVER (PARTITION BY referral_id ORDER BY seq) AS prev_at,
               LAG(action) OVER (PARTITION BY referral_id ORDER BY seq) AS prev_action
        FROM {table}
        WHERE at >= %s AND at <= %s AND action IN ({assigning}, 'accept')
    """  # noqa: S608 - constants only; the times are parameters
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"""
                SELECT department_id,
                       percentile_cont(0.5) WITHIN GROUP (
                           ORDER BY EXTRACT(EPOCH FROM at - prev_at)) / 3600.0,
                       COUNT(*)
                FROM ({inner}) AS e
                WHERE action = 'accept' AND prev_action IN ({assigning})
                  AND department_id IS NOT NULL
                GROUP BY department_id
                """,  # noqa: S608
                [since, now],
            )
            return {dep: (float(hours), n) for dep, hours, n in cursor.fetchall()}
        cursor.execute(
            f"SELECT department_id, at, prev_at FROM ({inner}) AS e "  # noqa: S608
            f"WHERE action = 'accept' AND prev_action IN ({assigning}) "
            "AND department_id IS NOT NULL",
            [since, now],
        )
        samples: dict[int, list[float]] = defaultdict(list)
        for dep, at, prev_at in cursor.fetchall():
            # SQLite converts the column but not the window function's result.
            at, prev_at = _as_datetime(at), _as_datetime(prev_at)
            samples[dep].append((at - prev_at).total_seconds() / 3600)
        return {dep: (statistics.median(values), len(values)) for dep, values in samples.items()}


def _as_datetime(value: datetime | str) -> datetime:
    """SQLite hands raw-SQL times back naive (stored in UTC) or as text."""
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def response_times_refresh(*, now: datetime | None = None) -> int:
    """Recompute ``DepartmentResponseTime`` from the event log (the beat job). Replaces the
    table in one transaction; returns the number of departments with a median."""
    now = now or timezone.now()
    medians = _median_response_hours(now)
    with transaction.atomic():
        DepartmentResponseTime.objects.exclude(department_id__in=list(medians)).delete()
        DepartmentResponseTime.objects.bulk_create(
            [
                DepartmentResponseTime(
                    department_id=dep, median_hours=hours, samples=n, computed_at=now
                )
                for dep, (hours, n) in medians.items()
            ],
            update_conflicts=True,
            unique_fields=["department"],
            update_fields=["median_hours", "samples", "computed_at"],
        )
    global _stats
    _stats = None  # this process sees the new figures at once
    return len(medians)


def _current_stats() -> dict[int, float]:
    """The stored medians, re-read at most every ``REFERRAL_ROUTING_CACHE_SECONDS``."""
    global _stats
    ttl = float(getattr(settings, "REFERRAL_ROUTING_CACHE_SECONDS", 60))
    stats = _stats
    if stats is None or time.monotonic() - stats.built_at > ttl:
        stats = _Stats(
            built_at=time.monotonic(),
            median_hours=dict(
                DepartmentResponseTime.objects.values_list("department_id", "median_hours")
            ),
        )
        _stats = stats
    return stats.median_hours


@dataclass
class _Live:
    watermark: tuple[Any, ...]
    load: dict[int, int]  # referrals assigned since local midnight, per department
    tried: set[int]  # departments in the referral's events


def _live_state(referral: Referral, department_ids: list[int], now: datetime) -> _Live:
    """The per-call reads in one round trip: the department watermark, today's load of
    ``department_ids`` (``DepartmentDayLoad`` rows, referrals/load.py) and the tried
    departments (skipped for a new referral)."""
    parts: list[str] = [_WATERMARK_SQL]
    params: list[int | date] = []
    if department_ids:
        marks = ", ".join(["%s"] * len(department_ids))
        parts.append(
            f"SELECT 1, department_id, SUM(assigned), NULL, NULL "  # noqa: S608
            f"FROM {DepartmentDayLoad._meta.db_table} WHERE day = %s "
            f"AND department_id IN ({marks}) GROUP BY department_id"
        )
        params += [timezone.localdate(now), *department_ids]
    if referral.pk is not None and referral.version > 0:
        parts.append(
            f"SELECT 2, department_id, NULL, NULL, NULL "  # noqa: S608
            f"FROM {ReferralEvent._meta.db_table} "
            "WHERE referral_id = %s AND department_id IS NOT NULL GROUP BY department_id"
        )
        params.append(referral.pk)
    live = _Live(watermark=(), load={}, tried=set())
    with connection.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(parts), params)
        for kind, a, b, c, d in cursor.fetchall():
            if kind == 0:
                live.watermark = (a, b, c, d)
            elif kind == 1:
                live.load[a] = b
            else:
                live.tried.add(a)
    # Moves collected by an enclosing batch, not yet written (referrals/load.py).
    department_load_add_pending(live.load, department_ids, timezone.localdate(now))
    return live


def is_identifiable(referral: Referral) -> bool:
    return bool(referral.patient_ref)


def suggest_departments(
    referral: Referral,
    *,
    limit: int | None = 10,
    now: datetime | None = None,
    exclude: set[int] | frozenset[int] = frozenset(),
    live: bool = True,
    only: int | None = None,
) -> list[Suggestion]:
    """Candidate departments for ``referral``, best first (allowed ones before the ones an
    identifiable referral may not reach). ``referral`` may be unsaved (intake).

    ``exclude``: more departments to leave out (an unsaved referral has no events).
    ``live`` False skips the per-call queries (load, statistics): the bulk simulation ranks
    a whole history with it, from the registry alone.
    ``only``: judge just that department (its suggestion, or nothing): the same rules and
    score, without ranking every other candidate (checking a department the requester
    chose)."""
    now = now or timezone.now()
    network = _current_network() if live or _network is None else _network

    def offering(network: _Network) -> list[_Department]:
        return [
            d
            for d in network.by_specialty.get(referral.specialty_id, ())
            if d.accepting
            and referral.mode in d.modes
            and d.facility_id != referral.requester_facility_id
            and (only is None or d.id == only)
        ]

    offers = offering(network)
    load: dict[int, int] = {}
    tried = set(exclude)
    if referral.assigned_department_id is not None:
        tried.add(referral.assigned_department_id)
    if live:
        state = _live_state(referral, [d.id for d in offers], now)
        if state.watermark != network.watermark:  # a department changed: rebuild, ask again
            network = _current_network(state.watermark)
            offers = offering(network)
            state = _live_state(referral, [d.id for d in offers], now)
        load, tried = state.load, tried | state.tried
    requester = network.facilities.get(referral.requester_facility_id)
    if requester is None:
        return []
    pool = [d for d in offers if d.id not in tried]
    if not pool:
        return []
    day = timezone.localdate(now)
    links: dict[int, list[_Link]] = defaultdict(list)
    for link in network.links_by_spoke.get(referral.requester_facility_id, ()):
        if link.covers(referral.specialty_id, day):
            links[link.hub_id].append(link)
    identifiable = is_identifiable(referral)

    eligible: list[tuple[_Department, list[str], float, bool]] = []
    for d in pool:
        reasons = [f"offers:{referral.mode}"]
        score = 0.0
        allowed = True
        cross_border = d.country_id != requester.country_id
        tier_above = d.tier < requester.tier and not cross_border
        hub_links = links.get(d.facility_id, [])
        if cross_border:
            hub_links = [link for link in hub_links if link.agreement]
            if not hub_links:
                continue  # never across a border without an agreement
        if tier_above:
            reasons.append("tier_above")
            score += WEIGHTS["tier_gap"] * (requester.tier - d.tier)
        if hub_links:
            reasons.append("support_link")
            score += WEIGHTS["support_link"]
            if cross_border:
                reasons.append(f"cross_border_agreement:{hub_links[0].agreement}")
            if not tier_above and not any(link.identifiable_allowed for link in hub_links):
                if identifiable:
                    reasons.append("identifiable_data_not_allowed")
                    allowed = False
                else:
                    reasons.append("deidentified_only")
        elif not tier_above:
            continue
        eligible.append((d, reasons, score, allowed))
    if not eligible:
        return []

    medians = _current_stats() if live else {}
    suggestions: list[Suggestion] = []
    for d, reasons, score, allowed in eligible:
        left = max(0, d.daily_capacity - load.get(d.id, 0))
        if left > 0:
            reasons.append(f"capacity_left:{left}/{d.daily_capacity}")
            score += WEIGHTS["capacity_left"] * left / d.daily_capacity
        else:
            reasons.append("capacity_full")
            score += WEIGHTS["capacity_full"]
        distance: float | None = None
        if (
            requester.latitude is not None
            and requester.longitude is not None
            and d.latitude is not None
            and d.longitude is not None
        ):
            distance = haversine_km(
                requester.latitude, requester.longitude, d.latitude, d.longitude
            )
            reasons.append(f"distance_km:{distance:.0f}")
        else:
            reasons.append("distance_unknown")
        km = distance if distance is not None else DISTANCE_UNKNOWN_KM
        score += WEIGHTS["distance_per_100km"] * km / 100
        shared = sorted(requester.languages & d.languages)
        if shared:
            reasons.append("shared_language:" + ",".join(shared))
            score += WEIGHTS["shared_language"]
        median = medians.get(d.id)
        if median is not None:
            reasons.append(f"median_response_h:{median:.1f}")
            score += WEIGHTS["response_per_hour"] * median
        else:
            reasons.append("no_recent_responses")
            score += WEIGHTS["response_per_hour"] * d.sla_hours / 2
        suggestions.append(
            Suggestion(
                department_id=d.id,
                department_name=d.name,
                facility_id=d.facility_id,
                facility_name=d.facility_name,
                facility_tier=d.tier,
                country=d.country_code,
                score=round(score, 3),
                allowed=allowed,
                reasons=reasons,
                distance_km=round(distance, 1) if distance is not None else None,
                capacity_left=left,
                median_response_hours=round(median, 2) if median is not None else None,
            )
        )
    suggestions.sort(key=lambda s: (not s.allowed, *_rank(s)))
    return suggestions if limit is None else suggestions[:limit]


def _rank(s: Suggestion) -> tuple[float, float, int]:
    """Routing's order among allowed suggestions: score, then nearer, then the id."""
    distance = s.distance_km if s.distance_km is not None else DISTANCE_UNKNOWN_KM
    return (-s.score, distance, s.department_id)


def best_department(referral: Referral, *, now: datetime | None = None) -> Suggestion | None:
    """The department routing assigns: the best allowed suggestion, or None."""
    for suggestion in suggest_departments(referral, limit=None, now=now):
        if suggestion.allowed:
            return suggestion
    return None


def department_problem(
    *,
    requester_facility_id: int,
    specialty_id: int,
    mode: str,
    patient_ref: str,
    department_id: int,
    now: datetime | None = None,
) -> str | None:
    """Why the intake would not take ``department_id`` for such a case (None: it would),
    judged on an unsaved case: routing leaves a saved referral's assigned department and
    history out of its candidates, where here the department is the one asked for."""
    probe = _probe(requester_facility_id, specialty_id, mode, patient_ref)
    return candidate_check(probe, department_id, now=now)[1]


def forward_candidates(referral: Referral, *, limit: int) -> list[Suggestion]:
    """The departments ``referral`` may be forwarded to in its specialty, best first: the
    ones ``department_problem`` would pass (the forward guard's rules), other than the one
    it is assigned to."""
    probe = _probe(
        referral.requester_facility_id, referral.specialty_id, referral.mode, referral.patient_ref
    )
    exclude = {referral.assigned_department_id} if referral.assigned_department_id else set()
    suggestions = suggest_departments(probe, limit=None, exclude=exclude)
    return [s for s in suggestions if s.allowed][:limit]


def intake_choices(
    requester_facility_id: int, *, per_specialty: int
) -> dict[int, list[Suggestion]]:
    """Per specialty id, the best departments the intake would take from this facility for
    a de-identified case in any mode, and every one linked to it by an active support link
    however far down (its own hubs: a doctor looks for them). The web form's optional
    choice; the submit judges the real case. From the cached registry snapshot, without the
    per-call load queries."""
    network = _current_network()  # fresh within the cache's TTL, as for any routing
    found: dict[int, list[Suggestion]] = {}
    for specialty_id in network.by_specialty:
        scored: dict[int, Suggestion] = {}
        for mode in ConsultMode.values:  # a transfer-only or live-only department too
            probe = _probe(requester_facility_id, specialty_id, mode, "")
            for s in suggest_departments(probe, limit=None, live=False):
                kept = scored.get(s.department_id)
                if s.allowed and (kept is None or s.score > kept.score):
                    scored[s.department_id] = s
        best = sorted(scored.values(), key=_rank)
        linked = [s for s in best[per_specialty:] if "support_link" in s.reasons]
        if best:
            found[specialty_id] = best[:per_specialty] + linked
    return found


def _probe(requester_facility_id: int, specialty_id: int, mode: str, patient_ref: str) -> Referral:
    """An unsaved case: routing leaves a saved referral's own history out of its candidates."""
    return Referral(
        requester_facility_id=requester_facility_id,
        specialty_id=specialty_id,
        mode=mode,
        patient_ref=patient_ref,
    )


def candidate_check(
    referral: Referral, department_id: int, *, now: datetime | None = None
) -> tuple[Suggestion | None, str | None]:
    """Is ``department_id`` a department the requester may choose? (suggestion, problem)."""
    for suggestion in suggest_departments(referral, limit=None, now=now, only=department_id):
        if suggestion.department_id == department_id:
            if not suggestion.allowed:
                return suggestion, (
                    "That department is reached through a support link that does not allow "
                    "identifiable patient data: send the referral without a patient reference."
                )
            return suggestion, None
    return None, (
        "That department is not a routing candidate for this referral (it must offer the "
        "specialty and mode, accept referrals, and be of a higher tier than the requesting "
        "facility or support it through an active support link; across a border only with a "
        "data-sharing agreement)."
    )
