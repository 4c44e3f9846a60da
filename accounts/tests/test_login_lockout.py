"""Password guessing: repeated failed logins of one user name from one address lock that
pair out for a while (django-axes); other users and other addresses are not affected."""

from __future__ import annotations

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
    assert (
        "Too many failed logins"
        in client.post(
            "/accounts/login/", {"username": "clin", "password": PASSWORD}
        ).content.decode()
    )

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
