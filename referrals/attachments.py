"""Case files on a referral: PDF, JPEG, PNG and DICOM, through Django storage.

- The type is decided by the bytes (magic numbers). A file whose declared Content-Type or
  file-name extension disagrees with its bytes is refused (415 ``type_mismatch``); bytes
  of any other type are refused (415 ``unsupported_type``). ``application/octet-stream``
  and a missing extension are not claims: the bytes decide.
- Size limit ``settings.ATTACHMENT_MAX_BYTES`` (413 ``too_large``), checked on the
  request's Content-Length before parsing and on the parsed file.
- SHA-256 and the size are computed while the chunks stream into storage.
- Stored under a random name (``attachments/<referral id>/<uuid>``), never the client's;
  the client's name is kept for Content-Disposition only.
- Who: staff of the requesting facility or of the assigned department with a clinical
  role upload; everyone who can see the referral (the scoped getter's rules, including
  invited experts and regional coordinators) lists and downloads. Outsiders get 404.
- When: uploads while the referral is live, i.e. in any state but the terminal ones
  (declined, cancelled, expired, closed locally, completed): results often arrive after
  the advice (``advised``) and during a transfer. A closed case is a record, not edited.
- Recorded in the audit log (create / read / download), not as a ReferralEvent: adding a
  file is not a state change, and the event log stays the state machine's history.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.files import File
from django.core.files.uploadedfile import UploadedFile
from django.db import connection, transaction
from django.db.models import QuerySet
from django.db.models.fields.files import FieldFile
from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import User
from core.errors import ApplicationError, Conflict, NotFound, PermissionDenied
from core.values import declared_length
from referrals.audit import audit_record
from referrals.models import Attachment, AuditAction, Referral
from referrals.numbering import lock_referral, next_number
from referrals.selectors import referral_visible
from referrals.services import actor_sides
from referrals.workflow import (
    ASSIGNEE_ROLES,
    REQUESTER_OR_SYSTEM_ROLES,
    TERMINAL_STATES,
)

UPLOAD_ROLES = REQUESTER_OR_SYSTEM_ROLES | ASSIGNEE_ROLES
HEADER_BYTES = 132  # enough for the DICOM preamble (128) + "DICM"
# Multipart framing around the file: a request longer than the limit plus this is refused
# before Django reads it.
MULTIPART_OVERHEAD = 64 * 1024
GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})


@dataclass(frozen=True)
class FileKind:
    content_type: str
    aliases: frozenset[str]  # declared content types that mean this kind
    extensions: frozenset[str]  # file-name extensions that mean this kind

    def matches(self, header: bytes) -> bool:
        if self.content_type == "application/pdf":
            return header.startswith(b"%PDF-")
        if self.content_type == "image/jpeg":
            return header.startswith(b"\xff\xd8\xff")
        if self.content_type == "image/png":
            return header.startswith(b"\x89PNG\r\n\x1a\n")
        if self.content_type == "application/dicom":
            return len(header) >= HEADER_BYTES and header[128:132] == b"DICM"
        return False


KINDS: tuple[FileKind, ...] = (
    FileKind(
        "application/pdf", frozenset({"application/pdf", "application/x-pdf"}), frozenset({".pdf"})
    ),
    FileKind(
        "image/jpeg",
        frozenset({"image/jpeg", "image/jpg", "image/pjpeg"}),
        frozenset({".jpg", ".jpeg", ".jpe"}),
    ),
    FileKind("image/png", frozenset({"image/png"}), frozenset({".png"})),
    FileKind("application/dicom", frozenset({"application/dicom"}), frozenset({".dcm", ".dicom"})),
)


def sniff(header: bytes) -> FileKind | None:
    """The allowed kind these first bytes belong to, or None."""
    return next((kind for kind in KINDS if kind.matches(header)), None)


def _base_type(declared: str | None) -> str:
    return (declared or "").split(";")[0].strip().lower()


def check_type(*, header: bytes, declared_type: str | None, name: str) -> FileKind:
    """The sniffed kind; raises 415 when the bytes are not allowed or a claim disagrees."""
    kind = sniff(header)
    if kind is None:
        raise ApplicationError(
            "Only PDF, JPEG, PNG and DICOM files are accepted.",
            code="unsupported_type",
            status_code=415,
        )
    declared = _base_type(declared_type)
    if declared not in GENERIC_TYPES and declared not in kind.aliases:
        raise ApplicationError(
            f"The file is declared as {declared} but its content is {kind.content_type}.",
            code="type_mismatch",
            status_code=415,
            extra={"declared": declared, "detected": kind.content_type},
        )
    extension = os.path.splitext(name)[1].lower()
    if extension and extension not in kind.extensions:
        raise ApplicationError(
            f"The file name ends in {extension} but its content is {kind.content_type}.",
            code="type_mismatch",
            status_code=415,
            extra={"extension": extension, "detected": kind.content_type},
        )
    return kind


NAME_MAX = 255  # Attachment.original_name


def clean_name(name: str) -> str:
    """The client's file name, for display only: last path segment, printable, bounded."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    printable = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    if printable in (".", ".."):  # no file name (Django refuses them as one)
        printable = ""
    name = printable or "file"
    if len(name) <= NAME_MAX:
        return name
    # Too long: shorten the stem, not the extension (it names the kind, and is checked).
    stem, extension = os.path.splitext(name)
    if not stem or len(extension) > 16:
        return name[:NAME_MAX]
    return stem[: NAME_MAX - len(extension)].rstrip() + extension


