"""The audit of patient data read or written over FHIR, in the log the REST API writes
(``referrals.audit``, docs/permissions.md): who, when, from where, which referral.

Called by the views once the answer is built (refusals carry no patient data and are not
recorded), for the resources that belong to a referral (``referral_mapping.REFERRAL_TYPES``):
one row per referral per request, whatever number of its resources the answer holds.
Registry resources, Subscriptions and the id-only feed hold no patient data and are not
recorded. The case files' bytes (``Binary``) are recorded by ``binary`` as downloads and
uploads, as the REST API records them.

``referrals.audit`` reads the actor from the request; bearer authentication does not set
``request.user``, so each function here sets it to the authenticated user first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from django.http import HttpRequest

from fhir_gateway.models import FhirResource
from fhir_gateway.referral_mapping import REFERRAL_TYPES, filler_of
from referrals.audit import audit_record, audit_record_fillers
from referrals.models import AuditAction

if TYPE_CHECKING:
    from accounts.models import User


def audit_rows(
    request: HttpRequest,
    user: User | None,
    action: AuditAction,
    rows: Iterable[FhirResource],
    detail: str,
) -> None:
    """Record stored versions (their ``source_pk`` is the referral's)."""
    ids = {r.source_pk for r in rows if r.resource_type in REFERRAL_TYPES and r.source_pk}
    if ids and user is not None:
        request.user = user
        audit_record(request, action, sorted(ids), detail=detail)


def audit_referral(
    request: HttpRequest, user: User, action: AuditAction, referral_pk: int, detail: str
) -> None:
    request.user = user
    audit_record(request, action, [referral_pk], detail=detail)


def audit_resources(
    request: HttpRequest,
    user: User | None,
    action: AuditAction,
    resources: Iterable[tuple[str, str]],
    detail: str,
    referral_pks: Iterable[int] = (),
) -> None:
    """Record (type, logical id) pairs: a search result page with what it included; and
    the referrals of ``referral_pks`` (a page's ``source_pk``s, when the search read them:
    no lookup by filler id)."""
    fillers = {f for rtype, lid in resources if (f := filler_of(rtype, lid))}
    known = list(referral_pks)
    if (fillers or known) and user is not None:
        request.user = user
        audit_record_fillers(request, action, fillers, referral_ids=known, detail=detail)


def resources_answered(batch_response: str) -> list[tuple[str, str]]:
    """The (type, id) of the resources an asynchronous job's answer holds (the
    batch-response's one entry: the transaction-response, whose entries hold them)."""
    try:
        outer = json.loads(batch_response)
    except ValueError:
        return []
    found = []
    for entry in outer.get("entry") or []:
        inner = entry.get("resource") if isinstance(entry, dict) else None
        for item in (inner or {}).get("entry") or []:
            resource = item.get("resource") if isinstance(item, dict) else None
            if isinstance(resource, dict) and resource.get("id"):
                found.append((str(resource.get("resourceType")), str(resource["id"])))
    return found


def audit_file(
    request: HttpRequest, user: User, action: AuditAction, referral_pk: int, attachment_pk: int
) -> None:
    """A case file's bytes read (``download``) or stored (``create``) through ``Binary``, as
    the REST API records its download and upload."""
    request.user = user
    audit_record(
        request,
        action,
        [referral_pk],
        object_type="attachment",
        object_id=attachment_pk,
        detail="fhir-binary",
    )
