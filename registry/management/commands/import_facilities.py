"""manage.py import_facilities FILE [--mapping MAPPING]: see docs/import-mapping.md."""

from __future__ import annotations

import gc
import sys
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from tqdm import tqdm

from fhir_gateway import mcsd
from registry.importing import (
    CsvSource,
    FacilityImport,
    ImportResult,
    IssueReport,
    MappingError,
    mapping_check_specialties,
    parse_mapping,
    read_mapping_document,
)
from registry.models import Specialty

DEFAULT_CSV_MAPPING = "consilium_csv"

HELP = """Import a master facility list: a CSV file read through a declarative mapping
(--mapping, default consilium_csv, our own export format; kenya_kmhfl for the Kenyan MFL),
or an IHE mCSD FHIR Bundle (.json, or content starting with '{'; --mapping optional).

Facilities are upserted by identifier: importing the same file twice changes nothing.

All-or-nothing by default: the whole file is imported in one transaction; if any row is
invalid nothing is written, the per-row error report is printed and the command exits
non-zero. --skip-invalid applies the valid rows and reports the invalid ones (exit 0).
--dry-run validates everything and rolls back."""


class Command(BaseCommand):
    help = HELP

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.formatter_class = RawDescriptionHelpFormatter  # keep the paragraphs above
        return parser

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("file", help="CSV file or mCSD Bundle (.json)")
        parser.add_argument(
            "--mapping",
            help="mapping JSON file, or the name of a shipped one in registry/mappings/ "
            "(kenya_kmhfl, consilium_csv)",
        )
        parser.add_argument(
            "--format", choices=["auto", "csv", "mcsd"], default="auto", help="default: auto"
        )
        parser.add_argument(
            "--skip-invalid",
            action="store_true",
            help="apply the valid rows and report the invalid ones (default: all-or-nothing)",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="validate only; nothing is written"
        )
        parser.add_argument("--errors-csv", help="write every error and warning to this CSV")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser.add_argument("--batch-size", type=int, help="default: REGISTRY_IMPORT_BATCH_SIZE")

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["file"])
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        if options["batch_size"] is not None and options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        sink: IO[str] | None = None
        try:
            if options["errors_csv"]:
                sink = open(options["errors_csv"], "w", newline="", encoding="utf-8")  # noqa: SIM115
            report = IssueReport(sink)
            with _fewer_gc_passes():
                result = self._import(path, report, options)
        except MappingError as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:
            raise CommandError(f"{exc.filename or path}: {exc.strerror or exc}") from None
        except DatabaseError as exc:
            raise CommandError(
                f"the database refused the import (nothing written): {exc}"
            ) from None
        finally:
            if sink is not None:
                sink.close()
        self._summary(path, result, report, options)

    def _import(self, path: Path, report: IssueReport, options: dict[str, Any]) -> ImportResult:
        file_format = options["format"]
        if file_format == "auto":
            file_format = _detect_format(path)
        mapping_data = read_mapping_document(options["mapping"]) if options["mapping"] else None
        known = set(
            Specialty.objects.filter(system=Specialty.SNOMED).values_list("code", flat=True)
        )
        progress = tqdm(
            unit=" rows", file=sys.stderr, disable=options["no_progress"], dynamic_ncols=True
        )
        importer = FacilityImport(
            report=report,
            batch_size=options["batch_size"],
            skip_invalid=options["skip_invalid"],
            dry_run=options["dry_run"],
            progress=progress.update,
        )
        try:
            if file_format == "mcsd":
                if mapping_data is not None and mapping_data[1].get("format") != "mcsd":
                    raise MappingError(
                        f"mapping {mapping_data[0]} is for CSV files; an mCSD mapping has "
                        '"format": "mcsd"'
                    )
                mcsd_options = (
                    mcsd.parse_options(mapping_data[1], name=mapping_data[0])
                    if mapping_data is not None
                    else mcsd.McsdOptions()
                )
                bundle = mcsd.read_bundle(path)
                progress.total = mcsd.count_organizations(bundle)
                return importer.run(mcsd.bundle_items(bundle, mcsd_options))
            if mapping_data is None:
                mapping_data = read_mapping_document(DEFAULT_CSV_MAPPING)
            if mapping_data[1].get("format") == "mcsd":
                raise MappingError(f"mapping {mapping_data[0]} is for mCSD Bundles, not CSV")
            mapping = parse_mapping(mapping_data[1], name=mapping_data[0])
            mapping_check_specialties(mapping, known)
            with CsvSource(path, mapping) as source:
                return importer.run(source)
        finally:
            progress.close()

    def _summary(
        self, path: Path, result: ImportResult, report: IssueReport, options: dict[str, Any]
    ) -> None:
        out = self.stdout
        # Counted inside the transaction: a refused file or a dry run rolled them back, and
        # a plain "created 12,378" before "Nothing written" read as if they had been written.
        verb = "created" if result.committed else "would have created"
        out.write(f"{path}: {result.records:,} facility records")
        if not result.committed:
            out.write("  NOT WRITTEN (rolled back); had the file been applied:")
        out.write(
            f"  {verb} {result.created:,}, updated {result.updated:,}, "
            f"unchanged {result.unchanged:,}, invalid {result.invalid:,}"
        )
        out.write(
            f"  countries {verb} {result.countries_created:,}, areas {verb} "
            f"{result.areas_created:,}, identifiers {verb} {result.identifiers_created:,} "
            f"(updated {result.identifiers_updated:,}), departments {verb} "
            f"{result.departments_created:,}, endpoints {verb} {result.endpoints_created:,}, "
            f"revisions {result.revisions_created:,}"
        )
        if report.errors or report.warnings:
            shown = len(report.issues)
            total = report.errors + report.warnings
            out.write(f"{report.errors:,} error(s), {report.warnings:,} warning(s):")
            for issue in report.issues:
                out.write(f"  {issue.severity}: {issue}")
            if total > shown:
                hint = (
                    f" (all in {options['errors_csv']})"
                    if options["errors_csv"]
                    else " (use --errors-csv FILE for all)"
                )
                out.write(f"  ... {total - shown:,} more{hint}")
        if result.committed:
            skipped = f"; {result.invalid:,} invalid row(s) skipped" if result.invalid else ""
            out.write(self.style.SUCCESS(f"Committed{skipped}."))
            return
        if result.dry_run and not report.errors:
            out.write(self.style.SUCCESS("Dry run: the file is valid; nothing written."))
            return
        if result.dry_run:
            raise CommandError(f"Dry run: {report.errors:,} error(s); nothing written.")
        raise CommandError(
            f"Nothing written: {report.errors:,} error(s) in {path} (all-or-nothing; "
            "--skip-invalid applies the valid rows)."
        )


@contextmanager
def _fewer_gc_passes() -> Iterator[None]:
    """An import allocates millions of short-lived containers; with the default thresholds
    the cyclic collector runs every 700 of them and rescans Django's whole object graph: a
    quarter of the import's CPU. Freeze what exists, collect young objects less often, and
    restore both afterwards (memory stays flat: the import creates no reference cycles)."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "mcsd"
    if suffix in (".csv", ".tsv"):
        return "csv"
    with path.open("rb") as handle:
        head = handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "mcsd" if head.startswith(b"{") else "csv"