def max_bytes() -> int:
    return int(settings.ATTACHMENT_MAX_BYTES)


def too_large() -> ApplicationError:
    return ApplicationError(
        f"The file is larger than {max_bytes()} bytes.",
        code="too_large",
        status_code=413,
        extra={"max_bytes": max_bytes()},
    )


class _HashingFile(File[Any]):
    """Hashes and counts the bytes as storage pulls the chunks (one pass)."""

    def __init__(self, file: Any, name: str) -> None:
        super().__init__(file, name)
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1()  # noqa: S324 - FHIR's Attachment.hash, not a safeguard
        self.counted = 0

    def chunks(self, chunk_size: int | None = None) -> Iterator[bytes]:
        for chunk in super().chunks(chunk_size):
            self.sha256.update(chunk)
            self.sha1.update(chunk)
            self.counted += len(chunk)
            yield chunk


# --- reads -------------------------------------------------------------------------------


def _referral_for(user: User, referral_id: Any) -> Referral:
    """The referral through the same scope as ``referral_get_for_user`` (outsiders: 404),
    without the detail page's prefetches."""
    try:
        return referral_visible(user).get(pk=int(referral_id))
    except (TypeError, ValueError, Referral.DoesNotExist) as exc:
        raise NotFound("No such referral.") from exc


def attachment_list(*, user: User, referral_id: Any) -> tuple[Referral, QuerySet[Attachment]]:
    referral = _referral_for(user, referral_id)
    return referral, Attachment.objects.filter(referral=referral).order_by("created", "id")


def attachment_get(
    *, user: User, referral_id: Any, attachment_id: Any = None, number: Any = None
) -> Attachment:
    """A referral's file by its database id (the REST API) or by its number within the
    referral (FHIR ids, ``referrals.numbering``)."""
    referral = _referral_for(user, referral_id)
    field, value = ("pk", attachment_id) if number is None else ("number", number)
    try:
        return Attachment.objects.get(referral=referral, **{field: int(value)})
    except (TypeError, ValueError, OverflowError, Attachment.DoesNotExist) as exc:
        raise NotFound("No such attachment.") from exc


# --- writes ------------------------------------------------------------------------------


@dataclass
class _StoredFile:
    file: FieldFile
    committed: bool = False  # its row committed: the file stays whatever fails later


# The files stored under ``files_removed_on_failure`` (None outside one).
_stored_files: ContextVar[list[_StoredFile] | None] = ContextVar("stored_files", default=None)


@contextmanager
def files_removed_on_failure() -> Iterator[None]:
    """Around a unit of work that uploads files inside a larger transaction (a FHIR
    transaction Bundle with case files): when it fails, the transaction rolls the rows
    back, and this deletes the files they named, which no rollback reaches. Only files
    whose rows wait for an enclosing transaction are tracked, and only until it commits
    (a row committed keeps its file whatever fails later, e.g. rendering the answer).
    Scopes nest: what an inner scope stored and kept goes to the enclosing one, which
    deletes it if the enclosing work fails first (an intake batch rolled back after its
    job succeeded). A failure of the final COMMIT itself is not seen here."""
    enclosing = _stored_files.get()
    stored: list[_StoredFile] = []
    token = _stored_files.set(stored)
    try:
        yield
    except BaseException:
        for entry in stored:
            if not entry.committed:
                entry.file.delete(save=False)
        raise
    finally:
        _stored_files.reset(token)
    if enclosing is not None:
        enclosing.extend(stored)


def _check_may_upload(actor: User, referral: Referral) -> None:
    if not actor_sides(actor, referral) or not (actor.role_names() & UPLOAD_ROLES):
        raise PermissionDenied(
            "Only the requesting facility or the assigned department may add files."
        )
    if referral.state in TERMINAL_STATES:
        raise Conflict(
            f"Files cannot be added to a referral that is {referral.get_state_display().lower()}.",
            code="attachments_closed",
            extra={"state": referral.state},
        )


