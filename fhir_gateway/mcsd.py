"""IHE mCSD (Mobile Care Services Discovery) Bundles <-> registry import records.

Import: every resource of the Bundle is validated with the fhir.resources R4B model of its
type, then read from the validated JSON (no second serialisation). An Organization is a
facility; the Location it manages gives coordinates, address (areas) and status; the
HealthcareServices it provides become departments; its FHIR REST Endpoints become endpoints.
Everything else is reported and skipped. The result is plain ``FacilityRecord`` dicts for
``registry.importing.FacilityImport``.

Export: a Bundle of type collection, streamed: per facility an Organization, a Location, a
HealthcareService per department and an Endpoint per endpoint. It reads back losslessly for
everything the import reads (see docs/import-mapping.md for what mCSD does not carry).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from django.db.models import QuerySet
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from core.values import digits_int
from fhir_gateway.registry_projection import (
    CONNECTION_TYPE,
    CONSULT_MODE_SYSTEM,
    LANGUAGE_SYSTEM,
    MCSD_TYPES,
    ORGANIZATION_TYPE,
    OWNERSHIP_SYSTEM,
    TIER_SYSTEM,
)
from registry.countries import is_country_code
from registry.importing import (
    FACILITY_CODE_SYSTEM,
    FACILITY_FIELDS,
    AreaName,
    CountryRecord,
    DepartmentRecord,
    EndpointRecord,
    FacilityRecord,
    FieldValue,
    MappingError,
    ParentRef,
    SourceIssue,
    SourceItem,
    TextSink,
    area_names,
    endpoint_error,
    field_errors,
    new_record,
)
from registry.models import Facility, OperationalStatus, Specialty, Tier
from registry.validators import LANGUAGE_TAG

PHYSICAL_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/location-physical-type"
PAYLOAD_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
SNOMED = Specialty.SNOMED
CONSULT_MODES = frozenset({"async", "live", "transfer"})

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
FHIR_VERSION_PARAM = re.compile(r"fhirVersion=([0-9.]+)")
MCSD_OPTION_KEYS = frozenset({"description", "format", "country", "code", "defaults"})
ENDPOINT_STATUS = {
    "active": "active",
    "suspended": "suspended",
    "error": "error",
    "off": "off",
    "entered-in-error": "off",
    "test": "off",
}

Json = dict[str, object]


# --- options (the --mapping file of an mCSD import) ---------------------------------------


@dataclass(frozen=True)
class McsdOptions:
    country: CountryRecord | None = None  # overrides address.country
    code_prefix: str = ""  # code of a new facility = prefix + its first identifier value
    defaults: dict[str, FieldValue] = field(default_factory=dict)  # fields the Bundle lacks


def parse_options(data: Mapping[str, object], *, name: str = "mapping") -> McsdOptions:
    def fail(message: str) -> MappingError:
        return MappingError(f"mapping {name}: {message}")

    unknown = sorted(set(data) - MCSD_OPTION_KEYS)
    if unknown:
        allowed = ", ".join(sorted(MCSD_OPTION_KEYS))
        raise fail(f"unknown key(s) {', '.join(unknown)} for an mCSD mapping (allowed: {allowed})")
    country: CountryRecord | None = None
    if "country" in data:
        raw = data["country"]
        if not (isinstance(raw, dict) and isinstance(raw.get("code"), str)):
            raise fail('country must be {"code": "KE", "name": "Kenya"}')
        if not is_country_code(raw["code"]):
            raise fail(f"country.code must be ISO 3166-1 alpha-2, got {raw['code']!r}")
        country = {"code": raw["code"], "name": str(raw.get("name") or raw["code"])}
    code = data.get("code", {})
    if not isinstance(code, dict) or set(code) - {"prefix"}:
        raise fail('code must be {"prefix": "..."}')
    prefix = code.get("prefix", "")
    if not isinstance(prefix, str):
        raise fail("code.prefix must be a string")
    defaults_raw = data.get("defaults", {})
    if not isinstance(defaults_raw, dict):
        raise fail("defaults must be an object of facility fields")
    unknown_fields = sorted(set(defaults_raw) - set(FACILITY_FIELDS))
    if unknown_fields:
        raise fail(
            f"defaults: unknown field(s) {', '.join(unknown_fields)} "
            f"(facility fields: {', '.join(FACILITY_FIELDS)})"
        )
    defaults = cast(dict[str, FieldValue], dict(defaults_raw))
    for field_name, message in field_errors(defaults):
        raise fail(f"defaults.{field_name}: {message}")
    return McsdOptions(country=country, code_prefix=prefix, defaults=defaults)


# --- reading a Bundle -----------------------------------------------------------------------


def read_bundle(path: Path) -> Json:
    """The Bundle as JSON; MappingError (never a traceback) when it is not one."""
    try:
        with path.open("rb") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise MappingError(f"cannot open {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise MappingError(f"{path} is not UTF-8 JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MappingError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        found = data.get("resourceType") if isinstance(data, dict) else type(data).__name__
        raise MappingError(f"{path} is not a FHIR Bundle (resourceType: {found!r})")
    envelope = {k: v for k, v in data.items() if k != "entry"}
    try:
        Bundle.model_validate(envelope)
    except ValidationError as exc:
        raise MappingError(f"{path}: invalid Bundle: {_validation_message(exc)}") from None
    if not isinstance(data.get("entry", []), list):
        raise MappingError(f"{path}: Bundle.entry must be a list")
    return data


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"] if p != "__root__")
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


@dataclass
class _Entry:
    row: int  # 1-based position in Bundle.entry
    resource: Json
    error: str = ""  # validation error, empty when valid
    validated: bool = False

    @property
    def type(self) -> str:
        return str(self.resource.get("resourceType", ""))

    @property
    def label(self) -> str:
        return f"{self.type}/{self.resource.get('id', '?')}"


class _BundleReader:
    def __init__(self, bundle: Json, options: McsdOptions) -> None:
        self.options = options
        self.entries: list[_Entry] = []
        self.issues: dict[int, list[SourceIssue]] = {}
        self._by_ref: dict[str, _Entry] = {}
        for row, raw in enumerate(cast(list[object], bundle.get("entry", [])), start=1):
            resource = raw.get("resource") if isinstance(raw, dict) else None
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                self._issue(row, "", "Bundle.entry", "entry without a resource", "error")
                continue
            entry = _Entry(row, resource)
            self.entries.append(entry)
            self._by_ref[entry.label] = entry
            full_url = raw.get("fullUrl") if isinstance(raw, dict) else None
            if isinstance(full_url, str):
                self._by_ref[full_url] = entry
        self.location_of: dict[int, _Entry] = {}
        self.services_of: dict[int, list[_Entry]] = {}
        self.endpoints_of: dict[int, list[_Entry]] = {}
        self.used: set[int] = set()
        self._link()

    def _issue(self, row: int, label: str, column: str, message: str, severity: str) -> None:
        issue: SourceIssue = {
            "kind": "issue",
            "row": row,
            "label": label,
            "column": column,
            "message": message,
            "severity": "error" if severity == "error" else "warning",
        }
        self.issues.setdefault(row, []).append(issue)

    def resolve(self, reference: object) -> _Entry | None:
        """A Reference to an entry of this Bundle: by fullUrl, Type/id or .../Type/id."""
        if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
            return None
        ref = reference["reference"]
        if ref in self._by_ref:
            return self._by_ref[ref]
        parts = ref.split("/_history/")[0].rstrip("/").split("/")
        return self._by_ref.get("/".join(parts[-2:])) if len(parts) >= 2 else None

    def valid(self, entry: _Entry) -> bool:
        if not entry.validated:
            entry.validated = True
            try:
                get_fhir_model_class(entry.type).model_validate(entry.resource)
            except KeyError:
                entry.error = f"unknown resource type {entry.type!r}"
            except ValidationError as exc:
                entry.error = f"invalid {entry.type}: {_validation_message(exc)}"
        return not entry.error

    def _link(self) -> None:
        """Attach Locations, HealthcareServices and Endpoints to their Organization."""
        for entry in self.entries:
            if entry.type == "Location":
                org = self.resolve(entry.resource.get("managingOrganization"))
                if org is None or org.type != "Organization":
                    continue
                if org.row in self.location_of:
                    first = self.location_of[org.row].label
                    self._issue(
                        entry.row,
                        entry.label,
                        "Location",
                        f"skipped: {org.label} already takes its location from {first}",
                        "warning",
                    )
                    self.used.add(entry.row)
                    continue
                self.location_of[org.row] = entry
            elif entry.type == "HealthcareService":
                org = self.resolve(entry.resource.get("providedBy"))
                if org is not None and org.type == "Organization":
                    self.services_of.setdefault(org.row, []).append(entry)
            elif entry.type == "Organization":
                for ref in _list(entry.resource.get("endpoint")):
                    target = self.resolve(ref)
                    if target is not None and target.type == "Endpoint":
                        self._add_endpoint(entry.row, target)
            elif entry.type == "Endpoint":
                org = self.resolve(entry.resource.get("managingOrganization"))
                if org is not None and org.type == "Organization":
                    self._add_endpoint(org.row, entry)

    def _add_endpoint(self, org_row: int, endpoint: _Entry) -> None:
        endpoints = self.endpoints_of.setdefault(org_row, [])
        if endpoint not in endpoints:
            endpoints.append(endpoint)

    # Records ----------------------------------------------------------------------------

    def items(self) -> Iterator[SourceItem]:
        for entry in self.entries:
            if entry.type == "Organization":
                yield self._facility(entry)
        for entry in self.entries:
            if entry.type != "Organization" and entry.row not in self.used:
                self._unused(entry)
        for row in sorted(self.issues):
            yield from self.issues[row]

    def _unused(self, entry: _Entry) -> None:
        reasons = {
            "Location": "skipped: no managingOrganization in this Bundle",
            "HealthcareService": "skipped: no providedBy Organization in this Bundle",
            "Endpoint": "skipped: no Organization of this Bundle refers to it",
            "OrganizationAffiliation": (
                "not imported: support links carry data-sharing agreements and are set up "
                "by registry stewards"
            ),
        }
        message = reasons.get(entry.type, f"not imported: {entry.type} is not part of mCSD import")
        self._issue(entry.row, entry.label, entry.type, message, "warning")

    def _facility(self, org_entry: _Entry) -> FacilityRecord:
        record = new_record(org_entry.row)
        record["label"] = org_entry.label
        record["code_prefix"] = self.options.code_prefix
        record["code_column"] = "Organization.identifier"
        errors = record["errors"]
        if not self.valid(org_entry):
            errors.append({"column": "Organization", "message": org_entry.error})
            return record
        org = org_entry.resource
        location_entry = self.location_of.get(org_entry.row)
        location: Json | None = None
        if location_entry is not None:
            self.used.add(location_entry.row)
            if self.valid(location_entry):
                location = location_entry.resource
            else:
                errors.append({"column": location_entry.label, "message": location_entry.error})

        self._identifiers(org, record)
        columns: dict[str, str] = {}
        values = record["fields"]

        name = _str(org.get("name")) or _str(location.get("name") if location else None)
        values["name"], columns["name"] = name, "Organization.name"
        aliases = [a for a in (_str(x) for x in _list(org.get("alias"))) if a]
        if aliases:
            # The FHIR projection and our export put the local-language name first.
            values["name_local"], columns["name_local"] = aliases[0], "Organization.alias"

        type_codes = _codes(_list(org.get("type")))
        tier = type_codes.get(TIER_SYSTEM)
        columns["tier"] = "Organization.type"
        if tier is not None:
            number = digits_int(tier, 4)
            values["tier"] = tier if number is None else number
        ownership = type_codes.get(OWNERSHIP_SYSTEM)
        if ownership is not None:
            values["ownership"], columns["ownership"] = ownership, "Organization.type"

        if location is not None:
            kind = _first_text(_list(location.get("type")))
            if kind is not None:
                values["facility_type"], columns["facility_type"] = kind, "Location.type"
            position = location.get("position")
            lat = lon = None
            if isinstance(position, dict):
                lat, lon = _float(position.get("latitude")), _float(position.get("longitude"))
            values["latitude"], columns["latitude"] = lat, "Location.position.latitude"
            values["longitude"], columns["longitude"] = lon, "Location.position.longitude"
        status = _status(org.get("active"), location.get("status") if location else None)
        if status is not None:
            values["operational_status"] = status
            columns["operational_status"] = "Location.status, Organization.active"

        for field_name, default in self.options.defaults.items():
            if field_name not in values:
                values[field_name] = list(default) if isinstance(default, list) else default
                columns[field_name] = f"(mapping default {field_name})"
        if "tier" not in values:
            errors.append(
                {
                    "column": "Organization.type",
                    "message": f"no tier coding ({TIER_SYSTEM}) and no default tier in the mapping",
                }
            )
        for field_name, message in field_errors(values):
            if field_name == "tier" and "tier" not in values:
                continue
            errors.append({"column": columns.get(field_name, field_name), "message": message})

        self._place(org, location, record)
        self._parent(org, record)
        record["departments"] = self._departments(org_entry, record)
        record["endpoints"] = self._endpoints(org_entry, record)
        return record

    def _identifiers(self, org: Json, record: FacilityRecord) -> None:
        seen: set[str] = set()
        for item in _list(org.get("identifier")):
            if not isinstance(item, dict):
                continue
            system, value = _str(item.get("system")), _str(item.get("value"))
            if not system or not value:
                record["warnings"].append(
                    {
                        "column": "Organization.identifier",
                        "message": f"identifier {value or '?'} without a system ignored",
                    }
                )
                continue
            if system == FACILITY_CODE_SYSTEM:
                record["code"] = value
                continue
            if system in seen:
                record["warnings"].append(
                    {
                        "column": "Organization.identifier",
                        "message": f"second identifier of system {system} ignored",
                    }
                )
                continue
            if len(value) > 255 or len(system) > 255:
                record["errors"].append(
                    {"column": "Organization.identifier", "message": "identifier longer than 255"}
                )
                continue
            seen.add(system)
            record["identifiers"].append(
                {"system": system, "value": value, "column": "Organization.identifier"}
            )
        if not record["identifiers"] and "code" not in record:
            record["errors"].append(
                {
                    "column": "Organization.identifier",
                    "message": "no identifier with a system and a value "
                    "(facilities are matched by identifier)",
                }
            )

    def _place(self, org: Json, location: Json | None, record: FacilityRecord) -> None:
        address = location.get("address") if location else None
        if not isinstance(address, dict):
            addresses = [a for a in _list(org.get("address")) if isinstance(a, dict)]
            address = addresses[0] if addresses else None
        if self.options.country is not None:
            record["country"] = self.options.country
        else:
            raw = _str(address.get("country") if address else None)
            if raw and is_country_code(raw.upper()):
                record["country"] = {"code": raw.upper(), "name": raw.upper()}
            else:
                record["errors"].append(
                    {
                        "column": "Location.address.country",
                        "message": f"country {raw!r} is not an ISO 3166-1 alpha-2 code; "
                        'give "country" in the mapping',
                    }
                )
        if address is None:
            return
        names = [_str(address.get(key)) for key in ("state", "district", "city")]
        if not names[0]:
            return  # without the province the area chain has no root: leave the area alone
        areas: list[AreaName] = []
        for level, area_name in enumerate(names, start=1):
            if not area_name:
                break
            areas.append({"level": level, "name": " ".join(area_name.split())})
        record["areas"] = areas

    def _parent(self, org: Json, record: FacilityRecord) -> None:
        part_of = org.get("partOf")
        if not isinstance(part_of, dict):
            record["parent"] = None
            return
        column = "Organization.partOf"
        logical = part_of.get("identifier")
        if isinstance(logical, dict) and _str(logical.get("system")) and _str(logical.get("value")):
            record["parent"] = _parent_ref(str(logical["system"]), str(logical["value"]), column)
            return
        target = self.resolve(part_of)
        if target is not None and target.type == "Organization":
            for item in _list(target.resource.get("identifier")):
                if isinstance(item, dict) and _str(item.get("system")) and _str(item.get("value")):
                    record["parent"] = _parent_ref(str(item["system"]), str(item["value"]), column)
                    return
        record["warnings"].append(
            {
                "column": column,
                "message": f"parent {part_of.get('reference')!r} is neither in this Bundle with "
                "an identifier nor given by identifier; parent left unchanged",
            }
        )

    def _departments(self, org_entry: _Entry, record: FacilityRecord) -> list[DepartmentRecord]:
        departments: list[DepartmentRecord] = []
        for entry in self.services_of.get(org_entry.row, []):
            self.used.add(entry.row)
            if not self.valid(entry):
                self._issue(entry.row, entry.label, "HealthcareService", entry.error, "error")
                continue
            service = entry.resource
            codes = [
                code
                for key in ("specialty", "type")
                for concept in _list(service.get(key))
                for system, code in _codings(concept)
                if system == SNOMED
            ]
            if not codes:
                self._issue(
                    entry.row,
                    entry.label,
                    "HealthcareService.specialty",
                    "skipped: no SNOMED CT specialty or type",
                    "warning",
                )
                continue
            characteristics = {
                code
                for concept in _list(service.get("characteristic"))
                for system, code in _codings(concept)
                if system == CONSULT_MODE_SYSTEM
            }
            modes = sorted(characteristics & CONSULT_MODES)
            if characteristics & {"accepting", "not-accepting"}:
                accepting = "not-accepting" not in characteristics
            else:
                accepting = service.get("active") is not False
            languages = [
                code
                for concept in _list(service.get("communication"))
                for system, code in _codings(concept)
                if system == LANGUAGE_SYSTEM
            ]
            # The API's rule for a department's languages (a BCP-47 tag's shape).
            bad = [code for code in languages if not LANGUAGE_TAG.match(code)]
            if bad:
                self._issue(
                    entry.row,
                    entry.label,
                    "HealthcareService.communication",
                    f"not BCP-47 language tags, left out: {', '.join(map(repr, bad))}",
                    "warning",
                )
                languages = [code for code in languages if code not in bad]
            department: DepartmentRecord = {
                "specialty_codes": codes,
                "strict": False,
                "column": entry.label,
                "accepting": accepting,
                "modes": modes or ["async"],
                "languages": languages,
            }
            if _str(service.get("name")):
                department["name"] = str(service["name"])
            departments.append(department)
        return departments

    def _endpoints(self, org_entry: _Entry, record: FacilityRecord) -> list[EndpointRecord]:
        endpoints: list[EndpointRecord] = []
        for entry in self.endpoints_of.get(org_entry.row, []):
            self.used.add(entry.row)
            if not self.valid(entry):
                self._issue(entry.row, entry.label, "Endpoint", entry.error, "error")
                continue
            resource = entry.resource
            connection = resource.get("connectionType")
            code = _str(connection.get("code")) if isinstance(connection, dict) else None
            if code != "hl7-fhir-rest":
                self._issue(
                    entry.row,
                    entry.label,
                    "Endpoint.connectionType",
                    f"skipped: connection type {code!r} is not hl7-fhir-rest",
                    "warning",
                )
                continue
            version = "4.0"
            for mime in _list(resource.get("payloadMimeType")):
                match = FHIR_VERSION_PARAM.search(str(mime))
                if match:
                    version = match.group(1)[:3]
            endpoint: EndpointRecord = {
                "base_url": _str(resource.get("address")) or "",
                "name": _str(resource.get("name")) or "",
                "status": ENDPOINT_STATUS.get(_str(resource.get("status")) or "", "off"),
                "fhir_version": version,
                "column": entry.label,
            }
            problem = endpoint_error(endpoint)
            if problem:
                self._issue(entry.row, entry.label, "Endpoint", f"skipped: {problem}", "warning")
                continue
            endpoints.append(endpoint)  # Endpoint.header (credentials) is never imported
        return endpoints


def bundle_items(bundle: Json, options: McsdOptions | None = None) -> Iterator[SourceItem]:
    """Facility records (one per Organization, in Bundle order), then issues for the
    entries that were skipped."""
    reader = _BundleReader(bundle, options or McsdOptions())
    yield from reader.items()


def count_organizations(bundle: Json) -> int:
    return sum(
        1
        for raw in cast(list[object], bundle.get("entry", []))
        if isinstance(raw, dict)
        and isinstance(raw.get("resource"), dict)
        and raw["resource"].get("resourceType") == "Organization"
    )


# --- small JSON readers ---------------------------------------------------------------------


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _str(value: object) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _codings(concept: object) -> Iterator[tuple[str, str]]:
    if isinstance(concept, dict):
        for coding in _list(concept.get("coding")):
            if isinstance(coding, dict):
                system, code = _str(coding.get("system")), _str(coding.get("code"))
                if system and code:
                    yield system, code


def _codes(concepts: list[object]) -> dict[str, str]:
    """{system: first code} over a list of CodeableConcepts."""
    found: dict[str, str] = {}
    for concept in concepts:
        for system, code in _codings(concept):
            found.setdefault(system, code)
    return found


def _first_text(concepts: list[object]) -> str | None:
    """The facility type: a concept's text, else the display of a coding that is not the
    generic mCSD "facility" type."""
    for concept in concepts:
        if isinstance(concept, dict) and _str(concept.get("text")):
            return str(concept["text"]).strip()
    for concept in concepts:
        if isinstance(concept, dict):
            for coding in _list(concept.get("coding")):
                if (
                    isinstance(coding, dict)
                    and coding.get("system") != MCSD_TYPES
                    and _str(coding.get("display"))
                ):
                    return str(coding["display"]).strip()
    return None


def _status(active: object, location_status: object) -> str | None:
    """Location.status says active/suspended/inactive; an inactive Location whose
    Organization is not active is a closed facility (how write_bundle tells them apart)."""
    if location_status in ("active", "suspended"):
        return str(location_status)
    if location_status == "inactive":
        return OperationalStatus.CLOSED.value if active is False else "inactive"
    if active is False:
        return OperationalStatus.CLOSED.value
    return None


def _parent_ref(system: str, value: str, column: str) -> ParentRef:
    return {"system": system, "value": value, "column": column}


# --- writing a Bundle ------------------------------------------------------------------------


def resource_id(code: str) -> str:
    """The facility's FHIR id: its code when that is a valid id, else a stable hash."""
    if FHIR_ID.match(code):
        return code
    return "f" + hashlib.sha256(code.encode()).hexdigest()[:32]


