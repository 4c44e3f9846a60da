"""Expired web sessions are deleted daily by beat (the database backend never deletes
them itself); live ones stay."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.utils import timezone

from accounts.services import sessions_clear_expired
from accounts.tasks import clear_expired_sessions

pytestmark = pytest.mark.django_db


def _session(expires_in: timedelta) -> str:
    store = SessionStore()
    store["who"] = "clin"
    store.create()
    Session.objects.filter(session_key=store.session_key).update(
        expire_date=timezone.now() + expires_in
    )
    assert store.session_key
    return store.session_key


def test_expired_sessions_are_deleted_and_live_ones_kept() -> None:
    assert settings.SESSION_ENGINE == "django.contrib.sessions.backends.db"
    gone = [_session(timedelta(hours=-1)), _session(timedelta(seconds=-1))]
    live = _session(timedelta(hours=11))

    assert clear_expired_sessions() == 2  # the task runs the service

    assert not Session.objects.filter(session_key__in=gone).exists()
    assert SessionStore(session_key=live).load() == {"who": "clin"}
    assert sessions_clear_expired() == 0


def test_sessions_are_cleared_daily_by_beat() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["accounts-clear-sessions"]
    assert entry["task"] == "accounts.clear_expired_sessions"
    assert entry["schedule"] == 86400.0


def test_backends_without_rows_have_nothing_to_clear(settings) -> None:
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
    assert sessions_clear_expired() == 0
