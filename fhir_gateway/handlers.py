"""The registry of resource handlers: what the router serves and what /metadata declares.

Each supported resource type registers one ``ResourceHandler``; the views route only to
registered types and interactions, and the CapabilityStatement is generated from the same
objects, so the two cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.db.models import QuerySet

from fhir_gateway import storage
from fhir_gateway.models import FhirResource
from fhir_gateway.versions import SUPPORTED_VERSIONS

if TYPE_CHECKING:
    from django.http import HttpRequest
    from django.http.response import HttpResponseBase

    from accounts.models import User

READ = "read"
VREAD = "vread"
HISTORY = "history-instance"
SEARCH = "search-type"
CREATE = "create"
UPDATE = "update"
PATCH = "patch"
DELETE = "delete"


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: str  # FHIR search parameter type: string, token, reference, date, special
    documentation: str
    definition: str = ""
    # Modifiers evaluated besides ``:contains`` of string parameters: ``not`` (token:
    # none of the values, or no value), ``missing`` (true: no value; false: a value).
    modifiers: frozenset[str] = frozenset()


# ``_sort`` keys of every searchable type: name -> the FhirResource column, and the same in
# the hand-written searches (over current resources ``f``).
SORTS: dict[str, str] = {"_id": "logical_id", "_lastUpdated": "last_updated"}
SORTS_SQL: dict[str, str] = {key: f"f.{column}" for key, column in SORTS.items()}

# Parameters the views evaluate for every searchable type.
COMMON_SEARCH_PARAMS: tuple[SearchParam, ...] = (
    SearchParam(
        "_id",
        "token",
        "Logical id.",
        "http://hl7.org/fhir/SearchParameter/Resource-id",
        frozenset({"not"}),
    ),
    SearchParam(
        "_lastUpdated",
        "date",
        "When the version was stored; prefixes eq, ge, gt, le, lt.",
        "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
    ),
)


@dataclass(frozen=True)
class ParamSort:
    """A ``_sort`` key made from the value of one of the type's search parameters
    (Location ``near``: the distance from its point). Given once, that parameter orders a
    search without ``_sort`` by the key, and is the last key before the type's own order
    of one with another ``_sort``, so each match's value is at hand for ``extension``.
    ``_sort`` by the key without the parameter given once is 400."""

    param: str
    # The parameter's value -> an expression over the search's rows (NULLS LAST).
    expression: Callable[[str], Any]
    # A match's value -> the extensions of its entry's ``search`` element.
    extension: Callable[[Any], list[dict[str, Any]]] | None = None


@dataclass(frozen=True)
class WriteRequest:
    user: User
    resource_type: str
    resource: dict[str, Any]
    fhir_version: str
    logical_id: str | None = None
    if_match: str | None = None
    if_none_exist: str | None = None
    # The server's base URL (``FhirRequest.base``): an absolute reference under it names
    # one of our resources, any other names another server's (``m.own_reference``).
    base: str = ""


@dataclass(frozen=True)
class RawRead:
    """A read answered by the handler itself (Binary: the bytes are not stored JSON)."""

    request: HttpRequest
    user: User
    logical_id: str
    version: str  # the negotiated FHIR version (DEFAULT_VERSION when Accept is not FHIR)


RawReadFunc = Callable[[RawRead], "HttpResponseBase"]


@dataclass(frozen=True)
class RawCreate:
    """A create answered by the handler itself (Binary: the body may be the bytes)."""

    request: HttpRequest
    user: User
    version: str  # the answer's FHIR version (Accept)
    base: str  # the server's base URL, for Location
    # A FHIR JSON body, parsed and checked (size, depth, NUL) by the views, in the body's
    # version; None when the body is not JSON (the bytes themselves, in ``request``).
    resource: dict[str, Any] | None = None
    body_version: str | None = None


RawCreateFunc = Callable[[RawCreate], "HttpResponseBase"]

# Returns the current rows matching the handler's own parameters (values already split).
SearchFunc = Callable[["User", dict[str, list[str]]], QuerySet[FhirResource]]
# The same search as hand-written SQL ("FROM … WHERE …" over current rows ``f``, and its
# parameters), or None when these parameters need the ORM path (PostgreSQL only).
SearchSqlFunc = Callable[["User", dict[str, list[str]]], "tuple[str, list[Any]] | None"]
WriteFunc = Callable[[WriteRequest], storage.WriteResult]
DeleteFunc = Callable[["User", str, str | None], FhirResource | None]
# Rows (any version) of the type the user may see; None: everyone authenticated sees all.
VisibleFunc = Callable[["User"], QuerySet[FhirResource]]
# ``_include`` / ``_revinclude`` rows for the logical ids of a result page.
IncludeFunc = Callable[["User", list[str]], QuerySet[FhirResource]]
# POST /fhir: (user, Bundle, body version, answer version, base URL) -> Bundle JSON text.
TransactionFunc = Callable[["User", dict[str, Any], str, str, str], "TransactionAnswer"]


@dataclass(frozen=True)
class TransactionAnswer:
    text: str  # the transaction-response Bundle, JSON
    referral_pk: int  # the referral the Bundle made, or found (a resubmission)
    wrote: bool  # the referral, or a case file a resubmission added


@dataclass
class ResourceHandler:
    resource_type: str
    interactions: tuple[str, ...]
    documentation: str = ""
    profile: str = ""
    search_params: tuple[SearchParam, ...] = ()
    search: SearchFunc | None = None
    search_sql: SearchSqlFunc | None = None
    create: WriteFunc | None = None
    update: WriteFunc | None = None
    delete: DeleteFunc | None = None
    conditional_create: bool = False
    visible: VisibleFunc | None = None
    # Every stored version has both renderings: searches skip the "has a rendering" filter
    # (comparing the TOASTed text with '' reads every candidate row's JSON).
    renders_all_versions: bool = False
    includes: dict[str, IncludeFunc] = field(default_factory=dict)
    # ``_revinclude`` ("<source type>:<its search parameter>"): the rows of that type that
    # point at a result page's logical ids.
    revincludes: dict[str, IncludeFunc] = field(default_factory=dict)
    # Ordering of search results (stable, for paging).
    order_by: tuple[str, ...] = ("logical_id",)
    # ``_sort`` keys beyond the common ones (SORTS): name -> an expression over the rows
    # (e.g. a column of the referral a resource projects), annotated and ordered by.
    sorts: dict[str, Any] = field(default_factory=dict)
    # The same keys as SQL over the hand-written search's ``f`` / ``r`` (``search_sql``).
    sort_sql: dict[str, str] = field(default_factory=dict)
    # ``_sort`` keys made from a search parameter's value (``ParamSort``).
    param_sorts: dict[str, ParamSort] = field(default_factory=dict)
    # Reads answered by the handler (any Accept: the handler negotiates), not stored JSON.
    raw_read: RawReadFunc | None = None
    # Creates answered by the handler (any Content-Type), instead of ``create``.
    raw_create: RawCreateFunc | None = None
    # The FHIR versions the type exists in (SubscriptionTopic is R5 only): elsewhere 404.
    fhir_versions: tuple[str, ...] = SUPPORTED_VERSIONS
    extra: dict[str, Any] = field(default_factory=dict)

    def supports(self, interaction: str) -> bool:
        return interaction in self.interactions

    def param(self, name: str) -> SearchParam | None:
        for p in (*COMMON_SEARCH_PARAMS, *self.search_params):
            if p.name == name:
                return p
        return None


HANDLERS: dict[str, ResourceHandler] = {}

# System-level interactions (``transaction``) and their implementation.
SYSTEM_INTERACTIONS: dict[str, TransactionFunc] = {}


# --------------------------------------------------------------------------- operations

SYSTEM_LEVEL = "system"
TYPE_LEVEL = "type"
INSTANCE_LEVEL = "instance"


@dataclass(frozen=True)
class OperationCall:
    """One call of a FHIR operation, as the views parsed it."""

    user: User
    version: str  # the answer's FHIR version
    base: str  # e.g. https://host/fhir
    params: dict[str, list[str]]  # query parameters (GET)
    resource_type: str | None = None
    logical_id: str | None = None
    accept: str = ""  # the raw Accept header (Binary-style answers decide on it)


@dataclass(frozen=True)
class OperationAnswer:
    """FHIR JSON text (``body``) in the call's version, or raw bytes with their own type."""

    body: str | bytes
    status: int = 200
    content_type: str | None = None  # None: FHIR JSON of the call's version
    headers: dict[str, str] = field(default_factory=dict)
    # The (type, id) of the resources the body carries in full, audited as read by the view
    # (``$events?content=full-resource``: referral versions, patient data).
    read: tuple[tuple[str, str], ...] = ()


