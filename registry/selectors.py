"""Reads of the registry."""

from __future__ import annotations

from typing import TypedDict

from registry.models import Country, Department, Facility, SupportLink, Tier


class RegistrySummary(TypedDict):
    countries: int
    facilities: int
    upper_tier: int
    departments: int
    support_links: int


def registry_summary() -> RegistrySummary:
    return {
        "countries": Country.objects.count(),
        "facilities": Facility.objects.count(),
        "upper_tier": Facility.objects.filter(tier__lte=Tier.PROVINCIAL).count(),
        "departments": Department.objects.count(),
        "support_links": SupportLink.objects.count(),
    }
