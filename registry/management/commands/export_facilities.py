"""manage.py export_facilities --format csv|mcsd [--country KE] [--output FILE]."""

from __future__ import annotations

from io import TextIOWrapper
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fhir_gateway import mcsd
from registry.importing import TextSink, facilities_for_export, write_canonical_csv
from registry.models import Country


class Command(BaseCommand):
    help = (
        "Stream the registry's facilities as canonical CSV (re-importable with "
        "--mapping consilium_csv) or as an IHE mCSD FHIR Bundle (type collection: "
        "Organization + Location per facility, HealthcareService per department, Endpoint)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--format", choices=["csv", "mcsd"], default="csv")
        parser.add_argument("--country", help="ISO 3166-1 alpha-2 code; default: all countries")
        parser.add_argument("--output", help="file to write; default: standard output")
        parser.add_argument(
            "--no-validate",
            action="store_true",
            help="mcsd: skip validating each resource with fhir.resources (faster)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        country = options["country"]
        if country is not None:
            country = country.upper()
            if not Country.objects.filter(code=country).exists():
                raise CommandError(f"no country {country!r} in the registry")
        facilities = facilities_for_export(country)
        out: TextSink
        if options["output"]:
            try:
                out = open(options["output"], "w", newline="", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise CommandError(f"{options['output']}: {exc.strerror or exc}") from None
        else:
            self.stdout.ending = ""  # the writers end their own lines
            out = self.stdout
        try:
            if options["format"] == "csv":
                count = write_canonical_csv(out, facilities)
            else:
                count = mcsd.write_bundle(out, facilities, validate=not options["no_validate"])
        finally:
            if isinstance(out, TextIOWrapper):
                out.close()
        if options["output"]:
            self.stderr.write(f"{count:,} facilities written to {options['output']}")
