"""Recompute routing's per-day department load counters from the referrals."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from referrals.load import department_load_matches, department_load_rebuild


class Command(BaseCommand):
    help = (
        "Recompute DepartmentDayLoad (routing's live load) from the referrals, e.g. after "
        "writing referrals around the services (restore, bulk import)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days", type=int, default=7, help="local days back to recompute (default 7)"
        )
        parser.add_argument("--all", action="store_true", help="every day, not only --days")

    def handle(self, *args: Any, **options: Any) -> None:
        days: int | None = None if options["all"] else options["days"]
        if days is not None and days < 0:
            raise CommandError("--days must be 0 or more")
        was_right = department_load_matches(days=days)
        rows = department_load_rebuild(days=days)
        scope = "all days" if days is None else f"the last {days} days"
        state = "already matched" if was_right else "differed and were repaired"
        self.stdout.write(f"{rows} counter rows written for {scope}; the counters {state}.")
