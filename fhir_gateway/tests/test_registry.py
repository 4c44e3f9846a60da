"""Registry resources (IHE mCSD): projection, read, vread, history, search, paging."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import quote, urlsplit

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fhir_gateway import registry_projection
from fhir_gateway.mcsd import facility_resources
from fhir_gateway.models import FhirResource, ProjectionCheckpoint
from fhir_gateway.registry_projection import (
    CHECKPOINT,
    project_registry,
    project_registry_incremental,
)
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.versions import model_class
from registry.importing import facilities_for_export
from registry.models import Department, Facility, OperationalStatus
from tests.factories import (
    CARDIOLOGY,
    PEDIATRICS,
    DepartmentFactory,
    FacilityFactory,
    PractitionerRoleFactory,
    UserFactory,
)
from tests.shared_data import FHIR_EXAMPLES

EXAMPLES = FHIR_EXAMPLES
R4_EXAMPLES = [
    "Organization-f001.json",
    "Organization-hl7.json",
    "Location-1.json",
    "HealthcareService-example.json",
    "Endpoint-example.json",
    "OrganizationAffiliation-example.json",
    "PractitionerRole-example.json",
]
R5_EXAMPLES = [
    "organization-example-f001-burgers.json",
    "location-example.json",
    "healthcareservice-example.json",
    "endpoint-example.json",
    "organizationaffiliation-example.json",
    "practitionerrole-example.json",
]


def _ids(response) -> list[str]:
    bundle = json.loads(response.content)
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def _current(resource_type: str, pk: int) -> FhirResource:
    return FhirResource.objects.get(
        resource_type=resource_type, logical_id=str(pk), is_current=True
    )


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    ("version", "name"), [("4.0", n) for n in R4_EXAMPLES] + [("5.0", n) for n in R5_EXAMPLES]
)
def test_official_examples_parse_and_posting_them_is_405(fhir, version, name):
    folder = "R4" if version == "4.0" else "R5"
    body = json.loads((EXAMPLES / folder / name).read_text())
    model = model_class(body["resourceType"], version).model_validate(body)
    assert model.get_resource_type() == body["resourceType"]
    response = fhir.post(
        f"/fhir/{body['resourceType']}",
        body,
        content_type=f"application/fhir+json; fhirVersion={version}",
    )
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert outcome_issue(response)["code"] == "not-supported"
    assert not FhirResource.objects.filter(resource_type=body["resourceType"]).exists()


# --------------------------------------------------------------------------- projection


def test_projection_renders_every_row_valid_in_r4_and_r5(network):
    rows = FhirResource.objects.filter(is_current=True)
    assert sorted(rows.values_list("resource_type", flat=True)) == sorted(
        ["Organization"] * 3
        + ["Location"] * 3
        + ["HealthcareService"] * 2
        + ["Endpoint", "OrganizationAffiliation", "PractitionerRole"]
    )
    for row in rows:
        model_class(row.resource_type, "4.0").model_validate(json.loads(row.json_r4))
        model_class(row.resource_type, "5.0").model_validate(json.loads(row.json_r5))


def test_mapping_of_a_facility_department_link_and_endpoint(network):
    org = json.loads(_current("Organization", network.spoke.pk).json_r4)
    assert org["identifier"][0] == {
        "system": "https://consilium.example.org/fhir/sid/facility-code",
        "value": "CODAO",
    }
    assert org["partOf"] == {"reference": f"Organization/{network.hub.pk}"}
    assert org["address"] == [{"use": "work", "country": "VN"}]
    org5 = json.loads(_current("Organization", network.spoke.pk).json_r5)
    assert "address" not in org5
    assert org5["contact"] == [{"address": {"use": "work", "country": "VN"}}]
    loc = json.loads(_current("Location", network.spoke.pk).json_r4)
    assert loc["position"] == {"longitude": 106.6, "latitude": 8.6833}
    assert loc["managingOrganization"] == {"reference": f"Organization/{network.spoke.pk}"}
    service = json.loads(_current("HealthcareService", network.pediatrics.pk).json_r4)
    assert service["specialty"] == [
        {
            "coding": [
                {
                    "system": "http://snomed.info/sct",
                    "code": PEDIATRICS,
                    "display": "Pediatric specialty",
                }
            ]
        }
    ]
    assert service["providedBy"] == {"reference": f"Organization/{network.hub.pk}"}
    affiliation = json.loads(_current("OrganizationAffiliation", network.link.pk).json_r4)
    assert affiliation["organization"] == {"reference": f"Organization/{network.hub.pk}"}
    assert affiliation["participatingOrganization"] == {
        "reference": f"Organization/{network.spoke.pk}"
    }
    assert affiliation["period"] == {"start": network.link.valid_from.isoformat()}
    assert [c["coding"][0]["code"] for c in affiliation["specialty"]] == [PEDIATRICS]
    endpoint4 = json.loads(_current("Endpoint", network.endpoint.pk).json_r4)
    endpoint5 = json.loads(_current("Endpoint", network.endpoint.pk).json_r5)
    assert endpoint4["connectionType"]["code"] == "hl7-fhir-rest"
    assert endpoint5["connectionType"][0]["coding"][0]["code"] == "hl7-fhir-rest"
    assert endpoint4["address"] == endpoint5["address"] == "https://codao.example.org/fhir"


def test_projection_stores_a_new_version_only_on_change(network):
    before = FhirResource.objects.count()
    report = project_registry()
    assert report.created == report.updated == report.deleted == {}
    assert FhirResource.objects.count() == before
    Facility.objects.filter(pk=network.spoke.pk).update(name="TTYT Côn Đảo")
    network.spoke.refresh_from_db()
    report = project_registry()
    assert report.updated == {"Organization": 1, "Location": 1}
    row = _current("Organization", network.spoke.pk)
    assert (row.version_id, json.loads(row.json_r4)["name"]) == (2, "TTYT Côn Đảo")


def test_incremental_projection_uses_the_checkpoint(network):
    project_registry_incremental()
    checkpoint = ProjectionCheckpoint.objects.get(name=CHECKPOINT)
    # A facility changed long ago (before the overlap) is not looked at again...
    Facility.objects.filter(pk=network.lao.pk).update(
        name="Renamed", updated_at=timezone.now() - timedelta(days=1)
    )
    project_registry_incremental()
    assert _current("Organization", network.lao.pk).version_id == 1
    # ...one changed since is.
    Facility.objects.filter(pk=network.lao.pk).update(updated_at=timezone.now())
    project_registry_incremental()
    assert _current("Organization", network.lao.pk).version_id == 2
    assert ProjectionCheckpoint.objects.get(name=CHECKPOINT).watermark > checkpoint.watermark


@contextlib.contextmanager
def _projection_held_elsewhere() -> Iterator[None]:
    """Another run (another process, another machine) holds the projection's lease."""
    with registry_projection.projection_lock(wait=False) as got:
        assert got
        yield


