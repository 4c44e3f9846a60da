"""Settings Consilium cannot run with, refused at start-up rather than warned about at
run time: ``manage.py check`` (and ``migrate``, ``runserver``) reports them as errors, and
the WSGI application and the Celery worker and beat refuse to start with them
(``refuse_unworkable_settings``). Messages name the environment variable to change."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.core.checks import CheckMessage, Error, register
from django.core.exceptions import ImproperlyConfigured

TAG = "consilium_settings"

# (setting, the environment variable it comes from)
POSITIVE = [  # durations a loop or a bound divides by or waits on: 0 cannot work
    ("FHIR_OUTBOX_TIMEOUT_SECONDS", "FHIR_OUTBOX_TIMEOUT_SECONDS"),
    ("REPORTS_UPKEEP_INTERVAL", "REPORTS_UPKEEP_INTERVAL"),  # a beat interval
    ("REFERRAL_ROUTING_STATS_SECONDS", "REFERRAL_ROUTING_STATS_SECONDS"),  # a beat interval
    ("SESSION_COOKIE_AGE", "SESSION_COOKIE_AGE"),
    ("PASSWORD_RESET_TIMEOUT", "PASSWORD_RESET_TIMEOUT_MINUTES"),
    ("EMAIL_TIMEOUT", "EMAIL_TIMEOUT"),
    ("NOTIFICATION_EMAIL_MAX_AGE_HOURS", "NOTIFICATION_EMAIL_MAX_AGE_HOURS"),
]
AT_LEAST_ONE = [  # counts and sizes
    ("FHIR_OUTBOX_MAX_ATTEMPTS", "FHIR_OUTBOX_MAX_ATTEMPTS"),
    ("FHIR_OUTBOX_CONCURRENCY", "FHIR_OUTBOX_CONCURRENCY"),
    ("FHIR_INTAKE_BATCH", "FHIR_INTAKE_BATCH"),
    ("FHIR_INTAKE_MAX_ATTEMPTS", "FHIR_INTAKE_MAX_ATTEMPTS"),
    ("FHIR_INTAKE_MAX_PENDING_PER_USER", "FHIR_INTAKE_MAX_PENDING_PER_USER"),
    ("FHIR_MAX_BODY_BYTES", "FHIR_MAX_BODY_BYTES"),
    ("FHIR_BATCH_MAX_ENTRIES", "FHIR_BATCH_MAX_ENTRIES"),  # 0: every batch refused (413)
    ("ATTACHMENT_MAX_BYTES", "ATTACHMENT_MAX_BYTES"),
    ("REPORTS_UPKEEP_BATCH", "REPORTS_UPKEEP_BATCH"),
    ("REGISTRY_IMPORT_BATCH_SIZE", "REGISTRY_IMPORT_BATCH_SIZE"),
    ("AXES_FAILURE_LIMIT", "LOGIN_FAILURE_LIMIT"),
]
NOT_NEGATIVE = [  # graces, windows and waits: 0 means none
    ("FHIR_OUTBOX_BACKOFF_BASE_SECONDS", "FHIR_OUTBOX_BACKOFF_BASE_SECONDS"),
    ("FHIR_OUTBOX_BACKOFF_CAP_SECONDS", "FHIR_OUTBOX_BACKOFF_CAP_SECONDS"),
    ("REFERRAL_ESCALATION_GRACE_MINUTES", "REFERRAL_ESCALATION_GRACE_MINUTES"),
    ("REFERRAL_DECLINE_REROUTE_WINDOW_MINUTES", "REFERRAL_DECLINE_REROUTE_WINDOW_MINUTES"),
    ("REFERRAL_ROUTING_CACHE_SECONDS", "REFERRAL_ROUTING_CACHE_SECONDS"),
    ("NOTIFICATION_EMAIL_GRACE_SECONDS", "NOTIFICATION_EMAIL_GRACE_SECONDS"),
    ("PASSWORD_RESET_INTERVAL_MINUTES", "PASSWORD_RESET_INTERVAL_MINUTES"),
    ("REPORTS_GAP_TIMEOUT", "REPORTS_GAP_TIMEOUT"),
]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def lease_minimum(timeout: float) -> float:
    """The least outbox lease that bounds a batch (fhir_gateway.delivery): a request takes
    up to 2 timeouts plus a second, and a run must have at least one timeout to start."""
    return 3 * timeout + 1


def settings_errors() -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    bounds = [(POSITIVE, "greater than 0", "core.E002", lambda v: v > 0)]
    bounds += [(AT_LEAST_ONE, "at least 1", "core.E003", lambda v: v >= 1)]
    bounds += [(NOT_NEGATIVE, "0 or more", "core.E004", lambda v: v >= 0)]
    for names, wanted, error_id, ok in bounds:
        for name, variable in names:
            value = getattr(settings, name, None)
            if not _number(value) or not ok(value):
                minutes = name == "PASSWORD_RESET_TIMEOUT" and _number(value)
                shown = value // 60 if minutes and value is not None else value
                errors.append(Error(f"{variable} must be {wanted} (it is {shown!r}).", id=error_id))
    cooloff = getattr(settings, "AXES_COOLOFF_TIME", None)
    if cooloff is not None and cooloff.total_seconds() <= 0:
        errors.append(Error("LOGIN_LOCKOUT_MINUTES must be greater than 0.", id="core.E002"))
    timeout = settings.FHIR_OUTBOX_TIMEOUT_SECONDS
    lease = settings.FHIR_OUTBOX_LEASE_SECONDS
    if _number(timeout) and _number(lease) and lease < lease_minimum(timeout):
        errors.append(
            Error(
                f"FHIR_OUTBOX_LEASE_SECONDS ({lease:g}) must be at least 3 x "
                f"FHIR_OUTBOX_TIMEOUT_SECONDS + 1 = {lease_minimum(timeout):g}: a shorter lease "
                "runs out while a delivery may still be open, and another worker sends the "
                "message again.",
                id="core.E001",
            )
        )
    base = settings.FHIR_OUTBOX_BACKOFF_BASE_SECONDS
    cap = settings.FHIR_OUTBOX_BACKOFF_CAP_SECONDS
    if _number(base) and _number(cap) and cap < base:
        errors.append(
            Error(
                f"FHIR_OUTBOX_BACKOFF_CAP_SECONDS ({cap:g}) must not be below "
                f"FHIR_OUTBOX_BACKOFF_BASE_SECONDS ({base:g}).",
                id="core.E005",
            )
        )
    # Empty is TIME_ZONE, as reports read it (reports.services.report_time_zone).
    zone = getattr(settings, "REPORTS_TIME_ZONE", "") or settings.TIME_ZONE
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        errors.append(
            Error(
                f"REPORTS_TIME_ZONE {zone!r} is not a time zone (e.g. Asia/Ho_Chi_Minh).",
                id="core.E006",
            )
        )
    return errors


@register(TAG)
def settings_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    return settings_errors()


def refuse_unworkable_settings() -> None:
    """Raise ImproperlyConfigured naming every unworkable setting (the WSGI application,
    Celery worker and beat start-up: they do not run Django's system checks)."""
    from referrals.checks import unrouted_deadline_check

    errors = settings_errors() + unrouted_deadline_check()
    if errors:
        raise ImproperlyConfigured(
            "Unworkable settings: " + " ".join(f"{e.msg} ({e.id})" for e in errors)
        )
