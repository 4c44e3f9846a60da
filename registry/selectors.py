"""Reads of the registry."""

from __future__ import annotations

from typing import TypedDict

from django.db.models import QuerySet

from registry.geo import bounding_box, haversine_km
from registry.models import (
    AdministrativeArea,
    ConsultMode,
    Country,
    Department,
    Facility,
    OperationalStatus,
    SupportLink,
    Tier,
)

# Department columns that say whether a mode is offered, in ConsultMode order.
MODE_FLAGS: dict[str, str] = {
    ConsultMode.ASYNC: "offers_async",
    ConsultMode.LIVE: "offers_live",
    ConsultMode.TRANSFER: "offers_transfer",
}


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


def facility_queryset() -> QuerySet[Facility]:
    """Facilities with what the API shows, in a constant number of queries."""
    return Facility.objects.select_related(
        "country", "area", "province", "parent"
    ).prefetch_related("identifiers")


def department_queryset() -> QuerySet[Department]:
    return Department.objects.select_related("facility", "facility__country", "specialty")


def area_descendant_ids(area_id: int) -> set[int]:
    """The area and every area below it (three levels at most: one query per level)."""
    found = {area_id}
    frontier = {area_id}
    while frontier:
        frontier = (
            set(
                AdministrativeArea.objects.filter(parent_id__in=frontier).values_list(
                    "id", flat=True
                )
            )
            - found
        )
        found |= frontier
    return found


class NearbyDepartment(TypedDict):
    department_id: int
    department_name: str
    facility_id: int
    facility_code: str
    facility_name: str
    facility_tier: int
    country: str
    specialty_code: str
    specialty_display: str
    modes: list[str]
    accepting: bool
    distance_km: float


def departments_near(
    *,
    specialty_code: str,
    latitude: float,
    longitude: float,
    radius_km: float,
    mode: str | None = None,
    accepting: bool | None = True,
    exclude_facility_id: int | None = None,
    limit: int = 50,
) -> list[NearbyDepartment]:
    """Departments offering a specialty within radius_km of a point, nearest first.

    A bounding box on the indexed coordinates narrows the rows in SQL; the exact great-circle
    distance is computed for the few that remain.
    """
    min_lat, max_lat, min_lon, max_lon = bounding_box(latitude, longitude, radius_km)
    rows = Department.objects.filter(
        specialty__code=specialty_code,
        facility__operational_status=OperationalStatus.ACTIVE,
        facility__latitude__gte=min_lat,
        facility__latitude__lte=max_lat,
    )
    if min_lon is not None and max_lon is not None:
        rows = rows.filter(facility__longitude__gte=min_lon, facility__longitude__lte=max_lon)
    if accepting is not None:
        rows = rows.filter(accepting=accepting)
    if mode is not None:
        rows = rows.filter(**{MODE_FLAGS[mode]: True})
    if exclude_facility_id is not None:
        rows = rows.exclude(facility_id=exclude_facility_id)
    values = rows.order_by().values_list(
        "id",
        "name",
        "facility_id",
        "facility__code",
        "facility__name",
        "facility__tier",
        "facility__country__code",
        "specialty__code",
        "specialty__display",
        "offers_async",
        "offers_live",
        "offers_transfer",
        "accepting",
        "facility__latitude",
        "facility__longitude",
    )
    found: list[NearbyDepartment] = []
    for row in values:
        lat, lon = row[13], row[14]
        if lat is None or lon is None:  # excluded by the box filter; keeps the types honest
            continue
        distance = haversine_km(latitude, longitude, lat, lon)
        if distance > radius_km:
            continue
        modes = [m for m, on in zip(MODE_FLAGS, row[9:12], strict=True) if on]
        found.append(
            {
                "department_id": row[0],
                "department_name": row[1],
                "facility_id": row[2],
                "facility_code": row[3],
                "facility_name": row[4],
                "facility_tier": row[5],
                "country": row[6],
                "specialty_code": row[7],
                "specialty_display": row[8],
                "modes": modes,
                "accepting": row[12],
                "distance_km": round(distance, 3),
            }
        )
    found.sort(key=lambda d: (d["distance_km"], d["department_id"]))
    return found[:limit]
