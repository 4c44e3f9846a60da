"""The registry REST API: who may do what, validation, filters, distance search, query counts."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.forms.models import model_to_dict
from django.test.utils import CaptureQueriesContext

from registry.geo import haversine_km
from registry.models import (
    AdministrativeArea,
    ChangeRequest,
    Country,
    Department,
    Endpoint,
    Facility,
    FacilityIdentifier,
    FacilityRevision,
    OperationalStatus,
    Practitioner,
    Specialty,
    SupportLink,
    Tier,
)
from tests.factories import (
    CARDIOLOGY,
    NEUROLOGY,
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
)

pytestmark = pytest.mark.django_db

API = "/api/v1"
MOH = "https://moh.gov.vn/facility-code"
HANOI = (21.0285, 105.8542)
READERS = ["referrer", "consultant", "ministry"]


# --- a small registry ---------------------------------------------------------------------


@dataclass
class World:
    vietnam: Country
    laos: Country
    hanoi: AdministrativeArea
    ba_dinh: AdministrativeArea
    vientiane: AdministrativeArea
    pediatrics: Specialty
    cardiology: Specialty
    hub: Facility
    spoke: Facility
    department: Department
    endpoint: Endpoint
    link: SupportLink
    practitioner: Practitioner
    change_request: ChangeRequest


@pytest.fixture
def world(db) -> World:
    vietnam = CountryFactory.create(code="VN", name="Viet Nam", name_local="Việt Nam")
    laos = CountryFactory.create(code="LA", name="Lao PDR")
    hanoi = AreaFactory.create(country=vietnam, code="01", name="Hà Nội")
    ba_dinh = AreaFactory.create(parent=hanoi, code="001", name="Ba Đình")
    vientiane = AreaFactory.create(country=laos, code="01", name="Vientiane Capital")
    pediatrics = SpecialtyFactory.create(code=PEDIATRICS)
    cardiology = SpecialtyFactory.create(code=CARDIOLOGY)
    hub = FacilityFactory.create(
        code="VN-HUB",
        name="Bệnh viện Nhi Trung ương",
        tier=Tier.CENTRAL,
        area=ba_dinh,
        latitude=21.0245,
        longitude=105.8012,
    )
    spoke = FacilityFactory.create(
        code="VN-SPOKE", name="Trung tâm Y tế huyện Mê Linh", tier=Tier.DISTRICT
    )
    department = DepartmentFactory.create(facility=hub, specialty=pediatrics, name="Khoa Nhi")
    role = PractitionerRoleFactory.create(department=department)
    return World(
        vietnam=vietnam,
        laos=laos,
        hanoi=hanoi,
        ba_dinh=ba_dinh,
        vientiane=vientiane,
        pediatrics=pediatrics,
        cardiology=cardiology,
        hub=hub,
        spoke=spoke,
        department=department,
        endpoint=EndpointFactory.create(facility=hub, base_url="https://fhir.nhp.example.org/fhir"),
        link=SupportLinkFactory.create(hub=hub, spoke=spoke, specialties=[pediatrics]),
        practitioner=role.practitioner,
        change_request=ChangeRequestFactory.create(facility=spoke),
    )


def _client(request, role: str):
    return request.getfixturevalue(f"{role}_client")


def _snapshot(instance) -> dict[str, Any]:
    instance.refresh_from_db()
    return model_to_dict(instance)


# --- the permission matrix ----------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    name: str
    model: type
    detail: Callable[[World], Any]  # the lookup value of one row
    create: Callable[[World], dict[str, Any]] | None  # None: read-only resource
    change: Callable[[World], dict[str, Any]] | None


RESOURCES = [
    Resource("countries", Country, lambda w: w.vietnam.code, None, None),
    Resource("areas", AdministrativeArea, lambda w: w.hanoi.pk, None, None),
    Resource("specialties", Specialty, lambda w: w.pediatrics.code, None, None),
    Resource(
        "facilities",
        Facility,
        lambda w: w.hub.pk,
        lambda w: {"code": "VN-NEW", "name": "Bệnh viện mới", "country": "VN", "tier": 3},
        lambda w: {"name": "Renamed"},
    ),
    Resource(
        "departments",
        Department,
        lambda w: w.department.pk,
        lambda w: {
            "facility": w.hub.pk,
            "specialty": CARDIOLOGY,
            "name": "Khoa Tim mạch",
            "modes": ["async"],
        },
        lambda w: {"accepting": False},
    ),
    Resource("practitioners", Practitioner, lambda w: w.practitioner.pk, None, None),
    Resource(
        "endpoints",
        Endpoint,
        lambda w: w.endpoint.pk,
        lambda w: {"facility": w.spoke.pk, "base_url": "https://fhir.spoke.example.org/fhir"},
        lambda w: {"status": "suspended"},
    ),
    Resource(
        "support-links",
        SupportLink,
        lambda w: w.link.pk,
        lambda w: {
            "hub": w.hub.pk,
            "spoke": FacilityFactory.create(tier=Tier.COMMUNE).pk,
            "specialties": [CARDIOLOGY],
        },
        lambda w: {"active": False},
    ),
]
WRITABLE = [r for r in RESOURCES if r.create is not None]
READ_ONLY = [r for r in RESOURCES if r.create is None]


def _by_name(resources: list[Resource]):
    return pytest.mark.parametrize("resource", resources, ids=[r.name for r in resources])


@_by_name(RESOURCES)
def test_anonymous_gets_401_on_list_detail_and_write(world, anonymous_client, resource):
    before = resource.model.objects.count()
    detail = f"{API}/{resource.name}/{resource.detail(world)}/"

    responses = [
        anonymous_client.get(f"{API}/{resource.name}/"),
        anonymous_client.get(detail),
        anonymous_client.post(f"{API}/{resource.name}/", {}, format="json"),
        anonymous_client.patch(detail, {}, format="json"),
    ]

    assert [r.status_code for r in responses] == [401, 401, 401, 401]
    assert responses[0].json()["code"] == "not_authenticated"
    assert responses[0]["WWW-Authenticate"] == "Bearer"
    assert resource.model.objects.count() == before


@pytest.mark.parametrize(
    "path",
    [
        "change-requests/",
        "departments/nearby/?specialty=394537008&lat=21&lon=105",
        "facilities/{hub}/revisions/",
    ],
)
def test_anonymous_gets_401_on_the_other_registry_endpoints(world, anonymous_client, path):
    before = ChangeRequest.objects.count()

    response = anonymous_client.get(f"{API}/{path.format(hub=world.hub.pk)}")
    posted = anonymous_client.post(
        f"{API}/change-requests/", {"payload": {"name": "x"}}, format="json"
    )

    assert response.status_code == 401
    assert posted.status_code == 401
    assert ChangeRequest.objects.count() == before


@pytest.mark.parametrize("role", [*READERS, "coordinator", "facility_admin", "steward"])
@_by_name(RESOURCES)
def test_every_authenticated_role_reads_list_and_detail(request, world, role, resource):
    client = _client(request, role)

    listed = client.get(f"{API}/{resource.name}/")
    detail = client.get(f"{API}/{resource.name}/{resource.detail(world)}/")

    assert listed.status_code == 200
    assert listed.json()["count"] == resource.model.objects.count()
    assert detail.status_code == 200


@pytest.mark.parametrize("role", [*READERS, "facility_admin"])
@_by_name(WRITABLE)
def test_non_stewards_cannot_create_and_nothing_is_created(request, world, role, resource):
    client = _client(request, role)
    before = resource.model.objects.count()
    revisions = FacilityRevision.objects.count()

    response = client.post(f"{API}/{resource.name}/", resource.create(world), format="json")

    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"
    assert resource.model.objects.count() == before
    assert FacilityRevision.objects.count() == revisions


@pytest.mark.parametrize("role", [*READERS, "facility_admin"])
@pytest.mark.parametrize("method", ["patch", "put"])
@_by_name(WRITABLE)
def test_non_stewards_cannot_update_and_nothing_changes(request, world, role, method, resource):
    client = _client(request, role)
    row = resource.model.objects.get(pk=resource.detail(world))
    before = _snapshot(row)
    url = f"{API}/{resource.name}/{row.pk}/"

    response = getattr(client, method)(url, resource.create(world), format="json")

    assert response.status_code == 403
    assert _snapshot(row) == before
    assert FacilityRevision.objects.count() == 0


@pytest.mark.parametrize("role", ["steward", *READERS])
@_by_name(READ_ONLY)
def test_read_only_resources_refuse_writes_even_from_stewards(request, world, role, resource):
    client = _client(request, role)
    before = resource.model.objects.count()
    detail = f"{API}/{resource.name}/{resource.detail(world)}/"

    posted = client.post(f"{API}/{resource.name}/", {"code": "KH", "name": "x"}, format="json")
    patched = client.patch(detail, {"name": "x"}, format="json")

    assert posted.status_code == 405
    assert patched.status_code == 405
    assert resource.model.objects.count() == before


@_by_name(WRITABLE)
def test_steward_creates_201_and_updates_200(world, steward_client, resource):
    before = resource.model.objects.count()

    created = steward_client.post(f"{API}/{resource.name}/", resource.create(world), format="json")
    assert created.status_code == 201, created.json()
    assert resource.model.objects.count() == before + 1
    row = resource.model.objects.get(pk=created.json()["id"])

    change = resource.change(world)
    updated = steward_client.patch(f"{API}/{resource.name}/{row.pk}/", change, format="json")

    assert updated.status_code == 200, updated.json()
    for field, value in change.items():
        assert updated.json()[field] == value
        assert getattr(resource.model.objects.get(pk=row.pk), field) == value


@_by_name(RESOURCES)
def test_delete_is_not_offered_and_nothing_is_deleted(world, steward_client, resource):
    before = resource.model.objects.count()

    response = steward_client.delete(f"{API}/{resource.name}/{resource.detail(world)}/")

    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
    assert resource.model.objects.count() == before


def test_change_requests_cannot_be_deleted(world, steward_client):
    response = steward_client.delete(f"{API}/change-requests/{world.change_request.pk}/")

    assert response.status_code == 405
    assert ChangeRequest.objects.filter(pk=world.change_request.pk).exists()


@pytest.mark.parametrize("role", READERS)
def test_readers_read_nearby_revisions_and_own_change_requests(request, world, role):
    client = _client(request, role)

    nearby = client.get(f"{API}/departments/nearby/?specialty={PEDIATRICS}&lat=21.03&lon=105.85")
    revisions = client.get(f"{API}/facilities/{world.hub.pk}/revisions/")
    change_requests = client.get(f"{API}/change-requests/")

    assert nearby.status_code == 200
    assert [d["facility_code"] for d in nearby.json()] == ["VN-HUB"]
    assert revisions.status_code == 200
    assert change_requests.status_code == 200
    assert change_requests.json()["count"] == 0  # only their own, and they proposed nothing


@pytest.mark.parametrize("role", READERS)
def test_readers_cannot_propose_changes_and_nothing_is_created(request, world, role):
    client = _client(request, role)

    response = client.post(
        f"{API}/change-requests/",
        {"facility": world.hub.pk, "payload": {"name": "Hijacked"}},
        format="json",
    )

    assert response.status_code == 403
    assert ChangeRequest.objects.count() == 1
    world.hub.refresh_from_db()
    assert world.hub.name == "Bệnh viện Nhi Trung ương"


def test_steward_lists_every_change_request_and_may_propose(world, steward_client):
    created = steward_client.post(
        f"{API}/change-requests/",
        {"facility": world.hub.pk, "payload": {"beds": 1500}},
        format="json",
    )
    listed = steward_client.get(f"{API}/change-requests/")

    assert created.status_code == 201
    assert created.json()["status"] == "pending"
    assert listed.json()["count"] == 2


# --- facility writes and their revisions --------------------------------------------------


def test_steward_creates_a_facility_with_a_revision_of_every_field(world, steward, steward_client):
    payload = {
        "code": "VN-01-920",
        "name": "Bệnh viện Bạch Mai",
        "country": "VN",
        "area": world.ba_dinh.pk,
        "tier": 1,
        "latitude": 21.0009,
        "longitude": 105.8409,
        "languages": ["vi", "en"],
        "beds": 3200,
        "identifiers": [{"system": MOH, "value": "01-920"}],
    }

    response = steward_client.post(f"{API}/facilities/", payload, format="json")

    assert response.status_code == 201, response.json()
    body = response.json()
    facility = Facility.objects.get(code="VN-01-920")
    assert body["id"] == facility.pk
    assert body["country"] == "VN"
    assert body["area"] == {"id": world.ba_dinh.pk, "name": "Ba Đình"}
    assert body["province"] == {"id": world.hanoi.pk, "name": "Hà Nội"}
    assert body["identifiers"] == [{"system": MOH, "value": "01-920"}]
    assert facility.search_name == "benh vien bach mai"
    revision = FacilityRevision.objects.get(facility=facility)
    assert revision.source == "api"
    assert revision.changed_by == steward
    assert revision.change_request is None
    assert revision.changes == {
        "code": [None, "VN-01-920"],
        "name": [None, "Bệnh viện Bạch Mai"],
        "name_local": [None, ""],
        "country_id": [None, world.vietnam.pk],
        "area_id": [None, world.ba_dinh.pk],
        "tier": [None, 1],
        "facility_type": [None, ""],
        "ownership": [None, "public"],
        "operational_status": [None, "active"],
        "latitude": [None, 21.0009],
        "longitude": [None, 105.8409],
        "languages": [None, ["vi", "en"]],
        "beds": [None, 3200],
        "is_remote": [None, False],
        "identifiers": [None, [f"{MOH}|01-920"]],  # as the importer records them
    }


def test_steward_update_records_exactly_what_changed(world, steward, steward_client):
    response = steward_client.patch(
        f"{API}/facilities/{world.spoke.pk}/",
        {"name": "Trung tâm Y tế Mê Linh", "tier": 2, "latitude": 21.18, "longitude": 105.72},
        format="json",
    )

    assert response.status_code == 200, response.json()
    assert response.json()["name"] == "Trung tâm Y tế Mê Linh"
    revision = FacilityRevision.objects.get(facility=world.spoke)
    assert revision.changed_by == steward
    assert revision.source == "api"
    assert revision.changes == {
        "name": ["Trung tâm Y tế huyện Mê Linh", "Trung tâm Y tế Mê Linh"],
        "tier": [3, 2],
        "latitude": [None, 21.18],
        "longitude": [None, 105.72],
    }
    history = steward_client.get(f"{API}/facilities/{world.spoke.pk}/revisions/").json()
    assert [r["id"] for r in history["results"]] == [revision.pk]
    assert history["results"][0]["changed_by"] == "steward"


def test_update_that_changes_nothing_writes_no_revision(world, steward_client):
    response = steward_client.patch(
        f"{API}/facilities/{world.spoke.pk}/", {"name": world.spoke.name}, format="json"
    )

    assert response.status_code == 200
    assert FacilityRevision.objects.count() == 0


def test_moving_a_facility_to_another_area_updates_its_province(world, steward_client):
    ha_giang = AreaFactory.create(country=world.vietnam, code="02", name="Hà Giang")

    response = steward_client.patch(
        f"{API}/facilities/{world.hub.pk}/", {"area": ha_giang.pk}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["province"] == {"id": ha_giang.pk, "name": "Hà Giang"}
    assert FacilityRevision.objects.get(facility=world.hub).changes == {
        "area_id": [world.ba_dinh.pk, ha_giang.pk]
    }


def test_identifiers_are_replaced_as_a_set(world, steward_client):
    FacilityIdentifierFactory.create(facility=world.hub, system=MOH, value="01-001")
    FacilityIdentifierFactory.create(facility=world.hub, system="https://who.int/hfr", value="H1")

    response = steward_client.patch(
        f"{API}/facilities/{world.hub.pk}/",
        {"identifiers": [{"system": MOH, "value": "01-002"}]},
        format="json",
    )

    assert response.status_code == 200
    assert response.json()["identifiers"] == [{"system": MOH, "value": "01-002"}]
    assert list(FacilityIdentifier.objects.values_list("system", "value")) == [(MOH, "01-002")]


# --- validation: 400 with field errors, 409 on conflicts, never 500 -----------------------


def _facility(**changes: Any) -> dict[str, Any]:
    return {"code": "VN-NEW", "name": "Bệnh viện mới", "country": "VN", "tier": 2, **changes}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (_facility(tier=9), "tier"),
        (_facility(tier="central"), "tier"),
        (_facility(latitude=21.0), "latitude"),
        (_facility(longitude=105.0), "latitude"),
        (_facility(latitude=91, longitude=105.0), "latitude"),
        (_facility(latitude=21.0, longitude=181), "longitude"),
        (_facility(latitude="NaN", longitude=105.0), "latitude"),
        (_facility(latitude=21.0, longitude="Infinity"), "longitude"),
        (_facility(country="XX"), "country"),
        (_facility(country=None), "country"),
        (_facility(code="has spaces"), "code"),
        (_facility(beds=-1), "beds"),
        (_facility(languages=["Vietnamese"]), "languages"),
        (_facility(parent="NO-SUCH-CODE"), "parent"),
        (_facility(identifiers=[{"system": MOH}]), "identifiers"),
        (
            _facility(identifiers=[{"system": MOH, "value": "1"}, {"system": MOH, "value": "2"}]),
            "identifiers",
        ),
        ({"name": "No code, no country, no tier"}, "code"),
    ],
)
def test_invalid_facility_is_400_with_the_field_named(world, steward_client, payload, field):
    response = steward_client.post(f"{API}/facilities/", payload, format="json")

    assert response.status_code == 400
    body = response.json()
    assert body["status"] == 400
    assert body["code"] == "invalid"
    assert field in body["detail"]
    assert Facility.objects.count() == 2
    assert FacilityRevision.objects.count() == 0


def test_area_of_another_country_is_400(world, steward_client):
    response = steward_client.post(
        f"{API}/facilities/", _facility(area=world.vientiane.pk), format="json"
    )

    assert response.status_code == 400
    assert response.json()["detail"] == {"area": ["The area is in another country."]}
    assert Facility.objects.count() == 2


def test_update_to_area_of_another_country_is_400_and_nothing_changes(world, steward_client):
    before = _snapshot(world.hub)

    response = steward_client.patch(
        f"{API}/facilities/{world.hub.pk}/", {"area": world.vientiane.pk}, format="json"
    )

    assert response.status_code == 400
    assert list(response.json()["detail"]) == ["area"]
    assert _snapshot(world.hub) == before


def test_update_with_half_a_coordinate_pair_is_400(world, steward_client):
    response = steward_client.patch(
        f"{API}/facilities/{world.spoke.pk}/", {"latitude": 21.1}, format="json"
    )

    assert response.status_code == 400
    assert list(response.json()["detail"]) == ["latitude"]
    world.spoke.refresh_from_db()
    assert world.spoke.latitude is None


def test_facility_cannot_become_its_own_parent(world, steward_client):
    response = steward_client.patch(
        f"{API}/facilities/{world.hub.pk}/", {"parent": "VN-HUB"}, format="json"
    )

    assert response.status_code == 400
    assert list(response.json()["detail"]) == ["parent"]


def test_malformed_json_is_400_parse_error(world, steward_client):
    response = steward_client.post(
        f"{API}/facilities/", data='{"code": "VN-NEW", ', content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json()["code"] == "parse_error"
    assert Facility.objects.count() == 2


def test_duplicate_code_is_409(world, steward_client):
    response = steward_client.post(f"{API}/facilities/", _facility(code="VN-HUB"), format="json")

    assert response.status_code == 409
    assert response.json()["code"] == "conflict"
    assert Facility.objects.count() == 2


def test_renaming_code_to_a_taken_one_is_409_and_nothing_changes(world, steward_client):
    before = _snapshot(world.spoke)

    response = steward_client.patch(
        f"{API}/facilities/{world.spoke.pk}/", {"code": "VN-HUB"}, format="json"
    )

    assert response.status_code == 409
    assert response.json()["code"] == "conflict"
    assert _snapshot(world.spoke) == before


def test_duplicate_identifier_is_409_and_nothing_is_created(world, steward_client):
    FacilityIdentifierFactory.create(facility=world.hub, system=MOH, value="01-001")

    response = steward_client.post(
        f"{API}/facilities/",
        _facility(identifiers=[{"system": MOH, "value": "01-001"}]),
        format="json",
    )

    assert response.status_code == 409
    assert response.json()["code"] == "conflict"
    assert "01-001" in response.json()["detail"]
    assert Facility.objects.count() == 2
    assert FacilityRevision.objects.count() == 0


def test_department_duplicate_is_409_and_no_mode_is_400(world, steward_client):
    duplicate = steward_client.post(
        f"{API}/departments/",
        {"facility": world.hub.pk, "specialty": PEDIATRICS, "name": "Nhi 2", "modes": ["async"]},
        format="json",
    )
    no_mode = steward_client.post(
        f"{API}/departments/",
        {"facility": world.hub.pk, "specialty": CARDIOLOGY, "name": "Tim", "modes": []},
        format="json",
    )
    unknown = steward_client.post(
        f"{API}/departments/",
        {"facility": world.hub.pk, "specialty": "000", "name": "?", "modes": ["async"]},
        format="json",
    )

    assert duplicate.status_code == 409
    assert no_mode.status_code == 400
    assert list(no_mode.json()["detail"]) == ["modes"]
    assert unknown.status_code == 400
    assert list(unknown.json()["detail"]) == ["specialty"]
    assert Department.objects.count() == 1


def test_department_update_sets_modes(world, steward_client):
    response = steward_client.patch(
        f"{API}/departments/{world.department.pk}/", {"modes": ["live", "transfer"]}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["modes"] == ["live", "transfer"]
    world.department.refresh_from_db()
    assert (
        world.department.offers_async,
        world.department.offers_live,
        world.department.offers_transfer,
    ) == (False, True, True)


def test_support_link_to_itself_is_400(world, steward_client):
    response = steward_client.post(
        f"{API}/support-links/", {"hub": world.hub.pk, "spoke": world.hub.pk}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["code"] == "self_link"
    assert SupportLink.objects.count() == 1


def test_support_link_from_a_lower_tier_hub_is_400_and_nothing_changes(world, steward_client):
    response = steward_client.post(
        f"{API}/support-links/", {"hub": world.spoke.pk, "spoke": world.hub.pk}, format="json"
    )
    peer = FacilityFactory.create(code="VN-PEER", tier=Tier.DISTRICT)
    same_tier = steward_client.post(
        f"{API}/support-links/", {"hub": peer.pk, "spoke": world.spoke.pk}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["code"] == "hub_below_spoke"
    assert "tier 3" in response.json()["detail"]
    assert same_tier.status_code == 201, same_tier.json()  # a peer of the same tier may support
    assert SupportLink.objects.filter(hub=world.spoke).count() == 0


def test_tier_change_that_puts_a_hub_below_its_spoke_is_409_and_nothing_changes(
    world, steward_client
):
    before = _snapshot(Facility.objects.get(pk=world.spoke.pk))
    url = f"{API}/facilities/"

    demoted = steward_client.patch(f"{url}{world.hub.pk}/", {"tier": Tier.COMMUNE}, format="json")
    level = steward_client.patch(f"{url}{world.hub.pk}/", {"tier": Tier.DISTRICT}, format="json")
    promoted = steward_client.patch(
        f"{url}{world.spoke.pk}/", {"tier": Tier.PROVINCIAL}, format="json"
    )

    assert demoted.status_code == 409
    assert demoted.json()["code"] == "hub_below_spoke"
    assert f"#{world.link.pk}" in demoted.json()["detail"]
    assert level.status_code == 200  # the hub may come down to its spoke's tier
    assert Facility.objects.get(pk=world.hub.pk).tier == Tier.DISTRICT
    assert promoted.status_code == 409
    assert _snapshot(Facility.objects.get(pk=world.spoke.pk)) == before
    assert FacilityRevision.objects.filter(facility=world.spoke).count() == 0
    assert FacilityRevision.objects.filter(facility=world.hub).count() == 1


def test_cross_border_support_link_needs_an_agreement(world, steward_client):
    mahosot = FacilityFactory.create(code="LA-MAHOSOT", area=world.vientiane, tier=Tier.CENTRAL)

    refused = steward_client.post(
        f"{API}/support-links/", {"hub": world.hub.pk, "spoke": mahosot.pk}, format="json"
    )
    accepted = steward_client.post(
        f"{API}/support-links/",
        {"hub": world.hub.pk, "spoke": mahosot.pk, "agreement_reference": "VN-LA/2025/07"},
        format="json",
    )

    assert refused.status_code == 400
    assert refused.json()["code"] == "agreement_required"
    assert accepted.status_code == 201
    assert accepted.json()["is_cross_border"] is True


def test_duplicate_support_link_is_409(world, steward_client):
    response = steward_client.post(
        f"{API}/support-links/",
        {
            "hub": world.hub.pk,
            "spoke": world.spoke.pk,
            "valid_from": world.link.valid_from.isoformat(),
        },
        format="json",
    )

    assert response.status_code == 409
    assert SupportLink.objects.count() == 1


@pytest.mark.parametrize(
    "period",
    [
        {"valid_from": "2025-06-01", "valid_to": "2025-05-31"},
        {"valid_to": "2000-01-01"},  # valid_from defaults to today
    ],
)
def test_support_link_ending_before_it_starts_is_400(world, steward_client, period):
    response = steward_client.post(
        f"{API}/support-links/",
        {"hub": world.hub.pk, "spoke": world.spoke.pk, **period},
        format="json",
    )

    assert response.status_code == 400
    assert list(response.json()["detail"]) == ["valid_to"]
    assert SupportLink.objects.count() == 1


def test_endpoint_duplicate_url_for_a_facility_is_400_and_secret_ref_is_never_shown(
    world, steward_client
):
    Endpoint.objects.filter(pk=world.endpoint.pk).update(auth_secret_ref="NHP_FHIR_TOKEN")

    duplicate = steward_client.post(
        f"{API}/endpoints/",
        {"facility": world.hub.pk, "base_url": world.endpoint.base_url},
        format="json",
    )
    shown = steward_client.get(f"{API}/endpoints/{world.endpoint.pk}/")

    assert duplicate.status_code == 400
    assert Endpoint.objects.count() == 1
    assert "auth_secret_ref" not in shown.json()
    assert "NHP_FHIR_TOKEN" not in shown.content.decode()


@pytest.mark.parametrize(
    "path",
    [
        "facilities/999999/",
        "departments/999999/",
        "countries/ZZ/",
        "specialties/000/",
        "change-requests/999999/",
        "change-requests/abc/",
    ],
)
def test_unknown_rows_are_404_problems(world, referrer_client, path):
    response = referrer_client.get(f"{API}/{path}")

    assert response.status_code == 404
    assert response.json()["status"] == 404
    assert response.json()["code"] == "not_found"


# --- facility filters ---------------------------------------------------------------------


@dataclass
class Network:
    hanoi: AdministrativeArea
    ba_dinh: AdministrativeArea
    nhi: Facility
    hue: Facility
    con_dao: Facility
    ha_giang: Facility
    mahosot: Facility
    departments: dict[str, Department]


@pytest.fixture
def network(db) -> Network:
    vietnam = CountryFactory.create(code="VN", name="Viet Nam")
    laos = CountryFactory.create(code="LA", name="Lao PDR")
    hanoi = AreaFactory.create(country=vietnam, code="01", name="Hà Nội")
    ba_dinh = AreaFactory.create(parent=hanoi, code="001", name="Ba Đình")
    thua_thien_hue = AreaFactory.create(country=vietnam, code="46", name="Thừa Thiên Huế")
    pediatrics = SpecialtyFactory.create(code=PEDIATRICS)
    cardiology = SpecialtyFactory.create(code=CARDIOLOGY)

    nhi = FacilityFactory.create(
        code="NHI", name="Bệnh viện Nhi Trung ương", tier=Tier.CENTRAL, area=ba_dinh
    )
    hue = FacilityFactory.create(
        code="HUE", name="Bệnh viện Trung ương Huế", tier=Tier.CENTRAL, area=thua_thien_hue
    )
    con_dao = FacilityFactory.create(
        code="CONDAO",
        name="Trung tâm Y tế huyện Côn Đảo",
        tier=Tier.DISTRICT,
        country=vietnam,
        is_remote=True,
    )
    ha_giang = FacilityFactory.create(
        code="HAGIANG",
        name="Bệnh viện Đa khoa tỉnh Hà Giang",
        tier=Tier.PROVINCIAL,
        area=hanoi,
        operational_status=OperationalStatus.SUSPENDED,
    )
    mahosot = FacilityFactory.create(
        code="MAHOSOT", name="Mahosot Hospital", tier=Tier.CENTRAL, country=laos
    )
    departments = {
        "nhi": DepartmentFactory.create(facility=nhi, specialty=pediatrics, offers_live=True),
        "hue": DepartmentFactory.create(facility=hue, specialty=cardiology),
        "con_dao": DepartmentFactory.create(
            facility=con_dao, specialty=pediatrics, accepting=False
        ),
        "ha_giang": DepartmentFactory.create(facility=ha_giang, specialty=cardiology),
        "mahosot": DepartmentFactory.create(
            facility=mahosot, specialty=pediatrics, offers_async=False, offers_transfer=True
        ),
    }
    return Network(hanoi, ba_dinh, nhi, hue, con_dao, ha_giang, mahosot, departments)


def _codes(response) -> set[str]:
    assert response.status_code == 200, response.json()
    return {f["code"] for f in response.json()["results"]}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {"NHI", "HUE", "CONDAO", "HAGIANG", "MAHOSOT"}),
        ("country=VN", {"NHI", "HUE", "CONDAO", "HAGIANG"}),
        ("country=la", {"MAHOSOT"}),
        ("tier=1", {"NHI", "HUE", "MAHOSOT"}),
        ("tier=2&tier=3", {"CONDAO", "HAGIANG"}),
        (f"specialty={PEDIATRICS}", {"NHI", "CONDAO", "MAHOSOT"}),
        (f"specialty={CARDIOLOGY}", {"HUE", "HAGIANG"}),
        (f"specialty={NEUROLOGY}", set()),
        ("mode=live", {"NHI"}),
        ("mode=transfer", {"MAHOSOT"}),
        (f"mode=async&specialty={PEDIATRICS}", {"NHI", "CONDAO"}),
        (f"mode=async&specialty={CARDIOLOGY}", {"HUE", "HAGIANG"}),
        ("accepting=true", {"NHI", "HUE", "HAGIANG", "MAHOSOT"}),
        ("accepting=false", {"CONDAO"}),
        ("active=true", {"NHI", "HUE", "CONDAO", "MAHOSOT"}),
        ("active=false", {"HAGIANG"}),
        ("remote=true", {"CONDAO"}),
        ("remote=false", {"NHI", "HUE", "HAGIANG", "MAHOSOT"}),
        ("q=benh vien nhi", {"NHI"}),
        ("q=HUE", {"HUE"}),
        ("q=Huế", {"HUE"}),
        ("q=con dao", {"CONDAO"}),
        ("q=  Hà   GIANG ", {"HAGIANG"}),
        ("q=bach mai", set()),
        ("country=VN&tier=1&accepting=true&q=trung uong", {"NHI", "HUE"}),
    ],
)
def test_facility_filters(network, referrer_client, query, expected):
    assert _codes(referrer_client.get(f"{API}/facilities/?{query}")) == expected


def test_area_filter_includes_the_areas_below(network, referrer_client):
    province = referrer_client.get(f"{API}/facilities/?area={network.hanoi.pk}")
    district = referrer_client.get(f"{API}/facilities/?area={network.ba_dinh.pk}")

    assert _codes(province) == {"NHI", "HAGIANG"}
    assert _codes(district) == {"NHI"}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("tier=9", "tier"),
        ("area=abc", "area"),
        ("mode=fax", "mode"),
        ("q=" + "x" * 201, "q"),
    ],
)
def test_invalid_facility_filter_is_400(network, referrer_client, query, field):
    response = referrer_client.get(f"{API}/facilities/?{query}")

    assert response.status_code == 400
    assert list(response.json()["detail"]) == [field]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {"nhi", "hue", "con_dao", "ha_giang", "mahosot"}),
        ("country=la", {"mahosot"}),
        ("tier=1", {"nhi", "hue", "mahosot"}),
        ("tier=2&tier=3", {"con_dao", "ha_giang"}),
        (f"specialty={PEDIATRICS}", {"nhi", "con_dao", "mahosot"}),
        ("mode=live", {"nhi"}),
        ("mode=async", {"nhi", "hue", "con_dao", "ha_giang"}),
        ("accepting=false", {"con_dao"}),
        ("active=false", {"ha_giang"}),
        ("q=hue", {"hue"}),
        ("q=BENH VIEN", {"nhi", "hue", "ha_giang"}),
    ],
)
def test_department_filters(network, referrer_client, query, expected):
    response = referrer_client.get(f"{API}/departments/?{query}")

    assert response.status_code == 200
    ids = {d["id"] for d in response.json()["results"]}
    assert ids == {network.departments[name].pk for name in expected}


def test_department_filter_by_facility(network, referrer_client):
    response = referrer_client.get(f"{API}/departments/?facility={network.hue.pk}")

    assert [d["id"] for d in response.json()["results"]] == [network.departments["hue"].pk]
    assert response.json()["results"][0]["facility"] == {
        "id": network.hue.pk,
        "code": "HUE",
        "name": "Bệnh viện Trung ương Huế",
        "tier": 1,
        "country": "VN",
    }


def test_area_list_filters(network, referrer_client):
    children = referrer_client.get(f"{API}/areas/?parent={network.hanoi.pk}")
    provinces = referrer_client.get(f"{API}/areas/?country__code=VN&level=1")

    assert [a["code"] for a in children.json()["results"]] == ["001"]
    assert {a["code"] for a in provinces.json()["results"]} == {"01", "46"}


# --- distance search ----------------------------------------------------------------------


@dataclass
class Nearby:
    nhi: Department
    bac_ninh: Department
    hai_phong: Department
    thanh_hoa: Department


@pytest.fixture
def nearby(db) -> Nearby:
    vietnam = CountryFactory.create(code="VN", name="Viet Nam")
    pediatrics = SpecialtyFactory.create(code=PEDIATRICS)
    cardiology = SpecialtyFactory.create(code=CARDIOLOGY)

    def department(code, lat, lon, *, specialty=pediatrics, status="active", **flags):
        facility = FacilityFactory.create(
            code=code,
            name=f"Hospital {code}",
            country=vietnam,
            tier=Tier.PROVINCIAL,
            latitude=lat,
            longitude=lon,
            operational_status=status,
        )
        return DepartmentFactory.create(facility=facility, specialty=specialty, **flags)

    found = Nearby(
        nhi=department("NHI", 21.0245, 105.8012, offers_live=True),
        bac_ninh=department("BACNINH", 21.1861, 106.0763),
        hai_phong=department("HAIPHONG", 20.8449, 106.6881, offers_live=True),
        thanh_hoa=department("THANHHOA", 19.8067, 105.7852),
    )
    # Near Hanoi, but each must stay out of the answer:
    department("FULL", 21.0300, 105.8500, accepting=False)
    department("SUSPENDED", 21.0350, 105.8600, status=OperationalStatus.SUSPENDED)
    department("CLOSED", 21.0360, 105.8610, status=OperationalStatus.CLOSED)
    department("CARDIO", 21.0400, 105.8400, specialty=cardiology)
    department("NOWHERE", None, None)
    return found


def _nearby(client, **params):
    query = "&".join(f"{k}={v}" for k, v in {"specialty": PEDIATRICS, **params}.items())
    return client.get(f"{API}/departments/nearby/?{query}")


def _km(origin: tuple[float, float], department: Department) -> float:
    f = department.facility
    assert f.latitude is not None
    assert f.longitude is not None
    return round(haversine_km(*origin, f.latitude, f.longitude), 3)


def test_nearby_lists_accepting_active_departments_nearest_first(nearby, referrer_client):
    response = _nearby(referrer_client, lat=HANOI[0], lon=HANOI[1], radius_km=100)

    assert response.status_code == 200
    body = response.json()
    assert [(d["facility_code"], d["distance_km"]) for d in body] == [
        ("NHI", _km(HANOI, nearby.nhi)),
        ("BACNINH", _km(HANOI, nearby.bac_ninh)),
        ("HAIPHONG", _km(HANOI, nearby.hai_phong)),
    ]
    assert [d["distance_km"] for d in body] == [5.519, 28.947, 88.977]
    assert body[0] == {
        "department_id": nearby.nhi.pk,
        "department_name": nearby.nhi.name,
        "facility_id": nearby.nhi.facility_id,
        "facility_code": "NHI",
        "facility_name": "Hospital NHI",
        "facility_tier": 2,
        "country": "VN",
        "specialty_code": PEDIATRICS,
        "specialty_display": "Pediatric specialty",
        "modes": ["async", "live"],
        "accepting": True,
        "distance_km": 5.519,
    }


@pytest.mark.parametrize(
    ("radius_km", "expected"),
    [
        (5, []),
        (6, ["NHI"]),
        (50, ["NHI", "BACNINH"]),
        (136.1, ["NHI", "BACNINH", "HAIPHONG", "THANHHOA"]),
    ],
)
def test_nearby_respects_the_radius(nearby, referrer_client, radius_km, expected):
    response = _nearby(referrer_client, lat=HANOI[0], lon=HANOI[1], radius_km=radius_km)

    assert [d["facility_code"] for d in response.json()] == expected


def test_nearby_from_a_facility_uses_its_coordinates_and_leaves_it_out(nearby, referrer_client):
    origin = (nearby.nhi.facility.latitude, nearby.nhi.facility.longitude)

    response = _nearby(referrer_client, facility=nearby.nhi.facility_id, radius_km=100)

    assert response.status_code == 200
    assert [(d["facility_code"], d["distance_km"]) for d in response.json()] == [
        ("BACNINH", _km(origin, nearby.bac_ninh)),
        ("HAIPHONG", _km(origin, nearby.hai_phong)),
    ]


def test_nearby_mode_and_limit(nearby, referrer_client):
    live = _nearby(referrer_client, lat=HANOI[0], lon=HANOI[1], radius_km=200, mode="live")
    first_two = _nearby(referrer_client, lat=HANOI[0], lon=HANOI[1], radius_km=200, limit=2)

    assert [d["facility_code"] for d in live.json()] == ["NHI", "HAIPHONG"]
    assert [d["facility_code"] for d in first_two.json()] == ["NHI", "BACNINH"]


def test_nearby_for_another_specialty_finds_only_that_specialty(nearby, referrer_client):
    response = referrer_client.get(
        f"{API}/departments/nearby/?specialty={CARDIOLOGY}&lat={HANOI[0]}&lon={HANOI[1]}"
    )

    assert [d["facility_code"] for d in response.json()] == ["CARDIO"]


def test_nearby_works_across_the_antimeridian(db, referrer_client):
    fiji = CountryFactory.create(code="FJ", name="Fiji")
    pediatrics = SpecialtyFactory.create(code=PEDIATRICS)
    east = FacilityFactory.create(code="EAST", country=fiji, latitude=-17.0, longitude=-179.95)
    west = FacilityFactory.create(code="WEST", country=fiji, latitude=-17.0, longitude=179.90)
    DepartmentFactory.create(facility=east, specialty=pediatrics)
    DepartmentFactory.create(facility=west, specialty=pediatrics)

    response = _nearby(referrer_client, lat=-17.0, lon=179.95, radius_km=50)

    assert [(d["facility_code"], d["distance_km"]) for d in response.json()] == [
        ("WEST", round(haversine_km(-17.0, 179.95, -17.0, 179.90), 3)),
        ("EAST", round(haversine_km(-17.0, 179.95, -17.0, -179.95), 3)),
    ]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("lat=21&lon=105", "specialty"),
        (f"specialty={PEDIATRICS}", "non_field_errors"),
        (f"specialty={PEDIATRICS}&lat=21", "non_field_errors"),
        (f"specialty={PEDIATRICS}&lon=105", "non_field_errors"),
        (f"specialty={PEDIATRICS}&lat=91&lon=105", "lat"),
        (f"specialty={PEDIATRICS}&lat=abc&lon=105", "lat"),
        (f"specialty={PEDIATRICS}&lat=nan&lon=105", "lat"),
        (f"specialty={PEDIATRICS}&lat=21&lon=inf", "lon"),
        (f"specialty={PEDIATRICS}&lat=21&lon=105&radius_km=0", "radius_km"),
        (f"specialty={PEDIATRICS}&lat=21&lon=105&radius_km=nan", "radius_km"),
        (f"specialty={PEDIATRICS}&lat=21&lon=105&radius_km=5001", "radius_km"),
        (f"specialty={PEDIATRICS}&lat=21&lon=105&mode=fax", "mode"),
        (f"specialty={PEDIATRICS}&lat=21&lon=105&limit=0", "limit"),
        (f"specialty={PEDIATRICS}&facility=999999", "facility"),
    ],
)
def test_nearby_bad_query_is_400(nearby, referrer_client, query, field):
    response = referrer_client.get(f"{API}/departments/nearby/?{query}")

    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert list(response.json()["detail"]) == [field]


def test_nearby_from_a_facility_without_coordinates_is_400(nearby, referrer_client):
    nowhere = Facility.objects.get(code="NOWHERE")

    response = _nearby(referrer_client, facility=nowhere.pk)

    assert response.status_code == 400
    assert response.json()["detail"] == {"facility": ["This facility has no coordinates."]}


# --- query counts: constant in the number of rows -----------------------------------------


def _facility_row(world: World) -> Any:
    facility = FacilityFactory.create(area=world.ba_dinh, parent=world.hub)
    FacilityIdentifierFactory.create(facility=facility)
    return facility


# path -> (one more row, queries the list takes). The queries: the bearer token, the page
# count, the rows, one per prefetched relation; change requests ask for the caller's roles,
# revisions load their facility first (with its identifiers).
# The bearer token's statement: on PostgreSQL a server-side prepared statement, which
# bypasses Django's cursor and so its query log; on SQLite a logged query
# (accounts/authentication.py). The counts below are the list's own statements.
AUTH = 0 if connection.vendor == "postgresql" else 1

LIST_ROWS: dict[str, tuple[Callable[[World], Any], int]] = {
    "countries": (lambda w: CountryFactory.create(), 2 + AUTH),
    "areas": (lambda w: AreaFactory.create(parent=w.hanoi), 2 + AUTH),
    "specialties": (
        lambda w: SpecialtyFactory.create(code=f"9{Specialty.objects.count():08d}"),
        2 + AUTH,
    ),
    "facilities": (_facility_row, 3 + AUTH),
    "departments": (lambda w: DepartmentFactory.create(), 2 + AUTH),
    "practitioners": (lambda w: PractitionerRoleFactory.create(department=w.department), 3 + AUTH),
    "endpoints": (lambda w: EndpointFactory.create(), 2 + AUTH),
    "support-links": (
        lambda w: SupportLinkFactory.create(specialties=[w.pediatrics, w.cardiology]),
        3 + AUTH,
    ),
    # The steward's roles: read with the bearer token on PostgreSQL, a query of their own
    # on SQLite.
    "change-requests": (lambda w: ChangeRequestFactory.create(), 2 + 2 * AUTH),
    "facilities/{hub}/revisions": (
        lambda w: FacilityRevision.objects.create(facility=w.hub, changes={"beds": [None, 1]}),
        4 + AUTH,
    ),
}


def _count_queries(client, url: str) -> tuple[int, int]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return len(queries), len(response.json()["results"])


@pytest.mark.parametrize("path", list(LIST_ROWS))
def test_list_query_count_does_not_grow_with_rows(
    world, steward_client, django_assert_num_queries, path
):
    url = f"{API}/{path.format(hub=world.hub.pk)}/?page_size=100"
    make, expected_queries = LIST_ROWS[path]
    for _ in range(3):
        make(world)
    steward_client.get(url)  # the first request also stamps the token's last use
    few_queries, few_rows = _count_queries(steward_client, url)

    for _ in range(27):
        make(world)
    with django_assert_num_queries(few_queries):
        response = steward_client.get(url)

    assert len(response.json()["results"]) == few_rows + 27
    assert few_queries == expected_queries


def test_nearby_query_count_does_not_grow_with_rows(
    nearby, referrer_client, django_assert_num_queries
):
    pediatrics = Specialty.objects.get(code=PEDIATRICS)
    url = f"{API}/departments/nearby/?specialty={PEDIATRICS}&lat=21.0&lon=105.8&radius_km=300"
    referrer_client.get(url)  # the first request also stamps the token's last use
    with CaptureQueriesContext(connection) as queries:
        referrer_client.get(url)
    few = len(queries)

    for i in range(30):
        facility = FacilityFactory.create(latitude=21.0 + i / 100, longitude=105.8)
        DepartmentFactory.create(facility=facility, specialty=pediatrics)
    with django_assert_num_queries(few):
        response = referrer_client.get(url)

    assert len(response.json()) == 34
    assert few == 1 + AUTH  # the departments (and the token's statement on SQLite)


# --- OpenAPI ------------------------------------------------------------------------------


def test_openapi_schema_renders_every_registry_path(db, anonymous_client):
    response = anonymous_client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in [
        "/api/v1/facilities/",
        "/api/v1/facilities/{id}/",
        "/api/v1/facilities/{id}/revisions/",
        "/api/v1/departments/nearby/",
        "/api/v1/change-requests/{id}/approve/",
        "/api/v1/change-requests/{id}/reject/",
        "/api/v1/support-links/",
        "/api/v1/endpoints/",
    ]:
        assert path in paths, path
    assert "delete" not in paths["/api/v1/facilities/{id}/"]


def test_openapi_schema_validates_without_warnings(db, tmp_path):
    # Every view documents its input and output well enough for drf-spectacular.
    call_command(
        "spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "api.yaml")
    )

    assert "/api/v1/departments/nearby/:" in (tmp_path / "api.yaml").read_text()


def test_swagger_ui_renders(db, anonymous_client):
    response = anonymous_client.get("/api/docs/")

    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


# --- PUT replaces, PATCH amends -------------------------------------------------------------

HUB_FULL = {
    "code": "VN-HUB",
    "name": "Bệnh viện Nhi Trung ương",
    "name_local": "BV Nhi TW",
    "country": "VN",
    "tier": 1,
    "facility_type": "hospital",
    "ownership": "private",
    "operational_status": "closed",
    "latitude": 21.0245,
    "longitude": 105.8012,
    "languages": ["vi"],
    "beds": 1200,
    "is_remote": True,
    "identifiers": [{"system": MOH, "value": "01-001"}],
}
HUB_REQUIRED = {"code": "VN-HUB", "name": "Bệnh viện Nhi Trung ương", "country": "VN", "tier": 1}


def test_facility_put_resets_what_it_leaves_out_and_patch_keeps_it(world, steward_client):
    url = f"{API}/facilities/{world.hub.pk}/"
    assert steward_client.put(url, HUB_FULL, format="json").status_code == 200

    patched = steward_client.patch(url, HUB_REQUIRED, format="json")
    assert patched.status_code == 200, patched.json()
    hub = Facility.objects.get(pk=world.hub.pk)
    assert (hub.ownership, hub.operational_status, hub.beds, hub.is_remote) == (
        "private", "closed", 1200, True
    )  # fmt: skip
    assert hub.identifiers.count() == 1

    replaced = steward_client.put(url, HUB_REQUIRED, format="json")

    assert replaced.status_code == 200, replaced.json()
    body = replaced.json()
    assert {k: body[k] for k in ("name_local", "facility_type", "ownership")} == {
        "name_local": "", "facility_type": "", "ownership": "public"
    }  # fmt: skip
    assert (body["operational_status"], body["latitude"], body["longitude"]) == (
        "active", None, None
    )  # fmt: skip
    assert (body["area"], body["parent"], body["languages"], body["beds"]) == (None, None, [], None)
    assert (body["is_remote"], body["identifiers"]) == (False, [])
    hub = Facility.objects.get(pk=world.hub.pk)
    assert (hub.area_id, hub.beds, hub.is_remote, hub.identifiers.count()) == (None, None, False, 0)
    last = FacilityRevision.objects.filter(facility=hub).order_by("-id").first()
    assert last is not None and last.changes["beds"] == [1200, None]


def test_department_put_resets_what_it_leaves_out(world, steward_client):
    url = f"{API}/departments/{world.department.pk}/"
    full = {
        "facility": world.hub.pk, "specialty": PEDIATRICS, "name": "Khoa Nhi", "modes": ["live"],
        "accepting": False, "daily_capacity": 3, "sla_hours": 4, "languages": ["vi"],
    }  # fmt: skip
    assert steward_client.put(url, full, format="json").status_code == 200
    required = {k: full[k] for k in ("facility", "specialty", "name", "modes")}

    assert steward_client.patch(url, required, format="json").status_code == 200
    world.department.refresh_from_db()
    assert (world.department.accepting, world.department.daily_capacity) == (False, 3)

    response = steward_client.put(url, required, format="json")

    assert response.status_code == 200, response.json()
    world.department.refresh_from_db()
    defaults = Department()
    assert (
        world.department.accepting,
        world.department.daily_capacity,
        world.department.sla_hours,
        world.department.languages,
    ) == (defaults.accepting, defaults.daily_capacity, defaults.sla_hours, [])


def test_endpoint_and_support_link_put_reset_what_they_leave_out(world, steward_client):
    endpoint_url = f"{API}/endpoints/{world.endpoint.pk}/"
    endpoint = {
        "facility": world.hub.pk,
        "base_url": world.endpoint.base_url,
        "fhir_version": "5.0",
    }
    assert (
        steward_client.patch(endpoint_url, {"name": "Main", "status": "off"}, format="json")
    ).status_code == 200

    assert steward_client.put(endpoint_url, endpoint, format="json").status_code == 200
    world.endpoint.refresh_from_db()
    assert (world.endpoint.name, world.endpoint.status) == ("", Endpoint.Status.ACTIVE)

    link_url = f"{API}/support-links/{world.link.pk}/"
    link = {"hub": world.hub.pk, "spoke": world.spoke.pk}
    patched = steward_client.patch(
        link_url, {"active": False, "agreement_reference": "MoU-7"}, format="json"
    )
    assert patched.status_code == 200, patched.json()

    response = steward_client.put(link_url, link, format="json")

    assert response.status_code == 200, response.json()
    world.link.refresh_from_db()
    assert (world.link.active, world.link.agreement_reference) == (True, "")
    assert list(world.link.specialties.all()) == []


def test_endpoint_refuses_a_fhir_version_the_gateway_does_not_send(world, steward_client):
    """An endpoint saved with R4B (4.3) got nothing but dead messages (found by an
    operator): 400 naming the field, nothing changed; the import says the same."""
    url = f"{API}/endpoints/{world.endpoint.pk}/"
    before = world.endpoint.fhir_version

    response = steward_client.patch(url, {"fhir_version": "4.3"}, format="json")

    assert response.status_code == 400
    assert "fhir_version" in json.dumps(response.json())
    world.endpoint.refresh_from_db()
    assert world.endpoint.fhir_version == before
    created = steward_client.post(
        f"{API}/endpoints/",
        {"facility": world.hub.pk, "base_url": "https://x.example.org/fhir", "fhir_version": "4.3"},
        format="json",
    )
    assert created.status_code == 400
    assert not Endpoint.objects.filter(base_url="https://x.example.org/fhir").exists()


# --- endpoints the gateway can deliver to ---------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "reason"),
    [
        ("ftp://x.example/fhir", "is not an http(s) URL with a host and port"),
        ("ftps://x.example/fhir", "is not an http(s) URL with a host and port"),
        ("https://x.example/fhir?tenant=1#frag", "has a query or fragment"),
        ("https://x.example/fhir#frag", "has a query or fragment"),
        ("https://user:pass@x.example/fhir", "holds a user name or password"),
        ("https://user@x.example/fhir", "holds a user name or password"),
    ],
)
def test_endpoint_base_url_delivery_refuses_is_400_and_nothing_changes(
    world, steward_client, base_url, reason
):
    """They were stored (201) and every message to them dead-lettered, or (credentials)
    published at /fhir/Endpoint to every reader."""
    url = f"{API}/endpoints/{world.endpoint.pk}/"
    before = _snapshot(world.endpoint)

    created = steward_client.post(
        f"{API}/endpoints/", {"facility": world.spoke.pk, "base_url": base_url}, format="json"
    )
    patched = steward_client.patch(url, {"base_url": base_url}, format="json")

    for response in (created, patched):
        assert response.status_code == 400
        assert response.json()["detail"] == {"base_url": [f"The base URL {reason}" + _tail(reason)]}
    assert Endpoint.objects.count() == 1
    assert _snapshot(world.endpoint) == before


def _tail(reason: str) -> str:
    if reason.startswith("holds"):
        return "; give credentials by auth_type and auth_secret_ref, never in the URL."
    if reason.startswith("has"):
        return "; a FHIR base has none."
    return "."


def test_endpoint_url_is_stored_in_its_compared_form_and_a_variant_is_a_duplicate(
    world, steward_client
):
    """A trailing slash or another case of scheme and host made a second endpoint of the
    same server (each message then went out twice)."""
    created = steward_client.post(
        f"{API}/endpoints/",
        {"facility": world.spoke.pk, "base_url": "HTTPS://Fhir.Spoke.Example.org/R4/"},
        format="json",
    )
    assert created.status_code == 201, created.json()
    assert created.json()["base_url"] == "https://fhir.spoke.example.org/R4"

    for variant in ("https://FHIR.nhp.example.org/fhir/", "HTTPS://fhir.nhp.example.org/fhir"):
        duplicate = steward_client.post(
            f"{API}/endpoints/", {"facility": world.hub.pk, "base_url": variant}, format="json"
        )
        assert duplicate.status_code == 400
        assert duplicate.json()["detail"] == {
            "base_url": ["This facility already has an endpoint with this base URL."]
        }
    assert Endpoint.objects.filter(facility=world.hub).count() == 1
    # The same URL at another facility is another endpoint (each member has its own).
    other = steward_client.post(
        f"{API}/endpoints/",
        {"facility": world.spoke.pk, "base_url": "https://fhir.nhp.example.org/fhir/"},
        format="json",
    )
    assert other.status_code == 201


def test_endpoint_duplicate_of_a_row_stored_before_the_normal_form_is_400(world, steward_client):
    Endpoint.objects.filter(pk=world.endpoint.pk).update(
        base_url="https://FHIR.nhp.example.org/fhir/"
    )

    response = steward_client.post(
        f"{API}/endpoints/",
        {"facility": world.hub.pk, "base_url": "https://fhir.nhp.example.org/fhir"},
        format="json",
    )

    assert response.status_code == 400
    assert list(response.json()["detail"]) == ["base_url"]
    assert Endpoint.objects.count() == 1


def test_bearer_endpoint_takes_a_secret_reference_written_never_shown(world, steward_client):
    """auth_secret_ref was no API field: a PATCH naming it was ignored without a word and
    a bearer endpoint died on "secret '' is not configured"."""
    url = f"{API}/endpoints/{world.endpoint.pk}/"

    response = steward_client.patch(
        url, {"auth_type": "bearer", "auth_secret_ref": "NHP_FHIR_TOKEN"}, format="json"
    )

    assert response.status_code == 200, response.json()
    world.endpoint.refresh_from_db()
    assert (world.endpoint.auth_type, world.endpoint.auth_secret_ref) == (
        "bearer",
        "NHP_FHIR_TOKEN",
    )
    assert "auth_secret_ref" not in response.json()
    assert "NHP_FHIR_TOKEN" not in steward_client.get(url).content.decode()
    created = steward_client.post(
        f"{API}/endpoints/",
        {
            "facility": world.spoke.pk,
            "base_url": "https://fhir.spoke.example.org/fhir",
            "auth_type": "basic",
            "auth_secret_ref": "SPOKE_FHIR_BASIC",
        },
        format="json",
    )
    assert created.status_code == 201, created.json()
    assert Endpoint.objects.get(pk=created.json()["id"]).auth_secret_ref == "SPOKE_FHIR_BASIC"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"auth_type": "bearer"},
            'auth_type "bearer" needs auth_secret_ref: the name of the environment variable '
            "(or NAME_FILE) that holds the credential.",
        ),
        (
            {"auth_type": "basic", "auth_secret_ref": ""},
            'auth_type "basic" needs auth_secret_ref: the name of the environment variable '
            "(or NAME_FILE) that holds the credential.",
        ),
        (
            {"auth_type": "bearer", "auth_secret_ref": "s3cr3t token!"},
            "auth_secret_ref is the name of an environment variable (letters, digits, "
            "underscores), not the secret itself.",
        ),
        (
            {"auth_type": "none", "auth_secret_ref": "NHP_FHIR_TOKEN"},
            'auth_type "none" reads no secret: leave auth_secret_ref empty.',
        ),
    ],
)
def test_endpoint_auth_without_a_usable_secret_reference_is_400_and_nothing_changes(
    world, steward_client, body, message
):
    url = f"{API}/endpoints/{world.endpoint.pk}/"
    before = _snapshot(world.endpoint)

    patched = steward_client.patch(url, body, format="json")
    created = steward_client.post(
        f"{API}/endpoints/",
        {"facility": world.spoke.pk, "base_url": "https://fhir.spoke.example.org/fhir", **body},
        format="json",
    )

    for response in (patched, created):
        assert response.status_code == 400
        assert response.json()["detail"] == {"auth_secret_ref": [message]}
    assert _snapshot(world.endpoint) == before
    assert Endpoint.objects.count() == 1


# --- bounds of numbers PostgreSQL's columns hold -------------------------------------------


def test_beds_and_daily_capacity_past_the_integer_column_are_400_and_nothing_changes(
    world, steward_client
):
    """SQLite took 2**31 beds and 2**40 a day; PostgreSQL's integer column does not."""
    facility_before = _snapshot(world.hub)
    department_before = _snapshot(world.department)

    beds = steward_client.patch(f"{API}/facilities/{world.hub.pk}/", {"beds": 2**31}, format="json")
    capacity = steward_client.patch(
        f"{API}/departments/{world.department.pk}/", {"daily_capacity": 2**40}, format="json"
    )
    at_most = steward_client.patch(
        f"{API}/facilities/{world.hub.pk}/", {"beds": 2**31 - 1}, format="json"
    )

    assert (beds.status_code, capacity.status_code) == (400, 400)
    assert beds.json()["detail"] == {
        "beds": ["Ensure this value is less than or equal to 2147483647."]
    }
    assert capacity.json()["detail"] == {
        "daily_capacity": ["Ensure this value is less than or equal to 2147483647."]
    }
    assert _snapshot(world.department) == department_before
    assert at_most.status_code == 200
    facility_before["beds"] = 2**31 - 1
    assert _snapshot(world.hub) == facility_before


