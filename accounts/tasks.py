"""Celery tasks of accounts: each calls one service and is safe to run twice."""

from __future__ import annotations

from celery import shared_task

from accounts.services import login_logs_prune, sessions_clear_expired


@shared_task(name="accounts.prune_login_logs", ignore_result=True)
def prune_login_logs() -> int:
    """Daily: login records past their retention (``LOGIN_LOG_RETENTION_DAYS``)."""
    return login_logs_prune()


@shared_task(name="accounts.clear_expired_sessions", ignore_result=True)
def clear_expired_sessions() -> int:
    """Daily: expired web sessions (``manage.py clearsessions``)."""
    return sessions_clear_expired()
