"""Reduced-transfer reports (issue 5): tables derived from the referral event log.

Nothing here is the truth: ``referrals.ReferralEvent`` is. These tables are maintained by
the watermark job (``reports.services.reports_catch_up``) and can be dropped and rebuilt
at any time (``manage.py rebuild_reports``). They hold ids, not foreign keys: rollups must
never block a registry delete, and rebuilding them must not need constraint checks.

- ``DailyRollup``: additive counters per (local day, requester facility, department,
  specialty, campaign). Week/month/quarter/year and country/province/tier/hub slices are
  sums over it. Requester country/province/tier, the hub facility and the border flag are
  copied onto the row when the event is applied, so report queries need no joins.
- ``ReferralFact``: one row per referral with its milestones. Medians and percentiles
  cannot be summed from rollups; they are computed over these rows. Verified avoided
  transfers are decided from them at query time (the window is a setting).
- ``MonthlyRollup``: the same counters per (local month, requester country, province,
  tier, hub facility, specialty, campaign, cross-border) -- no facility or department, so
  ~40x fewer rows; national/province/hub slices over whole months read it.
- ``SegmentRollup``: the same counters per (segment = the days of one ISO week within one
  month, requester facility, specialty, campaign): province and facility slices by
  week/month/quarter/year and capacity read it; its size does not grow with referrals.
- ``DurationHistogram``: per (month of the milestone, the fact's dimensions above, metric,
  log bucket) the number of referrals: approximate national percentiles (docs/metrics.md).
- ``NationalMonthlyRollup`` / ``NationalHistogram``: MonthlyRollup / DurationHistogram
  summed over province and hub (far fewer rows): month-grain queries that neither filter
  nor group by province or hub (the national headlines and trends) read them.
- ``UpkeepState``: the watermark (highest event id applied) and the ids skipped as gaps.
"""

from __future__ import annotations

from datetime import date, timedelta

from django.db import models

# The counters of a DailyRollup row, in the order the docs list them.
COUNTERS: tuple[str, ...] = (
    "submitted",
    "accepted",
    "declined",
    "forwarded",
    "cancelled",
    "expired",
    "advised",
    "closed_local",
    "transfer_considered",
    "avoided",
    "transfer_requested",
    "transfer_completed",
    "counter_referrals",
    "sla_due",
    "sla_met",
)
# Dimension columns of a DailyRollup row that identify it (the upsert key).
ROLLUP_KEY: tuple[str, ...] = (
    "day",
    "requester_facility_id",
    "department_id",
    "specialty_id",
    "campaign",
)
# Dimension columns copied from the registry when the row is first written.
ROLLUP_ATTRIBUTES: tuple[str, ...] = (
    "country_id",
    "province_id",
    "tier",
    "hub_facility_id",
    "cross_border",
)


class RollupCounters(models.Model):
    """The counters of both rollups (names in COUNTERS, plus travel_km)."""

    submitted = models.IntegerField(default=0)
    accepted = models.IntegerField(default=0)
    declined = models.IntegerField(default=0)
    forwarded = models.IntegerField(default=0)
    cancelled = models.IntegerField(default=0)
    expired = models.IntegerField(default=0)
    advised = models.IntegerField(default=0)
    closed_local = models.IntegerField(default=0)
    transfer_considered = models.IntegerField(default=0)
    avoided = models.IntegerField(default=0)
    transfer_requested = models.IntegerField(default=0)
    transfer_completed = models.IntegerField(default=0)
    counter_referrals = models.IntegerField(default=0)
    sla_due = models.IntegerField(default=0, help_text="accept + decline + expire events")
    sla_met = models.IntegerField(default=0, help_text="accepts/declines within the SLA")
    travel_km = models.FloatField(default=0.0, help_text="round trips avoided, km")

    class Meta:
        abstract = True


