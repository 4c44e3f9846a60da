from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from core.health import check_broker, check_database


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    failures = {
        name: error
        for name, error in (("database", check_database()), ("broker", check_broker()))
        if error is not None
    }
    if failures:
        return JsonResponse({"status": "unhealthy", "failing": failures}, status=503)
    return JsonResponse({"status": "ok", "checks": {"database": "ok", "broker": "ok"}})
