from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import ApiToken, User
from accounts.services import api_token_issue, api_tokens_revoke

pytestmark = pytest.mark.django_db


def _user() -> User:
    return User.objects.create_user(username="alice", password="x")


def test_issue_token_command_prints_a_usable_token(capsys) -> None:
    user = _user()

    call_command("issue_token", "alice")
    raw = capsys.readouterr().out.strip()

    assert raw.startswith("csl_")
    token = ApiToken.objects.get(user=user)
    assert token.key_hash == ApiToken.hash(raw)
    assert raw not in token.key_hash  # only the hash is stored
    response = APIClient().get("/api/v1/specialties/", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200


def test_revoked_token_is_refused() -> None:
    user = _user()
    issued = api_token_issue(user=user)

    assert api_tokens_revoke(user=user) == 1
    response = APIClient().get("/api/v1/specialties/", HTTP_AUTHORIZATION=f"Bearer {issued.raw}")

    assert response.status_code == 401
    assert response.json()["code"] == "authentication_failed"


def test_expired_token_is_refused() -> None:
    issued = api_token_issue(user=_user())
    ApiToken.objects.filter(pk=issued.token.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )

    response = APIClient().get("/api/v1/specialties/", HTTP_AUTHORIZATION=f"Bearer {issued.raw}")

    assert response.status_code == 401


def test_unknown_and_malformed_tokens_are_refused_cleanly() -> None:
    client = APIClient()

    assert client.get("/api/v1/specialties/", HTTP_AUTHORIZATION="Bearer nope").status_code == 401
    assert client.get("/api/v1/specialties/", HTTP_AUTHORIZATION="Bearer a b").status_code == 401
    assert client.get("/api/v1/specialties/").status_code == 401


def test_issue_token_for_unknown_user_fails_clearly() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="No user named 'ghost'"):
        call_command("issue_token", "ghost")
    assert ApiToken.objects.count() == 0


def test_an_inactive_users_token_is_refused_and_last_use_is_stamped() -> None:
    user = _user()
    issued = api_token_issue(user=user)
    client = APIClient()
    ok = client.get("/api/v1/specialties/", HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
    assert ok.status_code == 200
    token = ApiToken.objects.get(pk=issued.token.pk)
    assert token.last_used_at is not None
    User.objects.filter(pk=user.pk).update(is_active=False)
    refused = client.get("/api/v1/specialties/", HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
    assert refused.status_code == 401
    # The refusal changed nothing on the token.
    assert ApiToken.objects.get(pk=token.pk).last_used_at == token.last_used_at
