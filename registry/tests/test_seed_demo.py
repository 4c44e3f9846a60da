import time
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import CommandError, call_command
from django.db.models import Count, F, Q

from accounts.models import User
from accounts.roles import Role
from registry.demo import (
    DEMO_ACCOUNTS,
    ISLAND_DISTRICTS,
    PEDIATRICS,
    SCALES,
    facilities_digest,
    network_plan,
)
from registry.models import (
    AdministrativeArea,
    AreaLevel,
    Country,
    Department,
    Endpoint,
    Facility,
    FacilityIdentifier,
    FacilityRevision,
    Practitioner,
    PractitionerRole,
    Specialty,
    SupportLink,
    Tier,
)
from registry.text import search_key

CON_DAO = "VN-77-003"  # the Côn Đảo island health centre, the demo referrer's hospital
NHI_TW = "VN-01-003"  # Bệnh viện Nhi Trung ương, the central children's hospital
HOUAPHANH = "LA-HO-001"

# The default plan's digest over (code, name, latitude, longitude). It changes only when the
# demo data is changed on purpose; update it then.
DEFAULT_DIGEST = "a6e27589d920debb0d7bf6543dc6513602e67c3a61b6fbcaea20ddeda78817cf"


@pytest.fixture
def debug(settings: Any) -> None:
    settings.DEBUG = True


def _seed(*args: str) -> str:
    out = StringIO()
    call_command("seed_demo", *args, stdout=out, verbosity=0)
    return out.getvalue()


def _db_digest() -> str:
    return facilities_digest(Facility.objects.values_list("code", "name", "latitude", "longitude"))


def _snapshot() -> dict[str, int]:
    return {
        "countries": Country.objects.count(),
        "areas": AdministrativeArea.objects.count(),
        "facilities": Facility.objects.count(),
        "identifiers": FacilityIdentifier.objects.count(),
        "revisions": FacilityRevision.objects.count(),
        "endpoints": Endpoint.objects.count(),
        "departments": Department.objects.count(),
        "practitioners": Practitioner.objects.count(),
        "roles": PractitionerRole.objects.count(),
        "links": SupportLink.objects.count(),
        "link specialties": SupportLink.specialties.through.objects.count(),
        "users": User.objects.count(),
    }


def _wipe() -> None:
    # Protected foreign keys decide the order.
    User.objects.all().delete()
    Facility.objects.all().delete()
    for level in (AreaLevel.COMMUNE, AreaLevel.DISTRICT, AreaLevel.PROVINCE):
        AdministrativeArea.objects.filter(level=level).delete()
    Practitioner.objects.all().delete()
    Country.objects.all().delete()


# --- The plan (pure Python) -----------------------------------------------------------------------


def test_plan_is_deterministic_and_pinned() -> None:
    first, second = network_plan(), network_plan()

    assert first == second
    assert first.digest() == second.digest()
    assert first.digest() == DEFAULT_DIGEST
    generated = {f.code: (f.name, f.latitude, f.longitude) for f in first.facilities}
    assert generated["VN-01-010"] == ("Trung tâm Y tế quận Trung Sơn", 20.8802, 106.03672)
    assert generated["VN-02-005"] == ("Trung tâm Y tế thị xã Bình Phú", 22.82928, 104.9203)
    assert generated["VN-96-013"] == ("Trạm Y tế xã Hoài Khánh", 9.01093, 105.24675)
    assert first.keys["con-dao"] == CON_DAO
    assert first.keys["nhi-tw"] == NHI_TW
    assert first.keys["houaphanh"] == HOUAPHANH
    assert first.keys["tho-chau"] == "VN-91-017"


def test_upper_tier_and_district_centres_are_the_same_at_every_scale() -> None:
    small, large = network_plan(SCALES["default"]), network_plan(SCALES["national"])

    def stable(plan: Any) -> list[Any]:
        return [f for f in plan.facilities if f.tier <= Tier.DISTRICT]

    assert stable(small) == stable(large)
    assert small.departments == large.departments
    assert small.keys == large.keys


