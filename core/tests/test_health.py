import pytest
from django.test import Client


@pytest.mark.django_db
def test_healthz_reports_ok_when_database_and_broker_answer(client: Client) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
    assert response["X-Request-ID"]


@pytest.mark.django_db
def test_healthz_names_the_broker_when_it_is_unreachable(client: Client, settings) -> None:
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1

    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert set(body["failing"]) == {"broker"}
    assert "127.0.0.1:1" in body["failing"]["broker"]


@pytest.mark.django_db
def test_request_id_from_caller_is_echoed(client: Client) -> None:
    response = client.get("/healthz", HTTP_X_REQUEST_ID="abc-123")

    assert response["X-Request-ID"] == "abc-123"
