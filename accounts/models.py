from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from datetime import datetime

from django.contrib.auth.models import AbstractUser
from django.db import connection, models
from django.utils import timezone

from accounts.roles import Role


class User(AbstractUser):
    """A person or a member hospital system. Staff accounts belong to one facility."""

    facility = models.ForeignKey(
        "registry.Facility",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="staff",
    )
    departments = models.ManyToManyField("registry.Department", blank=True, related_name="staff")
    # When the last password-reset e-mail went out: at most one per PASSWORD_RESET_INTERVAL.
    password_reset_sent_at = models.DateTimeField(null=True, blank=True, editable=False)

    # Roles and departments are read together, once per user object (per request), by the
    # first call that needs either: one query instead of two for the many requests that
    # need both (scope checks), none for those that need neither.
    def role_names(self) -> frozenset[str]:
        cached: frozenset[str] | None = getattr(self, "_role_names", None)
        if cached is None:
            self.load_memberships()
            cached = self._role_names
        return cached

    def has_role(self, *roles: Role) -> bool:
        return bool(self.role_names() & {str(r) for r in roles})

    def department_ids(self) -> frozenset[int]:
        """The departments the user works in, cached on the object for the request."""
        cached: frozenset[int] | None = getattr(self, "_department_ids", None)
        if cached is None:
            self.load_memberships()
            cached = self._department_ids
        return cached

    def forget_memberships(self) -> None:
        """Drop the cached roles and departments (after changing them on this object)."""
        self.__dict__.pop("_role_names", None)
        self.__dict__.pop("_department_ids", None)

    def load_memberships(self) -> None:
        """(Re)read roles and departments into the caches with one query."""
        groups = User.groups.through._meta.db_table
        group = User.groups.field.related_model._meta.db_table  # type: ignore[union-attr]
        departments = User.departments.through._meta.db_table
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT 0, g.name, NULL FROM {group} g "  # noqa: S608 - table names only
                f"JOIN {groups} ug ON ug.group_id = g.id WHERE ug.user_id = %s "
                f"UNION ALL SELECT 1, NULL, department_id FROM {departments} "
                "WHERE user_id = %s",
                [self.pk, self.pk],
            )
            rows = cursor.fetchall()
        self.set_memberships(
            [name for kind, name, _ in rows if kind == 0],
            [dep for kind, _, dep in rows if kind == 1],
        )

    def set_memberships(self, role_names: Iterable[str], department_ids: Iterable[int]) -> None:
        """Fill the caches from a query that already read them (bearer authentication)."""
        self._role_names = frozenset(role_names)
        self._department_ids = frozenset(department_ids)


def _hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


class ApiTokenQuerySet(models.QuerySet["ApiToken"]):
    def usable(self, now: datetime | None = None) -> ApiTokenQuerySet:
        now = now or timezone.now()
        return self.filter(revoked_at__isnull=True, expires_at__gt=now, user__is_active=True)


class ApiToken(models.Model):
    """A bearer token. Only its SHA-256 is stored; the raw value is shown once."""

    PREFIX_LENGTH = 8

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=PREFIX_LENGTH, db_index=True)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        indexes = [models.Index(fields=["user", "revoked_at"])]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @staticmethod
    def generate() -> str:
        return "csl_" + secrets.token_urlsafe(32)

    @staticmethod
    def hash(raw: str) -> str:
        return _hash_token(raw)

    @property
    def is_usable(self) -> bool:
        return self.revoked_at is None and self.expires_at > timezone.now()
