from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.models import ApiToken, User
from core.errors import ApplicationError


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    raw: str


@transaction.atomic
def api_token_issue(*, user: User, name: str = "", ttl_days: int | None = None) -> IssuedToken:
    days = ttl_days if ttl_days is not None else settings.API_TOKEN_DEFAULT_TTL_DAYS
    if not 1 <= days <= settings.API_TOKEN_MAX_TTL_DAYS:
        raise ApplicationError(
            f"A token lives 1 ... {settings.API_TOKEN_MAX_TTL_DAYS} days.", code="ttl_out_of_range"
        )
    raw = ApiToken.generate()
    token = ApiToken.objects.create(
        user=user,
        name=name,
        prefix=raw[4 : 4 + ApiToken.PREFIX_LENGTH],
        key_hash=ApiToken.hash(raw),
        expires_at=timezone.now() + timedelta(days=days),
    )
    return IssuedToken(token=token, raw=raw)


@transaction.atomic
def api_tokens_revoke(*, user: User, prefix: str | None = None) -> int:
    tokens = ApiToken.objects.filter(user=user, revoked_at__isnull=True)
    if prefix:
        tokens = tokens.filter(prefix=prefix)
    return tokens.update(revoked_at=timezone.now())
