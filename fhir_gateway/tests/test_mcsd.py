"""IHE mCSD Bundles: import (incl. the official HL7 examples) and export round trip."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from fhir.resources.R4B.bundle import Bundle

from fhir_gateway.mcsd import resource_id
from fhir_gateway.registry_projection import FACILITY_CODE_SYSTEM, TIER_SYSTEM
from registry.models import (
    AdministrativeArea,
    Country,
    Department,
    Endpoint,
    Facility,
    FacilityIdentifier,
    FacilityRevision,
    Specialty,
)
from tests.factories import (
    AreaFactory,
    CountryFactory,
    DepartmentFactory,
    EndpointFactory,
    FacilityFactory,
    FacilityIdentifierFactory,
    SpecialtyFactory,
)
from tests.shared_data import FHIR_EXAMPLES

EXAMPLES = FHIR_EXAMPLES / "R4"
OFFICIAL = [
    "Organization-f001.json",
    "Organization-hl7.json",
    "Location-1.json",
    "HealthcareService-example.json",
    "Endpoint-example.json",
    "OrganizationAffiliation-example.json",
]
NL_MAPPING = {
    "format": "mcsd",
    "country": {"code": "NL", "name": "Netherlands"},
    "code": {"prefix": "NL-"},
    "defaults": {"tier": 2, "languages": ["nl"]},
}

pytestmark = pytest.mark.django_db


def run_import(*args: str, out: StringIO | None = None) -> str:
    out = out or StringIO()
    call_command("import_facilities", *args, "--no-progress", stdout=out, stderr=StringIO())
    return out.getvalue()


def refused_import(*args: str, match: str = "Nothing written") -> str:
    """The report of an import refused all-or-nothing (its CommandError checked)."""
    out = StringIO()
    with pytest.raises(CommandError, match=match):
        run_import(*args, out=out)
    return out.getvalue()


def export_bundle(*args: str) -> str:
    out = StringIO()
    call_command("export_facilities", "--format", "mcsd", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def registry_counts() -> dict[str, int]:
    return {
        "countries": Country.objects.count(),
        "areas": AdministrativeArea.objects.count(),
        "facilities": Facility.objects.count(),
        "identifiers": FacilityIdentifier.objects.count(),
        "departments": Department.objects.count(),
        "endpoints": Endpoint.objects.count(),
        "revisions": FacilityRevision.objects.count(),
    }


def issue_lines(output: str) -> list[str]:
    return [
        line.strip()
        for line in output.splitlines()
        if line.strip().startswith(("error:", "warning:"))
    ]


def write_bundle(path: Path, resources: list[dict[str, object]]) -> Path:
    entries = [{"resource": r} for r in resources]
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}))
    return path


def a_network() -> None:
    """A central hospital with departments and a district hospital under it, with endpoint."""
    pediatrics = SpecialtyFactory(code="394537008")
    cardiology = SpecialtyFactory(code="394579002")
    hanoi = AreaFactory(code="VN-HN", name="Hà Nội")
    ward = AreaFactory(
        parent=AreaFactory(parent=hanoi, code="VN-HN-DD", name="Đống Đa"),
        code="VN-HN-DD-LT",
        name="Láng Thượng",
    )
    central = FacilityFactory(
        code="VN-NHP",
        name="National Children's Hospital",
        name_local="Bệnh viện Nhi Trung ương",
        area=ward,
        tier=1,
        latitude=21.0245,
        longitude=105.8085,
        facility_type="Specialised hospital",
        ownership="public",
    )
    FacilityIdentifierFactory(
        facility=central, system="https://moh.gov.vn/facility-code", value="01-001"
    )
    DepartmentFactory(
        facility=central, specialty=pediatrics, offers_live=True, languages=["vi", "en"]
    )
    DepartmentFactory(facility=central, specialty=cardiology, accepting=False)
    district = FacilityFactory(
        code="VN CD/01",  # not a valid FHIR id: the resource id becomes a hash
        name="Con Dao Hospital",
        area=AreaFactory(
            parent=AreaFactory(code="VN-BV", name="Bà Rịa - Vũng Tàu"),
            code="VN-BV-CD",
            name="Côn Đảo",
        ),
        tier=3,
        parent=central,
        ownership="military",
        operational_status="suspended",
    )
    EndpointFactory(
        facility=district, base_url="https://fhir.condao.example.org/r4", name="Con Dao FHIR"
    )
    FacilityFactory(code="VN-OLD", name="Old Station", tier=4, operational_status="closed")


# --- export -------------------------------------------------------------------------------------


def test_export_is_a_valid_r4b_collection_bundle_with_each_facility() -> None:
    # Given a small network
    a_network()

    # When it is exported as mCSD
    bundle = json.loads(export_bundle())

    # Then it is a valid R4B Bundle: Organization, Location, services and endpoints per facility
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    district_id = resource_id("VN CD/01")
    assert district_id.startswith("f") and len(district_id) == 33
    assert [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]] == [
        ("Organization", district_id),
        ("Location", district_id),
        ("Endpoint", f"{district_id}.ep1"),
        ("Organization", "VN-NHP"),
        ("Location", "VN-NHP"),
        ("HealthcareService", "VN-NHP.394537008"),
        ("HealthcareService", "VN-NHP.394579002"),
        ("Organization", "VN-OLD"),
        ("Location", "VN-OLD"),
    ]
    organization = bundle["entry"][3]["resource"]
    assert organization == {
        "resourceType": "Organization",
        "id": "VN-NHP",
        "identifier": [
            {"system": FACILITY_CODE_SYSTEM, "value": "VN-NHP"},
            {"system": "https://moh.gov.vn/facility-code", "value": "01-001"},
        ],
        "active": True,
        "type": [
            {
                "coding": [
                    {
                        "system": "https://profiles.ihe.net/ITI/mCSD/CodeSystem/IHE.mCSD.Organization.Location.Types",
                        "code": "facility",
                        "display": "Facility",
                    }
                ]
            },
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                        "code": "prov",
                        "display": "Healthcare Provider",
                    }
                ]
            },
            {"coding": [{"system": TIER_SYSTEM, "code": "1", "display": "Central / national"}]},
            {
                "coding": [
                    {
                        "system": "https://consilium.example.org/fhir/CodeSystem/facility-ownership",
                        "code": "public",
                        "display": "Public",
                    }
                ]
            },
        ],
        "name": "National Children's Hospital",
        "alias": ["Bệnh viện Nhi Trung ương"],
    }
    location = bundle["entry"][4]["resource"]
    assert location["position"] == {"longitude": 105.8085, "latitude": 21.0245}
    assert location["address"] == {
        "use": "work",
        "country": "VN",
        "state": "Hà Nội",
        "district": "Đống Đa",
        "city": "Láng Thượng",
    }
    assert location["managingOrganization"] == {"reference": "Organization/VN-NHP"}
    assert location["status"] == "active"
    # the district names its parent by reference and by code
    district = bundle["entry"][0]["resource"]
    assert district["partOf"] == {
        "reference": "Organization/VN-NHP",
        "identifier": {"system": FACILITY_CODE_SYSTEM, "value": "VN-NHP"},
    }
    # closed: inactive Location of an inactive Organization
    assert (bundle["entry"][7]["resource"]["active"], bundle["entry"][8]["resource"]["status"]) == (
        False,
        "inactive",
    )


def test_mcsd_export_reads_back_losslessly(tmp_path: Path) -> None:
    # Given a network and its mCSD export
    a_network()
    first = export_bundle()
    path = tmp_path / "network.json"
    path.write_text(first, encoding="utf-8")

    # When it is imported into the same registry, nothing changes
    assert "created 0, updated 0, unchanged 3, invalid 0" in run_import(str(path))

    # When the facilities are gone and the Bundle is imported again
    Facility.objects.update(parent=None)
    Facility.objects.all().delete()
    output = run_import(str(path))

    # Then they are back with departments and endpoints, and the export is identical
    assert "created 3, updated 0, unchanged 0, invalid 0" in output
    assert "departments created 2, endpoints created 1" in output
    assert export_bundle() == first
    district = Facility.objects.get(code="VN CD/01")
    assert district.parent == Facility.objects.get(code="VN-NHP")
    assert district.operational_status == "suspended"
    assert Facility.objects.get(code="VN-OLD").operational_status == "closed"
    pediatrics = Department.objects.get(specialty__code="394537008")
    assert (
        pediatrics.offers_async,
        pediatrics.offers_live,
        pediatrics.accepting,
        pediatrics.languages,
    ) == (True, True, True, ["vi", "en"])
    assert Department.objects.get(specialty__code="394579002").accepting is False


# --- import: the official HL7 examples --------------------------------------------------------------


def official_bundle(tmp_path: Path) -> Path:
    resources = [json.loads((EXAMPLES / name).read_text()) for name in OFFICIAL]
    return write_bundle(tmp_path / "official.json", resources)


def test_official_examples_are_refused_all_or_nothing_with_precise_reasons(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given the official examples in one Bundle, and a mapping for the Netherlands
    bundle = official_bundle(tmp_path)
    mapping = tmp_path / "nl.json"
    mapping.write_text(json.dumps(NL_MAPPING))

    # When it is imported all-or-nothing
    report = refused_import(
        str(bundle), "--mapping", str(mapping), match=r"Nothing written: 1 error\(s\)"
    )

    # Then nothing is written; the HL7 organisation has no identifier to match it by
    assert registry_counts() == dict.fromkeys(registry_counts(), 0)
    assert issue_lines(report) == [
        "error: row 2 (Organization/hl7) [Organization.identifier]: no identifier with a system "
        "and a value (facilities are matched by identifier)",
        "warning: row 6 (OrganizationAffiliation/example) [OrganizationAffiliation]: not imported: "
        "support links carry data-sharing agreements and are set up by registry stewards",
    ]


def test_official_examples_import_what_they_carry_with_skip_invalid(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given the same Bundle and mapping
    bundle = official_bundle(tmp_path)
    mapping = tmp_path / "nl.json"
    mapping.write_text(json.dumps(NL_MAPPING))

    # When it is imported with --skip-invalid
    output = run_import(str(bundle), "--mapping", str(mapping), "--skip-invalid")

    # Then Burgers University Medical Center is a facility with its Location's position and
    # a Psychiatry department (the first SNOMED code of the service the registry knows)
    assert "created 1, updated 0, unchanged 0, invalid 1" in output
    burgers = Facility.objects.get()
    assert burgers.code == "NL-91654"
    assert burgers.name == "Burgers University Medical Center"
    assert (burgers.tier, burgers.languages, burgers.operational_status) == (2, ["nl"], "active")
    assert (burgers.latitude, burgers.longitude) == (42.25475478, -83.6945691)
    assert burgers.country.code == "NL"
    assert burgers.area is None  # the address has a city but no province
    assert sorted(burgers.identifiers.values_list("system", "value")) == [
        ("urn:oid:2.16.528.1", "91654"),
        ("urn:oid:2.16.840.1.113883.2.4.6.1", "17-0112278"),
    ]
    department = burgers.departments.get()
    assert (department.specialty.code, department.name, department.accepting) == (
        "394587001",
        "Consulting psychologists and/or psychology services",
        True,
    )
    # the Endpoint belongs to the HL7 organisation, which was not imported
    assert Endpoint.objects.count() == 0

    # And importing it again changes nothing
    again = run_import(str(bundle), "--mapping", str(mapping), "--skip-invalid")
    assert "created 0, updated 0, unchanged 1, invalid 1" in again


def test_endpoints_of_an_imported_organisation_are_created(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given the HL7 organisation with an identifier, and its Endpoint (which names a bearer token)
    organization = json.loads((EXAMPLES / "Organization-hl7.json").read_text())
    organization["identifier"] = [{"system": "urn:ietf:rfc:3986", "value": "https://hl7.org"}]
    endpoint = json.loads((EXAMPLES / "Endpoint-example.json").read_text())
    bundle = write_bundle(tmp_path / "hl7.json", [organization, endpoint])
    mapping = tmp_path / "us.json"
    mapping.write_text(
        json.dumps(
            {
                "format": "mcsd",
                "country": {"code": "US", "name": "United States"},
                "defaults": {"tier": 1},
            }
        )
    )

    # When it is imported
    output = run_import(str(bundle), "--mapping", str(mapping))

    # Then the endpoint is attached; its header (a credential) is never stored
    assert "created 1, updated 0, unchanged 0, invalid 0" in output
    facility = Facility.objects.get()
    assert facility.code == "https://hl7.org"  # no prefix: the identifier value itself
    assert facility.name_local == "HL7 International"
    saved = facility.endpoints.get()
    assert (
        saved.base_url,
        saved.name,
        saved.status,
        saved.fhir_version,
        saved.auth_secret_ref,
    ) == (
        "http://fhir3.healthintersections.com.au/open/CarePlan",
        "Health Intersections CarePlan Hub",
        "active",
        "4.0",
        "",
    )


# --- refused Bundles ---------------------------------------------------------------------------------


def test_malformed_bundles_are_command_errors(tmp_path: Path) -> None:
    # Given broken files
    broken = tmp_path / "broken.json"
    broken.write_text('{"resourceType": "Bundle", "entry": [')
    lone = tmp_path / "lone.json"
    lone.write_text((EXAMPLES / "Organization-f001.json").read_text())
    bad_type = tmp_path / "badtype.json"
    bad_type.write_text('{"resourceType": "Bundle", "type": ["collection"]}')
    bad_entry = tmp_path / "badentry.json"
    bad_entry.write_text('{"resourceType": "Bundle", "type": "collection", "entry": {}}')

    # When / Then: a precise message, nothing written
    for path, message in [
        (broken, r"broken.json is not valid JSON: Expecting value at line 1 column 38"),
        (lone, r"lone.json is not a FHIR Bundle \(resourceType: 'Organization'\)"),
        (bad_type, r"badtype.json: invalid Bundle: type: "),
        (bad_entry, r"badentry.json: Bundle.entry must be a list"),
    ]:
        with pytest.raises(CommandError, match=message):
            run_import(str(path))
    assert registry_counts() == dict.fromkeys(registry_counts(), 0)


def test_invalid_resource_is_an_error_row_and_content_detects_the_format(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given a Bundle (named .txt) whose Organization breaks the R4B model
    path = tmp_path / "bundle.txt"
    write_bundle(
        path, [{"resourceType": "Organization", "id": "x", "identifier": "ABC", "name": "X"}]
    )

    # When it is imported
    report = refused_import(str(path))

    # Then the entry is reported with the validation message
    assert issue_lines(report) == [
        "error: row 1 (Organization/x) [Organization]: invalid Organization: identifier: Input "
        "should be a valid list"
    ]
    assert registry_counts() == dict.fromkeys(registry_counts(), 0)


def test_mcsd_mapping_is_validated(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b.json", [])
    for document, message in [
        ({"format": "mcsd", "fields": {}}, r"unknown key\(s\) fields for an mCSD mapping"),
        ({"format": "mcsd", "defaults": {"tier": 7}}, r"defaults.tier: tier must be 1-4"),
        ({"format": "mcsd", "country": {"code": "NLD"}}, "country.code must be ISO 3166-1 alpha-2"),
    ]:
        mapping = tmp_path / "m.json"
        mapping.write_text(json.dumps(document))
        with pytest.raises(CommandError, match=message):
            run_import(str(bundle), "--mapping", str(mapping))


def test_country_must_be_known(specialties: list[Specialty], tmp_path: Path) -> None:
    # Given the Burgers organisation (address country NLD) and no country in a mapping
    bundle = write_bundle(
        tmp_path / "b.json", [json.loads((EXAMPLES / "Organization-f001.json").read_text())]
    )
    CountryFactory(code="NL", name="Netherlands")

    # When / Then
    assert issue_lines(refused_import(str(bundle))) == [
        "error: row 1 (Organization/f001) [Organization.type]: no tier coding "
        f"({TIER_SYSTEM}) and no default tier in the mapping",
        "error: row 1 (Organization/f001) [Location.address.country]: country 'NLD' is not an "
        'ISO 3166-1 alpha-2 code; give "country" in the mapping',
    ]


# --- what the registry takes from a Bundle, as from the API --------------------------------------


def hl7_with_endpoint(tmp_path: Path, address: str) -> tuple[Path, Path]:
    organization = json.loads((EXAMPLES / "Organization-hl7.json").read_text())
    organization["identifier"] = [{"system": "urn:ietf:rfc:3986", "value": "https://hl7.org"}]
    endpoint = json.loads((EXAMPLES / "Endpoint-example.json").read_text())
    endpoint["address"] = address
    bundle = write_bundle(tmp_path / "hl7.json", [organization, endpoint])
    mapping = tmp_path / "us.json"
    mapping.write_text(
        json.dumps({"format": "mcsd", "country": {"code": "US"}, "defaults": {"tier": 1}})
    )
    return bundle, mapping


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("ftp://x.example/fhir", "is not an http(s) URL with a host and port"),
        ("https://x.example/fhir?tenant=1", "has a query or fragment; a FHIR base has none"),
        (
            "https://user:pass@x.example/fhir",
            "holds a user name or password; give credentials by auth_type and "
            "auth_secret_ref, never in the URL",
        ),
    ],
)
def test_an_endpoint_the_gateway_cannot_send_to_is_skipped_with_the_reason(
    specialties: list[Specialty], tmp_path: Path, address: str, reason: str
) -> None:
    """It was imported, and every message to it dead-lettered (or its credentials were
    published)."""
    bundle, mapping = hl7_with_endpoint(tmp_path, address)

    output = run_import(str(bundle), "--mapping", str(mapping))

    assert "created 1, updated 0, unchanged 0, invalid 0" in output
    assert issue_lines(output) == [
        f"warning: row 2 (Endpoint/example) [Endpoint]: skipped: endpoint address "
        f"{address!r} {reason}"
    ]
    assert Endpoint.objects.count() == 0


def test_an_endpoint_differing_only_in_case_or_a_trailing_slash_is_not_created_twice(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    bundle, mapping = hl7_with_endpoint(tmp_path, "HTTP://FHIR3.healthintersections.com.au/open/")
    run_import(str(bundle), "--mapping", str(mapping))
    assert list(Endpoint.objects.values_list("base_url", flat=True)) == [
        "http://fhir3.healthintersections.com.au/open"
    ]

    again, _ = hl7_with_endpoint(tmp_path, "http://fhir3.healthintersections.com.au/open")
    output = run_import(str(again), "--mapping", str(mapping))

    assert "endpoints created 0" in output
    assert Endpoint.objects.count() == 1


def test_an_address_country_that_iso_has_not_assigned_is_an_error(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    """ "ZZ" has the shape of a code and was created as a country."""
    organization = json.loads((EXAMPLES / "Organization-f001.json").read_text())
    location: dict[str, object] = {
        "resourceType": "Location",
        "id": "loc",
        "name": "Burgers",
        "address": {"country": "ZZ"},
        "managingOrganization": {"reference": "Organization/f001"},
    }
    bundle = write_bundle(tmp_path / "b.json", [organization, location])
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({"format": "mcsd", "defaults": {"tier": 2}}))

    assert issue_lines(refused_import(str(bundle), "--mapping", str(mapping))) == [
        "error: row 1 (Organization/f001) [Location.address.country]: country 'ZZ' is not an "
        'ISO 3166-1 alpha-2 code; give "country" in the mapping',
    ]
    assert registry_counts() == dict.fromkeys(registry_counts(), 0)
