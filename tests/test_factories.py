"""The shared factories build rows the registry itself would accept."""

import pytest
from django.contrib.auth.models import Group

from accounts.roles import Role
from registry.models import AreaLevel, Country, Specialty, Tier
from registry.permissions import is_steward
from tests.factories import (
    CARDIOLOGY,
    PEDIATRICS,
    AreaFactory,
    ChangeRequestFactory,
    CountryFactory,
    DepartmentFactory,
    EndpointFactory,
    FacilityFactory,
    FacilityIdentifierFactory,
    PractitionerRoleFactory,
    SpecialtyFactory,
    SupportLinkFactory,
    UserFactory,
    specialties_load,
)

pytestmark = pytest.mark.django_db


def test_every_factory_builds_a_row_that_passes_model_validation():
    rows = [
        CountryFactory.create(),
        AreaFactory.create(),
        FacilityFactory.create(),
        FacilityIdentifierFactory.create(),
        SpecialtyFactory.create(),
        DepartmentFactory.create(),
        UserFactory.create(),
        PractitionerRoleFactory.create(),
        EndpointFactory.create(),
        SupportLinkFactory.create(),
        ChangeRequestFactory.create(),
    ]

    for row in rows:
        row.full_clean()


def test_facility_follows_its_area_for_country_and_province():
    laos = CountryFactory.create(code="LA", name="Lao PDR")
    province = AreaFactory.create(country=laos, name="Vientiane Capital")
    district = AreaFactory.create(parent=province, name="Chanthabouly")

    facility = FacilityFactory.create(area=district)

    assert district.level == AreaLevel.DISTRICT
    assert district.country == laos
    assert facility.country == laos
    assert facility.province == province


def test_default_facilities_share_one_country():
    first, second = FacilityFactory.create(), FacilityFactory.create()

    assert first.country.code == "VN"
    assert second.country_id == first.country_id
    assert Country.objects.count() == 1
    assert first.tier == Tier.PROVINCIAL


def test_specialty_factory_gets_or_creates_by_code():
    first = SpecialtyFactory.create(code=PEDIATRICS)
    again = SpecialtyFactory.create(code=PEDIATRICS)

    assert again.pk == first.pk
    assert first.display == "Pediatric specialty"
    assert Specialty.objects.count() == 1


def test_specialties_load_is_idempotent():
    SpecialtyFactory.create(code=CARDIOLOGY)

    loaded = specialties_load()
    specialties_load()

    assert Specialty.objects.count() == len(loaded)
    assert Specialty.objects.get(code=CARDIOLOGY).display == "Cardiology"


def test_user_roles_become_groups_and_count_for_permissions():
    steward = UserFactory.create(roles=[Role.REGISTRY_STEWARD, Role.REFERRER])
    plain = UserFactory.create()

    assert set(steward.groups.values_list("name", flat=True)) == {"registry-steward", "referrer"}
    assert steward.has_role(Role.REGISTRY_STEWARD)
    assert is_steward(steward)
    assert not is_steward(plain)
    assert Group.objects.count() == len(Role)


def test_support_link_specialties_post_generation():
    pediatrics = SpecialtyFactory.create(code=PEDIATRICS)

    link = SupportLinkFactory.create(specialties=[pediatrics])

    assert list(link.specialties.all()) == [pediatrics]
    assert link.hub.tier == Tier.CENTRAL
    assert link.spoke.tier == Tier.DISTRICT
    assert link.is_cross_border is False


def test_change_request_factory_is_proposed_by_the_facilitys_admin():
    change_request = ChangeRequestFactory.create()

    assert change_request.proposed_by.facility == change_request.facility
    assert change_request.proposed_by.has_role(Role.FACILITY_ADMIN)
    assert change_request.status == "pending"


def test_role_clients_authenticate_with_a_real_bearer_token(
    steward, steward_client, anonymous_client
):
    me = steward_client.get("/api/v1/specialties/")
    nobody = anonymous_client.get("/api/v1/specialties/")

    assert me.status_code == 200
    token = steward.api_tokens.get()
    assert token.last_used_at is not None  # the request authenticated with this token
    assert nobody.status_code == 401
