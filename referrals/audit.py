"""Audit of patient data: who read or wrote which referral, when, from where.

Recorded explicitly by the API views (not middleware, not signals) with
``audit_record(request, action, referral_ids, ...)`` once the data is about to be sent or
has been written. Decisions (docs/permissions.md):

- One row per referral, also on list pages: a page of 50 is ONE bulk INSERT (constant
  query count), and "who saw referral X" stays a single indexed lookup
  (``audit_referral_at``) instead of a search inside arrays of ids.
- Refusals (404/403) carry no patient data and are not recorded here.
- Ministry officials never see patient data; nothing is recorded for them (and the
  helper refuses to, in case a view is ever wrong).
- The log is append-only: no update/delete path in code, read-only in the admin.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest
from django.utils import timezone
from rest_framework.request import Request

from accounts.models import User
from accounts.roles import Role
from core.logging import current_request_id
from core.rows import fetch_prepared
from referrals.models import AuditAction, AuditEntry, Referral

USER_AGENT_MAX = 255


def _ip(text: str) -> str | None:
    """``text`` when it is an IP address (the column is ``inet``), else None."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # PostgreSQL's inet has no IPv6 zone ("fe80::1%eth0"): the address without it.
    return str(address).partition("%")[0]


def client_ip(request: HttpRequest | Request) -> str | None:
    """The client's address: with a trusted proxy in front, the last address of
    ``X-Forwarded-For`` (the one that proxy appended: the peer it saw; what comes before
    it is the client's to write), else ``REMOTE_ADDR``. Also what login lockouts count by
    (``AXES_CLIENT_IP_CALLABLE``): a forged header must not give a guesser new addresses."""
    meta = request.META
    if getattr(settings, "AUDIT_TRUST_X_FORWARDED_FOR", False):
        forwarded = _ip(str(meta.get("HTTP_X_FORWARDED_FOR", "")).split(",")[-1])
        if forwarded:
            return forwarded
    return _ip(str(meta.get("REMOTE_ADDR") or ""))


_AUDIT_TABLE = AuditEntry._meta.db_table
# PostgreSQL: the entries in one prepared statement and one round trip (no BEGIN/COMMIT
# around it in autocommit), one row per referral id the source yields: the ids given
# (an array), or the referrals of the filler ids given (the FHIR gateway's logical ids:
# a search page of 50 paid ~1 ms for a separate lookup).
_AUDIT_INSERT = (
    f"INSERT INTO {_AUDIT_TABLE} (at, user_id, action, object_type, object_id, referral_id, "  # noqa: S608
    "detail, ip_address, user_agent, request_id) "
    "SELECT %s, %s, %s, %s, COALESCE(%s, r::text), r, %s, %s::inet, %s, %s FROM "
)
_BY_ID = _AUDIT_INSERT + "unnest(%s::bigint[]) AS r"
# Referral ids known (a search page's) and filler ids (what it included), one row each.
_BY_ID_AND_FILLER = (
    _AUDIT_INSERT + "(SELECT unnest(%s::bigint[]) UNION "  # noqa: S608
    f"SELECT id FROM {Referral._meta.db_table} WHERE filler_id = ANY(%s)) AS s(r)"
)


def _actor(request: HttpRequest | Request) -> User | None:
    """The user to record, None when nothing is (no user, or a ministry official)."""
    user = request.user
    if not isinstance(user, User) or user.has_role(Role.MINISTRY):
        return None
    return user


def _origin(request: HttpRequest | Request) -> tuple[str | None, str, str]:
    """Where the request came from: client address, user agent, request id."""
    agent = str(request.META.get("HTTP_USER_AGENT", ""))[:USER_AGENT_MAX]
    return client_ip(request), agent, (current_request_id() or "")[:64]


def _insert(
    source_sql: str,
    source: list[Any],
    request: HttpRequest | Request,
    user: User,
    action: AuditAction | str,
    object_type: str,
    object_id: str | None,
    detail: str,
) -> None:
    fetch_prepared(
        source_sql,
        [
            timezone.now(),
            user.pk,
            str(action),
            object_type,
            object_id,
            detail[:64],
            *_origin(request),
            *source,
        ],
        returning=False,
    )


def audit_record_fillers(
    request: HttpRequest | Request,
    action: AuditAction | str,
    filler_ids: Iterable[str],
    *,
    referral_ids: Iterable[int] = (),
    detail: str = "",
) -> None:
    """``audit_record`` for the referrals with these filler ids (the FHIR gateway's
    logical ids) and these referral ids (when the caller has them: no lookup), one entry
    per referral: on PostgreSQL the lookup and the entries are one statement."""
    user = _actor(request)
    fillers = sorted(set(filler_ids))
    known = sorted({int(i) for i in referral_ids})
    if user is None or not (fillers or known):
        return
    if not fillers:
        audit_record(request, action, known, detail=detail)
        return
    if connection.vendor == "postgresql":
        source = [known, fillers]
        _insert(_BY_ID_AND_FILLER, source, request, user, action, "referral", None, detail)
        return
    ids = Referral.objects.filter(filler_id__in=fillers).values_list("pk", flat=True)
    audit_record(request, action, sorted({*known, *ids}), detail=detail)


def audit_record(
    request: HttpRequest | Request,
    action: AuditAction | str,
    referral_ids: Iterable[int],
    *,
    object_type: str = "referral",
    object_id: str | int | None = None,
    detail: str = "",
) -> int:
    """Append one entry per referral id (one INSERT); returns how many. ``object_id``
    defaults to the referral id; pass it for sub-objects (an attachment)."""
    user = _actor(request)
    ids = list(dict.fromkeys(int(i) for i in referral_ids))
    if user is None or not ids:
        return 0
    fixed_id = str(object_id) if object_id is not None else None
    if connection.vendor == "postgresql":
        _insert(_BY_ID, [ids], request, user, action, object_type, fixed_id, detail)
        return len(ids)
    ip, agent, request_id = _origin(request)
    AuditEntry.objects.bulk_create(
        [
            AuditEntry(
                user=user,
                action=str(action),
                object_type=object_type,
                object_id=fixed_id if fixed_id is not None else str(referral_id),
                referral_id=referral_id,
                detail=detail[:64],
                ip_address=ip,
                user_agent=agent,
                request_id=request_id,
            )
            for referral_id in ids
        ]
    )
    return len(ids)