def test_plan_refuses_a_scale_too_small_for_its_district_centres() -> None:
    with pytest.raises(ValueError, match="commune stations"):
        network_plan(500)


# --- The command --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_seed_builds_the_network_with_exact_counts(debug: None) -> None:
    output = _seed()

    vn = Facility.objects.filter(country__code="VN")
    assert vn.filter(tier__lte=Tier.PROVINCIAL).count() == 26
    assert vn.filter(tier=Tier.CENTRAL).count() == 8
    assert vn.filter(tier=Tier.PROVINCIAL).count() == 18
    assert vn.filter(tier=Tier.DISTRICT).count() == 704
    assert vn.filter(tier=Tier.COMMUNE).count() == 293
    assert Facility.objects.filter(country__code="LA").count() == 2
    assert Facility.objects.filter(country__code="KH").count() == 1
    lower_tier = Facility.objects.filter(Q(tier__gte=Tier.DISTRICT) | ~Q(country__code="VN"))
    assert lower_tier.count() == 1000
    assert Facility.objects.count() == 1026
    assert set(Country.objects.values_list("code", "name_local")) == {
        ("VN", "Việt Nam"),
        ("LA", "ສປປ ລາວ"),
        ("KH", "កម្ពុជា"),
    }
    assert "Built the demo network" in output
    assert "facilities: 1,026" in output


@pytest.mark.django_db
def test_every_lower_tier_hospital_has_several_hubs_and_the_upper_tier_serves(debug: None) -> None:
    _seed()

    spokes = Facility.objects.filter(Q(tier__gte=Tier.DISTRICT) | ~Q(country__code="VN")).annotate(
        hubs=Count("hub_links")
    )
    assert spokes.filter(hubs__lt=2).count() == 0
    assert SupportLink.objects.filter(hub__tier__gte=Tier.DISTRICT).count() == 0
    for hub in Facility.objects.filter(country__code="VN", tier__lte=Tier.PROVINCIAL):
        assert hub.departments.filter(accepting=True).exists(), hub.name
        assert hub.endpoints.get().base_url == f"http://127.0.0.1:8100/fhir/{hub.code}"
        assert "vi" in hub.languages
    versions = set(Endpoint.objects.values_list("fhir_version", flat=True))
    assert versions == {"4.0", "5.0"}
    # Every domestic link's specialties are offered by its hub.
    for link in SupportLink.objects.prefetch_related("specialties").select_related("hub")[:300]:
        offered = set(link.hub.departments.values_list("specialty__code", flat=True))
        assert {s.code for s in link.specialties.all()} <= offered


@pytest.mark.django_db
def test_cross_border_links_carry_agreements(debug: None) -> None:
    _seed()

    cross = SupportLink.objects.filter(is_cross_border=True)
    assert cross.count() == 8
    assert set(cross.values_list("spoke__country__code", flat=True)) == {"LA", "KH"}
    assert set(cross.values_list("hub__country__code", flat=True)) == {"VN"}
    assert not cross.filter(agreement_reference="").exists()
    assert cross.filter(identifiable_data_allowed=False).exists()
    # bulk_create bypasses SupportLink.save(): the stored flag must still match the countries.
    mislabelled = [
        link
        for link in SupportLink.objects.select_related("hub", "spoke")
        if link.is_cross_border != (link.hub.country_id != link.spoke.country_id)
    ]
    assert mislabelled == []
    # No hub is of a lower tier than a spoke it supports (the services refuse such a link).
    upside_down = SupportLink.objects.filter(hub__tier__gt=F("spoke__tier"))
    assert upside_down.count() == 0
    assert SupportLink.objects.filter(hub__tier__lt=F("spoke__tier")).exists()
    lao = Facility.objects.get(code=HOUAPHANH)
    assert lao.name == "Houaphanh Provincial Hospital"
    assert lao.name_local == "ໂຮງໝໍແຂວງຫົວພັນ"
    assert lao.languages == ["lo"]
    assert lao.province is not None and lao.province.name == "Houaphanh"
    ratanakiri = Facility.objects.get(country__code="KH")
    assert ratanakiri.name == "Ratanakiri Provincial Referral Hospital"
    assert ratanakiri.languages == ["km"]


