from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from referrals.routing import response_times_refresh
from referrals.simulation import simulate_bulk, simulate_with_services

# Up to this many referrals go through the real services (every event exactly as in
# production); above it the bulk path writes rows from the same lifecycle model.
SERVICE_PATH_MAX = 2000


class Command(BaseCommand):
    requires_system_checks: list[str] = []  # a data generator: URLs and admin do not matter
    help = (
        "Simulate realistic referral lifecycles over the demo network (run seed_demo first): "
        "real services for small counts, batched bulk writes for large ones."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, required=True, help="referrals to simulate")
        parser.add_argument("--seed", type=int, default=1, help="random seed (deterministic)")
        parser.add_argument("--days", type=int, default=None, help="history length in days")
        parser.add_argument("--batch", type=int, default=5000, help="rows per bulk batch")
        path = parser.add_mutually_exclusive_group()
        path.add_argument("--services", action="store_true", help="force the service path")
        path.add_argument("--bulk", action="store_true", help="force the bulk path")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        count: int = options["count"]
        if count < 1:
            raise CommandError("--count must be at least 1")
        use_services = options["services"] or (not options["bulk"] and count <= SERVICE_PATH_MAX)
        days = options["days"] or (30 if use_services else 90)
        bar = tqdm(
            total=count,
            unit="referral",
            file=sys.stderr,
            disable=options["no_progress"],
            desc="services" if use_services else "bulk",
        )
        try:
            if use_services:
                tally = simulate_with_services(
                    count=count,
                    seed=options["seed"],
                    days=days,
                    progress=bar.update,
                )
                summary = ", ".join(f"{state} {n}" for state, n in sorted(tally.items()))
                self.stdout.write(f"simulated {count} referrals through the services: {summary}")
            else:
                written = simulate_bulk(
                    count=count,
                    seed=options["seed"],
                    days=days,
                    batch=options["batch"],
                    progress=bar.update,
                )
                self.stdout.write(
                    f"wrote {written} referrals ({written - count} counter-referrals) in bulk"
                )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            bar.close()
        # Routing's medians from the new history now, not at the beat job's next run.
        departments = response_times_refresh()
        self.stdout.write(f"response-time medians refreshed for {departments} departments")
