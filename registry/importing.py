"""Bulk import of master facility lists (plain Python: no FHIR here).

Sources (a CSV file read through a declarative mapping, or an mCSD Bundle parsed by
``fhir_gateway.mcsd``) produce plain ``FacilityRecord`` dicts; ``FacilityImport`` upserts
them by identifier in batches with bulk operations, so memory stays flat and the number of
queries per batch is constant. The semantics (all-or-nothing by default, ``skip_invalid``,
dry run) are documented in docs/import-mapping.md.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import IO, Literal, NotRequired, Protocol, TypedDict

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import connection, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, Field, JSONField, Lookup, Model, Prefetch, Q, QuerySet
from django.db.models.sql.compiler import SQLCompiler
from django.utils import timezone
from django.utils.text import slugify
from psycopg.types.json import Jsonb
from unidecode import unidecode

from core.errors import Conflict
from registry.countries import is_country_code
from registry.models import (
    AdministrativeArea,
    Country,
    Department,
    Endpoint,
    Facility,
    FacilityIdentifier,
    FacilityRevision,
    OperationalStatus,
    Ownership,
    Specialty,
    Tier,
)
from registry.services import (
    facility_parent_changes_lock,
    facility_relink_country,
    facility_snapshot,
    support_links_upside_down,
)
from registry.text import search_key
from registry.validators import (
    INTEGER_MAX,
    LANGUAGE_TAG,
    endpoint_base_url_key,
    endpoint_base_url_problem,
)

# Facility.code seen as an identifier: exports carry it under this system, and a record
# (or a parent reference) naming it matches Facility.code instead of a FacilityIdentifier.
# The FHIR projection (fhir_gateway.registry_projection) uses the same URI.
FACILITY_CODE_SYSTEM = "https://consilium.example.org/fhir/sid/facility-code"

MAPPINGS_DIR = Path(__file__).resolve().parent / "mappings"
REVISION_SOURCE = "import"
CODE_MAX_LENGTH = 64
AREA_LEVELS = 3

FieldValue = str | int | float | bool | list[str] | None


class TextSink(Protocol):
    """Where exports and error reports are written (a file, or a command's stdout)."""

    def write(self, text: str, /) -> object: ...


class MappingError(ValueError):
    """The mapping, or the file as a whole, cannot be used (no row-level report possible)."""


# --- records: what every source produces -----------------------------------------------


class RecordIssue(TypedDict):
    column: str
    message: str


class IdentifierRecord(TypedDict):
    system: str
    value: str
    column: str


class ParentRef(TypedDict):
    system: str  # FACILITY_CODE_SYSTEM: value is a Facility.code
    value: str
    column: str


class AreaName(TypedDict):
    level: int
    name: str


class CountryRecord(TypedDict):
    code: str
    name: str


class DepartmentRecord(TypedDict):
    # Candidate SNOMED codes, most specific first; the first one the registry knows wins.
    specialty_codes: list[str]
    # strict: no known code is an error of the row; otherwise the department is skipped
    # with a warning (an mCSD HealthcareService for a service we do not route to).
    strict: bool
    column: str
    name: NotRequired[str]
    accepting: NotRequired[bool]
    modes: NotRequired[list[str]]
    languages: NotRequired[list[str]]


class EndpointRecord(TypedDict):
    base_url: str
    name: str
    status: str
    fhir_version: str
    column: str


class FacilityRecord(TypedDict):
    kind: Literal["facility"]
    row: int
    label: str  # shown next to the row number (the primary identifier value, a resource id)
    identifiers: list[IdentifierRecord]
    fields: dict[str, FieldValue]
    errors: list[RecordIssue]
    warnings: list[RecordIssue]
    code: NotRequired[str]  # explicit Facility.code (our own exports)
    code_prefix: NotRequired[str]  # otherwise code = prefix + first identifier value
    code_column: NotRequired[str]
    country: NotRequired[CountryRecord]
    areas: NotRequired[list[AreaName]]  # absent: the facility's area is left alone
    parent: NotRequired[ParentRef | None]  # absent: left alone; None: cleared
    departments: NotRequired[list[DepartmentRecord]]
    endpoints: NotRequired[list[EndpointRecord]]


class SourceIssue(TypedDict):
    """A problem with a part of the source that is not a facility (an mCSD entry we skip)."""

    kind: Literal["issue"]
    row: int
    label: str
    column: str
    message: str
    severity: Literal["error", "warning"]


SourceItem = FacilityRecord | SourceIssue


def new_record(row: int) -> FacilityRecord:
    return {
        "kind": "facility",
        "row": row,
        "label": "",
        "identifiers": [],
        "fields": {},
        "errors": [],
        "warnings": [],
    }


# --- field values: parsing and validation shared by every source ------------------------

FACILITY_FIELDS: dict[str, str] = {
    # field -> kind (how a CSV cell is parsed)
    "name": "text",
    "name_local": "text",
    "tier": "tier",
    "facility_type": "text",
    "ownership": "ownership",
    "operational_status": "status",
    "latitude": "float",
    "longitude": "float",
    "languages": "list",
    "beds": "int",
    "is_remote": "bool",
}
REQUIRED_FIELDS = frozenset({"name", "tier"})
# Choices as sets once: the enums' .values build a new list on every call.
TIERS = frozenset(Tier.values)
OWNERSHIPS = frozenset(Ownership.values)
STATUSES = frozenset(OperationalStatus.values)
TEXT_MAX_LENGTH = {"name": 255, "name_local": 255, "facility_type": 100}
TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y"})
FALSE_WORDS = frozenset({"0", "false", "f", "no", "n"})
_url_validator = URLValidator()


def parse_cell(kind: str, text: str, separator: str = ";") -> FieldValue:
    """A non-empty CSV cell as a typed value; ValueError with a readable message."""
    if kind == "text":
        return text
    if kind in ("tier", "int"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
    if kind == "float":
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{text!r} is not a finite number")
        return number
    if kind == "bool":
        word = text.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"{text!r} is not true/false")
    if kind == "list":
        return [part.strip() for part in text.split(separator) if part.strip()]
    return text  # ownership/status: checked against the choices by field_errors()


def empty_value(name: str) -> FieldValue:
    """What an empty cell means for an optional field."""
    kind = FACILITY_FIELDS[name]
    if kind == "text":
        return ""
    if kind == "list":
        return []
    if kind == "bool":
        return False
    return None


def field_errors(values: Mapping[str, FieldValue]) -> list[tuple[str, str]]:
    """(field, message) for every value the registry would refuse."""
    errors: list[tuple[str, str]] = []
    for name, value in values.items():
        message = _field_error(name, value)
        if message:
            errors.append((name, message))
    # Only when both were read: a value that failed to parse has its own error already.
    lat, lon = values.get("latitude"), values.get("longitude")
    if "latitude" in values and "longitude" in values and (lat is None) != (lon is None):
        missing = "latitude" if lat is None else "longitude"
        errors.append((missing, "latitude and longitude must be given together"))
    return errors


def _field_error(name: str, value: FieldValue) -> str:
    if value is None or value == "" or value == []:
        return f"{name} is required" if name in REQUIRED_FIELDS else ""
    kind = FACILITY_FIELDS[name]
    if kind == "text":
        limit = TEXT_MAX_LENGTH[name]
        if not isinstance(value, str):
            return f"{name} must be text"
        return f"{name} is longer than {limit} characters" if len(value) > limit else ""
    if kind == "tier":
        if isinstance(value, bool) or not isinstance(value, int) or value not in TIERS:
            return f"tier must be 1-4 ({_choices(Tier)}), got {value!r}"
        return ""
    if kind == "ownership":
        return "" if value in OWNERSHIPS else f"ownership must be one of {_choices(Ownership)}"
    if kind == "status":
        if value in STATUSES:
            return ""
        return f"operational_status must be one of {_choices(OperationalStatus)}"
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{name} must be a number"
        bound = 90 if name == "latitude" else 180
        if not -bound <= value <= bound:
            return f"{name} {value} is outside -{bound}..{bound}"
        return ""
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} must be a whole number >= 0, got {value!r}"
        if value > INTEGER_MAX:  # the database column's range (SQLite would store it)
            return f"{name} must be at most {INTEGER_MAX}, got {value!r}"
        return ""
    if kind == "bool":
        return "" if isinstance(value, bool) else f"{name} must be true or false"
    if kind == "list":
        if not isinstance(value, list):
            return f"{name} must be a list"
        bad = [tag for tag in value if not LANGUAGE_TAG.match(tag)]
        return f"{name}: not BCP-47 language tags: {', '.join(bad)}" if bad else ""
    return ""


