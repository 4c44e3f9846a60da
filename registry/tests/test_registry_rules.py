"""Rules every registry write keeps, whichever way it comes (REST API, Django admin): the
services' checks answer as errors (400/409 or a form error, never a 500), every facility
change leaves its revision (identifiers included), a facility's province follows its area
and its links' border flag its country, history is append-only, a change request is
approved by someone else. Review findings; the NUL cases matter on PostgreSQL."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.models import F
from django.test import Client

from accounts.roles import Role
from registry.models import (
    AdministrativeArea,
    ChangeRequest,
    Department,
    Facility,
    FacilityRevision,
    SupportLink,
    Tier,
)
from tests.factories import (
    AreaFactory,
    CountryFactory,
    FacilityFactory,
    SupportLinkFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def superuser_client() -> Client:
    user = UserFactory.create(username="root", is_staff=True, is_superuser=True)
    client = Client(raise_request_exception=False)  # a 500 is answered, as in production
    client.force_login(user)
    return client


def _facility_admin_form(f: Facility, **overrides: object) -> dict[str, object]:
    """The POST the admin's facility change form sends (no inline rows)."""
    data: dict[str, object] = {
        "code": f.code,
        "name": f.name,
        "name_local": f.name_local,
        "country": f.country_id,
        "area": f.area_id or "",
        "province": f.province_id or "",
        "tier": f.tier,
        "facility_type": f.facility_type,
        "ownership": f.ownership,
        "operational_status": f.operational_status,
        "latitude": "" if f.latitude is None else f.latitude,
        "longitude": "" if f.longitude is None else f.longitude,
        "parent": f.parent_id or "",
        "languages": "[]",
        "beds": "" if f.beds is None else f.beds,
        "created_at_0": f.created_at.strftime("%Y-%m-%d"),
        "created_at_1": f.created_at.strftime("%H:%M:%S"),
        "identifiers-TOTAL_FORMS": "0",
        "identifiers-INITIAL_FORMS": "0",
        "departments-TOTAL_FORMS": "0",
        "departments-INITIAL_FORMS": "0",
        "_save": "Save",
    }
    data.update(overrides)
    return data


# --- admin facility edits bypass services ------------------------------------------------


def test_admin_facility_edit_records_a_revision(superuser_client: Client) -> None:
    """Every facility change leaves a FacilityRevision, an admin edit too."""
    f = FacilityFactory.create(name="Old name")
    response = superuser_client.post(
        f"/admin/registry/facility/{f.pk}/change/", _facility_admin_form(f, name="New name")
    )
    assert response.status_code == 302
    f.refresh_from_db()
    assert f.name == "New name"
    revision = FacilityRevision.objects.get(facility=f)
    assert revision.source == "admin"
    assert revision.changes == {"name": ["Old name", "New name"]}


def test_admin_facility_area_change_derives_the_province(superuser_client: Client) -> None:
    """The province is derived from the area on every write (the admin shows it read-only)."""
    p1, p2 = AreaFactory.create(), AreaFactory.create()
    district = AreaFactory.create(parent=p2)
    f = FacilityFactory.create(area=p1)
    response = superuser_client.post(
        f"/admin/registry/facility/{f.pk}/change/",
        _facility_admin_form(f, area=district.pk, province=p1.pk),
    )
    assert response.status_code == 302
    f.refresh_from_db()
    assert f.area_id == district.pk
    assert f.province_id == p2.pk


# --- admin moving an area leaves facilities' province stale -------------------------------


def test_moving_a_district_to_another_province_in_the_admin_moves_its_facilities(
    superuser_client: Client,
) -> None:
    """Facility.province (reports, the coordinator's region scope) follows a district that
    moves to another province."""
    p1, p2 = AreaFactory.create(), AreaFactory.create()
    district = AreaFactory.create(parent=p1)
    f = FacilityFactory.create(area=district)
    assert f.province_id == p1.pk
    response = superuser_client.post(
        f"/admin/registry/administrativearea/{district.pk}/change/",
        {
            "country": district.country_id,
            "parent": p2.pk,
            "level": district.level,
            "code": district.code,
            "name": district.name,
            "name_local": "",
            "_save": "Save",
        },
    )
    assert response.status_code == 302
    f.refresh_from_db()
    assert f.province_id == p2.pk
    other = FacilityFactory.create(area=p1)  # left where it was
    assert Facility.objects.get(pk=other.pk).province_id == p1.pk


