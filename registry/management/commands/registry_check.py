"""manage.py registry_check: data the registry's rules refuse today but older rows may hold."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from registry.selectors import upside_down_support_links


class Command(BaseCommand):
    help = (
        "List registry rows stored before a rule that now refuses them: support links in "
        "effect whose hub is of a lower tier than its spoke. Exit status 1 when any is found."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        found = 0
        for link in upside_down_support_links().iterator(chunk_size=500):
            found += 1
            self.stdout.write(
                f"support link #{link.pk}: hub {link.hub.code} (tier {link.hub.tier}) is below "
                f"spoke {link.spoke.code} (tier {link.spoke.tier}); correct a tier, or "
                "deactivate or end the link"
            )
        if found:
            raise CommandError(f"{found} support link(s) upside down (listed above).")
        self.stdout.write("registry_check: no problem found.")