@pytest.mark.django_db
def test_islands_are_remote_and_real(debug: None) -> None:
    _seed()

    con_dao = Facility.objects.get(code=CON_DAO)
    assert con_dao.name == "Trung tâm Y tế Quân–Dân y Côn Đảo"  # noqa: RUF001
    assert (con_dao.latitude, con_dao.longitude) == (8.6826, 106.6083)
    assert con_dao.area is not None and con_dao.area.name == "Huyện Côn Đảo"
    assert con_dao.province is not None and con_dao.province.name == "Bà Rịa – Vũng Tàu"  # noqa: RUF001
    islands = Facility.objects.filter(name__in=[i.hospital for i in ISLAND_DISTRICTS])
    assert islands.count() == len(ISLAND_DISTRICTS) >= 5
    assert not islands.filter(is_remote=False).exists()
    assert Facility.objects.get(name="Trạm Y tế xã Thổ Châu").is_remote


@pytest.mark.django_db
def test_bulk_inserted_facilities_have_derived_fields(debug: None) -> None:
    _seed()

    for facility in Facility.objects.select_related("province", "area")[:200]:
        assert facility.search_name == search_key(f"{facility.name} {facility.name_local}")
        assert facility.province is not None and facility.province.level == AreaLevel.PROVINCE
        assert facility.area is not None
    assert not Facility.objects.filter(Q(province__isnull=True) | Q(area__isnull=True)).exists()
    commune = Facility.objects.filter(tier=Tier.COMMUNE).select_related("parent", "area").first()
    assert commune is not None and commune.parent is not None
    assert commune.parent.tier == Tier.DISTRICT
    assert commune.area is not None and commune.area.level == AreaLevel.COMMUNE
    assert FacilityIdentifier.objects.get(facility__code=CON_DAO).value == "77-003"


@pytest.mark.django_db
def test_every_seeded_facility_has_one_seed_revision_of_what_it_was_created_with(
    debug: None,
) -> None:
    """registry.md: every facility change leaves a revision (source seed included); the
    seed wrote none."""
    _seed()

    assert FacilityRevision.objects.count() == Facility.objects.count() == 1026
    assert set(FacilityRevision.objects.values_list("source", flat=True)) == {"seed"}
    con_dao = Facility.objects.get(code=CON_DAO)
    revision = FacilityRevision.objects.get(facility=con_dao)
    assert revision.changed_by is None
    # A created facility's changes start from null; fields without a value (no parent)
    # are left out, as the importer does.
    assert revision.changes == {
        "code": [None, CON_DAO],
        "name": [None, con_dao.name],
        "name_local": [None, ""],
        "country_id": [None, con_dao.country_id],
        "area_id": [None, con_dao.area_id],
        "tier": [None, 3],
        "facility_type": [None, "district health centre"],
        "ownership": [None, "public"],
        "operational_status": [None, "active"],
        "latitude": [None, 8.6826],
        "longitude": [None, 106.6083],
        "languages": [None, ["vi"]],
        "beds": [None, 150],
        "is_remote": [None, True],
        "identifiers": [None, ["https://moh.gov.vn/facility-code|77-003"]],
    }