class DailyRollup(RollupCounters):
    day = models.DateField(help_text="local date (REPORTS_TIME_ZONE) of the events")
    requester_facility_id = models.BigIntegerField()
    # 0 = no department (not routed yet); hub_facility_id 0 likewise.
    department_id = models.BigIntegerField(default=0)
    specialty_id = models.BigIntegerField()
    campaign = models.CharField(max_length=100, blank=True, default="")
    country_id = models.BigIntegerField()
    province_id = models.BigIntegerField(default=0)
    tier = models.PositiveSmallIntegerField()
    hub_facility_id = models.BigIntegerField(default=0)
    cross_border = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=list(ROLLUP_KEY), name="report_rollup_key"),
        ]
        indexes = [
            models.Index(fields=["day", "country_id"], name="report_rollup_day_country"),
            models.Index(fields=["province_id", "day"], name="report_rollup_province"),
            models.Index(fields=["hub_facility_id", "day"], name="report_rollup_hub"),
            models.Index(fields=["specialty_id", "day"], name="report_rollup_specialty"),
            models.Index(fields=["requester_facility_id", "day"], name="report_rollup_facility"),
            # a consultant's scope (their departments)
            models.Index(fields=["department_id", "day"], name="report_rollup_department"),
        ]

    def __str__(self) -> str:
        return f"{self.day} f{self.requester_facility_id} d{self.department_id}"


# Dimension columns of a MonthlyRollup row (the upsert key); the same counters.
MONTHLY_KEY: tuple[str, ...] = (
    "month",
    "country_id",
    "province_id",
    "tier",
    "hub_facility_id",
    "specialty_id",
    "campaign",
    "cross_border",
)


class MonthlyRollup(RollupCounters):
    """DailyRollup summed over the month, the requester facility and the department."""

    month = models.DateField(help_text="first day of the local month")
    country_id = models.BigIntegerField()
    province_id = models.BigIntegerField(default=0)
    tier = models.PositiveSmallIntegerField()
    hub_facility_id = models.BigIntegerField(default=0)
    specialty_id = models.BigIntegerField()
    campaign = models.CharField(max_length=100, blank=True, default="")
    cross_border = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=list(MONTHLY_KEY), name="report_monthly_key"),
        ]
        indexes = [
            models.Index(fields=["month"], name="report_monthly_month"),
        ]

    def __str__(self) -> str:
        return f"{self.month} c{self.country_id} h{self.hub_facility_id}"


# Dimension columns of a NationalMonthlyRollup row (the upsert key); the same counters.
NATIONAL_KEY: tuple[str, ...] = (
    "month",
    "country_id",
    "tier",
    "specialty_id",
    "campaign",
    "cross_border",
)


class NationalMonthlyRollup(RollupCounters):
    """MonthlyRollup summed over province and hub: kept equal to that GROUP BY by the same
    batch (same transaction) and by the rebuild."""

    month = models.DateField(help_text="first day of the local month")
    country_id = models.BigIntegerField()
    tier = models.PositiveSmallIntegerField()
    specialty_id = models.BigIntegerField()
    campaign = models.CharField(max_length=100, blank=True, default="")
    cross_border = models.BooleanField(default=False)

    class Meta:
        constraints = [
            # Leads with month: also the index of a month-range scan.
            models.UniqueConstraint(fields=list(NATIONAL_KEY), name="report_national_key"),
        ]

    def __str__(self) -> str:
        return f"{self.month} c{self.country_id} s{self.specialty_id}"


# Dimension columns of a SegmentRollup row (the upsert key); the same counters.
SEGMENT_KEY: tuple[str, ...] = (
    "segment",
    "requester_facility_id",
    "specialty_id",
    "campaign",
    "country_id",
    "province_id",
    "tier",
)


def segment_of(day: date) -> date:
    """The first day of ``day``'s segment: the days of one ISO week within one month.
    A segment lies inside one week, one month, one quarter and one year, so any of those
    periods is a union of whole segments."""
    return max(day - timedelta(days=day.weekday()), day.replace(day=1))


