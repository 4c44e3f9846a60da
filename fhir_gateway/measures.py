"""``Measure`` and ``MeasureReport``: the reduced-transfer report figures over FHIR.

Everything comes from the reports app's plain-data hook (``reports.fhir``): the Measures
from ``measure_definitions()``, the figures of a MeasureReport from
``measure_report_data(user, filters)`` — already scoped to the caller and small-cell
suppressed by the reports app's own selectors (``report_counts``). Nothing here computes a
figure or decides who may see it: the filters are parsed by ``reports.selectors.filters_parse``
and the permission rules are ``reports.selectors.report_scope_for`` (403 for accounts
without a reporting role; ministry: every facility, aggregates only, suppressed, one
stratifier at a time).

- ``Measure`` (read, vread, search ``url`` / ``name``): one per metric, stored like every
  served resource (on first use, again when a definition changes).
- ``GET Measure/{id}/$evaluate-measure?periodStart=&periodEnd=`` → a ``summary``
  MeasureReport with the metric's total and, with ``stratifier``, one stratum per group.
  A suppressed figure is absent, marked with the data-absent-reason ``masked``.
"""

from __future__ import annotations

import calendar
import re
import uuid
from datetime import date
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from core.errors import ApplicationError
from core.values import written_int
from fhir_gateway import handlers
from fhir_gateway.handlers import Operation, OperationAnswer, OperationCall, ResourceHandler
from fhir_gateway.models import FhirResource
from fhir_gateway.outcomes import FhirError
from fhir_gateway.registry_projection import CONSILIUM
from fhir_gateway.storage import (
    content_hash,
    current_rows,
    dumps,
    fhir_instant,
    resource_delete,
    store_version,
)
from fhir_gateway.versions import R4, R5
from reports.fhir import measure_definitions, measure_report_data
from reports.selectors import filters_parse, report_scope_for

if TYPE_CHECKING:
    from accounts.models import User

SCORING = "http://terminology.hl7.org/CodeSystem/measure-scoring"
POPULATION = "http://terminology.hl7.org/CodeSystem/measure-population"
DATA_ABSENT = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
FILTER_EXTENSION = f"{CONSILIUM}/StructureDefinition/report-filter"
SUPPRESSION_EXTENSION = f"{CONSILIUM}/StructureDefinition/small-cell-suppression"
METRIC_SYSTEM = f"{CONSILIUM}/CodeSystem/report-metric"
_FHIR_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
# FHIR parameter -> the reports API's filter name (reports.selectors.filters_parse).
_DIMENSIONS = {
    "country": "country",
    "province": "province",
    "tier": "tier",
    "hub": "hub",
    "specialty": "specialty",
    "campaign": "campaign",
    "cross-border": "cross_border",
    "stratifier": "by",
    "grain": "period",
}
_KNOWN_PARAMS = frozenset(
    {"periodStart", "periodEnd", "reportType", "subject", "_format", *_DIMENSIONS}
)


def measure_id(code: str) -> str:
    return code.replace("_", "-")  # FHIR ids have no underscores


def _measure_name(code: str) -> str:
    return "".join(part.capitalize() for part in code.split("_"))  # TransferConsidered


def _names(definition: dict[str, Any]) -> set[str]:
    """What ``name`` searches (lower case): the code, the Measure name, the title."""
    code = definition["name"]
    return {code, measure_id(code), _measure_name(code).lower(), definition["title"].lower()}


def _name_matches(definition: dict[str, Any], values: set[str]) -> bool:
    """A string search, as the registry's ``name``: any value contained (case-insensitive)
    in one of the names, so FHIR's default "starts with" and ``:contains`` both find it."""
    return any(value in name for name in _names(definition) for value in values)


def _definitions() -> dict[str, dict[str, Any]]:
    """Logical id -> the reports hook's definition."""
    return {measure_id(d["name"]): d for d in measure_definitions()}


