"""Great-circle distances and bounding boxes (no GIS extension needed, SQLite or PostgreSQL)."""

from __future__ import annotations

import math

from django.db.models import Case, Expression, F, FloatField, Q, Value, When
from django.db.models.functions import ASin, Cos, Least, Power, Radians, Sin, Sqrt

EARTH_RADIUS_KM = 6371.0088


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def haversine_km_expression(
    lat: float, lon: float, lat_field: str = "latitude", lon_field: str = "longitude"
) -> Expression:
    """``haversine_km(lat, lon, <lat_field>, <lon_field>)`` as an ORM expression: the same
    formula, step by step, computed by the database (NULL where a coordinate is)."""
    p1, p2 = Radians(Value(float(lat))), Radians(F(lat_field))
    dp = p2 - p1
    dl = Radians(F(lon_field) - Value(float(lon)))
    a = Power(Sin(dp / Value(2.0)), Value(2.0)) + Cos(p1) * Cos(p2) * Power(
        Sin(dl / Value(2.0)), Value(2.0)
    )
    distance = Value(2 * EARTH_RADIUS_KM) * ASin(Least(Value(1.0), Sqrt(a)))
    # PostgreSQL's LEAST skips a NULL (SQLite's MIN does not): without coordinates, NULL.
    placed = Q(**{f"{lat_field}__isnull": False, f"{lon_field}__isnull": False})
    return Case(When(placed, then=distance), default=None, output_field=FloatField())


def bounding_box(
    lat: float, lon: float, radius_km: float
) -> tuple[float, float, float | None, float | None]:
    """(min_lat, max_lat, min_lon, max_lon) enclosing the circle; longitudes None when the box
    would wrap the antimeridian or reach a pole (then only latitude prefilters)."""
    angular = radius_km / EARTH_RADIUS_KM
    dlat = math.degrees(angular)
    min_lat, max_lat = lat - dlat, lat + dlat
    if max_lat >= 90 or min_lat <= -90:
        return max(min_lat, -90.0), min(max_lat, 90.0), None, None
    # Widest longitude extent of a spherical cap (Bronshtein): asin(sin(r) / cos(lat)).
    ratio = math.sin(angular) / math.cos(math.radians(lat))
    if ratio >= 1:
        return min_lat, max_lat, None, None
    dlon = math.degrees(math.asin(ratio))
    if lon - dlon < -180 or lon + dlon > 180:
        return min_lat, max_lat, None, None
    return min_lat, max_lat, lon - dlon, lon + dlon
