from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.models import User
from accounts.services import api_token_issue, api_tokens_revoke


class Command(BaseCommand):
    help = "Print a new bearer token for USERNAME (or revoke that user's tokens with --revoke)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--days", type=int, default=None, help="lifetime in days")
        parser.add_argument("--name", default="", help="a label for the token")
        parser.add_argument(
            "--revoke",
            action="store_true",
            help="revoke the user's tokens instead (all, or only --prefix)",
        )
        parser.add_argument("--prefix", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user = User.objects.get(username=options["username"])
        except User.DoesNotExist as exc:
            raise CommandError(f"No user named {options['username']!r}.") from exc
        if options["revoke"]:
            count = api_tokens_revoke(user=user, prefix=options["prefix"])
            self.stdout.write(f"revoked {count} token(s)")
            return
        longest = settings.API_TOKEN_MAX_TTL_DAYS
        if options["days"] is not None and not 1 <= options["days"] <= longest:
            raise CommandError(f"--days must be 1 ... {longest}.")
        issued = api_token_issue(user=user, name=options["name"], ttl_days=options["days"])
        self.stdout.write(issued.raw)