# --- admin: database checks the form cannot see become 500s ------------------------------


def test_admin_cross_border_link_without_agreement_is_a_form_error_not_500(
    superuser_client: Client,
) -> None:
    """The flag is derived (not on the form), so the service's check answers, not the
    database's constraint."""
    hub = FacilityFactory.create(tier=Tier.CENTRAL)
    spoke = FacilityFactory.create(
        country=CountryFactory.create(code="LA", name="Laos"), tier=Tier.DISTRICT
    )
    response = superuser_client.post(
        "/admin/registry/supportlink/add/",
        {
            "hub": hub.pk,
            "spoke": spoke.pk,
            "valid_from": "2026-01-01",
            "valid_to": "",
            "agreement_reference": "",
            "identifiable_data_allowed": "on",
            "active": "on",
            "_save": "Save",
        },
    )
    assert response.status_code == 200  # the form again, with an error
    assert "data-sharing agreement" in response.content.decode()
    assert SupportLink.objects.count() == 0


def test_admin_facility_as_its_own_parent_is_a_form_error_not_500(
    superuser_client: Client,
) -> None:
    """The database's check names ``id`` (not on the form): the service's check answers."""
    f = FacilityFactory.create()
    child = FacilityFactory.create(parent=f)
    for parent in (f, child):  # itself, or a loop through its child
        response = superuser_client.post(
            f"/admin/registry/facility/{f.pk}/change/", _facility_admin_form(f, parent=parent.pk)
        )
        assert response.status_code == 200
        assert Facility.objects.get(pk=f.pk).parent_id is None
    assert not FacilityRevision.objects.filter(facility=f).exists()


def test_admin_area_as_its_own_parent_is_a_form_error_not_500(superuser_client: Client) -> None:
    """The same for an area; nor may its parent be of its own level or another country."""
    area = AreaFactory.create()
    response = superuser_client.post(
        f"/admin/registry/administrativearea/{area.pk}/change/",
        {
            "country": area.country_id,
            "parent": area.pk,
            "level": area.level,
            "code": area.code,
            "name": area.name,
            "name_local": "",
            "_save": "Save",
        },
    )
    assert response.status_code == 200
    assert AdministrativeArea.objects.get(pk=area.pk).parent_id is None
    abroad = AreaFactory.create(country=CountryFactory.create(code="LA", name="Laos"))
    district = AreaFactory.create(parent=AreaFactory.create(country=area.country))
    for parent, level in ((abroad, 2), (area, 1)):
        response = superuser_client.post(
            f"/admin/registry/administrativearea/{district.pk}/change/",
            {
                "country": district.country_id,
                "parent": parent.pk,
                "level": level,
                "code": district.code,
                "name": district.name,
                "name_local": "",
                "_save": "Save",
            },
        )
        assert response.status_code == 200
        stored = AdministrativeArea.objects.get(pk=district.pk)
        assert (stored.parent_id, stored.level) == (district.parent_id, district.level)


# --- admin: other service invariants ------------------------------------------------------


def test_admin_department_without_any_mode_is_refused(superuser_client: Client, pediatrics) -> None:
    """As the API's (400 no_mode): a department offers at least one mode."""
    f = FacilityFactory.create()
    response = superuser_client.post(
        "/admin/registry/department/add/",
        {
            "facility": f.pk,
            "specialty": pediatrics.pk,
            "name": "No-mode department",
            "daily_capacity": 20,
            "sla_hours": 48,
            "languages": "[]",
            "created_at_0": "2026-01-01",
            "created_at_1": "00:00:00",
            "_save": "Save",
        },
    )
    assert response.status_code == 200
    assert "at least one mode" in response.content.decode()
    assert not Department.objects.exists()


def test_admin_cannot_delete_a_facility_revision(superuser_client: Client) -> None:
    """History is append-only: the admin shows it, and neither adds, changes nor deletes."""
    f = FacilityFactory.create()
    revision = FacilityRevision.objects.create(
        facility=f, source="api", changes={"name": [None, "x"]}
    )
    response = superuser_client.post(
        f"/admin/registry/facilityrevision/{revision.pk}/delete/", {"post": "yes"}
    )
    assert response.status_code == 403
    assert FacilityRevision.objects.filter(pk=revision.pk).exists()
    assert superuser_client.get("/admin/registry/facilityrevision/add/").status_code == 403
    assert (
        superuser_client.get(f"/admin/registry/facilityrevision/{revision.pk}/change/").status_code
        == 200
    )  # shown, read-only