def _choices(choices: type[Tier] | type[Ownership] | type[OperationalStatus]) -> str:
    return ", ".join(f"{value}={label}" for value, label in choices.choices)


def endpoint_error(endpoint: EndpointRecord) -> str:
    try:
        _url_validator(endpoint["base_url"])
    except ValidationError:
        return f"endpoint address {endpoint['base_url']!r} is not a URL"
    problem = endpoint_base_url_problem(endpoint["base_url"])
    if problem:  # the registry's rule, as for the API: the gateway could never send to it
        return f"endpoint address {endpoint['base_url'][:200]!r} {problem}"
    if len(endpoint["base_url"]) > 500:
        return "endpoint address is longer than 500 characters"
    if endpoint["status"] not in Endpoint.Status.values:
        return f"endpoint status {endpoint['status']!r} is not one of {Endpoint.Status.values}"
    if endpoint["fhir_version"] not in Endpoint.FhirVersion.values:
        return f"endpoint FHIR version {endpoint['fhir_version']!r} is not supported"
    return ""


# --- the CSV mapping ---------------------------------------------------------------------

_MISSING = object()
MAPPING_KEYS = frozenset(
    {
        "description",
        "format",
        "encoding",
        "delimiter",
        "country",
        "code",
        "identifiers",
        "areas",
        "fields",
        "parent",
        "services",
        "specialties",
    }
)
FIELD_SPEC_KEYS = frozenset({"column", "values", "default", "value", "separator"})


@dataclass(frozen=True)
class FieldSpec:
    name: str
    column: str | None
    values: dict[str, FieldValue] | None
    has_default: bool
    default: FieldValue  # the value of an empty cell
    has_constant: bool
    constant: FieldValue  # the value every row gets (no column)
    separator: str


@dataclass(frozen=True)
class IdentifierSpec:
    column: str
    system: str | None  # None: the column holds a JSON list of {"system", "value"}


@dataclass(frozen=True)
class ServicesSpec:
    column: str
    separator: str
    specialties: dict[str, str] | None  # casefolded source service name -> SNOMED code


@dataclass(frozen=True)
class CsvMapping:
    name: str
    encoding: str
    delimiter: str
    country_code: str | None
    country_name: str
    country_column: str | None
    country_name_column: str | None
    code_column: str | None
    code_prefix: str
    identifiers: tuple[IdentifierSpec, ...]
    areas: tuple[str, ...]
    fields: tuple[FieldSpec, ...]
    parent_column: str | None
    parent_system: str
    services: tuple[ServicesSpec, ...]

    def columns(self) -> list[str]:
        """Every column the mapping reads (all must be in the file's header)."""
        named = [self.country_column, self.country_name_column, self.code_column]
        named += [i.column for i in self.identifiers] + list(self.areas)
        named += [f.column for f in self.fields] + [self.parent_column]
        named += [s.column for s in self.services]
        return list(dict.fromkeys(c for c in named if c))