class SegmentRollup(RollupCounters):
    """DailyRollup summed over a segment (see ``segment_of``) and over the department and
    hub: per requester facility, specialty and campaign. At most ~128 segments a year
    per (facility, specialty, campaign), whatever the number of referrals: province and
    facility slices by week/month/quarter/year (and capacity) read it."""

    segment = models.DateField(help_text="first day of the segment (see segment_of)")
    requester_facility_id = models.BigIntegerField()
    specialty_id = models.BigIntegerField()
    campaign = models.CharField(max_length=100, blank=True, default="")
    country_id = models.BigIntegerField()
    province_id = models.BigIntegerField(default=0)
    tier = models.PositiveSmallIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=list(SEGMENT_KEY), name="report_segment_key"),
        ]
        indexes = [
            models.Index(fields=["province_id", "segment"], name="report_segment_province"),
            models.Index(
                fields=["requester_facility_id", "segment"], name="report_segment_facility"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.segment} f{self.requester_facility_id} s{self.specialty_id}"


# DurationHistogram.metric
ACCEPT = 1
ADVICE = 2
# Avoided transfers with a patient_ref, by month of closed_day; bucket = days from the
# close-out to the follow-up, rounded up (0: no follow-up). See docs/metrics.md.
FOLLOWUP = 3
FOLLOWUP_MAX_DAYS = 32_000
# Histogram dimensions (the upsert key with month, metric and bucket).
HISTOGRAM_DIMENSIONS: tuple[str, ...] = (
    "country_id",
    "province_id",
    "tier",
    "hub_facility_id",
    "specialty_id",
    "campaign",
    "cross_border",
)
HISTOGRAM_KEY: tuple[str, ...] = ("month", "metric", *HISTOGRAM_DIMENSIONS, "bucket")


class DurationHistogram(models.Model):
    """How many referrals' time to accept (metric 1, month of ``accepted_day``) or time to
    advice (2, month of ``advised_day``) fall in each log-spaced bucket
    (``reports.histogram``), by the fact row's dimensions; metric 3 (FOLLOWUP): avoided
    transfers by month of ``closed_day`` and whole days to the follow-up. Kept equal to a GROUP BY over
    ReferralFact: each batch subtracts a touched fact's old contribution and adds its new."""

    month = models.DateField()
    metric = models.PositiveSmallIntegerField()
    country_id = models.BigIntegerField()
    province_id = models.BigIntegerField(default=0)
    tier = models.PositiveSmallIntegerField()
    hub_facility_id = models.BigIntegerField(default=0)
    specialty_id = models.BigIntegerField()
    campaign = models.CharField(max_length=100, blank=True, default="")
    cross_border = models.BooleanField(default=False)
    bucket = models.SmallIntegerField()
    n = models.IntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=list(HISTOGRAM_KEY), name="report_histogram_key"),
        ]
        indexes = [
            models.Index(fields=["metric", "month"], name="report_histogram_month"),
        ]

    def __str__(self) -> str:
        return f"{self.month} m{self.metric} b{self.bucket}: {self.n}"


# NationalHistogram: the histogram dimensions without province and hub.
NATIONAL_HISTOGRAM_DIMENSIONS: tuple[str, ...] = (
    "country_id",
    "tier",
    "specialty_id",
    "campaign",
    "cross_border",
)
NATIONAL_HISTOGRAM_KEY: tuple[str, ...] = (
    "month",
    "metric",
    *NATIONAL_HISTOGRAM_DIMENSIONS,
    "bucket",
)