# --- facility country change leaves support links' cross-border flag stale ----------------


def test_a_facility_moves_country_only_with_agreements_on_its_links(steward_client) -> None:
    """A support link's border flag is derived: a facility moving to another country takes
    its links across the border only where they have a data-sharing agreement."""
    link = SupportLinkFactory.create()
    CountryFactory.create(code="KH", name="Cambodia")
    spoke = Facility.objects.get(pk=link.spoke_id)
    response = steward_client.patch(
        f"/api/v1/facilities/{spoke.pk}/", {"country": "KH"}, format="json"
    )
    assert response.status_code == 409, response.json()
    assert "agreement" in response.json()["detail"]
    assert Facility.objects.get(pk=spoke.pk).country_id == spoke.country_id
    assert SupportLink.objects.get(pk=link.pk).is_cross_border is False
    assert not FacilityRevision.objects.filter(facility=spoke).exists()

    SupportLink.objects.filter(pk=link.pk).update(agreement_reference="MoU 2026/7")
    response = steward_client.patch(
        f"/api/v1/facilities/{spoke.pk}/", {"country": "KH"}, format="json"
    )
    assert response.status_code == 200, response.json()
    assert SupportLink.objects.get(pk=link.pk).is_cross_border is True
    listed = steward_client.get("/api/v1/support-links/?is_cross_border=true").json()
    assert [row["id"] for row in listed["results"]] == [link.pk]


def test_the_admin_moves_a_facility_country_as_the_api_does(superuser_client: Client) -> None:
    link = SupportLinkFactory.create()
    abroad = CountryFactory.create(code="KH", name="Cambodia")
    spoke = Facility.objects.get(pk=link.spoke_id)
    form = _facility_admin_form(spoke, country=abroad.pk, area="")
    response = superuser_client.post(f"/admin/registry/facility/{spoke.pk}/change/", form)
    assert response.status_code == 200  # a form error: the link has no agreement
    assert Facility.objects.get(pk=spoke.pk).country_id == spoke.country_id
    SupportLink.objects.filter(pk=link.pk).update(agreement_reference="MoU 2026/7")
    response = superuser_client.post(f"/admin/registry/facility/{spoke.pk}/change/", form)
    assert response.status_code == 302
    assert SupportLink.objects.get(pk=link.pk).is_cross_border is True
    revision = FacilityRevision.objects.get(facility=spoke)
    assert revision.changes["country_id"] == [spoke.country_id, abroad.pk]


def test_the_admin_refuses_a_hub_below_its_spoke_as_the_api_does(
    superuser_client: Client,
) -> None:
    link = SupportLinkFactory.create()  # a central hub, a district spoke
    hub = Facility.objects.get(pk=link.hub_id)
    lowered = superuser_client.post(
        f"/admin/registry/facility/{hub.pk}/change/",
        _facility_admin_form(hub, tier=Tier.COMMUNE),
    )
    reversed_link = superuser_client.post(
        "/admin/registry/supportlink/add/",
        {
            "hub": link.spoke_id, "spoke": link.hub_id, "valid_from": "2026-01-01",
            "valid_to": "", "agreement_reference": "", "active": "on", "_save": "Save",
        },
    )  # fmt: skip

    assert lowered.status_code == 200  # the form again, with the error
    assert "below its spoke" in lowered.content.decode()
    assert Facility.objects.get(pk=hub.pk).tier == Tier.CENTRAL
    assert not FacilityRevision.objects.filter(facility=hub).exists()
    assert reversed_link.status_code == 200
    assert "wrong way round" in reversed_link.content.decode()
    assert SupportLink.objects.count() == 1


# --- parent cycles ------------------------------------------------------------------------


