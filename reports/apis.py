"""Thin REST views over the report selectors: parse the filters, call one selector.

Every endpoint answers JSON, and CSV or XLSX with ``?format=csv`` / ``?format=xlsx``
(the file is named after the endpoint)."""

from __future__ import annotations

from typing import Any

from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import User
from core.errors import ApplicationError
from reports import selectors
from reports.exports import CSVRenderer, XLSXRenderer
from reports.metrics import METRICS, RESPONSE_METRICS

FILTER_PARAMETERS = [
    OpenApiParameter("period", str, enum=list(selectors.PERIODS), description="default month"),
    OpenApiParameter("from", str, description="first day, YYYY-MM-DD (report time zone)"),
    OpenApiParameter("to", str, description="last day, YYYY-MM-DD (inclusive)"),
    OpenApiParameter("country", str, description="ISO 3166-1 alpha-2 of the requester"),
    OpenApiParameter("province", int, description="requester province (area id)"),
    OpenApiParameter("tier", int, description="requester tier 1-4"),
    OpenApiParameter("facility", int, description="requester facility id"),
    OpenApiParameter("hub", int, description="consultant (hub) facility id"),
    OpenApiParameter("specialty", str, description="SNOMED CT specialty code"),
    OpenApiParameter("campaign", str),
    OpenApiParameter("cross_border", bool),
    OpenApiParameter(
        "by",
        str,
        description="group by, comma-separated: "
        + ", ".join(selectors.GROUPINGS)
        + " (aggregate-only accounts: one)",
    ),
    OpenApiParameter("format", str, enum=["json", "csv", "xlsx"]),
]


def _user(request: Request) -> User:
    assert isinstance(request.user, User)
    return request.user


class ReportApi(APIView):
    permission_classes = [IsAuthenticated]
    renderer_classes = [JSONRenderer, CSVRenderer, XLSXRenderer]
    name = "report"

    def perform_content_negotiation(self, request: Any, force: bool = False) -> Any:
        try:
            return super().perform_content_negotiation(request, force)
        except Http404:
            # DRF answers an unknown ?format= with 404 "Not found.": it is a bad filter
            # (400), said after authentication and the 403 (``initial``), in JSON.
            self.unknown_format = True
            return (JSONRenderer(), JSONRenderer.media_type)

    def initial(self, request: Any, *args: Any, **kwargs: Any) -> None:
        self.unknown_format = False
        super().initial(request, *args, **kwargs)
        # Who may see reports at all is answered (403) before any filter is read (400).
        selectors.report_scope_for(_user(request))
        if self.unknown_format:
            raise ApplicationError(
                "Invalid report filters.", extra={"errors": {"format": "json, csv or xlsx"}}
            )

    def finalize_response(self, request: Any, response: Any, *args: Any, **kwargs: Any) -> Any:
        if response.status_code >= 400:  # a problem is JSON, whatever format was asked for
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        response = super().finalize_response(request, response, *args, **kwargs)
        fmt = getattr(getattr(request, "accepted_renderer", None), "format", "json")
        if fmt in ("csv", "xlsx") and response.status_code == 200:
            response["Content-Disposition"] = f'attachment; filename="{self.name}.{fmt}"'
        return response


class ReportCountsApi(ReportApi):
    name = "report-counts"

    @extend_schema(
        parameters=FILTER_PARAMETERS,
        responses={200: dict},
        summary="Volumes, outcomes, avoided transfers, travel, SLA share per group",
    )
    def get(self, request: Request) -> Response:
        filters = selectors.filters_parse(request.query_params)
        return Response(selectors.report_counts(_user(request), filters))


class ReportSummaryApi(ReportApi):
    name = "report-summary"

    @extend_schema(parameters=FILTER_PARAMETERS, responses={200: dict}, summary="Headlines")
    def get(self, request: Request) -> Response:
        filters = selectors.filters_parse(request.query_params, allow_by=False)
        return Response(selectors.report_summary(_user(request), filters))


class ReportResponseTimesApi(ReportApi):
    name = "report-response-times"

    @extend_schema(
        parameters=FILTER_PARAMETERS,
        responses={200: dict},
        summary="Median and p90 time to accept and to advice (hours) per group",
    )
    def get(self, request: Request) -> Response:
        filters = selectors.filters_parse(request.query_params)
        return Response(selectors.report_response_times(_user(request), filters))


class ReportCapacityApi(ReportApi):
    name = "report-capacity"

    @extend_schema(
        parameters=FILTER_PARAMETERS,
        responses={200: dict},
        summary="Share resolved locally per lower-tier facility, specialty and period",
    )
    def get(self, request: Request) -> Response:
        filters = selectors.filters_parse(request.query_params, allow_by=False)
        return Response(selectors.report_capacity(_user(request), filters))


class ReportDrilldownApi(ReportApi):
    name = "report-drilldown"

    @extend_schema(
        parameters=[
            OpenApiParameter("metric", str, required=True, description="a count metric code"),
            *FILTER_PARAMETERS,
        ],
        responses={200: dict},
        summary="The referral ids behind a figure (not for aggregate-only accounts)",
    )
    def get(self, request: Request) -> Response:
        filters = selectors.filters_parse(request.query_params, allow_by=False)
        metric = str(request.query_params.get("metric", ""))
        return Response(selectors.report_drilldown(_user(request), filters, metric))


class ReportMetricsApi(ReportApi):
    name = "report-metrics"

    @extend_schema(responses={200: dict}, summary="Definitions of every metric")
    def get(self, request: Request) -> Response:
        selectors.report_scope_for(_user(request))
        rows = [
            {"code": m.code, "label": m.label, "kind": m.kind, "definition": m.definition}
            for m in (*METRICS, *RESPONSE_METRICS)
        ]
        return Response({"rows": rows})