def test_a_projection_run_while_another_runs_does_nothing(network):
    """Beat's next run while a slow first one still went stored the same content again as
    new versions (found by an operator): a run that finds the lock taken skips."""
    project_registry_incremental()
    Facility.objects.filter(pk=network.lao.pk).update(name="Renamed", updated_at=timezone.now())
    versions = FhirResource.objects.count()

    with _projection_held_elsewhere():
        assert project_registry_incremental() is None
        assert FhirResource.objects.count() == versions

    assert project_registry_incremental() is not None
    assert _current("Organization", network.lao.pk).version_id == 2
    # A lease whose run died (its worker killed) ends: the next run takes over.
    ProjectionCheckpoint.objects.filter(name=registry_projection.LEASE_NAME).update(
        watermark=timezone.now() - timedelta(seconds=1)
    )
    assert project_registry_incremental() is not None
    ProjectionCheckpoint.objects.filter(name=registry_projection.LEASE_NAME).update(
        watermark=timezone.now() + timedelta(minutes=1)
    )
    assert project_registry_incremental() is None


def test_a_waiting_projection_says_so_once_and_runs_when_the_lease_ends(db):
    ProjectionCheckpoint.objects.create(  # another run's lease, ending in 0.2 s
        name=registry_projection.LEASE_NAME, watermark=timezone.now() + timedelta(milliseconds=200)
    )
    said: list[str] = []

    with registry_projection.projection_lock(
        wait=True, waiting=lambda: said.append("waiting"), poll_seconds=0.02
    ) as got:
        assert got

    assert said == ["waiting"]


def test_deleted_department_becomes_a_deletion_version(fhir, network):
    pk = network.cardiology.pk
    Department.objects.filter(pk=pk).delete()
    report = project_registry()
    assert report.deleted == {"HealthcareService": 1}
    assert fhir.get(f"/fhir/HealthcareService/{pk}").status_code == 410
    assert _ids(fhir.get("/fhir/HealthcareService")) == [str(network.pediatrics.pk)]


def test_management_command(network, capsys):
    call_command("fhir_project_registry")
    assert capsys.readouterr().out == (
        "created: none\nupdated: none\ndeleted: none\nunchanged: Endpoint 1, "
        "HealthcareService 2, Location 3, Organization 3, OrganizationAffiliation 1, "
        "PractitionerRole 1\n"
    )


