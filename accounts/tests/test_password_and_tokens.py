"""A user changes their own password on the web; token lifetimes are bounded."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from accounts.models import ApiToken, User

pytestmark = pytest.mark.django_db


def test_a_user_changes_their_own_password() -> None:
    user = User.objects.create_user(username="clin", password="initial-Pass-123")
    client = Client()
    client.force_login(user)
    page = client.get("/accounts/password_change/")
    assert page.status_code == 200
    assert 'name="new_password1"' in page.content.decode()

    wrong = client.post(
        "/accounts/password_change/",
        {
            "old_password": "not-it",
            "new_password1": "a-Better-pass-456",
            "new_password2": "a-Better-pass-456",
        },
    )
    assert wrong.status_code == 200  # the form again, with the error
    assert User.objects.get(pk=user.pk).check_password("initial-Pass-123")

    done = client.post(
        "/accounts/password_change/",
        {
            "old_password": "initial-Pass-123",
            "new_password1": "a-Better-pass-456",
            "new_password2": "a-Better-pass-456",
        },
    )
    assert done.status_code == 302 and done["Location"] == "/accounts/password_change/done/"
    assert User.objects.get(pk=user.pk).check_password("a-Better-pass-456")
    assert client.get("/accounts/password_change/done/").status_code == 200  # still signed in


def test_the_password_page_needs_a_login() -> None:
    response = Client().get("/accounts/password_change/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


@pytest.mark.parametrize("days", [0, 3651, 10_000_000])
def test_issue_token_refuses_a_lifetime_out_of_range(days: int) -> None:
    User.objects.create_user(username="his-system", password=None)
    with pytest.raises(CommandError, match="--days must be 1"):
        call_command("issue_token", "his-system", days=days)
    assert not ApiToken.objects.exists()


def _superuser_client() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser(username="root", password="pw-root-1"))
    return client


def test_deactivating_an_account_in_the_admin_revokes_its_tokens() -> None:
    from accounts.services import api_token_issue

    user = User.objects.create_user(username="his-system", password=None)
    api_token_issue(user=user, name="integration")
    client = _superuser_client()
    form = {
        "username": "his-system",
        "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00",
        "_save": "Save",
    }  # is_active unticked
    response = client.post(f"/admin/accounts/user/{user.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert User.objects.get(pk=user.pk).is_active is False
    assert ApiToken.objects.get(user=user).revoked_at is not None

    # reactivated: the old token stays revoked
    response = client.post(f"/admin/accounts/user/{user.pk}/change/", {**form, "is_active": "on"})
    assert response.status_code == 302
    assert ApiToken.objects.get(user=user).revoked_at is not None


def test_a_token_is_neither_moved_nor_extended_nor_unrevoked_in_the_admin() -> None:
    from accounts.services import api_token_issue

    owner = User.objects.create_user(username="owner", password=None)
    other = User.objects.create_user(username="other", password=None)
    token = api_token_issue(user=owner).token
    client = _superuser_client()
    page = client.get(f"/admin/accounts/apitoken/{token.pk}/change/").content.decode()
    for field in ("user", "expires_at", "revoked_at"):
        assert f'name="{field}' not in page
    client.post(
        f"/admin/accounts/apitoken/{token.pk}/change/",
        {"user": other.pk, "name": "renamed", "expires_at_0": "2099-01-01", "_save": "Save"},
    )
    stored = ApiToken.objects.get(pk=token.pk)
    assert (stored.user_id, stored.expires_at) == (owner.pk, token.expires_at)
