"""FHIR version negotiation (https://hl7.org/fhir/R5/versioning.html#mt-version).

The version is the ``fhirVersion`` parameter of the ``application/fhir+json`` media type in
``Accept`` (the answer) and ``Content-Type`` (the body). We speak R4 (4.0, 4.0.1; validated
with fhir.resources' R4B models, which are structurally R4 for the types we accept) and
R5 (5.0, 5.0.0; fhir.resources' default models). Without a parameter the answer is R4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fhir_gateway.outcomes import FhirError

if TYPE_CHECKING:
    from django.http import HttpRequest
    from fhir_core.fhirabstractmodel import FHIRAbstractModel

R4 = "4.0"
R5 = "5.0"
SUPPORTED_VERSIONS: tuple[str, ...] = (R4, R5)
DEFAULT_VERSION = R4

# What a member may write in fhirVersion, and what it means to us.
_VERSION_ALIASES: dict[str, str] = {
    "4.0": R4,
    "4.0.0": R4,
    "4.0.1": R4,
    "5.0": R5,
    "5.0.0": R5,
}
# Full release numbers, for CapabilityStatement.fhirVersion.
RELEASE: dict[str, str] = {R4: "4.0.1", R5: "5.0.0"}

FHIR_JSON = "application/fhir+json"
# Media types we read and write as FHIR JSON. application/json is common in the wild.
JSON_TYPES = frozenset({FHIR_JSON, "application/json", "application/json+fhir"})
# ``_format`` takes what Accept takes (JSON_TYPES), and ``json``.
_FORMAT_ALIASES = {"json": FHIR_JSON, **dict.fromkeys(JSON_TYPES, FHIR_JSON)}
_MEDIA_RANGE = re.compile(r"^\s*([^;\s]+)\s*(.*)$")


def normalise_version(raw: str) -> str | None:
    """'4.0.1' -> '4.0'; None when we do not speak it."""
    return _VERSION_ALIASES.get(raw.strip().strip('"'))


@dataclass(frozen=True)
class MediaRange:
    media_type: str
    params: dict[str, str]
    q: float


def parse_media_range(text: str) -> MediaRange | None:
    """A media range or Content-Type: its type (lower case), parameters, q; None when empty."""
    match = _MEDIA_RANGE.match(text)
    if not match or not match.group(1):
        return None
    media_type = match.group(1).lower()
    params: dict[str, str] = {}
    for part in match.group(2).split(";"):
        if "=" in part:
            key, _, value = part.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
    try:
        q = float(params.pop("q", "1"))
    except ValueError:
        q = 1.0
    return MediaRange(media_type, params, q)


def _accepts_json(media_type: str) -> bool:
    return media_type in JSON_TYPES or media_type in {"*/*", "application/*"}


def response_version(request: HttpRequest) -> str:
    """The FHIR version to answer in, from ``_format`` or ``Accept``; 406 when impossible."""
    fmt = request.GET.get("_format")
    if fmt is not None:
        parsed = parse_media_range(fmt)
        media = _FORMAT_ALIASES.get(parsed.media_type if parsed else "")
        if parsed is None or media is None:
            raise FhirError(406, "not-supported", f"_format {fmt!r} is not supported; use json.")
        return _version_of(parsed, status=406)
    accept = request.headers.get("Accept", "").strip()
    if not accept:
        return DEFAULT_VERSION
    ranges = [r for r in (parse_media_range(p) for p in accept.split(",")) if r is not None]
    ranges.sort(key=lambda r: r.q, reverse=True)
    unsupported_version: str | None = None
    for media_range in ranges:
        if media_range.q <= 0 or not _accepts_json(media_range.media_type):
            continue
        raw = media_range.params.get("fhirversion")
        if raw is None:
            return DEFAULT_VERSION
        version = normalise_version(raw)
        if version is not None:
            return version
        unsupported_version = raw
    if unsupported_version is not None:
        raise FhirError(
            406,
            "not-supported",
            f"FHIR version {unsupported_version} is not supported; "
            f"this server speaks {', '.join(SUPPORTED_VERSIONS)}.",
        )
    raise FhirError(406, "not-supported", f"Cannot answer in {accept!r}; use {FHIR_JSON}.")


def binary_answer_version(request: HttpRequest, content_type: str) -> str | None:
    """How to answer a read of a Binary whose bytes are ``content_type``: the FHIR version
    of a ``Binary`` resource (base64 data) when ``_format`` or the preferred ``Accept``
    range is FHIR JSON; None for the raw bytes (no Accept, ``*/*``, the type or its
    ``type/*``); 406 when the caller accepts neither."""
    if request.GET.get("_format") is not None:
        return response_version(request)
    accept = request.headers.get("Accept", "").strip()
    if not accept:
        return None
    ranges = [r for r in (parse_media_range(p) for p in accept.split(",")) if r is not None]
    ranges.sort(key=lambda r: r.q, reverse=True)  # stable: header order among equals
    main = content_type.partition("/")[0]
    unsupported: FhirError | None = None
    for media_range in ranges:
        if media_range.q <= 0:
            continue
        if media_range.media_type in JSON_TYPES:
            try:
                return _version_of(media_range, status=406)
            except FhirError as exc:  # a version we do not speak: the next range, as reads do
                unsupported = unsupported or exc
                continue
        if media_range.media_type in {"*/*", f"{main}/*", content_type}:
            return None
    if unsupported is not None:
        raise unsupported
    raise FhirError(
        406,
        "not-supported",
        f"Cannot answer in {accept!r}: this Binary is {content_type} (or ask for {FHIR_JSON}).",
    )


def _version_of(media_range: MediaRange, *, status: int) -> str:
    raw = media_range.params.get("fhirversion")
    if raw is None:
        return DEFAULT_VERSION
    version = normalise_version(raw)
    if version is None:
        raise FhirError(
            status,
            "not-supported",
            f"FHIR version {raw} is not supported; this server speaks "
            f"{', '.join(SUPPORTED_VERSIONS)}.",
        )
    return version


def body_version(request: HttpRequest, *, default: str) -> str:
    """The FHIR version of the request body, from ``Content-Type``; 415 when unsupported.

    Without a fhirVersion parameter the body is read in ``default`` (the answer's version),
    so a client that says only ``Accept: ...; fhirVersion=5.0`` talks R5 both ways.
    """
    content_type = request.headers.get("Content-Type", "")
    parsed = parse_media_range(content_type)
    if parsed is None or parsed.media_type not in JSON_TYPES:
        raise FhirError(
            415,
            "not-supported",
            f"Content-Type {content_type or '(none)'!r} is not supported; use {FHIR_JSON}.",
        )
    return version_from_params(parsed, default=default, status=415)


def version_from_params(media_range: MediaRange, *, default: str, status: int) -> str:
    """The ``fhirVersion`` parameter of a body's media type, ``default`` without one;
    ``status`` (415) for a version we do not speak."""
    if "fhirversion" not in media_range.params:
        return default
    return _version_of(media_range, status=status)


def media_type_for(version: str) -> str:
    return f"{FHIR_JSON}; fhirVersion={version}"


def model_class(resource_type: str, version: str) -> type[FHIRAbstractModel]:
    """The fhir.resources model for a resource type in a FHIR version (ValueError if none)."""
    if version == R4:
        from fhir.resources.R4B import get_fhir_model_class as get_class
    elif version == R5:
        from fhir.resources import get_fhir_model_class as get_class
    else:
        raise ValueError(f"unsupported FHIR version {version}")
    return get_class(resource_type)