# --------------------------------------------------------------------------- reads


def test_read_returns_the_stored_bytes_without_fhir_resources(fhir, network, no_serialisation):
    for rtype, pk in [
        ("Organization", network.hub.pk),
        ("HealthcareService", network.pediatrics.pk),
    ]:
        row = _current(rtype, pk)
        r4 = fhir.get(f"/fhir/{rtype}/{pk}")
        r5 = fhir.get(f"/fhir/{rtype}/{pk}", Accept=FHIR_R5)
        assert r4.content == row.json_r4.encode()
        assert r5.content == row.json_r5.encode()
        assert r4["ETag"] == 'W/"1"'
        search = fhir.get(f"/fhir/{rtype}?_id={pk}")
        assert row.json_r4.encode() in search.content
        history = fhir.get(f"/fhir/{rtype}/{pk}/_history")
        assert row.json_r4.encode() in history.content


def test_search_runs_in_constant_queries(fhir, network):
    for n in range(20):
        FacilityFactory.create(code=f"X{n}", name=f"Nhi {n}")
    project_registry()
    fhir.get("/fhir/Organization?_count=1")  # the token's last_used_at is written once
    with CaptureQueriesContext(connection) as small:
        fhir.get("/fhir/Organization?name=nhi&_count=2")
    with CaptureQueriesContext(connection) as large:
        fhir.get("/fhir/Organization?name=nhi&_count=20")
    assert len(small) == len(large) <= 5


# --------------------------------------------------------------------------- searches


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("name=benh vien nhi", ["hub"]),
        ("name=Bệnh Viện", ["hub"]),
        ("name:contains=children", ["hub"]),
        ("name=con dao", ["spoke"]),
        ("name=nhi,mahosot", ["hub", "lao"]),
        ("identifier=CODAO", ["spoke"]),
        ("identifier=https://moh.gov.vn/fac|01-001", ["hub"]),
        ("identifier=https://consilium.example.org/fhir/sid/facility-code|BVNTU", ["hub"]),
        ("identifier=https://other|BVNTU", []),
        ("type=https://consilium.example.org/fhir/CodeSystem/facility-tier|1", ["hub", "lao"]),
        ("type=3", ["spoke"]),
        ("address-country=LA", ["lao"]),
        ("address-country=lao", ["lao"]),
        ("partof=Organization/{hub}", ["spoke"]),
        ("partof={hub}", ["spoke"]),
        ("partof=http://testserver/fhir/Organization/{hub}", ["spoke"]),  # our base
        ("partof=http://elsewhere/fhir/Organization/{hub}", []),  # another server's
        ("identifier=https://moh.gov.vn/fac|", ["hub"]),  # every code of the system
        ("identifier=|01-001", []),  # no system: ours always have one
        ("partof=Location/{hub}", []),
        ("partof=abc", []),
        ("name=nhi&address-country=LA", []),
        ("_id={spoke},{lao}", ["spoke", "lao"]),
    ],
)
def test_organization_searches(fhir, network, query, expected):
    names = {"hub": network.hub.pk, "spoke": network.spoke.pk, "lao": network.lao.pk}
    response = fhir.get("/fhir/Organization?" + query.format(**names))
    assert response.status_code == 200
    assert _ids(response) == [str(names[n]) for n in sorted(expected, key=lambda n: names[n])]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("near=21.03|105.80|5|km", ["hub"]),
        ("near=21.03|105.80|1500", ["hub", "lao", "spoke"]),  # nearest first
        ("near=8.68|106.6|10", ["spoke"]),
        ("near=0|0|10|km", []),
        ("organization=Organization/{lao}", ["lao"]),
        ("status=active", ["hub", "spoke", "lao", "member"]),
        ("status=inactive", []),
        ("address-country=VN&near=21.03|105.80|1500", ["hub", "spoke"]),
    ],
)
def test_location_searches(fhir, network, query, expected):
    names = {"hub": network.hub.pk, "spoke": network.spoke.pk, "lao": network.lao.pk}
    names["member"] = Facility.objects.get(code="MEMBER").pk  # the caller's own, no coordinates
    response = fhir.get("/fhir/Location?" + query.format(**names))
    assert response.status_code == 200
    if "near=" not in query:  # the type's own order (near: nearest first, as listed)
        expected = sorted(expected, key=lambda n: names[n])
    assert _ids(response) == [str(names[n]) for n in expected]


