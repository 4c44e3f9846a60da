"""Great-circle distances and bounding boxes (no GIS extension needed, SQLite or PostgreSQL)."""

from __future__ import annotations

import math

EARTH_RADIUS_KM = 6371.0088


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


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