def mapping_path(name_or_path: str) -> Path:
    """A mapping file path, or the name of one shipped in registry/mappings/."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = MAPPINGS_DIR / (
        name_or_path if name_or_path.endswith(".json") else f"{name_or_path}.json"
    )
    if "/" not in name_or_path and shipped.exists():
        return shipped
    available = ", ".join(sorted(p.stem for p in MAPPINGS_DIR.glob("*.json")))
    raise MappingError(f"mapping {name_or_path!r} not found (shipped mappings: {available})")


def read_mapping_document(name_or_path: str) -> tuple[str, dict[str, object]]:
    """(name, JSON object) of a mapping file; the caller parses it (CSV or mCSD)."""
    path = mapping_path(name_or_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError(f"cannot read mapping {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MappingError(f"mapping {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MappingError(f"mapping {path}: the top level must be a JSON object")
    return path.stem, data


def load_mapping(name_or_path: str) -> CsvMapping:
    name, data = read_mapping_document(name_or_path)
    return parse_mapping(data, name=name)


def parse_mapping(data: Mapping[str, object], *, name: str = "mapping") -> CsvMapping:
    """Validate a mapping document; MappingError names the offending key."""

    def fail(message: str) -> MappingError:
        return MappingError(f"mapping {name}: {message}")

    unknown = sorted(set(data) - MAPPING_KEYS)
    if unknown:
        raise fail(
            f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(MAPPING_KEYS))})"
        )
    if data.get("format", "csv") != "csv":
        raise fail("format must be 'csv'")

    encoding = _str(data.get("encoding", "utf-8-sig"), "encoding", fail)
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        raise fail(f"unknown encoding {encoding!r}") from None
    if codec.name.startswith(("utf-16", "utf-32")):
        # Lines are decoded one by one (to report bad bytes per row): ASCII-compatible only.
        raise fail(f"encoding {encoding!r} is not supported; convert the file to UTF-8")
    delimiter = _str(data.get("delimiter", ","), "delimiter", fail)
    if len(delimiter) != 1:
        raise fail("delimiter must be one character")

    country = _obj(data.get("country"), "country", fail, {"code", "name", "column", "name_column"})
    country_code = _opt_str(country.get("code"), "country.code", fail)
    country_column = _opt_str(country.get("column"), "country.column", fail)
    if (country_code is None) == (country_column is None):
        raise fail("country needs exactly one of 'code' (a constant) or 'column'")
    if country_code is not None and not is_country_code(country_code):
        raise fail(f"country.code must be an ISO 3166-1 alpha-2 code, got {country_code!r}")

    code = _obj(data.get("code", {}), "code", fail, {"prefix", "column"})
    code_prefix = _str(code.get("prefix", ""), "code.prefix", fail)
    code_column = _opt_str(code.get("column"), "code.column", fail)

    identifiers = _identifier_specs(data.get("identifiers", []), fail)
    if not identifiers and code_column is None:
        raise fail("give 'identifiers' (facilities are matched by identifier) or code.column")
    if code_column is None and identifiers[0].system is None:
        raise fail("the first identifier names the facility code: it needs a 'system'")

    areas_raw = data.get("areas", [])
    if not isinstance(areas_raw, list) or len(areas_raw) > AREA_LEVELS:
        raise fail(f"areas must be a list of at most {AREA_LEVELS} columns, province first")
    areas = tuple(_str(a, f"areas[{i}]", fail) for i, a in enumerate(areas_raw))

    fields_raw = _obj(data.get("fields", {}), "fields", fail, None)
    unknown_fields = sorted(set(fields_raw) - set(FACILITY_FIELDS))
    if unknown_fields:
        raise fail(
            f"unknown field(s) {', '.join(unknown_fields)} "
            f"(facility fields: {', '.join(FACILITY_FIELDS)})"
        )
    fields = tuple(_field_spec(n, spec, fail) for n, spec in fields_raw.items())
    missing_required = sorted(REQUIRED_FIELDS - {f.name for f in fields})
    if missing_required:
        raise fail(f"fields must map {', '.join(missing_required)}")

    parent = _obj(data.get("parent", {}), "parent", fail, {"column", "system"})
    parent_column = _opt_str(parent.get("column"), "parent.column", fail)
    parent_system = _str(parent.get("system", FACILITY_CODE_SYSTEM), "parent.system", fail)

    services: list[ServicesSpec] = []
    if "services" in data:
        spec = _obj(data["services"], "services", fail, {"column", "separator", "specialties"})
        table = _obj(spec.get("specialties"), "services.specialties", fail, None)
        services.append(
            ServicesSpec(
                column=_str(spec.get("column"), "services.column", fail),
                separator=_str(spec.get("separator", ";"), "services.separator", fail),
                specialties={
                    k.strip().casefold(): _str(v, f"services.specialties[{k!r}]", fail)
                    for k, v in table.items()
                },
            )
        )
    if "specialties" in data:
        spec = _obj(data["specialties"], "specialties", fail, {"column", "separator"})
        services.append(
            ServicesSpec(
                column=_str(spec.get("column"), "specialties.column", fail),
                separator=_str(spec.get("separator", ";"), "specialties.separator", fail),
                specialties=None,
            )
        )

    return CsvMapping(
        name=name,
        encoding=encoding,
        delimiter=delimiter,
        country_code=country_code,
        country_name=_str(country.get("name", country_code or ""), "country.name", fail),
        country_column=country_column,
        country_name_column=_opt_str(country.get("name_column"), "country.name_column", fail),
        code_column=code_column,
        code_prefix=code_prefix,
        identifiers=identifiers,
        areas=areas,
        fields=fields,
        parent_column=parent_column,
        parent_system=parent_system,
        services=tuple(services),
    )


def mapping_check_specialties(mapping: CsvMapping, known: Iterable[str]) -> None:
    """Every SNOMED code a services table names must be a registry Specialty."""
    known_codes = set(known)
    for spec in mapping.services:
        for service, code in (spec.specialties or {}).items():
            if code not in known_codes:
                raise MappingError(
                    f"mapping {mapping.name}: service {service!r} maps to specialty {code}, "
                    "which is not in the registry (run the migrations to load specialties)"
                )


def _str(value: object, key: str, fail: Callable[[str], MappingError]) -> str:
    if not isinstance(value, str):
        raise fail(f"{key} must be a string")
    return value


def _opt_str(value: object, key: str, fail: Callable[[str], MappingError]) -> str | None:
    return None if value is None else _str(value, key, fail)


def _obj(
    value: object, key: str, fail: Callable[[str], MappingError], allowed: set[str] | None
) -> dict[str, object]:
    if not isinstance(value, dict):
        raise fail(f"{key} must be an object")
    if allowed is not None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise fail(
                f"{key}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
            )
    return value


def _identifier_specs(
    value: object, fail: Callable[[str], MappingError]
) -> tuple[IdentifierSpec, ...]:
    if not isinstance(value, list):
        raise fail("identifiers must be a list")
    specs: list[IdentifierSpec] = []
    for i, item in enumerate(value):
        spec = _obj(item, f"identifiers[{i}]", fail, {"column", "system", "format"})
        column = _str(spec.get("column"), f"identifiers[{i}].column", fail)
        if spec.get("format") == "json":
            if "system" in spec:
                raise fail(f"identifiers[{i}]: a JSON column carries its own systems")
            specs.append(IdentifierSpec(column=column, system=None))
        elif "format" in spec:
            raise fail(f"identifiers[{i}].format must be 'json'")
        else:
            system = _str(spec.get("system"), f"identifiers[{i}].system", fail)
            if system == FACILITY_CODE_SYSTEM:
                raise fail(f"identifiers[{i}]: use code.column for {FACILITY_CODE_SYSTEM}")
            specs.append(IdentifierSpec(column=column, system=system))
    systems = [s.system for s in specs if s.system]
    if len(systems) != len(set(systems)):
        raise fail("identifiers: each system at most once (one identifier per system)")
    return tuple(specs)


def _field_spec(name: str, raw: object, fail: Callable[[str], MappingError]) -> FieldSpec:
    spec = {"column": raw} if isinstance(raw, str) else _obj(raw, f"fields.{name}", fail, None)
    unknown = sorted(set(spec) - FIELD_SPEC_KEYS)
    if unknown:
        raise fail(f"fields.{name}: unknown key(s) {', '.join(unknown)}")
    column = _opt_str(spec.get("column"), f"fields.{name}.column", fail)
    constant = spec.get("value", _MISSING)
    if (column is None) == (constant is _MISSING):
        raise fail(f"fields.{name} needs exactly one of 'column' or 'value'")
    values_raw = spec.get("values")
    values = None
    if values_raw is not None:
        table = _obj(values_raw, f"fields.{name}.values", fail, None)
        values = {
            k.strip(): _json_value(v, f"fields.{name}.values", fail) for k, v in table.items()
        }
    default = spec.get("default", _MISSING)
    checked = [v for v in (*(values or {}).values(), default, constant) if v is not _MISSING]
    for value in checked:
        message = _field_error(name, _json_value(value, f"fields.{name}", fail))
        if message:
            raise fail(f"fields.{name}: {message}")
    return FieldSpec(
        name=name,
        column=column,
        values=values,
        has_default=default is not _MISSING,
        default=None if default is _MISSING else _json_value(default, name, fail),
        has_constant=constant is not _MISSING,
        constant=None if constant is _MISSING else _json_value(constant, name, fail),
        separator=_str(spec.get("separator", ";"), f"fields.{name}.separator", fail),
    )


def _json_value(value: object, key: str, fail: Callable[[str], MappingError]) -> FieldValue:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [str(v) for v in value]
    raise fail(f"{key}: unsupported value {value!r}")


# --- reading CSV -------------------------------------------------------------------------


@dataclass
class _DecodeState:
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    line_no: int = 0


def _decoded_lines(raw: IO[bytes], encoding: str, state: _DecodeState) -> Iterator[str]:
    """Decode line by line so one bad byte spoils one row, not the whole file."""
    tail_encoding = "utf-8" if codecs.lookup(encoding).name == "utf-8-sig" else encoding
    for raw_line in raw:
        state.line_no += 1
        codec = encoding if state.line_no == 1 else tail_encoding
        try:
            yield raw_line.decode(codec)
        except UnicodeDecodeError as exc:
            bad = raw_line[exc.start : exc.start + 1].hex()
            state.bad_lines.append(
                (state.line_no, f"not valid {encoding} (byte 0x{bad} at position {exc.start})")
            )
            yield raw_line.decode(codec, errors="replace")


class CsvSource:
    """Stream FacilityRecords from a CSV file, one row at a time."""

    def __init__(self, path: Path, mapping: CsvMapping) -> None:
        self.path = path
        self.mapping = mapping
        self.state = _DecodeState()
        self._raw: IO[bytes] | None = None

    def __enter__(self) -> CsvSource:
        try:
            self._raw = self.path.open("rb")
        except OSError as exc:
            raise MappingError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._raw is not None:
            self._raw.close()

    def __iter__(self) -> Iterator[FacilityRecord]:
        assert self._raw is not None, "use CsvSource as a context manager"
        m = self.mapping
        lines = _decoded_lines(self._raw, m.encoding, self.state)
        reader = csv.reader(lines, delimiter=m.delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise MappingError(f"{self.path} is empty (no header row)") from None
        except csv.Error as exc:
            raise MappingError(f"{self.path}: malformed CSV header: {exc}") from None
        if self.state.bad_lines:
            raise MappingError(
                f"{self.path}: the header is {self.state.bad_lines[0][1]}; "
                'set "encoding" in the mapping to the file\'s encoding'
            )
        index = self._column_index(header)
        width = len(header)
        compiled = self._compile(index)
        previous_line = reader.line_num
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise MappingError(
                    f"{self.path} line {reader.line_num}: malformed CSV: {exc}"
                ) from None
            row = previous_line + 1
            previous_line = reader.line_num
            if not cells:
                continue  # blank line
            record = new_record(row)
            if self.state.bad_lines:
                for line_no, message in self.state.bad_lines:
                    bad_columns = [header[i] for i, c in enumerate(cells[:width]) if "\ufffd" in c]
                    record["errors"].append(
                        {"column": ", ".join(bad_columns), "message": f"line {line_no}: {message}"}
                    )
                self.state.bad_lines.clear()
            if len(cells) != width:
                record["errors"].append(
                    {"column": "", "message": f"{len(cells)} fields, the header has {width}"}
                )
                yield record
                continue
            compiled(cells, record)
            yield record

    def _column_index(self, header: list[str]) -> dict[str, int]:
        index: dict[str, int] = {}
        for i, name in enumerate(header):
            index.setdefault(name.strip(), i)
        missing = [c for c in self.mapping.columns() if c not in index]
        if missing:
            raise MappingError(
                f"mapping {self.mapping.name} names column(s) {', '.join(map(repr, missing))} "
                f"that {self.path.name} lacks; its columns are: {', '.join(header)}"
            )
        return index

    def _compile(self, index: dict[str, int]) -> Callable[[list[str], FacilityRecord], None]:
        """Build the per-row converter once: column lookups resolved to list indexes."""
        m = self.mapping
        country_const: CountryRecord | None = (
            {"code": m.country_code, "name": m.country_name} if m.country_code else None
        )
        identifier_cols = [(index[s.column], s) for s in m.identifiers]
        area_cols = [(level, index[col]) for level, col in enumerate(m.areas, start=1)]
        field_cols = [(index[f.column] if f.column else -1, f) for f in m.fields]
        service_cols = [(index[s.column], s) for s in m.services]

        def convert(cells: list[str], record: FacilityRecord) -> None:
            errors = record["errors"]
            identifiers = record["identifiers"]
            for i, ident_spec in identifier_cols:
                text = cells[i].strip()
                if ident_spec.system is None:
                    identifiers.extend(_json_identifiers(text, ident_spec.column, errors))
                elif text:
                    identifiers.append(
                        {"system": ident_spec.system, "value": text, "column": ident_spec.column}
                    )
                elif ident_spec is m.identifiers[0] and m.code_column is None:
                    errors.append(
                        {"column": ident_spec.column, "message": "the facility identifier is empty"}
                    )
            for ident in identifiers:
                if len(ident["value"]) > 255:
                    errors.append(
                        {"column": ident["column"], "message": "identifier longer than 255"}
                    )
            record["label"] = identifiers[0]["value"] if identifiers else ""
            if m.code_column is not None:
                code = cells[index[m.code_column]].strip()
                if code:
                    record["code"] = code
                    record["label"] = code
                else:
                    errors.append({"column": m.code_column, "message": "code is empty"})
                record["code_column"] = m.code_column
            record["code_prefix"] = m.code_prefix

            if country_const is not None:
                record["country"] = country_const
            else:
                assert m.country_column is not None
                code = cells[index[m.country_column]].strip().upper()
                name = cells[index[m.country_name_column]].strip() if m.country_name_column else ""
                if is_country_code(code):
                    record["country"] = {"code": code, "name": name or code}
                else:
                    errors.append(
                        {
                            "column": m.country_column,
                            "message": f"{code!r} is not an ISO 3166-1 alpha-2 code",
                        }
                    )

            if area_cols:
                names: list[AreaName] = []
                for level, i in area_cols:
                    name = " ".join(cells[i].split())
                    if name:
                        if len(name) > 200:
                            errors.append(
                                {
                                    "column": m.areas[level - 1],
                                    "message": "area name longer than 200",
                                }
                            )
                        names.append({"level": level, "name": name})
                record["areas"] = names

            values = record["fields"]
            columns: dict[str, str] = {}
            for i, spec in field_cols:
                columns[spec.name] = spec.column or f"(constant {spec.name})"
                if spec.has_constant:
                    values[spec.name] = _copy(spec.constant)
                    continue
                text = cells[i].strip()
                if not text:
                    if spec.has_default:
                        values[spec.name] = _copy(spec.default)
                    elif spec.name in REQUIRED_FIELDS:
                        errors.append(
                            {
                                "column": columns[spec.name],
                                "message": f"{spec.name} is empty and the mapping has no default",
                            }
                        )
                    else:
                        values[spec.name] = empty_value(spec.name)
                    continue
                if spec.values is not None:
                    if text not in spec.values:
                        known = ", ".join(map(repr, spec.values))
                        errors.append(
                            {
                                "column": columns[spec.name],
                                "message": f"{text!r} is not a mapped value for {spec.name} (mapped: {known})",
                            }
                        )
                        continue
                    values[spec.name] = _copy(spec.values[text])
                    continue
                try:
                    values[spec.name] = parse_cell(FACILITY_FIELDS[spec.name], text, spec.separator)
                except ValueError as exc:
                    errors.append({"column": columns[spec.name], "message": f"{spec.name}: {exc}"})
            for name, message in field_errors(values):
                errors.append({"column": columns.get(name, name), "message": message})

            if m.parent_column is not None:
                text = cells[index[m.parent_column]].strip()
                record["parent"] = (
                    {"system": m.parent_system, "value": text, "column": m.parent_column}
                    if text
                    else None
                )

            departments: list[DepartmentRecord] = []
            for i, services in service_cols:
                seen: set[str] = set()
                for part in cells[i].split(services.separator):
                    name = part.strip()
                    if not name:
                        continue
                    if services.specialties is None:
                        code = name
                    else:
                        mapped = services.specialties.get(name.casefold())
                        if mapped is None:
                            continue  # a service that is not a consult specialty
                        code = mapped
                    if code not in seen:
                        seen.add(code)
                        departments.append(
                            {
                                "specialty_codes": [code],
                                "strict": True,
                                "column": services.column,
                            }
                        )
            if service_cols:
                record["departments"] = departments

        return convert


def _copy(value: FieldValue) -> FieldValue:
    return list(value) if isinstance(value, list) else value


def _json_identifiers(text: str, column: str, errors: list[RecordIssue]) -> list[IdentifierRecord]:
    if not text:
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        errors.append({"column": column, "message": f"not a JSON list of identifiers: {exc}"})
        return []
    result: list[IdentifierRecord] = []
    ok = isinstance(items, list)
    for item in items if ok else []:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("system"), str)
            and isinstance(item.get("value"), str)
            and item["system"]
            and item["value"]
        ):
            ok = False
            break
        result.append({"system": item["system"], "value": item["value"], "column": column})
    if not ok:
        errors.append(
            {"column": column, "message": 'expected a JSON list of {"system": ..., "value": ...}'}
        )
        return []
    systems = [i["system"] for i in result]
    if len(systems) != len(set(systems)):
        errors.append({"column": column, "message": "at most one identifier per system"})
        return []
    return result


# --- the report --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportIssue:
    row: int
    column: str
    message: str
    label: str = ""
    severity: str = "error"

    def __str__(self) -> str:
        where = f"row {self.row}" + (f" ({self.label})" if self.label else "")
        column = f" [{self.column}]" if self.column else ""
        return f"{where}{column}: {self.message}"


ERRORS_CSV_HEADER = ["row", "column", "identifier", "severity", "message"]


class IssueReport:
    """Every issue goes to the optional CSV sink; only the first ``keep`` stay in memory."""

    def __init__(self, sink: TextSink | None = None, *, keep: int = 100) -> None:
        self.keep = keep
        self.issues: list[ImportIssue] = []
        self.errors = 0
        self.warnings = 0
        self._writer = csv.writer(sink) if sink is not None else None
        if self._writer is not None:
            self._writer.writerow(ERRORS_CSV_HEADER)

    def add(self, issue: ImportIssue) -> None:
        if issue.severity == "error":
            self.errors += 1
        else:
            self.warnings += 1
        if len(self.issues) < self.keep:
            self.issues.append(issue)
        if self._writer is not None:
            self._writer.writerow(
                [issue.row, issue.column, issue.label, issue.severity, issue.message]
            )


# --- the engine ----------------------------------------------------------------------------


@dataclass
class ImportResult:
    records: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    invalid: int = 0
    countries_created: int = 0
    areas_created: int = 0
    identifiers_created: int = 0
    identifiers_updated: int = 0
    departments_created: int = 0
    endpoints_created: int = 0
    revisions_created: int = 0
    committed: bool = False
    dry_run: bool = False


class _Rollback(Exception):
    pass


class _SeenIds:
    """Facility ids already imported in this run, as a bitmap: memory grows with the highest
    id (125 kB per million ids), not with a Python object per row."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, pk: int) -> None:
        byte = pk >> 3
        if byte >= len(self._bits):
            self._bits.extend(bytes(byte - len(self._bits) + 4096))
        self._bits[byte] |= 1 << (pk & 7)

    def __contains__(self, pk: int) -> bool:
        byte = pk >> 3
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << (pk & 7)))