# Facilities along the 100°E meridian, north of a point at 10°N (1° of latitude is
# 111.195 km): name -> (latitude or None, name). Made in this order (ids ascending), which
# is not their order by distance; two_a and two_b tie (same place), their names reversed.
MERIDIAN = {
    "one": (11.0, "Bravo"),
    "half": (10.5, "Delta"),
    "three": (13.0, "Charlie"),
    "two_a": (12.0, "Zulu"),
    "two_b": (12.0, "Alpha"),
    "far": (14.0, "Echo"),  # 444.78 km: outside 400
    "blank": (None, "Foxtrot"),  # no coordinates: never near
    "here": (10.0, "Golf"),
}
NEAR = "near=10|100|400|km"
DISTANCES = {
    "here": 0.0,
    "half": 55.598,
    "one": 111.195,
    "two_a": 222.39,
    "two_b": 222.39,
    "three": 333.585,
}
NEAREST_FIRST = ["here", "half", "one", "two_a", "two_b", "three"]
FARTHEST_FIRST = ["three", "two_a", "two_b", "one", "half", "here"]  # ties still by id


@pytest.fixture
def meridian(db: None) -> dict[str, str]:
    """The MERIDIAN facilities, projected: name -> Location id."""
    made = {
        key: FacilityFactory.create(
            name=name, latitude=lat, longitude=None if lat is None else 100.0
        )
        for key, (lat, name) in MERIDIAN.items()
    }
    project_registry()
    return {key: str(facility.pk) for key, facility in made.items()}


def _distances(bundle: dict) -> list[float | None]:
    """Each entry's location-distance in km (None: the entry has no search extension)."""
    found: list[float | None] = []
    for entry in bundle.get("entry", []):
        extensions = entry["search"].get("extension")
        if extensions is None:
            found.append(None)
            continue
        [extension] = extensions
        assert extension["url"] == "http://hl7.org/fhir/StructureDefinition/location-distance"
        distance = extension["valueDistance"]
        assert {k: v for k, v in distance.items() if k != "value"} == {
            "unit": "km",
            "system": "http://unitsofmeasure.org",
            "code": "km",
        }
        found.append(distance["value"])
    return found


def _walk(fhir, url: str, accept: str = FHIR_R4) -> tuple[list[str], list[float | None], set]:
    """Follows the next links from ``url``: every entry's id and distance, and the totals."""
    ids: list[str] = []
    distances: list[float | None] = []
    totals = set()
    while url:
        bundle = json.loads(fhir.get(url, Accept=accept).content)
        totals.add(bundle.get("total"))
        ids += [e["resource"]["id"] for e in bundle.get("entry", [])]
        distances += _distances(bundle)
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        url = "" if not nxt else urlsplit(nxt[0])._replace(scheme="", netloc="").geturl()
    return ids, distances, totals


@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5])
def test_near_answers_nearest_first_each_with_its_distance(fhir, meridian, accept):
    # Given facilities at known distances north of a point
    # When a Location search gives near and no _sort
    response = fhir.get(f"/fhir/Location?{NEAR}", Accept=accept)

    # Then the matches come nearest first (ties by id), each with its distance in km
    assert response.status_code == 200
    bundle = json.loads(response.content)
    assert _ids(response) == [meridian[n] for n in NEAREST_FIRST]
    assert _distances(bundle) == [DISTANCES[n] for n in NEAREST_FIRST]
    assert bundle["total"] == len(NEAREST_FIRST)
    # The self link says the order it answers in
    self_url = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert "_sort=near" in self_url
    # And the Bundle (entry.search with its extension) is valid in the answer's version
    model_class("Bundle", "5.0" if accept == FHIR_R5 else "4.0").model_validate(bundle)


def test_sort_near_descending_is_farthest_first(fhir, meridian):
    response = fhir.get(f"/fhir/Location?{NEAR}&_sort=-near")

    assert response.status_code == 200
    assert _ids(response) == [meridian[n] for n in FARTHEST_FIRST]
    assert _distances(json.loads(response.content)) == [DISTANCES[n] for n in FARTHEST_FIRST]
    explicit = fhir.get(f"/fhir/Location?{NEAR}&_sort=near")
    assert _ids(explicit) == [meridian[n] for n in NEAREST_FIRST]