@pytest.mark.django_db
def test_demo_accounts_have_their_roles_facilities_and_password(debug: None) -> None:
    _seed()

    for spec in DEMO_ACCOUNTS:
        user = User.objects.get(username=spec.username)
        assert user.check_password("demo"), spec.username
        assert list(user.groups.values_list("name", flat=True)) == [str(spec.role)]
    referrer = User.objects.get(username="demo-referrer")
    assert referrer.facility is not None
    assert referrer.facility.code == CON_DAO
    assert referrer.facility.is_remote and referrer.facility.tier == Tier.DISTRICT
    assert referrer.facility.hub_links.filter(
        hub__code=NHI_TW, specialties__code=PEDIATRICS
    ).exists()

    lao = User.objects.get(username="demo-referrer-lao")
    assert lao.facility is not None and lao.facility.country.code == "LA"
    assert lao.facility.hub_links.filter(is_cross_border=True).exclude(agreement_reference="")

    consultant = User.objects.get(username="demo-consultant")
    assert consultant.facility is not None
    assert consultant.facility.name == "Bệnh viện Nhi Trung ương"
    assert consultant.facility.tier == Tier.CENTRAL
    department = consultant.departments.get()
    assert department.facility_id == consultant.facility.pk
    assert department.specialty.code == PEDIATRICS
    assert department.accepting
    role = PractitionerRole.objects.get(practitioner__user=consultant)
    assert (role.department, role.code) == (department, PractitionerRole.Code.CONSULTANT)

    assert User.objects.get(username="demo-coordinator").has_role(Role.COORDINATOR)
    assert User.objects.get(username="demo-ministry").facility is None
    assert User.objects.get(username="demo-steward").has_role(Role.REGISTRY_STEWARD)
    for username in ("demo-facility-admin", "demo-member-system"):
        user = User.objects.get(username=username)
        assert user.facility == referrer.facility
    # The FHIR examples' two sides: the island's system, and the children's hospital's,
    # working in its paediatrics department; a counter-referral comes back to the island's
    # own paediatric ward.
    hub_system = User.objects.get(username="demo-member-system-hub")
    assert hub_system.has_role(Role.MEMBER_SYSTEM)
    assert list(hub_system.departments.all()) == [department]
    back = referrer.facility.departments.get()
    assert (back.specialty.code, back.accepting, back.offers_async) == (PEDIATRICS, True, True)
    # ... where the island's system works too, so it sees the counter-referrals.
    island_system = User.objects.get(username="demo-member-system")
    assert list(island_system.departments.all()) == [back]


@pytest.mark.django_db
def test_second_run_changes_nothing(debug: None) -> None:
    _seed()
    before = _snapshot()
    digest = _db_digest()

    output = _seed()

    assert _snapshot() == before
    assert _db_digest() == digest
    assert "already exists" in output


@pytest.mark.django_db
def test_second_run_repairs_demo_accounts(debug: None) -> None:
    _seed()
    User.objects.get(username="demo-steward").delete()
    consultant = User.objects.get(username="demo-consultant")
    consultant.groups.set([Group.objects.get(name=str(Role.MINISTRY))])

    output = _seed()

    assert User.objects.get(username="demo-steward").check_password("demo")
    assert list(consultant.groups.values_list("name", flat=True)) == [str(Role.CONSULTANT)]
    assert "Created demo accounts: demo-steward" in output


@pytest.mark.django_db
def test_refused_when_debug_is_off(settings: Any) -> None:
    settings.DEBUG = False
    before = _snapshot()  # django-guardian's AnonymousUser exists already

    with pytest.raises(CommandError, match="DEBUG is off"):
        _seed()

    assert _snapshot() == before
    assert before["facilities"] == before["countries"] == 0
    assert not User.objects.filter(username__startswith="demo-").exists()
    assert Specialty.objects.count() == 0
    assert Group.objects.count() == 0


@pytest.mark.django_db
def test_same_seed_gives_the_same_network_in_a_fresh_database(debug: None) -> None:
    _seed()
    first = _db_digest()
    _wipe()
    assert Facility.objects.count() == 0

    _seed()

    assert _db_digest() == first == network_plan().digest()


@pytest.mark.slow
@pytest.mark.django_db
def test_national_scale(debug: None) -> None:
    started = time.monotonic()

    _seed("--scale", "national")

    elapsed = time.monotonic() - started
    assert Facility.objects.count() == 14_000
    assert Facility.objects.filter(country__code="VN", tier__lte=Tier.PROVINCIAL).count() == 26
    assert Facility.objects.filter(tier=Tier.COMMUNE).count() == 13_267
    assert SupportLink.objects.count() == len(network_plan(SCALES["national"]).links)
    assert _db_digest() == network_plan(SCALES["national"]).digest()
    assert User.objects.filter(username__startswith="demo-").count() == len(DEMO_ACCOUNTS)
    assert elapsed < 60
