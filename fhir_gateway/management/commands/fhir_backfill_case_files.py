"""Publish case files that have no DocumentReference yet (``publish.case_files_backfill``).

Case files uploaded through the REST API before 2026-11-29 were stored but not published
over FHIR; since then every upload is, in its own transaction. This command
catches the older ones up: each referral in its own transaction under its row lock (as an
upload takes it), so it can run beside live traffic and be run again (what is published is
skipped)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from fhir_gateway import publish
from referrals.models import Attachment, Referral, ReferralState

PROGRESS_EVERY = 500


class Command(BaseCommand):
    help = (
        "Publish case files with no DocumentReference (uploaded through the REST API "
        "before they were published over FHIR): stored, pushed, in the feeds."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="count what would be published; write nothing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        dry_run = bool(options["dry_run"])
        referral_ids = list(
            Attachment.objects.exclude(referral__state=ReferralState.DRAFT)
            .order_by("referral_id")
            .values_list("referral_id", flat=True)
            .distinct()
        )
        total = len(referral_ids)
        self.stdout.write(f"{total} referrals with case files to check")
        published = touched = 0
        for done, referral_id in enumerate(referral_ids, start=1):
            with transaction.atomic():
                referral = Referral.objects.select_for_update().get(pk=referral_id)
                if dry_run:
                    found = len(publish.case_files_unpublished(referral=referral))
                else:
                    found = publish.case_files_backfill(referral=referral)
            published += found
            touched += bool(found)
            if done % PROGRESS_EVERY == 0 or done == total:
                self.stdout.write(f"  {done}/{total} referrals checked, {published} case files")
        verb = "would be published" if dry_run else "published"
        self.stdout.write(
            self.style.SUCCESS(f"{published} case files of {touched} referrals {verb}.")
        )
