from django.urls import path

from reports import apis

urlpatterns = [
    path("", apis.ReportCountsApi.as_view(), name="report-counts"),
    path("summary/", apis.ReportSummaryApi.as_view(), name="report-summary"),
    path("response-times/", apis.ReportResponseTimesApi.as_view(), name="report-response-times"),
    path("capacity/", apis.ReportCapacityApi.as_view(), name="report-capacity"),
    path("drilldown/", apis.ReportDrilldownApi.as_view(), name="report-drilldown"),
    path("metrics/", apis.ReportMetricsApi.as_view(), name="report-metrics"),
]
