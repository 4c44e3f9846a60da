"""Who may see a referral beyond the two relationships (requester facility staff and the
assigned department's staff). See docs/permissions.md.

- Explicit grants: django-guardian ``referrals.view_referral`` object permissions, stored
  in ``ReferralUserObjectPermission`` (a direct foreign key, so the scope is one indexed
  subquery). Given to the experts invited to a live case conference; removed when they are
  dropped from the list and when the referral ends.
- Region: a coordinator sees the referrals sent from or assigned to a facility in the
  province of their own facility. A relationship rule (subqueries), no per-object rows.

Every rule is a ``Q`` without joins in the outer query, so it also works under
``SELECT … FOR UPDATE`` in ``referral_transition``.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import Q
from guardian.shortcuts import assign_perm

from accounts.models import User
from accounts.roles import Role
from referrals.models import Referral, ReferralState, ReferralUserObjectPermission
from registry.models import Department, Facility

VIEW_REFERRAL = "view_referral"
VIEW_REFERRAL_PERM = f"referrals.{VIEW_REFERRAL}"


def referral_grant_filter(user: User) -> Q:
    """Referrals the user holds an explicit view grant on."""
    granted = ReferralUserObjectPermission.objects.filter(
        user_id=user.pk, permission__codename=VIEW_REFERRAL
    ).values("content_object_id")
    return Q(pk__in=granted)


# A draft is its requester's alone until it is sent: the department (and the region
# through it) sees referrals in any other state.
SENT = ~Q(state=ReferralState.DRAFT)


def referral_region_filter(user: User) -> Q | None:
    """For coordinators: referrals touching their province; None for everyone else."""
    if user.facility_id is None or not user.has_role(Role.COORDINATOR):
        return None
    province = Facility.objects.filter(pk=user.facility_id, province__isnull=False).values(
        "province_id"
    )
    facilities = Facility.objects.filter(province_id__in=province).values("id")
    departments = Department.objects.filter(facility_id__in=facilities).values("id")
    return Q(requester_facility_id__in=facilities) | (
        Q(assigned_department_id__in=departments) & SENT
    )


def referral_experts_grant(*, referral: Referral, experts: Iterable[User]) -> None:
    """Make the grants match the invited experts: add new ones, drop the uninvited."""
    expert_ids = {u.pk for u in experts}
    ReferralUserObjectPermission.objects.filter(
        content_object=referral, permission__codename=VIEW_REFERRAL
    ).exclude(user_id__in=expert_ids).delete()
    existing = set(
        ReferralUserObjectPermission.objects.filter(
            content_object=referral, permission__codename=VIEW_REFERRAL
        ).values_list("user_id", flat=True)
    )
    new = [u for u in experts if u.pk not in existing]
    if new:
        assign_perm(VIEW_REFERRAL_PERM, User.objects.filter(pk__in=[u.pk for u in new]), referral)


def referral_grants_revoke(*, referral: Referral) -> int:
    """Drop every explicit grant (the referral ended)."""
    deleted, _ = ReferralUserObjectPermission.objects.filter(content_object=referral).delete()
    return deleted
