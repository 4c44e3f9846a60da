"""``_summary`` and ``_elements`` (FHIR search result parameters, also on read, vread and
history).

The stored canonical JSON is served as it is unless one of them asks for less: then each
resource is parsed, cut down to the elements asked for, and tagged ``SUBSETTED`` (so that
nobody updates a resource from a subset). Which elements are "summary" or mandatory comes
from the version's fhir.resources model (R4B models for R4, default models for R5).

- ``_summary=true``: the summary and mandatory elements; ``text``: ``text`` and the
  mandatory elements; ``data``: everything but ``text``; ``count``: no resources, the total
  only (a search); ``false``: everything.
- ``_elements=a,b``: those top-level elements, plus the mandatory ones. A name without a
  type is the searched (or read) type's; ``Type.name`` is for that type's resources (an
  included one too). A type with no names listed is sent in full. A choice element goes by
  its name (``occurrence`` or ``occurrence[x]``: ``occurrenceDateTime``, ...).

Every subset keeps ``id``, ``meta``, ``implicitRules`` and ``modifierExtension`` (a
modifier changes the meaning of what is sent).

Not both at once (400), as FHIR says; an unknown element name is ignored, as FHIR allows.
Binary (raw reads) is read whole: a subset of it is 400.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from fhir_gateway.outcomes import FhirError
from fhir_gateway.storage import dumps
from fhir_gateway.versions import model_class

SUMMARY_MODES = ("true", "text", "data", "count", "false")
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
# Kept in every subset: who it is, and what changes the meaning of the rest (modifiers).
_ALWAYS = frozenset({"resourceType", "id", "meta", "implicitRules", "modifierExtension"})
_NAME = re.compile(
    r"^(?:(?P<type>[A-Z][A-Za-z]{1,63})\.)?(?P<element>[a-z][A-Za-z0-9]{0,63})(?:\[x\])?$"
)
MAX_ELEMENTS = 100


@dataclass(frozen=True)
class _Elements:
    summary: frozenset[str]  # summary elements, as JSON names
    required: frozenset[str]  # mandatory ones (min 1), primitive or complex
    choices: dict[str, frozenset[str]]  # value[x] -> valueString, valueQuantity, ...


@functools.cache
def _elements_of(resource_type: str, version: str) -> _Elements:
    try:
        model = model_class(resource_type, version)
    except (KeyError, LookupError, ValueError):
        return _Elements(frozenset(), frozenset(), {})
    summary: set[str] = set()
    required: set[str] = set()
    choices: dict[str, set[str]] = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        json_name = info.alias or name
        if extra.get("summary_element_property"):
            summary.add(json_name)
        # fhir.resources flags required primitives; required complex elements (a
        # ServiceRequest's subject) are required model fields.
        if extra.get("element_required") or info.is_required():
            required.add(json_name)
        if isinstance(extra.get("one_of_many"), str):
            choices.setdefault(str(extra["one_of_many"]), set()).add(json_name)
    required.discard("resourceType")
    return _Elements(
        frozenset(summary),
        frozenset(required),
        {base: frozenset(names) for base, names in choices.items()},
    )


@dataclass(frozen=True)
class Subset:
    summary: str = "false"
    # resource type -> the element names asked for (bare names: the searched type's)
    elements: dict[str, frozenset[str]] = field(default_factory=dict)
    searched: str = ""  # the type searched (or read): its names go bare in the links

    @property
    def count_only(self) -> bool:
        return self.summary == "count"

    def query(self) -> dict[str, list[str]]:
        """The parameters to keep in paging links."""
        if self.elements:
            names = [
                e if t == self.searched else f"{t}.{e}"
                for t, es in self.elements.items()
                for e in sorted(es)
            ]
            return {"_elements": [",".join(names)]}
        return {"_summary": [self.summary]} if self.summary != "false" else {}

    def apply(self, text: str, resource_type: str, version: str) -> str:
        """The resource (stored JSON text) as asked for: the same text when nothing is
        cut."""
        wanted = self.elements.get(resource_type)  # None: no names for this type
        if self.summary in ("false", "count") and wanted is None:
            return text
        resource: dict[str, Any] = json.loads(text)
        known = _elements_of(resource_type, version)
        if self.summary == "true":
            names = known.summary | known.required | _ALWAYS
        elif self.summary == "text":
            names = known.required | _ALWAYS | {"text"}
        elif self.summary == "data":
            names = frozenset(_base(k) for k in resource) - {"text"}
        else:  # a choice element by its name (occurrence: occurrenceDateTime, ...)
            asked = wanted or frozenset()
            chosen = {v for name in asked for v in known.choices.get(name, ())}
            names = asked | chosen | known.required | _ALWAYS
        kept = {k: v for k, v in resource.items() if _base(k) in names}
        if kept == resource:
            return text
        meta = dict(kept.get("meta") or {})
        tags = [t for t in meta.get("tag") or [] if t != SUBSETTED]
        meta["tag"] = [*tags, SUBSETTED]
        kept["meta"] = meta
        return dumps(kept)


def _base(key: str) -> str:
    """A primitive's extension ``_status`` goes with ``status``."""
    return key[1:] if key.startswith("_") else key


def subset_from(params: dict[str, list[str]], *, resource_type: str, search: bool) -> Subset | None:
    """The ``_summary`` / ``_elements`` of a request for ``resource_type`` (searched or
    read; the last of each parameter), None when the resources go in full. 400 for an
    unknown ``_summary`` value, ``count`` outside a search, both at once, or element names
    that are not names."""
    summary = [v for v in params.get("_summary") or [] if v]
    elements = [v for v in params.get("_elements") or [] if v]
    mode = summary[-1] if summary else "false"
    if mode not in SUMMARY_MODES:
        raise FhirError(
            400,
            "invalid",
            f"_summary must be one of {', '.join(SUMMARY_MODES)}; not {mode[:40]!r}.",
        )
    if mode == "count" and not search:
        raise FhirError(400, "invalid", "_summary=count is for searches.")
    if elements and mode != "false":
        raise FhirError(400, "invalid", "_summary and _elements cannot be used together.")
    if not elements:
        return Subset(mode) if mode != "false" else None
    names = list(dict.fromkeys(n.strip() for n in elements[-1].split(",") if n.strip()))
    if len(names) > MAX_ELEMENTS:
        raise FhirError(400, "too-costly", f"More than {MAX_ELEMENTS} _elements.")
    by_type: dict[str, set[str]] = {}
    for name in names:
        match = _NAME.match(name)
        if match is None:
            raise FhirError(
                400,
                "invalid",
                f"_elements: {name[:80]!r} is not an element name (name or Type.name).",
            )
        by_type.setdefault(match["type"] or resource_type, set()).add(match["element"])
    if not by_type:
        return None
    return Subset(elements={t: frozenset(es) for t, es in by_type.items()}, searched=resource_type)
