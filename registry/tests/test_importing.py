"""manage.py import_facilities / export_facilities with CSV sources (mCSD: fhir_gateway)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from registry.importing import (
    FACILITY_CODE_SYSTEM,
    MAPPINGS_DIR,
    CsvSource,
    FacilityImport,
    IssueReport,
    parse_mapping,
    read_mapping_document,
)
from registry.models import (
    AdministrativeArea,
    Country,
    Department,
    Endpoint,
    Facility,
    FacilityIdentifier,
    FacilityRevision,
    Specialty,
    SupportLink,
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
from tests.shared_data import KENYA_CSV

DATA = Path(__file__).parent / "data"
KENYA_SMALL = DATA / "kenya_small.csv"
VN_CSV = DATA / "vn_hospitals.csv"
VN_MAPPING = DATA / "vn_hospitals_mapping.json"
KENYA_FULL = KENYA_CSV
KMHFL_ID = "https://kmhfl.health.go.ke/facility-id"
MFL_CODE = "https://kmhfl.health.go.ke/mfl-code"
MOH_VN = "https://moh.gov.vn/facility-code"

pytestmark = pytest.mark.django_db


def run_import(*args: str, **options: object) -> str:
    out = StringIO()
    call_command(
        "import_facilities", *args, "--no-progress", stdout=out, stderr=StringIO(), **options
    )
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


def rewrite_csv(source: Path, target: Path, edits: dict[int, dict[str, str]]) -> Path:
    """A copy of ``source`` with cells changed: {data row index (0-based): {column: value}}."""
    with source.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    for index, changes in edits.items():
        rows[index].update(changes)
    with target.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return target


def error_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith("error:")]


# --- a good file ---------------------------------------------------------------------------


def test_import_small_kenya_file_sets_every_mapped_field(specialties: list[Specialty]) -> None:
    # Given an empty registry and the shipped Kenya mapping
    # When the five-row sample is imported
    output = run_import(str(KENYA_SMALL), "--mapping", "kenya_kmhfl")

    # Then every row is a facility, keyed by the KMHFL id
    assert "created 5, updated 0, unchanged 0, invalid 0" in output
    assert "Committed." in output
    mbagathi = Facility.objects.get(
        identifiers__system=KMHFL_ID, identifiers__value="a1b2c3d4-0000-4000-8000-000000000001"
    )
    assert mbagathi.code == "KE-a1b2c3d4-0000-4000-8000-000000000001"
    assert mbagathi.name == "Mbagathi County Hospital"
    assert mbagathi.name_local == ""
    assert mbagathi.search_name == "mbagathi county hospital"
    assert mbagathi.tier == 3
    assert mbagathi.facility_type == "County Hospital"
    assert mbagathi.ownership == "public"
    assert mbagathi.operational_status == "active"
    assert (mbagathi.latitude, mbagathi.longitude) == (-1.30976, 36.80456)
    assert mbagathi.beds == 190
    assert mbagathi.languages == ["en", "sw"]
    assert mbagathi.is_remote is False
    assert mbagathi.parent_id is None
    assert mbagathi.country.code == "KE"
    assert mbagathi.country.name == "Kenya"
    assert sorted(mbagathi.identifiers.values_list("system", "value")) == [
        (KMHFL_ID, "a1b2c3d4-0000-4000-8000-000000000001"),
        (MFL_CODE, "13023"),
    ]
    # the most specific area, its chain, and the province set explicitly
    ward = mbagathi.area
    assert ward is not None and ward.parent is not None and ward.parent.parent is not None
    assert (ward.level, ward.name, ward.code) == (3, "Kilimani", "nairobi/dagoretti-north/kilimani")
    assert (ward.parent.level, ward.parent.code) == (2, "nairobi/dagoretti-north")
    assert (ward.parent.parent.level, ward.parent.parent.code) == (1, "nairobi")
    assert mbagathi.province == ward.parent.parent
    # services mapped to specialties (Outpatient is not a specialty; two map to O&G)
    assert sorted(
        mbagathi.departments.values_list("specialty__code", "name", "offers_async", "accepting")
    ) == [
        ("394537008", "Pediatric specialty", True, True),
        ("394585009", "Obstetrics and gynecology", True, True),
        ("394807007", "Infectious diseases", True, True),
    ]
    # a created facility gets a revision whose changes start from null
    revision = mbagathi.revisions.get()
    assert revision.source == "import"
    assert revision.changes["name"] == [None, "Mbagathi County Hospital"]
    assert revision.changes["tier"] == [None, 3]
    assert revision.changes["area_id"] == [None, ward.pk]
    assert revision.changes["identifiers"] == [
        None,
        [f"{KMHFL_ID}|a1b2c3d4-0000-4000-8000-000000000001", f"{MFL_CODE}|13023"],
    ]

    # an empty MFL code gives one identifier only; no coordinates is allowed
    mission = Facility.objects.get(code="KE-a1b2c3d4-0000-4000-8000-000000000002")
    assert list(mission.identifiers.values_list("system", flat=True)) == [KMHFL_ID]
    assert (mission.latitude, mission.longitude) == (None, None)
    assert (mission.tier, mission.ownership, mission.beds) == (4, "faith-based", 0)
    assert mission.area == ward
    assert not mission.departments.exists()

    by_code = {f.code[-1]: f for f in Facility.objects.all()}
    assert {k: (f.tier, f.ownership) for k, f in by_code.items()} == {
        "1": (3, "public"),
        "2": (4, "faith-based"),
        "3": (4, "ngo"),
        "4": (1, "public"),
        "5": (4, "private"),
    }
    assert sorted(by_code["3"].departments.values_list("specialty__code", flat=True)) == [
        "394812008"
    ]
    assert sorted(by_code["4"].departments.values_list("specialty__code", flat=True)) == [
        "394576009",
        "394592004",
        "394593009",
        "408478003",
    ]
    assert registry_counts() == {
        "countries": 1,
        "areas": 7,
        "facilities": 5,
        "identifiers": 9,
        "departments": 8,
        "endpoints": 0,
        "revisions": 5,
    }


def test_import_with_custom_mapping_links_parents_named_further_down(
    specialties: list[Specialty],
) -> None:
    # Given a mapping with a parent column; the first row's parent comes later in the file,
    # and a batch size of one puts parent and child in different batches
    # When the file is imported
    output = run_import(str(VN_CSV), "--mapping", str(VN_MAPPING), "--batch-size", "1")

    # Then parents are linked whichever row comes first
    assert "created 3, updated 0, unchanged 0, invalid 0" in output
    district = Facility.objects.get(code="VN-VN001")
    central = Facility.objects.get(code="VN-VN100")
    station = Facility.objects.get(code="VN-VN002")
    assert district.parent == central
    assert station.parent == district
    assert central.parent is None
    # local names, accent-free search key, constants, defaults and booleans
    assert central.name_local == "Bệnh viện Nhi Trung ương"
    assert central.search_name == "national children's hospital benh vien nhi trung uong"
    assert (central.tier, central.ownership, central.is_remote, central.languages) == (
        1,
        "public",
        False,
        ["vi"],
    )
    assert (district.tier, district.ownership, district.is_remote) == (3, "public", True)
    assert (station.tier, station.ownership, station.latitude, station.longitude) == (
        4,
        "private",
        None,
        None,
    )
    # a district without a commune: the area is the district itself
    assert district.area is not None
    assert (district.area.level, district.area.name, district.area.code) == (
        2,
        "Côn Đảo",
        "ba-ria-vung-tau/con-dao",
    )
    assert district.province is not None and district.province.code == "ba-ria-vung-tau"
    assert station.area is not None and station.area.parent == district.area
    # "Ngoại" is not in the services table: only "Nhi" makes a department
    assert list(district.departments.values_list("specialty__code", flat=True)) == ["394537008"]
    assert sorted(central.departments.values_list("specialty__code", flat=True)) == [
        "394537008",
        "394579002",
    ]
    # the forward-referenced parent is recorded in a revision of its own
    assert list(district.revisions.order_by("id").values_list("changes__parent_id", flat=True)) == [
        None,
        [None, central.pk],
    ]


def test_existing_areas_are_reused_by_name_whatever_their_code(
    specialties: list[Specialty],
) -> None:
    # Given Nairobi already in the registry under another code
    kenya = CountryFactory(code="KE", name="Kenya")
    nairobi = AreaFactory.create(country=kenya, code="KE-047", name="Nairobi")

    # When the sample is imported
    run_import(str(KENYA_SMALL), "--mapping", "kenya_kmhfl")

    # Then the existing province is used, not duplicated
    assert AdministrativeArea.objects.filter(level=1).count() == 2
    assert Facility.objects.filter(province=nairobi).count() == 3
    assert AdministrativeArea.objects.get(code="nairobi/dagoretti-north").parent == nairobi


# --- idempotency and updates ------------------------------------------------------------------


def test_reimporting_the_same_file_changes_nothing(specialties: list[Specialty]) -> None:
    # Given the sample already imported
    run_import(str(KENYA_SMALL), "--mapping", "kenya_kmhfl")
    before = registry_counts()
    updated_at = dict(Facility.objects.values_list("code", "updated_at"))

    # When it is imported again
    output = run_import(str(KENYA_SMALL), "--mapping", "kenya_kmhfl")

    # Then every facility is unchanged and nothing was added
    assert "created 0, updated 0, unchanged 5, invalid 0" in output
    assert "areas created 0, identifiers created 0 (updated 0), departments created 0" in output
    assert registry_counts() == before
    assert dict(Facility.objects.values_list("code", "updated_at")) == updated_at


def test_changed_rows_are_updated_and_leave_a_revision(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given the sample imported, then a new edition of the file
    run_import(str(KENYA_SMALL), "--mapping", "kenya_kmhfl")
    changed = rewrite_csv(
        KENYA_SMALL,
        tmp_path / "edition2.csv",
        {
            0: {"officialname": "Mbagathi Level 5 Hospital", "keph_level_name": "Level 5"},
            1: {"code": "99999", "ward_name": "Kawangware"},
        },
    )
    mbagathi = Facility.objects.get(code="KE-a1b2c3d4-0000-4000-8000-000000000001")
    mission = Facility.objects.get(code="KE-a1b2c3d4-0000-4000-8000-000000000002")
    old_ward = mission.area_id

    # When it is imported
    output = run_import(str(changed), "--mapping", "kenya_kmhfl")

    # Then the two changed facilities are updated, with revisions saying what changed
    assert "created 0, updated 2, unchanged 3, invalid 0" in output
    mbagathi.refresh_from_db()
    assert (mbagathi.name, mbagathi.tier, mbagathi.search_name) == (
        "Mbagathi Level 5 Hospital",
        2,
        "mbagathi level 5 hospital",
    )
    assert mbagathi.revisions.order_by("-id").first().changes == {  # type: ignore[union-attr]
        "name": ["Mbagathi County Hospital", "Mbagathi Level 5 Hospital"],
        "tier": [3, 2],
    }
    mission.refresh_from_db()
    kawangware = AdministrativeArea.objects.get(code="nairobi/dagoretti-north/kawangware")
    assert mission.area == kawangware
    assert mission.revisions.order_by("-id").first().changes == {  # type: ignore[union-attr]
        "area_id": [old_ward, kawangware.pk],
        "identifiers": [
            [f"{KMHFL_ID}|a1b2c3d4-0000-4000-8000-000000000002"],
            [f"{KMHFL_ID}|a1b2c3d4-0000-4000-8000-000000000002", f"{MFL_CODE}|99999"],
        ],
    }
    assert FacilityRevision.objects.count() == 7


def test_fields_the_mapping_does_not_name_are_left_alone(specialties: list[Specialty]) -> None:
    # Given an imported facility a steward then marked remote and gave a local name
    run_import(str(KENYA_SMALL), "--mapping", "kenya_kmhfl")
    Facility.objects.filter(code__endswith="0001").update(is_remote=True, name_local="Hospitali")

    # When the file is imported again
    output = run_import(str(KENYA_SMALL), "--mapping", "kenya_kmhfl")

    # Then nothing the mapping does not own was touched
    assert "unchanged 5" in output
    assert Facility.objects.filter(is_remote=True, name_local="Hospitali").count() == 1


# --- refused files: precise errors, nothing written ---------------------------------------------


def assert_refused(path: Path, *args: str, match: str) -> str:
    out = StringIO()
    before = registry_counts()
    with pytest.raises(CommandError, match=match):
        call_command(
            "import_facilities", str(path), "--no-progress", *args, stdout=out, stderr=StringIO()
        )
    assert registry_counts() == before
    return out.getvalue()


def test_bad_tier_value_is_reported_and_nothing_is_written(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given a file whose third row has a level the mapping does not know
    bad = rewrite_csv(KENYA_SMALL, tmp_path / "bad.csv", {2: {"keph_level_name": "Level 7"}})

    # When it is imported (all-or-nothing by default)
    output = assert_refused(bad, "--mapping", "kenya_kmhfl", match=r"Nothing written: 1 error\(s\)")

    # Then the report names the line, the identifier, the column and the reason
    assert error_lines(output) == [
        "error: row 4 (a1b2c3d4-0000-4000-8000-000000000003) [keph_level_name]: 'Level 7' is not "
        "a mapped value for tier (mapped: 'Level 6', 'Level 5', 'Level 4', 'Level 3', 'Level 2')"
    ]
    # and the counts as what would have been written (a tester read "created 4" as done)
    assert (
        "  NOT WRITTEN (rolled back); had the file been applied:\n"
        "  would have created 4, updated 0, unchanged 0, invalid 1\n"
        "  countries would have created 1, areas would have created 7, identifiers would have "
        "created 7 (updated 0), departments would have created 7, endpoints would have "
        "created 0, revisions 4\n"
    ) in output


def test_bad_coordinates_are_reported_per_row(specialties: list[Specialty], tmp_path: Path) -> None:
    # Given rows with a latitude out of range, a non-number, and a lone longitude
    bad = rewrite_csv(
        KENYA_SMALL,
        tmp_path / "bad.csv",
        {
            0: {"latitude(src:long)": "123.5"},
            2: {"longitude(src:lat)": "east"},
            4: {"latitude(src:long)": ""},
        },
    )

    # When it is imported
    output = assert_refused(bad, "--mapping", "kenya_kmhfl", match=r"3 error\(s\)")

    # Then each row says what is wrong
    assert error_lines(output) == [
        "error: row 2 (a1b2c3d4-0000-4000-8000-000000000001) [latitude(src:long)]: latitude 123.5 "
        "is outside -90..90",
        "error: row 4 (a1b2c3d4-0000-4000-8000-000000000003) [longitude(src:lat)]: longitude: "
        "'east' is not a number",
        "error: row 6 (a1b2c3d4-0000-4000-8000-000000000005) [latitude(src:long)]: latitude and "
        "longitude must be given together",
    ]


@pytest.mark.parametrize("batch_size", ["1000", "1"])
def test_duplicate_identifier_within_the_file_is_refused(
    specialties: list[Specialty], tmp_path: Path, batch_size: str
) -> None:
    # Given a file where the last row repeats the MFL code of the first
    bad = rewrite_csv(KENYA_SMALL, tmp_path / "dup.csv", {4: {"code": "13023"}})

    # When it is imported, in one batch or one row per batch
    output = assert_refused(
        bad, "--mapping", "kenya_kmhfl", "--batch-size", batch_size, match="Nothing written"
    )

    # Then the duplicate row is named, whichever batch the first occurrence was in
    expected = {
        "1000": "already in row 2",
        "1": "that facility was already imported from an earlier row of this file",
    }[batch_size]
    assert error_lines(output) == [
        f"error: row 6 (a1b2c3d4-0000-4000-8000-000000000005) [code]: duplicate identifier "
        f"{MFL_CODE}|13023: {expected}"
    ]


def test_non_utf8_row_is_reported_with_its_column(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given a UTF-8 file with one Latin-1 byte in the fourth row's name
    text = KENYA_SMALL.read_bytes().replace(b"Ilpolei Health Centre", b"Ilpol\xe9i Health Centre")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(text)

    # When it is imported
    output = assert_refused(bad, "--mapping", "kenya_kmhfl", match="Nothing written")

    # Then that row is refused with the byte and the column
    assert error_lines(output) == [
        "error: row 4 (a1b2c3d4-0000-4000-8000-000000000003) [officialname]: line 4: not valid "
        "utf-8-sig (byte 0xe9 at position 56)"
    ]


def test_missing_column_is_a_command_error(specialties: list[Specialty], tmp_path: Path) -> None:
    # Given a file without the ward column the mapping reads
    lines = KENYA_SMALL.read_text(encoding="utf-8").splitlines()
    missing = tmp_path / "noward.csv"
    missing.write_text(
        "\n".join(line.replace("ward_name", "ward") for line in lines[:1])
        + "\n"
        + "\n".join(lines[1:])
    )

    # When / Then
    assert_refused(
        missing,
        "--mapping",
        "kenya_kmhfl",
        match=r"mapping kenya_kmhfl names column\(s\) 'ward_name' that noward.csv lacks",
    )


def test_unreadable_inputs_are_command_errors_never_tracebacks(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Missing file
    assert_refused(tmp_path / "nope.csv", match=r"nope.csv: no such file")
    # Empty file
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_refused(empty, "--mapping", "kenya_kmhfl", match="is empty")
    # A header that is not UTF-8
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"c\xf3digo,id\n1,2\n")
    assert_refused(latin, "--mapping", "kenya_kmhfl", match=r"the header is not valid utf-8-sig")
    # Unknown mapping name, unknown field, unknown key, specialty not in the registry
    assert_refused(
        KENYA_SMALL,
        "--mapping",
        "zambia",
        match=r"mapping 'zambia' not found \(shipped mappings: consilium_csv, kenya_kmhfl\)",
    )
    refused_mappings: list[tuple[str, dict[str, Any], str]] = [
        ("unknown_field", {"fields": {"colour": "x"}}, r"unknown field\(s\) colour"),
        ("unknown_key", {"sheet": 1}, r"unknown key\(s\) sheet"),
        (
            "bad_value",
            {"fields": {"tier": {"column": "keph_level_name", "values": {"L": 9}}}},
            r"tier must be 1-4",
        ),
        (
            "bad_code",
            {"services": {"column": "service_names", "specialties": {"X": "123"}}},
            "maps to specialty 123",
        ),
    ]
    for name, document, message in refused_mappings:
        mapping = json.loads((MAPPINGS_DIR / "kenya_kmhfl.json").read_text())
        for key, value in document.items():
            if key == "fields":
                mapping["fields"].update(value)
            else:
                mapping[key] = value
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(mapping))
        assert_refused(KENYA_SMALL, "--mapping", str(path), match=message)
    # A CSV mapping for a Bundle
    bundle = tmp_path / "bundle.json"
    bundle.write_text('{"resourceType": "Bundle", "type": "collection"}')
    assert_refused(bundle, "--mapping", "kenya_kmhfl", match="is for CSV files")


def test_code_taken_by_another_facility_is_refused(specialties: list[Specialty]) -> None:
    # Given a facility that already uses the code the first row would get, without its id
    FacilityFactory(code="KE-a1b2c3d4-0000-4000-8000-000000000001")

    # When / Then
    output = assert_refused(KENYA_SMALL, "--mapping", "kenya_kmhfl", match="Nothing written")
    assert error_lines(output) == [
        "error: row 2 (a1b2c3d4-0000-4000-8000-000000000001) [id]: facility code "
        "'KE-a1b2c3d4-0000-4000-8000-000000000001' is already taken by a facility without this "
        "row's identifiers"
    ]


def test_identifiers_naming_two_facilities_are_refused(specialties: list[Specialty]) -> None:
    # Given the first row's KMHFL id and MFL code already on two different facilities
    FacilityIdentifierFactory(
        system=KMHFL_ID, value="a1b2c3d4-0000-4000-8000-000000000001", facility__code="A"
    )
    FacilityIdentifierFactory(system=MFL_CODE, value="13023", facility__code="B")

    # When / Then
    output = assert_refused(KENYA_SMALL, "--mapping", "kenya_kmhfl", match="Nothing written")
    assert error_lines(output) == [
        "error: row 2 (a1b2c3d4-0000-4000-8000-000000000001) [id]: identifiers of this row belong "
        f"to different facilities: {KMHFL_ID}|a1b2c3d4-0000-4000-8000-000000000001 is facility A, "
        f"{MFL_CODE}|13023 is facility B"
    ]


def test_missing_parent_is_an_error(specialties: list[Specialty], tmp_path: Path) -> None:
    # Given a row whose parent is nowhere
    bad = tmp_path / "orphan.csv"
    bad.write_text(
        VN_CSV.read_text(encoding="utf-8").replace(",VN001,yes,", ",VN404,yes,"), encoding="utf-8"
    )

    # When / Then
    output = assert_refused(bad, "--mapping", str(VN_MAPPING), match="Nothing written")
    assert error_lines(output) == [
        f"error: row 4 (VN002) [parent_moh_id]: parent {MOH_VN}|VN404 is neither in the registry "
        "nor in this file"
    ]


# --- skip-invalid, dry run, error report ---------------------------------------------------------


def test_skip_invalid_applies_the_valid_rows_only(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given a file with two invalid rows
    bad = rewrite_csv(
        KENYA_SMALL,
        tmp_path / "mixed.csv",
        {1: {"owner_type_name": "Parastatal"}, 3: {"officialname": ""}},
    )
    errors_csv = tmp_path / "errors.csv"

    # When it is imported with --skip-invalid and an error file
    output = run_import(
        str(bad), "--mapping", "kenya_kmhfl", "--skip-invalid", "--errors-csv", str(errors_csv)
    )

    # Then the three valid rows are committed and the two others reported
    assert "created 3, updated 0, unchanged 0, invalid 2" in output
    assert "Committed; 2 invalid row(s) skipped." in output
    assert sorted(Facility.objects.values_list("code", flat=True)) == [
        "KE-a1b2c3d4-0000-4000-8000-000000000001",
        "KE-a1b2c3d4-0000-4000-8000-000000000003",
        "KE-a1b2c3d4-0000-4000-8000-000000000005",
    ]
    with errors_csv.open(encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [
            ["row", "column", "identifier", "severity", "message"],
            [
                "3",
                "owner_type_name",
                "a1b2c3d4-0000-4000-8000-000000000002",
                "error",
                "'Parastatal' is not a mapped value for ownership (mapped: 'Ministry of Health', "
                "'Private Practice', 'Faith Based Organization', 'Non-Governmental Organizations')",
            ],
            [
                "5",
                "officialname",
                "a1b2c3d4-0000-4000-8000-000000000004",
                "error",
                "name is empty and the mapping has no default",
            ],
        ]


def test_dry_run_validates_and_writes_nothing(specialties: list[Specialty]) -> None:
    # Given an empty registry
    # When the sample is imported with --dry-run
    output = run_import(str(KENYA_SMALL), "--mapping", "kenya_kmhfl", "--dry-run")

    # Then it reports what it would do, and nothing is written
    assert "\n  would have created 5, updated 0, unchanged 0, invalid 0\n" in output
    assert "Dry run: the file is valid; nothing written." in output
    assert registry_counts() == dict.fromkeys(registry_counts(), 0)


# --- queries: constant per batch -------------------------------------------------------------------


def test_queries_per_batch_do_not_grow_with_the_rows(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given files of 10 and 20 new facilities in one ward, imported in batches of 5
    def write(rows: int) -> Path:
        path = tmp_path / f"rows{rows}.csv"
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "moh_id",
                    "name",
                    "ten",
                    "province",
                    "district",
                    "commune",
                    "hang",
                    "owner",
                    "lat",
                    "lon",
                    "parent_moh_id",
                    "remote",
                    "chuyen_khoa",
                ]
            )
            for n in range(rows):
                parent = f"P{rows}-{n - 1}" if n else ""
                writer.writerow(
                    [
                        f"P{rows}-{n}",
                        f"Station {n}",
                        "",
                        "Hà Nội",
                        "Ba Đình",
                        "Kim Mã",
                        "Xa",
                        "",
                        "21.0",
                        "105.8",
                        parent,
                        "no",
                        "Nhi",
                    ]
                )
        return path

    def queries(path: Path) -> int:
        with CaptureQueriesContext(connection) as captured:
            run_import(str(path), "--mapping", str(VN_MAPPING), "--batch-size", "5")
        return len(captured.captured_queries)

    run_import(str(write(1)), "--mapping", str(VN_MAPPING))  # country and areas exist from now on

    # When each is imported
    ten, twenty = queries(write(10)), queries(write(20))

    # Then two more batches cost exactly two batches' worth of queries, none per row: look up
    # identifiers and codes, insert facilities, link parents, insert identifiers, look up and
    # insert departments, insert revisions
    assert twenty - ten == 2 * 8


# --- the full Kenyan master facility list ------------------------------------------------------------


def kenya_expectations(mapping: dict[str, object]) -> dict[str, object]:
    """What the import must produce, computed straight from the CSV with the csv module."""
    services = mapping["services"]
    assert isinstance(services, dict)
    table = {name.casefold(): code for name, code in services["specialties"].items()}
    levels = {"Level 6": 1, "Level 5": 2, "Level 4": 3, "Level 3": 4, "Level 2": 4}
    tiers: Counter[int] = Counter()
    departments: Counter[str] = Counter()
    counties, sub_counties, wards = set(), set(), set()
    invalid = 0
    with KENYA_FULL.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["keph_level_name"] not in levels:
                invalid += 1
                continue
            tiers[levels[row["keph_level_name"]]] += 1
            codes = {
                table[s.strip().casefold()]
                for s in row["service_names"].split(";")
                if s.strip().casefold() in table
            }
            departments.update(codes)
            counties.add(row["county_name"])
            sub_counties.add((row["county_name"], row["sub_county_name"]))
            wards.add((row["county_name"], row["sub_county_name"], row["ward_name"]))
    return {
        "tiers": dict(tiers),
        "departments": dict(departments),
        "areas": {1: len(counties), 2: len(sub_counties), 3: len(wards)},
        "invalid": invalid,
        "valid": sum(tiers.values()),
    }


@pytest.mark.slow
def test_full_kenya_file_imports_with_skip_invalid_and_is_refused_without(
    specialties: list[Specialty],
) -> None:
    # Given the real KMHFL export (12,379 rows, one without a KEPH level)
    mapping = json.loads((MAPPINGS_DIR / "kenya_kmhfl.json").read_text())
    expected = kenya_expectations(mapping)
    assert expected["invalid"] == 1 and expected["valid"] == 12_378

    # When it is imported all-or-nothing, it is refused and nothing is written
    assert_refused(KENYA_FULL, "--mapping", "kenya_kmhfl", match=r"Nothing written: 1 error\(s\)")

    # When it is imported with --skip-invalid
    output = run_import(str(KENYA_FULL), "--mapping", "kenya_kmhfl", "--skip-invalid")

    # Then every valid row is a facility, tiered as the KEPH levels say
    assert "\n  created 12,378, updated 0, unchanged 0, invalid 1\n" in output
    assert error_lines(output) == [
        "error: row 4211 (33c77d19-a83c-48d5-b48f-5f5f17b545d0) [keph_level_name]: tier is empty "
        "and the mapping has no default"
    ]
    assert dict(Counter(Facility.objects.values_list("tier", flat=True))) == expected["tiers"]
    assert (
        dict(Counter(AdministrativeArea.objects.values_list("level", flat=True)))
        == expected["areas"]
    )
    assert (
        dict(Counter(Department.objects.values_list("specialty__code", flat=True)))
        == expected["departments"]
    )
    assert FacilityIdentifier.objects.filter(system=KMHFL_ID).count() == 12_378
    assert FacilityIdentifier.objects.filter(system=MFL_CODE).count() == 12_378 - 57
    assert Facility.objects.filter(latitude__isnull=True).count() == 1_479
    assert Facility.objects.exclude(province__level=1).count() == 0
    assert FacilityRevision.objects.filter(source="import").count() == 12_378

    # And importing it again changes nothing
    before = registry_counts()
    again = run_import(str(KENYA_FULL), "--mapping", "kenya_kmhfl", "--skip-invalid")
    assert "created 0, updated 0, unchanged 12,378, invalid 1" in again
    assert registry_counts() == before


# --- export: canonical CSV, read back losslessly -----------------------------------------------------


def varied_registry() -> None:
    """Facilities with every kind of value the canonical CSV must carry."""
    pediatrics = SpecialtyFactory(code="394537008")
    cardiology = SpecialtyFactory(code="394579002")
    hanoi = AreaFactory(code="VN-HN", name="Hà Nội")
    dong_da = AreaFactory(parent=hanoi, code="VN-HN-DD", name="Đống Đa")
    lang = AreaFactory(parent=dong_da, code="VN-HN-DD-LT", name="Láng Thượng")
    central = FacilityFactory(
        code="VN-NHP",
        name="National Children's Hospital",
        name_local="Bệnh viện Nhi Trung ương",
        area=lang,
        tier=1,
        latitude=21.024500000000003,
        longitude=105.8085,
        languages=["vi", "en"],
        beds=1500,
        facility_type="Specialised hospital",
    )
    FacilityIdentifierFactory(
        facility=central, system="https://moh.gov.vn/facility-code", value="01-001"
    )
    FacilityIdentifierFactory(
        facility=central, system="urn:oid:2.16.704", value='odd "value", with; separators'
    )
    DepartmentFactory(facility=central, specialty=pediatrics)
    DepartmentFactory(facility=central, specialty=cardiology)
    district = FacilityFactory(
        code="VN-CD",
        name="Con Dao Hospital",
        area=AreaFactory(
            parent=AreaFactory(code="VN-BV", name="Bà Rịa - Vũng Tàu"),
            code="VN-BV-CD",
            name="Côn Đảo",
        ),
        tier=3,
        parent=central,
        is_remote=True,
        ownership="military",
        operational_status="suspended",
    )
    DepartmentFactory(facility=district, specialty=pediatrics)
    EndpointFactory(
        facility=district, base_url="https://fhir.condao.example.org/r4", name="Con Dao FHIR"
    )
    FacilityFactory(
        code="LA-01",
        name="Mahosot Hospital",
        country=CountryFactory(code="LA", name="Lao PDR"),
        operational_status="closed",
        tier=2,
        beds=0,
    )


def export(*args: str) -> str:
    out = StringIO()
    call_command("export_facilities", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def wipe_facilities() -> None:
    Facility.objects.update(parent=None)
    Facility.objects.all().delete()


def test_canonical_csv_export_reads_back_losslessly(tmp_path: Path) -> None:
    # Given a varied registry and its canonical CSV export
    varied_registry()
    first = export("--format", "csv")
    rows = list(csv.DictReader(StringIO(first)))
    assert [r["code"] for r in rows] == ["LA-01", "VN-CD", "VN-NHP"]
    assert rows[2] == {
        "code": "VN-NHP",
        "name": "National Children's Hospital",
        "name_local": "Bệnh viện Nhi Trung ương",
        "country": "VN",
        "country_name": "Viet Nam",
        "province": "Hà Nội",
        "district": "Đống Đa",
        "commune": "Láng Thượng",
        "tier": "1",
        "facility_type": "Specialised hospital",
        "ownership": "public",
        "operational_status": "active",
        "latitude": "21.024500000000003",
        "longitude": "105.8085",
        "parent_code": "",
        "languages": "vi;en",
        "beds": "1500",
        "is_remote": "false",
        "identifiers": '[{"system":"https://moh.gov.vn/facility-code","value":"01-001"},'
        '{"system":"urn:oid:2.16.704","value":"odd \\"value\\", with; separators"}]',
        "specialties": "394537008;394579002",
    }
    path = tmp_path / "export.csv"
    path.write_text(first, encoding="utf-8")

    # When it is imported into the same registry, nothing changes
    assert "created 0, updated 0, unchanged 3, invalid 0" in run_import(str(path))

    # When the facilities are gone and the export is imported (default mapping: consilium_csv)
    wipe_facilities()
    output = run_import(str(path))

    # Then they are back, and exporting again gives the same bytes
    assert "created 3, updated 0, unchanged 0, invalid 0" in output
    assert export("--format", "csv") == first
    assert Facility.objects.get(code="VN-CD").parent == Facility.objects.get(code="VN-NHP")


def test_export_filters_by_country_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    # Given facilities in two countries
    varied_registry()

    # When / Then
    assert [r["code"] for r in csv.DictReader(StringIO(export("--country", "la")))] == ["LA-01"]
    with pytest.raises(CommandError, match="no country 'ZZ' in the registry"):
        export("--country", "ZZ")
    output = tmp_path / "vn.csv"
    export("--country", "VN", "--output", str(output))
    assert [r["code"] for r in csv.DictReader(output.open(encoding="utf-8"))] == ["VN-CD", "VN-NHP"]


def test_code_system_matches_the_fhir_projection() -> None:
    from fhir_gateway.registry_projection import FACILITY_CODE_SYSTEM as PROJECTED

    assert FACILITY_CODE_SYSTEM == PROJECTED


# --- a facility the file moves to another country ------------------------------------------------


def test_a_move_across_a_border_keeps_the_support_link_rule(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given the VN file imported, and a Vietnamese hub supporting VN001 with no agreement
    run_import(str(VN_CSV), "--mapping", str(VN_MAPPING))
    spoke = Facility.objects.get(identifiers__value="VN001")
    hub = FacilityFactory.create(country=spoke.country, tier=1)
    link = SupportLink.objects.create(hub=hub, spoke=spoke)
    laos = tmp_path / "laos.json"
    mapping = json.loads(VN_MAPPING.read_text(encoding="utf-8"))
    mapping["country"] = {"code": "LA", "name": "Laos"}
    laos.write_text(json.dumps(mapping), encoding="utf-8")

    # When the same file says the facilities are in Laos: refused, nothing written
    output = assert_refused(VN_CSV, "--mapping", str(laos), match="Nothing written")
    assert any("without a data-sharing agreement" in line for line in error_lines(output))
    assert Facility.objects.get(pk=spoke.pk).country.code == "VN"

    # --skip-invalid cannot skip it (the row is applied before the links are judged)
    assert_refused(VN_CSV, "--mapping", str(laos), "--skip-invalid", match="Nothing written")
    assert Facility.objects.get(pk=spoke.pk).country.code == "VN"

    # And once the link has its agreement, the move is taken and the link crosses a border
    SupportLink.objects.filter(pk=link.pk).update(agreement_reference="MoU 2026/7")
    run_import(str(VN_CSV), "--mapping", str(laos))
    assert Facility.objects.get(pk=spoke.pk).country.code == "LA"
    assert SupportLink.objects.get(pk=link.pk).is_cross_border is True


def test_a_tier_change_that_puts_a_hub_below_its_spoke_refuses_the_import(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given VN100 (tier 1) supporting VN001 (tier 3)
    run_import(str(VN_CSV), "--mapping", str(VN_MAPPING))
    spoke = Facility.objects.get(identifiers__value="VN001")
    hub = Facility.objects.get(identifiers__value="VN100")
    SupportLink.objects.create(hub=hub, spoke=spoke)

    # When a file makes VN100 a commune station (tier 4): refused, nothing written, --skip-invalid
    # or not (the row is applied before the links are judged)
    lowered = tmp_path / "lowered.csv"
    lines = VN_CSV.read_text(encoding="utf-8").splitlines()
    lowered.write_text(
        "\n".join(
            line.replace(",Láng Thượng,TW,", ",Láng Thượng,Xa,")
            if line.startswith("VN100,")
            else line
            for line in lines
        )
        + "\n",
        encoding="utf-8",
    )
    for extra in ((), ("--skip-invalid",)):
        output = assert_refused(
            lowered, "--mapping", str(VN_MAPPING), *extra, match="Nothing written"
        )
        assert any("below its spoke" in line for line in error_lines(output))
        assert Facility.objects.get(pk=hub.pk).tier == 1

    # A file that lowers the hub to its spoke's tier is taken
    level = tmp_path / "level.csv"
    level.write_text(
        lowered.read_text(encoding="utf-8").replace(",Láng Thượng,Xa,", ",Láng Thượng,Huyen,"),
        encoding="utf-8",
    )
    run_import(str(level), "--mapping", str(VN_MAPPING))
    assert Facility.objects.get(pk=hub.pk).tier == 3


def test_a_parent_loop_is_refused(specialties: list[Specialty], tmp_path: Path) -> None:
    # Given the VN file imported (VN001's parent is VN100)
    run_import(str(VN_CSV), "--mapping", str(VN_MAPPING))
    child = Facility.objects.get(identifiers__value="VN001")
    assert child.parent is not None and child.parent.identifiers.get().value == "VN100"

    # When a file makes VN100's parent VN001: a loop, refused, nothing written
    looped = tmp_path / "loop.csv"
    lines = VN_CSV.read_text(encoding="utf-8").splitlines()
    lines = [
        line.replace(",TW,Cong,21.0245,105.8085,,no,", ",TW,Cong,21.0245,105.8085,VN001,no,")
        if line.startswith("VN100,")
        else line
        for line in lines
    ]
    looped.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = assert_refused(looped, "--mapping", str(VN_MAPPING), match="Nothing written")
    assert [line for line in error_lines(output) if "parent loop" in line] != []
    assert Facility.objects.get(identifiers__value="VN100").parent_id is None

    # With --skip-invalid the rest is imported and the loop is not: no facility's chain
    # comes back to it
    run_import(str(looped), "--mapping", str(VN_MAPPING), "--skip-invalid")
    for facility in Facility.objects.all():
        seen: set[int] = set()
        node = facility.parent_id
        while node is not None:
            assert node != facility.pk and node not in seen
            seen.add(node)
            node = Facility.objects.get(pk=node).parent_id


def test_a_hub_and_its_spoke_move_country_together(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    # Given VN001 supported by VN100 (the same country, no agreement)
    run_import(str(VN_CSV), "--mapping", str(VN_MAPPING))
    spoke = Facility.objects.get(identifiers__value="VN001")
    hub = Facility.objects.get(identifiers__value="VN100")
    link = SupportLink.objects.create(hub=hub, spoke=spoke)
    laos = tmp_path / "laos.json"
    mapping = json.loads(VN_MAPPING.read_text(encoding="utf-8"))
    mapping["country"] = {"code": "LA", "name": "Laos"}
    laos.write_text(json.dumps(mapping), encoding="utf-8")

    # When the file moves both (a whole file's country corrected): the link stays domestic
    run_import(str(VN_CSV), "--mapping", str(laos))
    assert Facility.objects.get(pk=spoke.pk).country.code == "LA"
    assert Facility.objects.get(pk=hub.pk).country.code == "LA"
    assert SupportLink.objects.get(pk=link.pk).is_cross_border is False


# --- what the registry takes from any source ----------------------------------------------------

CANONICAL_HEADER = (
    "code,name,name_local,country,country_name,province,district,commune,tier,facility_type,"
    "ownership,operational_status,latitude,longitude,parent_code,languages,beds,is_remote,"
    "identifiers,specialties"
)


def test_a_country_must_be_an_assigned_iso_code_and_beds_must_fit_the_column(
    tmp_path: Path,
) -> None:
    """ "ZZ" passed as two capital letters and became a country; 2**31 beds passed on
    SQLite (PostgreSQL's integer column refuses it)."""
    # Given rows with a user-assigned code, a known one not yet in the registry, and too
    # many beds
    path = tmp_path / "facilities.csv"
    path.write_text(
        CANONICAL_HEADER
        + "\nZZ-1,Nowhere Hospital,,ZZ,Nowhere,,,,2,,public,active,,,,,,no,[],"
        + "\nKE-1,Kenyatta,,KE,Kenya,,,,1,,public,active,,,,,,no,[],"
        + "\nKE-2,Big Hospital,,KE,Kenya,,,,1,,public,active,,,,,2147483648,no,[],\n"
    )

    # When it is imported all-or-nothing: refused, nothing written
    output = assert_refused(path, match=r"Nothing written: 2 error\(s\)")

    # Then the two rows are named
    assert error_lines(output) == [
        "error: row 2 (ZZ-1) [country]: 'ZZ' is not an ISO 3166-1 alpha-2 code",
        "error: row 4 (KE-2) [beds]: beds must be at most 2147483647, got 2147483648",
    ]
    assert not Country.objects.filter(code="ZZ").exists()

    # And with --skip-invalid the known code not yet in the registry is created, named
    # as the file names it
    applied = run_import(str(path), "--skip-invalid")
    assert "  countries created 1, " in applied
    assert list(Country.objects.values_list("code", "name")) == [("KE", "Kenya")]
    assert list(Facility.objects.values_list("code", flat=True)) == ["KE-1"]


def test_a_mapping_naming_an_unassigned_country_code_is_refused(tmp_path: Path) -> None:
    mapping = json.loads(VN_MAPPING.read_text())
    mapping["country"] = {"code": "ZZ", "name": "Nowhere"}
    path = tmp_path / "zz.json"
    path.write_text(json.dumps(mapping))

    with pytest.raises(
        CommandError, match=r"country\.code must be an ISO 3166-1 alpha-2 code, got 'ZZ'"
    ):
        run_import(str(VN_CSV), "--mapping", str(path))
    assert registry_counts() == dict.fromkeys(registry_counts(), 0)


def test_the_progress_counter_moves_by_rows_read_in_whole_batches(
    specialties: list[Specialty], tmp_path: Path
) -> None:
    """An invalid row made a batch of batch_size valid rows plus one: 4,000 → 5,001."""
    # Given five rows, the second invalid, read in batches of two
    bad = rewrite_csv(KENYA_SMALL, tmp_path / "bad.csv", {1: {"keph_level_name": "Level 7"}})
    name, document = read_mapping_document("kenya_kmhfl")
    steps: list[int] = []
    importer = FacilityImport(
        report=IssueReport(), batch_size=2, skip_invalid=True, progress=steps.append
    )

    # When they are imported
    with CsvSource(bad, parse_mapping(document, name=name)) as source:
        result = importer.run(source)

    # Then the counter moves by two rows read, then the last one
    assert steps == [2, 2, 1]
    assert (result.created, result.invalid) == (4, 1)
