"""Self-service password reset by e-mail, and the limits around passwords: a reset link
that works once, at most one e-mail per interval, a lockout lifted by the new password,
old-password guessing on the change page ended, login records pruned."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from axes.models import AccessAttempt, AccessFailureLog, AccessLog
from django.core import mail
from django.test import Client
from django.utils import timezone

from accounts.models import User
from accounts.services import login_logs_prune
from accounts.tasks import prune_login_logs

pytestmark = pytest.mark.django_db

PASSWORD = "initial-Pass-123"
NEW = "a-Better-pass-456"


def _reset_link() -> str:
    found = re.search(r"https?://[^/\s]+(/accounts/reset/[^\s]+/)", str(mail.outbox[-1].body))
    assert found, mail.outbox[-1].body
    return found.group(1)


def test_a_user_who_forgot_the_password_sets_a_new_one_by_e_mail(settings) -> None:
    user = User.objects.create_user(username="clin", email="clin@example.org", password=PASSWORD)
    client = Client(REMOTE_ADDR="10.0.0.1")
    assert "/accounts/password_reset/" in client.get("/accounts/login/").content.decode()

    asked = client.post("/accounts/password_reset/", {"email": "clin@example.org"})

    assert asked.status_code == 302 and asked["Location"] == "/accounts/password_reset/done/"
    assert "15 minutes" in " ".join(client.get(asked["Location"]).content.decode().split())
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["clin@example.org"]
    assert "clin" in mail.outbox[0].body
    form = client.get(_reset_link(), follow=True)  # Django swaps the token into the session
    assert 'name="new_password1"' in form.content.decode()
    set_url = form.redirect_chain[-1][0]
    done = client.post(set_url, {"new_password1": NEW, "new_password2": NEW})
    assert done.status_code == 302 and done["Location"] == "/accounts/reset/done/"
    assert User.objects.get(pk=user.pk).check_password(NEW)

    again = Client().get(_reset_link(), follow=True)  # a link works once
    assert "This link does not work" in again.content.decode()
    assert User.objects.get(pk=user.pk).check_password(NEW)


def test_the_reset_form_says_the_same_for_unknown_addresses_and_sends_nothing() -> None:
    User.objects.create_user(username="clin", email="clin@example.org", password=PASSWORD)

    unknown = Client().post("/accounts/password_reset/", {"email": "nobody@example.org"})

    assert unknown.status_code == 302 and unknown["Location"] == "/accounts/password_reset/done/"
    assert mail.outbox == []


def test_at_most_one_reset_e_mail_per_interval(settings) -> None:
    user = User.objects.create_user(username="clin", email="clin@example.org", password=PASSWORD)
    for _ in range(3):
        Client().post("/accounts/password_reset/", {"email": "clin@example.org"})
    assert len(mail.outbox) == 1

    User.objects.filter(pk=user.pk).update(
        password_reset_sent_at=timezone.now()
        - timedelta(minutes=settings.PASSWORD_RESET_INTERVAL_MINUTES, seconds=1)
    )
    Client().post("/accounts/password_reset/", {"email": "clin@example.org"})
    assert len(mail.outbox) == 2


def test_a_new_password_by_e_mail_lifts_the_login_lockout(settings) -> None:
    User.objects.create_user(username="clin", email="clin@example.org", password=PASSWORD)
    guesser = Client(REMOTE_ADDR="10.0.0.1")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        guesser.post("/accounts/login/", {"username": "clin", "password": "guess"})
    assert AccessAttempt.objects.filter(username="clin").exists()

    client = Client(REMOTE_ADDR="10.0.0.1")
    client.post("/accounts/password_reset/", {"email": "clin@example.org"})
    set_url = client.get(_reset_link(), follow=True).redirect_chain[-1][0]
    client.post(set_url, {"new_password1": NEW, "new_password2": NEW})

    assert not AccessAttempt.objects.filter(username="clin").exists()
    login = client.post("/accounts/login/", {"username": "clin", "password": NEW})
    assert login.status_code == 302 and "_auth_user_id" in client.session


def test_a_reset_by_the_owner_leaves_a_guessers_lockout_alone(settings) -> None:
    """Lockouts are per user name and address: the owner's reset lifts theirs only, or
    every reset would hand a guesser elsewhere fresh guesses."""
    User.objects.create_user(username="clin", email="clin@example.org", password=PASSWORD)
    guesser = Client(REMOTE_ADDR="10.6.6.6")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        guesser.post("/accounts/login/", {"username": "clin", "password": "guess"})
    assert (
        guesser.post("/accounts/login/", {"username": "clin", "password": "x"}).status_code == 429
    )

    owner = Client(REMOTE_ADDR="10.0.0.1")
    owner.post("/accounts/password_reset/", {"email": "clin@example.org"})
    set_url = owner.get(_reset_link(), follow=True).redirect_chain[-1][0]
    owner.post(set_url, {"new_password1": NEW, "new_password2": NEW})

    assert (
        guesser.post("/accounts/login/", {"username": "clin", "password": NEW}).status_code == 429
    )
    assert owner.post("/accounts/login/", {"username": "clin", "password": NEW}).status_code == 302


WRONG_OLD = {"old_password": "guess", "new_password1": NEW, "new_password2": NEW}


def _one_guess_short_of_the_limit(settings) -> tuple[User, Client]:
    """A signed-in session that gave a wrong old password LOGIN_FAILURE_LIMIT - 1 times,
    each answered with the form again."""
    user = User.objects.create_user(username="clin", password=PASSWORD)
    client = Client()
    client.force_login(user)
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert client.post("/accounts/password_change/", WRONG_OLD).status_code == 200
    return user, client


def test_guessing_the_old_password_on_the_change_page_ends_the_session(settings) -> None:
    user, client = _one_guess_short_of_the_limit(settings)

    ended = client.post("/accounts/password_change/", WRONG_OLD)

    assert ended.status_code == 302 and ended["Location"] == "/accounts/login/"
    assert "_auth_user_id" not in client.session
    assert client.get("/accounts/password_change/").status_code == 302  # signed out
    assert User.objects.get(pk=user.pk).check_password(PASSWORD)


def test_a_right_old_password_clears_the_count(settings) -> None:
    _user, client = _one_guess_short_of_the_limit(settings)
    right = {"old_password": PASSWORD, "new_password1": NEW, "new_password2": NEW}
    assert client.post("/accounts/password_change/", right).status_code == 302

    again = {"old_password": "guess", "new_password1": PASSWORD, "new_password2": PASSWORD}
    assert client.post("/accounts/password_change/", again).status_code == 200
    assert "_auth_user_id" in client.session


def test_login_records_past_their_retention_are_pruned(settings) -> None:
    settings.LOGIN_LOG_RETENTION_DAYS = 30
    old = timezone.now() - timedelta(days=31)
    for model in (AccessLog, AccessFailureLog):
        kept = model.objects.create(username="clin", ip_address="10.0.0.1", user_agent="")
        gone = model.objects.create(username="clin", ip_address="10.0.0.1", user_agent="")
        model.objects.filter(pk=gone.pk).update(attempt_time=old)
        assert model.objects.filter(pk=kept.pk).exists()

    assert prune_login_logs() == 2  # the task runs the service
    assert AccessLog.objects.count() == 1 and AccessFailureLog.objects.count() == 1

    settings.LOGIN_LOG_RETENTION_DAYS = 0  # keep everything
    AccessLog.objects.update(attempt_time=old)
    assert login_logs_prune() == 0 and AccessLog.objects.count() == 1
