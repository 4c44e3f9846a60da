from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from accounts.models import User
from accounts.roles import Role


def is_steward(user: Any) -> bool:
    return bool(
        isinstance(user, User)
        and user.is_active
        and (user.is_superuser or user.has_role(Role.REGISTRY_STEWARD))
    )


class StewardWritesOthersRead(BasePermission):
    """Every authenticated user reads the registry; only registry stewards write it."""

    message = "Only registry stewards may change the registry."

    def has_permission(self, request: Request, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        return request.method in SAFE_METHODS or is_steward(request.user)
