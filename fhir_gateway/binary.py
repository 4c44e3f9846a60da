"""``Binary``: the bytes of a referral's case files over FHIR (read and create).

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

Create (``POST /fhir/Binary``) stores a new case file of the referral its security context
names (``ServiceRequest/<id>`` or ``Task/<id>``), as a DocumentReference with an inline file
does, and answers with the new ``Binary`` (its id is the new DocumentReference's). The body
is either

- the file itself, with its own ``Content-Type`` and the context in the
  ``X-Security-Context`` header (FHIR's raw Binary create): up to ``ATTACHMENT_MAX_BYTES``,
  beyond the FHIR JSON body limit, so the way to send a large file; or
- a FHIR JSON ``Binary`` (``contentType``, base64 ``data``, ``securityContext``).

Each create is recorded in the audit log as the REST upload is.
"""

from __future__ import annotations

import base64
from typing import Any

from django.db import transaction
from django.http import FileResponse, HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.utils.http import http_date

from core.values import declared_length, written_int
from fhir_gateway import handlers
from fhir_gateway import referral_mapping as m
from fhir_gateway.audit import audit_file
from fhir_gateway.handlers import RawCreate, RawRead, ResourceHandler
from fhir_gateway.outcomes import FhirError, bodiless_response
from fhir_gateway.referral_resources import case_file_store, referral_from_references
from fhir_gateway.storage import dumps, fhir_instant, none_match, validate_resource
from fhir_gateway.versions import binary_answer_version, media_type_for
from referrals.attachments import attachment_get, max_bytes
from referrals.models import Attachment, AuditAction, Referral
from referrals.selectors import referral_visible


def _not_found(logical_id: str) -> FhirError:
    return FhirError(404, "not-found", f"Binary/{logical_id} is not known.")


def _attachment(read: RawRead) -> Attachment:
    filler, separator, number = read.logical_id.rpartition(m.CASE_FILE_SEPARATOR)
    # The number as m.case_file_id writes it: ids are strings, …-att-01 is not …-att-1.
    if not separator or not filler or written_int(number) is None:
        raise _not_found(read.logical_id)
    referral_pk = (
        referral_visible(read.user).filter(filler_id=filler).values_list("pk", flat=True).first()
    )
    if referral_pk is None:
        raise _not_found(read.logical_id)
    # The referral module's scoped getter (NotFound → 404 OperationOutcome).
    return attachment_get(user=read.user, referral_id=referral_pk, number=number)


def _resource(logical_id: str, attachment: Attachment, data: bytes) -> dict[str, Any]:
    return {
        "resourceType": "Binary",
        "id": logical_id,
        "meta": {"versionId": "1", "lastUpdated": fhir_instant(attachment.created)},
        "contentType": attachment.content_type,
        "securityContext": {"reference": f"DocumentReference/{logical_id}"},
        "data": base64.b64encode(data).decode("ascii"),
    }


def binary_read(read: RawRead) -> HttpResponseBase:
    attachment = _attachment(read)
    if none_match(read.request.headers.get("If-None-Match", ""), 1):
        # The client holds the file (it never changes): 304, nothing sent, nothing read.
        not_modified = bodiless_response(304)
        not_modified["ETag"] = 'W/"1"'
        not_modified["Vary"] = "Accept"
        return not_modified
    version = binary_answer_version(read.request, attachment.content_type)
    audit_file(read.request, read.user, AuditAction.DOWNLOAD, attachment.referral_id, attachment.pk)
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
            dumps(_resource(read.logical_id, attachment, data)),
            content_type=media_type_for(version),
        )
    _file_headers(response, attachment)
    response["Vary"] = "Accept"
    return response


def _file_headers(response: HttpResponseBase, attachment: Attachment) -> None:
    """What a read and a create of a case file both answer with."""
    response["ETag"] = 'W/"1"'  # a case file never changes
    response["Last-Modified"] = http_date(attachment.created.timestamp())
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "private, no-store"


SECURITY_CONTEXT_HEADER = "X-Security-Context"


