"""The registry as IHE mCSD resources, projected into the FHIR store.

One facility = Organization + Location (same logical id, the facility's primary key); one
department = HealthcareService; Endpoint; one support link = OrganizationAffiliation; one
practitioner role = PractitionerRole. Logical ids are the registry primary keys.

``project_registry`` renders each row in R4 and R5, compares a hash of the content with the
stored current version and stores a new version only when something changed; rows gone from
the registry become deletions. The beat task ``project_registry_task`` runs it every minute.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Model, QuerySet
from django.utils import timezone

from fhir_gateway import storage
from fhir_gateway.models import FhirResource, ProjectionCheckpoint
from fhir_gateway.versions import R4, R5
from registry.importing import area_names
from registry.models import (
    Department,
    Endpoint,
    Facility,
    OperationalStatus,
    PractitionerRole,
    SupportLink,
)

logger = logging.getLogger(__name__)

CONSILIUM = "https://consilium.example.org/fhir"
FACILITY_CODE_SYSTEM = f"{CONSILIUM}/sid/facility-code"
TIER_SYSTEM = f"{CONSILIUM}/CodeSystem/facility-tier"
OWNERSHIP_SYSTEM = f"{CONSILIUM}/CodeSystem/facility-ownership"
CONSULT_MODE_SYSTEM = f"{CONSILIUM}/CodeSystem/consult-mode"
SUPPORT_ROLE_SYSTEM = f"{CONSILIUM}/CodeSystem/support-role"
PRACTITIONER_ROLE_SYSTEM = f"{CONSILIUM}/CodeSystem/practitioner-role"
MCSD_TYPES = "https://profiles.ihe.net/ITI/mCSD/CodeSystem/IHE.mCSD.Organization.Location.Types"
ORGANIZATION_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
LANGUAGE_SYSTEM = "urn:ietf:bcp:47"

LOCATION_STATUS = {
    OperationalStatus.ACTIVE: "active",
    OperationalStatus.SUSPENDED: "suspended",
    OperationalStatus.INACTIVE: "inactive",
    OperationalStatus.CLOSED: "inactive",
}

Rendering = dict[str, dict[str, Any]]  # FHIR version -> resource


def _coding(system: str, code: str, display: str = "") -> dict[str, str]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def _concept(system: str, code: str, display: str = "") -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)]}


def _both(resource: dict[str, Any]) -> Rendering:
    return {R4: resource, R5: resource}


# --------------------------------------------------------------------------- mappings


def _facility_identifiers(facility: Facility) -> list[dict[str, str]]:
    identifiers = [{"system": FACILITY_CODE_SYSTEM, "value": facility.code}]
    identifiers += [
        {"system": i.system, "value": i.value}
        for i in sorted(facility.identifiers.all(), key=lambda i: (i.system, i.value))
    ]
    return identifiers


def _address(facility: Facility) -> dict[str, Any]:
    """The area levels as the mCSD export writes them (``mcsd``): state, district, city."""
    address: dict[str, Any] = {"use": "work", "country": facility.country.code}
    names = area_names(facility.area)
    if 1 not in names and facility.province is not None:
        names[1] = facility.province.name
    for level, key in ((1, "state"), (2, "district"), (3, "city")):
        if names.get(level):
            address[key] = names[level]
    return address


def facility_to_organization(facility: Facility) -> Rendering:
    org: dict[str, Any] = {
        "resourceType": "Organization",
        "identifier": _facility_identifiers(facility),
        # The record is in use until the facility closes (FHIR: "still in active use"); a
        # suspended or inactive facility shows on Location.status, as the mCSD export has it.
        "active": facility.operational_status != OperationalStatus.CLOSED,
        "type": [
            _concept(MCSD_TYPES, "facility", "Facility"),
            _concept(ORGANIZATION_TYPE, "prov", "Healthcare Provider"),
            _concept(TIER_SYSTEM, str(facility.tier), facility.get_tier_display()),
        ],
        "name": facility.name,
    }
    if facility.name_local:
        org["alias"] = [facility.name_local]
    if facility.parent_id is not None:
        org["partOf"] = {"reference": f"Organization/{facility.parent_id}"}
    r4 = {**org, "address": [_address(facility)]}
    # R5 moved Organization.address into contact (ExtendedContactDetail).
    r5 = {**org, "contact": [{"address": _address(facility)}]}
    return {R4: r4, R5: r5}


def facility_to_location(facility: Facility) -> Rendering:
    loc: dict[str, Any] = {
        "resourceType": "Location",
        "identifier": _facility_identifiers(facility),
        "status": LOCATION_STATUS.get(OperationalStatus(facility.operational_status), "inactive"),
        "name": facility.name,
    }
    if facility.name_local:
        loc["alias"] = [facility.name_local]
    loc["mode"] = "instance"
    loc["type"] = [_concept(MCSD_TYPES, "facility", "Facility")]
    loc["address"] = _address(facility)
    if facility.has_coordinates:
        loc["position"] = {"longitude": facility.longitude, "latitude": facility.latitude}
    loc["managingOrganization"] = {"reference": f"Organization/{facility.pk}"}
    if facility.parent_id is not None:
        loc["partOf"] = {"reference": f"Location/{facility.parent_id}"}
    return _both(loc)


def department_to_healthcare_service(department: Department) -> Rendering:
    specialty = department.specialty
    service: dict[str, Any] = {
        "resourceType": "HealthcareService",
        "active": department.facility.is_active,
        "providedBy": {"reference": f"Organization/{department.facility_id}"},
        "specialty": [_concept(specialty.system, specialty.code, specialty.display)],
        "location": [{"reference": f"Location/{department.facility_id}"}],
        "name": department.name,
    }
    if department.languages:
        service["communication"] = [
            _concept(LANGUAGE_SYSTEM, str(code)) for code in department.languages
        ]
    # What the department offers and whether it takes new cases now.
    service["characteristic"] = [
        _concept(CONSULT_MODE_SYSTEM, mode) for mode in department.modes
    ] + [_concept(CONSULT_MODE_SYSTEM, "accepting" if department.accepting else "not-accepting")]
    return _both(service)


def endpoint_to_endpoint(endpoint: Endpoint) -> Rendering:
    common: dict[str, Any] = {
        "resourceType": "Endpoint",
        "status": endpoint.status,
    }
    connection = _coding(CONNECTION_TYPE, "hl7-fhir-rest", "HL7 FHIR")
    payload = _concept("http://terminology.hl7.org/CodeSystem/endpoint-payload-type", "any", "Any")
    r4 = {
        **common,
        "connectionType": connection,
        **({"name": endpoint.name} if endpoint.name else {}),
        "managingOrganization": {"reference": f"Organization/{endpoint.facility_id}"},
        "payloadType": [payload],
        "payloadMimeType": [f"application/fhir+json; fhirVersion={endpoint.fhir_version}"],
        "address": endpoint.base_url,
    }
    # R5: connectionType is a list of concepts; payload type and mime type moved to payload.
    r5 = {
        **common,
        "connectionType": [{"coding": [connection]}],
        **({"name": endpoint.name} if endpoint.name else {}),
        "managingOrganization": {"reference": f"Organization/{endpoint.facility_id}"},
        "payload": [
            {
                "type": [payload],
                "mimeType": [f"application/fhir+json; fhirVersion={endpoint.fhir_version}"],
            }
        ],
        "address": endpoint.base_url,
    }
    return {R4: r4, R5: r5}


def support_link_to_affiliation(link: SupportLink) -> Rendering:
    period: dict[str, str] = {"start": link.valid_from.isoformat()}
    if link.valid_to is not None:
        period["end"] = link.valid_to.isoformat()
    today = timezone.localdate()
    in_force = link.valid_from <= today and (link.valid_to is None or link.valid_to >= today)
    affiliation: dict[str, Any] = {
        "resourceType": "OrganizationAffiliation",
        # In force today, as routing reads it (compared every run: a day passing shows).
        "active": link.active and in_force,
        "period": period,
        # The hub offers the support; the spoke participates in the hub's network.
        "organization": {"reference": f"Organization/{link.hub_id}"},
        "participatingOrganization": {"reference": f"Organization/{link.spoke_id}"},
        "code": [_concept(SUPPORT_ROLE_SYSTEM, "teleconsult-hub", "Teleconsultation hub")],
    }
    specialties = sorted(link.specialties.all(), key=lambda s: (s.system, s.code))
    if specialties:
        affiliation["specialty"] = [_concept(s.system, s.code, s.display) for s in specialties]
    return _both(affiliation)


USER_SYSTEM = f"{CONSILIUM}/sid/user"


def _practitioner(role: PractitionerRole) -> dict[str, Any]:
    reference: dict[str, Any] = {"display": str(role.practitioner)}
    if role.practitioner.user_id is not None:
        reference["identifier"] = {"system": USER_SYSTEM, "value": str(role.practitioner.user_id)}
    return reference


def practitioner_role_to_resource(role: PractitionerRole) -> Rendering:
    resource: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "active": role.active and role.practitioner.active,
        # Practitioner resources are not served: a logical reference, with the person's
        # account (USER_SYSTEM) when they have one: what a conference's ``experts`` input
        # names (docs/fhir.md, Task updates).
        "practitioner": _practitioner(role),
        "organization": {"reference": f"Organization/{role.facility_id}"},
        "code": [_concept(PRACTITIONER_ROLE_SYSTEM, role.code, role.get_code_display())],
        "location": [{"reference": f"Location/{role.facility_id}"}],
    }
    if role.department is not None:
        specialty = role.department.specialty
        resource["specialty"] = [_concept(specialty.system, specialty.code, specialty.display)]
        resource["healthcareService"] = [{"reference": f"HealthcareService/{role.department_id}"}]
    return _both(resource)


# --------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class Projection:
    resource_type: str
    queryset: Callable[[], QuerySet[Any]]
    render: Callable[[Any], Rendering]
    # Field that says when a row changed (None: always compared, the table has no clock).
    changed_field: str | None = None


PROJECTIONS: tuple[Projection, ...] = (
    Projection(
        "Organization",
        lambda: Facility.objects.select_related(
            "country", "area__parent__parent", "province"
        ).prefetch_related("identifiers"),
        facility_to_organization,
        "updated_at",
    ),
    Projection(
        "Location",
        lambda: Facility.objects.select_related(
            "country", "area__parent__parent", "province"
        ).prefetch_related("identifiers"),
        facility_to_location,
        "updated_at",
    ),
    Projection(
        "HealthcareService",
        lambda: Department.objects.select_related("facility", "specialty"),
        department_to_healthcare_service,
        None,  # follows facility status too, so compared every run (cheap: hash only)
    ),
    Projection("Endpoint", lambda: Endpoint.objects.all(), endpoint_to_endpoint, None),
    Projection(
        "OrganizationAffiliation",
        lambda: SupportLink.objects.prefetch_related("specialties"),
        support_link_to_affiliation,
        None,
    ),
    Projection(
        "PractitionerRole",
        lambda: PractitionerRole.objects.select_related(
            "practitioner", "department", "department__specialty"
        ),
        practitioner_role_to_resource,
        None,
    ),
)


@dataclass
class ProjectionReport:
    created: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    unchanged: dict[str, int] = field(default_factory=dict)

    def bump(self, bucket: dict[str, int], resource_type: str) -> None:
        bucket[resource_type] = bucket.get(resource_type, 0) + 1


def _rendering_hash(rendering: Rendering) -> str:
    return storage.content_hash({"versions": rendering})


def _project_rows(
    projection: Projection,
    rows: Iterable[Model],
    current: dict[int, tuple[str, bool]],
    report: ProjectionReport,
    now: datetime,
) -> None:
    for row in rows:
        rendering = projection.render(row)
        digest = _rendering_hash(rendering)
        known = current.get(int(row.pk))
        if known is not None and known[0] == digest and not known[1]:
            report.bump(report.unchanged, projection.resource_type)
            continue
        with transaction.atomic():
            storage.store_version(
                resource_type=projection.resource_type,
                logical_id=str(row.pk),
                resource=rendering[R4],
                renderings=rendering,
                fhir_version=R4,
                source_pk=int(row.pk),
                hash_value=digest,
                now=now,
            )
        report.bump(report.created if known is None else report.updated, projection.resource_type)


def project_registry(
    since: datetime | None = None, *, resource_types: Iterable[str] | None = None
) -> ProjectionReport:
    """Bring the stored registry resources up to date with the registry tables.

    With ``since``, rows with a change clock are projected only when changed since then;
    rows without one are compared by hash. Deletions are found by comparing id sets.
    """
    report = ProjectionReport()
    wanted = set(resource_types) if resource_types is not None else None
    now = timezone.now()
    for projection in PROJECTIONS:
        if wanted is not None and projection.resource_type not in wanted:
            continue
        current = {
            int(pk or 0): (digest, deleted)
            for pk, digest, deleted in FhirResource.objects.filter(
                resource_type=projection.resource_type, is_current=True, source_pk__isnull=False
            ).values_list("source_pk", "content_hash", "deleted")
        }
        queryset = projection.queryset()
        if since is not None and projection.changed_field is not None:
            live_ids = set(queryset.model.objects.values_list("pk", flat=True))
            queryset = queryset.filter(**{f"{projection.changed_field}__gte": since})
        else:
            live_ids = None
        rows = list(queryset.order_by("pk"))
        _project_rows(projection, rows, current, report, now)
        if live_ids is None:
            live_ids = {int(r.pk) for r in rows}
        for pk, (_digest, deleted) in current.items():
            if pk in live_ids or deleted:
                continue
            with transaction.atomic():
                storage.store_version(
                    resource_type=projection.resource_type,
                    logical_id=str(pk),
                    resource=None,
                    fhir_version=R4,
                    now=now,
                )
            report.bump(report.deleted, projection.resource_type)
    return report


# Bump the revision when a rendering changes: the next incremental run finds no checkpoint
# under the new name and compares every row (new versions only where the rendering moved).
RENDERING_REVISION = 3  # 3: PractitionerRole.practitioner names the user account
CHECKPOINT = f"registry@{RENDERING_REVISION}"
# Overlap between runs: a registry transaction that committed late is still seen.
_OVERLAP = timedelta(minutes=2)


# One projection run at a time: a lease in a ProjectionCheckpoint row (its watermark is
# when the lease ends). A row, not a session advisory lock: that works behind a
# transaction-pooling PgBouncer (a session lock taken on one server connection and
# released on another would be held for ever), on SQLite, and across machines; a run whose
# worker died frees it when the lease ends.
LEASE_NAME = "registry-projection-lease"
LEASE = timedelta(minutes=15)
_FREE = datetime(2000, 1, 1, tzinfo=UTC)


def _take_lease() -> datetime | None:
    """The end of the lease taken now, None while another run holds one."""
    ProjectionCheckpoint.objects.get_or_create(name=LEASE_NAME, defaults={"watermark": _FREE})
    now = timezone.now()
    until = now + LEASE
    taken = ProjectionCheckpoint.objects.filter(name=LEASE_NAME, watermark__lte=now).update(
        watermark=until
    )
    return until if taken else None


@contextlib.contextmanager
def projection_lock(
    *, wait: bool, waiting: Callable[[], None] | None = None, poll_seconds: float = 1.0
) -> Iterator[bool]:
    """Hold the one-run-at-a-time lease of the registry projection; yields False (and
    holds nothing) when ``wait`` is False and another run holds it; ``waiting`` is called
    once when it waits. Two overlapping runs (beat's next while a slow first one still
    went, found by an operator) stored the same content twice as new versions and held two
    worker slots."""
    until = _take_lease()
    if until is None and wait and waiting is not None:
        waiting()
    while until is None and wait:
        time.sleep(poll_seconds)
        until = _take_lease()
    try:
        yield until is not None
    finally:
        if until is not None:  # ours still (the exact end we set): free it
            ProjectionCheckpoint.objects.filter(name=LEASE_NAME, watermark=until).update(
                watermark=_FREE
            )


def project_registry_incremental() -> ProjectionReport | None:
    """What the beat task runs: changes since the last run (minus an overlap). None (and
    nothing done) while another run is still going: the next beat run takes over."""
    with projection_lock(wait=False) as got:
        if not got:
            logger.info("registry projection still running elsewhere; this run skipped")
            return None
        started = timezone.now()
        checkpoint = ProjectionCheckpoint.objects.filter(name=CHECKPOINT).first()
        since = checkpoint.watermark - _OVERLAP if checkpoint else None
        report = project_registry(since)
        ProjectionCheckpoint.objects.update_or_create(
            name=CHECKPOINT, defaults={"watermark": started}
        )
        return report