def _measure_renderings(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    code = definition["name"]
    scoring = {"coding": [{"system": SCORING, "code": definition["scoring"]}]}
    group: dict[str, Any] = {
        "code": {"coding": [{"system": METRIC_SYSTEM, "code": code}], "text": definition["title"]},
        "description": definition["description"],
    }
    population = {
        "code": {"coding": [{"system": POPULATION, "code": "initial-population"}]},
        "description": definition["description"],
        "criteria": {"language": "text/plain", "expression": definition["description"]},
    }
    if definition["scoring"] == "cohort":
        group["population"] = [population]
    common = {
        "resourceType": "Measure",
        "id": measure_id(code),
        "url": definition["url"],
        "name": _measure_name(code),
        "title": definition["title"],
        "status": "active",
        "publisher": "Consilium",
        "description": definition["description"],
        "scoring": scoring,
        "group": [group],
    }
    return {R4: common, R5: common}


def _ensure_measures() -> None:
    """Store a version of each Measure whose definition changed (first use after a
    deployment); Measures whose metric is gone get a deletion version."""
    wanted = {
        logical_id: _measure_renderings(definition)
        for logical_id, definition in _definitions().items()
    }
    digests = {logical_id: content_hash(r[R4]) for logical_id, r in wanted.items()}
    stored = dict(current_rows("Measure").values_list("logical_id", "content_hash"))
    if stored == digests:
        return
    with transaction.atomic():
        for logical_id, renderings in wanted.items():
            if stored.get(logical_id) != digests[logical_id]:
                store_version(
                    resource_type="Measure",
                    logical_id=logical_id,
                    resource=renderings[R4],
                    fhir_version=R4,
                    renderings=renderings,
                    hash_value=digests[logical_id],
                    index_tokens=False,
                )
        for logical_id in set(stored) - set(wanted):
            resource_delete(resource_type="Measure", logical_id=logical_id)


def _visible(user: User) -> QuerySet[FhirResource]:
    report_scope_for(user)  # the reports app's rule: 403 without a reporting role
    _ensure_measures()
    return FhirResource.objects.filter(resource_type="Measure")


def _search(user: User, params: dict[str, list[str]]) -> QuerySet[FhirResource]:
    report_scope_for(user)
    _ensure_measures()
    rows = current_rows("Measure")
    definitions = _definitions()
    for value in params.get("url", []):
        urls = set(value.split(","))
        rows = rows.filter(logical_id__in=[i for i, d in definitions.items() if d["url"] in urls])
    for value in params.get("name", []):
        names = {n.lower() for n in value.split(",") if n}
        rows = rows.filter(
            logical_id__in=[i for i, d in definitions.items() if _name_matches(d, names)]
        )
    return rows


# --------------------------------------------------------------------------- $evaluate-measure


def _fhir_date(raw: str, name: str, *, end: bool) -> date:
    """A FHIR date (YYYY, YYYY-MM, YYYY-MM-DD); an end is the last day it covers."""
    match = _FHIR_DATE.match(raw)
    if not match:
        raise FhirError(
            400, "invalid", f"{name} must be a FHIR date (YYYY[-MM[-DD]]), not {raw!r}."
        )
    year, month, day = int(match[1]), match[2], match[3]
    try:
        if day is not None:
            return date(year, int(month), int(day))
        if month is not None:
            last = calendar.monthrange(year, int(month))[1]
            return date(year, int(month), last if end else 1)
        return date(year, 12, 31) if end else date(year, 1, 1)
    except ValueError as exc:
        raise FhirError(400, "invalid", f"{name} {raw!r} is not a valid date.") from exc


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = [v for v in params.get(name, []) if v != ""]
    if len(values) > 1:
        raise FhirError(400, "invalid", f"{name} may be given once.")
    return values[0] if values else None


def _filters(params: dict[str, list[str]]) -> tuple[Any, dict[str, str]]:
    unknown = sorted(set(params) - _KNOWN_PARAMS)
    if unknown:
        raise FhirError(
            400, "not-supported", f"Unknown $evaluate-measure parameters: {', '.join(unknown)}."
        )
    start_raw, end_raw = _one(params, "periodStart"), _one(params, "periodEnd")
    if start_raw is None or end_raw is None:
        raise FhirError(400, "required", "periodStart and periodEnd are required.")
    report_type = _one(params, "reportType") or "summary"
    if report_type != "summary":
        raise FhirError(
            422,
            "not-supported",
            f"reportType {report_type!r}: only summary reports (aggregates) are produced.",
        )
    start = _fhir_date(start_raw, "periodStart", end=False)
    end = _fhir_date(end_raw, "periodEnd", end=True)
    query: dict[str, str] = {"from": start.isoformat(), "to": end.isoformat()}
    used: dict[str, str] = {}
    subject = _one(params, "subject")
    if subject is not None:
        kind, _, facility = subject.partition("/")
        # An id as the registry writes it: Organization/07 is not Organization/7.
        if kind != "Organization" or written_int(facility) is None:
            raise FhirError(
                400, "invalid", "subject must be Organization/<id> (the requesting facility)."
            )
        query["facility"] = facility
        used["subject"] = subject
    for name, rest_name in _DIMENSIONS.items():
        value = _one(params, name)
        if value is not None:
            query[rest_name] = value
            used[name] = value
    try:
        filters = filters_parse(query)
    except ApplicationError as exc:
        errors = exc.extra.get("errors") or {}
        names = {v: k for k, v in _DIMENSIONS.items()} | {"from": "periodStart", "to": "periodEnd"}
        detail = "; ".join(f"{names.get(k, k)}: {v}" for k, v in errors.items())
        raise FhirError(400, "invalid", f"{exc.message} {detail}".strip()) from exc
    return filters, used


def _absent() -> dict[str, Any]:
    return {"extension": [{"url": DATA_ABSENT, "valueCode": "masked"}]}


def _score(version: str, value: Any, scoring: str, suppressed: bool) -> dict[str, Any]:
    """The figure of a group or stratum: a population count (cohort) or a measure score."""
    if scoring == "cohort":
        population: dict[str, Any] = {
            "code": {"coding": [{"system": POPULATION, "code": "initial-population"}]}
        }
        if value is None:
            population["_count"] = _absent()
        else:
            population["count"] = int(value)
        return {"population": [population]}
    key = "measureScoreQuantity" if version == R5 else "measureScore"
    if value is None:
        # Hidden by suppression, or a rate without a denominator (not applicable).
        reason = "masked" if suppressed else "not-applicable"
        return {key: {"extension": [{"url": DATA_ABSENT, "valueCode": reason}]}}
    quantity: dict[str, Any] = {"value": value}
    if scoring == "proportion":
        quantity.update({"unit": "1", "system": "http://unitsofmeasure.org", "code": "1"})
    return {key: quantity}


def _stratum_value(version: str, stratum: dict[str, Any]) -> dict[str, Any]:
    text = ", ".join(f"{name}: {label}" for name, label in stratum.items())
    concept = {"text": text}
    return {"valueCodeableConcept": concept} if version == R5 else {"value": concept}


def _measure_report(
    call: OperationCall,
    definition: dict[str, Any],
    group_data: dict[str, Any],
    data: dict[str, Any],
    stratifier: list[str],
    used: dict[str, str],
) -> dict[str, Any]:
    version, scoring = call.version, definition["scoring"]
    # Masked is per figure (the hook's own ``suppressed``): a ministry rate whose
    # denominator is 0 is not-applicable, not masked.
    suppression_applies = bool(data.get("suppression"))
    group: dict[str, Any] = {
        "code": {
            "coding": [{"system": METRIC_SYSTEM, "code": definition["name"]}],
            "text": definition["title"],
        },
        **_score(version, group_data.get("value"), scoring, bool(group_data.get("suppressed"))),
    }
    if stratifier:
        label = ", ".join(stratifier)
        group["stratifier"] = [
            {
                "code": {"text": label} if version == R5 else [{"text": label}],
                "stratum": [
                    {
                        **_stratum_value(version, s["stratum"]),
                        **_score(version, s.get("value"), scoring, bool(s.get("suppressed"))),
                    }
                    for s in group_data.get("strata", [])
                ],
            }
        ]
    extensions: list[dict[str, Any]] = [
        {"url": FILTER_EXTENSION, "valueString": f"{name}={value}"}
        for name, value in used.items()
        if name != "subject"
    ]
    if suppression_applies:
        extensions.append(
            {"url": SUPPRESSION_EXTENSION, "valueInteger": int(data["suppression"]["min_cell"])}
        )
    period = data["period"]
    report: dict[str, Any] = {
        "resourceType": "MeasureReport",
        "id": uuid.uuid4().hex,
        **({"extension": extensions} if extensions else {}),
        "status": "complete",
        "type": "summary",
        "measure": definition["url"],
        **({"subject": {"reference": used["subject"]}} if "subject" in used else {}),
        "date": fhir_instant(timezone.now()),
        "period": {"start": period["start"], "end": period["end"]},
        "group": [group],
    }
    if version == R5:
        report["scoring"] = {"coding": [{"system": SCORING, "code": scoring}]}
    return report


def evaluate_measure(call: OperationCall) -> OperationAnswer:
    """``GET Measure/{id}/$evaluate-measure``: a summary MeasureReport of the metric."""
    assert call.logical_id is not None
    user = call.user
    report_scope_for(user)
    definition = _definitions().get(call.logical_id)
    if definition is None:
        raise FhirError(404, "not-found", f"Measure/{call.logical_id} is not known.")
    filters, used = _filters(call.params)
    data = measure_report_data(user, filters)
    group_data = next((g for g in data["groups"] if g["measure"] == definition["url"]), None)
    if group_data is None:
        raise FhirError(
            422,
            "not-supported",
            f"Measure/{call.logical_id} is defined, but the reports hook does not evaluate it "
            "(response times: /api/v1/reports/response-times/).",
        )
    report = _measure_report(call, definition, group_data, data, list(filters.by), used)
    return OperationAnswer(dumps(report))


# --------------------------------------------------------------------------- registration


def register_all() -> None:
    handlers.register(
        ResourceHandler(
            "Measure",
            (handlers.READ, handlers.VREAD, handlers.SEARCH),
            documentation="One Measure per report metric (reports.metrics), for accounts "
            "with a reporting role (the reports app's rules).",
            search_params=(
                handlers.SearchParam(
                    "url",
                    "uri",
                    "The Measure's canonical URL (urn:consilium:measure:<code>).",
                    "http://hl7.org/fhir/SearchParameter/Measure-url",
                ),
                handlers.SearchParam(
                    "name",
                    "string",
                    "Contained (case-insensitive) in the metric code, the Measure name or its title.",
                    "http://hl7.org/fhir/SearchParameter/Measure-name",
                ),
            ),
            search=_search,
            visible=_visible,
            renders_all_versions=True,
        )
    )
    handlers.register_operation(
        Operation(
            name="evaluate-measure",
            level=handlers.INSTANCE_LEVEL,
            resource_type="Measure",
            func=evaluate_measure,
            definition="http://hl7.org/fhir/OperationDefinition/Measure-evaluate-measure",
            documentation="periodStart, periodEnd (FHIR dates, required); reportType summary; "
            "subject=Organization/<id> (requesting facility); country, province, tier, hub, "
            "specialty, campaign, cross-border, stratifier (one of the reports' groupings; "
            "aggregate-only accounts: one), grain (day|week|month|quarter|year).",
        )
    )