@dataclass(frozen=True)
class _Area:
    pk: int
    province_id: int | None


@functools.lru_cache(maxsize=65536)
def _name_key(name: str) -> str:
    """search_key of an area name, memoised: a file repeats a few thousand names."""
    return search_key(name)


class _AreaCache:
    """Every area of one country, by (parent id or 0, level, search key of the name)."""

    def __init__(self, country_id: int) -> None:
        self.country_id = country_id
        self.by_key: dict[tuple[int, int, str], _Area] = {}
        self.by_pk: dict[int, _Area] = {}
        self.codes: set[str] = set()
        rows = list(
            AdministrativeArea.objects.filter(country_id=country_id).values_list(
                "id", "parent_id", "level", "name", "code"
            )
        )
        parent_of = {pk: parent for pk, parent, *_ in rows}
        level_of = {pk: level for pk, _, level, *_ in rows}
        for pk, parent, level, name, code in rows:
            province: int | None = pk
            for _ in range(AREA_LEVELS + 2):  # bounded: a corrupt parent cycle cannot hang us
                if province is None or level_of.get(province) == 1:
                    break
                province = parent_of.get(province)
            if province is not None and level_of.get(province) != 1:
                province = None
            self._add(parent or 0, level, _name_key(name), _Area(pk, province))
            self.codes.add(code)

    def _add(self, parent: int, level: int, key: str, area: _Area) -> None:
        self.by_key[(parent, level, key)] = area
        self.by_pk[area.pk] = area

    def find(self, names: list[AreaName]) -> _Area | None:
        """The area a path of names leads to; KeyError when a step does not exist yet."""
        area: _Area | None = None
        for item in names:
            area = self.by_key[(area.pk if area else 0, item["level"], _name_key(item["name"]))]
        return area

    def missing(self, paths: Iterable[list[AreaName]]) -> list[list[AreaName]]:
        """The distinct paths with a step not in the registry yet (usually none)."""
        result: dict[tuple[tuple[int, str], ...], list[AreaName]] = {}
        for names in paths:
            key = tuple((n["level"], n["name"]) for n in names)
            if key in result:
                continue
            try:
                self.find(names)
            except KeyError:
                result[key] = names
        return list(result.values())

    def code_for(self, path: list[str]) -> str:
        """Deterministic: the slug of the path ("nairobi/westlands/kilimani"); a hash keeps
        it within 64 characters and apart from a taken code (two spellings, one slug)."""
        slug = "/".join(slugify(unidecode(name)) or "area" for name in path)
        code = slug
        if len(slug) > CODE_MAX_LENGTH or slug in self.codes:
            digest = hashlib.sha256("\x1f".join(path).encode()).hexdigest()[:8]
            code = f"{slug[: CODE_MAX_LENGTH - 9]}-{digest}"
        self.codes.add(code)
        return code

    def create_missing(self, paths: Iterable[list[AreaName]]) -> int:
        """Create every missing area on these paths: one bulk insert per level."""
        created = 0
        paths = list(paths)
        for depth in range(1, AREA_LEVELS + 1):
            new: dict[tuple[int, int, str], AdministrativeArea] = {}
            for names in paths:
                if len(names) < depth:
                    continue
                parent = self.find(names[: depth - 1])
                item = names[depth - 1]
                key = (parent.pk if parent else 0, item["level"], _name_key(item["name"]))
                if key in self.by_key or key in new:
                    continue
                new[key] = AdministrativeArea(
                    country_id=self.country_id,
                    parent_id=parent.pk if parent else None,
                    level=item["level"],
                    name=item["name"],
                    code=self.code_for([n["name"] for n in names[:depth]]),
                )
            if not new:
                continue
            AdministrativeArea.objects.bulk_create(list(new.values()))
            created += len(new)
            for key, area in new.items():
                if area.level == 1:
                    province: int | None = area.pk
                else:
                    parent_area = self.by_pk.get(area.parent_id) if area.parent_id else None
                    province = parent_area.province_id if parent_area else None
                self._add(*key, _Area(area.pk, province))
        return created