def test_facility_parent_cycle_is_refused(steward_client) -> None:
    """A.parent = B with B.parent = A would be published as a partOf cycle (FHIR/mCSD)."""
    a = FacilityFactory.create()
    b = FacilityFactory.create(parent=a)
    response = steward_client.patch(
        f"/api/v1/facilities/{a.pk}/", {"parent": b.code}, format="json"
    )
    assert response.status_code == 400
    a.refresh_from_db()
    assert a.parent_id is None
    assert not FacilityRevision.objects.filter(facility=a).exists()


# --- identifier changes via the API leave no revision -------------------------------------


def test_identifier_only_change_through_the_api_records_a_revision(steward_client) -> None:
    """Recorded as the importer records it: sorted ``system|value`` before and after."""
    f = FacilityFactory.create()
    response = steward_client.patch(
        f"/api/v1/facilities/{f.pk}/",
        {"identifiers": [{"system": "urn:moh", "value": "1"}]},
        format="json",
    )
    assert response.status_code == 200
    revision = FacilityRevision.objects.get(facility=f)
    assert revision.changes == {"identifiers": [[], ["urn:moh|1"]]}
    # the same identifiers again: nothing changed, no revision
    steward_client.patch(
        f"/api/v1/facilities/{f.pk}/",
        {"identifiers": [{"system": "urn:moh", "value": "1"}]},
        format="json",
    )
    assert FacilityRevision.objects.filter(facility=f).count() == 1


def test_the_admin_records_identifier_changes(superuser_client: Client) -> None:
    f = FacilityFactory.create()
    form = _facility_admin_form(
        f,
        **{
            "identifiers-TOTAL_FORMS": "1",
            "identifiers-0-system": "urn:moh",
            "identifiers-0-value": "42",
        },
    )
    response = superuser_client.post(f"/admin/registry/facility/{f.pk}/change/", form)
    assert response.status_code == 302
    assert FacilityRevision.objects.get(facility=f).changes == {"identifiers": [[], ["urn:moh|42"]]}


# --- NUL characters reach PostgreSQL through slug lookups: 500 ----------------------------


@pytest.mark.parametrize("path", ["/api/v1/countries/%00/", "/api/v1/specialties/%00/"])
def test_nul_in_a_lookup_path_is_404_not_500(referrer_client, path: str) -> None:
    """PostgreSQL refuses NUL in text: a code with one names nothing."""
    referrer_client.raise_request_exception = False
    assert referrer_client.get(path).status_code == 404


@pytest.mark.parametrize(
    "target",
    [
        "facility-country",
        "facility-parent",
        "department-specialty",
        "support-link-specialties",
    ],
)
def test_nul_in_a_slug_related_field_is_400_not_500(
    steward_client, pediatrics, target: str
) -> None:
    """A row named by a code with a NUL does not exist (400), whatever the field."""
    steward_client.raise_request_exception = False
    f = FacilityFactory.create()
    g = FacilityFactory.create(tier=Tier.DISTRICT)
    requests: dict[str, tuple[str, str, dict[str, Any]]] = {
        "facility-country": (
            "post",
            "/api/v1/facilities/",
            {"code": "X1", "name": "A", "country": "\x00", "tier": 2},
        ),
        "facility-parent": ("patch", f"/api/v1/facilities/{f.pk}/", {"parent": "\x00"}),
        "department-specialty": (
            "post",
            "/api/v1/departments/",
            {"facility": f.pk, "specialty": "\x00", "name": "x", "modes": ["async"]},
        ),
        "support-link-specialties": (
            "post",
            "/api/v1/support-links/",
            {"hub": f.pk, "spoke": g.pk, "specialties": ["\x00"]},
        ),
    }
    method, url, body = requests[target]
    before = (Facility.objects.count(), Department.objects.count(), SupportLink.objects.count())
    response = getattr(steward_client, method)(url, body, format="json")
    assert response.status_code == 400
    after = (Facility.objects.count(), Department.objects.count(), SupportLink.objects.count())
    assert after == before
    assert Facility.objects.get(pk=f.pk).parent_id is None


# --- a steward approves own change request -------------------------------------------------


