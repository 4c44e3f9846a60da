from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from fhir_gateway.registry_projection import project_registry, projection_lock


class Command(BaseCommand):
    help = "Project the registry into stored FHIR resources (mCSD); new versions only on change."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--type", action="append", dest="types", help="only this resource type (repeatable)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        def waiting() -> None:
            self.stderr.write("A projection run is going on; waiting for it to finish…")

        with projection_lock(wait=True, waiting=waiting):
            report = project_registry(resource_types=options["types"])
        for label, counts in (
            ("created", report.created),
            ("updated", report.updated),
            ("deleted", report.deleted),
            ("unchanged", report.unchanged),
        ):
            summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
            self.stdout.write(f"{label}: {summary}")
