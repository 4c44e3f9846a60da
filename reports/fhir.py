"""Hook for the FHIR gateway: MeasureReport / Measure content as plain data.

The gateway (fhir_gateway/, the only package that imports fhir.resources) is expected to
call these two functions and map the dictionaries to ``Measure`` and ``MeasureReport``
(type "summary"): one Measure per metric in ``reports.metrics``, and one MeasureReport
group per metric with the population count (or the measureScore for rates and sums),
stratified by the requested grouping. A suppressed figure is None with ``suppressed``
true (the total's and each stratum's own), so the FHIR surface never shows more than the
JSON API and can tell a hidden figure from one that does not exist (a rate without a
denominator: None, ``suppressed`` false).
Nothing here imports FHIR models.
"""

from __future__ import annotations

from typing import Any

from accounts.models import User
from reports.metrics import METRICS, RESPONSE_METRICS
from reports.selectors import ReportFilters, report_counts

MEASURE_BASE = "urn:consilium:measure:"


def measure_definitions() -> list[dict[str, Any]]:
    """One entry per Measure: url, name, title, description, scoring."""
    scoring = {"count": "cohort", "sum": "continuous-variable", "rate": "proportion"}
    return [
        {
            "url": f"{MEASURE_BASE}{m.code}",
            "name": m.code,
            "title": m.label,
            "description": m.definition,
            "scoring": scoring.get(m.kind, "continuous-variable"),
        }
        for m in (*METRICS, *RESPONSE_METRICS)
    ]


def measure_report_data(user: User, filters: ReportFilters) -> dict[str, Any]:
    """The figures of one MeasureReport: period, totals and strata per metric, already
    scoped and suppressed for ``user``."""
    table = report_counts(user, filters)
    return {
        "period": {
            "start": filters.date_from.isoformat() if filters.date_from else None,
            "end": filters.date_to.isoformat() if filters.date_to else None,
        },
        "groups": [
            {
                "measure": f"{MEASURE_BASE}{m.code}",
                "value": table["total"].get(m.code),
                "suppressed": m.code in table["total"].get("suppressed", ()),
                "strata": [
                    {
                        "stratum": {g: row.get(f"{g}_label", row.get(g)) for g in table["by"]},
                        "value": row.get(m.code),
                        "suppressed": m.code in row.get("suppressed", ()),
                    }
                    for row in table["rows"]
                ],
            }
            for m in METRICS
        ],
        "suppression": table.get("suppression"),
    }
