from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts.models import User
from accounts.roles import Role
from registry.selectors import registry_summary


def _links(user: User) -> dict[str, Any]:
    """What the start page offers this user, by role (the pages check again)."""
    ministry = user.has_role(Role.MINISTRY)
    clinical = user.is_active and not ministry
    departments = (
        list(user.departments.select_related("facility").order_by("name", "id")) if clinical else []
    )
    return {
        "may_submit": clinical and user.facility_id is not None and user.has_role(Role.REFERRER),
        "outgoing": clinical and user.facility_id is not None,
        "worklist_departments": departments,
        # The dashboard scopes itself (reports.selectors.report_scope_for); the link is
        # offered to the roles it serves.
        "reports": ministry
        or user.is_superuser
        or (user.facility_id is not None and user.has_role(Role.REFERRER, Role.COORDINATOR))
        or bool(departments),
    }


@login_required
def home(request: HttpRequest) -> HttpResponse:
    user = request.user
    assert isinstance(user, User)
    return render(request, "core/home.html", {"summary": registry_summary(), **_links(user)})