def test_steward_cannot_approve_own_change_request(api_client_for) -> None:
    """Four eyes: a change request is approved by another steward than its proposer."""
    steward = UserFactory.create(username="steward-a", roles=[Role.REGISTRY_STEWARD])
    client = api_client_for(steward)
    CountryFactory.create(code="VN", name="Viet Nam")
    created = client.post(
        "/api/v1/change-requests/",
        {"facility": None, "payload": {"code": "NEW-1", "name": "N", "country": "VN", "tier": 3}},
        format="json",
    )
    assert created.status_code == 201
    response = client.post(
        f"/api/v1/change-requests/{created.json()['id']}/approve/", {}, format="json"
    )
    assert response.status_code == 403
    assert ChangeRequest.objects.get().status == ChangeRequest.Status.PENDING
    assert not Facility.objects.filter(code="NEW-1").exists()
    other = api_client_for(UserFactory.create(username="steward-b", roles=[Role.REGISTRY_STEWARD]))
    response = other.post(
        f"/api/v1/change-requests/{created.json()['id']}/approve/", {}, format="json"
    )
    assert response.status_code == 200
    assert Facility.objects.filter(code="NEW-1").exists()


# --- the admin's add page; areas below a changed area -------------------------------------


def _add_form(country_id: int, code: str, **extra: object) -> dict[str, object]:
    return {
        "code": code,
        "name": f"Hospital {code}",
        "name_local": "",
        "country": country_id,
        "area": "",
        "tier": 2,
        "facility_type": "",
        "ownership": "public",
        "operational_status": "active",
        "latitude": "",
        "longitude": "",
        "parent": "",
        "languages": "[]",
        "beds": "",
        "created_at_0": "2026-01-01",
        "created_at_1": "00:00:00",
        "identifiers-TOTAL_FORMS": "1",
        "identifiers-INITIAL_FORMS": "0",
        "identifiers-0-system": "urn:moh",
        "identifiers-0-value": code,
        "departments-TOTAL_FORMS": "0",
        "departments-INITIAL_FORMS": "0",
        "_save": "Save",
        **extra,
    }


def test_the_admin_adds_a_facility_with_its_revision(superuser_client: Client) -> None:
    country = CountryFactory.create()
    response = superuser_client.post("/admin/registry/facility/add/", _add_form(country.pk, "NEW2"))
    assert response.status_code == 302
    facility = Facility.objects.get(code="NEW2")
    revision = FacilityRevision.objects.get(facility=facility)
    assert revision.source == "admin"
    assert revision.changes["code"] == [None, "NEW2"]
    assert revision.changes["identifiers"] == [None, ["urn:moh|NEW2"]]


def test_the_admin_add_page_keeps_the_department_mode_rule(
    superuser_client: Client, pediatrics
) -> None:
    country = CountryFactory.create()
    rows = {
        "departments-TOTAL_FORMS": "1",
        "departments-0-specialty": pediatrics.pk,
        "departments-0-name": "No-mode department",
        "departments-0-accepting": "on",
        "departments-0-daily_capacity": "20",
        "departments-0-sla_hours": "48",
    }
    response = superuser_client.post(
        "/admin/registry/facility/add/", _add_form(country.pk, "NEW1", **rows)
    )
    assert response.status_code == 200  # the form again
    assert "at least one mode" in response.content.decode()
    assert not Facility.objects.filter(code="NEW1").exists()
    assert not Department.objects.exists()
    rows["departments-0-offers_async"] = "on"
    response = superuser_client.post(
        "/admin/registry/facility/add/", _add_form(country.pk, "NEW1", **rows)
    )
    assert response.status_code == 302
    assert Department.objects.get().facility.code == "NEW1"


def test_area_rules_also_hold_for_the_areas_below_a_changed_area() -> None:
    from core.errors import ApplicationError
    from registry.models import AreaLevel
    from registry.services import area_save

    country = CountryFactory.create()
    province = AreaFactory.create(country=country, level=AreaLevel.PROVINCE, parent=None)
    district = AreaFactory.create(country=country, level=AreaLevel.DISTRICT, parent=province)
    province.level = AreaLevel.COMMUNE
    with pytest.raises(ApplicationError):
        area_save(area=province)
    province.level = AreaLevel.PROVINCE
    province.parent = district  # a loop
    with pytest.raises(ApplicationError):
        area_save(area=province)
    province.parent = None
    province.country = CountryFactory.create(code="LA", name="Laos")
    with pytest.raises(ApplicationError):
        area_save(area=province)
    stored = AdministrativeArea.objects.get(pk=province.pk)
    assert (stored.level, stored.parent_id, stored.country_id) == (1, None, country.pk)


