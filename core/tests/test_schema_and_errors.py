import json
import logging

import pytest
from django.core.management import call_command
from django.test import Client

from core.logging import RequestIdFilter, reset_request_id, set_request_id


def test_openapi_schema_generates_without_warnings(tmp_path) -> None:
    out = tmp_path / "schema.yaml"

    call_command("spectacular", "--file", str(out), "--fail-on-warn", "--validate")

    text = out.read_text()
    assert "/api/v1/facilities/" in text
    assert "bearerAuth" in text


@pytest.mark.django_db
def test_api_errors_are_json_problems_with_the_request_id(client: Client) -> None:
    response = client.get("/api/v1/facilities/", HTTP_X_REQUEST_ID="req-42")

    assert response.status_code == 401
    assert response["Content-Type"].startswith("application/problem+json")
    assert response.json() == {
        "status": 401,
        "code": "not_authenticated",
        "detail": "Authentication credentials were not provided.",
        "request_id": "req-42",
    }


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/v1/referrals/-1/", "/api/v1/countries//", "/api/nope"])
def test_api_paths_that_route_nowhere_are_json_problems(client: Client, path: str) -> None:
    """Found by tests/test_api_fuzz.py: these never reach DRF (Django's HTML 404 page)."""
    response = client.get(path, HTTP_X_REQUEST_ID="req-43")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/problem+json")
    assert response.json() == {
        "status": 404,
        "code": "not_found",
        "detail": "Not found.",
        "request_id": "req-43",
    }


@pytest.mark.django_db
def test_other_paths_that_route_nowhere_keep_the_html_page(client: Client) -> None:
    response = client.get("/no/such/page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_log_lines_are_json_with_the_request_id() -> None:
    from pythonjsonlogger.json import JsonFormatter

    formatter = JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s")
    record = logging.LogRecord("consilium", logging.INFO, __file__, 1, "hello", None, None)
    token = set_request_id("abc")
    try:
        RequestIdFilter().filter(record)
    finally:
        reset_request_id(token)

    line = json.loads(formatter.format(record))

    assert line["message"] == "hello"
    assert line["request_id"] == "abc"
