"""Reads of the report tables: filters, the caller's scope, tables, drill-down.

Counts come from ``DailyRollup`` (sums); percentiles and verified avoided transfers from
``ReferralFact`` rows. Every read goes through ``report_scope_for(user)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import (
    Aggregate,
    Count,
    DateField,
    Expression,
    F,
    FloatField,
    Q,
    QuerySet,
    Sum,
)
from django.db.models.functions import Trunc
from django.utils import timezone

from accounts.models import User
from accounts.roles import Role
from core.errors import ApplicationError, PermissionDenied
from core.values import FIRST_YEAR, LAST_YEAR, digits_int
from referrals.models import ReferralEvent
from referrals.selectors import referral_visible
from registry.models import AdministrativeArea, Country, Facility, Specialty, Tier
from reports import histogram
from reports.metrics import METRICS, METRICS_BY_CODE
from reports.models import (
    ACCEPT,
    ADVICE,
    COUNTERS,
    FOLLOWUP,
    DailyRollup,
    DurationHistogram,
    MonthlyRollup,
    NationalHistogram,
    NationalMonthlyRollup,
    ReferralFact,
    SegmentRollup,
)
from reports.services import (
    REASSIGNING,
    _departments_of,
    _load_departments,
    report_time_zone,
)
from reports.suppression import hide_small_complements, suppress_table

PERIODS = ("day", "week", "month", "quarter", "year")
# Grouping name -> column on both DailyRollup and ReferralFact.
GROUP_COLUMNS: dict[str, str] = {
    "country": "country_id",
    "province": "province_id",
    "tier": "tier",
    "facility": "requester_facility_id",
    "hub": "hub_facility_id",
    "specialty": "specialty_id",
    "campaign": "campaign",
    "cross_border": "cross_border",
}
GROUPINGS = ("period", *GROUP_COLUMNS)
LOWER_TIERS = (Tier.DISTRICT, Tier.COMMUNE)
DRILL_LIMIT = 10_000


def min_cell() -> int:
    return int(getattr(settings, "REPORTS_MIN_CELL", 5))


def verify_days() -> int:
    return int(getattr(settings, "REPORTS_VERIFY_DAYS", 30))


def cost_per_km() -> dict[str, float]:
    return dict(getattr(settings, "REPORTS_COST_PER_KM", {}) or {})


# --- filters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFilters:
    period: str = "month"
    date_from: date | None = None
    date_to: date | None = None
    country_id: int | None = None
    province_id: int | None = None
    tier: int | None = None
    facility_id: int | None = None
    hub_id: int | None = None
    specialty_id: int | None = None
    campaign: str | None = None
    cross_border: bool | None = None
    by: tuple[str, ...] = field(default=())

    def query(self) -> Q:
        """Dimension filters (not the dates) on rollup or fact columns."""
        q = Q()
        for name, column in (
            ("country_id", "country_id"),
            ("province_id", "province_id"),
            ("tier", "tier"),
            ("facility_id", "requester_facility_id"),
            ("hub_id", "hub_facility_id"),
            ("specialty_id", "specialty_id"),
            ("campaign", "campaign"),
            ("cross_border", "cross_border"),
        ):
            value = getattr(self, name)
            if value is not None:
                q &= Q(**{column: value})
        return q

    def dates(self, column: str) -> Q:
        q = Q()
        if self.date_from is not None:
            q &= Q(**{f"{column}__gte": self.date_from})
        if self.date_to is not None:
            q &= Q(**{f"{column}__lte": self.date_to})
        return q


# Filters whose 0 is a value of the tables: "(no province)" and "(not routed)" rows.
NONE_IS_ZERO = frozenset({"province", "hub"})


def _int(params: Mapping[str, Any], name: str, errors: dict[str, str]) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    # ASCII digits only: int() also takes "١٢", " 12" and "1_2".
    value = digits_int(str(raw), max_digits=10)
    lowest = 0 if name in NONE_IS_ZERO else 1
    if value is None or not lowest <= value < 2**31:  # ids are positive 32-bit integers
        errors[name] = "an integer id" + (" (0: none)" if lowest == 0 else "")
        return None
    return value


# date.fromisoformat also takes 2026-W40, 20260101 and 2026-W40-1; the API says YYYY-MM-DD.
_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _date(params: Mapping[str, Any], name: str, errors: dict[str, str]) -> date | None:
    raw = params.get(name)
    if raw in (None, ""):
        return None
    try:
        if not _ISO_DAY.fullmatch(str(raw)):
            raise ValueError(raw)
        value = date.fromisoformat(str(raw))
    except ValueError:
        errors[name] = "a date YYYY-MM-DD"
        return None
    if not FIRST_DAY <= value <= LAST_DAY:  # period arithmetic must not leave date's range
        errors[name] = f"a date from {FIRST_DAY} to {LAST_DAY}"
        return None
    return value


FIRST_DAY, LAST_DAY = date(FIRST_YEAR, 1, 1), date(LAST_YEAR, 12, 31)


FILTER_NAMES = (
    "period", "country", "specialty", "tier", "cross_border", "by", "from", "to", "province",
    "facility", "hub", "campaign",
)  # fmt: skip


def filters_parse(params: Mapping[str, Any], *, allow_by: bool = True) -> ReportFilters:
    """Query parameters -> filters; a 400 lists every problem at once."""
    errors: dict[str, str] = {
        str(name): "no NUL characters"
        for name in FILTER_NAMES
        if "\x00" in str(params.get(name) or "")
    }
    if errors:  # PostgreSQL cannot compare them
        raise ApplicationError("Invalid report filters.", extra={"errors": errors})
    period = str(params.get("period") or "month")
    if period not in PERIODS:
        errors["period"] = f"one of {', '.join(PERIODS)}"
    country_id = None
    country = params.get("country")
    if country:
        country_id = (
            Country.objects.filter(code=str(country).upper()).values_list("id", flat=True).first()
        )
        if country_id is None:
            errors["country"] = "an ISO 3166-1 alpha-2 code of a country in the registry"
    specialty_id = None
    specialty = params.get("specialty")
    if specialty:
        specialty_id = (
            Specialty.objects.filter(code=str(specialty)).values_list("id", flat=True).first()
        )
        if specialty_id is None:
            errors["specialty"] = "a SNOMED CT specialty code in the registry"
    tier = _int(params, "tier", errors)
    if tier is not None and tier not in Tier.values:
        errors["tier"] = "1, 2, 3 or 4"
    cross_border: bool | None = None
    raw_border = params.get("cross_border")
    if raw_border not in (None, ""):
        value = str(raw_border).lower()
        if value in ("1", "true", "yes"):
            cross_border = True
        elif value in ("0", "false", "no"):
            cross_border = False
        else:
            errors["cross_border"] = "true or false"
    by: tuple[str, ...] = ()
    raw_by = params.get("by")
    if raw_by and allow_by:
        by = tuple(b for b in str(raw_by).split(",") if b)
        unknown = [b for b in by if b not in GROUPINGS]
        if unknown or len(set(by)) != len(by):
            errors["by"] = f"comma-separated, each at most once, of {', '.join(GROUPINGS)}"
    filters = ReportFilters(
        period=period,
        date_from=_date(params, "from", errors),
        date_to=_date(params, "to", errors),
        country_id=country_id,
        province_id=_int(params, "province", errors),
        tier=tier,
        facility_id=_int(params, "facility", errors),
        hub_id=_int(params, "hub", errors),
        specialty_id=specialty_id,
        campaign=params.get("campaign") or None,
        cross_border=cross_border,
        by=by,
    )
    if filters.date_from and filters.date_to and filters.date_from > filters.date_to:
        errors["to"] = "on or after from"
    if errors:
        raise ApplicationError("Invalid report filters.", extra={"errors": errors})
    return filters


# --- scope --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportScope:
    """What a user may see: rows matching ``q`` (None: every row); ``aggregate_only``:
    suppressed figures, no drill-down, one grouping at a time."""

    q: Q | None
    aggregate_only: bool
    requester_facility_id: int | None = None
    hub_facility_id: int | None = None
    department_ids: frozenset[int] = frozenset()

    def allows(self, requester_facility_id: int, department_id: int, hub_id: int) -> bool:
        if self.q is None:
            return True
        return (
            requester_facility_id == self.requester_facility_id
            or hub_id == self.hub_facility_id
            or department_id in self.department_ids
        )


def report_scope_for(user: User) -> ReportScope:
    """Ministry: everything, aggregates only. Referrer: their facility's referrals.
    Consultant: their departments'. Coordinator: their facility's, both directions."""
    if not user.is_active:
        raise PermissionDenied("Reports are not available to this account.")
    if user.has_role(Role.MINISTRY):
        return ReportScope(q=None, aggregate_only=True)
    if user.is_superuser:
        return ReportScope(q=None, aggregate_only=False)
    facility_id = user.facility_id
    requester = facility_id if user.has_role(Role.REFERRER, Role.COORDINATOR) else None
    hub = facility_id if user.has_role(Role.COORDINATOR) else None
    departments = (
        user.department_ids() if user.has_role(Role.CONSULTANT, Role.COORDINATOR) else frozenset()
    )
    parts: list[Q] = []
    if requester is not None:
        parts.append(Q(requester_facility_id=requester))
    if hub is not None:
        parts.append(Q(hub_facility_id=hub))
    if departments:
        parts.append(Q(department_id__in=departments))
    if not parts:
        raise PermissionDenied("Reports are not available to this account.")
    q = parts[0]
    for part in parts[1:]:
        q |= part
    return ReportScope(
        q=q,
        aggregate_only=False,
        requester_facility_id=requester,
        hub_facility_id=hub,
        department_ids=departments,
    )


def report_filter_choices(scope: ReportScope) -> tuple[list[str], QuerySet[Specialty]]:
    """The campaigns and specialties the dashboard's filters offer: those of the rows the
    user may see (another facility's campaign names are not theirs to read). Unscoped
    users read the national month table (small: no day grain, no province or hub)."""
    rows: QuerySet[Any]
    if scope.q is None:
        rows = NationalMonthlyRollup.objects.all()
    else:
        rows = DailyRollup.objects.filter(scope.q)
    campaigns = sorted(
        rows.exclude(campaign="").order_by().values_list("campaign", flat=True).distinct()
    )
    specialties = Specialty.objects.filter(id__in=rows.order_by().values("specialty_id")).order_by(
        "display"
    )
    return campaigns, specialties


def _check_groupings(scope: ReportScope, by: tuple[str, ...]) -> None:
    # Two groupings at once would publish cells whose margins other queries publish:
    # complementary suppression only holds within one table.
    if scope.aggregate_only and len(by) > 1:
        raise ApplicationError(
            "Aggregate-only accounts may group by one dimension at a time.",
            extra={"errors": {"by": "one grouping"}},
        )


def _grouped(queryset: QuerySet[Any], names: list[str], **aggregates: Any) -> list[dict[str, Any]]:
    """GROUP BY ``names`` (no names: one row over everything, possibly all zeros)."""
    if not names:
        return [queryset.aggregate(**aggregates)]
    return list(queryset.values(*names).annotate(**aggregates).order_by())


def _whole_months(scope: ReportScope, filters: ReportFilters) -> bool:
    """Can the month-grain tables answer? Every row visible (no per-facility/department
    scope), no requester-facility filter, whole months, periods no finer than a month."""
    if scope.q is not None or filters.facility_id is not None or "facility" in filters.by:
        return False
    if "period" in filters.by and filters.period in ("day", "week"):
        return False
    if filters.date_from is not None and filters.date_from.day != 1:
        return False
    return filters.date_to is None or (filters.date_to + timedelta(days=1)).day == 1


def _whole_segments(scope: ReportScope, filters: ReportFilters, by: tuple[str, ...]) -> bool:
    """Can SegmentRollup answer? It has no department or hub: every row visible or only
    the caller's own requester facility's; no hub or border filter or grouping; periods
    no finer than a week; ``from`` on a Monday or a 1st, ``to`` on a Sunday or a month's
    last day (so the range is made of whole segments)."""
    if scope.q is not None and (scope.hub_facility_id is not None or scope.department_ids):
        return False
    if filters.hub_id is not None or filters.cross_border is not None:
        return False
    if "hub" in by or "cross_border" in by:
        return False
    if "period" in by and filters.period == "day":
        return False
    start, end = filters.date_from, filters.date_to
    if start is not None and start.weekday() != 0 and start.day != 1:
        return False
    return end is None or end.weekday() == 6 or (end + timedelta(days=1)).day == 1


@dataclass(frozen=True)
class MonthTables:
    """The month-grain rollup and histogram rows a whole-month query reads."""

    rollup: QuerySet[Any]
    histogram: QuerySet[Any]


def _month_tables(filters: ReportFilters, by: tuple[str, ...]) -> MonthTables:
    """For a query the month tables answer (``_whole_months``): the national tables (no
    province or hub column, far fewer rows) unless the query filters or groups by
    province or hub; then MonthlyRollup and DurationHistogram. The one place that decides."""
    if (
        filters.province_id is None
        and filters.hub_id is None
        and "province" not in by
        and "hub" not in by
    ):
        return MonthTables(NationalMonthlyRollup.objects.all(), NationalHistogram.objects.all())
    return MonthTables(MonthlyRollup.objects.all(), DurationHistogram.objects.all())


def _rollup_source(
    scope: ReportScope, filters: ReportFilters, by: tuple[str, ...] | None = None
) -> tuple[QuerySet[Any], str]:
    """The coarsest rollup that answers the query exactly, and its date column."""
    by = filters.by if by is None else by
    if _whole_months(scope, filters) and "facility" not in by:
        return _month_tables(filters, by).rollup, "month"
    if _whole_segments(scope, filters, by):
        return _scoped(SegmentRollup.objects.all(), scope), "segment"
    return _scoped(DailyRollup.objects.all(), scope), "day"


def _scoped(queryset: QuerySet[Any], scope: ReportScope) -> QuerySet[Any]:
    return queryset if scope.q is None else queryset.filter(scope.q)


# --- labels -------------------------------------------------------------------------------


def _period_label(period: str, start: date) -> str:
    if period == "day":
        return start.isoformat()
    if period == "week":
        iso = start.isocalendar()
        return f"{iso.year}-W{iso.week:02d}"
    if period == "month":
        return f"{start.year}-{start.month:02d}"
    if period == "quarter":
        return f"{start.year}-Q{(start.month - 1) // 3 + 1}"
    return str(start.year)


def _labels(grouping: str, ids: set[Any]) -> dict[Any, str]:
    ids = {i for i in ids if i is not None}
    if grouping == "country":
        return {c.pk: c.code for c in Country.objects.filter(pk__in=ids)}
    if grouping == "province":
        labels = dict(AdministrativeArea.objects.filter(pk__in=ids).values_list("id", "name"))
        labels[0] = "(no province)"
        return labels
    if grouping in ("facility", "hub"):
        labels = dict(Facility.objects.filter(pk__in=ids).values_list("id", "name"))
        labels[0] = "(not routed)"
        return labels
    if grouping == "specialty":
        return dict(Specialty.objects.filter(pk__in=ids).values_list("id", "display"))
    if grouping == "tier":
        return {i: str(Tier(i).label) for i in ids}
    if grouping == "cross_border":
        return {True: "cross-border", False: "domestic"}
    return {i: (i or "(no campaign)") for i in ids}


def _label_rows(rows: list[dict[str, Any]], by: tuple[str, ...], period: str) -> None:
    for grouping in by:
        if grouping == "period":
            for row in rows:
                start = row.pop("_period")
                row["period"] = row["period_label"] = _period_label(period, start)
                row["period_start"] = start.isoformat()
            continue
        column = GROUP_COLUMNS[grouping]
        labels = _labels(grouping, {row[column] for row in rows})
        for row in rows:
            value = row.pop(column)
            row[grouping] = value
            row[f"{grouping}_label"] = labels.get(value, str(value))


def _group_fields(
    by: tuple[str, ...], period: str, day_column: str
) -> tuple[dict[str, Any], list[str]]:
    annotations: dict[str, Any] = {}
    names: list[str] = []
    for grouping in by:
        if grouping == "period":
            if day_column == "month" and period == "month":
                # Already the first of the month: skip date_trunc's per-row timestamptz cast.
                annotations["_period"] = F(day_column)
            else:
                annotations["_period"] = Trunc(day_column, period, output_field=DateField())
            names.append("_period")
        else:
            names.append(GROUP_COLUMNS[grouping])
    return annotations, names


def _sort_key(by: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        parts: list[Any] = []
        for grouping in by:
            if grouping == "period":
                parts.append(row["period_start"])
            elif grouping == "tier":  # tier order (central first), not the labels' A-Z
                parts.append(row["tier"])
            else:
                parts.append(str(row.get(f"{grouping}_label", "")))
        return tuple(parts)

    return key


# --- counts (rollups) ---------------------------------------------------------------------


def _rate(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 4)


def _finish_counts(row: dict[str, Any], costs: dict[str, float], codes: dict[int, str]) -> None:
    per_country: dict[int, float] = row.pop("_km_by_country", {})
    default = costs.get("default", 0.0)
    row["travel_km"] = round(sum(per_country.values()), 1)
    row["travel_cost"] = round(
        sum(km * costs.get(codes.get(c, ""), default) for c, km in per_country.items()), 2
    )
    row["avoidance_rate"] = _rate(row["avoided"], row["transfer_considered"])
    row["sla_share"] = _rate(row["sla_met"], row["sla_due"])


def _add_counts(
    into: dict[tuple[Any, ...], dict[str, int]], key: tuple[Any, ...], values: Mapping[str, int]
) -> None:
    row = into.setdefault(key, {"avoided_verified": 0, "avoided_pending": 0})
    for name in ("avoided_verified", "avoided_pending"):
        row[name] += values.get(name) or 0


def _verification_counts(
    scope: ReportScope, filters: ReportFilters, by: tuple[str, ...], now: datetime
) -> dict[tuple[Any, ...], dict[str, int]]:
    window = timedelta(days=verify_days())
    out: dict[tuple[Any, ...], dict[str, int]] = {}
    fact_filters: ReportFilters | None = filters
    if _whole_months(scope, filters):
        # Months whose every close-out is at least W before now are settled: nothing is
        # pending there, and "followed within W" is "0 < whole days to follow-up <= W"
        # (the month histogram, metric FOLLOWUP). Later months are read from the facts.
        cutoff = _first_unsettled_month(now - window)
        if filters.date_to is None or filters.date_to >= cutoff:
            fact_filters = replace(filters, date_from=max(cutoff, filters.date_from or cutoff))
        else:
            fact_filters = None
        settled_to = min(cutoff - timedelta(days=1), filters.date_to or cutoff)
        annotations, names = _group_fields(by, filters.period, "month")
        for r in _grouped(
            _month_tables(filters, by)
            .histogram.filter(
                filters.query(),
                filters.dates("month"),
                ~Q(bucket__gte=1, bucket__lte=verify_days()),
                month__lte=settled_to,
                metric=FOLLOWUP,
                n__gt=0,
            )
            .annotate(**annotations),
            names,
            avoided_verified=Sum("n"),
        ):
            _add_counts(out, tuple(r[n] for n in names), r)
    if fact_filters is None:
        return out
    followed = Q(followup_at__isnull=False, followup_at__lte=F("closed_at") + window)
    known = ~Q(patient_ref="")
    queryset = _scoped(ReferralFact.objects.filter(avoided=True), scope).filter(
        fact_filters.query(), fact_filters.dates("closed_day")
    )
    annotations, names = _group_fields(by, filters.period, "closed_day")
    rows = _grouped(
        queryset.annotate(**annotations),
        names,
        # closed_day (never null on an avoided fact), not the pk: the covering indexes
        # hold it, so one province's or facility's count is an index-only scan.
        avoided_verified=Count(
            "closed_day", filter=known & ~followed & Q(closed_at__lte=now - window)
        ),
        avoided_pending=Count(
            "closed_day", filter=known & ~followed & Q(closed_at__gt=now - window)
        ),
    )
    for r in rows:
        _add_counts(out, tuple(r[n] for n in names), r)
    return out


def _first_unsettled_month(moment: datetime) -> date:
    """The first local month not wholly before ``moment`` (its close-outs may be later)."""
    return moment.astimezone(report_time_zone()).date().replace(day=1)


def report_counts(
    user: User, filters: ReportFilters, *, now: datetime | None = None
) -> dict[str, Any]:
    """Counts and rates per group (``filters.by``), with a total row."""
    scope = report_scope_for(user)
    _check_groupings(scope, filters.by)
    now = now or timezone.now()
    result = _count_table(scope, filters, now)
    if scope.aggregate_only:
        _hide_complements(result, lambda f: _count_table(scope, f, now), filters, COUNT_COLUMNS)
        _suppress_counts(result)
    return result


def _count_table(scope: ReportScope, filters: ReportFilters, now: datetime) -> dict[str, Any]:
    """``report_counts`` before suppression."""
    by = filters.by
    source, day_column = _rollup_source(scope, filters)
    annotations, names = _group_fields(by, filters.period, day_column)
    queryset = source.filter(filters.query(), filters.dates(day_column))
    sums = {c: Sum(c) for c in COUNTERS}
    raw = (
        queryset.annotate(**annotations)
        .values(*names, "country_id")
        .annotate(**sums, _km=Sum("travel_km"))
        .order_by()
    )
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    countries: set[int] = set()
    for r in raw:
        key = tuple(r[n] for n in names)
        row = groups.get(key)
        if row is None:
            row = groups[key] = {n: r[n] for n in names}
            row.update(dict.fromkeys(COUNTERS, 0))
            row["_km_by_country"] = {}
        for c in COUNTERS:
            row[c] += r[c] or 0
        row["_km_by_country"][r["country_id"]] = row["_km_by_country"].get(r["country_id"], 0.0) + (
            r["_km"] or 0.0
        )
        countries.add(r["country_id"])
    verification = _verification_counts(scope, filters, by, now)
    for key, values in verification.items():
        if key not in groups:
            groups[key] = dict(zip(names, key, strict=True))
            groups[key].update(dict.fromkeys(COUNTERS, 0))
            groups[key]["_km_by_country"] = {}
        groups[key].update(values)
    codes = dict(Country.objects.filter(pk__in=countries).values_list("id", "code"))
    costs = cost_per_km()
    total: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    total["_km_by_country"] = {}
    total["avoided_verified"] = total["avoided_pending"] = 0
    rows = []
    for row in groups.values():
        row.setdefault("avoided_verified", 0)
        row.setdefault("avoided_pending", 0)
        for c in (*COUNTERS, "avoided_verified", "avoided_pending"):
            total[c] += row[c]
        for country, km in row["_km_by_country"].items():
            total["_km_by_country"][country] = total["_km_by_country"].get(country, 0.0) + km
        _finish_counts(row, costs, codes)
        rows.append(row)
    _finish_counts(total, costs, codes)
    _label_rows(rows, by, filters.period)
    rows.sort(key=_sort_key(by))
    return {"by": list(by), "period": filters.period, "rows": rows, "total": total}


# The dimension filters whose complements are protected (docs/metrics.md, suppression
# rule 6). The dates are not: any two ranges difference, so dropping them would not help.
COMPLEMENT_FILTERS = (
    "country_id", "province_id", "tier", "facility_id", "hub_id", "specialty_id", "campaign",
    "cross_border",
)  # fmt: skip


def _hide_complements(
    result: dict[str, Any],
    compute: Callable[[ReportFilters], dict[str, Any]],
    filters: ReportFilters,
    counts: Sequence[str],
) -> None:
    """Rule 6 for a table ``compute`` made under ``filters``, before rules 1-4: the same
    unsuppressed table once per dimension filter set, with that filter dropped (what
    another query publishes beside this one: one more aggregate per filter), then
    ``hide_small_complements``. Rows match by their group."""
    if min_cell() <= 1:  # nothing is suppressed
        return
    broader = []
    for name in COMPLEMENT_FILTERS:
        if getattr(filters, name) is not None:
            without: dict[str, Any] = {name: None}
            table = compute(replace(filters, **without))
            broader.append((table["rows"], table.get("total")))
    by = result["by"]
    hide_small_complements(
        result["rows"],
        result.get("total"),
        broader,
        key=lambda row: tuple(row[g] for g in by),
        counts=counts,
        min_cell=min_cell(),
    )


# The counts of ``report_counts`` that suppression hides.
COUNT_COLUMNS = (*COUNTERS, "avoided_verified", "avoided_pending")


def _suppress_counts(result: dict[str, Any]) -> None:
    counts = list(COUNT_COLUMNS)
    derived: dict[str, tuple[str, ...]] = {
        "avoidance_rate": ("avoided", "transfer_considered"),
        "sla_share": ("sla_due", "sla_met"),
        "travel_km": ("avoided",),
        "travel_cost": ("avoided",),
    }
    suppress_table(
        result["rows"],
        result["total"],
        counts=counts,
        derived=derived,
        min_cell=min_cell(),
        # every SLA-due event is an acceptance, a decline or an expiry, in the same row
        relations=[("sla_due", ("accepted", "declined", "expired"))],
        # km = avoided transfers x public distances: one more equation in hidden cells
        weighted={"travel_km": "avoided", "travel_cost": "avoided"},
    )
    result["suppression"] = {"min_cell": min_cell()}


# --- response times (facts) ---------------------------------------------------------------


class PercentileCont(Aggregate):
    """PostgreSQL's ordered-set aggregate percentile_cont(p) WITHIN GROUP (ORDER BY x)."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: str | Expression, fraction: float, **extra: Any) -> None:
        super().__init__(expression, fraction=float(fraction), **extra)


def percentile_cont(values: list[float], fraction: float) -> float | None:
    """The same interpolation as PostgreSQL's percentile_cont (the SQLite fallback)."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def _durations(
    queryset: QuerySet[Any], names: list[str], annotations: dict[str, Any], value: str
) -> dict[tuple[Any, ...], dict[str, Any]]:
    grouped = queryset.annotate(**annotations)
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    if connection.vendor == "postgresql":
        for r in _grouped(
            grouped,
            names,
            n=Count(value),
            p50=PercentileCont(value, 0.5),
            p90=PercentileCont(value, 0.9),
        ):
            out[tuple(r[n] for n in names)] = {"n": r["n"], "p50": r["p50"], "p90": r["p90"]}
        return out
    buckets: dict[tuple[Any, ...], list[float]] = {}
    for r in grouped.values(*names, value):
        buckets.setdefault(tuple(r[n] for n in names), []).append(r[value])
    for key, values in buckets.items():
        out[key] = {
            "n": len(values),
            "p50": percentile_cont(values, 0.5),
            "p90": percentile_cont(values, 0.9),
        }
    return out


def _histogram_durations(
    filters: ReportFilters, metric: int, by: tuple[str, ...]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Approximate percentiles from the month histogram (within 4.4 % + 30 s of exact),
    grouped by ``by``."""
    annotations, names = _group_fields(by, filters.period, "month")
    queryset = (
        _month_tables(filters, by)
        .histogram.filter(filters.query(), filters.dates("month"), metric=metric)
        .annotate(**annotations)
        .values(*names, "bucket")
        .annotate(count=Sum("n"))
        .order_by()
    )
    cells: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    for r in queryset:
        if r["count"]:
            cells.setdefault(tuple(r[n] for n in names), []).append((r["bucket"], r["count"]))
    return {
        key: {
            "n": sum(n for _, n in counts),
            "p50": histogram.percentile(counts, 0.5),
            "p90": histogram.percentile(counts, 0.9),
        }
        for key, counts in cells.items()
    }


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 3600, 2)