class _Inserter:
    """Inserts new rows. On PostgreSQL with COPY: no SQL to build, no value to quote, about
    three times faster than bulk_create here; facility ids are drawn from the table's sequence
    first so that children can point at parents of the same batch. Other databases (SQLite
    under ``make run``) use bulk_create."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        # COPY through psycopg 3's cursor.copy(); psycopg2 would take the portable path.
        self.copy = connection.vendor == "postgresql" and _is_psycopg3()

    def facilities(self, facilities: list[Facility], link: Callable[[], None]) -> None:
        """Insert new facilities; ``link`` sets parent ids once every id is known."""
        if not facilities:
            link()
            return
        if not self.copy:
            Facility.objects.bulk_create(facilities, batch_size=self.batch_size)
            linked = {f.pk: f.parent_id for f in facilities}
            link()
            relink = [f for f in facilities if f.parent_id != linked[f.pk]]
            if relink:
                Facility.objects.bulk_update(relink, ["parent"], batch_size=self.batch_size)
            return
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
                [Facility._meta.db_table, len(facilities)],
            )
            for facility, (pk,) in zip(facilities, cursor.fetchall(), strict=True):
                facility.pk = pk
        link()
        now = timezone.now()
        for facility in facilities:
            facility.updated_at = now  # auto_now: COPY does not call pre_save
        fields = list(Facility._meta.concrete_fields)
        self._copy(Facility, fields, map(attrgetter(*(f.attname for f in fields)), facilities))

    def rows(self, model: type[Model], columns: list[str], rows: list[tuple[object, ...]]) -> None:
        """Insert plain tuples (no model instances: building them cost more than the insert).
        ``columns`` are attribute names; every other field gets its model default."""
        if not rows:
            return
        if not self.copy:
            objects = [model(**dict(zip(columns, r, strict=True))) for r in rows]
            model._default_manager.bulk_create(objects, batch_size=self.batch_size)
            return
        now = timezone.now()
        given = [_concrete_field(model, c) for c in columns]
        rest = [
            f for f in model._meta.concrete_fields if not f.primary_key and f.attname not in columns
        ]
        # Defaults are evaluated once per batch (a timestamp, an empty list): same as the
        # values bulk_create would have written, within the same second.
        defaults = tuple(now if getattr(f, "auto_now", False) else f.get_default() for f in rest)
        self._copy(model, given + rest, (r + defaults for r in rows))

    @staticmethod
    def _copy(
        model: type[Model], fields: list[Field[object, object]], rows: Iterable[tuple[object, ...]]
    ) -> None:
        table = connection.ops.quote_name(model._meta.db_table)
        names = ", ".join(connection.ops.quote_name(f.column) for f in fields)
        json_at = [i for i, f in enumerate(fields) if isinstance(f, JSONField)]
        sql = f"COPY {table} ({names}) FROM STDIN"
        started = time.monotonic()
        count = 0
        with connection.cursor() as cursor, cursor.cursor.copy(sql) as copy:
            for row in rows:
                if json_at:
                    values = list(row)
                    for i in json_at:
                        values[i] = Jsonb(values[i])
                    row = tuple(values)
                copy.write_row(row)
                count += 1
        if connection.queries_logged:
            # Keep COPY visible to query counting (CaptureQueriesContext, debug toolbar).
            connection.queries_log.append(
                {"sql": f"{sql} -- {count} rows", "time": f"{time.monotonic() - started:.3f}"}
            )


def _is_psycopg3() -> bool:
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return bool(is_psycopg3)


def _concrete_field(model: type[Model], attname: str) -> Field[object, object]:
    field = model._meta.get_field(attname)
    if not isinstance(field, Field):
        raise TypeError(f"{model.__name__}.{attname} is not a column")
    return field


@dataclass
class _Planned:
    """One record of a batch on its way to the database."""

    record: FacilityRecord
    facility: Facility
    before: dict[str, object] | None  # tracked values before the import; None: new facility
    keys: list[tuple[str, str]]
    identifiers_before: list[str] | None = None
    identifiers_after: list[str] | None = None


@dataclass(frozen=True)
class _PendingParent:
    child_id: int
    key: tuple[str, str]
    row: int
    label: str
    column: str


Progress = Callable[[int], object]  # e.g. tqdm.update
_IdentifierIndex = dict[tuple[str, str], tuple[int, str]]  # (system, value) -> (id, code)
_Keyed = tuple[FacilityRecord, list[tuple[str, str]]]  # a record and its (system, value) keys


class FacilityImport:
    """Upsert FacilityRecords in batches inside one transaction.

    Every record is validated before anything of its batch is written, so a rejected row
    never leaves a trace; the transaction is rolled back at the end on a dry run, or when
    there were errors and ``skip_invalid`` is off (all-or-nothing).
    """

    def __init__(
        self,
        *,
        report: IssueReport,
        batch_size: int | None = None,
        skip_invalid: bool = False,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.report = report
        self.batch_size = batch_size or settings.REGISTRY_IMPORT_BATCH_SIZE
        self.skip_invalid = skip_invalid
        self.dry_run = dry_run
        self.progress = progress
        self.result = ImportResult(dry_run=dry_run)
        self._seen = _SeenIds()
        self._countries: dict[str, Country] = {}
        self._areas: dict[int, _AreaCache] = {}
        self._specialties: dict[str, Specialty] = {}
        self._pending_parents: list[_PendingParent] = []  # parents further down the file
        # facility id -> (row, label, column) of each parent this import set: checked for
        # loops at the end
        self._parented: dict[int, tuple[int, str, str]] = {}
        # facility id -> (row, label) of each facility this import moves to another country
        self._moved: dict[int, tuple[int, str]] = {}
        # facility id -> (row, label) of each facility whose tier this import changes
        self._retiered: dict[int, tuple[int, str]] = {}
        self._fatal = False  # an error rows cannot be skipped for: nothing is written
        self._insert = _Inserter(self.batch_size)

    # The whole run ---------------------------------------------------------------------

    def run(self, items: Iterable[SourceItem]) -> ImportResult:
        self._specialties = {s.code: s for s in Specialty.objects.filter(system=Specialty.SNOMED)}
        try:
            with transaction.atomic():
                # First, before the rows' locks (see the function): parents may change.
                facility_parent_changes_lock()
                self._run(items)
                if self.dry_run or self._fatal or (self.report.errors and not self.skip_invalid):
                    raise _Rollback
                self.result.committed = True
        except _Rollback:
            self.result.committed = False
        return self.result

    def _run(self, items: Iterable[SourceItem]) -> None:
        batch: list[FacilityRecord] = []
        done = 0
        for item in items:
            if item["kind"] == "issue":
                self.report.add(
                    ImportIssue(
                        item["row"],
                        item["column"],
                        item["message"],
                        item["label"],
                        item["severity"],
                    )
                )
                continue
            self.result.records += 1
            done += 1
            if self._accept(item):
                batch.append(item)
            # A batch is batch_size rows read (invalid ones included), so the progress
            # counter moves by whole batches: it jumped 4,000 → 5,001 past an invalid row.
            if done >= self.batch_size:
                if batch:
                    self._flush(batch)
                batch = []
                self._advance(done)
                done = 0
        if batch:
            self._flush(batch)
        self._advance(done)
        self._resolve_pending_parents()
        self._break_parent_loops()
        self._relink_moved()
        self._check_retiered()

    def _accept(self, record: FacilityRecord) -> bool:
        """Checks that need no query: the source's own findings and the specialty codes."""
        for warning in record["warnings"]:
            self._issue(record, warning["column"], warning["message"], "warning")
        errors = list(record["errors"])
        if not errors and "code" not in record and not record["identifiers"]:
            errors.append(
                {"column": "", "message": "no identifier: facilities are matched by identifier"}
            )
        kept: list[DepartmentRecord] = []
        for dept in record.get("departments", []):
            if any(code in self._specialties for code in dept["specialty_codes"]):
                kept.append(dept)
                continue
            message = f"no registry specialty for code(s) {', '.join(dept['specialty_codes'])}"
            if dept["strict"]:
                errors.append({"column": dept["column"], "message": message})
            else:
                self._issue(record, dept["column"], f"{message}; department skipped", "warning")
        if "departments" in record:
            record["departments"] = kept
        if errors:
            self.result.invalid += 1
            for error in errors:
                self._issue(record, error["column"], error["message"])
            return False
        return True

    def _advance(self, count: int) -> None:
        if self.progress is not None and count:
            self.progress(count)

    def _issue(
        self, record: FacilityRecord, column: str, message: str, severity: str = "error"
    ) -> None:
        self.report.add(ImportIssue(record["row"], column, message, record["label"], severity))

    def _reject(self, record: FacilityRecord, column: str, message: str) -> None:
        self.result.invalid += 1
        self._issue(record, column, message)

    # One batch: a constant number of queries, whatever its size -------------------------

    def _flush(self, records: list[FacilityRecord]) -> None:
        batch = self._drop_duplicates([(r, _record_keys(r)) for r in records])
        by_identifier, by_code = self._lookup(batch)
        matches = [_matches(keys, by_identifier, by_code) for _, keys in batch]
        existing_ids = {fid for found in matches for fid in found.values()}
        facilities = (
            {f.pk: f for f in Facility.objects.filter(_one_of("id", existing_ids)).order_by()}
            if existing_ids
            else {}
        )

        planned: list[_Planned] = []
        new_codes: set[str] = set()
        for (record, keys), found in zip(batch, matches, strict=True):
            plan = self._plan(record, keys, found, by_code, facilities, new_codes)
            if plan is not None:
                planned.append(plan)
        if not planned:
            return

        self._set_places(planned)
        new = [p for p in planned if p.before is None]
        self._insert.facilities(
            [p.facility for p in new],
            link=lambda: self._link_parents(planned, by_identifier, by_code),
        )
        for p in planned:
            self._seen.add(p.facility.pk)
        self._save_identifiers(planned, existing_ids)
        changed = self._save_changed(planned)
        self._save_departments(planned)
        self._save_endpoints(planned)
        self._save_revisions(new + changed)
        self.result.created += len(new)
        self.result.updated += len(changed)
        self.result.unchanged += len(planned) - len(new) - len(changed)

    def _drop_duplicates(self, batch: list[_Keyed]) -> list[_Keyed]:
        """The same identifier twice within one batch (earlier batches: see _plan)."""
        seen: dict[tuple[str, str], int] = {}
        kept: list[_Keyed] = []
        for record, keys in batch:
            clash = next((k for k in keys if k in seen), None)
            if clash is not None:
                self._reject(
                    record,
                    _key_column(record, clash),
                    f"duplicate identifier {_key_text(clash)}: already in row {seen[clash]}",
                )
                continue
            for key in keys:
                seen[key] = record["row"]
            kept.append((record, keys))
        return kept

    def _lookup(self, batch: list[_Keyed]) -> tuple[_IdentifierIndex, dict[str, int]]:
        """Existing facilities for every key of the batch (own keys, parents, derived codes):
        two queries, not one per row."""
        keys: list[tuple[str, str]] = []
        for record, own in batch:
            keys += own
            parent = record.get("parent")
            if parent:
                keys.append((parent["system"], parent["value"]))
            if "code" not in record:
                keys.append((FACILITY_CODE_SYSTEM, _derived_code(record)))
        return _lookup_keys(keys)

    def _plan(
        self,
        record: FacilityRecord,
        keys: list[tuple[str, str]],
        found: Mapping[tuple[str, str], int],
        by_code: Mapping[str, int],
        facilities: Mapping[int, Facility],
        new_codes: set[str],
    ) -> _Planned | None:
        if len(set(found.values())) > 1:
            names = ", ".join(
                f"{_key_text(k)} is facility {facilities[fid].code}" for k, fid in found.items()
            )
            self._reject(
                record,
                _key_column(record, next(iter(found))),
                f"identifiers of this row belong to different facilities: {names}",
            )
            return None
        parent = record.get("parent")
        if parent and (parent["system"], parent["value"]) in keys:
            self._reject(record, parent["column"], "a facility cannot be its own parent")
            return None

        if found:
            key, fid = next(iter(found.items()))
            if fid in self._seen:
                self._reject(
                    record,
                    _key_column(record, key),
                    f"duplicate identifier {_key_text(key)}: that facility was already "
                    "imported from an earlier row of this file",
                )
                return None
            facility = facilities[fid]
            if "code" in record and record["code"] != facility.code:
                self._reject(
                    record,
                    record.get("code_column", "code"),
                    f"code {record['code']!r} differs from {facility.code!r}, the code of the "
                    f"facility with {_key_text(key)} (facility codes never change)",
                )
                return None
            if "country" in record and self._country(record["country"]).pk != facility.country_id:
                self._moved[facility.pk] = (record["row"], record["label"])
            if "tier" in record["fields"] and record["fields"]["tier"] != facility.tier:
                self._retiered[facility.pk] = (record["row"], record["label"])
            before: dict[str, object] | None = facility_snapshot(facility)
        else:
            code = record["code"] if "code" in record else _derived_code(record)
            column = record.get("code_column") or _key_column(record, keys[0])
            if len(code) > CODE_MAX_LENGTH:
                self._reject(
                    record,
                    column,
                    f"facility code {code!r} is longer than {CODE_MAX_LENGTH} characters",
                )
                return None
            if code in by_code or code in new_codes:
                self._reject(
                    record,
                    column,
                    f"facility code {code!r} is already taken by a facility without this "
                    "row's identifiers",
                )
                return None
            if "country" not in record:
                self._reject(record, "", "a new facility needs a country")
                return None
            new_codes.add(code)
            facility = Facility(code=code)
            before = None

        for name, value in record["fields"].items():
            setattr(facility, name, value)
        if before is None or {"name", "name_local"} & record["fields"].keys():
            facility.search_name = search_key(f"{facility.name} {facility.name_local}")
        return _Planned(record=record, facility=facility, before=before, keys=keys)

    def _set_places(self, planned: list[_Planned]) -> None:
        """Country, area and province from the caches; missing areas are created first."""
        paths: dict[int, list[list[AreaName]]] = {}
        for p in planned:
            if "country" in p.record:
                p.facility.country_id = self._country(p.record["country"]).pk
            names = p.record.get("areas")
            if names:
                paths.setdefault(p.facility.country_id, []).append(names)
        for country_id, country_paths in paths.items():
            cache = self._areas[country_id]
            self.result.areas_created += cache.create_missing(cache.missing(country_paths))
        for p in planned:
            names = p.record.get("areas")
            if names is None:
                continue
            area = self._areas[p.facility.country_id].find(names)
            p.facility.area_id = area.pk if area else None
            p.facility.province_id = area.province_id if area else None

    def _country(self, record: CountryRecord) -> Country:
        country = self._countries.get(record["code"])
        if country is None:
            country, created = Country.objects.get_or_create(
                code=record["code"], defaults={"name": record["name"] or record["code"]}
            )
            self.result.countries_created += int(created)
            self._countries[record["code"]] = country
            self._areas[country.pk] = _AreaCache(country.pk)
        return country

    # Writes -------------------------------------------------------------------------------

    def _link_parents(
        self, planned: list[_Planned], by_identifier: _IdentifierIndex, by_code: Mapping[str, int]
    ) -> None:
        """Parents in the database or in this batch are linked once every new facility of
        the batch has its id; parents further down the file at the end."""
        in_batch: dict[tuple[str, str], int] = {}
        for p in planned:
            for key in p.keys:
                in_batch[key] = p.facility.pk
            in_batch[(FACILITY_CODE_SYSTEM, p.facility.code)] = p.facility.pk
        for p in planned:
            if "parent" not in p.record:
                continue
            ref = p.record["parent"]
            parent_id: int | None = None
            if ref is not None:
                key = (ref["system"], ref["value"])
                parent_id = in_batch.get(key) or _resolve(key, by_identifier, by_code)
                if parent_id is None:
                    self._pending_parents.append(
                        _PendingParent(
                            p.facility.pk, key, p.record["row"], p.record["label"], ref["column"]
                        )
                    )
                    continue
                if parent_id == p.facility.pk:
                    self._issue(p.record, ref["column"], "a facility cannot be its own parent")
                    continue
                self._parented[p.facility.pk] = (p.record["row"], p.record["label"], ref["column"])
            p.facility.parent_id = parent_id

    def _save_identifiers(self, planned: list[_Planned], existing_ids: set[int]) -> None:
        """Identifiers are added, or their value changed, per system; never removed."""
        current: dict[int, dict[str, FacilityIdentifier]] = {}
        if existing_ids:
            for row in FacilityIdentifier.objects.filter(_one_of("facility_id", existing_ids)):
                current.setdefault(row.facility_id, {})[row.system] = row
        create: list[tuple[object, ...]] = []
        update: list[FacilityIdentifier] = []
        for p in planned:
            rows = current.get(p.facility.pk, {})
            before = {system: row.value for system, row in rows.items()}
            for ident in p.record["identifiers"]:
                found = rows.get(ident["system"])
                if found is None:
                    create.append((p.facility.pk, ident["system"], ident["value"]))
                elif found.value != ident["value"]:
                    found.value = ident["value"]
                    update.append(found)
            after = {**before, **{i["system"]: i["value"] for i in p.record["identifiers"]}}
            if after != before:
                p.identifiers_before = sorted(f"{s}|{v}" for s, v in before.items())
                p.identifiers_after = sorted(f"{s}|{v}" for s, v in after.items())
        self._insert.rows(FacilityIdentifier, ["facility_id", "system", "value"], create)
        if update:
            FacilityIdentifier.objects.bulk_update(update, ["value"], batch_size=self.batch_size)
        self.result.identifiers_created += len(create)
        self.result.identifiers_updated += len(update)

    def _save_changed(self, planned: list[_Planned]) -> list[_Planned]:
        """bulk_update the existing facilities whose tracked fields changed; returns every
        existing facility with a change (fields or identifiers)."""
        changed: list[_Planned] = []
        to_save: list[Facility] = []
        fields: set[str] = set()
        now = timezone.now()
        for p in planned:
            if p.before is None:
                continue
            diff = _diff(p.before, facility_snapshot(p.facility))
            if diff or p.identifiers_after is not None:
                changed.append(p)
            if not diff and p.identifiers_after is None:
                continue
            fields.update(name.removesuffix("_id") for name in diff)
            if {"name", "name_local"} & diff.keys():
                fields.add("search_name")
            if "area_id" in diff:
                fields.add("province")
            # bulk_update skips auto_now; new identifiers alone change the facility too (the
            # FHIR projection re-renders what changed since its last run, by updated_at).
            p.facility.updated_at = now
            to_save.append(p.facility)
        if to_save:
            Facility.objects.bulk_update(
                to_save, sorted(fields | {"updated_at"}), batch_size=self.batch_size
            )
        return changed

    def _save_departments(self, planned: list[_Planned]) -> None:
        """A department per mapped specialty, created when absent: the import adds
        departments, it never edits or removes them (stewards own their settings)."""
        wanted: dict[tuple[int, int], DepartmentRecord] = {}
        for p in planned:
            for dept in p.record.get("departments", []):
                code = next(c for c in dept["specialty_codes"] if c in self._specialties)
                wanted.setdefault((p.facility.pk, self._specialties[code].pk), dept)
        if not wanted:
            return
        existing = set(
            Department.objects.filter(_one_of("facility_id", {fid for fid, _ in wanted}))
            .order_by()  # Department's default ordering would join facility and specialty
            .values_list("facility_id", "specialty_id")
        )
        display = {s.pk: s.display for s in self._specialties.values()}
        create: list[tuple[object, ...]] = []
        for (fid, sid), dept in wanted.items():
            if (fid, sid) in existing:
                continue
            modes = dept.get("modes") or ["async"]
            create.append(
                (
                    fid,
                    sid,
                    (dept.get("name") or display[sid])[:255],
                    "async" in modes,
                    "live" in modes,
                    "transfer" in modes,
                    dept.get("accepting", True),
                    dept.get("languages", []),
                )
            )
        columns = ["facility_id", "specialty_id", "name", "offers_async", "offers_live"]
        columns += ["offers_transfer", "accepting", "languages"]
        self._insert.rows(Department, columns, create)
        self.result.departments_created += len(create)

    def _save_endpoints(self, planned: list[_Planned]) -> None:
        """Endpoints (mCSD only) are created when absent, like departments; "absent" and
        the stored URL in the registry's compared form (scheme and host case, a trailing
        slash), as the API does."""
        wanted: dict[tuple[int, str], EndpointRecord] = {}
        for p in planned:
            for endpoint in p.record.get("endpoints", []):
                key = (p.facility.pk, endpoint_base_url_key(endpoint["base_url"]))
                wanted.setdefault(key, endpoint)
        if not wanted:
            return
        existing = {
            (fid, endpoint_base_url_key(url))
            for fid, url in Endpoint.objects.filter(
                _one_of("facility_id", {fid for fid, _ in wanted})
            ).values_list("facility_id", "base_url")
        }
        create: list[tuple[object, ...]] = [
            (fid, url, endpoint["name"][:200], endpoint["status"], endpoint["fhir_version"])
            for (fid, url), endpoint in wanted.items()
            if (fid, url) not in existing
        ]
        columns = ["facility_id", "base_url", "name", "status", "fhir_version"]
        self._insert.rows(Endpoint, columns, create)
        self.result.endpoints_created += len(create)

    def _save_revisions(self, planned: list[_Planned]) -> None:
        revisions: list[tuple[object, ...]] = []
        for p in planned:
            after = facility_snapshot(p.facility)
            if p.before is None:
                changes = {k: [None, v] for k, v in after.items() if v is not None}
            else:
                changes = _diff(p.before, after)
            if p.identifiers_after is not None:
                old = p.identifiers_before if p.before is not None else None
                changes["identifiers"] = [old, p.identifiers_after]
            revisions.append((p.facility.pk, REVISION_SOURCE, changes))
        self._insert.rows(FacilityRevision, ["facility_id", "source", "changes"], revisions)
        self.result.revisions_created += len(revisions)

    def _resolve_pending_parents(self) -> None:
        """Link parents that appeared further down the file, one chunk at a time."""
        pending, self._pending_parents = self._pending_parents, []
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            by_identifier, by_code = _lookup_keys([item.key for item in chunk])
            children = Facility.objects.in_bulk([item.child_id for item in chunk])
            changed: list[Facility] = []
            revisions: list[FacilityRevision] = []
            for item in chunk:
                parent_id = _resolve(item.key, by_identifier, by_code)
                if parent_id is None:
                    self.report.add(
                        ImportIssue(
                            item.row,
                            item.column,
                            f"parent {_key_text(item.key)} is neither in the registry nor in "
                            "this file",
                            item.label,
                        )
                    )
                    continue
                child = children[item.child_id]
                if parent_id == child.pk:
                    self.report.add(
                        ImportIssue(
                            item.row, item.column, "a facility cannot be its own parent", item.label
                        )
                    )
                    continue
                if child.parent_id != parent_id:
                    revisions.append(
                        FacilityRevision(
                            facility_id=child.pk,
                            source=REVISION_SOURCE,
                            changes={"parent_id": [child.parent_id, parent_id]},
                        )
                    )
                    child.parent_id = parent_id
                    changed.append(child)
                self._parented[child.pk] = (item.row, item.label, item.column)
            if changed:
                Facility.objects.bulk_update(changed, ["parent"])
            FacilityRevision.objects.bulk_create(revisions)
            self.result.revisions_created += len(revisions)

    def _break_parent_loops(self) -> None:
        """A parent this import set that leads back to its child (A → B → A, the file
        against itself or against the registry) is an error on that row; the link is
        dropped (for ``--skip-invalid``: the registry never holds a loop). A query per
        level of the hierarchy, not per row. Judged under the parent changes lock, taken
        when the run began (``facility_parent_changes_lock``), as the API and the admin
        judge theirs."""
        if not self._parented:
            return
        parents: dict[int, int | None] = {}
        wanted: set[int] = set(self._parented)
        while wanted:
            rows = Facility.objects.filter(_one_of("id", wanted)).values_list("id", "parent_id")
            parents.update(rows)
            wanted = {p for p in parents.values() if p is not None and p not in parents}
        looping: list[int] = []
        for start in self._parented:
            seen: set[int] = set()
            node = parents.get(start)
            while node is not None and node != start and node not in seen:
                seen.add(node)
                node = parents.get(node)
            if node == start:
                looping.append(start)
        if not looping:
            return
        codes = dict(Facility.objects.filter(_one_of("id", looping)).values_list("id", "code"))
        for facility_id in looping:
            row, label, column = self._parented[facility_id]
            self.report.add(
                ImportIssue(
                    row,
                    column,
                    f"parent loop: facility {codes[facility_id]}'s parent chain leads back "
                    "to it; the parent is not set",
                    label,
                )
            )
        Facility.objects.filter(_one_of("id", looping)).update(parent=None)
        FacilityRevision.objects.bulk_create(
            FacilityRevision(
                facility_id=facility_id,
                source=REVISION_SOURCE,
                changes={"parent_id": [parents[facility_id], None]},
            )
            for facility_id in looping
        )
        self.result.revisions_created += len(looping)

    def _relink_moved(self) -> None:
        """Facilities the file moves to another country, judged once every row is in (a
        hub and its spoke may move together): each support link's border flag follows, and
        a link that would then cross a border without a data-sharing agreement is an error
        on the moved facility's row that refuses the whole import, ``--skip-invalid`` or
        not (the row is already applied)."""
        if not self._moved:
            return
        facilities = Facility.objects.in_bulk(list(self._moved))
        for facility_id, (row, label) in self._moved.items():
            try:
                facility_relink_country(facilities[facility_id])
            except Conflict as exc:
                self.report.add(ImportIssue(row, "country", exc.message, label))
                self._fatal = True

    def _check_retiered(self) -> None:
        """Facilities whose tier the file changes, judged once every row is in (a hub and
        its spoke may change together): a support link whose hub would then be of a lower
        tier than its spoke is an error on the facility's row that refuses the whole
        import, as a move across a border without an agreement does."""
        if not self._retiered:
            return
        for facility_id, problem in support_links_upside_down(set(self._retiered)).items():
            row, label = self._retiered[facility_id]
            self.report.add(ImportIssue(row, "tier", problem, label))
            self._fatal = True


