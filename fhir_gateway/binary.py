"""``Binary``: the bytes of a referral's case files over FHIR (read only).

``Binary/<id>`` has the id of the case file's DocumentReference (``<filler>-att-<n>``,
whose ``content.attachment.url`` points here). The bytes stay where
``referrals.attachments`` stored them (Django storage, type sniffed, SHA-256): this module
finds the file through that module's scoped getter (``attachment_get``: the referral's scope,
404 outside it) and answers

- the raw bytes with the stored (sniffed) content type when the caller does not ask for
  FHIR JSON (no Accept, ``*/*``, the type itself or ``type/*``), as the REST download does;
- a ``Binary`` resource (``contentType``, ``securityContext`` = the DocumentReference,
  base64 ``data``) when ``Accept`` or ``_format`` asks for FHIR JSON, in its version.

It is the one type not served from stored JSON: the bytes are not FHIR resources, and
wrapping a 20 MiB file in base64 at every version would double the storage. Each read is
recorded in the audit log as a download, like the REST download.
"""

from __future__ import annotations

import base64
from typing import Any

from django.http import FileResponse, HttpResponse
from django.http.response import HttpResponseBase
from django.utils.http import http_date

from core.values import ascii_digits
from fhir_gateway import handlers
from fhir_gateway.handlers import RawRead, ResourceHandler
from fhir_gateway.outcomes import FhirError
from fhir_gateway.storage import dumps, fhir_instant
from fhir_gateway.versions import binary_answer_version, media_type_for
from referrals.attachments import attachment_get
from referrals.audit import audit_record
from referrals.models import Attachment, AuditAction
from referrals.selectors import referral_visible

_SEPARATOR = "-att-"


def binary_id(filler_id: str, attachment_pk: int) -> str:
    """The id of a case file's Binary and DocumentReference."""
    return f"{filler_id}{_SEPARATOR}{attachment_pk}"


def _not_found(logical_id: str) -> FhirError:
    return FhirError(404, "not-found", f"Binary/{logical_id} is not known.")


def _attachment(read: RawRead) -> Attachment:
    filler, separator, number = read.logical_id.rpartition(_SEPARATOR)
    if not separator or not filler or not ascii_digits(number):
        raise _not_found(read.logical_id)
    referral_pk = (
        referral_visible(read.user).filter(filler_id=filler).values_list("pk", flat=True).first()
    )
    if referral_pk is None:
        raise _not_found(read.logical_id)
    # The referral module's scoped getter (NotFound → 404 OperationOutcome).
    return attachment_get(user=read.user, referral_id=referral_pk, attachment_id=number)


def _resource(read: RawRead, attachment: Attachment, data: bytes) -> dict[str, Any]:
    return {
        "resourceType": "Binary",
        "id": read.logical_id,
        "meta": {"versionId": "1", "lastUpdated": fhir_instant(attachment.created)},
        "contentType": attachment.content_type,
        "securityContext": {"reference": f"DocumentReference/{read.logical_id}"},
        "data": base64.b64encode(data).decode("ascii"),
    }


def binary_read(read: RawRead) -> HttpResponseBase:
    attachment = _attachment(read)
    version = binary_answer_version(read.request, attachment.content_type)
    # audit_record reads the acting user from the request (bearer auth does not set it).
    read.request.user = read.user
    audit_record(
        read.request,
        AuditAction.DOWNLOAD,
        [attachment.referral_id],
        object_type="attachment",
        object_id=attachment.pk,
        detail="fhir-binary",
    )
    response: HttpResponseBase
    if version is None:
        response = FileResponse(
            attachment.file.open("rb"),
            as_attachment=True,
            filename=attachment.original_name,
            content_type=attachment.content_type,
        )
        response["Content-Length"] = str(attachment.size)
    else:
        with attachment.file.open("rb") as handle:
            data = handle.read()
        response = HttpResponse(
            dumps(_resource(read, attachment, data)), content_type=media_type_for(version)
        )
    response["ETag"] = 'W/"1"'  # a case file never changes
    response["Last-Modified"] = http_date(attachment.created.timestamp())
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "private, no-store"
    response["Vary"] = "Accept"
    return response


def register_all() -> None:
    handlers.register(
        ResourceHandler(
            "Binary",
            (handlers.READ,),
            documentation="The bytes of a referral's case file (id = its DocumentReference's, "
            "the attachment url): raw with the stored content type, or a Binary resource "
            "(base64 data) when Accept is FHIR JSON. Scoped like the referral (404 outside).",
            raw_read=binary_read,
        )
    )
