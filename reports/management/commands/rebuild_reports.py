"""``manage.py rebuild_reports``: recompute every report table from the event log.

``--catch-up`` instead applies only the events above the watermark (what the Celery beat
task does), e.g. after the worker was down."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from reports.services import reports_catch_up, reports_rebuild


class Command(BaseCommand):
    help = "Recompute the report rollups and facts from referral events."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--catch-up", action="store_true", help="only apply events above the watermark"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.perf_counter()
        if options["catch_up"]:
            applied = reports_catch_up()
            verb = "applied"
        else:
            applied = reports_rebuild()
            verb = "rebuilt from"
        elapsed = time.perf_counter() - started
        self.stdout.write(f"Reports {verb} {applied} events in {elapsed:.1f} s.")
