"""Read + search handlers for the registry resources (IHE mCSD).

Searches find registry primary keys with queries on the registry tables, then answer the
stored JSON of those ids (``FhirResource.source_pk``) in one SQL statement.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from core.values import written_int
from fhir_gateway.handlers import (
    HISTORY,
    READ,
    SEARCH,
    VREAD,
    ParamSort,
    ResourceHandler,
    SearchParam,
    register,
)
from fhir_gateway.models import FhirResource
from fhir_gateway.outcomes import FhirError
from fhir_gateway.registry_projection import (
    CONSILIUM,
    FACILITY_CODE_SYSTEM,
    MCSD_TYPES,
    ORGANIZATION_TYPE,
    PRACTITIONER_ROLE_SYSTEM,
    TIER_SYSTEM,
)
from fhir_gateway.storage import current_rows, parse_token, split_escaped, unescape
from registry.models import (
    Department,
    Endpoint,
    Facility,
    FacilityIdentifier,
    OperationalStatus,
    PractitionerRole,
    Specialty,
    SupportLink,
)
from registry.selectors import facilities_within, facility_distances
from registry.text import search_key

if TYPE_CHECKING:
    from accounts.models import User

REGISTRY_INTERACTIONS = (READ, VREAD, HISTORY, SEARCH)
_NOTHING = Q(pk__in=[])

# A filter: (registry queryset, one value which may hold comma-separated alternatives) -> Q.
Filter = Callable[[str], Q]


def _alternatives(raw: str) -> list[str]:
    """Comma-separated alternatives; ``\\,`` is a comma inside one (FHIR's escape; the
    other escapes stay for the token parser)."""
    return [re.sub(r"\\(.)", _keep_escape, part) for part in split_escaped(raw, ",") if part]


def _keep_escape(match: re.Match[str]) -> str:
    return "," if match[1] == "," else match[0]


def _any(raw: str, one: Callable[[str], Q]) -> Q:
    condition = _NOTHING
    for value in _alternatives(raw):
        condition |= one(value)
    return condition


def reference_pk(raw: str, resource_type: str) -> int | None:
    """'Organization/12', '12' or an absolute URL -> 12; None when it cannot be ours."""
    value = raw.rstrip("/")
    if "/" in value:
        parts = value.split("/")
        if len(parts) >= 2 and parts[-2] == "_history":
            parts = parts[:-2]
        if len(parts) < 2 or parts[-2] != resource_type:
            return None
        value = parts[-1]
    return written_int(value, max_digits=18)


def _reference(field: str, resource_type: str) -> Filter:
    def build(raw: str) -> Q:
        def one(value: str) -> Q:
            pk = reference_pk(value, resource_type)
            return Q(**{field: pk}) if pk is not None else _NOTHING

        return _any(raw, one)

    return build


def _boolean(field_true: Callable[[bool], Q]) -> Filter:
    def build(raw: str) -> Q:
        def one(value: str) -> Q:
            _system, code = parse_token(value)
            if code not in {"true", "false"}:
                raise FhirError(400, "invalid", f"{value!r} is not true or false.")
            return field_true(code == "true")

        return _any(raw, one)

    return build


def _specialty(prefix: str) -> Filter:
    """``prefix`` leads to the specialty (``specialty__``) or specialties
    (``specialties__``): one ``__in`` over the specialties a value names, so that ``:not``
    (Django's exclude) means "no specialty that is this system and this code", not "no
    specialty of this system and none of this code" (a multi-valued relation's conditions
    are excluded apart)."""

    def build(raw: str) -> Q:
        def one(value: str) -> Q:
            system, code = parse_token(value)
            if system == "":  # "|code": no system, and a specialty always has one
                return _NOTHING
            condition = Q(code=code) if code else Q()  # "system|": any code
            if system:
                condition &= Q(system=system)
            return Q(**{f"{prefix}in": Specialty.objects.filter(condition)})

        return _any(raw, one)

    return build


def _facility_name(raw: str) -> Q:
    # A value with nothing left to compare (only symbols: "🏥") matches nothing, not all.
    return _any(
        raw, lambda value: Q(search_name__contains=key) if (key := search_key(value)) else _NOTHING
    )


def _with_identifier(**match: str) -> Q:
    """The facilities with one identifier matching all of ``match``: a subquery, so that
    ``:not`` excludes those (Django's exclude over ``identifiers__system=…,
    identifiers__value=…`` tests each condition on any identifier, apart)."""
    return Q(pk__in=FacilityIdentifier.objects.filter(**match).values("facility_id"))


def _facility_identifier(raw: str) -> Q:
    def one(value: str) -> Q:
        system, code = parse_token(value)
        if code == "":  # "system|": every facility with an identifier of that system
            if system == FACILITY_CODE_SYSTEM:
                return ~_NOTHING
            return _with_identifier(system=system) if system else _NOTHING
        condition = _NOTHING
        if system is None or system == FACILITY_CODE_SYSTEM:
            condition |= Q(code=code)
        if system is None:
            condition |= _with_identifier(value=code)
        elif system:
            condition |= _with_identifier(system=system, value=code)
        return condition

    return _any(raw, one)


def _facility_type(raw: str) -> Q:
    def one(value: str) -> Q:
        system, code = parse_token(value)
        if system in {None, TIER_SYSTEM} and code in {"1", "2", "3", "4"}:
            return Q(tier=int(code))
        if (system in {None, MCSD_TYPES} and code == "facility") or (
            system in {None, ORGANIZATION_TYPE} and code == "prov"
        ):
            return ~_NOTHING
        return _NOTHING

    return _any(raw, one)


def _country(prefix: str = "") -> Filter:
    def build(raw: str) -> Q:
        return _any(
            raw,
            lambda v: Q(**{f"{prefix}country__code__iexact": v})
            | Q(**{f"{prefix}country__name__istartswith": v}),
        )

    return build


def _country_contains(prefix: str = "") -> Filter:
    """``address-country:contains``: the ISO code or the country's name holds the value
    (the plain search: the code, or the name's start)."""

    def build(raw: str) -> Q:
        return _any(
            raw,
            lambda v: Q(**{f"{prefix}country__code__icontains": v})
            | Q(**{f"{prefix}country__name__icontains": v}),
        )

    return build


def _location_status(raw: str) -> Q:
    statuses = {
        "active": [OperationalStatus.ACTIVE],
        "suspended": [OperationalStatus.SUSPENDED],
        "inactive": [OperationalStatus.INACTIVE, OperationalStatus.CLOSED],
    }

    def one(value: str) -> Q:
        _system, code = parse_token(value)
        return Q(operational_status__in=statuses[code]) if code in statuses else _NOTHING

    return _any(raw, one)


# FHIR's decimal (datatypes.html#decimal): Python's float() also reads "1_0" (as 10),
# surrounding whitespace, "nan", "inf", "+1", "1." and other scripts' digits (Arabic-Indic).
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _near_point(raw: str) -> tuple[float, float, float]:
    """near=lat|lon|distance|units (units km; distance defaults to 50 km) -> (lat, lon,
    distance in km). Each number is a FHIR decimal and there are at most four parts, else
    400 ``invalid`` naming ``near`` (a fifth part was ignored, ``1_0`` read as 10)."""
    parts = raw.split("|")
    numbers = parts[:2] + [p for p in parts[2:3] if p]  # the distance may be left empty
    if not 2 <= len(parts) <= 4 or not all(_DECIMAL.fullmatch(n) for n in numbers):
        raise FhirError(
            400,
            "invalid",
            f"near {raw[:100]!r} is not lat|lon|distance|km (FHIR decimals).",
            expression=["near"],
        )
    lat, lon = float(parts[0]), float(parts[1])
    distance = float(parts[2]) if len(parts) > 2 and parts[2] else 50.0
    units = parts[3] if len(parts) > 3 else "km"
    if units not in {"km", ""}:
        raise FhirError(
            400, "not-supported", f"near distance unit {units[:40]!r}: use km.", expression=["near"]
        )
    if not (-90 <= lat <= 90 and -180 <= lon <= 180 and 0 <= distance <= 20_000):
        raise FhirError(400, "invalid", f"near {raw[:100]!r} is out of range.", expression=["near"])
    return lat, lon, distance


def _near(raw: str) -> Q:
    """The facilities within the distance (in SQL: a bounding box on the indexed
    coordinates, then the great-circle distance); none without coordinates."""
    return Q(pk__in=facilities_within(*_near_point(raw)).values("pk"))


def _near_distance(raw: str) -> Subquery:
    """``_sort=near``: each row's facility's distance from the point, by the formula the
    ``near`` filter compares with its distance (in SQL, so it orders, pages and cursors)."""
    lat, lon, _distance = _near_point(raw)
    facility = facility_distances(lat, lon).filter(pk=OuterRef("source_pk"))
    return Subquery(facility.values("distance_km")[:1])


LOCATION_DISTANCE = "http://hl7.org/fhir/StructureDefinition/location-distance"


def _distance_extension(distance_km: float) -> list[dict[str, Any]]:
    """A match's distance from the ``near`` point (Bundle.entry.search, as FHIR's Location
    search describes it), in km to the metre."""
    return [
        {
            "url": LOCATION_DISTANCE,
            "valueDistance": {
                "value": round(distance_km, 3),
                "unit": "km",
                "system": "http://unitsofmeasure.org",
                "code": "km",
            },
        }
    ]


def _exact_values(raw: str) -> list[str]:
    """``name:exact``'s values: FHIR's escapes (``\\,`` ``\\|`` ``\\$`` ``\\\\``) undone."""
    return [unescape(part) for part in split_escaped(raw, ",") if part]


def _facility_name_exact(raw: str) -> Q:
    """``name:exact``: the whole name or local name, case and accents as written."""
    condition = _NOTHING
    for value in _exact_values(raw):
        condition |= Q(name=value) | Q(name_local=value)
    return condition


def _department_name_exact(raw: str) -> Q:
    return Q(name__in=_exact_values(raw))


def _department_name(raw: str) -> Q:
    # Department has no stored search key: compare normalised names (one column scan).
    def one(value: str) -> Q:
        wanted = search_key(value)
        if not wanted:  # only symbols: matches nothing, not all
            return _NOTHING
        ids = [
            pk
            for pk, name in Department.objects.values_list("pk", "name")
            if wanted in search_key(name)
        ]
        return Q(pk__in=ids)

    return _any(raw, one)


def _role_code(raw: str) -> Q:
    def one(value: str) -> Q:
        system, code = parse_token(value)
        return Q(code=code) if system in {None, PRACTITIONER_ROLE_SYSTEM} else _NOTHING

    return _any(raw, one)


def _registry_search(
    resource_type: str,
    base: Callable[[], QuerySet[Any]],
    filters: dict[str, Filter],
) -> Callable[[User, dict[str, list[str]]], QuerySet[FhirResource]]:
    def search(user: User, params: dict[str, list[str]]) -> QuerySet[FhirResource]:
        rows = current_rows(resource_type)
        if not params:
            return rows
        registry_rows = base()
        for name, values in params.items():
            for value in values:  # repeated parameters AND, commas OR
                registry_rows = registry_rows.filter(filters[name](value))
        return rows.filter(source_pk__in=registry_rows.values("pk"))

    return search


def _handler(
    resource_type: str,
    documentation: str,
    base: Callable[[], QuerySet[Any]],
    params: list[tuple[SearchParam, Filter]],
    *,
    sort_by_name: bool = False,
    missing: dict[str, str] | None = None,
    exact: Filter | None = None,
    contains: dict[str, Filter] | None = None,
    sort_by_tier: bool = False,
    param_sorts: dict[str, ParamSort] | None = None,
) -> ResourceHandler:
    """A registry type's handler; with ``sort_by_name``, ``_sort=name`` orders by the
    source row's ``name`` (the database's collation), as its ``name`` search reads it.
    Token parameters take ``:not``; those in ``missing`` (name -> the nullable column
    whose NULL renders no value) take ``:missing``; ``exact`` is ``name:exact``;
    ``contains`` names the string parameters whose own search is not "contains" (name ->
    their ``:contains``; the others' ``:contains`` is their own search). With
    ``sort_by_tier``, ``_sort=type`` orders by the facility's tier (central first);
    ``param_sorts``: keys made from a search parameter (``ParamSort``)."""
    missing = missing or {}
    contains = contains or {}
    sorts: dict[str, Any] = {}
    if sort_by_name:
        names = base().filter(pk=OuterRef("source_pk")).values("name")[:1]
        sorts["name"] = Subquery(names)
    if sort_by_tier:
        sorts["type"] = Subquery(base().filter(pk=OuterRef("source_pk")).values("tier")[:1])
    return ResourceHandler(
        resource_type=resource_type,
        interactions=REGISTRY_INTERACTIONS,
        documentation=documentation,
        search_params=tuple(_with_modifiers(p, missing, exact, contains) for p, _ in params),
        search=_registry_search(resource_type, base, _filters(params, missing, exact, contains)),
        order_by=("source_pk",),
        sorts=sorts,
        param_sorts=param_sorts or {},
    )


def _with_modifiers(
    param: SearchParam,
    missing: dict[str, str],
    exact: Filter | None,
    contains: dict[str, Filter],
) -> SearchParam:
    modifiers = {"not"} if param.type == "token" else set()
    if param.name in contains:  # its own filter (the view passes "name:contains" on)
        modifiers.add("contains")
    if param.name in missing:
        modifiers.add("missing")
    if param.name == "name" and exact is not None:
        modifiers.add("exact")
    return replace(param, modifiers=frozenset(modifiers))


def _filters(
    params: list[tuple[SearchParam, Filter]],
    missing: dict[str, str],
    exact: Filter | None,
    contains: dict[str, Filter],
) -> dict[str, Filter]:
    """Filters by parameter name, and by "name:modifier" (``_with_modifiers``)."""
    filters: dict[str, Filter] = {"name:exact": exact} if exact is not None else {}
    filters.update({f"{name}:contains": build for name, build in contains.items()})
    for param, build in params:
        filters[param.name] = build
        if param.type == "token":
            filters[f"{param.name}:not"] = _negated(build)
        if param.name in missing:
            filters[f"{param.name}:missing"] = _is_null(missing[param.name])
    return filters


def _negated(build: Filter) -> Filter:
    """``:not``: none of the values (a row with no value too)."""
    return lambda raw: ~build(raw)


def _is_null(column: str) -> Filter:
    """``:missing``: true (no value), false (a value); the view checked the values."""
    return lambda raw: _any(raw, lambda value: Q(**{f"{column}__isnull": value == "true"}))


def _sp(name: str, type_: str, doc: str, resource_type: str, definition: str = "") -> SearchParam:
    return SearchParam(
        name,
        type_,
        doc,
        definition or f"http://hl7.org/fhir/SearchParameter/{resource_type}-{name}",
    )


# Organization.active: the record is in use until the facility closes (as rendered).
_OPEN_FACILITY = _boolean(
    lambda on: ~Q(operational_status=OperationalStatus.CLOSED)
    if on
    else Q(operational_status=OperationalStatus.CLOSED)
)

_ACTIVE_FACILITY = _boolean(
    lambda on: Q(operational_status=OperationalStatus.ACTIVE)
    if on
    else ~Q(operational_status=OperationalStatus.ACTIVE)
)


def _affiliation_in_force() -> Q:
    today = timezone.localdate()
    return Q(active=True, valid_from__lte=today) & (
        Q(valid_to__isnull=True) | Q(valid_to__gte=today)
    )


HANDLERS: tuple[ResourceHandler, ...] = (
    _handler(
        "Organization",
        "A facility (mCSD Facility Organization). Read-only: the registry is the source. "
        "_sort: name, type (tier: central first), _lastUpdated, _id.",
        Facility.objects.all,
        [
            (
                _sp(
                    "name",
                    "string",
                    "Accent-insensitive contains on name and local name.",
                    "Organization",
                ),
                _facility_name,
            ),
            (
                _sp(
                    "identifier",
                    "token",
                    "Facility code or any registered identifier.",
                    "Organization",
                ),
                _facility_identifier,
            ),
            (
                _sp(
                    "type", "token", f"Tier ({TIER_SYSTEM}|1..4), or facility/prov.", "Organization"
                ),
                _facility_type,
            ),
            (
                _sp(
                    "address-country",
                    "string",
                    "ISO 3166 code (exact) or country name (starts with).",
                    "Organization",
                ),
                _country(),
            ),
            (
                _sp("partof", "reference", "Parent facility.", "Organization"),
                _reference("parent_id", "Organization"),
            ),
            (
                _sp("active", "token", "true: not closed (as rendered).", "Organization"),
                _OPEN_FACILITY,
            ),
        ],
        sort_by_name=True,
        sort_by_tier=True,
        exact=_facility_name_exact,
        missing={"partof": "parent_id"},
        contains={"address-country": _country_contains()},
    ),
    _handler(
        "Location",
        "A facility's site (mCSD Facility Location). Read-only. _sort: name, near "
        "(distance from the near point; with near given and no _sort, nearest first), "
        "_lastUpdated, _id. With near, each match's search element has its distance "
        "(extension location-distance, km).",
        Facility.objects.all,
        [
            (
                _sp(
                    "name",
                    "string",
                    "Accent-insensitive contains on name and local name.",
                    "Location",
                ),
                _facility_name,
            ),
            (
                _sp(
                    "identifier", "token", "Facility code or any registered identifier.", "Location"
                ),
                _facility_identifier,
            ),
            (
                _sp(
                    "address-country",
                    "string",
                    "ISO 3166 code (exact) or country name (starts with).",
                    "Location",
                ),
                _country(),
            ),
            (
                _sp("organization", "reference", "The facility's Organization.", "Location"),
                _reference("pk", "Organization"),
            ),
            (
                _sp("partof", "reference", "Parent facility's Location.", "Location"),
                _reference("parent_id", "Location"),
            ),
            (
                _sp("status", "token", "active | suspended | inactive.", "Location"),
                _location_status,
            ),
            (
                _sp(
                    "near",
                    "special",
                    "lat|lon|distance|km (distance defaults to 50 km); nearest first unless "
                    "_sort says otherwise (then the last sort key before the id); each "
                    "match's distance in Bundle.entry.search (location-distance).",
                    "Location",
                ),
                _near,
            ),
        ],
        sort_by_name=True,
        exact=_facility_name_exact,
        missing={"partof": "parent_id"},
        contains={"address-country": _country_contains()},
        param_sorts={"near": ParamSort("near", _near_distance, _distance_extension)},
    ),
    _handler(
        "HealthcareService",
        "A department: a facility's service for one specialty. Read-only. _sort: name, "
        "_lastUpdated, _id.",
        Department.objects.all,
        [
            (
                _sp(
                    "name",
                    "string",
                    "Accent-insensitive contains on the department name.",
                    "HealthcareService",
                ),
                _department_name,
            ),
            (
                _sp(
                    "organization", "reference", "The facility's Organization.", "HealthcareService"
                ),
                _reference("facility_id", "Organization"),
            ),
            (
                _sp("location", "reference", "The facility's Location.", "HealthcareService"),
                _reference("facility_id", "Location"),
            ),
            (
                _sp("specialty", "token", "SNOMED CT practice-setting code.", "HealthcareService"),
                _specialty("specialty__"),
            ),
            (
                _sp(
                    "address-country",
                    "string",
                    "Country of the facility.",
                    "HealthcareService",
                    f"{CONSILIUM}/SearchParameter/HealthcareService-address-country",
                ),
                _country("facility__"),
            ),
            (
                _sp("active", "token", "true: the facility is operational.", "HealthcareService"),
                _boolean(
                    lambda on: Q(facility__operational_status=OperationalStatus.ACTIVE)
                    if on
                    else ~Q(facility__operational_status=OperationalStatus.ACTIVE)
                ),
            ),
        ],
        sort_by_name=True,
        exact=_department_name_exact,
        contains={"address-country": _country_contains("facility__")},
    ),
    _handler(
        "Endpoint",
        "A member system's FHIR base URL. Read-only.",
        Endpoint.objects.all,
        [
            (
                _sp("organization", "reference", "The facility's Organization.", "Endpoint"),
                _reference("facility_id", "Organization"),
            ),
            (
                _sp("status", "token", "active | suspended | error | off.", "Endpoint"),
                lambda raw: _any(raw, lambda v: Q(status=parse_token(v)[1])),
            ),
        ],
    ),
    _handler(
        "OrganizationAffiliation",
        "A support link: the hub (organization) supports the spoke (participatingOrganization).",
        SupportLink.objects.all,
        [
            (
                _sp("primary-organization", "reference", "The hub.", "OrganizationAffiliation"),
                _reference("hub_id", "Organization"),
            ),
            (
                _sp(
                    "participating-organization",
                    "reference",
                    "The spoke.",
                    "OrganizationAffiliation",
                ),
                _reference("spoke_id", "Organization"),
            ),
            (
                _sp(
                    "specialty",
                    "token",
                    "A supported specialty (SNOMED CT).",
                    "OrganizationAffiliation",
                ),
                _specialty("specialties__"),
            ),
            (
                _sp(
                    "active",
                    "token",
                    "true | false (active and in force today, as rendered).",
                    "OrganizationAffiliation",
                ),
                _boolean(lambda on: _affiliation_in_force() if on else ~_affiliation_in_force()),
            ),
        ],
    ),
    _handler(
        "PractitionerRole",
        "A practitioner's role at a facility (and department). Read-only.",
        PractitionerRole.objects.all,
        [
            (
                _sp(
                    "organization", "reference", "The facility's Organization.", "PractitionerRole"
                ),
                _reference("facility_id", "Organization"),
            ),
            (
                _sp("location", "reference", "The facility's Location.", "PractitionerRole"),
                _reference("facility_id", "Location"),
            ),
            (
                _sp(
                    "service",
                    "reference",
                    "The department's HealthcareService.",
                    "PractitionerRole",
                ),
                _reference("department_id", "HealthcareService"),
            ),
            (
                _sp(
                    "specialty",
                    "token",
                    "The department's specialty (SNOMED CT).",
                    "PractitionerRole",
                ),
                _specialty("department__specialty__"),
            ),
            (
                _sp(
                    "role",
                    "token",
                    "consultant | doctor | nurse | coordinator.",
                    "PractitionerRole",
                ),
                _role_code,
            ),
            (
                _sp(
                    "active",
                    "token",
                    "true | false (the role and its practitioner both active).",
                    "PractitionerRole",
                ),
                _boolean(  # as rendered: role.active and practitioner.active
                    lambda on: Q(active=True, practitioner__active=True)
                    if on
                    else Q(active=False) | Q(practitioner__active=False)
                ),
            ),
        ],
    ),
)


def register_all() -> None:
    for handler in HANDLERS:
        register(handler)