def report_response_times(user: User, filters: ReportFilters) -> dict[str, Any]:
    """Median and p90 time to accept and to advice per group, in hours."""
    scope = report_scope_for(user)
    _check_groupings(scope, filters.by)
    result = _response_table(scope, filters)
    if scope.aggregate_only:
        counts = ["accept_n", "advice_n"]
        _hide_complements(result, lambda f: _response_table(scope, f), filters, counts)
        suppress_table(
            result["rows"],
            result["total"],
            counts=counts,
            derived={
                "accept_median_hours": ("accept_n",),
                "accept_p90_hours": ("accept_n",),
                "advice_median_hours": ("advice_n",),
                "advice_p90_hours": ("advice_n",),
            },
            min_cell=min_cell(),
        )
        result["suppression"] = {"min_cell": min_cell()}
    return result


def _response_table(scope: ReportScope, filters: ReportFilters) -> dict[str, Any]:
    """``report_response_times`` before suppression."""
    by = filters.by
    base = _scoped(ReferralFact.objects.all(), scope).filter(filters.query())
    # Aggregate-only (published, suppressed) figures over whole months come from the
    # histograms; every other caller gets exact percentile_cont over the fact rows.
    approximate = scope.aggregate_only and _whole_months(scope, filters)
    parts = {}
    for prefix, value, day, metric in (
        ("accept", "accept_seconds", "accepted_day", ACCEPT),
        ("advice", "advice_seconds", "advised_day", ADVICE),
    ):
        if approximate:
            _, names = _group_fields(by, filters.period, "month")
            parts[prefix] = (_histogram_durations(filters, metric, by), names)
            parts[f"{prefix}_total"] = (_histogram_durations(filters, metric, ()), [])
            continue
        annotations, names = _group_fields(by, filters.period, day)
        queryset = base.filter(filters.dates(day), **{f"{value}__isnull": False})
        parts[prefix] = (_durations(queryset, names, annotations, value), names)
        total_annotations, _ = _group_fields((), filters.period, day)
        parts[f"{prefix}_total"] = (_durations(queryset, [], total_annotations, value), [])
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for prefix in ("accept", "advice"):
        values, names = parts[prefix]
        for key, stats in values.items():
            row = groups.setdefault(key, dict(zip(names, key, strict=True)))
            row[f"{prefix}_n"] = stats["n"]
            row[f"{prefix}_median_hours"] = _hours(stats["p50"])
            row[f"{prefix}_p90_hours"] = _hours(stats["p90"])
    total: dict[str, Any] = {}
    for prefix in ("accept", "advice"):
        stats = parts[f"{prefix}_total"][0].get((), {"n": 0, "p50": None, "p90": None})
        total[f"{prefix}_n"] = stats["n"]
        total[f"{prefix}_median_hours"] = _hours(stats["p50"])
        total[f"{prefix}_p90_hours"] = _hours(stats["p90"])
    rows = list(groups.values())
    for row in rows:
        for prefix in ("accept", "advice"):
            row.setdefault(f"{prefix}_n", 0)
            row.setdefault(f"{prefix}_median_hours", None)
            row.setdefault(f"{prefix}_p90_hours", None)
    _label_rows(rows, by, filters.period)
    rows.sort(key=_sort_key(by))
    result = {"by": list(by), "period": filters.period, "rows": rows, "total": total}
    result["percentiles"] = "histogram" if approximate else "exact"
    return result


