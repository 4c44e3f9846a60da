"""Rules on registry values that more than one way in (API, admin, import) and the FHIR
delivery share, so that what the registry stores is what the gateway can use."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from django.core.exceptions import ValidationError

# A BCP-47 language tag's shape: a 2-3 letter language, then subtags of 1-8 letters or
# digits (region, script, a private-use "x-..."). Case-insensitive, as BCP-47 is.
LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")

# The largest value of PostgreSQL's `integer`, the column type of a PositiveIntegerField
# (SQLite stores any size: without this bound a value PostgreSQL refuses was accepted).
INTEGER_MAX = 2**31 - 1

# An environment variable's name: `auth_secret_ref` names one (or NAME_FILE, a file).
SECRET_REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def fhir_base_url_problem(url: str) -> str:
    """Why the gateway cannot send to this FHIR base URL ("" when it can): the resource
    path is appended to it, so a query or fragment would swallow it, and only http(s) to
    a host and a valid port is sent (``ftp://`` and port 99999 were retried for hours)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return "is not an http(s) URL with a host and port"
    if parts.query or parts.fragment:
        return "has a query or fragment; a FHIR base has none"
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number, or past 65535
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        return "is not an http(s) URL with a host and port"
    return ""


def endpoint_base_url_problem(url: str) -> str:
    """Why the registry refuses to store an endpoint's base URL ("" when it takes it):
    what the gateway cannot send to, and a user name or password in the URL, which the
    registry would publish (``/fhir/Endpoint``, the endpoint list) to every reader."""
    problem = fhir_base_url_problem(url)
    if problem:
        return problem
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return (
            "holds a user name or password; give credentials by auth_type and "
            "auth_secret_ref, never in the URL"
        )
    return ""


def validate_endpoint_base_url(value: str) -> None:
    """The model field's validator (so the API, the admin and full_clean refuse alike)."""
    problem = endpoint_base_url_problem(value)
    if problem:
        raise ValidationError(f"The base URL {problem}.", code="endpoint_base_url")


def endpoint_base_url_key(url: str) -> str:
    """The form two base URLs are compared (and a new one stored) in: scheme and host
    are case-insensitive and a trailing slash names the same base (delivery strips it),
    so ``HTTPS://Fhir.Example.org/fhir/`` is ``https://fhir.example.org/fhir``. The path
    keeps its case: servers may tell it apart."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url
    return urlunsplit(
        (
            parts.scheme.lower(),
            parts.netloc.lower(),
            parts.path.rstrip("/"),
            parts.query,
            parts.fragment,
        )
    )