class NationalHistogram(models.Model):
    """DurationHistogram summed over province and hub, kept so by the same deltas (same
    transaction) and by the rebuild. Cells that fall to 0 stay with n = 0, as there."""

    month = models.DateField()
    metric = models.PositiveSmallIntegerField()
    country_id = models.BigIntegerField()
    tier = models.PositiveSmallIntegerField()
    specialty_id = models.BigIntegerField()
    campaign = models.CharField(max_length=100, blank=True, default="")
    cross_border = models.BooleanField(default=False)
    bucket = models.SmallIntegerField()
    n = models.IntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=list(NATIONAL_HISTOGRAM_KEY), name="report_national_histogram_key"
            ),
        ]
        indexes = [
            models.Index(fields=["metric", "month"], name="report_national_hist_month"),
        ]

    def __str__(self) -> str:
        return f"{self.month} m{self.metric} b{self.bucket}: {self.n}"


class ReferralFact(models.Model):
    """One referral's milestones (for percentiles and verification)."""

    referral_id = models.BigIntegerField(primary_key=True)
    requester_facility_id = models.BigIntegerField()
    country_id = models.BigIntegerField()
    province_id = models.BigIntegerField(default=0)
    tier = models.PositiveSmallIntegerField()
    specialty_id = models.BigIntegerField()
    campaign = models.CharField(max_length=100, blank=True, default="")
    # The sender's pseudonymous patient id; with the requester facility it names a patient.
    patient_ref = models.CharField(max_length=128, blank=True, default="")
    department_id = models.BigIntegerField(default=0)
    hub_facility_id = models.BigIntegerField(default=0)
    cross_border = models.BooleanField(default=False)

    submitted_at = models.DateTimeField(null=True)
    assigned_at = models.DateTimeField(null=True, help_text="last submit/forward")
    accepted_at = models.DateTimeField(null=True)
    accepted_day = models.DateField(null=True)
    accept_seconds = models.FloatField(null=True, help_text="accept - assigned_at")
    advised_at = models.DateTimeField(null=True)
    advised_day = models.DateField(null=True)
    advice_seconds = models.FloatField(null=True, help_text="first advice - submitted_at")
    closed_at = models.DateTimeField(null=True)
    closed_day = models.DateField(null=True)
    avoided = models.BooleanField(default=False)
    travel_km = models.FloatField(default=0.0)
    transfer_requested_at = models.DateTimeField(null=True)
    # Earliest new referral or transfer of the same patient and specialty after closed_at
    # (only tracked for avoided transfers).
    followup_at = models.DateTimeField(null=True)

    class Meta:
        indexes = [
            models.Index(fields=["accepted_day"], name="report_fact_accepted_day"),
            models.Index(fields=["advised_day"], name="report_fact_advised_day"),
            models.Index(
                fields=["closed_day"],
                name="report_fact_avoided_day",
                condition=models.Q(avoided=True),
            ),
            # Verification counts of one province / facility / hub over days (the daily
            # path): index-only scans, the counts read only these columns.
            models.Index(
                fields=["province_id", "closed_day"],
                name="report_fact_avoided_province",
                condition=models.Q(avoided=True),
                include=["patient_ref", "closed_at", "followup_at"],
            ),
            models.Index(
                fields=["requester_facility_id", "closed_day"],
                name="report_fact_avoided_facility",
                condition=models.Q(avoided=True),
                include=["patient_ref", "closed_at", "followup_at"],
            ),
            models.Index(
                fields=["hub_facility_id", "closed_day"],
                name="report_fact_avoided_hub",
                condition=models.Q(avoided=True),
            ),
            models.Index(
                fields=["requester_facility_id", "patient_ref", "specialty_id"],
                name="report_fact_patient",
            ),
        ]

    def __str__(self) -> str:
        return f"fact {self.referral_id}"


class UpkeepState(models.Model):
    """A single row (pk 1): how far the event log has been applied."""

    watermark = models.BigIntegerField(default=0, help_text="highest event id applied")
    # {event id: first seen (epoch seconds)} ids below the watermark not yet visible: a
    # transaction that took the id had not committed yet (or rolled back).
    gaps = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    events_applied = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"watermark {self.watermark}"
