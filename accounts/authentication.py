from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from axes.backends import AxesStandaloneBackend
from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.db import connection
from django.http import HttpRequest
from django.utils import timezone
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from accounts.models import ApiToken, User
from core.rows import fetch_prepared_first

_LAST_USED_GRANULARITY = timedelta(minutes=5)

# The documented password of the accounts ``seed_demo`` creates (README): it opens no
# account when DEBUG is off (``PasswordBackend``).
DEMO_PASSWORD = "demo"  # noqa: S105


# The user by the token's hash, in one hand-written statement: every API and FHIR request
# runs it, and the ORM's three-table select_related version took ~4 ms a call (compiling
# and building three models) for a 0.2 ms query. Same rule as ``ApiToken.objects.usable()``:
# not revoked, not expired, active user.
_USER_COLUMNS = [(f.attname, f.column) for f in User._meta.concrete_fields]
# Columns by name, not u.*: a prepared ``u.*`` fails ("cached plan must not change result
# type") on every connection that prepared it once a migration adds a column.
_USER_SELECT = ", ".join(f'u."{column}"' for _attname, column in _USER_COLUMNS)
_USER_BY_TOKEN_SQL = (
    f"SELECT {_USER_SELECT}, "  # noqa: S608
    f"t.id AS token_id, t.last_used_at AS token_last_used_at{{memberships}} "
    f"FROM {User._meta.db_table} u JOIN {ApiToken._meta.db_table} t ON t.user_id = u.id "
    "WHERE t.key_hash = %s AND t.revoked_at IS NULL AND t.expires_at > %s AND u.is_active"
)
# On PostgreSQL the same statement also reads the user's roles and departments (what
# ``User.load_memberships`` reads), so a scoped request needs no second round trip.
_GROUP = User.groups.field.related_model._meta.db_table  # type: ignore[union-attr]
_MEMBERSHIPS_SQL = (
    f", ARRAY(SELECT g.name FROM {_GROUP} g JOIN {User.groups.through._meta.db_table} ug "  # noqa: S608
    "ON ug.group_id = g.id WHERE ug.user_id = u.id) AS member_roles, "
    f"ARRAY(SELECT ud.department_id FROM {User.departments.through._meta.db_table} ud "
    "WHERE ud.user_id = u.id) AS member_departments"
)


def _user_by_token_sql() -> str:
    postgres = connection.vendor == "postgresql"
    return _USER_BY_TOKEN_SQL.format(memberships=_MEMBERSHIPS_SQL if postgres else "")


def _fetch_prepared_user(params: list[Any]) -> User | None:
    """The statement as a server-side prepared statement of the persistent connection:
    planned once per connection, not per request (planning it took ~0.3 ms warm, ~1.3 ms
    cold, running it ~0.1 ms; Django's cursors bind client-side and so never prepare). As
    the request's first statement it is also the connection's health check
    (``core.rows.fetch_prepared_first``)."""
    rows = fetch_prepared_first(_user_by_token_sql(), params)
    if not rows:
        return None
    row = rows[0]
    fields = len(_USER_COLUMNS)
    user = User.from_db(connection.alias, [a for a, _c in _USER_COLUMNS], list(row[:fields]))
    extras = ("token_id", "token_last_used_at", "member_roles", "member_departments")
    for name, value in zip(extras, row[fields:], strict=True):
        setattr(user, name, value)
    return user


def user_for_bearer(raw: str) -> tuple[User, ApiToken]:
    """Resolve a raw bearer token; raises AuthenticationFailed when unusable. The token
    returned (DRF's ``request.auth``) has its id, user and last use loaded."""
    now = timezone.now()
    params = [ApiToken.hash(raw), now]
    if connection.vendor == "postgresql":
        found = _fetch_prepared_user(params)
    else:
        found = next(iter(User.objects.raw(_user_by_token_sql(), params)), None)
    if found is None:
        raise exceptions.AuthenticationFailed("Invalid, expired or revoked token.")
    user = found
    roles = getattr(user, "member_roles", None)
    if roles is not None:
        user.set_memberships(roles, user.member_departments)  # type: ignore[attr-defined]
    token_id: int = user.token_id  # type: ignore[attr-defined]
    last_used_at: datetime | None = user.token_last_used_at  # type: ignore[attr-defined]
    if last_used_at is not None and timezone.is_naive(last_used_at):
        # SQLite (make run) gives a raw query's extra columns as stored: naive UTC.
        last_used_at = timezone.make_aware(last_used_at, UTC)
    if last_used_at is None or now - last_used_at > _LAST_USED_GRANULARITY:
        ApiToken.objects.filter(pk=token_id).update(last_used_at=now)
        last_used_at = now
    return user, ApiToken(id=token_id, user=user, last_used_at=last_used_at)


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


class LockoutBackend(AxesStandaloneBackend):
    """django-axes' lockout check for logins that come with a request (the login page, the
    admin). A call without one (a script, the test client's ``login``) has no address to
    count by: axes would raise; it is left to the other backends."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> None:
        if request is None:
            return None
        return super().authenticate(request, username, password, **kwargs)


# django-axes records the user name of a failed login in a column of this many characters
# (AccessAttempt.username); it cuts the agent and path to fit, not the name.
_AXES_USERNAME_LENGTH = 255


def login_attempt_username(
    request: HttpRequest, credentials: dict[str, Any] | None = None
) -> str | None:
    """The user name django-axes counts a login attempt by (``AXES_USERNAME_CALLABLE``):
    axes' own choice, cut to what its tables hold. Django's login form does not hold the
    name to the model's 150 characters, so a longer one reached axes, whose INSERT failed
    (a 500 for a mistyped or pasted login). No account has such a name; the attempt is
    still counted, under its first characters."""
    field = getattr(settings, "AXES_USERNAME_FORM_FIELD", "username")  # axes.conf default
    if credentials:
        name = credentials.get(field)
    else:
        name = getattr(request, "data", request.POST).get(field)
    return name[:_AXES_USERNAME_LENGTH] if isinstance(name, str) else name


class PasswordBackend(ModelBackend):
    """Django's user name + password check, except that with DEBUG off the demo password
    opens no account: ``seed_demo`` is refused then, but a database seeded while DEBUG was
    on (``make run``) and then put into production would keep its demo accounts, whose
    password the README publishes. Nobody else can have it: the password validators refuse
    a password that short."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> User | None:
        if password == DEMO_PASSWORD and not settings.DEBUG:
            return None
        return super().authenticate(request, username, password, **kwargs)
