"""The registry as FHIR resources after changes that reach a facility through another row
(found by a review): the beat's incremental projection sees them, searches agree with
what is rendered, addresses read as the mCSD export writes them."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import pytest
from django.core.management import call_command
from django.utils import timezone

from fhir_gateway.mcsd import facility_resources
from fhir_gateway.models import FhirResource, ProjectionCheckpoint
from fhir_gateway.registry_projection import (
    CHECKPOINT,
    project_registry,
    project_registry_incremental,
)
from registry.models import Facility, Practitioner
from registry.selectors import facility_queryset
from registry.services import area_save, facility_delete
from tests.factories import AreaFactory, FacilityFactory

pytestmark = pytest.mark.django_db


def _ids(response: Any) -> list[str]:
    bundle = json.loads(response.content)
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def _current_json(resource_type: str, pk: int) -> dict[str, Any]:
    row = FhirResource.objects.get(resource_type=resource_type, logical_id=str(pk), is_current=True)
    return {"deleted": True} if row.deleted else dict(json.loads(row.json_r4))


def _age_everything_and_checkpoint() -> None:
    """As in production: rows last changed long ago, the beat checkpoint at 'now'."""
    Facility.objects.update(updated_at=timezone.now() - timedelta(days=1))
    ProjectionCheckpoint.objects.update_or_create(
        name=CHECKPOINT, defaults={"watermark": timezone.now()}
    )


def test_practitioner_role_active_search_agrees_with_the_rendered_active(fhir, network):
    """Rendered active = role.active AND practitioner.active; the search read role.active."""
    Practitioner.objects.filter(pk=network.role.practitioner_id).update(active=False)
    project_registry()
    rendered = _current_json("PractitionerRole", network.role.pk)
    assert rendered["active"] is False
    assert _ids(fhir.get("/fhir/PractitionerRole?active=false")) == [str(network.role.pk)]
    assert _ids(fhir.get("/fhir/PractitionerRole?active=true")) == []


def test_name_search_honours_escaped_comma(fhir, network):
    """FHIR: '\\,' in a search value is a literal comma, not an OR."""
    wanted = FacilityFactory.create(code="CM1", name="Clinic, North Wing")
    FacilityFactory.create(code="CM2", name="North Star Hospital")
    project_registry()
    response = fhir.get("/fhir/Organization?name=" + quote("clinic\\, north"))
    assert response.status_code == 200
    assert _ids(response) == [str(wanted.pk)]


def test_incremental_projection_after_parent_facility_deleted(fhir, network):
    """Deleting a parent SET_NULLs the children with an UPDATE that does not touch
    updated_at: the beat projection kept partOf pointing at a deleted Organization."""
    parent = FacilityFactory.create(code="PARENT")
    child = FacilityFactory.create(code="CHILD", parent=parent)
    project_registry()
    _age_everything_and_checkpoint()
    parent_pk = parent.pk
    facility_delete(facility=parent)  # as the admin deletes it
    project_registry_incremental()
    assert _current_json("Organization", parent_pk) == {"deleted": True}
    assert fhir.get(f"/fhir/Organization/{parent_pk}").status_code == 410
    org = _current_json("Organization", child.pk)
    loc = _current_json("Location", child.pk)
    assert "partOf" not in org, org["partOf"]
    assert "partOf" not in loc, loc["partOf"]


def test_incremental_projection_after_area_renamed(network):
    province = AreaFactory.create(code="P1", name="Old Province")
    fac = FacilityFactory.create(code="INAREA", area=province)
    project_registry()
    assert _current_json("Organization", fac.pk)["address"][0]["state"] == "Old Province"
    _age_everything_and_checkpoint()
    province.name = "New Province"
    area_save(area=province)  # as the admin saves it
    project_registry_incremental()
    assert _current_json("Organization", fac.pk)["address"][0]["state"] == "New Province"


def test_incremental_projection_after_import_adds_an_identifier(network, tmp_path: Path):
    """An mCSD import that only added an identifier did not bump updated_at."""
    fac = FacilityFactory.create(code="IMP1", name="Imported Hospital")
    project_registry()
    _age_everything_and_checkpoint()
    org, loc = facility_resources(
        facility_queryset().prefetch_related("departments", "endpoints").get(pk=fac.pk)
    )[:2]
    identifiers = cast(list[Any], org["identifier"])
    identifiers.append({"system": "https://example.org/new", "value": "N-1"})
    entries = [{"resource": org}, {"resource": loc}]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(bundle))
    out = StringIO()
    err = StringIO()
    try:
        call_command("import_facilities", str(path), "--no-progress", stdout=out, stderr=err)
    except Exception as exc:
        raise AssertionError(out.getvalue() + err.getvalue()) from exc
    assert fac.identifiers.filter(system="https://example.org/new").exists(), out.getvalue()
    project_registry_incremental()
    systems = [i["system"] for i in _current_json("Organization", fac.pk)["identifier"]]
    assert "https://example.org/new" in systems


def test_address_district_is_the_district_not_the_commune(network):
    """A facility in a commune: the projection put the commune's name in address.district
    (and lost the district); the mCSD export of the same facility says district=district."""
    province = AreaFactory.create(code="PV", name="Hà Nội")
    district = AreaFactory.create(code="DD", name="Đống Đa", parent=province)
    commune = AreaFactory.create(code="LT", name="Láng Thượng", parent=district)
    fac = FacilityFactory.create(code="COMMUNE", area=commune)
    project_registry()
    projected = _current_json("Location", fac.pk)["address"]
    exported = cast(
        dict[str, Any],
        facility_resources(
            facility_queryset().prefetch_related("departments", "endpoints").get(pk=fac.pk)
        )[1]["address"],
    )
    assert exported["district"] == "Đống Đa"
    assert projected.get("district") == exported["district"], (projected, exported)


def test_a_name_of_symbols_only_matches_nothing(fhir, network):
    response = fhir.get("/fhir/Organization?name=" + quote("🏥"))
    assert response.status_code == 200
    assert _ids(response) == []


def test_an_expired_affiliation_is_not_active(fhir, network):
    """As routing reads a support link: in force between valid_from and valid_to. It was
    served active: true (and matched active=true) after it ended."""
    from tests.factories import SupportLinkFactory

    today = timezone.localdate()
    ended = SupportLinkFactory.create(
        valid_from=today - timedelta(days=30), valid_to=today - timedelta(days=1)
    )
    future = SupportLinkFactory.create(valid_from=today + timedelta(days=3))
    current = SupportLinkFactory.create(valid_from=today - timedelta(days=3), valid_to=today)
    project_registry()
    rendered = {
        link.pk: _current_json("OrganizationAffiliation", link.pk)["active"]
        for link in (ended, future, current)
    }
    assert rendered == {ended.pk: False, future.pk: False, current.pk: True}
    active = set(_ids(fhir.get("/fhir/OrganizationAffiliation?active=true&_count=100")))
    inactive = set(_ids(fhir.get("/fhir/OrganizationAffiliation?active=false&_count=100")))
    assert str(current.pk) in active and {str(ended.pk), str(future.pk)} <= inactive
    assert not active & inactive


def test_the_admin_deletes_and_renames_through_the_services(admin_client, network):
    """Django's admin is where facilities are deleted and areas renamed: it goes through
    registry.services, so the projection sees both."""
    parent = FacilityFactory.create(code="ADM-P")
    child = FacilityFactory.create(code="ADM-C", parent=parent)
    province = AreaFactory.create(code="ADM-A", name="Old Name")
    inside = FacilityFactory.create(code="ADM-I", area=province)
    project_registry()
    _age_everything_and_checkpoint()
    response = admin_client.post(f"/admin/registry/facility/{parent.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302, response.content[:300]
    change = f"/admin/registry/administrativearea/{province.pk}/change/"
    response = admin_client.post(
        change,
        {"country": province.country_id, "level": province.level, "name": "New Name",
         "code": province.code, "name_local": ""},
    )  # fmt: skip
    assert response.status_code == 302, response.content[:600]
    project_registry_incremental()
    assert "partOf" not in _current_json("Organization", child.pk)
    assert _current_json("Organization", inside.pk)["address"][0]["state"] == "New Name"
