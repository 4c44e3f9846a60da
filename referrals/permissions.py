"""Who may see a referral beyond the two relationships (requester facility staff and the
assigned department's staff). See docs/permissions.md.

- Explicit grants: django-guardian ``referrals.view_referral`` object permissions, stored
  in ``ReferralUserObjectPermission`` (a direct foreign key, so the scope is one indexed
  subquery). Given to the experts invited to a live case conference; removed when they are
  dropped from the list and when the referral ends. A grant counts only while the case's
  data may still reach the expert (``referral_expert_reach_filter``, evaluated at every
  read): an expert abroad whose invitation rested on a support link loses the case when
  that link ends (deactivated, expired, no longer allowing identifiable data), without
  any row to clean up.
- Region: a coordinator sees the referrals sent from or assigned to a facility in the
  province of their own facility. A relationship rule (subqueries), no per-object rows.

Every rule is a ``Q`` without joins in the outer query, so it also works under
``SELECT … FOR UPDATE`` in ``referral_transition``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

from django.db.models import Q, QuerySet
from django.utils import timezone
from guardian.shortcuts import assign_perm

from accounts.models import User
from accounts.roles import Role
from referrals.models import Referral, ReferralState, ReferralUserObjectPermission
from registry.models import Department, Facility, SupportLink

VIEW_REFERRAL = "view_referral"
VIEW_REFERRAL_PERM = f"referrals.{VIEW_REFERRAL}"


def data_sharing_links(today: date) -> QuerySet[SupportLink]:
    """Support links in effect on ``today`` that carry a data-sharing agreement: the only
    way a case's data reaches an expert abroad (the invitation rule,
    ``selectors._data_may_reach``, and the read-time check of a grant,
    ``referral_expert_reach_filter``, share it)."""
    return SupportLink.objects.filter(
        Q(valid_to__isnull=True) | Q(valid_to__gte=today),
        active=True,
        valid_from__lte=today,
    ).exclude(agreement_reference="")


def referral_grant_filter(user: User) -> Q:
    """Referrals the user holds an explicit view grant on, while their data may still
    reach the user (``referral_expert_reach_filter``)."""
    granted = ReferralUserObjectPermission.objects.filter(
        user_id=user.pk, permission__codename=VIEW_REFERRAL
    ).values("content_object_id")
    return Q(pk__in=granted) & referral_expert_reach_filter(user)


def referral_expert_reach_filter(user: User) -> Q:
    """The referrals whose data may reach ``user`` as an invited expert **now**: the
    border half of the invitation rule (``selectors._data_may_reach``) seen from the
    expert's side. A department of the user's at a facility in the requester's country,
    or at the hub of a data-sharing support link in effect today to the requester (one
    allowing identifiable data when the case carries a patient reference). Evaluated at
    every read, so the end of a link (deactivated, its ``valid_to`` passed, its agreement
    or identifiable-data permission withdrawn, deleted) ends the access it allowed, with
    no stale grant to revoke; granting it again is a link edit away. Subqueries only."""
    department_ids = user.department_ids()
    if not department_ids:
        return Q(pk__in=[])  # an expert works in a department: no department, no case
    facilities = Department.objects.filter(pk__in=department_ids).values("facility_id")
    countries = Facility.objects.filter(pk__in=facilities).values("country_id")
    home = Facility.objects.filter(country_id__in=countries).values("pk")
    links = data_sharing_links(timezone.localdate()).filter(hub_id__in=facilities)
    identifiable = links.filter(identifiable_data_allowed=True)
    return Q(requester_facility_id__in=home) | (
        Q(requester_facility_id__in=links.values("spoke_id"))
        & (Q(patient_ref="") | Q(requester_facility_id__in=identifiable.values("spoke_id")))
    )


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
