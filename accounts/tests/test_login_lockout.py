"""Password guessing: repeated failed logins of one user name from one address lock that
pair out for a while (django-axes); other users and other addresses are not affected."""

from __future__ import annotations

from io import StringIO

import pytest
from django.test import Client

from accounts.models import User

pytestmark = pytest.mark.django_db

PASSWORD = "right-Pass-123"


def _login(username: str, password: str, address: str = "10.0.0.1") -> tuple[Client, int]:
    client = Client(REMOTE_ADDR=address)
    response = client.post("/accounts/login/", {"username": username, "password": password})
    return client, response.status_code


def _logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def test_five_failures_lock_the_user_out_from_that_address(settings) -> None:
    User.objects.create_user(username="clin", password=PASSWORD)
    User.objects.create_user(username="other", password=PASSWORD)
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert _login("clin", "guess")[1] == 200  # the form again, with its error

    client, status = _login("clin", "guess")  # the limit reached: locked
    assert status == 429
    client, status = _login("clin", PASSWORD)  # even with the right password
    assert status == 429 and not _logged_in(client)
    page = client.post("/accounts/login/", {"username": "clin", "password": PASSWORD})
    assert "Too many failed logins" in page.content.decode()
    assert "Try again in 15 minutes" in " ".join(page.content.decode().split())

    client, status = _login("other", PASSWORD)  # another user from the same address
    assert status == 302 and _logged_in(client)
    client, status = _login("clin", PASSWORD, address="10.0.0.2")  # clin elsewhere
    assert status == 302 and _logged_in(client)


def test_a_successful_login_resets_the_count(settings) -> None:
    User.objects.create_user(username="clin", password=PASSWORD)
    for _ in range(2):
        for _ in range(settings.AXES_FAILURE_LIMIT - 1):
            assert _login("clin", "guess")[1] == 200
        client, status = _login("clin", PASSWORD)
        assert status == 302 and _logged_in(client)


def test_a_forged_forwarded_for_does_not_escape_the_lockout(settings) -> None:
    """Behind the trusted proxy, the address counted is the one the proxy appended (the
    last); what the client writes before it changes nothing."""
    settings.AUDIT_TRUST_X_FORWARDED_FOR = True
    User.objects.create_user(username="clin", password=PASSWORD)
    client = Client(REMOTE_ADDR="10.0.0.254")  # the proxy
    statuses = [
        client.post(
            "/accounts/login/",
            {"username": "clin", "password": "guess"},
            HTTP_X_FORWARDED_FOR=f"198.51.100.{n}, 203.0.113.7",
        ).status_code
        for n in range(settings.AXES_FAILURE_LIMIT + 1)
    ]
    assert statuses[-2:] == [429, 429]


def test_the_unlock_command_lets_the_user_in_at_once(settings) -> None:
    from django.core.management import call_command

    User.objects.create_user(username="clin", password=PASSWORD)
    for _ in range(settings.AXES_FAILURE_LIMIT):
        _login("clin", "guess")
    assert _login("clin", PASSWORD)[1] == 429
    call_command("axes_reset_username", "clin", stdout=StringIO())
    client, status = _login("clin", PASSWORD)
    assert status == 302 and _logged_in(client)


def test_the_test_clients_login_still_works() -> None:
    """A login without a request (the test client, a script) has no address to count by."""
    User.objects.create_user(username="clin", password=PASSWORD)
    assert Client().login(username="clin", password=PASSWORD) is True
    assert Client().login(username="clin", password="guess") is False


@pytest.mark.parametrize("debug", [True, False])
def test_the_demo_password_opens_no_account_when_debug_is_off(settings, debug) -> None:
    """A database seeded while DEBUG was on and put into production keeps its demo
    accounts, whose password the README publishes: with DEBUG off it is refused."""
    from registry.demo import DEMO_PASSWORD

    settings.DEBUG = debug
    User.objects.create_user(username="demo-consultant", password=DEMO_PASSWORD)

    client, status = _login("demo-consultant", DEMO_PASSWORD)

    assert (status == 302) is debug
    assert _logged_in(client) is debug
    assert (User.objects.get(username="demo-consultant").last_login is not None) is debug


def test_a_user_name_longer_than_the_lockout_table_holds_is_a_failed_login() -> None:
    """Found by fuzzing a running server: a name over 255 characters reaching
    ``authenticate`` made django-axes' INSERT fail (a 500). The login forms now refuse it
    first (below); any other caller of ``authenticate`` gets a failed login, counted
    under the name's first 255 characters (``AXES_USERNAME_CALLABLE``)."""
    from axes.models import AccessAttempt
    from django.contrib.auth import authenticate
    from django.test import RequestFactory

    long_name = "clin" + "x" * 4_996
    request = RequestFactory().post("/accounts/login/", REMOTE_ADDR="10.0.0.1")
    assert authenticate(request, username=long_name, password="guess") is None
    assert [a.username for a in AccessAttempt.objects.all()] == [long_name[:255]]


@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/"])
def test_a_user_name_longer_than_any_is_a_form_error_and_records_nothing(path: str) -> None:
    """Found by fuzzing the login page: a user name longer than the model allows went on
    to ``authenticate``, and axes' record of the failure (255 characters) was a 500."""
    from axes.models import AccessAttempt, AccessFailureLog

    User.objects.create_user(username="clin", password=PASSWORD)
    client = Client(REMOTE_ADDR="10.0.0.1")

    response = client.post(path, {"username": "c" * 256, "password": "guess"})

    assert response.status_code == 200
    assert "at most 150 characters" in response.content.decode()
    assert not _logged_in(client)
    assert not AccessAttempt.objects.exists() and not AccessFailureLog.objects.exists()
    assert _login("clin", PASSWORD)[1] == 302  # the form still logs in
