"""Case files: content sniffing, size limit, SHA-256, random storage names, download."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from accounts.models import User
from referrals import attachments
from referrals.models import Attachment, Referral, ReferralState
from referrals.tests.conftest import World

PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 64
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 64
DICOM = b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\x00" * 32
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00" + b"\x00" * 100


def client_for(user: User) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def upload(world: World, referral: Referral, name: str, content: bytes, ctype: str) -> Any:
    return client_for(world.referrer).post(
        f"/api/v1/referrals/{referral.pk}/attachments/",
        {"file": SimpleUploadedFile(name, content, content_type=ctype)},
        format="multipart",
    )


@pytest.fixture
def referral(world: World) -> Referral:
    return world.referral_in(ReferralState.ACCEPTED)


def test_pdf_is_stored_with_exact_sha256_and_a_random_name(
    world: World, referral: Referral
) -> None:
    response = upload(world, referral, "../../etc/scan result.pdf", PDF, "application/pdf")
    assert response.status_code == 201, response.content
    body = response.json()
    attachment = Attachment.objects.get()
    assert body == {
        "id": attachment.pk,
        "original_name": "scan result.pdf",
        "content_type": "application/pdf",
        "size": len(PDF),
        "sha256": hashlib.sha256(PDF).hexdigest(),
        "uploaded_by": world.referrer.pk,
        "created": body["created"],
    }
    assert attachment.sha256 == hashlib.sha256(PDF).hexdigest()
    name = attachment.file.name
    assert name.startswith(f"attachments/{referral.pk}/")
    assert "scan" not in name and ".." not in name and len(name.rsplit("/", 1)[1]) == 32
    with attachment.file.open("rb") as stored:
        assert stored.read() == PDF


def test_download_streams_the_bytes_with_safe_headers(world: World, referral: Referral) -> None:
    aid = upload(world, referral, "x-ray.png", PNG, "image/png").json()["id"]
    response = client_for(world.consultant).get(
        f"/api/v1/referrals/{referral.pk}/attachments/{aid}/"
    )
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == PNG  # type: ignore[attr-defined]
    assert response["Content-Type"] == "image/png"
    assert response["Content-Disposition"] == 'attachment; filename="x-ray.png"'
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Length"] == str(len(PNG))
    assert response["Cache-Control"] == "private, no-store"


@pytest.mark.parametrize(
    ("name", "content", "ctype", "detected"),
    [
        ("scan.pdf", PDF, "application/pdf", "application/pdf"),
        ("photo.JPG", JPEG, "image/jpeg", "image/jpeg"),
        ("photo", JPEG, "application/octet-stream", "image/jpeg"),
        ("chart.png", PNG, "image/png", "image/png"),
        ("IM0001", DICOM, "application/octet-stream", "application/dicom"),
        ("ct.dcm", DICOM, "application/dicom", "application/dicom"),
    ],
    ids=lambda v: v if isinstance(v, str) else "bytes",
)
def test_allowed_types_are_accepted_by_their_bytes(
    world: World, referral: Referral, name: str, content: bytes, ctype: str, detected: str
) -> None:
    response = upload(world, referral, name, content, ctype)
    assert response.status_code == 201, response.content
    assert response.json()["content_type"] == detected


@pytest.mark.parametrize(
    ("name", "content", "ctype", "code"),
    [
        ("scan.png", PDF, "image/png", "type_mismatch"),  # a PDF disguised as a PNG
        ("scan.png", PDF, "application/octet-stream", "type_mismatch"),  # by name only
        ("scan.pdf", PDF, "image/png", "type_mismatch"),  # by declared type only
        ("image.jpg", PNG, "image/jpeg", "type_mismatch"),
        ("setup.exe", EXE, "application/x-msdownload", "unsupported_type"),
        ("report.pdf", EXE, "application/pdf", "unsupported_type"),  # EXE named .pdf
        ("notes.txt", b"hello", "text/plain", "unsupported_type"),
        ("short.dcm", b"\x00" * 20, "application/dicom", "unsupported_type"),
    ],
    ids=lambda v: v if isinstance(v, str) else "bytes",
)
def test_files_that_lie_or_are_not_allowed_are_refused(
    world: World, referral: Referral, name: str, content: bytes, ctype: str, code: str
) -> None:
    response = upload(world, referral, name, content, ctype)
    assert response.status_code == 415
    assert response.json()["code"] == code
    assert not Attachment.objects.exists()


def test_oversize_is_413_and_nothing_is_stored(
    world: World, referral: Referral, settings: Any
) -> None:
    settings.ATTACHMENT_MAX_BYTES = 1000
    big = PDF + b"0" * 1000
    response = upload(world, referral, "big.pdf", big, "application/pdf")
    assert response.status_code == 413
    assert response.json()["code"] == "too_large"
    assert response.json()["max_bytes"] == 1000
    assert not Attachment.objects.exists()
    exactly = PDF + b"0" * (1000 - len(PDF))
    assert upload(world, referral, "ok.pdf", exactly, "application/pdf").status_code == 201


def test_oversize_body_is_refused_before_parsing(
    world: World, referral: Referral, settings: Any
) -> None:
    settings.ATTACHMENT_MAX_BYTES = 10
    body = "x" * (attachments.MULTIPART_OVERHEAD + 100)
    response = client_for(world.referrer).generic(
        "POST",
        f"/api/v1/referrals/{referral.pk}/attachments/",
        body,
        content_type="multipart/form-data; boundary=zzz",
    )
    assert response.status_code == 413


def test_missing_file_is_400(world: World, referral: Referral) -> None:
    response = client_for(world.referrer).post(
        f"/api/v1/referrals/{referral.pk}/attachments/", {}, format="multipart"
    )
    assert response.status_code == 400
    assert response.json()["code"] == "missing_file"


@pytest.mark.parametrize("state", ["cancelled", "declined", "closed_local", "completed"])
def test_finished_referrals_take_no_files(world: World, state: str) -> None:
    referral = world.referral_in(state)
    response = upload(world, referral, "late.pdf", PDF, "application/pdf")
    assert response.status_code == 409
    assert response.json()["code"] == "attachments_closed"
    assert not Attachment.objects.exists()


@pytest.mark.parametrize("state", ["draft", "submitted", "info_requested", "advised", "in_transit"])
def test_live_referrals_take_files(world: World, state: str) -> None:
    referral = world.referral_in(state)
    assert upload(world, referral, "labs.pdf", PDF, "application/pdf").status_code == 201


def test_attachment_of_another_referral_is_not_found(world: World, referral: Referral) -> None:
    aid = upload(world, referral, "a.pdf", PDF, "application/pdf").json()["id"]
    other = world.submit()
    response = client_for(world.referrer).get(f"/api/v1/referrals/{other.pk}/attachments/{aid}/")
    assert response.status_code == 404


def test_list_shows_the_referrals_files_in_order(world: World, referral: Referral) -> None:
    upload(world, referral, "a.pdf", PDF, "application/pdf")
    upload(world, referral, "b.png", PNG, "image/png")
    response = client_for(world.consultant).get(f"/api/v1/referrals/{referral.pk}/attachments/")
    assert [(a["original_name"], a["size"]) for a in response.json()] == [
        ("a.pdf", len(PDF)),
        ("b.png", len(PNG)),
    ]


def test_sniff_recognises_only_the_four_kinds() -> None:
    assert [attachments.sniff(b) for b in (EXE, b"", b"GIF89a")] == [None, None, None]
    kinds = [attachments.sniff(b) for b in (PDF, JPEG, PNG, DICOM)]
    assert [k.content_type for k in kinds if k] == [
        "application/pdf",
        "image/jpeg",
        "image/png",
        "application/dicom",
    ]


def test_a_long_name_keeps_its_extension(world: World, referral: Referral) -> None:
    response = upload(world, referral, "r" * 300 + ".pdf", PDF, "application/pdf")
    assert response.status_code == 201, response.content
    stored = Attachment.objects.get().original_name
    assert stored == "r" * 251 + ".pdf"
    assert response.json()["original_name"] == stored


def test_a_long_name_whose_extension_lies_is_refused(world: World, referral: Referral) -> None:
    # Cut at 255 characters, the name lost its ".png" and the claim went unchecked.
    response = upload(world, referral, "r" * 300 + ".png", PDF, "application/octet-stream")
    assert response.status_code == 415, response.content
    assert response.json()["code"] == "type_mismatch"
    assert not Attachment.objects.exists()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a" * 255, "a" * 255),
        ("a" * 256, "a" * 255),
        ("a" * 300 + ".jpeg", "a" * 250 + ".jpeg"),
        ("a" * 10 + "." + "b" * 300, "a" * 10 + "." + "b" * 244),  # no extension to keep
        ("." + "b" * 300, ("." + "b" * 300)[:255]),  # a dot file: all stem
    ],
    ids=["255", "256", "extension", "long-extension", "dot-file"],
)
def test_clean_name_bounds_the_stem(name: str, expected: str) -> None:
    assert attachments.clean_name(name) == expected
    assert len(attachments.clean_name(name)) <= 255
