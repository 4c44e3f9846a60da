"""Reads of the registry."""

from __future__ import annotations

from typing import TypedDict

from django.db import connection
from django.db.models import F, Q, QuerySet
from django.utils import timezone
from django_stubs_ext import WithAnnotations

from registry.geo import bounding_box, haversine_km, haversine_km_expression
from registry.models import (
    AdministrativeArea,
    ConsultMode,
    Country,
    Department,
    Facility,
    FacilityIdentifier,
    OperationalStatus,
    Specialty,
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


def facility_ids_by_identifier(system: str, value: str, *, code_system: str) -> list[int]:
    """The facilities an identifier names: ``code_system`` is our own facility code (the
    system the registry projection publishes ``Facility.code`` under); any other system is
    one of ``FacilityIdentifier``; no system: the value in either. More than one id: the
    identifier names none of them alone."""
    by_code = Facility.objects.filter(code=value).values_list("id", flat=True)
    by_identifier = FacilityIdentifier.objects.filter(value=value)
    if system == code_system:
        return list(by_code[:2])
    if system:
        return list(by_identifier.filter(system=system).values_list("facility_id", flat=True)[:2])
    found = set(by_code[:2]) | set(by_identifier.values_list("facility_id", flat=True)[:2])
    return sorted(found)[:2]


def facility_queryset() -> QuerySet[Facility]:
    """Facilities with what the API shows, in a constant number of queries."""
    return Facility.objects.select_related(
        "country", "area", "province", "parent"
    ).prefetch_related("identifiers")


class Distance(TypedDict):
    distance_km: float


def facility_distances(
    latitude: float, longitude: float
) -> QuerySet[WithAnnotations[Facility, Distance]]:
    """Facilities with their great-circle ``distance_km`` from a point, computed in SQL
    (``haversine_km_expression``; NULL without coordinates)."""
    distance = haversine_km_expression(latitude, longitude)
    return Facility.objects.order_by().annotate(distance_km=distance)


def facilities_within(
    latitude: float, longitude: float, radius_km: float
) -> QuerySet[WithAnnotations[Facility, Distance]]:
    """The facilities within ``radius_km`` of a point (none without coordinates), with
    their ``distance_km``. The bounding box on the indexed coordinates narrows the rows
    first, as in ``departments_near``."""
    min_lat, max_lat, min_lon, max_lon = bounding_box(latitude, longitude, radius_km)
    rows = facility_distances(latitude, longitude).filter(
        latitude__gte=min_lat, latitude__lte=max_lat
    )
    if min_lon is not None and max_lon is not None:
        rows = rows.filter(longitude__gte=min_lon, longitude__lte=max_lon)
    return rows.filter(distance_km__lte=radius_km)


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
    # Hand-written SQL: this runs on every routing screen and the ORM's query building cost
    # several times the query itself. Only constants are formatted in; values are parameters.
    department, facility = Department._meta.db_table, Facility._meta.db_table
    specialty, country = Specialty._meta.db_table, Country._meta.db_table
    where = [
        "s.code = %s",
        "f.operational_status = %s",
        "f.latitude >= %s",
        "f.latitude <= %s",
    ]
    params: list[bool | int | float | str] = [
        specialty_code,
        str(OperationalStatus.ACTIVE),
        min_lat,
        max_lat,
    ]
    if min_lon is not None and max_lon is not None:
        where += ["f.longitude >= %s", "f.longitude <= %s"]
        params += [min_lon, max_lon]
    if accepting is not None:
        where.append("d.accepting = %s")
        params.append(accepting)
    if mode is not None:
        where.append(f"d.{MODE_FLAGS[mode]} = %s")
        params.append(True)
    if exclude_facility_id is not None:
        where.append("d.facility_id <> %s")
        params.append(exclude_facility_id)
    columns = (
        "d.id, d.name, d.facility_id, f.code, f.name, f.tier, c.code, s.code, s.display,"
        " d.offers_async, d.offers_live, d.offers_transfer, d.accepting, f.latitude, f.longitude"
    )
    tables = (
        f"{department} d JOIN {facility} f ON f.id = d.facility_id"
        f" JOIN {specialty} s ON s.id = d.specialty_id JOIN {country} c ON c.id = f.country_id"
    )
    sql = f"SELECT {columns} FROM {tables} WHERE {' AND '.join(where)}"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        values = cursor.fetchall()
    found: list[NearbyDepartment] = []
    for row in values:
        lat, lon = row[13], row[14]
        if lat is None or lon is None:  # excluded by the box filter; keeps the types honest
            continue
        distance = haversine_km(latitude, longitude, lat, lon)
        if distance > radius_km:
            continue
        modes = [str(m) for m, on in zip(MODE_FLAGS, row[9:12], strict=True) if on]
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
                "accepting": bool(row[12]),
                "distance_km": round(distance, 3),
            }
        )
    found.sort(key=lambda d: (d["distance_km"], d["department_id"]))
    return found[:limit]


def effective_support_links() -> QuerySet[SupportLink]:
    """Links that support now or later: active and not ended (an inactive or ended link
    supports nothing, so its tiers are not judged until it is made effective again)."""
    today = timezone.localdate()
    return SupportLink.objects.filter(active=True).filter(
        Q(valid_to__isnull=True) | Q(valid_to__gte=today)
    )


def upside_down_support_links() -> QuerySet[SupportLink]:
    """Links in effect whose hub is of a lower tier (a larger number) than its spoke: the
    rule refuses them since 2026-11-27 (``registry.services``), but rows stored before it
    may hold them (``manage.py registry_check`` lists them; an import judges its tier
    changes with them)."""
    return (
        effective_support_links()
        .select_related("hub", "spoke")
        .filter(hub__tier__gt=F("spoke__tier"))
        .order_by("id")
    )