# --- capacity building --------------------------------------------------------------------


def report_capacity(user: User, filters: ReportFilters) -> dict[str, Any]:
    """Per lower-tier requester facility and specialty and period: the share of its cases
    resolved locally = closed_local / (closed_local + transfer_requested)."""
    scope = report_scope_for(user)
    result = _capacity_table(scope, filters)
    if scope.aggregate_only:
        counts = ["closed_local", "transfer_requested"]
        # A campaign, hub or border filter cuts a facility's cell in two; the other part
        # is the cell without the filter minus this one.
        _hide_complements(result, lambda f: _capacity_table(scope, f), filters, counts)
        # No totals are published with this table, but its margins are, by other queries
        # (a facility's period total by report_counts, a specialty's across facilities):
        # along each line (a facility and period across specialties, a specialty and
        # period across facilities, a facility and specialty across periods) no cell is
        # left alone hidden.
        suppress_table(
            result["rows"],
            None,
            counts=counts,
            derived={"resolved_locally_share": ("closed_local", "transfer_requested")},
            min_cell=min_cell(),
            lines=[
                lambda r: (r["facility"], r["period"]),
                lambda r: (r["specialty"], r["period"]),
                lambda r: (r["facility"], r["specialty"]),
            ],
        )
        result["suppression"] = {"min_cell": min_cell()}
    return result