def test_an_admin_edit_that_keeps_the_country_is_not_judged_by_old_links(
    superuser_client: Client,
) -> None:
    """A legacy cross-border link with a blank agreement (written before the rule) does
    not block an edit that does not move the facility."""
    link = SupportLinkFactory.create()
    abroad = CountryFactory.create(code="KH", name="Cambodia")
    Facility.objects.filter(pk=link.hub_id).update(country=abroad)
    SupportLink.objects.filter(pk=link.pk).update(is_cross_border=True, agreement_reference=" ")
    spoke = Facility.objects.get(pk=link.spoke_id)
    response = superuser_client.post(
        f"/admin/registry/facility/{spoke.pk}/change/", _facility_admin_form(spoke, name="Renamed")
    )
    assert response.status_code == 302
    assert Facility.objects.get(pk=spoke.pk).name == "Renamed"


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="two writers at once: SQLite (make run) locks the whole database for one",
)
def test_two_parent_changes_that_close_a_loop_together_do_not_both_land(monkeypatch) -> None:
    """A under B and B under A at the same moment: each would find no loop in what the other
    has not committed yet (before: each held its own row, waited for the other's, and
    one died of a deadlock, a 500). The parent changes lock makes the second wait for the
    first's commit, see its parent, and refuse (400); the registry never holds the loop."""
    import threading
    import time

    from core.errors import ApplicationError
    from registry import services

    steward = UserFactory.create(roles=[Role.REGISTRY_STEWARD])
    a, b = FacilityFactory.create(), FacilityFactory.create()
    slow_record = services.facility_record_revision

    def record_slowly(**kwargs):  # after the check and the save, before the commit
        revision = slow_record(**kwargs)
        time.sleep(0.5)
        return revision

    monkeypatch.setattr(services, "facility_record_revision", record_slowly)
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def set_parent(child, parent) -> None:
        try:
            start.wait()
            services.facility_update(actor=steward, facility=child, data={"parent": parent})
            outcomes.append("saved")
        except ApplicationError as refused:
            outcomes.append(refused.code)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=set_parent, args=(a, b)),
        threading.Thread(target=set_parent, args=(b, a)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert sorted(outcomes) == ["parent_loop", "saved"]
    parents = dict(Facility.objects.filter(pk__in=[a.pk, b.pk]).values_list("pk", "parent_id"))
    assert parents in ({a.pk: b.pk, b.pk: None}, {a.pk: None, b.pk: a.pk})


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="two writers at once: SQLite (make run) locks the whole database for one",
)
def test_an_edit_that_keeps_the_parent_does_not_deadlock_with_a_parent_change(
    monkeypatch,
) -> None:
    """X (which has a parent) renamed while Y is put under X: the rename used to lock X's
    row before the parent changes lock, the move the lock before X's row (its new
    parent's foreign key): a deadlock, a 500."""
    import threading
    import time

    from registry import services

    steward = UserFactory.create(roles=[Role.REGISTRY_STEWARD])
    top = FacilityFactory.create()
    x, y = FacilityFactory.create(parent=top), FacilityFactory.create()
    real_snapshot = services.facility_snapshot
    x_locked = threading.Event()

    def snapshot(facility):  # right after facility_update's row lock
        if facility.pk == x.pk:
            x_locked.set()
            time.sleep(0.7)
        return real_snapshot(facility)

    monkeypatch.setattr(services, "facility_snapshot", snapshot)
    outcomes: list[str] = []

    def run(work) -> None:
        try:
            work()
            outcomes.append("saved")
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test reads
            outcomes.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()

    def rename_x() -> None:
        services.facility_update(actor=steward, facility=x, data={"name": "Renamed"})

    def move_y() -> None:
        x_locked.wait(5)
        services.facility_update(actor=steward, facility=y, data={"parent": x})

    threads = [threading.Thread(target=run, args=(w,)) for w in (rename_x, move_y)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert outcomes == ["saved", "saved"], outcomes
    assert Facility.objects.get(pk=y.pk).parent_id == x.pk
    assert Facility.objects.get(pk=x.pk).name == "Renamed"


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="two writers at once: SQLite (make run) locks the whole database for one",
)
def test_a_tier_change_and_a_new_link_cannot_together_put_a_hub_below_its_spoke(
    monkeypatch,
) -> None:
    import threading
    import time

    from core.errors import ApplicationError, Conflict
    from registry import services

    steward = UserFactory.create(roles=[Role.REGISTRY_STEWARD])
    hub = FacilityFactory.create(tier=Tier.CENTRAL)
    spoke = FacilityFactory.create(tier=Tier.DISTRICT)
    real_record = services.facility_record_revision
    checked = threading.Event()

    def record_slowly(**kwargs):  # the tier change: checked, saved, not yet committed
        revision = real_record(**kwargs)
        checked.set()
        time.sleep(0.7)
        return revision

    monkeypatch.setattr(services, "facility_record_revision", record_slowly)
    outcomes: list[str] = []

    def lower_hub() -> None:
        try:
            services.facility_update(actor=steward, facility=hub, data={"tier": Tier.COMMUNE})
            outcomes.append("tier saved")
        except Conflict as refused:
            outcomes.append(refused.code)
        finally:
            connection.close()

    def link() -> None:
        try:
            checked.wait(5)
            services.support_link_save(actor=steward, data={"hub": hub, "spoke": spoke})
            outcomes.append("link saved")
        except ApplicationError as refused:
            outcomes.append(refused.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=lower_hub), threading.Thread(target=link)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert sorted(outcomes) == ["hub_below_spoke", "tier saved"], outcomes
    assert not SupportLink.objects.filter(hub__tier__gt=F("spoke__tier")).exists()


