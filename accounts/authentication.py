from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from accounts.models import ApiToken, User

_LAST_USED_GRANULARITY = timedelta(minutes=5)


def user_for_bearer(raw: str) -> tuple[User, ApiToken]:
    """Resolve a raw bearer token; raises AuthenticationFailed when unusable."""
    token = (
        ApiToken.objects.usable()
        .select_related("user", "user__facility")
        .filter(key_hash=ApiToken.hash(raw))
        .first()
    )
    if token is None:
        raise exceptions.AuthenticationFailed("Invalid, expired or revoked token.")
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > _LAST_USED_GRANULARITY:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token.user, token


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[User, ApiToken] | None:
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <token>'.")
        try:
            raw = header[1].decode("ascii")
        except UnicodeError as exc:
            raise exceptions.AuthenticationFailed("Token contains invalid characters.") from exc
        return user_for_bearer(raw)

    def authenticate_header(self, request: Request) -> str:
        return self.keyword
