"""Database constraints of the registry, geo helpers and the search key."""

import math
from datetime import date

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from registry.geo import EARTH_RADIUS_KM, bounding_box, haversine_km
from registry.models import (
    AdministrativeArea,
    Country,
    Department,
    Facility,
    FacilityIdentifier,
    SupportLink,
)
from registry.selectors import facilities_within, facility_distances
from registry.text import search_key
from tests.factories import (
    CARDIOLOGY,
    PEDIATRICS,
    AreaFactory,
    CountryFactory,
    DepartmentFactory,
    FacilityFactory,
    FacilityIdentifierFactory,
    SpecialtyFactory,
    SupportLinkFactory,
)

HANOI = (21.0285, 105.8542)
HO_CHI_MINH_CITY = (10.8231, 106.6297)


def _refused(make, constraint: str) -> None:
    """The write raises IntegrityError naming the constraint, and the transaction survives."""
    with pytest.raises(IntegrityError, match=constraint), transaction.atomic():
        make()


# --- constraints ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_identifier_system_and_value_are_unique_across_facilities():
    existing = FacilityIdentifierFactory.create(
        system="https://moh.gov.vn/facility-code", value="01001"
    )
    other = FacilityFactory.create()

    _refused(
        lambda: FacilityIdentifier.objects.create(
            facility=other, system="https://moh.gov.vn/facility-code", value="01001"
        ),
        "facility_identifier_unique",
    )

    assert list(FacilityIdentifier.objects.values_list("facility_id", flat=True)) == [
        existing.facility_id
    ]


@pytest.mark.django_db
def test_same_identifier_value_in_another_system_is_allowed():
    FacilityIdentifierFactory.create(system="https://moh.gov.vn/facility-code", value="01001")

    FacilityIdentifierFactory.create(system="https://who.int/hfr", value="01001")

    assert FacilityIdentifier.objects.filter(value="01001").count() == 2


@pytest.mark.django_db
def test_a_facility_has_one_identifier_per_system():
    existing = FacilityIdentifierFactory.create(
        system="https://moh.gov.vn/facility-code", value="01001"
    )

    _refused(
        lambda: FacilityIdentifier.objects.create(
            facility=existing.facility, system="https://moh.gov.vn/facility-code", value="01002"
        ),
        "facility_one_identifier_per_system",
    )

    assert FacilityIdentifier.objects.count() == 1


@pytest.mark.django_db
def test_a_facility_cannot_support_itself():
    facility = FacilityFactory.create()

    _refused(
        lambda: SupportLink.objects.create(hub=facility, spoke=facility), "support_link_not_self"
    )

    assert SupportLink.objects.count() == 0


@pytest.mark.django_db
def test_support_link_is_unique_per_hub_spoke_and_start_date():
    link = SupportLinkFactory.create(valid_from=date(2025, 1, 1))

    _refused(
        lambda: SupportLink.objects.create(
            hub=link.hub, spoke=link.spoke, valid_from=date(2025, 1, 1)
        ),
        "support_link_unique",
    )

    SupportLink.objects.create(hub=link.hub, spoke=link.spoke, valid_from=date(2026, 1, 1))
    assert SupportLink.objects.count() == 2


@pytest.mark.django_db
def test_cross_border_link_without_agreement_is_refused():
    hub = FacilityFactory.create(country=CountryFactory.create(code="VN", name="Viet Nam"))
    spoke = FacilityFactory.create(country=CountryFactory.create(code="LA", name="Lao PDR"))

    _refused(
        lambda: SupportLink.objects.create(hub=hub, spoke=spoke, agreement_reference=""),
        "support_link_cross_border_needs_agreement",
    )

    assert SupportLink.objects.count() == 0


@pytest.mark.django_db
def test_cross_border_link_with_agreement_is_stored_as_cross_border():
    hub = FacilityFactory.create(country=CountryFactory.create(code="VN", name="Viet Nam"))
    spoke = FacilityFactory.create(country=CountryFactory.create(code="LA", name="Lao PDR"))

    link = SupportLink.objects.create(hub=hub, spoke=spoke, agreement_reference="VN-LA/2025/07")

    link.refresh_from_db()
    assert link.is_cross_border is True