def test_department_languages_must_be_language_tags_like_a_facilitys(world, steward_client):
    url = f"{API}/departments/{world.department.pk}/"
    before = _snapshot(world.department)

    refused = steward_client.patch(url, {"languages": ["vi", "not a tag"]}, format="json")

    assert refused.status_code == 400
    assert list(refused.json()["detail"]) == ["languages"]
    assert _snapshot(world.department) == before
    taken = steward_client.patch(url, {"languages": ["vi", "en-GB"]}, format="json")
    assert taken.status_code == 200
    world.department.refresh_from_db()
    assert world.department.languages == ["vi", "en-GB"]


# --- filters refuse what they cannot read ----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("facilities/?area=99999999999999999999999", "area"),
        ("facilities/?area=9223372036854775808", "area"),
        ("facilities/?area=1.9", "area"),
        ("facilities/?area=1e400", "area"),
        ("facilities/?area=-1", "area"),
        ("facilities/?accepting=maybe", "accepting"),
        ("facilities/?active=yes please", "active"),
        ("facilities/?remote=x", "remote"),
        ("departments/?facility=1.5", "facility"),
        ("departments/?facility=99999999999999999999999", "facility"),
        ("departments/?accepting=maybe", "accepting"),
        ("departments/?active=x", "active"),
        ("support-links/?active=x", "active"),
        ("support-links/?is_cross_border=perhaps", "is_cross_border"),
    ],
)
def test_unreadable_filter_values_are_400_naming_the_filter(network, referrer_client, path, field):
    response = referrer_client.get(f"{API}/{path}")

    assert response.status_code == 400
    assert list(response.json()["detail"]) == [field]


def test_area_filter_takes_the_largest_row_id_and_boolean_filters_take_1_and_0(
    network, referrer_client
):
    largest = referrer_client.get(f"{API}/facilities/?area=9223372036854775807")
    accepting = referrer_client.get(f"{API}/facilities/?accepting=0")
    active = referrer_client.get(f"{API}/departments/?active=FALSE")

    assert _codes(largest) == set()
    assert _codes(accepting) == {"CONDAO"}
    assert {d["id"] for d in active.json()["results"]} == {network.departments["ha_giang"].pk}