def test_a_link_stored_upside_down_can_still_be_switched_off(steward_client) -> None:
    link = SupportLinkFactory.create()
    SupportLink.objects.filter(pk=link.pk).update(hub=link.spoke, spoke=link.hub)  # legacy row
    url = f"/api/v1/support-links/{link.pk}/"

    off = steward_client.patch(url, {"active": False}, format="json")
    back_on = steward_client.patch(url, {"active": True}, format="json")

    assert off.status_code == 200, off.content
    assert back_on.status_code == 400 and back_on.json()["code"] == "hub_below_spoke"
    assert SupportLink.objects.get(pk=link.pk).active is False


def test_inactive_or_ended_links_do_not_block_a_tier_change(steward_client) -> None:
    from datetime import date

    inactive = SupportLinkFactory.create(active=False)
    ended = SupportLinkFactory.create(valid_from=date(2020, 1, 1), valid_to=date(2020, 12, 31))
    for link in (inactive, ended):
        response = steward_client.patch(
            f"/api/v1/facilities/{link.hub_id}/", {"tier": Tier.COMMUNE}, format="json"
        )
        assert response.status_code == 200, response.content
        assert Facility.objects.get(pk=link.hub_id).tier == Tier.COMMUNE


def test_registry_check_lists_links_stored_upside_down_before_the_rule(db: Any) -> None:
    """Rows written before the tier rule (or around the services) are found, not assumed
    away: the command names each link in effect whose hub is below its spoke."""
    hub = FacilityFactory.create(code="HUB", tier=Tier.PROVINCIAL)
    spoke = FacilityFactory.create(code="SPOKE", tier=Tier.DISTRICT)
    upside = SupportLinkFactory.create(hub=hub, spoke=spoke)
    SupportLink.objects.filter(pk=upside.pk).update(hub=spoke, spoke=hub)  # around the rule
    off = SupportLinkFactory.create(hub=hub, spoke=FacilityFactory.create(tier=Tier.COMMUNE))
    SupportLink.objects.filter(pk=off.pk).update(
        hub=FacilityFactory.create(code="LOW", tier=Tier.COMMUNE),
        spoke=FacilityFactory.create(code="HIGH", tier=Tier.CENTRAL),
        active=False,  # switched off: supports nothing, blocks nothing
    )
    out = io.StringIO()

    with pytest.raises(CommandError, match="1 support link"):
        call_command("registry_check", stdout=out)

    assert f"support link #{upside.pk}: hub SPOKE (tier 3) is below spoke HUB (tier 2)" in (
        out.getvalue()
    )
    assert f"#{off.pk}" not in out.getvalue()
    SupportLink.objects.filter(pk=upside.pk).update(active=False)
    out = io.StringIO()
    call_command("registry_check", stdout=out)
    assert "no problem found" in out.getvalue()
