from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry.demo import DEMO_ACCOUNTS, SCALES, demo_seed


class Command(BaseCommand):
    help = (
        "Build the deterministic demo network (26 upper-tier hospitals, ~1,000 lower-tier ones "
        "including partners in Laos and Cambodia) and the demo accounts, password 'demo'. "
        "Safe to run again: an existing network is kept. Refused when DEBUG is off."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--scale",
            choices=sorted(SCALES),
            default="default",
            help="'national' builds ~14,000 facilities for benchmarks (default: ~1,000)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEBUG:
            raise CommandError(
                "seed_demo is refused because DEBUG is off: it creates accounts with the known "
                "password 'demo', which must never exist in production. Run it only on a "
                "development or test database, with DEBUG=1."
            )
        started = time.monotonic()
        result = demo_seed(scale=options["scale"], progress=options["verbosity"] >= 1)
        elapsed = time.monotonic() - started

        if result.built:
            self.stdout.write(f"Built the demo network ({options['scale']} scale).")
        else:
            self.stdout.write(
                "The demo network already exists; left as it is (use a fresh database to "
                "rebuild it or to change its scale)."
            )
        if result.accounts_created:
            self.stdout.write("Created demo accounts: " + ", ".join(result.accounts_created))
        else:
            self.stdout.write(f"All {len(DEMO_ACCOUNTS)} demo accounts already exist.")
        self.stdout.write("; ".join(f"{name}: {count:,}" for name, count in result.counts.items()))
        self.stdout.write(self.style.SUCCESS(f"seed_demo done in {elapsed:.1f} s."))
