from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from core.health import check_broker, check_database
from core.logging import current_request_id

logger = logging.getLogger(__name__)


@never_cache
@require_safe  # GET and HEAD (load balancers probe with either)
def healthz(request: HttpRequest) -> JsonResponse:
    failures = {
        name: error
        for name, error in (("database", check_database()), ("broker", check_broker()))
        if error is not None
    }
    if failures:
        # The details (host names, paths) go to the log; anyone may call this endpoint.
        for name, error in failures.items():
            logger.error("health check failed: %s: %s", name, error)
        failing = {name: error.split(":", 1)[0] for name, error in failures.items()}
        return JsonResponse({"status": "unhealthy", "failing": failing}, status=503)
    return JsonResponse({"status": "ok", "checks": {"database": "ok", "broker": "ok"}})


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """``handler404``: under /api/ a JSON problem like every other API error (a path no
    route matches never reaches DRF); elsewhere Django's page."""
    if request.path.startswith("/api/"):
        body = {"status": 404, "code": "not_found", "detail": "Not found."}
        if request_id := current_request_id():
            body["request_id"] = request_id
        return JsonResponse(body, status=404, content_type="application/problem+json")
    return defaults.page_not_found(request, exception)