@pytest.mark.parametrize(
    ("sort", "order"),
    [
        # name first; near the last key (the distances are still in the entries)
        ("name", ["two_b", "one", "three", "half", "here", "two_a"]),
        # distance first, the tie (two_a, two_b) by name
        ("near,name", ["here", "half", "one", "two_b", "two_a", "three"]),
        ("-near,-name", ["three", "two_a", "two_b", "one", "half", "here"]),
    ],
)
def test_near_combines_with_other_sort_keys(fhir, meridian, sort, order):
    response = fhir.get(f"/fhir/Location?{NEAR}&_sort={sort}")

    assert response.status_code == 200
    assert _ids(response) == [meridian[n] for n in order]
    assert _distances(json.loads(response.content)) == [DISTANCES[n] for n in order]


@pytest.mark.parametrize("sort", ["near", "-near"])
@pytest.mark.parametrize("accept", [FHIR_R4, FHIR_R5])
def test_near_pages_by_cursor_and_offset_give_every_match_once_in_order(
    fhir, meridian, sort, accept
):
    expected = NEAREST_FIRST if sort == "near" else FARTHEST_FIRST
    # When the pages of two are walked by their next links (cursors after a distance;
    # the tie two_a/two_b is cut by a page's end one way or the other)
    ids, distances, totals = _walk(fhir, f"/fhir/Location?{NEAR}&_sort={sort}&_count=2", accept)
    # Then every match comes once, in the order, with its distance, and the total holds
    assert ids == [meridian[n] for n in expected]
    assert distances == [DISTANCES[n] for n in expected]
    assert totals == {len(expected)}
    # And pages by _offset cut the same order
    by_offset: list[str] = []
    for offset in (0, 2, 4, 6):
        page = fhir.get(f"/fhir/Location?{NEAR}&_sort={sort}&_count=2&_offset={offset}")
        by_offset += _ids(page)
    assert by_offset == ids


def test_default_near_order_pages_by_cursor(fhir, meridian):
    ids, distances, _totals = _walk(fhir, f"/fhir/Location?{NEAR}&_count=4")

    assert ids == [meridian[n] for n in NEAREST_FIRST]
    assert distances == [DISTANCES[n] for n in NEAREST_FIRST]


def test_a_near_cursor_is_for_its_point_only(fhir, meridian):
    # Given the next link of a near search
    bundle = json.loads(fhir.get(f"/fhir/Location?{NEAR}&_count=2").content)
    url = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    # When its cursor is sent with another point
    moved = url.replace("near=10%7C100%7C400%7Ckm", "near=10%7C100.5%7C400%7Ckm")
    assert moved != url
    response = fhir.get(urlsplit(moved)._replace(scheme="", netloc="").geturl())
    # Then it is refused (its distances were from the first point)
    assert response.status_code == 400
    assert outcome_issue(response)["expression"] == ["_cursor"]


@pytest.mark.parametrize("query", ["_sort=near", "_sort=-near", "_sort=name,near"])
def test_sort_by_near_without_near_is_400(fhir, meridian, query):
    response = fhir.get(f"/fhir/Location?{query}")

    assert response.status_code == 400
    issue = outcome_issue(response)
    assert issue["code"] == "invalid"
    assert "_sort=near needs one near parameter" in issue["diagnostics"]


def test_two_near_parameters_give_no_distance_order(fhir, meridian):
    # Given two near parameters (two circles, AND): no one point to measure from
    both = f"{NEAR}&near=12|100|150"
    # When sorted by near: 400
    refused = fhir.get(f"/fhir/Location?{both}&_sort=near")
    assert refused.status_code == 400
    assert "and this search has 2" in outcome_issue(refused)["diagnostics"]
    # Without _sort: the type's own order (id), no distances
    response = fhir.get(f"/fhir/Location?{both}")
    assert response.status_code == 200
    inside = ["one", "two_a", "two_b", "three"]
    assert _ids(response) == sorted((meridian[n] for n in inside), key=int)
    assert _distances(json.loads(response.content)) == [None] * len(inside)


