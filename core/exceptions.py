"""Turns errors into JSON problem answers (RFC 9457 shape) for the REST API."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError
from django.http import Http404
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler

from core.errors import ApplicationError
from core.logging import current_request_id

logger = logging.getLogger(__name__)


def _problem(status: int, code: str, detail: Any, extra: dict[str, Any] | None = None) -> Response:
    body: dict[str, Any] = {"status": status, "code": code, "detail": detail}
    if extra:
        body.update(extra)
    request_id = current_request_id()
    if request_id:
        body["request_id"] = request_id
    return Response(body, status=status, content_type="application/problem+json")


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ApplicationError):
        return _problem(exc.status_code, exc.code, exc.message, exc.extra)
    if isinstance(exc, DjangoValidationError):
        messages: Any = exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        return _problem(400, "invalid", messages)
    if isinstance(exc, IntegrityError):
        # A database constraint refused the write: the input conflicts with stored data.
        logger.info("integrity error turned into 409", extra={"error": str(exc)})
        return _problem(409, "conflict", "The change conflicts with existing data.")
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, drf_exceptions.APIException):
        if isinstance(exc.detail, dict | list):
            detail: Any = exc.detail
            code: str = "invalid"
        else:
            detail = str(exc.detail)
            code = str(getattr(exc.detail, "code", exc.default_code))
        problem = _problem(response.status_code, str(code), detail)
        for header in ("WWW-Authenticate", "Retry-After", "Allow"):
            if header in response:
                problem[header] = response[header]
        return problem
    return response