def attachment_upload(*, actor: User, referral_id: Any, upload: UploadedFile) -> Attachment:
    """Check and store one file. Refusals store nothing."""
    referral = _referral_for(actor, referral_id)
    _check_may_upload(actor, referral)  # before any byte is read or stored
    if upload.size is None or upload.size > max_bytes():
        raise too_large()
    upload.seek(0)
    header = upload.read(HEADER_BYTES)
    upload.seek(0)
    name = clean_name(upload.name or "")
    kind = check_type(header=header, declared_type=upload.content_type, name=name)

    attachment = Attachment(
        referral=referral,
        uploaded_by=actor,
        original_name=name,
        content_type=kind.content_type,
        size=0,
        sha256="",
    )
    hashing = _HashingFile(upload.file, name)
    attachment.file.save(name, hashing, save=False)
    try:
        if hashing.counted != upload.size:  # a storage that did not read via chunks()
            hashing = _HashingFile(upload.file, name)
            hashing.seek(0)
            for _ in hashing.chunks():
                pass
        if hashing.counted > max_bytes():
            raise too_large()
        attachment.size = hashing.counted
        attachment.sha256 = hashing.sha256.hexdigest()
        attachment.sha1 = hashing.sha1.hexdigest()
        # Within an enclosing transaction the row commits (or not) with it: the file
        # must go if that rolls back. Without one, the row commits right here.
        pending_commit = connection.in_atomic_block
        with transaction.atomic():
            # Checked again on the locked row: a close, cancel or forward that committed
            # while the file was being stored wins (found by review).
            locked = lock_referral(referral)
            _check_may_upload(actor, locked)
            attachment.number = next_number(Attachment, referral)
            attachment.save()
            # Its DocumentReference, pushed to both parties' members and in their feeds,
            # in this transaction (decision 1), whichever way the file came in.
            from fhir_gateway.publish import case_file_stored

            case_file_stored(referral=locked, attachment=attachment)
    except BaseException:
        attachment.file.delete(save=False)
        raise
    stored = _stored_files.get()
    if stored is not None and pending_commit:
        entry = _StoredFile(attachment.file)
        stored.append(entry)
        transaction.on_commit(lambda: setattr(entry, "committed", True))
    return attachment


# --- REST --------------------------------------------------------------------------------


class AttachmentSerializer(serializers.ModelSerializer[Attachment]):
    class Meta:
        model = Attachment
        fields = [
            "id",
            "original_name",
            "content_type",
            "size",
            "sha256",
            "uploaded_by",
            "created",
        ]


class AttachmentUploadSerializer(serializers.Serializer[Any]):
    file = serializers.FileField(help_text="PDF, JPEG, PNG or DICOM")


PROBLEM = OpenApiResponse(description="JSON problem (RFC 9457)")


def _user(request: Request) -> User:
    assert isinstance(request.user, User)
    return request.user


class ReferralAttachmentsApi(APIView):
    permission_classes = [IsAuthenticated]
    parser_classes = [MultiPartParser]

    @extend_schema(
        operation_id="referrals_attachments_list",
        responses={200: AttachmentSerializer(many=True), 404: PROBLEM},
    )
    def get(self, request: Request, pk: int) -> Response:
        referral, attachments = attachment_list(user=_user(request), referral_id=pk)
        data = AttachmentSerializer(attachments, many=True).data
        audit_record(request, AuditAction.READ, [referral.pk], object_type="attachment_list")
        return Response(data)

    @extend_schema(
        operation_id="referrals_attachments_create",
        request={"multipart/form-data": AttachmentUploadSerializer},
        responses={
            201: AttachmentSerializer,
            400: PROBLEM,
            403: PROBLEM,
            404: PROBLEM,
            409: PROBLEM,
            413: PROBLEM,
            415: PROBLEM,
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        user = _user(request)
        # Refuse an oversized body before Django spools it to disk; scope first (404).
        _referral_for(user, pk)
        length = declared_length(request.META.get("CONTENT_LENGTH") or "")
        if length is not None and length > max_bytes() + MULTIPART_OVERHEAD:
            raise too_large()
        upload = request.FILES.get("file")
        if upload is None:
            raise ApplicationError("Send the file as multipart field 'file'.", code="missing_file")
        attachment = attachment_upload(actor=user, referral_id=pk, upload=upload)
        audit_record(
            request,
            AuditAction.CREATE,
            [attachment.referral_id],
            object_type="attachment",
            object_id=attachment.pk,
        )
        return Response(AttachmentSerializer(attachment).data, status=status.HTTP_201_CREATED)


class ReferralAttachmentDownloadApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="referrals_attachments_download",
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="the file, with its sniffed Content-Type"
            ),
            404: PROBLEM,
        },
    )
    def get(self, request: Request, pk: int, aid: int) -> FileResponse:
        attachment = attachment_get(user=_user(request), referral_id=pk, attachment_id=aid)
        handle = attachment.file.open("rb")
        audit_record(
            request,
            AuditAction.DOWNLOAD,
            [attachment.referral_id],
            object_type="attachment",
            object_id=attachment.pk,
        )
        response = FileResponse(
            handle,
            as_attachment=True,
            filename=attachment.original_name,
            content_type=attachment.content_type,
        )
        response["Content-Length"] = str(attachment.size)
        response["X-Content-Type-Options"] = "nosniff"
        response["Cache-Control"] = "private, no-store"
        return response
