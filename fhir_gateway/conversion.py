"""R4 <-> R5 renderings of one resource version.

Every stored version keeps a rendering per FHIR version we speak, made once when it is
written, so reads and outbound deliveries in either version splice stored text. The
referral and registry resources are written with both renderings by their mappings
(``store_version(renderings=...)``); no converter is registered today. A resource stored
without renderings gets the other version only from a converter registered here; without
one it is served only in the version it was written in, and a payload outbox message of it
to an endpoint of the other version is dead (no rendering).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Converter = Callable[[dict[str, Any]], dict[str, Any]]

# (resource_type, from_version, to_version) -> converter of the JSON object.
CONVERTERS: dict[tuple[str, str, str], Converter] = {}


def register_converter(
    resource_type: str, from_version: str, to_version: str
) -> Callable[[Converter], Converter]:
    def decorate(func: Converter) -> Converter:
        CONVERTERS[(resource_type, from_version, to_version)] = func
        return func

    return decorate


def render_for_version(
    resource: dict[str, Any], from_version: str, to_version: str
) -> dict[str, Any] | None:
    """The resource in another FHIR version; None when no rendering exists."""
    if from_version == to_version:
        return resource
    converter = CONVERTERS.get((str(resource.get("resourceType")), from_version, to_version))
    return None if converter is None else converter(resource)