@pytest.mark.django_db
def test_same_country_link_is_not_cross_border_and_needs_no_agreement():
    link = SupportLinkFactory.create(agreement_reference="")

    link.refresh_from_db()
    assert link.is_cross_border is False


@pytest.mark.django_db
def test_support_link_cannot_end_before_it_starts():
    hub, spoke = FacilityFactory.create(), FacilityFactory.create()

    _refused(
        lambda: SupportLink.objects.create(
            hub=hub, spoke=spoke, valid_from=date(2025, 6, 1), valid_to=date(2025, 5, 31)
        ),
        "support_link_period_ordered",
    )

    assert SupportLink.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("tier", [0, 5])
def test_tier_outside_1_to_4_is_refused(tier):
    country = CountryFactory.create(code="VN")

    _refused(lambda: FacilityFactory.create(tier=tier, country=country), "facility_tier_1_4")

    assert Facility.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("latitude", "longitude"),
    [(90.01, 105.0), (-90.01, 105.0), (21.0, 180.01), (21.0, -180.01)],
)
def test_coordinates_out_of_range_are_refused(latitude, longitude):
    country = CountryFactory.create(code="VN")

    _refused(
        lambda: FacilityFactory.create(latitude=latitude, longitude=longitude, country=country),
        "facility_coordinates_valid",
    )

    assert Facility.objects.count() == 0


@pytest.mark.django_db
def test_coordinates_on_the_limits_are_accepted():
    facility = FacilityFactory.create(latitude=-90.0, longitude=180.0)

    facility.refresh_from_db()
    assert (facility.latitude, facility.longitude) == (-90.0, 180.0)


@pytest.mark.django_db
@pytest.mark.parametrize(("latitude", "longitude"), [(21.0, None), (None, 105.8)])
def test_model_validation_refuses_half_a_coordinate_pair(latitude, longitude):
    # The database check lets a NULL through, so the model's clean() is the guard that every
    # service write (full_clean) goes through.
    facility = FacilityFactory.build(
        country=CountryFactory.create(code="VN"), latitude=latitude, longitude=longitude
    )

    with pytest.raises(ValidationError) as refused:
        facility.full_clean(exclude=["search_name"])

    assert set(refused.value.message_dict) == {"latitude"}


@pytest.mark.django_db
def test_department_is_unique_per_facility_and_specialty():
    department = DepartmentFactory.create(specialty=SpecialtyFactory.create(code=PEDIATRICS))

    _refused(
        lambda: Department.objects.create(
            facility=department.facility, specialty=department.specialty, name="Second pediatrics"
        ),
        "department_one_per_facility_specialty",
    )

    DepartmentFactory.create(
        facility=department.facility, specialty=SpecialtyFactory.create(code=CARDIOLOGY)
    )
    assert Department.objects.filter(facility=department.facility).count() == 2


@pytest.mark.django_db
def test_department_sla_must_be_positive():
    _refused(lambda: DepartmentFactory.create(sla_hours=0), "department_sla_positive")


@pytest.mark.django_db
def test_area_code_is_unique_per_country_only():
    vietnam = CountryFactory.create(code="VN")
    laos = CountryFactory.create(code="LA")
    AreaFactory.create(country=vietnam, code="01")

    _refused(lambda: AreaFactory.create(country=vietnam, code="01"), "area_unique_code_per_country")

    AreaFactory.create(country=laos, code="01")
    assert AdministrativeArea.objects.filter(code="01").count() == 2


@pytest.mark.django_db
def test_area_cannot_be_its_own_parent():
    area = AreaFactory.create()
    area.parent_id = area.pk

    _refused(area.save, "area_not_own_parent")

    area.refresh_from_db()
    assert area.parent_id is None


@pytest.mark.django_db
def test_facility_cannot_be_its_own_parent():
    facility = FacilityFactory.create()
    facility.parent_id = facility.pk

    _refused(facility.save, "facility_not_own_parent")

    facility.refresh_from_db()
    assert facility.parent_id is None


