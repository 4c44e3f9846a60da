import socket
import sqlite3
import threading

import pytest
from django.test import Client

from core.health import check_broker


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
    # the kind of failure; its details (host names) go to the log, not to any caller
    assert "127.0.0.1" not in response.content.decode()
    assert body["failing"]["broker"]


@pytest.mark.django_db
def test_healthz_opens_the_embedded_broker(client: Client, settings, tmp_path) -> None:
    """The SQLAlchemy transport connects lazily: its database is opened here."""
    settings.CELERY_BROKER_URL = f"sqla+sqlite:///{tmp_path}/missing-dir/broker.sqlite3"
    response = client.get("/healthz")
    assert response.status_code == 503
    assert set(response.json()["failing"]) == {"broker"}

    missing = tmp_path / "broker.sqlite3"
    settings.CELERY_BROKER_URL = f"sqla+sqlite:///{missing}"
    assert client.get("/healthz").status_code == 503  # no broker database yet
    assert not missing.exists()  # and the probe did not create one

    missing.write_bytes(b"not a SQLite database " * 100)  # a damaged file
    assert client.get("/healthz").status_code == 503
    missing.unlink()
    sqlite3.connect(missing).close()  # as kombu creates it
    assert client.get("/healthz").status_code == 200


def test_the_sqlalchemy_broker_check_keeps_its_timeout() -> None:
    """A broker host that accepts the connection and never answers does not hang it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    answer: list[object] = []
    worker = threading.Thread(
        target=lambda: answer.append(
            check_broker(f"sqla+postgresql+psycopg://u:p@127.0.0.1:{port}/x", timeout=1)
        ),
        daemon=True,
    )
    worker.start()
    worker.join(10)
    server.close()
    assert answer and answer[0] is not None  # an error, in time


@pytest.mark.django_db
def test_healthz_answers_head(client: Client) -> None:
    assert client.head("/healthz").status_code == 200
    assert client.post("/healthz").status_code == 405


@pytest.mark.django_db
def test_request_id_from_caller_is_echoed(client: Client) -> None:
    response = client.get("/healthz", HTTP_X_REQUEST_ID="abc-123")

    assert response["X-Request-ID"] == "abc-123"


@pytest.mark.django_db
def test_make_run_creates_the_embedded_broker_before_the_health_check(
    client: Client, settings, tmp_path
) -> None:
    """`make run` used to answer /healthz 503 until its worker first connected."""
    from core.health import embedded_broker_prepare

    path = tmp_path / "var" / "broker.sqlite3"
    settings.CELERY_BROKER_URL = f"sqla+sqlite:///{path}"
    assert client.get("/healthz").json()["failing"] == {"broker": "FileNotFoundError"}
    assert embedded_broker_prepare() == path
    assert client.get("/healthz").status_code == 200
    assert embedded_broker_prepare() == path  # again: the same file, still healthy
    assert client.get("/healthz").status_code == 200
    assert embedded_broker_prepare("redis://127.0.0.1:6379/0") is None