class _AnyOf(Lookup[object]):
    """``column = ANY(%s)`` with the values as one array parameter: for a batch of a thousand
    keys, Django's ``__in`` builds, quotes and parses a thousand placeholders instead."""

    lookup_name = "any_of"  # never registered: used as an expression by _one_of()
    prepare_rhs = False

    # django-stubs types SQL parameters as str | int; this one is an array (a list).
    def as_sql(  # type: ignore[override]
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper
    ) -> tuple[str, tuple[object, ...]]:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        return f"{lhs} = ANY(%s)", (*lhs_params, list(self.rhs))


def _one_of(field: str, values: Collection[object]) -> Q:
    """field IN values: one array parameter on PostgreSQL, ``__in`` elsewhere."""
    if connection.vendor == "postgresql":
        return Q(_AnyOf(F(field), list(values)))
    return Q(**{f"{field}__in": values})


def _lookup_keys(keys: Iterable[tuple[str, str]]) -> tuple[_IdentifierIndex, dict[str, int]]:
    """(system, value) keys -> existing facilities: one query for identifiers, one for codes."""
    values_by_system: dict[str, set[str]] = {}
    codes: set[str] = set()
    for system, value in keys:
        if system == FACILITY_CODE_SYSTEM:
            codes.add(value)
        else:
            values_by_system.setdefault(system, set()).add(value)
    by_identifier: _IdentifierIndex = {}
    if values_by_system:
        query = Q()
        for system, values in values_by_system.items():
            query |= Q(_one_of("value", values), system=system)
        rows = FacilityIdentifier.objects.filter(query).values_list(
            "system", "value", "facility_id", "facility__code"
        )
        by_identifier = {(s, v): (fid, code) for s, v, fid, code in rows}
    by_code: dict[str, int] = {}
    if codes:
        by_code = dict(
            Facility.objects.filter(_one_of("code", codes)).order_by().values_list("code", "id")
        )
    return by_identifier, by_code


