"""The floor under the ingest benchmark: what a transaction Bundle costs a Django server
that does almost nothing with it. Served by gunicorn for ``bench/fhir.py --only floor``
(never by Consilium itself), in the same run as the real ``POST /fhir``:

- ``/hello``: the request read, a fixed answer (Django with no middleware, no database);
- ``/store``: ``json.loads`` of the Bundle, then one transaction of four INSERTs (each
  entry's resource as JSONB, and an event row) on a persistent psycopg connection, the
  answer a small JSON list of the new ids (the product brief's "minimal view");
- ``/validate``: the same, after validating the Bundle once with fhir.resources' R4B
  models (as the gateway must), storing the JSON that was validated.

Each rung adds one thing the real path cannot do without, so the table shows where
0.10 x the raw INSERT rate lies.
"""

from __future__ import annotations

import json
import os
from typing import Any

import django
import psycopg
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="bench-floor",  # noqa: S106 (a bench server on 127.0.0.1, no sessions)
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1"],
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    DATABASES={},
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from fhir.resources.R4B.bundle import Bundle  # noqa: E402

_connection: psycopg.Connection[Any] | None = None


def _conn() -> psycopg.Connection[Any]:
    global _connection  # one connection per worker process, as CONN_MAX_AGE
    if _connection is None or _connection.closed:
        _connection = psycopg.connect(os.environ["FLOOR_DSN"])
    return _connection


def _store(bundle: dict[str, Any]) -> HttpResponse:
    conn = _conn()
    ids = []
    with conn.transaction():
        for entry in bundle["entry"]:
            row = conn.execute(
                "INSERT INTO bench_floor_resource (doc) VALUES (%s::jsonb) RETURNING id",
                [json.dumps(entry["resource"])],
            ).fetchone()
            assert row is not None
            ids.append(row[0])
        conn.execute("INSERT INTO bench_floor_event (kind) VALUES ('submit')")
    return HttpResponse(json.dumps(ids), content_type="application/fhir+json")


@csrf_exempt
def hello(request: HttpRequest) -> HttpResponse:
    request.body  # noqa: B018 (read, as any view would)
    return HttpResponse(b'{"ok":true}', content_type="application/fhir+json")


@csrf_exempt
def store(request: HttpRequest) -> HttpResponse:
    return _store(json.loads(request.body))


@csrf_exempt
def validate(request: HttpRequest) -> HttpResponse:
    bundle = json.loads(request.body)
    Bundle.model_validate(bundle)
    return _store(bundle)


urlpatterns = [path("hello", hello), path("store", store), path("validate", validate)]

application = get_wsgi_application()
