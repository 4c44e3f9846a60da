from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware import csrf as csrf_middleware
from django.shortcuts import render
from django.views import csrf, defaults
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


# The check failed on the token (not on where the post came from): our own page, opened
# before the token was renewed (a login in another tab) or before the cookie was cleared.
_TOKEN_REASONS = (csrf_middleware.REASON_NO_CSRF_COOKIE, "CSRF token")


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """``CSRF_FAILURE_VIEW``: for the pages, "nothing was changed", a link to the form
    again and (a referral form posted from our own origin) what was typed, instead of
    Django's bare "CSRF verification failed. Request aborted."; the API keeps Django's."""
    if request.path.startswith(("/api/", "/fhir")):
        return csrf.csrf_failure(request, reason)
    # Imported here: referrals' web module is not needed to start the API.
    from referrals.web import _typed

    own_origin = "HTTP_ORIGIN" in request.META and reason.startswith(_TOKEN_REASONS)
    typed = (
        _typed(request.POST)
        if own_origin and request.path.startswith("/referrals/") and request.method == "POST"
        else []
    )
    context = {"typed": typed, "again": request.path}
    return render(request, "core/csrf_failure.html", context, status=403)