@pytest.mark.parametrize(
    ("status", "org_active", "location_status", "service_active"),
    [
        (OperationalStatus.ACTIVE, True, "active", True),
        (OperationalStatus.SUSPENDED, True, "suspended", False),
        (OperationalStatus.INACTIVE, True, "inactive", False),
        (OperationalStatus.CLOSED, False, "inactive", False),
    ],
)
def test_a_facility_status_reads_as_the_mcsd_export_writes_it(
    fhir, network, status, org_active, location_status, service_active
):
    # Given the hub in one operational status, projected
    Facility.objects.filter(pk=network.hub.pk).update(operational_status=status)
    project_registry()
    hub = str(network.hub.pk)
    org = json.loads(fhir.get(f"/fhir/Organization/{hub}").content)
    location = json.loads(fhir.get(f"/fhir/Location/{hub}").content)
    service = json.loads(fhir.get(f"/fhir/HealthcareService/{network.pediatrics.pk}").content)
    # Then the served resources say what the lossless mCSD export says
    assert (org["active"], location["status"], service["active"]) == (
        org_active,
        location_status,
        service_active,
    )
    exported = {
        r["resourceType"]: r
        for r in facility_resources(facilities_for_export(None).get(pk=network.hub.pk))
    }
    assert exported["Organization"]["active"] == org["active"]
    assert exported["Location"]["status"] == location["status"]
    # And each search finds the hub exactly when the rendered value matches
    for query, rendered in (
        (f"/fhir/Organization?_id={hub}&active=true", org_active),
        (f"/fhir/Organization?_id={hub}&active=false", not org_active),
        (f"/fhir/Location?_id={hub}&status={location_status}", True),
        (f"/fhir/HealthcareService?organization={hub}&active=true", service_active),
        (f"/fhir/HealthcareService?organization={hub}&active=false", not service_active),
    ):
        assert bool(_ids(fhir.get(query))) is rendered, query


def test_a_rendering_revision_reprojects_rows_the_incremental_run_would_skip(network):
    # Given a stored Organization whose hash is of an earlier rendering (as before a
    # deploy), and the beat's checkpoint under the earlier revision's name
    project_registry_incremental()
    stale = _current("Organization", network.hub.pk)
    FhirResource.objects.filter(pk=stale.pk).update(content_hash="rendered-by-older-code")
    Facility.objects.filter(pk=network.hub.pk).update(
        updated_at=timezone.now() - timedelta(hours=1)
    )
    ProjectionCheckpoint.objects.filter(name=CHECKPOINT).delete()
    ProjectionCheckpoint.objects.create(name="registry", watermark=timezone.now())
    # When the beat's incremental run comes (the hub's row did not change since)
    project_registry_incremental()
    # Then the row was compared again and stored under the current rendering
    current = _current("Organization", network.hub.pk)
    assert current.version_id == stale.version_id + 1
    assert current.content_hash != "rendered-by-older-code"
    # And the next run, under the new checkpoint, leaves it alone
    project_registry_incremental()
    assert _current("Organization", network.hub.pk).version_id == current.version_id


def test_healthcare_service_and_other_searches(fhir, network):
    ped, card = str(network.pediatrics.pk), str(network.cardiology.pk)
    hub = network.hub.pk
    assert _ids(
        fhir.get(f"/fhir/HealthcareService?specialty=http://snomed.info/sct|{PEDIATRICS}")
    ) == [ped]
    assert _ids(fhir.get(f"/fhir/HealthcareService?specialty={CARDIOLOGY}")) == [card]
    assert _ids(fhir.get("/fhir/HealthcareService?specialty=http://snomed.info/sct|")) == [
        ped,
        card,
    ]
    assert _ids(fhir.get(f"/fhir/HealthcareService?specialty=|{PEDIATRICS}")) == []
    assert _ids(fhir.get("/fhir/HealthcareService?specialty=http://other|")) == []
    assert _ids(fhir.get(f"/fhir/HealthcareService?organization={hub}")) == [ped, card]
    assert _ids(fhir.get(f"/fhir/HealthcareService?location=Location/{hub}")) == [ped, card]
    assert _ids(fhir.get("/fhir/HealthcareService?name=khoa nhi")) == [ped]
    assert _ids(fhir.get(f"/fhir/HealthcareService?organization={network.lao.pk}")) == []
    link = str(network.link.pk)
    assert _ids(fhir.get(f"/fhir/OrganizationAffiliation?primary-organization={hub}")) == [link]
    assert _ids(fhir.get(f"/fhir/OrganizationAffiliation?participating-organization={hub}")) == []
    assert _ids(fhir.get(f"/fhir/OrganizationAffiliation?specialty={PEDIATRICS}")) == [link]
    assert _ids(fhir.get(f"/fhir/OrganizationAffiliation?specialty={CARDIOLOGY}")) == []
    assert _ids(fhir.get(f"/fhir/Endpoint?organization={network.spoke.pk}")) == [
        str(network.endpoint.pk)
    ]
    assert _ids(fhir.get("/fhir/Endpoint?status=off")) == []
    role = str(network.role.pk)
    assert _ids(fhir.get(f"/fhir/PractitionerRole?service={ped}")) == [role]
    assert _ids(fhir.get(f"/fhir/PractitionerRole?specialty={PEDIATRICS}&role=consultant")) == [
        role
    ]
    assert _ids(fhir.get("/fhir/PractitionerRole?role=nurse")) == []


