"""OperationOutcome answers: every error under /fhir is one of these.

``FhirError`` is what gateway code raises; ``core.errors.ApplicationError`` (raised by the
domain services) is turned into the same shape by ``outcome_for_application_error``. Both go
through ``outcome_response``, the one place that writes an error answer.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.db import DataError, IntegrityError
from django.http import Http404, HttpResponse, UnreadablePostError

from core.errors import ApplicationError
from core.logging import current_request_id

logger = logging.getLogger(__name__)

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

# The issue type (http://hl7.org/fhir/issue-type) that goes with each HTTP status we produce.
ISSUE_CODE_FOR_STATUS: dict[int, str] = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "business-rule",
    500: "exception",
}

# Issue types an ApplicationError may name directly in ``code`` (otherwise the status decides).
_ISSUE_TYPES = frozenset(
    {
        "invalid",
        "structure",
        "required",
        "value",
        "invariant",
        "security",
        "login",
        "unknown",
        "expired",
        "forbidden",
        "suppressed",
        "processing",
        "not-supported",
        "duplicate",
        "multiple-matches",
        "not-found",
        "deleted",
        "too-long",
        "code-invalid",
        "extension",
        "too-costly",
        "business-rule",
        "conflict",
        "transient",
        "lock-error",
        "no-store",
        "exception",
        "timeout",
        "incomplete",
        "throttled",
        "informational",
    }
)


class FhirError(Exception):
    """An error answered with an OperationOutcome."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
        severity: str = "error",
        extension: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.extension = extension  # on the issue: machine-readable detail
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.expression = expression
        self.headers = dict(headers or {})
        self.severity = severity


def operation_outcome(
    code: str,
    diagnostics: str,
    *,
    severity: str = "error",
    expression: list[str] | None = None,
    extension: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if extension:
        issue = {"extension": extension, **issue}
    if expression:
        issue["expression"] = expression
    outcome: dict[str, Any] = {"resourceType": "OperationOutcome", "issue": [issue]}
    request_id = current_request_id()
    if request_id and _FHIR_ID.match(request_id):
        # Lets an integrator quote the id that our logs carry.
        outcome["id"] = request_id
    return outcome


def outcome_for_application_error(exc: ApplicationError) -> FhirError:
    status = exc.status_code if exc.status_code in ISSUE_CODE_FOR_STATUS else 400
    code = exc.code if exc.code in _ISSUE_TYPES else ISSUE_CODE_FOR_STATUS[status]
    if status == 422 and code == "invalid":
        code = "business-rule"
    return FhirError(status, code, exc.message)


def fhir_error_for(exc: Exception) -> FhirError | None:
    """The answer to an exception the gateway or the services raise; None for anything else
    (a bug: the caller logs it and answers 500)."""
    if isinstance(exc, FhirError):
        return exc
    if isinstance(exc, ApplicationError):
        return outcome_for_application_error(exc)
    if isinstance(exc, DjangoPermissionDenied):
        return FhirError(403, "forbidden", str(exc) or "Not allowed.")
    if isinstance(exc, UnreadablePostError):  # the client went away mid-body
        return FhirError(400, "structure", "The request body could not be read to its end.")
    if isinstance(exc, Http404):
        return FhirError(404, "not-found", str(exc) or "Not found.")
    if isinstance(exc, IntegrityError):
        return FhirError(409, "conflict", "The change conflicts with stored data.")
    if isinstance(exc, DataError):  # a value the checks let through and the column refused
        logger.warning("database refused a value", exc_info=exc)
        return FhirError(
            422,
            "invalid",
            "A value is too long, out of range or holds a character that cannot be stored.",
        )
    return None


def outcome_body(error: FhirError) -> dict[str, Any]:
    return operation_outcome(
        error.code,
        error.diagnostics,
        severity=error.severity,
        expression=error.expression,
        extension=error.extension,
    )


def outcome_text(error: FhirError) -> str:
    """The OperationOutcome as JSON text that UTF-8 can carry: diagnostics may repeat a
    member's input, and JSON's ``\ud800`` escapes decode to lone surrogates, which UTF-8
    (the response, the database) cannot encode; then the text escapes them again."""
    text = json.dumps(outcome_body(error), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(outcome_body(error))
    return text


def outcome_response(error: FhirError, *, content_type: str) -> HttpResponse:
    response = HttpResponse(
        outcome_text(error),
        status=error.status,
        content_type=content_type,
    )
    for name, value in error.headers.items():
        response[name] = value
    return response


def bodiless_response(status: int) -> HttpResponse:
    """An answer without a body (201 with ``return=minimal``, 204, 304): no Content-Type
    either (Django's default said text/html)."""
    response = HttpResponse(status=status)
    del response["Content-Type"]
    return response