def _capacity_table(scope: ReportScope, filters: ReportFilters) -> dict[str, Any]:
    """``report_capacity`` before suppression."""
    by = ("facility", "specialty", "period")
    source, day_column = _rollup_source(scope, filters, by)
    annotations, names = _group_fields(by, filters.period, day_column)
    queryset = source.filter(filters.query(), filters.dates(day_column))
    if filters.tier is None:
        queryset = queryset.filter(tier__in=LOWER_TIERS)
    rows = list(
        queryset.annotate(**annotations)
        .values(*names)
        .annotate(closed_local=Sum("closed_local"), transfer_requested=Sum("transfer_requested"))
        .filter(Q(closed_local__gt=0) | Q(transfer_requested__gt=0))
        .order_by()
    )
    for row in rows:
        row["resolved_locally_share"] = _rate(
            row["closed_local"], row["closed_local"] + row["transfer_requested"]
        )
    _label_rows(rows, by, filters.period)
    rows.sort(key=_sort_key(by))
    return {"by": list(by), "period": filters.period, "rows": rows}


# --- drill-down ---------------------------------------------------------------------------

DRILL_ACTIONS: dict[str, tuple[str, ...]] = {
    "submit": ("submit",),
    "accept": ("accept",),
    "decline": ("decline",),
    "forward": ("forward", "reroute"),
    "cancel": ("cancel",),
    "expire": ("expire",),
    "advice": ("advise", "finish_conference"),
    "close_local": ("close_local",),
    "considered": ("close_local",),
    "avoided": ("close_local",),
    "request_transfer": ("request_transfer",),
    "complete": ("complete",),
    "counter_refer": ("counter_refer",),
}


