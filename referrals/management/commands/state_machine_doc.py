from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from referrals.state_machine_doc import DOC_PATH, render


class Command(BaseCommand):
    help = "Write docs/state-machine.md (table + Mermaid diagram) from the transition table."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--check", action="store_true", help="fail if the file differs instead of writing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(settings.BASE_DIR) / DOC_PATH
        text = render()
        if options["check"]:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                raise CommandError(f"{DOC_PATH} is out of date: run manage.py state_machine_doc")
            return
        path.write_text(text, encoding="utf-8")
        self.stdout.write(f"wrote {DOC_PATH}")