def facility_resources(facility: Facility) -> list[Json]:
    """Organization, Location, a HealthcareService per department, an Endpoint per endpoint.

    Same code systems and conventions as the FHIR projection (registry_projection), plus
    what a lossless file needs: ids derived from the code (stable across databases),
    ownership, three address levels and partOf by identifier. ``facility`` must come from
    ``facilities_for_export`` (related rows prefetched).
    """
    rid = resource_id(facility.code)
    org_ref = {"reference": f"Organization/{rid}"}
    identifiers: list[Json] = [{"system": FACILITY_CODE_SYSTEM, "value": facility.code}]
    identifiers += [{"system": i.system, "value": i.value} for i in facility.identifiers.all()]
    status = OperationalStatus(facility.operational_status)
    organization: Json = {
        "resourceType": "Organization",
        "id": rid,
        "identifier": identifiers,
        # Closed = not active; inactive/suspended stay active here and show on Location.
        "active": status != OperationalStatus.CLOSED,
        "type": [
            _concept(MCSD_TYPES, "facility", "Facility"),
            _concept(ORGANIZATION_TYPE, "prov", "Healthcare Provider"),
            _concept(TIER_SYSTEM, str(facility.tier), Tier(facility.tier).label),
            _concept(OWNERSHIP_SYSTEM, facility.ownership, facility.get_ownership_display()),
        ],
        "name": facility.name,
    }
    if facility.name_local:
        organization["alias"] = [facility.name_local]
    if facility.parent is not None:
        organization["partOf"] = {
            "reference": f"Organization/{resource_id(facility.parent.code)}",
            # The parent may be outside this export (another country): say who it is.
            "identifier": {"system": FACILITY_CODE_SYSTEM, "value": facility.parent.code},
        }
    endpoints = list(facility.endpoints.all())
    endpoint_ids = [f"{rid[:58]}.ep{n}" for n in range(1, len(endpoints) + 1)]
    if endpoints:
        organization["endpoint"] = [{"reference": f"Endpoint/{e}"} for e in endpoint_ids]

    location: Json = {
        "resourceType": "Location",
        "id": rid,
        "identifier": identifiers,
        "status": "inactive" if status == OperationalStatus.CLOSED else status.value,
        "name": facility.name,
        "mode": "instance",
        "type": [_concept(MCSD_TYPES, "facility", "Facility")]
        + ([{"text": facility.facility_type}] if facility.facility_type else []),
        "physicalType": _concept(PHYSICAL_TYPE_SYSTEM, "bu", "Building"),
        "managingOrganization": org_ref,
    }
    if facility.name_local:
        location["alias"] = [facility.name_local]
    address: Json = {"use": "work", "country": facility.country.code}
    names = area_names(facility.area)
    for level, key in ((1, "state"), (2, "district"), (3, "city")):
        if names.get(level):
            address[key] = names[level]
    location["address"] = address
    if facility.latitude is not None and facility.longitude is not None:
        location["position"] = {"longitude": facility.longitude, "latitude": facility.latitude}

    resources = [organization, location]
    for department in facility.departments.all():
        specialty = department.specialty
        service: Json = {
            "resourceType": "HealthcareService",
            "id": f"{rid[:54]}.{specialty.code}",
            "active": facility.is_active,
            "providedBy": org_ref,
            "specialty": [_concept(specialty.system, specialty.code, specialty.display)],
            "location": [{"reference": f"Location/{rid}"}],
            "name": department.name,
        }
        if department.languages:
            service["communication"] = [_concept(LANGUAGE_SYSTEM, t) for t in department.languages]
        service["characteristic"] = [
            _concept(CONSULT_MODE_SYSTEM, mode) for mode in department.modes
        ] + [
            _concept(CONSULT_MODE_SYSTEM, "accepting" if department.accepting else "not-accepting")
        ]
        resources.append(service)
    for endpoint, endpoint_id in zip(endpoints, endpoint_ids, strict=True):
        resource: Json = {
            "resourceType": "Endpoint",
            "id": endpoint_id,
            "status": endpoint.status,
            "connectionType": {
                "system": CONNECTION_TYPE,
                "code": "hl7-fhir-rest",
                "display": "HL7 FHIR",
            },
            "managingOrganization": org_ref,
            "payloadType": [_concept(PAYLOAD_TYPE_SYSTEM, "any", "Any")],
            "payloadMimeType": [f"application/fhir+json; fhirVersion={endpoint.fhir_version}"],
            "address": endpoint.base_url,
        }
        if endpoint.name:
            resource["name"] = endpoint.name
        resources.append(resource)
    return resources


def _concept(system: str, code: str, display: str | None = None) -> Json:
    coding: Json = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def write_bundle(out: TextSink, facilities: QuerySet[Facility], *, validate: bool = True) -> int:
    """Stream an mCSD Bundle (type collection); returns the number of facilities written.
    With ``validate`` every resource is checked against its R4B model before it is written
    (about 0.2 ms each), so a bug here can never ship an invalid Bundle."""
    out.write('{"resourceType":"Bundle","type":"collection","entry":[')
    count = 0
    first = True
    for facility in facilities.iterator(chunk_size=2000):
        for resource in facility_resources(facility):
            if validate:
                get_fhir_model_class(str(resource["resourceType"])).model_validate(resource)
            out.write(
                ("\n" if first else ",\n") + json.dumps({"resource": resource}, ensure_ascii=False)
            )
            first = False
        count += 1
    out.write("\n]}\n")
    return count