def _local_range(filters: ReportFilters) -> Q:
    zone = report_time_zone()
    q = Q()
    if filters.date_from is not None:
        q &= Q(at__gte=datetime.combine(filters.date_from, time.min, tzinfo=zone))
    if filters.date_to is not None:
        q &= Q(at__lt=datetime.combine(filters.date_to + timedelta(days=1), time.min, tzinfo=zone))
    return q


def report_drilldown(
    user: User, filters: ReportFilters, metric: str, *, now: datetime | None = None
) -> dict[str, Any]:
    """The referral ids behind one figure (never for aggregate-only accounts)."""
    scope = report_scope_for(user)
    if scope.aggregate_only:
        raise PermissionDenied("Aggregate-only accounts cannot list referrals.")
    definition = METRICS_BY_CODE.get(metric)
    if definition is None or not definition.drill:
        drillable = ", ".join(m.code for m in METRICS if m.drill)
        raise ApplicationError(
            "Unknown metric.", extra={"errors": {"metric": f"one of {drillable}"}}
        )
    visible = referral_visible(user).values("pk")
    if definition.drill in ("avoided_verified", "avoided_pending"):
        now = now or timezone.now()
        window = timedelta(days=verify_days())
        followed = Q(followup_at__isnull=False, followup_at__lte=F("closed_at") + window)
        timing = (
            Q(closed_at__lte=now - window)
            if definition.drill == "avoided_verified"
            else Q(closed_at__gt=now - window)
        )
        facts = (
            _scoped(ReferralFact.objects.filter(avoided=True), scope)
            .filter(filters.query(), filters.dates("closed_day"))
            .filter(timing, ~followed, ~Q(patient_ref=""), referral_id__in=visible)
        )
        count = facts.count()
        ids = sorted(
            facts.order_by("referral_id").values_list("referral_id", flat=True)[:DRILL_LIMIT]
        )
        return _drill_answer(metric, count, ids)
    events: list[dict[str, Any]] = list(
        ReferralEvent.objects.filter(  # type: ignore[arg-type]
            _local_range(filters),
            action__in=DRILL_ACTIONS[definition.drill],
            referral_id__in=visible,
        )
        .filter(_referral_filters(filters))
        .values(
            "referral_id",
            "action",
            "department_id",
            "payload",
            "referral__requester_facility_id",
            "referral__requester_facility__country_id",
        )
    )
    departments = _load_departments(_departments_of(events))
    found: set[int] = set()
    for ev in events:
        payload = ev["payload"] or {}
        if definition.drill in ("considered", "avoided") and not payload.get(
            "transfer_originally_considered"
        ):
            continue
        if definition.drill == "avoided" and payload.get("outcome") != "avoided":
            continue
        department_id = int(ev["department_id"] or 0)
        if ev["action"] in REASSIGNING:
            department_id = int(payload.get("from_department_id") or department_id)
        department = departments.get(department_id)
        hub_id = department.facility_id if department else 0
        border = bool(
            department and department.country_id != ev["referral__requester_facility__country_id"]
        )
        if filters.hub_id is not None and hub_id != filters.hub_id:
            continue
        if filters.cross_border is not None and border != filters.cross_border:
            continue
        if not scope.allows(ev["referral__requester_facility_id"], department_id, hub_id):
            continue
        found.add(ev["referral_id"])
    return _drill_answer(metric, len(found), sorted(found)[:DRILL_LIMIT])