@pytest.mark.django_db
@pytest.mark.parametrize("code", ["vn", "V1", "v-"])
def test_country_code_must_be_iso_alpha_2(code):
    _refused(lambda: Country.objects.create(code=code, name="Viet Nam"), "country_code_iso2")

    assert Country.objects.count() == 0


@pytest.mark.django_db
def test_facility_search_name_is_kept_in_step_with_its_names():
    facility = FacilityFactory.create(name="Bệnh viện Trung ương Huế", name_local="")

    facility.name_local = "Hue Central Hospital"
    facility.save()

    facility.refresh_from_db()
    assert facility.search_name == "benh vien trung uong hue hue central hospital"


# --- geo ----------------------------------------------------------------------------------


def _destination(lat: float, lon: float, bearing_deg: float, km: float) -> tuple[float, float]:
    """The point ``km`` away from (lat, lon) along the initial bearing (spherical Earth)."""
    p1, l1, theta = math.radians(lat), math.radians(lon), math.radians(bearing_deg)
    d = km / EARTH_RADIUS_KM
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(theta))
    l2 = l1 + math.atan2(
        math.sin(theta) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2)
    )
    return math.degrees(p2), (math.degrees(l2) + 540) % 360 - 180


def test_haversine_hanoi_to_ho_chi_minh_city_is_about_1137_km():
    assert haversine_km(*HANOI, *HO_CHI_MINH_CITY) == pytest.approx(1137, abs=5)


def test_haversine_is_symmetric_and_zero_on_the_spot():
    there = haversine_km(*HANOI, *HO_CHI_MINH_CITY)
    back = haversine_km(*HO_CHI_MINH_CITY, *HANOI)

    assert there == pytest.approx(back, rel=1e-12)
    assert haversine_km(*HANOI, *HANOI) == 0.0


def test_haversine_one_degree_on_the_equator_is_111_km():
    assert haversine_km(0, 0, 0, 1) == pytest.approx(111.195, abs=0.001)


def test_haversine_takes_the_short_way_across_the_antimeridian():
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(111.195, abs=0.001)


def test_haversine_antipodes_is_half_the_circumference():
    assert haversine_km(0, 0, 0, 180) == pytest.approx(math.pi * EARTH_RADIUS_KM, rel=1e-9)


@pytest.mark.parametrize(
    ("lat", "lon", "radius_km"),
    [(*HANOI, 100.0), (*HO_CHI_MINH_CITY, 5.0), (60.0, 10.0, 500.0), (-33.9, 18.4, 1000.0)],
)
def test_bounding_box_contains_the_whole_circle(lat, lon, radius_km):
    min_lat, max_lat, min_lon, max_lon = bounding_box(lat, lon, radius_km)

    assert min_lon is not None
    assert max_lon is not None
    for bearing in range(0, 360, 5):
        p_lat, p_lon = _destination(lat, lon, bearing, radius_km * (1 - 1e-9))
        assert min_lat <= p_lat <= max_lat, bearing
        assert min_lon <= p_lon <= max_lon, bearing


def test_bounding_box_is_tight_north_south():
    min_lat, max_lat, _, _ = bounding_box(*HANOI, 100.0)

    north, _ = _destination(*HANOI, 0, 100.0)
    south, _ = _destination(*HANOI, 180, 100.0)
    assert max_lat == pytest.approx(north, abs=1e-9)
    assert min_lat == pytest.approx(south, abs=1e-9)


def test_bounding_box_gives_up_longitudes_across_the_antimeridian():
    min_lat, max_lat, min_lon, max_lon = bounding_box(0.0, 179.9, 50.0)

    assert (min_lon, max_lon) == (None, None)
    assert min_lat == pytest.approx(-0.44966, abs=1e-5)
    assert max_lat == pytest.approx(0.44966, abs=1e-5)


