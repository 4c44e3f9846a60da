"""The metric catalogue: one entry per reported figure (docs/metrics.md explains each).

Used by the API (``/api/v1/reports/metrics/``), the dashboard labels, suppression (which
figures are counts of referrals, which derive from which counts) and the FHIR hook
(``reports.fhir``: a Measure per entry).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    code: str
    label: str
    kind: str  # count | sum | rate | duration
    definition: str
    # For a derived figure (rate, sum, duration): the counts it is hidden with.
    depends_on: tuple[str, ...] = ()
    # Action(s) whose events make up a count (drill-down), "" when fact-based.
    drill: str = ""


METRICS: tuple[Metric, ...] = (
    Metric("submitted", "Referrals submitted", "count", "submit events", drill="submit"),
    Metric("accepted", "Accepted", "count", "accept events", drill="accept"),
    Metric("declined", "Declined", "count", "decline events", drill="decline"),
    Metric("forwarded", "Re-routed", "count", "forward + reroute events", drill="forward"),
    Metric("cancelled", "Cancelled", "count", "cancel events", drill="cancel"),
    Metric("expired", "Expired", "count", "expire events", drill="expire"),
    Metric("advised", "Advised", "count", "advise + finish_conference events", drill="advice"),
    Metric("closed_local", "Closed locally", "count", "close_local events", drill="close_local"),
    Metric(
        "transfer_considered",
        "Transfer originally considered",
        "count",
        "close_local events whose close-out says a transfer was originally considered",
        drill="considered",
    ),
    Metric(
        "avoided",
        "Transfers avoided",
        "count",
        "close_local events: transfer originally considered and outcome avoided",
        drill="avoided",
    ),
    Metric(
        "avoided_verified",
        "Verified avoided transfers",
        "count",
        "avoided transfers with no new referral or transfer of the same patient and "
        "specialty within REPORTS_VERIFY_DAYS, the window having elapsed",
        drill="avoided_verified",
    ),
    Metric(
        "avoided_pending",
        "Avoided transfers awaiting verification",
        "count",
        "avoided transfers whose verification window has not elapsed and no follow-up yet",
        drill="avoided_pending",
    ),
    Metric(
        "avoidance_rate",
        "Avoidance rate",
        "rate",
        "avoided / transfer_considered",
        depends_on=("avoided", "transfer_considered"),
    ),
    Metric(
        "transfer_requested",
        "Transfers requested",
        "count",
        "request_transfer events",
        drill="request_transfer",
    ),
    Metric(
        "transfer_completed", "Transfers completed", "count", "complete events", drill="complete"
    ),
    Metric(
        "counter_referrals",
        "Counter-referrals",
        "count",
        "counter_refer events",
        drill="counter_refer",
    ),
    Metric(
        "sla_share",
        "Answered within SLA",
        "rate",
        "sla_met / sla_due: accept or decline within the department's sla_hours of the "
        "(re)assignment, over accept + decline + expire events",
        depends_on=("sla_due",),
    ),
    Metric(
        "travel_km",
        "Travel avoided (km)",
        "sum",
        "sum over avoided transfers of 2 x great-circle distance requester-consultant",
        depends_on=("avoided",),
    ),
    Metric(
        "travel_cost",
        "Travel cost avoided",
        "sum",
        "sum over requester countries of travel_km x REPORTS_COST_PER_KM[country]",
        depends_on=("avoided",),
    ),
)
METRICS_BY_CODE: dict[str, Metric] = {m.code: m for m in METRICS}
COUNT_METRICS: tuple[str, ...] = tuple(m.code for m in METRICS if m.kind == "count")

RESPONSE_METRICS: tuple[Metric, ...] = (
    Metric(
        "accept_hours",
        "Time to accept (hours)",
        "duration",
        "accept.at - at of the submit/forward that assigned the accepting department; "
        "median and p90 over referrals accepted in the period",
        depends_on=("accept_n",),
    ),
    Metric(
        "advice_hours",
        "Time to advice (hours)",
        "duration",
        "first advise/finish_conference.at - first submit.at; median and p90 over "
        "referrals first advised in the period",
        depends_on=("advice_n",),
    ),
)
