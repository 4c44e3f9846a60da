"""``manage.py fhir_backfill_case_files``: case files stored before uploads were published
over FHIR (no DocumentReference) are published as an upload is now — stored, pushed to
both parties' Endpoints, in both feeds — once; a draft's wait; ``--dry-run`` writes
nothing."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command

from fhir_gateway.models import FeedEvent, FhirResource, OutboxMessage
from fhir_gateway.tests.conftest import FHIR_R5
from fhir_gateway.tests.referral_world import World, accepted, body, draft
from referrals import services
from referrals.attachments import attachment_upload
from referrals.models import Attachment, Referral, ReferralState

pytestmark = pytest.mark.django_db

PDF = b"%PDF-1.4\n% an old ECG strip\n%%EOF\n"


def _upload(world: World, referral: Referral, name: str) -> Attachment:
    upload = SimpleUploadedFile(name, PDF, content_type="application/pdf")
    return attachment_upload(actor=world.submitter, referral_id=referral.pk, upload=upload)


def _as_before_publishing(doc_ids: list[str]) -> None:
    """What an upload left before case files were published: the file, nothing of FHIR."""
    FhirResource.objects.filter(resource_type="DocumentReference", logical_id__in=doc_ids).delete()
    OutboxMessage.objects.filter(logical_id__in=doc_ids).delete()
    FeedEvent.objects.filter(logical_id__in=doc_ids).delete()


def _run(*args: str) -> str:
    out = StringIO()
    call_command("fhir_backfill_case_files", *args, stdout=out)
    return out.getvalue()


def _snapshot() -> tuple[int, int, int]:
    return (FhirResource.objects.count(), OutboxMessage.objects.count(), FeedEvent.objects.count())


def test_old_case_files_are_published_once(world: World) -> None:
    task_id = accepted(world)
    referral = Referral.objects.get(filler_id=task_id)
    old = [_upload(world, referral, "old-1.pdf"), _upload(world, referral, "old-2.pdf")]
    recent = _upload(world, referral, "recent.pdf")
    old_ids = [f"{task_id}-att-{a.number}" for a in old]
    _as_before_publishing(old_ids)
    assert world.r5.get(f"/fhir/DocumentReference/{old_ids[0]}").status_code == 404
    before = _snapshot()

    dry = _run("--dry-run")

    assert "2 case files of 1 referrals would be published" in dry
    assert _snapshot() == before  # nothing written

    out = _run()

    assert "2 case files of 1 referrals published" in out
    assert "1/1 referrals checked" in out  # progress
    for doc_id, attachment in zip(old_ids, old, strict=True):
        shown = body(world.r5.get(f"/fhir/DocumentReference/{doc_id}", Accept=FHIR_R5))
        assert shown["content"][0]["attachment"]["title"] == attachment.original_name
        pushed = OutboxMessage.objects.filter(logical_id=doc_id)
        assert {m.endpoint.base_url for m in pushed} == {
            world.spoke_endpoint.base_url,
            world.hub_endpoint.base_url,
        }
        fed = FeedEvent.objects.filter(logical_id=doc_id).values_list("facility_id", flat=True)
        assert set(fed) == {world.network.spoke.pk, world.network.hub.pk}
    # The file published at upload was left as it was: one version.
    recent_id = f"{task_id}-att-{recent.number}"
    assert FhirResource.objects.filter(logical_id=recent_id).count() == 1

    after = _snapshot()
    assert "0 case files of 0 referrals published" in _run()
    assert _snapshot() == after  # run again: nothing more


def test_a_drafts_files_wait_for_its_submission(world: World) -> None:
    referral = draft(world)
    _upload(world, referral, "draft.pdf")
    before = _snapshot()

    assert "0 referrals with case files to check" in _run()
    assert _snapshot() == before


def test_backfill_does_not_publish_files_of_a_draft_cancelled_unsent(world: World) -> None:
    """A draft cancelled unsent is its requester's alone (publish.referral_changed tells no
    one of it or its files): the command does not push its files to the department it
    named (it did: its state is no longer draft; found by review)."""
    referral = draft(world)
    _upload(world, referral, "draft.pdf")
    services.referral_transition(
        actor=world.submitter, referral_id=referral.pk, action="cancel", reason="changed my mind"
    )
    referral.refresh_from_db()
    assert referral.state == ReferralState.CANCELLED
    assert not FhirResource.objects.filter(logical_id__startswith=referral.filler_id).exists()

    assert "0 case files of 0 referrals would be published" in _run("--dry-run")
    _run()

    assert not FhirResource.objects.filter(logical_id__startswith=referral.filler_id).exists()
    assert not OutboxMessage.objects.exists()
    assert not FeedEvent.objects.filter(facility_id=world.network.hub.pk).exists()
