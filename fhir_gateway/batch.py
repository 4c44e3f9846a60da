"""FHIR ``batch`` Bundles (``POST /fhir``): each entry answered as if it had been sent alone.

Each entry becomes a request of its own and goes through the URL routes to the view that
would answer it alone (``fhir_gateway.urls``), so it takes the same code path, permission
checks, refusals and audit as the single request:

- the same account: the batch's ``Authorization`` (each entry authenticates as the single
  request would);
- the same FHIR version: ``Accept`` is the version negotiated for the batch, an entry's
  ``resource`` is sent in the batch's body version (``Content-Type``);
- the batch's other headers (``Prefer``, the request id, where it came from), the entry's
  own ``request.ifMatch`` / ``ifNoneMatch`` / ``ifNoneExist`` / ``ifModifiedSince`` as the
  headers they stand for, and none of the batch's own conditions;
- a PATCH entry's ``resource`` is a Binary holding the patch document (FHIR's way of
  carrying one in a Bundle), sent under its ``contentType``.

Each entry runs in a transaction of its own (a savepoint when the caller holds one). An
entry answered with an error (4xx, 5xx) is rolled back, whatever it did before it failed,
and so is the aborted transaction a database error leaves behind: the next entry starts on
a clean connection. A successful entry commits before the next one starts.

FHIR (http.html#brules): the entries of a batch SHALL NOT depend on each other, and
servers SHOULD check it. A Bundle in which an entry names another entry's ``urn:uuid:`` /
``urn:oid:`` ``fullUrl`` (a resource the batch would create, whose id nobody knows) is
refused whole with 400, before any entry runs; so is a Bundle of more than
``FHIR_BATCH_MAX_ENTRIES`` entries (413). What is wrong with one entry alone (no
``request``, an unknown method, a URL of another server, a nested transaction or batch) is
that entry's 400, as a malformed single request would be.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import re
import uuid
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

from django.conf import settings
from django.core.handlers.wsgi import WSGIRequest
from django.db import transaction
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.urls import Resolver404, ResolverMatch, resolve
from django.utils.encoding import iri_to_uri

from fhir_gateway.outcomes import FhirError, fhir_error_for, operation_outcome, outcome_body
from fhir_gateway.referral_mapping import under_base
from fhir_gateway.storage import dumps, fhir_instant
from fhir_gateway.versions import JSON_TYPES, media_type_for, parse_media_range
from referrals.attachments import files_removed_on_failure

logger = logging.getLogger(__name__)

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# Bundle.entry.request elements and the request headers they stand for.
CONDITIONS = {
    "ifMatch": "HTTP_IF_MATCH",
    "ifNoneMatch": "HTTP_IF_NONE_MATCH",
    "ifNoneExist": "HTTP_IF_NONE_EXIST",
    "ifModifiedSince": "HTTP_IF_MODIFIED_SINCE",
}
# The batch's own request: none of it is an entry's.
_NOT_INHERITED = frozenset(
    {
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
        "HTTP_CONTENT_TYPE",
        "HTTP_CONTENT_LENGTH",
        "QUERY_STRING",
        "PATH_INFO",
        "REQUEST_METHOD",
        "HTTP_ACCEPT",
        "wsgi.input",
        # the batch's own URL as some servers pass it (mod_wsgi, gunicorn)
        "SCRIPT_URL",
        "REDIRECT_URL",
        "REQUEST_URI",
        "RAW_URI",
        *CONDITIONS.values(),
    }
)
_CREATED = ("urn:uuid:", "urn:oid:")
# Resources whose id names no stored resource of the server: no fullUrl for them.
_NOT_STORED = frozenset({"Bundle", "OperationOutcome", "Parameters"})


def max_entries() -> int:
    return int(settings.FHIR_BATCH_MAX_ENTRIES)


def batch_answer(
    request: HttpRequest,
    *,
    bundle: dict[str, Any],
    version: str,
    body_version: str,
    base: str,
) -> str:
    """The batch-response Bundle (JSON text) of a batch ``bundle`` sent in ``request``:
    one entry per entry, in order. Raises FhirError for a Bundle refused whole (nothing
    run)."""
    entries = bundle.get("entry") or []
    if len(entries) > max_entries():
        raise FhirError(
            413,
            "too-costly",
            f"A batch may hold at most {max_entries()} entries; this one holds "
            f"{len(entries)}. Nothing was processed: send it in smaller batches.",
            expression=["Bundle.entry"],
        )
    check_independent(entries)
    # (fullUrl, versionId) given to an entry so far: FHIR's bdl-7 allows a fullUrl once per
    # version (two reads of one resource: the second entry goes without).
    named: set[tuple[str, str]] = set()
    answers = [
        _answer(
            request,
            entry,
            index,
            version=version,
            body_version=body_version,
            base=base,
            named=named,
        )
        for index, entry in enumerate(entries)
    ]
    head = {"resourceType": "Bundle", "id": uuid.uuid4().hex, "type": "batch-response"}
    # The entries' answers are spliced as the single requests' texts (a page of a search
    # is not parsed and written again).
    return dumps(head)[:-1] + ',"entry":[' + ",".join(answers) + "]}"


def check_independent(entries: list[Any]) -> None:
    """400 when an entry names another entry's ``urn:uuid:`` / ``urn:oid:`` fullUrl: in its
    resource (any string equal to it: a reference, an attachment's url) or in its request
    (the URL, a condition)."""
    created: dict[str, int] = {}
    for index, entry in enumerate(entries):
        full_url = entry.get("fullUrl") if isinstance(entry, dict) else None
        if isinstance(full_url, str) and full_url.startswith(_CREATED):
            created.setdefault(full_url, index)
    if not created:
        return
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        for text in _strings(entry.get("resource")):
            if created.get(text, index) != index:
                _refuse_dependency(index, text, created[text])
        request = entry.get("request")
        if isinstance(request, dict):
            for key in ("url", *CONDITIONS):
                value = request.get(key)
                if not isinstance(value, str):
                    continue
                for full_url, other in created.items():
                    if other != index and _names(value, full_url):
                        _refuse_dependency(index, full_url, other)


def _names(text: str, full_url: str) -> bool:
    """``text`` holds ``full_url`` whole: not ``urn:uuid:1`` inside ``urn:uuid:10``."""
    return re.search(re.escape(full_url) + r"(?![A-Za-z0-9.\-])", text) is not None


def _refuse_dependency(index: int, full_url: str, other: int) -> None:
    raise FhirError(
        400,
        "invalid",
        f"Bundle.entry[{index}] names {full_url!r}, the fullUrl of Bundle.entry[{other}]: the "
        "entries of a batch may not depend on each other (FHIR http.html#brules). Nothing "
        "was processed; send a transaction, or the requests one after the other.",
        expression=[f"Bundle.entry[{index}]"],
    )


def _strings(value: Any) -> list[str]:
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


# --------------------------------------------------------------------------- one entry


def _answer(
    request: HttpRequest,
    entry: Any,
    index: int,
    *,
    version: str,
    body_version: str,
    base: str,
    named: set[tuple[str, str]],
) -> str:
    """The batch-response entry (JSON text) of one entry."""
    try:
        inner, match = _entry_request(
            request, entry, index, version=version, body_version=body_version, base=base
        )
    except FhirError as exc:
        return _error_entry(exc)
    try:
        # An error answer leaves the block (raised): the entry's transaction rolls back
        # whatever it did before it failed, and its case files go with it (also when the
        # commit fails).
        with files_removed_on_failure(), transaction.atomic():
            response = match.func(inner, *match.args, **match.kwargs)
            if response.status_code >= 400:
                raise _EntryFailed(response)
    except _EntryFailed as failed:
        response = failed.response
    except Exception as exc:  # the view answers its own errors: this is the commit's
        error = fhir_error_for(exc)
        if error is None:
            logger.exception("unexpected error in a batch entry")
            error = FhirError(500, "exception", "Internal error; quote the request id.")
        return _error_entry(error)
    return _entry_of(response, inner.method or "GET", base, named)


class _EntryFailed(Exception):
    """An entry answered with an error (4xx, 5xx): its transaction is rolled back."""

    def __init__(self, response: HttpResponseBase) -> None:
        super().__init__(response.status_code)
        self.response = response


def _entry_request(
    outer: HttpRequest,
    entry: Any,
    index: int,
    *,
    version: str,
    body_version: str,
    base: str,
) -> tuple[HttpRequest, ResolverMatch]:
    """The request an entry stands for, and the route that answers it; 400 for an entry
    that is no request."""
    where = f"Bundle.entry[{index}]"
    if not isinstance(entry, dict):
        raise FhirError(400, "structure", f"{where} is not an object.", expression=[where])
    spec = entry.get("request")
    if not isinstance(spec, dict):
        raise FhirError(
            400,
            "required",
            f"{where} has no request (method and url): a batch entry is a request.",
            expression=[f"{where}.request"],
        )
    method = spec.get("method")
    if method not in METHODS:
        raise FhirError(
            400,
            "invalid",
            f"{where}.request.method {method!r} is not one of {', '.join(METHODS)}.",
            expression=[f"{where}.request.method"],
        )
    raw_url = spec.get("url")
    if not isinstance(raw_url, str) or not raw_url.strip():
        raise FhirError(
            400, "required", f"{where}.request.url is missing.", expression=[f"{where}.request.url"]
        )
    path, query = _split_url(raw_url, base, f"{where}.request.url")
    body, content_type = _entry_body(entry.get("resource"), method, body_version, where)

    environ = {k: v for k, v in outer.META.items() if k not in _NOT_INHERITED}
    for element, header in CONDITIONS.items():
        value = spec.get(element)
        if value is None:
            continue
        if not isinstance(value, str):
            raise FhirError(
                400,
                "invalid",
                f"{where}.request.{element} must be a string.",
                expression=[f"{where}.request.{element}"],
            )
        environ[header] = value
    prefix = outer.path_info.rstrip("/")  # where the FHIR routes are mounted: /fhir
    environ.update(
        {
            "REQUEST_METHOD": method,
            "PATH_INFO": f"{prefix}/{path}",
            "QUERY_STRING": query,
            "HTTP_ACCEPT": media_type_for(version),
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
            "wsgi.url_scheme": outer.scheme,
        }
    )
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    inner = WSGIRequest(environ)
    if hasattr(outer, "request_id"):
        inner.request_id = outer.request_id  # type: ignore[attr-defined]
    try:
        match = resolve(inner.path_info)
    except Resolver404 as exc:  # the FHIR routes end with a catch-all: not expected
        raise FhirError(404, "not-found", f"{where}.request.url names nothing here.") from exc
    if match.namespace != "fhir" or (match.url_name == "root" and method == "POST"):
        raise FhirError(
            400,
            "not-supported",
            f"{where}: a transaction or batch cannot be an entry of a batch; send it on its own.",
            expression=[f"{where}.request.url"],
        )
    return inner, match


def _split_url(raw: str, base: str, where: str) -> tuple[str, str]:
    """(path under the FHIR base, as WSGI's PATH_INFO holds it: percent-decoded; query)
    of an entry's URL, relative to the base or an absolute URL under it."""
    parts = urlsplit(iri_to_uri(raw.strip()))
    path = parts.path
    if parts.scheme or parts.netloc:
        # Compared as every reference to ours is (scheme and host in any case, the default
        # port written or not: m.under_base); the slash added lets the base itself match.
        local = under_base(urlunsplit((parts.scheme, parts.netloc, path + "/", "", "")), base)
        if local is None:
            raise FhirError(
                400,
                "not-supported",
                f"{where} {raw[:200]!r} is not on this server: use a URL relative to {base}.",
                expression=[where],
            )
        path = local[:-1]
    return unquote_to_bytes(path.lstrip("/")).decode("latin-1"), parts.query


def _entry_body(
    resource: Any, method: str, body_version: str, where: str
) -> tuple[bytes, str | None]:
    """The body (and its Content-Type) an entry's request carries: its resource as FHIR
    JSON; for a PATCH, the patch document a Binary holds."""
    if method not in _WITH_BODY:
        return b"", None  # FHIR: a GET or DELETE entry's resource is not read
    if resource is None:  # answered as the single request without a body
        return b"", media_type_for(body_version)
    if not isinstance(resource, dict):
        raise FhirError(
            400, "structure", f"{where}.resource is not a resource.", expression=[where]
        )
    if resource.get("resourceType") == "Bundle" and resource.get("type") in (
        "batch",
        "transaction",
    ):
        raise FhirError(
            400,
            "not-supported",
            f"{where}: a transaction or batch cannot be an entry of a batch; send it on its own.",
            expression=[f"{where}.resource"],
        )
    if method == "PATCH" and resource.get("resourceType") == "Binary":
        try:
            # base64Binary may be wrapped (MIME's 76-column lines): whitespace is dropped,
            # as for every other base64 read here (referral_mapping.attachment_bytes).
            text = "".join(str(resource.get("data") or "").split())
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FhirError(
                400,
                "invalid",
                f"{where}.resource.data is not base64.",
                expression=[f"{where}.resource.data"],
            ) from exc
        return data, str(resource.get("contentType") or "")
    return json.dumps(resource).encode(), media_type_for(body_version)


def _error_entry(error: FhirError) -> str:
    return dumps(
        {"response": {"status": _status_line(error.status), "outcome": outcome_body(error)}}
    )


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _entry_of(
    response: HttpResponseBase, method: str, base: str, named: set[tuple[str, str]]
) -> str:
    """An entry's answer as a batch-response entry: the status, Location, ETag and
    Last-Modified; the body as ``resource``, or as ``outcome`` when it is an error's or a
    write's OperationOutcome; warnings the single answer gives in headers as ``outcome``."""
    status = response.status_code
    answer: dict[str, Any] = {"status": _status_line(status)}
    if response.has_header("Location"):
        answer["location"] = response["Location"]
    if response.has_header("ETag"):
        answer["etag"] = response["ETag"]
    if response.has_header("Last-Modified"):
        with contextlib.suppress(TypeError, ValueError):
            answer["lastModified"] = fhir_instant(parsedate_to_datetime(response["Last-Modified"]))
    text, body = _body_of(response)
    entry: dict[str, str] = {}
    if (
        isinstance(body, dict)
        and body.get("resourceType") == "OperationOutcome"
        and (status >= 400 or method not in ("GET", "HEAD"))
    ):
        answer["outcome"] = body
    elif status >= 400:  # not expected: every error under /fhir is an OperationOutcome
        answer["outcome"] = operation_outcome("exception", f"Answered {status}.")
    elif isinstance(body, dict):
        rtype, rid = body.get("resourceType"), body.get("id")
        meta = body.get("meta")
        version_id = meta.get("versionId", "") if isinstance(meta, dict) else ""
        key = (f"{base}/{rtype}/{rid}", str(version_id))
        stored = isinstance(rtype, str) and isinstance(rid, str) and rtype not in _NOT_STORED
        if stored and key not in named:
            named.add(key)
            entry["fullUrl"] = json.dumps(key[0])
        entry["resource"] = text
    if "outcome" not in answer and status < 400:
        issues = _header_warnings(response)
        if issues:
            answer["outcome"] = {"resourceType": "OperationOutcome", "issue": issues}
    entry["response"] = dumps(answer)
    return "{" + ",".join(f'"{name}":{value}' for name, value in entry.items()) + "}"


def _header_warnings(response: HttpResponseBase) -> list[dict[str, Any]]:
    """What a single answer says in headers only: a write's warning, the search parameters
    it did not read."""
    issues = []
    if response.has_header("X-FHIR-Warning"):
        issues.append(
            {
                "severity": "warning",
                "code": "business-rule",
                "diagnostics": response["X-FHIR-Warning"],
            }
        )
    if response.has_header("X-FHIR-Ignored-Parameters"):
        issues.append(
            {
                "severity": "warning",
                "code": "not-supported",
                "diagnostics": "Parameters not read: " + response["X-FHIR-Ignored-Parameters"],
            }
        )
    return issues


def _body_of(response: HttpResponseBase) -> tuple[str, Any]:
    """The answer's body as JSON text and parsed: its FHIR JSON, or a Binary holding other
    bytes; ("", None) when it has none."""
    if response.streaming:
        raw = b"".join(response.streaming_content)  # type: ignore[attr-defined]
        streamed = getattr(response, "file_to_stream", None)
        if streamed is not None:  # the file alone: the response's close() would end the request
            streamed.close()
    else:
        raw = response.content  # type: ignore[attr-defined]
    if not raw:
        return "", None
    content_type = response.get("Content-Type") or ""
    media = parse_media_range(content_type)
    if media is not None and media.media_type in JSON_TYPES:
        try:
            text = raw.decode("utf-8")
            return text, json.loads(text)
        except ValueError:  # UnicodeDecodeError too
            pass
    binary = {
        "resourceType": "Binary",
        "contentType": media.media_type if media else "application/octet-stream",
        "data": base64.b64encode(raw).decode("ascii"),
    }
    return dumps(binary), binary