def _raw_body(request: HttpRequest) -> bytes:
    """The request body, at most ``ATTACHMENT_MAX_BYTES`` (413 beyond: declared or read),
    read from the stream (``request.body`` stops at the FHIR JSON limit). Without a
    Content-Length (chunked), from the server's stream when the server ends it
    (``wsgi.input_terminated``: gunicorn does), else 411."""
    limit = max_bytes()
    too_large = FhirError(413, "too-costly", f"The file is larger than {limit} bytes.")
    declared = (request.META.get("CONTENT_LENGTH") or "").strip()
    length = declared_length(declared)
    if length is None:
        raise FhirError(400, "structure", "Content-Length is not a number.")
    if length > limit:
        raise too_large
    stream: Any = request
    if not declared:
        if not request.META.get("wsgi.input_terminated"):
            raise FhirError(411, "structure", "Send the file with a Content-Length.")
        stream = request.META["wsgi.input"]  # Django reads nothing without a length
    try:
        data = bytes(stream.read(limit + 1))
    except OSError as exc:  # UnreadablePostError too: the client went away mid-upload
        raise FhirError(400, "structure", "The request body could not be read to its end.") from exc
    if len(data) > limit:
        raise too_large
    return data


def _raw_file(call: RawCreate) -> tuple[Referral, bytes, str]:
    """The file as the body: its referral (from ``X-Security-Context``, before the bytes
    are read: outside the caller's scope nothing is), bytes and content type."""
    context = call.request.headers.get(SECURITY_CONTEXT_HEADER, "").strip()
    referral = referral_from_references(call.user, [context], SECURITY_CONTEXT_HEADER, call.base)
    data = _raw_body(call.request)
    if not data:
        raise FhirError(400, "structure", "The file is empty.")
    content_type = call.request.content_type or ""
    if not content_type:
        raise FhirError(
            415, "not-supported", "Send the file with its Content-Type (or a FHIR Binary)."
        )
    return referral, data, content_type


def _fhir_binary(call: RawCreate) -> tuple[Referral, bytes, str]:
    """A FHIR JSON Binary: its referral (``securityContext``), bytes and content type."""
    assert call.resource is not None and call.body_version is not None
    validate_resource(call.resource, call.body_version)
    data = m.attachment_bytes(call.resource, "Binary")
    if not data:
        raise FhirError(422, "required", "Binary.data is required.", expression=["Binary.data"])
    context = m.reference_of(call.resource.get("securityContext"))
    referral = referral_from_references(call.user, [context], "Binary.securityContext", call.base)
    return referral, data, str(call.resource.get("contentType") or "")


def binary_create(call: RawCreate) -> HttpResponseBase:
    referral, data, content_type = (_raw_file if call.resource is None else _fhir_binary)(call)
    with transaction.atomic():  # the file, its row and DocumentReference: all or nothing
        stored = case_file_store(call.user, referral, data, content_type=content_type, title="")
        audit_file(call.request, call.user, AuditAction.CREATE, referral.pk, stored.attachment.pk)
    logical_id = stored.result.row.logical_id
    attachment = stored.attachment
    prefer = call.request.headers.get("Prefer", "")
    if "return=minimal" in prefer:
        response = bodiless_response(201)
    else:
        response = HttpResponse(
            dumps(_resource(logical_id, attachment, data)),
            status=201,
            content_type=media_type_for(call.version),
        )
    response["Location"] = f"{call.base}/Binary/{logical_id}/_history/1"
    _file_headers(response, attachment)
    return response


def register_all() -> None:
    handlers.register(
        ResourceHandler(
            "Binary",
            # vread: version 1 only (bytes never change), the Location a create answers.
            (handlers.READ, handlers.VREAD, handlers.CREATE),
            documentation="The bytes of a referral's case file (id = its DocumentReference's, "
            "the attachment url): raw with the stored content type, or a Binary resource "
            "(base64 data) when Accept is FHIR JSON. Scoped like the referral (404 outside). "
            "Create: a new case file of the referral named by securityContext (or, with the "
            "file as the body, by the X-Security-Context header); its DocumentReference is "
            "made with it.",
            raw_read=binary_read,
            raw_create=binary_create,
        )
    )
