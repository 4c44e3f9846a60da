from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from importlib import import_module

from axes.models import AccessFailureLog, AccessLog
from django.conf import settings
from django.db import transaction
from django.db.models import Q
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


def password_reset_claim(*, user: User) -> bool:
    """Whether a password-reset e-mail may go to ``user`` now (and record that it goes):
    at most one per ``PASSWORD_RESET_INTERVAL_MINUTES``, so the public reset form cannot
    be used to flood someone's mailbox. One conditional UPDATE: two requests at once send
    one e-mail."""
    now = timezone.now()
    cutoff = now - timedelta(minutes=settings.PASSWORD_RESET_INTERVAL_MINUTES)
    due = Q(password_reset_sent_at__isnull=True) | Q(password_reset_sent_at__lte=cutoff)
    return bool(User.objects.filter(due, pk=user.pk).update(password_reset_sent_at=now))


def login_logs_prune() -> int:
    """Delete login records (django-axes' access and failure logs: who logged in and out,
    when, from where) older than ``LOGIN_LOG_RETENTION_DAYS`` (0 or less: keep them all).
    The lockout counters are not touched: axes expires those itself."""
    days = settings.LOGIN_LOG_RETENTION_DAYS
    if days <= 0:
        return 0
    cutoff = timezone.now() - timedelta(days=days)
    deleted = 0
    for model in (AccessLog, AccessFailureLog):
        deleted += model.objects.filter(attempt_time__lt=cutoff).delete()[0]
    return deleted


def sessions_clear_expired() -> int:
    """Delete expired web sessions (``manage.py clearsessions``): the database session
    backend never deletes a session row by itself, so without this the table grows by
    every login's row for ever. Returns how many rows went (0 for backends that expire on
    their own: cache, signed cookies)."""
    store = import_module(settings.SESSION_ENGINE).SessionStore
    if not hasattr(store, "get_model_class"):  # cache, signed cookies: nothing stored
        store.clear_expired()
        return 0
    # What the database backends' clear_expired does, counted.
    expired = store.get_model_class().objects.filter(expire_date__lt=timezone.now())
    deleted: int = expired.delete()[0]
    return deleted