OperationFunc = Callable[[OperationCall], OperationAnswer]


@dataclass(frozen=True)
class Operation:
    name: str  # without the "$"
    level: str  # SYSTEM_LEVEL, TYPE_LEVEL or INSTANCE_LEVEL
    func: OperationFunc
    definition: str  # canonical URL of the OperationDefinition
    documentation: str = ""
    resource_type: str | None = None  # for type and instance level
    fhir_versions: tuple[str, ...] = SUPPORTED_VERSIONS
    definition_r4: str = ""  # another definition in R4 (e.g. the Subscriptions Backport's)
    # The query parameters it reads; others are named in X-FHIR-Ignored-Parameters (400 with
    # Prefer: handling=strict), as a search's are. None: the operation checks its own.
    parameters: frozenset[str] | None = None

    def definition_for(self, version: str) -> str:
        return self.definition_r4 if version == "4.0" and self.definition_r4 else self.definition


# (level, resource type or "", name) -> operation; routed by the views, listed by /metadata.
OPERATIONS: dict[tuple[str, str, str], Operation] = {}


def register_operation(operation: Operation) -> Operation:
    OPERATIONS[(operation.level, operation.resource_type or "", operation.name)] = operation
    return operation


def operations_of(resource_type: str | None, version: str) -> list[Operation]:
    """The operations declared on a type (or, for None, at system level) in ``version``."""
    return [
        op
        for (_level, rtype, _name), op in sorted(OPERATIONS.items())
        if (rtype or None) == resource_type and version in op.fhir_versions
    ]