def test_a_practitioner_role_names_the_account_a_conference_invites(fhir, network):
    """A schedule's ``experts`` input names user accounts; nothing over FHIR told an
    integrator which id a consultant has (found by an integrator)."""
    user = UserFactory.create()
    without = PractitionerRoleFactory.create(department=network.pediatrics)
    network.role.practitioner.user = user
    network.role.practitioner.save()
    project_registry()

    entries = json.loads(
        fhir.get(f"/fhir/PractitionerRole?service={network.pediatrics.pk}").content
    )["entry"]
    practitioners = {e["resource"]["id"]: e["resource"]["practitioner"] for e in entries}

    assert practitioners[str(network.role.pk)]["identifier"] == {
        "system": "https://consilium.example.org/fhir/sid/user",
        "value": str(user.pk),
    }
    assert "identifier" not in practitioners[str(without.pk)]
    assert practitioners[str(without.pk)]["display"] == str(without.practitioner)


def test_paging_walks_every_result_once(fhir, network):
    for n in range(7):
        FacilityFactory.create(code=f"P{n}", name=f"Paging {n}")
    project_registry()
    url = "/fhir/Organization?name=paging&_count=3"
    seen: list[str] = []
    totals = set()
    pages = 0
    while url:
        bundle = json.loads(fhir.get(url).content)
        totals.add(bundle["total"])
        seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        url = "" if not nxt else urlsplit(nxt[0])._replace(scheme="", netloc="").geturl()
        pages += 1
    expected = sorted(
        FacilityFactory._meta.model.objects.filter(code__startswith="P").values_list(
            "pk", flat=True
        )
    )
    assert seen == [str(pk) for pk in expected]
    assert (pages, totals) == (3, {7})


def test_count_is_capped_and_total_none_omits_total(fhir, network):
    bundle = json.loads(fhir.get("/fhir/Organization?_count=100000").content)
    assert bundle["link"][0]["url"].endswith("_count=500")
    none = json.loads(fhir.get("/fhir/Organization?_total=none").content)
    assert "total" not in none
    assert len(none["entry"]) == 4
    zero = json.loads(fhir.get("/fhir/Organization?_count=0").content)
    assert (zero["total"], "entry" in zero) == (4, False)


def test_last_updated_filters(fhir, network):
    Facility.objects.filter(pk=network.lao.pk).update(name="Mahosot")
    project_registry()
    changed = _current("Organization", network.lao.pk).last_updated
    stamp = quote((changed - timedelta(milliseconds=1)).isoformat())
    assert _ids(fhir.get(f"/fhir/Organization?_lastUpdated=gt{stamp}")) == [str(network.lao.pk)]
    assert str(network.lao.pk) not in _ids(fhir.get(f"/fhir/Organization?_lastUpdated=lt{stamp}"))
    today = changed.date().isoformat()
    assert len(_ids(fhir.get(f"/fhir/Organization?_lastUpdated={today}"))) == 4
    assert _ids(fhir.get("/fhir/Organization?_lastUpdated=le2000-01")) == []
    assert len(_ids(fhir.get("/fhir/Organization?_lastUpdated=ge2000&_lastUpdated=lt2999"))) == 4


def test_search_in_r5_returns_r5_renderings(fhir, network):
    response = fhir.get(f"/fhir/Organization?_id={network.hub.pk}", Accept=FHIR_R5)
    assert response["Content-Type"] == FHIR_R5
    assert _current("Organization", network.hub.pk).json_r5.encode() in response.content
    model_class("Bundle", "5.0").model_validate(json.loads(response.content))


def test_bundles_validate(fhir, network):
    bundle = json.loads(fhir.get("/fhir/Organization").content)
    model_class("Bundle", "4.0").model_validate(bundle)
    history = json.loads(fhir.get(f"/fhir/Organization/{network.hub.pk}/_history").content)
    model_class("Bundle", "4.0").model_validate(history)


def test_post_search(fhir, network):
    response = fhir.client.post(
        "/fhir/Organization/_search",
        data="name=mahosot",
        content_type="application/x-www-form-urlencoded",
        headers={"Authorization": f"Bearer {fhir.token}"},
    )
    assert response.status_code == 200
    assert _ids(response) == [str(network.lao.pk)]


def test_registry_searches_sort_by_id_and_last_update(fhir, network):
    def ids(query: str) -> list[str]:
        found = json.loads(fhir.get(f"/fhir/Organization?{query}&_count=50").content)
        return [e["resource"]["id"] for e in found["entry"]]

    ascending = ids("_sort=_id")
    assert ascending == sorted(ascending) and len(ascending) >= 3
    assert ids("_sort=-_id") == ascending[::-1]
    rows = FhirResource.objects.filter(resource_type="Organization", is_current=True)
    # Ties (versions stored in one projection) in the type's own order: source_pk.
    newest = rows.order_by("-last_updated", "source_pk").values_list("logical_id", flat=True)
    assert ids("_sort=-_lastUpdated") == list(newest)


