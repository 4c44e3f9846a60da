"""The FHIR REST interface under /fhir: plain Django views, bearer-only, CSRF-exempt.

Every answer is FHIR JSON in the negotiated version; every error is an OperationOutcome
(``_fhir_view`` is the one place that turns exceptions into answers). Reads and searches
splice stored JSON text into the answer; nothing here serialises through fhir.resources.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.db import IntegrityError, connection
from django.db.models import F, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.utils import timezone
from django.utils.http import http_date
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions as drf_exceptions

from accounts.authentication import user_for_bearer
from core.rows import fetch_prepared
from core.values import (
    FIRST_YEAR,
    LAST_YEAR,
    MAX_JSON_DEPTH,
    ascii_digits,
    declared_length,
    json_depth,
    year_supported,
)
from fhir_gateway import batch, capability, handlers, intake, paging, patching
from fhir_gateway.audit import audit_referral, audit_resources, audit_rows, resources_answered
from fhir_gateway.handlers import HANDLERS, ResourceHandler, SearchParam, WriteRequest
from fhir_gateway.models import FhirResource
from fhir_gateway.outcomes import (
    FhirError,
    bodiless_response,
    fhir_error_for,
    outcome_response,
)
from fhir_gateway.referral_mapping import REFERRAL_TYPES, under_base
from fhir_gateway.storage import (
    FHIR_ID,
    WriteResult,
    dumps,
    fhir_instant,
    none_match,
    parse_if_match,
    resource_current,
    resource_history,
    resource_version,
    split_escaped,
    unmodified_since,
    validate_resource,
)
from fhir_gateway.subsetting import Subset, subset_from
from fhir_gateway.versions import (
    DEFAULT_VERSION,
    JSON_TYPES,
    body_version,
    media_type_for,
    parse_media_range,
    response_version,
)
from referrals.attachments import files_removed_on_failure
from referrals.models import AuditAction

if TYPE_CHECKING:
    from accounts.models import User

logger = logging.getLogger(__name__)

DEFAULT_COUNT = 50
MAX_COUNT = 500
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ITERATE = ("_include:iterate", "_revinclude:iterate")
_RESULT_PARAMS = frozenset(
    {
        "_count",
        "_offset",
        "_cursor",
        "_total",
        "_format",
        "_pretty",
        "_include",
        "_revinclude",
        "_sort",
        "_summary",
        "_elements",
    }
    | set(_ITERATE)
)
# Rounds of _include:iterate / _revinclude:iterate (the referral resources are two links
# deep: Task → ServiceRequest → Patient; Communication → Task).
MAX_ITERATE = 4
_DATE = re.compile(
    r"^(?P<prefix>eq|ne|gt|lt|ge|le|sa|eb|ap)?"
    r"(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<time>\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)

# Comparison operators some clients send before a date (fhirclient's search operators, from
# DSTU1) and the FHIR prefix each means, named in the refusal; the longest first.
_COMPARISONS = {">=": "ge", "<=": "le", ">": "gt", "<": "lt", "=": "eq"}


@dataclass(frozen=True)
class FhirRequest:
    request: HttpRequest
    version: str
    user: User | None
    # With ``lenient_accept``: the 406 Accept would have caused, for views to raise unless
    # the handler negotiates itself (Binary).
    accept_error: FhirError | None = None

    @functools.cached_property  # every entry's fullUrl: worked out once per request
    def base(self) -> str:
        return self.request.build_absolute_uri("/fhir")


def _max_body_bytes() -> int:
    return int(settings.FHIR_MAX_BODY_BYTES)


def _authenticate(request: HttpRequest) -> User:
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise FhirError(
            401,
            "login",
            "Authentication required: send Authorization: Bearer <token>.",
            headers={"WWW-Authenticate": 'Bearer realm="fhir"'},
        )
    try:
        user, _token = user_for_bearer(raw.strip())
    except drf_exceptions.AuthenticationFailed as exc:
        raise FhirError(
            401,
            "login",
            str(exc.detail),
            headers={"WWW-Authenticate": 'Bearer realm="fhir", error="invalid_token"'},
        ) from exc
    return user


ViewFunc = Callable[..., HttpResponseBase]


def _fhir_view(
    *, public: bool = False, methods: tuple[str, ...] = ("GET",), lenient_accept: bool = False
) -> Callable[[ViewFunc], ViewFunc]:
    """Negotiates the version, authenticates, and answers every error as OperationOutcome.

    ``lenient_accept``: an Accept we cannot answer in FHIR JSON does not fail here; the view
    gets ``accept_error`` (a Binary read answers raw bytes for ``Accept: application/pdf``).
    """

    def decorate(view: ViewFunc) -> ViewFunc:
        @csrf_exempt
        @functools.wraps(view)
        def wrapped(request: HttpRequest, **kwargs: str) -> HttpResponseBase:
            content_type = media_type_for(DEFAULT_VERSION)
            accept_error: FhirError | None = None
            head = request.method == "HEAD" and "GET" in methods
            try:
                try:
                    version = response_version(request)
                except FhirError as exc:
                    if not (lenient_accept and exc.status == 406):
                        raise
                    version, accept_error = DEFAULT_VERSION, exc
                content_type = media_type_for(version)
                if head:  # HEAD is a GET without the body (RFC 9110), wherever GET is
                    request.method = "GET"
                if request.method not in methods:
                    raise FhirError(
                        405,
                        "not-supported",
                        f"{request.method} is not supported here.",
                        # HEAD wherever GET (see above)
                        headers={
                            "Allow": ", ".join([*methods, "HEAD"] if "GET" in methods else methods)
                        },
                    )
                user = None if public else _authenticate(request)
                with files_removed_on_failure():  # case files of a refused Bundle
                    response = view(FhirRequest(request, version, user, accept_error), **kwargs)
            except RequestDataTooBig:
                response = outcome_response(_too_large(), content_type=content_type)
            except TooManyFieldsSent:  # a query string (or form) of over 1,000 parameters
                response = outcome_response(
                    FhirError(
                        400,
                        "too-costly",
                        f"More than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} parameters.",
                    ),
                    content_type=content_type,
                )
            except Exception as exc:
                error = fhir_error_for(exc)
                if error is None:  # the last line of defence: still an OperationOutcome
                    logger.exception("unexpected error under /fhir")
                    error = FhirError(500, "exception", "Internal error; quote the request id.")
                elif isinstance(exc, IntegrityError):
                    logger.info("integrity error under /fhir turned into 409", exc_info=True)
                response = outcome_response(error, content_type=content_type)
            response.headers.setdefault("Vary", "Accept")
            if head:
                request.method = "HEAD"
                response = _without_body(response)
            return response

        return wrapped

    return decorate


def _without_body(response: HttpResponseBase) -> HttpResponseBase:
    """A GET's answer as a HEAD's: its status and headers (Content-Length the body's),
    no body."""
    if isinstance(response, HttpResponse):
        length = len(response.content)
        response.content = b""
        response["Content-Length"] = str(length)
        return response
    bare = HttpResponse(status=response.status_code)
    for name, value in response.items():
        bare[name] = value
    # A streamed file, never read: close the file alone. (The response's own close() would
    # also send request_finished, the end of the request, in the middle of it.)
    streamed = getattr(response, "file_to_stream", None)
    if streamed is not None:
        streamed.close()
    return bare


def _too_large() -> FhirError:
    return FhirError(
        413, "too-costly", f"The request body is larger than {_max_body_bytes()} bytes."
    )


def _handler(resource_type: str, version: str) -> ResourceHandler:
    handler = HANDLERS.get(resource_type) if _RESOURCE_TYPE.match(resource_type) else None
    if handler is None:
        raise FhirError(404, "not-found", f"Resource type {resource_type!r} is not supported.")
    if version not in handler.fhir_versions:
        raise FhirError(
            404,
            "not-found",
            f"{resource_type} is not served in FHIR {version} (it has no such type).",
        )
    return handler


def _require(handler: ResourceHandler, interaction: str, allow: list[str]) -> None:
    if not handler.supports(interaction):
        raise FhirError(
            405,
            "not-supported",
            f"{interaction} is not supported for {handler.resource_type}.",
            headers={"Allow": ", ".join(allow) or "OPTIONS"},
        )


def _check_id(logical_id: str) -> None:
    if not FHIR_ID.match(logical_id):
        raise FhirError(400, "invalid", f"{logical_id!r} is not a valid FHIR id.")


def _check_body_size(request: HttpRequest) -> None:
    """413 for a body above FHIR_MAX_BODY_BYTES (declared or read)."""
    limit = _max_body_bytes()
    declared = declared_length(request.META.get("CONTENT_LENGTH") or "")
    if declared is None:
        raise FhirError(400, "structure", "Content-Length is not a number.")
    if declared > limit or len(request.body) > limit:
        raise _too_large()


def _json_value(request: HttpRequest) -> Any:
    """The body parsed as JSON (any value): 413 when too large, 400 when empty, not JSON,
    or holding a NUL character."""
    _check_body_size(request)
    raw = request.body
    if not raw.strip():
        raise FhirError(400, "structure", "The request body is empty.")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FhirError(400, "structure", f"The body is not valid JSON: {exc}") from exc
    # Deeper than any resource we take, and deep enough to exhaust the validators' stack:
    # walked only when the body holds enough brackets to be that deep.
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and json_depth(data) > MAX_JSON_DEPTH:
        raise FhirError(
            400, "structure", f"The body is nested more than {MAX_JSON_DEPTH} levels deep."
        )
    # NUL (\u0000, or any character of a UTF-16/32 body) cannot be stored: looked for only
    # when the bytes may hold one.
    if (b"\\u0000" in raw or b"\x00" in raw) and _holds_nul(data):
        raise FhirError(400, "invalid", "The body holds a NUL character (\\u0000).")
    return data


def _json_body(request: HttpRequest) -> dict[str, Any]:
    data = _json_value(request)
    if not isinstance(data, dict):
        raise FhirError(400, "structure", "The body must be a JSON object (a FHIR resource).")
    return data


def _holds_nul(data: Any) -> bool:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _resource_response(
    ctx: FhirRequest,
    row: FhirResource,
    *,
    status: int = 200,
    location: bool = False,
    subset: Subset | None = None,
) -> HttpResponse:
    text = row.json_for(ctx.version)
    if not text:
        raise FhirError(
            406,
            "not-supported",
            f"{row.resource_type}/{row.logical_id} has no FHIR {ctx.version} rendering.",
        )
    if subset is not None:
        text = subset.apply(text, row.resource_type, ctx.version)
    response = HttpResponse(text, status=status, content_type=media_type_for(ctx.version))
    response["ETag"] = f'W/"{row.version_id}"'
    response["Last-Modified"] = http_date(row.last_updated.timestamp())
    if location:
        response["Location"] = (
            f"{ctx.base}/{row.resource_type}/{row.logical_id}/_history/{row.version_id}"
        )
    return response


def _request_subset(ctx: FhirRequest, resource_type: str, *, search: bool) -> Subset | None:
    """``_summary`` / ``_elements`` of a read, vread or history (``subsetting``)."""
    return subset_from(dict(ctx.request.GET.lists()), resource_type=resource_type, search=search)


def _allowed_instance_methods(handler: ResourceHandler) -> list[str]:
    methods = ["GET", "HEAD"] if handler.supports(handlers.READ) else []
    if handler.supports(handlers.UPDATE):
        methods.append("PUT")
    if handler.supports(handlers.PATCH) and handler.update is not None:
        methods.append("PATCH")
    if handler.supports(handlers.DELETE):
        methods.append("DELETE")
    return methods


def _allowed_type_methods(handler: ResourceHandler) -> list[str]:
    methods = ["GET", "HEAD"] if handler.supports(handlers.SEARCH) else []
    if handler.supports(handlers.CREATE):
        methods.append("POST")
    return methods


# --------------------------------------------------------------------------- system level


@_fhir_view(public=True, methods=("GET", "POST"))
def root(ctx: FhirRequest) -> HttpResponse:
    transaction_func = handlers.SYSTEM_INTERACTIONS.get("transaction")
    if ctx.request.method != "POST":
        raise FhirError(
            405,
            "not-supported",
            "Only POST of a transaction or batch Bundle is supported here; see /fhir/metadata.",
            headers={"Allow": "POST"},
        )
    user = _authenticate(ctx.request)
    if ctx.request.headers.get("If-None-Exist"):
        raise FhirError(
            400,
            "not-supported",
            "If-None-Exist does not apply to a transaction; put it on the ServiceRequest "
            "entry (request.ifNoneExist), or on a batch's entry.",
        )
    version = body_version(ctx.request, default=ctx.version)
    bundle = _json_body(ctx.request)
    if bundle.get("resourceType") != "Bundle":
        raise FhirError(400, "invalid", "POST /fhir takes a Bundle of type transaction or batch.")
    kind = bundle.get("type")
    if kind not in ("transaction", "batch") or (kind == "transaction" and not transaction_func):
        raise FhirError(  # for both answers: before a job is stored
            422,
            "not-supported",
            f"Bundle.type {kind!r}: only transaction and batch are supported.",
        )
    if not isinstance(bundle.get("entry", []), list):
        raise FhirError(
            400, "structure", "Bundle.entry must be an array.", expression=["Bundle.entry"]
        )
    if kind == "batch":
        return _batch(ctx, bundle, version)
    assert transaction_func is not None
    if _prefers_async(ctx.request):
        return _accept_async(ctx, user, bundle, version)
    answer = transaction_func(user, bundle, version, ctx.version, ctx.base)
    text = answer.text
    minimal = _prefer_return(ctx.request) == "minimal"
    if minimal:  # each entry's response, no resources
        reply = json.loads(text)
        for entry in reply.get("entry") or []:
            entry.pop("resource", None)
        text = dumps(reply)
    if answer.wrote or not minimal:  # a resubmission answered minimal shows nothing
        action = AuditAction.CREATE if answer.wrote else AuditAction.READ
        audit_referral(ctx.request, user, action, answer.referral_pk, "fhir transaction")
    return HttpResponse(text, content_type=media_type_for(ctx.version))


def _batch(ctx: FhirRequest, bundle: dict[str, Any], version: str) -> HttpResponse:
    """A batch Bundle: each entry answered (and audited) as if sent alone (``batch``)."""
    if _prefers_async(ctx.request):
        raise FhirError(
            422,
            "not-supported",
            "Prefer: respond-async is offered for transaction Bundles only; send the batch "
            "without it (it is answered at once).",
        )
    text = batch.batch_answer(
        ctx.request, bundle=bundle, version=ctx.version, body_version=version, base=ctx.base
    )
    return HttpResponse(text, content_type=media_type_for(ctx.version))


def _prefers_async(request: HttpRequest) -> bool:
    """``Prefer: respond-async`` (RFC 7240), alone or among other preferences."""
    header = request.headers.get("Prefer", "")
    return any(part.split(";")[0].strip().lower() == "respond-async" for part in header.split(","))


def _accept_async(
    ctx: FhirRequest, user: User, bundle: dict[str, Any], version: str
) -> HttpResponse:
    """Store the Bundle and answer 202 with where to poll (fhir_gateway/intake.py)."""
    raw = ctx.request.body
    try:  # the bytes as received when they are UTF-8 (a BOM dropped, as json.loads does);
        # JSON in UTF-8 holds no NUL byte: BOM-less UTF-16/32 (which decodes as UTF-8,
        # NULs and all) is not kept as text
        body = raw.decode("utf-8-sig") if b"\x00" not in raw else ""
    except UnicodeDecodeError:  # UTF-16/32 with a BOM, escaped lone surrogates
        body = ""
    if not body:  # as ASCII JSON, re-serialised from what was parsed
        body = json.dumps(bundle)
    base = ctx.base
    job = intake.intake_accept(
        user=user,
        body=body,
        fhir_version=version,
        answer_version=ctx.version,
        base=base,
        priority=intake.priority_of(bundle),
    )
    location = intake.poll_url(base, job)
    outcome = FhirError(
        202, "informational", f"Accepted; poll {location} for the answer.", severity="information"
    )
    response = outcome_response(outcome, content_type=media_type_for(ctx.version))
    response["Content-Location"] = location
    return response


@_fhir_view(methods=("GET", "DELETE"))
def async_status(ctx: FhirRequest, job_id: str) -> HttpResponse:
    """The polling location of an asynchronous request: 202 while pending, then 200 with
    the batch-response Bundle; DELETE cancels a pending one (202) or forgets a finished one
    (200 with its answer)."""
    assert ctx.user is not None
    if ctx.request.method == "DELETE":
        answer = intake.intake_cancel(user=ctx.user, job_id=job_id)
    else:
        answer = intake.intake_poll(user=ctx.user, job_id=job_id)
    if answer.status == 200:  # the answer holds the referral's resources (or a refusal)
        audit_resources(
            ctx.request,
            ctx.user,
            AuditAction.READ,
            resources_answered(answer.body),
            "fhir async answer",
        )
    response = HttpResponse(
        answer.body, status=answer.status, content_type=media_type_for(answer.version)
    )
    for name, value in answer.headers.items():
        response[name] = value
    return response


@_fhir_view(public=True)
def metadata(ctx: FhirRequest) -> HttpResponse:
    body = capability.capability_statement(ctx.version, base=ctx.base)
    return HttpResponse(dumps(body), content_type=media_type_for(ctx.version))


@_fhir_view(public=True)
def versions(ctx: FhirRequest) -> HttpResponse:
    return HttpResponse(
        dumps(capability.versions_parameters()), content_type=media_type_for(ctx.version)
    )


@_fhir_view(public=True, methods=("GET", "POST", "PUT", "DELETE", "PATCH"))
def unknown(ctx: FhirRequest, rest: str = "") -> HttpResponse:
    raise FhirError(404, "not-found", f"/fhir/{rest} is not a FHIR interaction we serve.")


# --------------------------------------------------------------------------- operations


def _operation(
    ctx: FhirRequest,
    level: str,
    name: str,
    resource_type: str | None = None,
    logical_id: str | None = None,
) -> HttpResponse:
    if resource_type is not None:
        _handler(resource_type, ctx.version)
    if logical_id is not None:
        _check_id(logical_id)
    operation = handlers.OPERATIONS.get((level, resource_type or "", name))
    where = f"/{resource_type}" if resource_type else ""
    where += "/{id}" if logical_id is not None else ""
    if operation is None or ctx.version not in operation.fhir_versions:
        raise FhirError(
            404, "not-found", f"${name} is not an operation we serve on {where or '/'}."
        )
    assert ctx.user is not None
    params = _query_params(ctx.request.GET.lists())
    if ctx.request.method == "POST":  # FHIR: every operation may be POSTed a Parameters
        for param_name, value in _posted_parameters(ctx):
            params.setdefault(param_name, []).append(value)
    ignored = (
        _unread(ctx.request, params, operation.parameters, f"${name}")
        if operation.parameters is not None
        else []
    )
    answer = operation.func(
        handlers.OperationCall(
            user=ctx.user,
            version=ctx.version,
            base=ctx.base,
            params=params,
            resource_type=resource_type,
            logical_id=logical_id,
            accept=ctx.request.headers.get("Accept", ""),
        )
    )
    response = HttpResponse(
        answer.body,
        status=answer.status,
        content_type=answer.content_type or media_type_for(ctx.version),
    )
    for header, value in answer.headers.items():
        response[header] = value
    if answer.read:
        audit_resources(ctx.request, ctx.user, AuditAction.READ, answer.read, f"fhir ${name}")
    _name_ignored(response, ignored)
    return response


# Parameters every interaction reads (content negotiation), not an operation's own.
_FORMAT_PARAMS = frozenset({"_format", "_pretty"})


def _posted_parameters(ctx: FhirRequest) -> list[tuple[str, str]]:
    """An operation's POST body: a ``Parameters`` resource whose parameters are the ones
    the GET form takes in its query (each a name and one primitive value, or a Reference:
    its ``reference``), added to those of the URL. An empty body is no parameters. Our
    operations change nothing and take no resource: a ``resource`` or ``part`` is 400."""
    if not ctx.request.body.strip():
        return []
    resource, version = _typed_body(ctx, "Parameters")
    validate_resource(resource, version)
    pairs: list[tuple[str, str]] = []
    for index, parameter in enumerate(resource.get("parameter") or []):
        where = f"Parameters.parameter[{index}]"
        values = [k for k in parameter if k.startswith("value")]
        if "resource" in parameter or "part" in parameter or len(values) != 1:
            raise FhirError(
                400,
                "not-supported",
                f"{where}: each parameter takes one value (a primitive or a Reference) here.",
                expression=[where],
            )
        value = parameter[values[0]]
        if isinstance(value, dict):
            if values[0] != "valueReference" or not value.get("reference"):
                raise FhirError(
                    400, "not-supported", f"{where}: {values[0]} is not read.", expression=[where]
                )
            value = value["reference"]
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        pairs.append((str(parameter["name"]), text))
    return pairs


@_fhir_view(methods=("GET", "POST"))
def system_operation(ctx: FhirRequest, operation: str) -> HttpResponse:
    return _operation(ctx, handlers.SYSTEM_LEVEL, operation)


@_fhir_view(methods=("GET", "POST"))
def type_operation(ctx: FhirRequest, resource_type: str, operation: str) -> HttpResponse:
    return _operation(ctx, handlers.TYPE_LEVEL, operation, resource_type)


@_fhir_view(methods=("GET", "POST"))
def instance_operation(
    ctx: FhirRequest, resource_type: str, logical_id: str, operation: str
) -> HttpResponse:
    return _operation(ctx, handlers.INSTANCE_LEVEL, operation, resource_type, logical_id)


# --------------------------------------------------------------------------- type level


@_fhir_view(methods=("GET", "POST", "PUT", "DELETE", "PATCH"))
def type_level(ctx: FhirRequest, resource_type: str) -> HttpResponseBase:
    handler = _handler(resource_type, ctx.version)
    allow = _allowed_type_methods(handler)
    if ctx.request.method == "GET":
        _require(handler, handlers.SEARCH, allow)
        return _search(ctx, handler, _query_params(ctx.request.GET.lists()))
    if ctx.request.method == "POST":
        _require(handler, handlers.CREATE, allow)
        if handler.raw_create is not None:
            return _raw_create(ctx, handler)
        return _create(ctx, handler)
    raise FhirError(
        405,
        "not-supported",
        f"{ctx.request.method} is not supported on /{resource_type}.",
        headers={"Allow": ", ".join(allow)},
    )


@_fhir_view(methods=("POST",))
def search_post(ctx: FhirRequest, resource_type: str) -> HttpResponse:
    handler = _handler(resource_type, ctx.version)
    _require(handler, handlers.SEARCH, _allowed_type_methods(handler))
    if ctx.request.content_type != "application/x-www-form-urlencoded":
        raise FhirError(
            415, "not-supported", "POST _search takes application/x-www-form-urlencoded."
        )
    charset = ctx.request.encoding
    if charset is not None and charset.lower() != "utf-8":  # Django reads forms as UTF-8 only
        raise FhirError(
            415,
            "not-supported",
            f"POST _search takes UTF-8 form data, not charset={charset[:40]!r}.",
        )
    pairs = [*ctx.request.GET.lists(), *ctx.request.POST.lists()]
    return _search(ctx, handler, _query_params(pairs))


def _typed_body(ctx: FhirRequest, resource_type: str) -> tuple[dict[str, Any], str]:
    """The body as a resource of ``resource_type`` (400 otherwise), and its FHIR version."""
    version = body_version(ctx.request, default=ctx.version)
    resource = _json_body(ctx.request)
    if resource.get("resourceType") != resource_type:
        raise FhirError(
            400,
            "invalid",
            f"The body is a {resource.get('resourceType')!r}, not a {resource_type}.",
        )
    return resource, version


def _create(ctx: FhirRequest, handler: ResourceHandler) -> HttpResponse:
    assert handler.create is not None and ctx.user is not None
    resource, version = _typed_body(ctx, handler.resource_type)
    if_none_exist = ctx.request.headers.get("If-None-Exist")
    if if_none_exist and not handler.conditional_create:
        raise FhirError(400, "not-supported", f"{handler.resource_type} has no conditional create.")
    result = handler.create(
        WriteRequest(
            user=ctx.user,
            resource_type=handler.resource_type,
            resource=resource,
            fhir_version=version,
            if_none_exist=if_none_exist,
            base=ctx.base,
        )
    )
    if result.created or _sends_resource(ctx, result.row):  # an existing one: read if sent
        action = AuditAction.CREATE if result.created else AuditAction.READ
        _audit_write(ctx, result.row, action, "create")
    for referral_pk, workflow_action in result.transitioned:  # as the REST action records it
        audit_referral(ctx.request, ctx.user, AuditAction.TRANSITION, referral_pk, workflow_action)
    return _write_response(
        ctx, result.row, status=201 if result.created else 200, warning=result.warning
    )


def _not_modified(request: HttpRequest, row: FhirResource) -> bool:
    """A conditional read the current version satisfies (RFC 9110 13.2.2): ``If-None-Match``
    naming it; else, without that header, ``If-Modified-Since`` no earlier than its
    ``Last-Modified``."""
    tags = request.headers.get("If-None-Match", "")
    if tags.strip():
        return none_match(tags, row.version_id)
    return unmodified_since(request.headers.get("If-Modified-Since", ""), row.last_updated)


def _audit_write(ctx: FhirRequest, row: FhirResource, action: AuditAction, what: str) -> None:
    audit_rows(ctx.request, ctx.user, action, [row], f"fhir {what} {row.resource_type}")


def _raw_create(ctx: FhirRequest, handler: ResourceHandler) -> HttpResponseBase:
    """A create whose body may be other than FHIR JSON (Binary: the file itself). A JSON
    body is parsed and checked here as any other; other bodies are left to the handler."""
    assert handler.raw_create is not None and ctx.user is not None
    if ctx.request.headers.get("If-None-Exist"):
        raise FhirError(400, "not-supported", f"{handler.resource_type} has no conditional create.")
    media = parse_media_range(ctx.request.headers.get("Content-Type", ""))
    resource: dict[str, Any] | None = None
    version: str | None = None
    if media is not None and media.media_type in JSON_TYPES:
        resource, version = _typed_body(ctx, handler.resource_type)
    return handler.raw_create(
        handlers.RawCreate(ctx.request, ctx.user, ctx.version, ctx.base, resource, version)
    )


def _prefer_return(request: HttpRequest) -> str:
    """``Prefer: return=`` (RFC 7240, among other preferences): minimal,
    representation (the default) or OperationOutcome."""
    for part in request.headers.get("Prefer", "").split(","):
        name, _, value = part.split(";")[0].strip().partition("=")
        value = value.strip().strip('"')
        if name.strip().lower() == "return" and value in ("minimal", "OperationOutcome"):
            return value
    return "representation"  # also for a value FHIR does not define


def _sends_resource(ctx: FhirRequest, row: FhirResource) -> bool:
    """Whether ``_write_response`` answers with the resource (so a write that found or
    kept it is a read to record) rather than headers or an OperationOutcome alone."""
    return _prefer_return(ctx.request) == "representation" and bool(row.json_for(ctx.version))


def _write_response(
    ctx: FhirRequest, row: FhirResource, *, status: int, warning: str | None = None
) -> HttpResponse:
    """The answer to a write. A ``warning`` (a write that succeeded but did not do all that
    was asked) is the OperationOutcome's issue with ``Prefer: return=OperationOutcome``,
    as FHIR's http page has servers return hints and warnings, and with any ``Prefer`` an
    ``X-FHIR-Warning`` header (ASCII)."""
    if not _sends_resource(ctx, row):
        reference = f"{row.resource_type}/{row.logical_id}/_history/{row.version_id}"
        if _prefer_return(ctx.request) == "OperationOutcome":
            error = (
                FhirError(status, "business-rule", warning, severity="warning")
                if warning
                else FhirError(
                    status, "informational", f"Stored {reference}.", severity="information"
                )
            )
            response = outcome_response(error, content_type=media_type_for(ctx.version))
        else:  # no body, but the headers say what was stored
            response = HttpResponse(status=status, content_type=media_type_for(ctx.version))
        response["ETag"] = f'W/"{row.version_id}"'
        response["Last-Modified"] = http_date(row.last_updated.timestamp())
        response["Location"] = f"{ctx.base}/{reference}"
    else:
        response = _resource_response(ctx, row, status=status, location=True)
    if warning:
        response["X-FHIR-Warning"] = warning
    return response


# --------------------------------------------------------------------------- instance level


def _raw_read(ctx: FhirRequest, handler: ResourceHandler, logical_id: str) -> HttpResponseBase:
    """A read its handler answers itself (Binary: the bytes, or a Binary resource)."""
    assert ctx.user is not None and handler.raw_read is not None
    if _request_subset(ctx, handler.resource_type, search=False) is not None:
        raise FhirError(
            400,
            "not-supported",
            f"{handler.resource_type} is read whole: _summary and _elements do not apply.",
        )
    return handler.raw_read(handlers.RawRead(ctx.request, ctx.user, logical_id, ctx.version))


@_fhir_view(methods=("GET", "PUT", "DELETE", "POST", "PATCH"), lenient_accept=True)
def instance(ctx: FhirRequest, resource_type: str, logical_id: str) -> HttpResponseBase:
    method = ctx.request.method
    raw = HANDLERS.get(resource_type)
    if ctx.accept_error is not None and not (method == "GET" and raw and raw.raw_read):
        raise ctx.accept_error
    handler = _handler(resource_type, ctx.version)
    if logical_id == "_history":  # [type]/_history: an interaction, not an id
        raise FhirError(
            405,
            "not-supported",
            f"History of every {resource_type} is not offered; read one resource's "
            f"({resource_type}/<id>/_history) where /fhir/metadata lists it.",
            headers={"Allow": ""},
        )
    _check_id(logical_id)
    allow = _allowed_instance_methods(handler)
    if method == "GET" and handler.raw_read is not None:
        _require(handler, handlers.READ, allow)
        return _raw_read(ctx, handler, logical_id)
    if method == "GET":
        _require(handler, handlers.READ, allow)
        subset = _request_subset(ctx, resource_type, search=False)
        row = _read(handler, logical_id, ctx.user)
        if _not_modified(ctx.request, row):
            not_modified = bodiless_response(304)
            not_modified["ETag"] = f'W/"{row.version_id}"'
            not_modified["Last-Modified"] = http_date(row.last_updated.timestamp())
            return not_modified  # no data sent: nothing to record
        _audit_write(ctx, row, AuditAction.READ, "read")
        return _resource_response(ctx, row, subset=subset)
    if method == "PUT":
        _require(handler, handlers.UPDATE, allow)
        assert handler.update is not None and ctx.user is not None
        resource, version = _typed_body(ctx, resource_type)
        if resource.get("id") != logical_id:
            raise FhirError(
                400, "invalid", f"The body's id must be {logical_id!r} (the id in the URL)."
            )
        result = handler.update(
            WriteRequest(
                user=ctx.user,
                resource_type=resource_type,
                resource=resource,
                fhir_version=version,
                logical_id=logical_id,
                if_match=ctx.request.headers.get("If-Match"),
                base=ctx.base,
            )
        )
        _audit_update(ctx, result, "update")
        return _write_response(ctx, result.row, status=200)
    if method == "PATCH":
        _require(handler, handlers.PATCH, allow)
        return _patch(ctx, handler, logical_id)
    if method == "DELETE":
        _require(handler, handlers.DELETE, allow)
        assert handler.delete is not None and ctx.user is not None
        deleted = handler.delete(ctx.user, logical_id, ctx.request.headers.get("If-Match"))
        if (
            deleted is None
            and not FhirResource.objects.filter(
                resource_type=resource_type, logical_id=logical_id
            ).exists()
        ):
            raise FhirError(404, "not-found", f"{resource_type}/{logical_id} is not known.")
        return bodiless_response(204)
    raise FhirError(
        405,
        "not-supported",
        f"{method} is not supported on /{resource_type}/{{id}}.",
        headers={"Allow": ", ".join(allow)},
    )


# A PATCH without If-Match is applied to the current version; when another change stores
# a version in between (412 from the update), it is read and applied again, this often.
_PATCH_ATTEMPTS = 3


def _patch(ctx: FhirRequest, handler: ResourceHandler, logical_id: str) -> HttpResponse:
    """The patch applied to the current version (in the request's FHIR version) and stored
    by the type's update, as a PUT of the result would be (fhir_gateway/patching.py)."""
    assert ctx.user is not None
    if handler.update is None:  # PATCH is applied through the type's update
        raise FhirError(
            405,
            "not-supported",
            f"PATCH is not supported for {handler.resource_type}.",
            headers={"Allow": ", ".join(_allowed_instance_methods(handler))},
        )
    media_type, version = patching.patch_format(
        ctx.request.headers.get("Content-Type", ""), default_version=ctx.version
    )
    patch = patching.check_patch(_json_value(ctx.request), media_type)
    if_match = ctx.request.headers.get("If-Match")
    expected = parse_if_match(if_match) if if_match else None
    for attempt in range(1, _PATCH_ATTEMPTS + 1):
        row = _read(handler, logical_id, ctx.user)  # 404 / 410 as a read
        if expected is not None and expected != row.version_id:
            return _stale_patch(ctx, handler, logical_id, patch, version, expected, row)
        text = row.json_for(version)
        if not text:
            raise FhirError(
                422,
                "not-supported",
                f"{handler.resource_type}/{logical_id} has no FHIR {version} rendering to patch.",
            )
        current = json.loads(text)
        patched = patching.apply_patch(current, patch, max_bytes=_max_body_bytes())
        if patching.same_json(patched, current):  # only tests, or nothing new: no version
            if _sends_resource(ctx, row):
                _audit_write(ctx, row, AuditAction.READ, "patch")
            return _write_response(ctx, row, status=200)
        if patched.get("resourceType") != handler.resource_type or patched.get("id") != logical_id:
            raise FhirError(
                422,
                "processing",
                "A patch may not change the resource's resourceType or id.",
            )
        try:
            result = _patched_update(ctx, handler, logical_id, patched, version, row.version_id)
        except FhirError as exc:
            if exc.status != 412 or expected is not None or attempt == _PATCH_ATTEMPTS:
                raise
            continue  # changed since it was read: read it again and re-apply
        _audit_update(ctx, result, "patch")
        return _write_response(ctx, result.row, status=200)
    raise AssertionError("unreachable")


def _patched_update(
    ctx: FhirRequest,
    handler: ResourceHandler,
    logical_id: str,
    patched: dict[str, Any],
    version: str,
    if_match: int,
) -> WriteResult:
    """The patch's result stored by the type's update, as a PUT of it with that If-Match."""
    assert ctx.user is not None and handler.update is not None
    return handler.update(
        WriteRequest(
            user=ctx.user,
            resource_type=handler.resource_type,
            resource=patched,
            fhir_version=version,
            logical_id=logical_id,
            if_match=f'W/"{if_match}"',
            base=ctx.base,
        )
    )


def _audit_update(ctx: FhirRequest, result: WriteResult, verb: str) -> None:
    """An update (PUT, PATCH) as what it was: a new version, or — answered from what is
    stored (the resource as sent, a retry answered as the first was) — a read of it."""
    if not result.unchanged:
        _audit_write(ctx, result.row, AuditAction.UPDATE, verb)
    elif _sends_resource(ctx, result.row):
        _audit_write(ctx, result.row, AuditAction.READ, verb)


def _stale_patch(
    ctx: FhirRequest,
    handler: ResourceHandler,
    logical_id: str,
    patch: list[Any] | dict[str, Any],
    version: str,
    expected: int,
    row: FhirResource,
) -> HttpResponse:
    """A PATCH whose If-Match names a version that is no longer current: applied to that
    version and handed to the update with it, so that the retry of a patch whose answer was
    lost is answered as the first was (the update's record of it, AppliedUpdate). Anything
    else is stale (412), whatever the patch does to the version named: one that does not
    apply there, changes nothing, or whose result the update would refuse is no retry."""
    assert ctx.user is not None and handler.update is not None
    stale = FhirError(
        412,
        "conflict",
        f"If-Match names version {expected}; the current version is {row.version_id}.",
    )
    try:
        text = resource_version(handler.resource_type, logical_id, expected).json_for(version)
        if not text:
            raise stale
        current = json.loads(text)
        patched = patching.apply_patch(current, patch, max_bytes=_max_body_bytes())
        if patching.same_json(patched, current):
            raise stale
        result = _patched_update(ctx, handler, logical_id, patched, version, expected)
    except FhirError as exc:  # no such version (404, 410), or anything but a retry
        if exc is stale:
            raise
        raise stale from exc
    _audit_update(ctx, result, "patch")  # a retry answered as the first was: a read
    return _write_response(ctx, result.row, status=200)


def _check_visible(handler: ResourceHandler, logical_id: str, user: User | None) -> None:
    """Outside the caller's scope a resource is "not found" (ids leak nothing)."""
    if handler.visible is None:
        return
    if user is None or not handler.visible(user).filter(logical_id=logical_id).exists():
        raise FhirError(404, "not-found", f"{handler.resource_type}/{logical_id} is not known.")


def _read(handler: ResourceHandler, logical_id: str, user: User | None) -> FhirResource:
    _check_visible(handler, logical_id, user)
    return resource_current(handler.resource_type, logical_id)


@_fhir_view(lenient_accept=True)
def vread(
    ctx: FhirRequest, resource_type: str, logical_id: str, version_id: str
) -> HttpResponseBase:
    raw = HANDLERS.get(resource_type)
    if ctx.accept_error is not None and not (raw and raw.raw_read):
        raise ctx.accept_error
    handler = _handler(resource_type, ctx.version)
    _check_id(logical_id)
    if not ascii_digits(version_id) or len(version_id) > 9:
        raise FhirError(400, "invalid", f"{version_id!r} is not a version id.")
    if handler.raw_read is not None:
        # Bytes are never changed (one version): version 1 is the read — the Location a
        # Binary create answers with; any other is not known.
        _require(handler, handlers.VREAD, _allowed_instance_methods(handler))
        if int(version_id) != 1:
            raise FhirError(404, "not-found", f"{resource_type}/{logical_id} has only version 1.")
        return _raw_read(ctx, handler, logical_id)
    _require(handler, handlers.VREAD, _allowed_instance_methods(handler))
    subset = _request_subset(ctx, resource_type, search=False)
    _check_visible(handler, logical_id, ctx.user)
    row = resource_version(resource_type, logical_id, int(version_id))
    _audit_write(ctx, row, AuditAction.READ, "vread")
    return _resource_response(ctx, row, subset=subset)


@_fhir_view()
def history(ctx: FhirRequest, resource_type: str, logical_id: str) -> HttpResponse:
    handler = _handler(resource_type, ctx.version)
    _check_id(logical_id)
    _require(handler, handlers.HISTORY, _allowed_instance_methods(handler))
    count, offset = _paging(ctx.request.GET)
    subset = _request_subset(ctx, resource_type, search=True)
    if subset is not None and subset.count_only:  # how many versions, none of them
        count, offset = 0, 0
    _check_visible(handler, logical_id, ctx.user)
    rows = resource_history(resource_type, logical_id)
    ignored = _unread(ctx.request, ctx.request.GET, _HISTORY_PARAMS, "History")
    # _since / _at (a QueryDict item is the last value given)
    window = {n: ctx.request.GET[n] for n in ("_since", "_at") if ctx.request.GET.get(n)}
    if window:
        rows = rows.filter(version_id__in=_versions_in_window(rows, window))
    total = rows.count()
    page = list(rows[offset : offset + count])
    entries = []
    for row in page:
        url = f"{ctx.base}/{resource_type}/{logical_id}"
        if row.deleted:
            request_part = {"method": "DELETE", "url": f"{resource_type}/{logical_id}"}
            response_part = {"status": "204 No Content", "etag": f'W/"{row.version_id}"'}
        else:
            first = row.version_id == 1
            request_part = {
                "method": "POST" if first else "PUT",
                "url": resource_type if first else f"{resource_type}/{logical_id}",
            }
            response_part = {
                "status": "201 Created" if first else "200 OK",
                "etag": f'W/"{row.version_id}"',
                "lastModified": fhir_instant(row.last_updated),
            }
        text = "" if row.deleted else row.json_for(ctx.version)
        if text and subset is not None:
            text = subset.apply(text, resource_type, ctx.version)
        entry = '{"fullUrl":' + json.dumps(url)
        if text:
            entry += ',"resource":' + text
        entry += ',"request":' + dumps(request_part) + ',"response":' + dumps(response_part) + "}"
        entries.append(entry)
    self_url = f"{ctx.base}/{resource_type}/{logical_id}/_history"
    used = {**(subset.query() if subset else {}), **{k: [v] for k, v in window.items()}}
    links = _links(self_url, used, count, offset, total, len(page))
    response = _bundle_response(ctx, "history", total, links, entries)
    audit_rows(ctx.request, ctx.user, AuditAction.READ, page, f"fhir history {resource_type}")
    _name_ignored(response, ignored)
    return response


_HISTORY_PARAMS = frozenset({"_count", "_offset", "_since", "_at", "_summary", "_elements"})


def _versions_in_window(rows: QuerySet[FhirResource], window: dict[str, str]) -> set[int]:
    """The versions an instance history's ``_since`` / ``_at`` keep (FHIR's history
    rules): ``_since``, those made at or after the instant; ``_at``, those current at some
    point in the date's range (a version is current until the next is made). Both were
    ignored without a word: a client polling with ``_since`` got everything."""
    made = list(rows.order_by("version_id").values_list("version_id", "last_updated"))
    kept = {v for v, _t in made}
    if "_since" in window:
        start, _end = _window_range(window["_since"], "_since")
        kept &= {v for v, t in made if t >= start}
    if "_at" in window:
        start, end = _window_range(window["_at"], "_at")
        ends = [t for _v, t in made[1:]] + [None]
        kept &= {
            v
            for (v, t), until in zip(made, ends, strict=True)
            if t < end and (until is None or until > start)
        }
    return kept


def _window_range(raw: str, name: str) -> tuple[datetime, datetime]:
    """A history window's date (no prefix): its start and exclusive end, in UTC."""
    if raw[:2].isalpha() or raw[:1] in {"<", ">", "="}:
        raise FhirError(400, "invalid", f"{name} takes a date or instant, without a prefix.")
    _prefix, start, end = _date_range(raw, name)
    return start, end


# --------------------------------------------------------------------------- search


def _query_params(pairs: Any) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for name, values in pairs:
        params.setdefault(name, []).extend(values)
    return params


def _int_param(query: Any, name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if not ascii_digits(str(raw)) or len(str(raw)) > 9:
        raise FhirError(400, "invalid", f"{name} must be a non-negative integer, not {raw!r}.")
    return int(raw)


def _paging(query: Any) -> tuple[int, int]:
    count = min(_int_param(query, "_count", DEFAULT_COUNT), MAX_COUNT)
    return count, _int_param(query, "_offset", 0)


def _date_range(raw: str, name: str) -> tuple[str, datetime, datetime]:
    """'ge2024-05' -> ('ge', start, end) with end exclusive, in UTC (``name``: the
    parameter, for the error)."""
    match = _DATE.match(raw)
    if not match:
        message = f"{name} {raw!r} is not a FHIR date search value."
        operator = next((op for op in _COMPARISONS if raw.startswith(op)), None)
        if operator is not None:  # fhirclient's $gt / $gte / $lt / $lte send these
            fhir = f"{_COMPARISONS[operator]}{raw[len(operator) :]}"
            message += f" FHIR writes a comparison as a prefix (eq ge gt le lt): {fhir!r}."
        raise FhirError(400, "invalid", message)
    prefix = match.group("prefix") or "eq"
    if prefix not in {"eq", "gt", "lt", "ge", "le"}:
        raise FhirError(400, "not-supported", f"Date prefix {prefix!r} is not supported.")
    year, month, day = match.group("year"), match.group("month"), match.group("day")
    try:
        if match.group("time"):
            text = f"{year}-{month}-{day}T{match.group('time')}{match.group('tz') or 'Z'}"
            start = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if start.tzinfo is None:
                raise FhirError(400, "invalid", f"{raw!r} needs a time zone.")
            offset = start.utcoffset()
            if offset is not None and abs(offset) > timedelta(hours=14):  # FHIR's dateTime
                raise FhirError(400, "invalid", f"{raw!r}: a time zone is within ±14:00.")
            clock = match.group("time")
            if "." in clock:  # the range a value of that precision covers
                # Instants render in milliseconds (fhir_instant): a finer value is the
                # millisecond it falls in, so it finds the resource that shows it.
                digits = min(len(clock.split(".")[1]), 3)
                start = start.replace(microsecond=start.microsecond // 1000 * 1000)
                precision = timedelta(microseconds=10 ** (6 - digits))
            elif clock.count(":") >= 2:
                precision = timedelta(seconds=1)
            else:
                precision = timedelta(minutes=1)
            end = start + precision
        elif day:
            start = datetime(int(year), int(month), int(day), tzinfo=UTC)
            end = start + timedelta(days=1)
        elif month:
            start = datetime(int(year), int(month), 1, tzinfo=UTC)
            end = (start + timedelta(days=32)).replace(day=1)
        else:
            start = datetime(int(year), 1, 1, tzinfo=UTC)
            end = start.replace(year=start.year + 1)
    except (ValueError, OverflowError) as exc:  # 9999-12-31 has no end in Python
        raise FhirError(400, "invalid", f"{name} {raw!r} is not a valid date.") from exc
    if not year_supported(start):
        raise FhirError(
            400, "invalid", f"{raw!r}: dates are searched from {FIRST_YEAR} to {LAST_YEAR}."
        )
    return prefix, start, end


def date_condition(field: str, raw: str, name: str) -> Q:
    """One date search value of parameter ``name`` over ``field``; commas are
    alternatives (OR), as for every search parameter."""
    condition = Q()
    for value in raw.split(","):
        prefix, start, end = _date_range(value, name)
        condition |= {
            "eq": Q(**{f"{field}__gte": start, f"{field}__lt": end}),
            "ge": Q(**{f"{field}__gte": start}),
            "gt": Q(**{f"{field}__gte": end}),
            "le": Q(**{f"{field}__lt": end}),
            "lt": Q(**{f"{field}__lt": start}),
        }[prefix]
    return condition


def _last_updated_filter(values: list[str]) -> Q:
    condition = Q()
    for raw in values:  # repeated: AND
        condition &= date_condition("last_updated", raw, "_lastUpdated")
    return condition


# Search values in one request, comma-separated alternatives counted one by one: each
# is a bound value (PostgreSQL takes 65,535) and a condition (SQLite's expression trees
# stop at a depth of 1,000: 200 identifier alternatives were past it).
MAX_SEARCH_VALUES = 100
_INCLUDE_PARAMS = ("_include", "_revinclude", "_include:iterate", "_revinclude:iterate")


def _search(
    ctx: FhirRequest, handler: ResourceHandler, params: dict[str, list[str]]
) -> HttpResponse:
    assert handler.search is not None and ctx.user is not None
    strict = _strict(ctx.request)
    count, offset = _paging({k: v[-1] for k, v in params.items() if v})
    total_mode = (params.get("_total") or ["accurate"])[-1] or "accurate"
    if total_mode not in {"none", "estimate", "accurate"}:
        raise FhirError(400, "invalid", "_total must be none, estimate or accurate.")
    subset = subset_from(params, resource_type=handler.resource_type, search=True)
    if subset is not None and subset.count_only:  # the total, no resources
        count, offset, total_mode = 0, 0, "accurate"
    own: dict[str, list[str]] = {}
    used: dict[str, list[str]] = {}
    ignored: list[str] = []
    for name, values in params.items():
        values = [v for v in values if v != ""]
        if name in _RESULT_PARAMS or not values:
            continue
        _refuse_chain(handler, name)
        base_name, _, modifier = name.partition(":")
        param = handler.param(base_name)
        if param is None:
            ignored.append(name)
            continue
        contains = param.type == "string" and modifier == "contains"
        if param.type == "reference" and _TYPE_MODIFIER.fullmatch(modifier):
            # focus:ServiceRequest=<id> is focus=ServiceRequest/<id> (FHIR's [type] modifier)
            values = [_typed_reference(name, modifier, value) for value in values]
            name, modifier = base_name, ""
        if modifier and not contains and modifier not in param.modifiers:
            # Never ignored: without it the search would answer more than was asked for
            # (name:exact, identifier:above): FHIR's own example refuses it.
            raise FhirError(
                400,
                "not-supported",
                f"The {base_name!r} parameter has the modifier {modifier[:40]!r}, which is "
                f"not supported here ({_modifiers_named(param)}).",
                expression=[name[:80]],
            )
        if any("\x00" in value for value in values):  # PostgreSQL's text cannot hold one
            raise FhirError(
                400, "invalid", f"{name[:80]} contains a NUL character.", expression=[name[:80]]
            )
        if modifier == "missing":
            for value in values:
                if any(v not in {"true", "false"} for v in value.split(",")):
                    raise FhirError(
                        400,
                        "invalid",
                        f"{name[:80]} takes true or false, not {value[:40]!r}.",
                        expression=[name[:80]],
                    )
        used.setdefault(name, []).extend(values)
        if param.type == "reference" and modifier != "missing":
            values = [_local_reference(v, ctx.base) for v in values]
        if base_name not in {"_id", "_lastUpdated"}:
            # :contains is the parameter's own search (docs/fhir.md) unless the parameter
            # names it (its own search is not "contains"); other modifiers are passed on
            # by name ("status:not") for the handler's filters.
            own_search = not modifier or (contains and "contains" not in param.modifiers)
            own.setdefault(base_name if own_search else name, []).extend(values)
    if total_mode != "accurate":  # the paging links keep asking for the same
        used["_total"] = [total_mode]
    sort = _sort_keys(handler, params.get("_sort") or [], ignored, strict)
    sort, made_sorts = _with_param_sorts(handler, sort, own)
    if sort:
        used["_sort"] = [",".join(("-" if descending else "") + key for key, descending in sort)]
    if ignored and strict:
        raise FhirError(
            400, "not-supported", f"Unknown search parameters: {', '.join(sorted(ignored))}."
        )
    # Every comma counts (some parameters split on escaped ones too), and the includes,
    # each a query of its own.
    includes = [v for name in _INCLUDE_PARAMS for v in params.get(name) or []]
    values = [v for vs in used.values() for v in vs] + includes
    if sum(v.count(",") + 1 for v in values) > MAX_SEARCH_VALUES:
        raise FhirError(
            400,
            "too-costly",
            f"More than {MAX_SEARCH_VALUES} search values (alternatives counted one by one).",
        )
    if subset is not None:  # kept by the paging links; its names have their own limit
        used.update(subset.query())
    column = "json_r5" if ctx.version == "5.0" else "json_r4"
    cursor = (params.get("_cursor") or [""])[-1] or None
    # What a cursor is made for: its values are this type's sort keys then tie-break.
    search_key = f"{handler.resource_type}?_sort={(used.get('_sort') or [''])[0]}"
    for key in made_sorts:  # and the value its key is made from (near: the point), short
        param_name = handler.param_sorts[key].param
        digest = hashlib.sha256(own[param_name][0].encode()).hexdigest()[:32]
        search_key += f"&{param_name}={digest}"
    # The page after a next link's last row (checked also when no page is asked for).
    after = paging.decode_cursor(cursor, search_key) if cursor is not None else None
    if count == 0:
        after = None
    # After a cursor one row more tells whether another page follows (the total cannot:
    # rows may have left the matches before the cursor).
    fetch = count + 1 if after is not None else count
    want_total = total_mode != "none" or (offset > 0 and after is None)
    hand_written = _search_by_sql(
        ctx.user, handler, own, used, column, fetch, offset, want_total, sort, after
    )
    # The page rows' source_pk when the search read them (the audit needs no lookup).
    page_referrals: list[int | None] | None = None
    if hand_written is not None:
        total, page, page_referrals = hand_written
    else:
        rows = handler.search(ctx.user, own)
        for value in used.get("_id", []):  # repeated: AND; commas: OR
            rows = rows.filter(logical_id__in=value.split(","))
        for value in used.get("_id:not", []):  # none of them
            rows = rows.exclude(logical_id__in=value.split(","))
        if "_lastUpdated" in used:
            rows = rows.filter(_last_updated_filter(used["_lastUpdated"]))
        if not handler.renders_all_versions:
            rows = rows.exclude(**{column: ""})
        total = rows.count() if want_total else None
        page = _sorted_page(handler, rows, sort, column, fetch, offset, after, made_sorts)
    more = None
    if after is not None:
        more, page = len(page) > count, page[:count]
    next_cursor = paging.encode_cursor(search_key, page[-1][3]) if page else None
    entries = [
        _entry(ctx, rtype, lid, text, "match", subset, _match_extensions(handler, sort, keys))
        for rtype, lid, text, keys in page
    ]
    page_ids = [lid for _t, lid, _x, _k in page]
    seen = {(rtype, lid) for rtype, lid, _x, _k in page}
    for name, funcs in (("_include", handler.includes), ("_revinclude", handler.revincludes)):
        for include in dict.fromkeys(params.get(name) or []):  # each once, in the order sent
            include_func = _include_func(
                funcs, include, handler.resource_type, reverse=name == "_revinclude"
            )
            if include_func is None:
                if strict:
                    raise FhirError(400, "not-supported", f"{name}={include} is not supported.")
                ignored.append(f"{name}={include}")
                continue
            used.setdefault(name, []).append(include)
            if page_ids:
                _include_into(ctx, include_func(ctx.user, page_ids), column, seen, entries, subset)
    steps = _iterate_steps(params, used, ignored, strict)
    for _round in range(MAX_ITERATE if page_ids else 0):
        added = False
        for source_type, include_func in steps:
            ids = sorted(lid for rtype, lid in seen if rtype == source_type)
            if ids:
                added |= _include_into(
                    ctx, include_func(ctx.user, ids), column, seen, entries, subset
                )
        if not added:
            break
    self_url = f"{ctx.base}/{handler.resource_type}"
    if params.get("_format"):  # the next page in the version (and format) of this one
        used["_format"] = params["_format"][-1:]
    links = _links(
        self_url,
        used,
        count,
        offset,
        total,
        len(page),
        more=more,
        cursor=cursor if after is not None else None,
        next_cursor=next_cursor,
    )
    response = _bundle_response(
        ctx, "searchset", total if total_mode != "none" else None, links, entries
    )
    _audit_search(ctx, handler, seen, page, page_referrals)
    _name_ignored(response, ignored)
    return response


def _audit_search(
    ctx: FhirRequest,
    handler: ResourceHandler,
    seen: set[tuple[str, str]],
    page: list[tuple[Any, ...]],
    page_referrals: list[int | None] | None,
) -> None:
    """The referrals of what the answer holds: the page's by the ``source_pk`` the search
    read (``page_referrals``, when it did), what it included by filler id."""
    known: list[int] = []
    if page_referrals is not None and handler.resource_type in REFERRAL_TYPES:
        rows = list(zip(page, page_referrals, strict=False))
        known = [pk for _row, pk in rows if pk is not None]
        seen = seen - {(row[0], row[1]) for row, pk in rows if pk is not None}
    detail = f"fhir search {handler.resource_type}"
    audit_resources(ctx.request, ctx.user, AuditAction.READ, seen, detail, referral_pks=known)


def _refuse_chain(handler: ResourceHandler, name: str) -> None:
    """A chained parameter on one of the type's parameters (``focus.identifier``,
    ``patient:Patient.identifier``) or a reverse chain (``_has:…``) is 400, never ignored:
    we serve neither, and ignoring it would answer every resource the rest of the search
    finds (fhirclient sends a nested search dict as a chain: ``{"focus": {"identifier":
    …}}`` got all the caller's Tasks, as if one had been found)."""
    head, dot, _rest = name.partition(".")
    base_name = head.partition(":")[0]
    if base_name == "_has":
        message = "Reverse chaining (_has) is not supported here: search the other type."
    elif dot and handler.param(base_name) is not None:
        message = (
            f"Chained search ({base_name}.…) is not supported here: search the other "
            f"resource first and name it by id ({base_name}=<type>/<id>)."
        )
        if handler.resource_type in {"Task", "ServiceRequest"}:
            message += (
                f" A {handler.resource_type} takes the referral's placer identifier itself: "
                "identifier=<system>|<value>."
            )
    else:
        return
    raise FhirError(400, "not-supported", message, expression=[name[:80]])


_TYPE_MODIFIER = re.compile(r"[A-Z][A-Za-z]{1,63}")


def _typed_reference(name: str, resource_type: str, raw: str) -> str:
    """The values of ``param:Type``: a bare id becomes ``Type/id``; a reference must name
    that type (relative, or an absolute URL), else 400."""
    out = []
    for value in split_escaped(raw, ","):
        if "/" not in value:
            out.append(f"{resource_type}/{value}")
            continue
        if not re.search(rf"(?:^|/){resource_type}/[^/]+(?:/_history/[^/]+)?$", value):
            raise FhirError(
                400,
                "invalid",
                f"{name[:80]} names {value[:80]!r}, not a {resource_type}.",
                expression=[name[:80]],
            )
        out.append(value)
    return ",".join(out)


def _modifiers_named(param: SearchParam) -> str:
    supported = sorted(param.modifiers | ({"contains"} if param.type == "string" else set()))
    if not supported:
        return "it takes none"
    return "it takes " + ", ".join(f":{m}" for m in supported)


def _unread(request: HttpRequest, names: Any, reads: frozenset[str], what: str) -> list[str]:
    """The parameters an interaction or operation (``what``) does not read, besides the
    format ones: named in X-FHIR-Ignored-Parameters, or 400 with ``Prefer:
    handling=strict``."""
    ignored = sorted(set(names) - reads - _FORMAT_PARAMS)
    if ignored and _strict(request):
        raise FhirError(
            400,
            "not-supported",
            f"{what} takes no parameter {', '.join(ignored)[:200]} (it reads "
            f"{', '.join(sorted(reads)) or 'none'}).",
        )
    return ignored


def _strict(request: HttpRequest) -> bool:
    """``Prefer: handling=strict``: unknown parameters are refused, not ignored."""
    return "handling=strict" in request.headers.get("Prefer", "").replace(" ", "")


def _name_ignored(response: HttpResponseBase, ignored: list[str]) -> None:
    """``X-FHIR-Ignored-Parameters``: the names as sent, percent-encoded where a header
    may not carry them (a newline)."""
    if ignored:
        response["X-FHIR-Ignored-Parameters"] = ",".join(
            quote(name, safe="!#$&'()*+-./:;<=>?@[]^_`{|}~ ") for name in sorted(ignored)
        )


def _include_into(
    ctx: FhirRequest,
    included: QuerySet[FhirResource],
    column: str,
    seen: set[tuple[str, str]],
    entries: list[str],
    subset: Subset | None = None,
) -> bool:
    """Append the included resources not yet in the Bundle (each appears once); whether
    any was."""
    added = False
    for rtype, lid, text in (
        included.exclude(**{column: ""})
        .order_by("resource_type", "logical_id")
        .values_list("resource_type", "logical_id", column)
    ):
        if (rtype, lid) not in seen:
            seen.add((rtype, lid))
            entries.append(_entry(ctx, rtype, lid, text, "include", subset))
            added = True
    return added


def _include_func(
    funcs: dict[str, handlers.IncludeFunc], value: str, start_type: str, *, reverse: bool
) -> handlers.IncludeFunc | None:
    """The function of an ``_include`` / ``_revinclude`` value ``Type:param``, or of FHIR's
    form naming the target type, ``Type:param:Target`` (what fhirpy's ``include()``
    sends): an include then keeps the targets of that type; a revinclude's target is the
    type it starts from (``start_type``), else it names nothing here."""
    parts = value.split(":")
    if len(parts) == 2:
        return funcs.get(value)
    if len(parts) != 3:
        return None
    func = funcs.get(f"{parts[0]}:{parts[1]}")
    if func is None or (reverse and parts[2] != start_type):
        return None
    if reverse:
        return func
    target = parts[2]
    return lambda user, ids: func(user, ids).filter(resource_type=target)


def _iterate_steps(
    params: dict[str, list[str]],
    used: dict[str, list[str]],
    ignored: list[str],
    strict: bool,
) -> list[tuple[str, handlers.IncludeFunc]]:
    """``_include:iterate`` / ``_revinclude:iterate``: for each value, the type it starts
    from (the source of an include, the target of a revinclude) and the type's function;
    applied to every resource of that type in the Bundle, matches and included alike,
    until a round adds nothing. A value no type offers is ignored (or 400, strict)."""
    steps: list[tuple[str, handlers.IncludeFunc]] = []
    for name in _ITERATE:
        for value in dict.fromkeys(v for v in params.get(name) or [] if v):
            reverse = name == "_revinclude:iterate"
            found: list[tuple[str, handlers.IncludeFunc]] = []
            for h in handlers.HANDLERS.values():
                if not reverse and value.split(":")[0] != h.resource_type:
                    continue
                funcs = h.revincludes if reverse else h.includes
                include_func = _include_func(funcs, value, h.resource_type, reverse=reverse)
                if include_func is not None:
                    found.append((h.resource_type, include_func))
            if not found:
                if strict:
                    raise FhirError(400, "not-supported", f"{name}={value} is not supported.")
                ignored.append(f"{name}={value}")
                continue
            used.setdefault(name, []).append(value)
            steps += found
    return steps


def _entry(
    ctx: FhirRequest,
    resource_type: str,
    logical_id: str,
    text: str,
    mode: str,
    subset: Subset | None = None,
    extensions: list[dict[str, Any]] | None = None,
) -> str:
    """A searchset entry around the stored JSON text (not parsed again unless ``_summary``
    or ``_elements`` cut it down); ``extensions`` go in its ``search`` element."""
    if subset is not None:
        text = subset.apply(text, resource_type, ctx.version)
    search = f'"extension":{dumps(extensions)},' if extensions else ""
    return (
        '{"fullUrl":'
        + json.dumps(f"{ctx.base}/{resource_type}/{logical_id}")
        + ',"resource":'
        + text
        + f',"search":{{{search}"mode":"{mode}"}}}}'
    )


# What an absolute reference to another server's resource becomes: a type we never
# serve, so every reference parameter matches nothing for it.
FOREIGN_REFERENCE = "Foreign/-"


def _local_reference(raw: str, base: str) -> str:
    """A reference search value whose alternatives are absolute URLs: ours (``base``,
    compared as URLs: scheme and host in any case, the default port written or not) made
    relative, another server's made FOREIGN_REFERENCE (it names a resource there, not ours
    with the same id)."""
    out = []
    for value in split_escaped(raw, ","):
        if "://" in value:
            local = under_base(value, base)
            value = local if local is not None else FOREIGN_REFERENCE
        out.append(value)
    return ",".join(out)


def _sort_keys(
    handler: ResourceHandler, values: list[str], ignored: list[str], strict: bool
) -> list[tuple[str, bool]]:
    """``_sort`` (comma-separated, ``-`` for descending; repeated parameters in order): the
    keys this type sorts by, each once. Unknown keys are ignored (named in
    X-FHIR-Ignored-Parameters), or 400 with ``Prefer: handling=strict``."""
    keys: list[tuple[str, bool]] = []
    for value in values:
        for raw in value.split(","):
            name = raw.strip()
            if not name:
                continue
            descending = name.startswith("-")
            key = name.removeprefix("-")
            if key not in handlers.SORTS and key not in handler.sorts | handler.param_sorts:
                if strict:
                    raise FhirError(400, "not-supported", f"_sort={name} is not supported.")
                ignored.append(f"_sort={name}")
                continue
            if all(key != known for known, _d in keys):
                keys.append((key, descending))
    return keys


def _with_param_sorts(
    handler: ResourceHandler, sort: list[tuple[str, bool]], own: dict[str, list[str]]
) -> tuple[list[tuple[str, bool]], dict[str, Any]]:
    """The ``_sort`` keys with the type's ``param_sorts`` whose parameter the search gives
    once (first when there is no ``_sort``, else last), and their expressions made from
    its value; ``_sort`` by one whose parameter is not given once is 400."""
    made: dict[str, Any] = {}
    for key, param_sort in handler.param_sorts.items():
        values = own.get(param_sort.param) or []
        if len(values) != 1:
            if any(key == known for known, _d in sort):
                raise FhirError(
                    400,
                    "invalid",
                    f"_sort={key} needs one {param_sort.param} parameter (the value it is "
                    f"measured from), and this search has {len(values)}.",
                    expression=["_sort"],
                )
            continue
        made[key] = param_sort.expression(values[0])
        if all(key != known for known, _d in sort):
            sort = [*sort, (key, False)]
    return sort, made


def _match_extensions(
    handler: ResourceHandler, sort: list[tuple[str, bool]], values: tuple[Any, ...]
) -> list[dict[str, Any]]:
    """The ``search`` extensions of a match from its sort ``values`` (Location near: its
    distance)."""
    found: list[dict[str, Any]] = []
    for (key, _descending), value in zip(sort, values, strict=False):
        param_sort = handler.param_sorts.get(key)
        if param_sort is not None and param_sort.extension is not None and value is not None:
            found += param_sort.extension(value)
    return found


def _sorted_page(
    handler: ResourceHandler,
    rows: Any,
    sort: list[tuple[str, bool]],
    column: str,
    count: int,
    offset: int,
    after: list[Any] | None = None,
    made_sorts: dict[str, Any] | None = None,
) -> list[tuple[Any, ...]]:
    """A page ordered by ``_sort`` (none: the type's own order, also the tie-break for
    stable paging), from ``offset`` or, with ``after`` (a cursor's values), after that
    row: the page's primary keys first (sorted and cut from the index where it covers the
    sort key), then the JSON of just those rows, in the same order; the text columns of
    the other matches are never read. Each row: (type, id, JSON, its sort values).
    ``made_sorts``: the expressions of the ``param_sorts`` keys (``_with_param_sorts``)."""
    made_sorts = made_sorts or {}
    annotations: dict[str, Any] = {}
    ordering: list[Any] = []
    keys: list[tuple[str, bool]] = []
    for index, (key, descending) in enumerate(sort):
        alias = f"sort_{index}"
        if key in handlers.SORTS:
            annotations[alias] = F(handlers.SORTS[key])
        else:
            annotations[alias] = made_sorts[key] if key in made_sorts else handler.sorts[key]
        ordering.append(
            F(alias).desc(nulls_last=True) if descending else F(alias).asc(nulls_last=True)
        )
        keys.append((alias, descending))
    keys += [(name, False) for name in handler.order_by]

    def ordered(queryset: Any) -> Any:
        return queryset.annotate(**annotations).order_by(*ordering, *handler.order_by)

    if after is not None:
        page_pks = ordered(rows).filter(paging.after_q(keys, after)).values("pk")[:count]
    else:
        page_pks = ordered(rows).values("pk")[offset : offset + count]
    found = ordered(FhirResource.objects.filter(pk__in=page_pks)).values_list(
        "resource_type", "logical_id", column, *[name for name, _d in keys]
    )
    return [(*row[:3], tuple(row[3:])) for row in found]


def _search_by_sql(
    user: User,
    handler: ResourceHandler,
    own: dict[str, list[str]],
    used: dict[str, list[str]],
    column: str,
    count: int,
    offset: int,
    want_total: bool,
    sort: list[tuple[str, bool]] | None = None,
    after: list[Any] | None = None,
) -> tuple[int | None, list[tuple[Any, ...]], list[int | None]] | None:
    """The search as one prepared statement (the count beside the page) when the handler
    can state it in SQL (``search_sql``, and ``sort_sql`` for each ``_sort`` key): the hot
    worklist polls skip the ORM's query building, PostgreSQL's planning and a round trip
    (docs/performance.md). Rows as ``_sorted_page``'s, and the rows' ``source_pk`` (the
    referrals, for the audit: no lookup by filler id). None: use the ORM path."""
    sort = sort or []
    sort_sql = {**handlers.SORTS_SQL, **handler.sort_sql}
    if (
        handler.search_sql is None
        or connection.vendor != "postgresql"
        or handler.order_by != ("logical_id",)
        or "_id" in used
        or "_id:not" in used
        or "_lastUpdated" in used
        or any(key not in sort_sql for key, _descending in sort)
    ):
        return None
    found = handler.search_sql(user, own)
    if found is None:
        return None
    body, params = found
    if not handler.renders_all_versions:
        body += f" AND f.{column} <> ''"
    keys = [(sort_sql[key], descending) for key, descending in sort] + [("f.logical_id", False)]

    def direction(descending: bool) -> str:
        return "DESC NULLS LAST" if descending else "ASC NULLS LAST"

    order = ", ".join(f"{expression} {direction(d)}" for expression, d in keys)
    key_columns = ", ".join(f"{expression} AS k{i}" for i, (expression, _d) in enumerate(keys))
    selected = ", ".join(f"q.k{i}" for i in range(len(keys)))
    again = ", ".join(f"q.k{i} {direction(d)}" for i, (_e, d) in enumerate(keys))
    table = FhirResource._meta.db_table

    def rows_of(found_rows: list[Any], skip: int) -> list[tuple[Any, ...]]:
        return [(*row[:3], tuple(row[skip:])) for row in found_rows]

    def sources(found_rows: list[Any]) -> list[int | None]:
        return [row[3] for row in found_rows]

    # LIMIT/OFFSET as literals (ints) so the plan is a top-N sort; the JSON is read only
    # for the page's rows. Prepared (planned once per connection) for the first page in
    # the default order or one sort key: the polls a worklist repeats. Other pages and
    # sorts are planned each time, so a client paging or sorting every way does not evict
    # the hot statements from the connection's cache of prepared statements (psycopg
    # keeps 100).
    prepare = offset == 0 and len(sort) <= 1 and after is None
    if not want_total or after is not None:
        where, where_params = body, list(params)
        if after is not None:  # the rows after the cursor: no offset
            condition, more = paging.after_sql(keys, after)
            where, where_params, offset = f"{body} AND {condition}", where_params + more, 0
        inner = (
            f"SELECT f.id, {key_columns} {where} ORDER BY {order} "
            f"LIMIT {int(count)} OFFSET {int(offset)}"
        )
        rows = fetch_prepared(
            f"SELECT x.resource_type, x.logical_id, x.{column}, x.source_pk, {selected} "  # noqa: S608
            f"FROM ({inner}) q JOIN {table} x ON x.id = q.id ORDER BY {again}",
            where_params,
            prepare=prepare,
        )
        total = None
        if want_total:  # after a cursor: the count of every match, apart
            total = int(fetch_prepared(f"SELECT count(*) {body}", params, prepare=False)[0][0])
        return total, rows_of(rows, 4), sources(rows)
    # The count and the page in one statement and one pass over the matches: each match
    # numbered in the order and counted (window functions, before the LIMIT); the JSON
    # read for the page's rows only. (The count as a second pass over the matches cost
    # ~1.5 ms of a 4 ms statement at 300 matches.)
    numbered = (
        f"SELECT f.id, count(*) OVER () AS n, row_number() OVER (ORDER BY {order}) AS ord, "
        f"{key_columns} {body} ORDER BY ord LIMIT {int(count)} OFFSET {int(offset)}"
    )
    rows = fetch_prepared(
        f"SELECT x.resource_type, x.logical_id, x.{column}, x.source_pk, q.n, {selected} "  # noqa: S608
        f"FROM ({numbered}) q JOIN {table} x ON x.id = q.id ORDER BY q.ord",
        params,
        prepare=prepare,
    )
    if rows:
        return int(rows[0][4]), rows_of(rows, 5), sources(rows)
    if offset == 0 and count > 0:
        return 0, [], []
    # An empty page past the end (or _count=0): no row carries the count.
    return int(fetch_prepared(f"SELECT count(*) {body}", params, prepare=False)[0][0]), [], []


def _links(
    self_url: str,
    used: dict[str, list[str]],
    count: int,
    offset: int,
    total: int | None,
    page_len: int,
    *,
    more: bool | None = None,
    cursor: str | None = None,
    next_cursor: str | None = None,
) -> list[dict[str, str]]:
    """self, next and previous. With ``next_cursor`` (a search) the next page is the rows
    after this one's last (``paging``); its ``_offset`` only counts, for ``previous``.
    ``more``: known by the caller (a page after a cursor), else from the total."""

    def url(at: int, after: str | None = None) -> str:
        query = [(k, v) for k, vs in sorted(used.items()) for v in vs]
        query += [("_count", str(count))]
        if at:
            query.append(("_offset", str(at)))
        if after:
            query.append(("_cursor", after))
        return f"{self_url}?{urlencode(query)}"

    links = [{"relation": "self", "url": url(offset, cursor)}]
    if more is None:
        more = (offset + page_len < total) if total is not None else page_len == count
    if more and count > 0:
        links.append({"relation": "next", "url": url(offset + count, next_cursor)})
    if offset > 0 and count > 0:  # _count=0 pages nothing: no next, no previous
        links.append({"relation": "previous", "url": url(max(0, offset - count))})
    return links


def _bundle_response(
    ctx: FhirRequest,
    bundle_type: str,
    total: int | None,
    links: list[dict[str, str]],
    entries: list[str],
) -> HttpResponse:
    head: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "meta": {"lastUpdated": fhir_instant(timezone.now())},
        "type": bundle_type,
    }
    if total is not None:
        head["total"] = total
    head["link"] = links
    text = dumps(head)[:-1]
    if entries:
        text += ',"entry":[' + ",".join(entries) + "]"
    text += "}"
    return HttpResponse(text, content_type=media_type_for(ctx.version))