def _resolve(
    key: tuple[str, str], by_identifier: _IdentifierIndex, by_code: Mapping[str, int]
) -> int | None:
    if key[0] == FACILITY_CODE_SYSTEM:
        return by_code.get(key[1])
    found = by_identifier.get(key)
    return found[0] if found else None


def _matches(
    keys: list[tuple[str, str]], by_identifier: _IdentifierIndex, by_code: Mapping[str, int]
) -> dict[tuple[str, str], int]:
    """The existing facility each key of a record names."""
    found: dict[tuple[str, str], int] = {}
    for key in keys:
        fid = _resolve(key, by_identifier, by_code)
        if fid is not None:
            found[key] = fid
    return found


def _record_keys(record: FacilityRecord) -> list[tuple[str, str]]:
    keys = [(i["system"], i["value"]) for i in record["identifiers"]]
    if "code" in record:
        keys.append((FACILITY_CODE_SYSTEM, record["code"]))
    return keys


def _key_column(record: FacilityRecord, key: tuple[str, str]) -> str:
    if key[0] == FACILITY_CODE_SYSTEM:
        return record.get("code_column", "code")
    return next((i["column"] for i in record["identifiers"] if i["system"] == key[0]), "")


def _key_text(key: tuple[str, str]) -> str:
    return f"code {key[1]}" if key[0] == FACILITY_CODE_SYSTEM else f"{key[0]}|{key[1]}"