@pytest.mark.parametrize(
    ("resource_type", "model"),
    [("Organization", Facility), ("Location", Facility), ("HealthcareService", Department)],
)
def test_registry_searches_sort_by_name(fhir, network, resource_type, model):
    """``_sort=name`` orders by the source row's name (ties by the row), both ways."""
    if model is Facility:
        FacilityFactory.create(name="Zeta Provincial Hospital")  # made first, named last
        FacilityFactory.create(name="Alpha District Hospital")
    else:
        DepartmentFactory.create(name="Zeta Surgery")
        DepartmentFactory.create(name="Alpha Surgery")
    project_registry()

    def ids(query: str) -> list[str]:
        found = json.loads(fhir.get(f"/fhir/{resource_type}?{query}&_count=50").content)
        return [e["resource"]["id"] for e in found["entry"]]

    by_name = [str(pk) for pk in model.objects.order_by("name", "pk").values_list("pk", flat=True)]
    assert len(by_name) >= 3
    assert ids("_sort=name") == by_name
    assert ids("_sort=name") != ids("_sort=_id")  # the names are not in the rows' order
    backwards = model.objects.order_by("-name", "pk").values_list("pk", flat=True)
    assert ids("_sort=-name") == [str(pk) for pk in backwards]
    paged = json.loads(fhir.get(f"/fhir/{resource_type}?_sort=name&_count=2&_offset=1").content)
    assert [e["resource"]["id"] for e in paged["entry"]] == by_name[1:3]


def test_sort_by_name_is_not_offered_where_there_is_no_name(fhir, network):
    response = fhir.get("/fhir/Endpoint?_sort=name")
    assert response.status_code == 200
    assert response["X-FHIR-Ignored-Parameters"] == "_sort=name"
    strict = fhir.get("/fhir/Endpoint?_sort=name", Prefer="handling=strict")
    assert strict.status_code == 400


def test_count_zero_pages_have_no_previous_link(fhir, network):
    """Found by a review: with _count=0 the previous page of offset 5 was offset 5 itself,
    and a client following it looped for ever."""
    bundle = json.loads(fhir.get("/fhir/Organization?_count=0&_offset=2").content)
    assert [link["relation"] for link in bundle["link"]] == ["self"]
    assert bundle["total"] == 4
    paged = json.loads(fhir.get("/fhir/Organization?_count=1&_offset=2").content)
    previous = next(link["url"] for link in paged["link"] if link["relation"] == "previous")
    assert previous.endswith("_count=1&_offset=1")


# --- near read as FHIR decimals (review suspicion) --------------------------------------
# Python's float() read "1_0" as 10 and took "+10", "10.", " 10"; a fifth part was ignored.


@pytest.mark.parametrize(
    ("loose", "strict"),
    [
        ("1_0|100|400|km", "1e1|100|400|km"),
        ("10|1_00|400", "10|100|400"),
        ("+10|100|400|km", "10|100|400|km"),
        ("10.|100|400|km", "10.0|100|400|km"),
        (" 10|100|400|km", "10|100|400|km"),
        ("10|100|400 |km", "10|100|400|km"),
        ("010|100|400|km", "10|100|400|km"),
        ("\u0661\u0660|100|400|km", "10|100|400|km"),  # Arabic-Indic digits: 10
        ("10|100|4_00|km", "10|100|4.0E2|km"),
        ("10|100|400|km|x", "10|100|400|km"),
    ],
)
def test_near_takes_fhir_decimals_and_four_parts_only(fhir, meridian, loose, strict):
    # Given a near point written loosely, and the same point as FHIR decimals
    # When a Location search gives each
    refused = fhir.get(f"/fhir/Location?near={quote(loose)}")
    answered = fhir.get(f"/fhir/Location?near={quote(strict)}")

    # Then the loose one is 400 invalid naming near; the strict one is answered
    assert refused.status_code == 400, refused.content
    issue = outcome_issue(refused)
    assert (issue["code"], issue["expression"]) == ("invalid", ["near"])
    assert "lat|lon|distance|km" in issue["diagnostics"]
    assert answered.status_code == 200, answered.content
    expected = fhir.get(f"/fhir/Location?{NEAR}")
    assert _ids(answered) == _ids(expected) != []