def register(handler: ResourceHandler) -> ResourceHandler:
    HANDLERS[handler.resource_type] = handler
    return handler


def unregister(resource_type: str) -> None:
    HANDLERS.pop(resource_type, None)


# --------------------------------------------------------------------------- stored types


def stored_resource_handler(
    resource_type: str,
    *,
    interactions: tuple[str, ...] = (
        READ,
        VREAD,
        HISTORY,
        SEARCH,
        CREATE,
        UPDATE,
        PATCH,
        DELETE,
    ),
    documentation: str = "",
) -> ResourceHandler:
    """A handler that keeps resources only in the FHIR store (no domain mapping).

    Searchable by ``identifier``. The referral types will have their own handlers that call
    the referral services; this one is the plain storage path (and what tests exercise).
    """

    def search(user: User, params: dict[str, list[str]]) -> QuerySet[FhirResource]:
        criteria = [(name, value) for name, values in params.items() for value in values]
        return storage.rows_matching_tokens(resource_type, criteria)

    def create(req: WriteRequest) -> storage.WriteResult:
        return storage.resource_create(
            resource=req.resource,
            fhir_version=req.fhir_version,
            if_none_exist=req.if_none_exist,
        )

    def update(req: WriteRequest) -> storage.WriteResult:
        assert req.logical_id is not None
        return storage.resource_update(
            resource_type=resource_type,
            logical_id=req.logical_id,
            resource=req.resource,
            fhir_version=req.fhir_version,
            if_match=req.if_match,
        )

    def delete(user: User, logical_id: str, if_match: str | None) -> FhirResource | None:
        return storage.resource_delete(
            resource_type=resource_type, logical_id=logical_id, if_match=if_match
        )

    return ResourceHandler(
        resource_type=resource_type,
        interactions=interactions,
        documentation=documentation,
        search_params=(
            SearchParam(
                "identifier",
                "token",
                "An identifier of the resource (system|value).",
                f"http://hl7.org/fhir/SearchParameter/{resource_type}-identifier",
            ),
        ),
        search=search,
        create=create if CREATE in interactions else None,
        update=update if UPDATE in interactions else None,
        delete=delete if DELETE in interactions else None,
        conditional_create=CREATE in interactions,
    )