@pytest.mark.parametrize(("lat", "pole"), [(89.9, 90.0), (-89.9, -90.0)])
def test_bounding_box_near_a_pole_clamps_latitude_and_drops_longitudes(lat, pole):
    min_lat, max_lat, min_lon, max_lon = bounding_box(lat, 0.0, 50.0)

    assert (min_lon, max_lon) == (None, None)
    assert pole in (min_lat, max_lat)
    assert -90.0 <= min_lat < max_lat <= 90.0


def test_bounding_box_drops_longitudes_when_the_circle_reaches_over_the_pole():
    # 2,000 km (18°) around 80°N covers the North Pole: every longitude is in reach.
    min_lat, max_lat, min_lon, max_lon = bounding_box(80.0, 0.0, 2000.0)

    assert (min_lon, max_lon) == (None, None)
    assert max_lat == 90.0
    assert min_lat == pytest.approx(80.0 - math.degrees(2000.0 / EARTH_RADIUS_KM), abs=1e-9)


@pytest.mark.django_db
def test_facilities_within_computes_haversine_km_in_sql() -> None:
    # Given facilities around Hà Nội, across the antimeridian, and one without coordinates
    points = {
        "hanoi": HANOI,
        "hcmc": HO_CHI_MINH_CITY,
        "north": _destination(*HANOI, 0, 150.0),
        "east": _destination(*HANOI, 90, 299.9),
        "west_far": _destination(*HANOI, 270, 300.1),
    }
    made = {
        name: FacilityFactory.create(latitude=lat, longitude=lon)
        for name, (lat, lon) in points.items()
    }
    FacilityFactory.create(latitude=None, longitude=None)
    across = FacilityFactory.create(latitude=0.0, longitude=-179.5)

    # When the database is asked for those within 300 km of Hà Nội, and 112 km of 0, 179.5
    near_hanoi = dict(facilities_within(*HANOI, 300.0).values_list("pk", "distance_km"))
    near_line = dict(facilities_within(0.0, 179.5, 112.0).values_list("pk", "distance_km"))

    # Then the matches and their distances are Python's haversine_km, to the last bits
    assert set(near_hanoi) == {made[n].pk for n in ("hanoi", "north", "east")}
    for name in ("hanoi", "north", "east"):
        expected = haversine_km(*HANOI, *points[name])
        assert near_hanoi[made[name].pk] == pytest.approx(expected, rel=1e-12, abs=1e-9)
    assert near_hanoi[made["north"].pk] == pytest.approx(150.0, abs=1e-6)
    assert near_line == {across.pk: pytest.approx(111.195, abs=0.001)}


@pytest.mark.django_db
def test_facility_distances_are_null_without_coordinates() -> None:
    """As documented (and as on SQLite): PostgreSQL's LEAST skips a NULL, so a facility
    without coordinates was half the globe away (pi x the Earth's radius)."""
    # Given a facility without coordinates and one at the point
    blank = FacilityFactory.create(latitude=None, longitude=None)
    here = FacilityFactory.create(latitude=HANOI[0], longitude=HANOI[1])

    # When the database computes their distances from the point
    distances = dict(facility_distances(*HANOI).values_list("pk", "distance_km"))

    # Then the one without coordinates has none
    assert distances == {blank.pk: None, here.pk: 0.0}


# --- search key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("Bệnh viện Nhi Trung ương", "benh vien nhi trung uong"),
        ("Bệnh viện Trung ương Huế", "benh vien trung uong hue"),
        ("Đà Nẵng", "da nang"),
        ("  BỆNH   VIỆN\tCHỢ RẪY \n", "benh vien cho ray"),
        ("Sở Y tế Thừa Thiên\u2013Huế", "so y te thua thien-hue"),
        ("", ""),
    ],
)
def test_search_key_folds_vietnamese_accents_case_and_spaces(text, key):
    assert search_key(text) == key


@pytest.mark.django_db
def test_database_refuses_half_a_coordinate_pair() -> None:
    facility = FacilityFactory.create(latitude=10.0, longitude=106.0)

    with pytest.raises(IntegrityError), transaction.atomic():
        Facility.objects.filter(pk=facility.pk).update(longitude=None)

    facility.refresh_from_db()
    assert (facility.latitude, facility.longitude) == (10.0, 106.0)
