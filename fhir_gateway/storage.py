"""Stored canonical JSON (decision 2): every version we serve is validated and serialised
once, when written; reads return the stored text.

Writes: ``resource_create`` (with ``If-None-Exist``), ``conditional_create`` (the
If-None-Exist key of a referral's messages), ``resource_update`` (with ``If-Match``),
``resource_delete`` and ``store_version`` (the primitive the registry projection uses).
Reads: ``resource_current``, ``resource_version``, ``resource_history``.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import pydantic
from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.http import parse_etags, parse_http_date_safe

from core.rows import insert_rows
from fhir_gateway.codes import check_bound_codes
from fhir_gateway.conversion import render_for_version
from fhir_gateway.models import CreateKey, FhirResource, FhirSearchToken
from fhir_gateway.outcomes import FhirError
from fhir_gateway.versions import SUPPORTED_VERSIONS, model_class

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ETAG = re.compile(r'^\s*(?:W/)?"?([0-9]{1,9})"?\s*$')

TokenList = list[tuple[str, str, str]]  # (param, system, value)
TokenExtractor = Callable[[dict[str, Any]], TokenList]


def dumps(obj: Any) -> str:
    """Compact JSON; the one serialiser for JSON we build ourselves."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def content_hash(resource: dict[str, Any]) -> str:
    """sha256 of a resource without ``meta`` (what changes when the content changes)."""
    body = {k: v for k, v in resource.items() if k != "meta"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def fhir_instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- validation


def validate_resource(resource: dict[str, Any], version: str) -> Any:
    """Validate with the fhir.resources model of ``version``; 400/422 OperationOutcome if not.

    Returns the model instance (the caller serialises it once).
    """
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise FhirError(400, "structure", "The body has no resourceType.")
    try:
        cls = model_class(resource_type, version)
    except (ValueError, KeyError) as exc:
        raise FhirError(400, "invalid", f"Unknown resource type {resource_type!r}.") from exc
    try:
        model = cls.model_validate(resource)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
        raise FhirError(
            400,
            "structure",
            f"{resource_type} is not valid FHIR {version}: "
            f"{where + ': ' if where else ''}{first.get('msg', 'invalid')}"
            + (f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""),
            expression=[f"{resource_type}.{where}"] if where else None,
        ) from exc
    except (ValueError, TypeError, AttributeError) as exc:  # a validator met an odd type
        raise FhirError(400, "structure", f"{resource_type} is not valid: {exc}") from exc
    except RecursionError as exc:  # bodies are depth-checked; a patched or stored one may not be
        raise FhirError(400, "structure", f"{resource_type} is nested too deeply.") from exc
    check_bound_codes(resource, version)
    return model


def _with_meta(resource: dict[str, Any], version_id: int, moment: datetime) -> dict[str, Any]:
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(version_id)
    meta["lastUpdated"] = fhir_instant(moment)
    out = {"resourceType": resource["resourceType"]}
    if "id" in resource:
        out["id"] = resource["id"]
    out["meta"] = meta
    out.update({k: v for k, v in resource.items() if k not in out})
    return out


def render_all(resource: dict[str, Any], version: str, *, validate: bool = True) -> dict[str, str]:
    """Validated, serialised text of a resource in every version it can be rendered in."""
    texts: dict[str, str] = {}
    for target in SUPPORTED_VERSIONS:
        rendered = render_for_version(resource, version, target)
        if rendered is None:
            continue
        if validate:
            model = validate_resource(rendered, target)
            texts[target] = model.model_dump_json(exclude_none=True)
        else:
            texts[target] = dumps(rendered)
    return texts


# --------------------------------------------------------------------------- tokens

# Extra token params per resource type: (the params it yields, the extractor).
# ``identifier`` is indexed for every type.
TOKEN_EXTRACTORS: dict[str, tuple[frozenset[str], TokenExtractor]] = {}


def _identifier_tokens(resource: dict[str, Any]) -> TokenList:
    found = resource.get("identifier")
    items = found if isinstance(found, list) else [found] if isinstance(found, dict) else []
    return [
        ("identifier", str(i.get("system") or ""), str(i["value"]))
        for i in items
        if isinstance(i, dict) and i.get("value")
    ]


def indexed_params(resource_type: str) -> set[str]:
    params = {"identifier"}
    if resource_type in TOKEN_EXTRACTORS:
        params |= TOKEN_EXTRACTORS[resource_type][0]
    return params


def _index_tokens(
    row: FhirResource, resource: dict[str, Any] | None, previous_pk: int | None
) -> None:
    # Tokens describe current versions only.
    if previous_pk is not None:
        FhirSearchToken.objects.filter(resource_id=previous_pk).delete()
    if resource is None:
        return
    tokens = _identifier_tokens(resource)
    if row.resource_type in TOKEN_EXTRACTORS:
        tokens += TOKEN_EXTRACTORS[row.resource_type][1](resource)
    add_tokens(row, tokens)


def coding_tokens(param: str, concepts: list[Any]) -> TokenList:
    """``param`` tokens of the codings of CodeableConcepts (system, code; a coding without
    a code names nothing)."""
    return [
        (param, str(coding.get("system") or ""), str(coding["code"]))
        for concept in concepts
        if isinstance(concept, dict)
        for coding in concept.get("coding") or []
        if isinstance(coding, dict) and coding.get("code")
    ]


def add_tokens(row: FhirResource, tokens: TokenList) -> None:
    """Index ``tokens`` for ``row`` (also for a version stored with ``index_tokens=False``
    whose own elements a search reads: a case file's ``type``)."""
    FhirSearchToken.objects.bulk_create(
        FhirSearchToken(
            resource=row,
            resource_type=row.resource_type,
            param=param,
            system=system[:255],
            value=value[:255],
        )
        for param, system, value in dict.fromkeys(tokens)
    )


def split_escaped(raw: str, separator: str, limit: int = -1) -> list[str]:
    r"""``raw`` split on the ``separator`` characters FHIR search does not escape (``\,``
    ``\|`` ``\$`` ``\\`` keep theirs); the parts keep their escapes (``unescape``)."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in raw:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == separator and limit != len(parts):
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def unescape(part: str) -> str:
    r"""FHIR search's escapes undone: ``\,`` ``\|`` ``\$`` ``\\`` are the characters."""
    return re.sub(r"\\([,|$\\])", r"\1", part)


def parse_token(raw: str) -> tuple[str | None, str]:
    r"""'system|value' -> (system, value); '|value' -> ('', value); 'value' -> (None, value);
    FHIR's escapes (``\|``, ``\,``) stand for the characters."""
    parts = split_escaped(raw, "|", limit=1)
    if len(parts) == 2:
        return unescape(parts[0]), unescape(parts[1])
    return None, unescape(raw)


# Identifier.use (a required binding, the same in R4 and R5).
IDENTIFIER_USES = frozenset({"usual", "official", "temp", "secondary", "old"})


def pruned(value: Any) -> Any:
    """A JSON value without nulls and empty objects / arrays (FHIR JSON has neither)."""
    if isinstance(value, dict):
        kept = {k: pruned(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [v for v in (pruned(v) for v in value) if v not in (None, {}, [])]
    return value


def clean_identifiers(items: Any, where: str) -> list[dict[str, Any]]:
    """A member's ``identifier`` elements as they are stored: nulls and empty objects
    dropped (FHIR JSON allows neither), empty identifiers left out; 400 for a ``use``
    outside its value set or a system or value over 255 characters (what the search
    index and the If-None-Exist key hold); 422 ``business-rule`` for an ``assigner``
    naming a Bundle entry or a contained resource (``urn:`` / ``#``: nothing we store
    resolves it)."""
    if not isinstance(items, list):
        return []
    cleaned: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        identifier = pruned(item) if isinstance(item, dict) else None
        if not identifier:
            continue
        at = f"{where}[{index}]"
        if "use" in identifier and identifier["use"] not in IDENTIFIER_USES:
            raise FhirError(
                400,
                "code-invalid",
                f"{at}.use {identifier['use']!r} is not in the required value set "
                f"({', '.join(sorted(IDENTIFIER_USES))}).",
                expression=[f"{at}.use"],
            )
        for element in ("system", "value"):
            text = identifier.get(element)
            if isinstance(text, str) and (len(text) > _KEY_LENGTH or "\x00" in text):
                raise FhirError(
                    400,
                    "invalid",
                    f"{at}.{element} must be at most {_KEY_LENGTH} characters, without NUL.",
                    expression=[f"{at}.{element}"],
                )
        assigner = identifier.get("assigner")
        reference = assigner.get("reference") if isinstance(assigner, dict) else None
        if isinstance(reference, str) and reference.startswith(("urn:", "#")):
            raise FhirError(
                422,
                "business-rule",
                f"{at}.assigner.reference {reference!r} cannot be kept: name the assigner "
                "by a resource URL or a display.",
                expression=[f"{at}.assigner.reference"],
            )
        cleaned.append(identifier)
    return cleaned


def current_rows(resource_type: str) -> QuerySet[FhirResource]:
    return FhirResource.objects.filter(resource_type=resource_type, is_current=True, deleted=False)


def token_matches(resource_type: str, param: str, raw: str) -> QuerySet[FhirSearchToken]:
    """The indexed tokens matching one search value (alternatives OR-ed by commas):
    ``system|value``, ``|value`` (no system), ``value`` (any system) or ``system|`` (any
    value of that system, FHIR's rule; ``|`` alone names nothing)."""
    tokens = FhirSearchToken.objects.filter(resource_type=resource_type, param=param)
    any_system: set[str] = set()
    any_value: set[str] = set()
    with_system: set[tuple[str, str]] = set()
    for alternative in split_escaped(raw, ","):
        system, value = parse_token(alternative)
        if system is None:
            any_system.add(value)
        elif value == "":
            if system:
                any_value.add(system)
        else:
            with_system.add((system, value))
    # One OR of all the alternatives, built at once (OR-ing querysets one by one took
    # quadratic time: 1,000 alternatives, 6 s).
    alternatives = [Q(value__in=sorted(any_system))] if any_system else []
    alternatives += [Q(system__in=sorted(any_value))] if any_value else []
    alternatives += [Q(system=system, value=value) for system, value in sorted(with_system)]
    if not alternatives:
        return FhirSearchToken.objects.none()
    return tokens.filter(Q(*alternatives, _connector=Q.OR))


def rows_matching_tokens(
    resource_type: str, criteria: Iterable[tuple[str, str]]
) -> QuerySet[FhirResource]:
    """Current resources matching every (param, token) criterion (values OR-ed by commas)."""
    rows = current_rows(resource_type)
    for param, raw in criteria:
        if param not in indexed_params(resource_type):
            raise FhirError(
                400, "not-supported", f"Cannot search {resource_type} by {param!r} here."
            )
        rows = rows.filter(pk__in=token_matches(resource_type, param, raw).values("resource_id"))
    return rows


# --------------------------------------------------------------------------- writes


@dataclass(frozen=True)
class WriteResult:
    row: FhirResource
    created: bool  # a new resource (201) rather than a new version or an existing match
    # Other referrals the write moved on (a counter-referral: the original), for the audit.
    transitioned: tuple[tuple[int, str], ...] = ()  # (referral pk, workflow action)
    # What the caller should know although the write succeeded (an idempotent resubmission
    # that said otherwise than the first): a warning issue's diagnostics.
    warning: str | None = None
    # An update that found the resource as sent: the current version answered, none stored.
    unchanged: bool = False


def _lock(key: str) -> None:
    """A transaction-scoped lock on a name (PostgreSQL); SQLite serialises writers anyway."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [key])


def _locked_current(resource_type: str, logical_id: str) -> FhirResource | None:
    return (
        FhirResource.objects.select_for_update()
        .filter(resource_type=resource_type, logical_id=logical_id, is_current=True)
        .first()
    )


def store_version(
    *,
    resource_type: str,
    logical_id: str,
    resource: dict[str, Any] | None,
    fhir_version: str,
    renderings: dict[str, dict[str, Any]] | None = None,
    validate: bool = True,
    source_pk: int | None = None,
    hash_value: str = "",
    expected_version: int | None = None,
    now: datetime | None = None,
    index_tokens: bool = True,
) -> FhirResource:
    """Append a version (``resource=None`` for a deletion). Call inside ``transaction.atomic``.

    ``renderings`` gives the resource per FHIR version when the caller built them itself
    (the projection); otherwise they come from ``resource`` via ``render_for_version``.
    ``expected_version`` (from If-Match) must equal the current version or 412.
    ``index_tokens=False`` for types whose searches do not use the token table (the
    referral resources search the referral tables).
    """
    if not FHIR_ID.match(logical_id):
        raise FhirError(400, "invalid", f"{logical_id!r} is not a valid FHIR id.")
    now = now or timezone.now()
    # Stored at the precision meta.lastUpdated shows, so the column and the JSON agree.
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    _lock(f"fhir:{resource_type}/{logical_id}")
    current = _locked_current(resource_type, logical_id)
    if expected_version is not None:
        actual = current.version_id if current else None
        if actual != expected_version:
            raise FhirError(
                412,
                "conflict",
                f"{resource_type}/{logical_id} is at version {actual or 'none'}, "
                f"not {expected_version}.",
            )
    version_id = (current.version_id if current else 0) + 1
    texts: dict[str, str] = {}
    if resource is not None:
        if renderings is None:
            source = _with_meta({**resource, "id": logical_id}, version_id, now)
            texts = render_all(source, fhir_version, validate=validate)
        else:
            for target, rendered in renderings.items():
                # Our own renderings are canonical as built: validated, then stored as
                # they are (the models' dump wrote instants with microseconds, unlike
                # every other resource's meta.lastUpdated).
                source = _with_meta({**rendered, "id": logical_id}, version_id, now)
                if validate:
                    validate_resource(source, target)
                texts[target] = dumps(source)
    if current is not None:
        FhirResource.objects.filter(pk=current.pk).update(is_current=False)
    row = FhirResource.objects.create(
        resource_type=resource_type,
        logical_id=logical_id,
        version_id=version_id,
        last_updated=now,
        fhir_version=fhir_version,
        json_r4=texts.get("4.0", ""),
        json_r5=texts.get("5.0", ""),
        content_hash=hash_value,
        is_current=True,
        deleted=resource is None,
        source_pk=source_pk if source_pk is not None else (current.source_pk if current else None),
    )
    if index_tokens:
        _index_tokens(row, resource, current.pk if current else None)
    return row


def store_first_versions(
    items: list[tuple[dict[str, dict[str, Any]], str]],
    *,
    fhir_version: str,
    source_pk: int | None = None,
    now: datetime | None = None,
) -> list[FhirResource]:
    """Version 1 of several resources that cannot exist yet (ids minted in this
    transaction, e.g. a new referral's filler id), in one INSERT: no advisory lock and no
    current-row lookup. Each item is (renderings per FHIR version, content hash); stored
    without validation like ``store_version(validate=False, index_tokens=False)``. The
    unique constraints still refuse a duplicate (IntegrityError → 409)."""
    rows = first_version_rows(items, fhir_version=fhir_version, source_pk=source_pk, now=now)
    ids = insert_rows(FhirResource, rows, returning_ids=True)
    return stored_rows([FhirResource(**values) for values in rows], ids)


def first_version_rows(
    items: list[tuple[dict[str, dict[str, Any]], str]],
    *,
    fhir_version: str,
    source_pk: int | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """The rows ``store_first_versions`` inserts (for a caller inserting them with others:
    ``core.rows.insert_many``, then ``stored_rows``)."""
    now = now or timezone.now()
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    rows = []
    for renderings, hash_value in items:
        first = next(iter(renderings.values()))
        resource_type, logical_id = first["resourceType"], first["id"]
        if not FHIR_ID.match(logical_id):
            raise FhirError(400, "invalid", f"{logical_id!r} is not a valid FHIR id.")
        texts = {
            target: dumps(_with_meta({**rendered, "id": logical_id}, 1, now))
            for target, rendered in renderings.items()
        }
        rows.append(
            {
                "resource_type": resource_type,
                "logical_id": logical_id,
                "version_id": 1,
                "last_updated": now,
                "fhir_version": fhir_version,
                "json_r4": texts.get("4.0", ""),
                "json_r5": texts.get("5.0", ""),
                "content_hash": hash_value,
                "is_current": True,
                "deleted": False,
                "source_pk": source_pk,
            }
        )
    return rows


def stored_rows(rows: list[FhirResource], ids: list[int]) -> list[FhirResource]:
    """Instances of inserted ``first_version_rows``, given their new ids (as saved)."""
    for row, pk in zip(rows, ids, strict=True):
        row.pk = pk
        row._state.adding, row._state.db = False, connection.alias
    return rows


def none_match(header: str, version_id: int) -> bool:
    """``If-None-Match`` names the current version (RFC 9110's weak comparison: ``"2"``
    and ``W/"2"`` alike; a list; ``*``, any version)."""
    tags = parse_etags(header.strip()) if header.strip() else []
    return "*" in tags or f'"{version_id}"' in {t.removeprefix("W/") for t in tags}


def unmodified_since(header: str, last_updated: datetime) -> bool:
    """``If-Modified-Since`` is a valid HTTP date no earlier than ``last_updated`` to the
    second (``Last-Modified`` has seconds: the value it sent is not earlier). An invalid
    date is ignored (RFC 9110 13.1.3), as is the header when ``If-None-Match`` is sent
    (the caller checks that first)."""
    since = parse_http_date_safe(header.strip()) if header.strip() else None
    return since is not None and int(last_updated.timestamp()) <= since


def parse_if_match(raw: str) -> int | None:
    """The version an ``If-Match`` names; None for ``*`` (any current version, RFC 9110)."""
    if raw.strip() == "*":
        return None
    match = _ETAG.match(raw)
    if not match:
        raise FhirError(400, "invalid", f'If-Match {raw!r} is not a version ETag (such as W/"3").')
    return int(match.group(1))


def resource_create(
    *,
    resource: dict[str, Any],
    fhir_version: str,
    if_none_exist: str | None = None,
    logical_id: str | None = None,
) -> WriteResult:
    """Create a resource (server-assigned id unless given).

    With ``If-None-Exist`` (a search on indexed tokens, e.g. ``identifier=sys|123``): one
    match answers that resource and stores nothing; several matches are 412.
    """
    resource_type = str(resource.get("resourceType", ""))
    with transaction.atomic():
        if if_none_exist:
            criteria = parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True)
            if not criteria:
                raise FhirError(400, "invalid", "If-None-Exist has no search parameters.")
            # Two concurrent creates with the same criteria must not both create.
            _lock(f"fhir-create:{resource_type}?{sorted(criteria)}")
            matches = list(rows_matching_tokens(resource_type, criteria)[:2])
            if len(matches) > 1:
                raise FhirError(
                    412, "multiple-matches", f"If-None-Exist {if_none_exist!r} matches several."
                )
            if matches:
                return WriteResult(matches[0], created=False)
        row = store_version(
            resource_type=resource_type,
            logical_id=logical_id or uuid.uuid4().hex,
            resource=resource,
            fhir_version=fhir_version,
        )
    return WriteResult(row, created=True)


_KEY_LENGTH = 255


def create_key(if_none_exist: str, resource_type: str) -> tuple[str, str]:
    """``If-None-Exist: identifier=<system>|<value>`` on a message-like create -> the key.

    One identifier with both a system and a value (at most 255 characters each): a key the
    member made for this create (say, its own message id), not a search."""
    try:  # strict: two invalid escapes (%fe, %ff) must not both become U+FFFD, one key
        criteria = parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise FhirError(400, "invalid", "If-None-Exist is not UTF-8 once percent-decoded.") from exc
    if len(criteria) != 1 or criteria[0][0] != "identifier":
        raise FhirError(
            400,
            "not-supported",
            f"If-None-Exist on {resource_type} takes one identifier=<system>|<value>.",
        )
    raw = criteria[0][1]
    system, value = parse_token(raw)
    if not system or not value or len(split_escaped(raw, ",")) > 1:
        raise FhirError(
            400,
            "invalid",
            f"If-None-Exist on {resource_type} needs an identifier with a system and a value "
            "(system|value), one only.",
        )
    if "\x00" in raw or len(system) > _KEY_LENGTH or len(value) > _KEY_LENGTH:
        raise FhirError(
            400,
            "invalid",
            f"The If-None-Exist identifier's system and value must be at most {_KEY_LENGTH} "
            "characters, without NUL.",
        )
    return system, value


def conditional_create(
    *,
    resource_type: str,
    source_pk: int,
    facility_id: int,
    key: tuple[str, str],
    user: Any,
    create: Callable[[], WriteResult],
) -> WriteResult:
    """``create()`` once per (type, referral, party facility, ``key`` = the If-None-Exist
    identifier as ``create_key`` reads it): the first call makes the resource and records
    the key in the same transaction; a later one (a retry after a lost answer) answers
    what the first made, ``created=False``, and stores nothing. The caller checks first
    that the user may make it at all."""
    system, value = key
    with transaction.atomic():
        # Two concurrent retries: the second waits here, then finds the first's key.
        _lock(f"fhir-create-key:{resource_type}:{source_pk}:{facility_id}:{system}|{value}")
        made = (
            CreateKey.objects.filter(
                resource_type=resource_type,
                source_pk=source_pk,
                facility_id=facility_id,
                system=system,
                value=value,
            )
            .values_list("logical_id", flat=True)
            .first()
        )
        if made is not None:
            return WriteResult(resource_current(resource_type, made), created=False)
        result = create()
        record_create_keys(
            resource_type=resource_type,
            source_pk=source_pk,
            facility_id=facility_id,
            keys=[key],
            logical_id=result.row.logical_id,
            user=user,
        )
    return result


def record_create_keys(
    *,
    resource_type: str,
    source_pk: int,
    facility_id: int,
    keys: list[tuple[Any, Any]],
    logical_id: str,
    user: Any,
) -> None:
    """``keys`` (system, value; those without both are no key) now name ``logical_id``
    within the referral and party, except those that already name a resource: the first
    resource keeps a key (a plain create carrying an identifier used before, or one racing
    a conditional create; the conditional create's own key, recorded again, stays)."""
    usable = [(s, v) for s, v in dict.fromkeys(keys) if s and v]
    CreateKey.objects.bulk_create(
        [
            CreateKey(
                resource_type=resource_type,
                source_pk=source_pk,
                facility_id=facility_id,
                system=system,
                value=value,
                logical_id=logical_id,
                created_by=user,
            )
            for system, value in usable
        ],
        ignore_conflicts=True,
    )


# Elements that come before ``identifier`` in a resource's JSON (FHIR's element order).
_BEFORE_IDENTIFIER = (
    "resourceType", "id", "meta", "implicitRules", "language", "text", "contained",
    "extension", "modifierExtension",
)  # fmt: skip


def identify_new_resource(
    row: FhirResource,
    identifiers: list[dict[str, Any]],
    fhir_version: str,
    master: dict[str, Any] | None = None,
) -> FhirResource:
    """Carry the identifiers a member gave a resource it created (a Communication, a
    DocumentReference; ``clean_identifiers``) on the version that create stored: every
    rendering, and the token index (``identifier`` search). ``master``: an R4
    DocumentReference's ``masterIdentifier``, kept as that in R4 and as the first
    identifier in R5 (which has no such element; FHIR's R4/R5 conversion does the same).
    Only for a version 1 stored in the caller's transaction, which nobody has read yet (the
    outbox and the feed read the row when they send), so it is changed in place rather
    than given a second version. Each rendering is validated: identifiers valid in the
    request's ``fhir_version`` that another version cannot hold (an R5-only element) are
    422."""
    if not identifiers and master is None:
        return row
    if row.version_id != 1 or row.deleted:
        raise ValueError(f"{row} is not a resource this transaction created.")
    fields = {"4.0": "json_r4", "5.0": "json_r5"}
    r4: dict[str, Any] | None = None
    for version, field in fields.items():
        text = getattr(row, field)
        if not text:
            continue
        stored = json.loads(text)
        given = identifiers if master is None or version == "4.0" else [master, *identifiers]
        kept = [i for i in stored.get("identifier") or [] if i not in given]
        doc = {k: stored[k] for k in _BEFORE_IDENTIFIER if k in stored}
        if master is not None and version == "4.0":
            doc["masterIdentifier"] = master
        if kept or given:
            doc["identifier"] = kept + given
        doc.update({k: v for k, v in stored.items() if k not in doc})
        try:
            validate_resource(doc, version)
        except FhirError as exc:
            if version == fhir_version:
                raise
            raise FhirError(
                422,
                "not-supported",
                f"The identifiers cannot be rendered in FHIR {version}, which the other "
                f"member may speak: {exc.diagnostics}",
                expression=[f"{row.resource_type}.identifier"],
            ) from exc
        setattr(row, field, dumps(doc))
        if version == "4.0":
            r4 = doc
    if row.content_hash and r4 is not None:
        row.content_hash = content_hash(r4)
    row.save(update_fields=["json_r4", "json_r5", "content_hash"])
    every = identifiers if master is None else [master, *identifiers]
    add_tokens(row, _identifier_tokens({"identifier": every}))
    return row


def resource_update(
    *,
    resource_type: str,
    logical_id: str,
    resource: dict[str, Any],
    fhir_version: str,
    if_match: str | None = None,
) -> WriteResult:
    """A new version of an existing resource; 404 when there is none, 412 on If-Match."""
    expected = parse_if_match(if_match) if if_match else None
    with transaction.atomic():
        exists = FhirResource.objects.filter(
            resource_type=resource_type, logical_id=logical_id
        ).exists()
        if not exists:
            raise FhirError(
                404, "not-found", f"{resource_type}/{logical_id} does not exist; create it."
            )
        row = store_version(
            resource_type=resource_type,
            logical_id=logical_id,
            resource=resource,
            fhir_version=fhir_version,
            expected_version=expected,
        )
    return WriteResult(row, created=False)


def resource_delete(
    *, resource_type: str, logical_id: str, if_match: str | None = None
) -> FhirResource | None:
    """Append a deletion version; None when the resource does not exist or is deleted."""
    expected = parse_if_match(if_match) if if_match else None
    with transaction.atomic():
        # The name lock first, as store_version takes it (then the row): a delete and an
        # update of one resource queue up instead of deadlocking.
        _lock(f"fhir:{resource_type}/{logical_id}")
        current = _locked_current(resource_type, logical_id)
        if current is None or current.deleted:
            return None
        return store_version(
            resource_type=resource_type,
            logical_id=logical_id,
            resource=None,
            fhir_version=current.fhir_version,
            expected_version=expected,
        )


# --------------------------------------------------------------------------- reads


def resource_current(resource_type: str, logical_id: str) -> FhirResource:
    row = FhirResource.objects.filter(
        resource_type=resource_type, logical_id=logical_id, is_current=True
    ).first()
    if row is None:
        raise FhirError(404, "not-found", f"{resource_type}/{logical_id} is not known.")
    if row.deleted:
        raise FhirError(
            410,
            "deleted",
            f"{resource_type}/{logical_id} was deleted.",
            headers={"ETag": f'W/"{row.version_id}"'},
        )
    return row


def resource_version(resource_type: str, logical_id: str, version_id: int) -> FhirResource:
    row = FhirResource.objects.filter(
        resource_type=resource_type, logical_id=logical_id, version_id=version_id
    ).first()
    if row is None:
        raise FhirError(
            404, "not-found", f"{resource_type}/{logical_id} has no version {version_id}."
        )
    if row.deleted:
        raise FhirError(
            410, "deleted", f"Version {version_id} of {resource_type}/{logical_id} is a deletion."
        )
    return row


def resource_history(resource_type: str, logical_id: str) -> QuerySet[FhirResource]:
    rows = FhirResource.objects.filter(resource_type=resource_type, logical_id=logical_id)
    if not rows.exists():
        raise FhirError(404, "not-found", f"{resource_type}/{logical_id} is not known.")
    return rows.order_by("-version_id")
