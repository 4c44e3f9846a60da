"""The dashboard at /reports/: server-rendered, inline SVG charts, a CSV link per chart."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse

from accounts.models import User
from core.errors import ApplicationError
from registry.models import Country, Tier
from reports import charts, selectors

FORM_FIELDS = ("period", "from", "to", "country", "tier", "specialty", "campaign")


def _csv_link(name: str, params: dict[str, str], **extra: str) -> str:
    query = {**params, **extra, "format": "csv"}
    return f"{reverse(name)}?{urlencode(query)}"


def _series(name: str, rows: list[dict[str, Any]], key: str) -> charts.Series:
    """A chart series of one figure of ``rows``, saying which Nones suppression hid."""
    hidden = frozenset(i for i, r in enumerate(rows) if key in r.get("suppressed", ()))
    return charts.Series(name, [r[key] for r in rows], hidden)


def _label(row: dict[str, Any], grouping: str) -> str:
    return str(row.get(f"{grouping}_label", ""))


def _form_context(scope: Any, params: dict[str, str]) -> dict[str, Any]:
    """What the filter form shows: the choices in the user's scope, and what was chosen."""
    campaigns, specialties = selectors.report_filter_choices(scope)
    return {
        "filters": params,
        "periods": selectors.PERIODS,
        "countries": Country.objects.order_by("code"),
        "tiers": Tier.choices,
        "specialties": specialties,
        "campaigns": campaigns,
    }


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    user = request.user
    assert isinstance(user, User)
    params = {k: str(request.GET[k]) for k in FORM_FIELDS if request.GET.get(k)}
    try:
        scope = selectors.report_scope_for(user)  # who may see reports first (403)
    except ApplicationError as exc:
        return render(
            request, "reports/dashboard.html", {"error": exc.message}, status=exc.status_code
        )
    try:
        filters = selectors.filters_parse(params, allow_by=False)
    except ApplicationError as exc:
        # The form again with what was chosen and what is wrong, so it can be corrected.
        return render(
            request,
            "reports/dashboard.html",
            {
                **_form_context(scope, params),
                "error": exc.message,
                "errors": exc.extra.get("errors", {}),
            },
            status=exc.status_code,
        )
    summary = selectors.report_summary(user, filters)
    trend = selectors.report_counts(user, replace(filters, by=("period",)))
    provinces = selectors.report_counts(user, replace(filters, by=("province",)))
    hubs = selectors.report_counts(user, replace(filters, by=("hub",)))
    times = selectors.report_response_times(user, replace(filters, by=("specialty",)))

    periods = [r["period"] for r in trend["rows"]]
    trend_chart = charts.column_chart(
        "chart-trend",
        "Referrals submitted and transfers avoided per period",
        periods,
        [
            _series("Submitted", trend["rows"], "submitted"),
            _series("Transfers avoided", trend["rows"], "avoided"),
        ],
    )
    province_chart = charts.bar_chart(
        "chart-province",
        "Transfers avoided and travel avoided by province",
        [_label(r, "province") for r in provinces["rows"]],
        [
            _series("Avoided", provinces["rows"], "avoided"),
            _series("Verified", provinces["rows"], "avoided_verified"),
        ],
    )
    hub_chart = charts.bar_chart(
        "chart-hub",
        "Transfers avoided by hub hospital",
        [_label(r, "hub") for r in hubs["rows"]],
        [
            _series("Avoided", hubs["rows"], "avoided"),
            _series("Verified", hubs["rows"], "avoided_verified"),
        ],
    )
    times_chart = charts.bar_chart(
        "chart-times",
        "Time to accept by specialty (hours)",
        [_label(r, "specialty") for r in times["rows"]],
        [
            _series("Median", times["rows"], "accept_median_hours"),
            _series("90th percentile", times["rows"], "accept_p90_hours"),
        ],
        unit=" h",
    )
    context = {
        **_form_context(scope, params),
        "aggregate_only": scope.aggregate_only,
        "min_cell": selectors.min_cell(),
        "verify_days": selectors.verify_days(),
        "counts": summary["counts"],
        "times": summary["response_times"],
        "percentiles": summary["percentiles"],
        "trend": trend,
        "provinces": provinces,
        "hubs": hubs,
        "response_times": times,
        "trend_chart": trend_chart,
        "province_chart": province_chart,
        "hub_chart": hub_chart,
        "times_chart": times_chart,
        "csv": {
            "trend": _csv_link("report-counts", params, by="period"),
            "province": _csv_link("report-counts", params, by="province"),
            "hub": _csv_link("report-counts", params, by="hub"),
            "times": _csv_link("report-response-times", params, by="specialty"),
            "summary": _csv_link("report-summary", params),
        },
        "currency": selectors.currency(),
    }
    return render(request, "reports/dashboard.html", context)