def _drill_answer(metric: str, count: int, ids: list[int]) -> dict[str, Any]:
    """``count`` referrals, of which ``ids`` (the first DRILL_LIMIT by id) are listed."""
    return {"metric": metric, "count": count, "truncated": count > len(ids), "referral_ids": ids}


def _referral_filters(filters: ReportFilters) -> Q:
    q = Q()
    prefix = "referral__requester_facility__"
    if filters.country_id is not None:
        q &= Q(**{f"{prefix}country_id": filters.country_id})
    if filters.province_id == 0:  # "(no province)"
        q &= Q(**{f"{prefix}province__isnull": True})
    elif filters.province_id is not None:
        q &= Q(**{f"{prefix}province_id": filters.province_id})
    if filters.tier is not None:
        q &= Q(**{f"{prefix}tier": filters.tier})
    if filters.facility_id is not None:
        q &= Q(referral__requester_facility_id=filters.facility_id)
    if filters.specialty_id is not None:
        q &= Q(referral__specialty_id=filters.specialty_id)
    if filters.campaign is not None:
        q &= Q(referral__campaign=filters.campaign)
    return q


def report_summary(user: User, filters: ReportFilters) -> dict[str, Any]:
    """Headline figures: the totals of counts and response times."""
    plain = replace(filters, by=())
    counts = report_counts(user, plain)
    times = report_response_times(user, plain)
    return {
        "counts": counts["total"],
        "response_times": times["total"],
        "percentiles": times["percentiles"],  # "histogram": approximate medians and p90s
        "suppression": counts.get("suppression"),
    }


def currency() -> str:
    return str(getattr(settings, "REPORTS_CURRENCY", "USD"))