def _derived_code(record: FacilityRecord) -> str:
    return record.get("code_prefix", "") + record["identifiers"][0]["value"]


def _diff(before: Mapping[str, object], after: Mapping[str, object]) -> dict[str, list[object]]:
    return {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}


# --- export: the canonical CSV (read back by mappings/consilium_csv.json) ------------------

CANONICAL_COLUMNS: tuple[str, ...] = (
    "code",
    "name",
    "name_local",
    "country",
    "country_name",
    "province",
    "district",
    "commune",
    "tier",
    "facility_type",
    "ownership",
    "operational_status",
    "latitude",
    "longitude",
    "parent_code",
    "languages",
    "beds",
    "is_remote",
    "identifiers",
    "specialties",
)
EXPORT_CHUNK_SIZE = 2000


def facilities_for_export(country: str | None = None) -> QuerySet[Facility]:
    """Every facility with what an export needs, in a constant number of queries per chunk
    (iterate with .iterator(chunk_size=...))."""
    queryset = Facility.objects.select_related(
        "country", "area__parent__parent", "parent"
    ).prefetch_related(
        Prefetch("identifiers", queryset=FacilityIdentifier.objects.order_by("system")),
        Prefetch(
            "departments",
            queryset=Department.objects.select_related("specialty").order_by("specialty__code"),
        ),
        Prefetch("endpoints", queryset=Endpoint.objects.order_by("base_url")),
    )
    if country:
        queryset = queryset.filter(country__code=country)
    return queryset.order_by("country__code", "code")


def area_names(area: AdministrativeArea | None) -> dict[int, str]:
    """{level: name} along the area's chain of parents (select_related keeps this free)."""
    names: dict[int, str] = {}
    for _ in range(AREA_LEVELS):
        if area is None:
            break
        names[area.level] = area.name
        area = area.parent
    return names


def canonical_row(facility: Facility) -> list[str]:
    areas = area_names(facility.area)
    identifiers = [{"system": i.system, "value": i.value} for i in facility.identifiers.all()]
    return [
        facility.code,
        facility.name,
        facility.name_local,
        facility.country.code,
        facility.country.name,
        areas.get(1, ""),
        areas.get(2, ""),
        areas.get(3, ""),
        str(facility.tier),
        facility.facility_type,
        facility.ownership,
        facility.operational_status,
        "" if facility.latitude is None else repr(facility.latitude),
        "" if facility.longitude is None else repr(facility.longitude),
        facility.parent.code if facility.parent else "",
        ";".join(facility.languages or []),
        "" if facility.beds is None else str(facility.beds),
        "true" if facility.is_remote else "false",
        json.dumps(identifiers, ensure_ascii=False, separators=(",", ":")) if identifiers else "",
        ";".join(d.specialty.code for d in facility.departments.all()),
    ]


def write_canonical_csv(out: TextSink, facilities: QuerySet[Facility]) -> int:
    """Stream the facilities as canonical CSV; returns the number of rows written."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CANONICAL_COLUMNS)
    count = 0
    for facility in facilities.iterator(chunk_size=EXPORT_CHUNK_SIZE):
        writer.writerow(canonical_row(facility))
        count += 1
    return count
