"""Settings for every environment; everything variable comes from the environment.

DEBUG is off unless DEBUG=1. With DEBUG off there is no default SECRET_KEY, cookies are
secure and ALLOWED_HOSTS must be set.
"""

from __future__ import annotations

from datetime import timedelta

import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

from config.env import BASE_DIR, env, env_secret

django_stubs_ext.monkeypatch()

DEBUG = env.bool("DEBUG", default=False)

# Relative paths (VAR_DIR, MEDIA_ROOT) are the project directory's, whichever directory
# a process is started from: a worker started elsewhere wrote its files (the embedded
# broker, beat's schedule, uploads) somewhere the web process never looked.
VAR_DIR = BASE_DIR / env.str("VAR_DIR", default="var")

_secret = env_secret("SECRET_KEY")
if not _secret:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is off.")
    _secret = "insecure-development-key-only-used-with-DEBUG-on"  # noqa: S105
elif not DEBUG and len(_secret) < 32:
    # A key short enough to guess (.env.example's placeholder among them): sessions, CSRF
    # tokens and the FHIR paging cursors are signed with it.
    raise ImproperlyConfigured(
        "SECRET_KEY must be at least 32 random characters when DEBUG is off (e.g. "
        "python -c 'import secrets; print(secrets.token_urlsafe(50))')."
    )
SECRET_KEY: str = _secret

ALLOWED_HOSTS: list[str] = env.list(
    "ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "testserver"] if DEBUG else []
)
CSRF_TRUSTED_ORIGINS: list[str] = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# A form whose token went stale: "nothing was changed", not Django's bare 403 page.
CSRF_FAILURE_VIEW = "core.views.csrf_failure"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "guardian",
    "axes",
    "core",
    "accounts",
    "registry",
    "referrals",
    "fhir_gateway",
    "reports",
]

MIDDLEWARE = [
    "core.middleware.RequestIdMiddleware",
    "core.middleware.AdminNulQueryMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last: answers a locked-out login
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# SQLite under var/ by default (make run); DATABASE_URL switches to PostgreSQL.
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'consilium.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL + a busy timeout let the web process and the worker share the file; IMMEDIATE
    # transactions take the write lock when they begin, so a writer waits (up to the
    # timeout) instead of failing at once with "database is locked" when two transactions
    # that began by reading both try to write (SQLite does not wait in that case).
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # Server-side prepared statements only for the statements that ask for them
    # (core.rows: the worklist page, the FHIR referral searches, bearer authentication, the
    # asynchronous-intake INSERT); Django's own queries keep client-side binding and are
    # never prepared (the threshold is out of reach). DB_PREPARED_STATEMENTS=0 turns them
    # off, e.g. behind a transaction-pooling PgBouncer older than 1.21.
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = (
        2**31 - 1 if env.bool("DB_PREPARED_STATEMENTS", default=True) else None
    )

# SQLite (make run) ignores covering-index columns that PostgreSQL uses; that is expected.
SILENCED_SYSTEM_CHECKS = (
    ["models.W040"] if DATABASES["default"]["ENGINE"].endswith("sqlite3") else []
)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = [
    "accounts.authentication.LockoutBackend",  # first: refuses a locked-out login
    "accounts.authentication.PasswordBackend",  # ModelBackend; the demo password off DEBUG
    "guardian.backends.ObjectPermissionBackend",
]
# Password guessing (django-axes): after LOGIN_FAILURE_LIMIT failed logins of one user
# name from one address (/accounts/login/ and /admin/), that pair is locked out for
# LOGIN_LOCKOUT_MINUTES (429); a success resets the count. By user and address together:
# a hospital behind one NAT address is not locked out by one guesser, nor is a user by
# someone elsewhere. Bearer tokens are not passwords (they are not counted).
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("LOGIN_LOCKOUT_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "referrals.audit.client_ip"
AXES_USERNAME_CALLABLE = "accounts.authentication.login_attempt_username"  # cut to fit
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Password reset by e-mail (/accounts/password_reset/): the link works this long, once; at most
# one e-mail per account per interval.
PASSWORD_RESET_TIMEOUT = env.int("PASSWORD_RESET_TIMEOUT_MINUTES", default=60) * 60
PASSWORD_RESET_INTERVAL_MINUTES = env.int("PASSWORD_RESET_INTERVAL_MINUTES", default=15)
# Login records (who logged in and out, when, from where; django-axes) are kept this many days
# (0 or less: forever), pruned daily.
LOGIN_LOG_RETENTION_DAYS = env.int("LOGIN_LOG_RETENTION_DAYS", default=365)
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
MEDIA_ROOT = BASE_DIR / env.str("MEDIA_ROOT", default=str(VAR_DIR / "media"))
MEDIA_URL = "media/"

# Security: strict when DEBUG is off.
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=not DEBUG)
SESSION_COOKIE_HTTPONLY = True
# Shared workstations on a ward: a web session lasts a shift at most (seconds), and ends
# when the browser closes.
SESSION_COOKIE_AGE = env.int("SESSION_COOKIE_AGE", default=12 * 3600)
SESSION_EXPIRE_AT_BROWSER_CLOSE = env.bool("SESSION_EXPIRE_AT_BROWSER_CLOSE", default=True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 3600)

# API tokens
API_TOKEN_DEFAULT_TTL_DAYS = env.int("API_TOKEN_DEFAULT_TTL_DAYS", default=90)
API_TOKEN_MAX_TTL_DAYS = 3650  # ten years: a lifetime any longer is a mistake
if not 1 <= API_TOKEN_DEFAULT_TTL_DAYS <= API_TOKEN_MAX_TTL_DAYS:
    raise ImproperlyConfigured(
        f"API_TOKEN_DEFAULT_TTL_DAYS must be 1 ... {API_TOKEN_MAX_TTL_DAYS} (days)."
    )

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "core.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "core.pagination.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "core.exceptions.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Consilium API",
    "DESCRIPTION": "Referral network for tiered hospitals: registry, referrals, reports.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
}

# Celery: embedded SQLAlchemy/SQLite broker by default (make run); CELERY_BROKER_URL
# switches to Redis or RabbitMQ.
CELERY_BROKER_URL = env.str(
    "CELERY_BROKER_URL", default=f"sqla+sqlite:///{VAR_DIR / 'celery-broker.sqlite3'}"
)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# One task per worker process at a time (long tasks do not hold others back), except on
# the embedded broker, whose blocking loop acknowledges only between 2-second drains: with
# one slot per process, queued hand-offs came two per 2 s (config/celery.py).
# Workers log through LOGGING (JSON lines with the fields each message carries), not
# Celery's own plain-text handler, which dropped them (an outbox message's id, endpoint).
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 16 if CELERY_BROKER_URL.startswith("sqla+") else 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# After-commit sends (notifications) go to the broker from a background thread, so a
# request does not wait for it (core.dispatch); the test settings send inline.
CELERY_SEND_IN_BACKGROUND = env.bool("CELERY_SEND_IN_BACKGROUND", default=True)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULER = "config.celery:PersistentScheduler"  # creates VAR_DIR
# Every entry carries an ``expires`` (a few intervals at most): a run left queued while
# the workers were down expires unrun instead of piling up and running all at once on
# their return (core/tests/test_beat_schedule.py).
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    # FHIR gateway: the outbox's batch drain (retries, lost hand-offs, expired leases,
    # dead-lettering). A run left queued while the workers were down expires unrun.
    "fhir-outbox-drain": {
        "task": "fhir_gateway.outbox_drain",
        "schedule": 10.0,
        "options": {"expires": 30.0},
    },
    # FHIR gateway: asynchronous transaction Bundles whose hand-off was lost or failed.
    "fhir-intake-drain": {
        "task": "fhir_gateway.intake_drain",
        "schedule": 10.0,
        "options": {"expires": 30.0},
    },
    # FHIR gateway: registry -> stored mCSD resources (new versions only on change). One
    # run at a time (a run that finds the lock taken does nothing); a run left queued
    # while the workers were down expires unrun.
    "fhir-project-registry": {
        "task": "fhir_gateway.project_registry",
        "schedule": 60.0,
        "options": {"expires": 50.0},
    },
    # Referrals: deadline notices, then re-route/expire; re-route recent declines.
    "referrals-escalate": {
        "task": "referrals.tasks.referrals_escalate",
        "schedule": 60.0,
        "options": {"expires": 120.0},
    },
}
# Referral deadlines and routing (referrals/escalation.py, referrals/routing.py).
REFERRAL_ESCALATION_AUTO_FORWARD = env.bool("REFERRAL_ESCALATION_AUTO_FORWARD", default=True)
REFERRAL_ESCALATION_GRACE_MINUTES = env.int("REFERRAL_ESCALATION_GRACE_MINUTES", default=60)
# A referral no department can take at intake is routed again every minute until this
# deadline (shortened by its priority, as any deadline), then expires: the requester is told.
REFERRAL_UNROUTED_DEADLINE_HOURS = env.int("REFERRAL_UNROUTED_DEADLINE_HOURS", default=72)
REFERRAL_DECLINE_AUTO_REROUTE = env.bool("REFERRAL_DECLINE_AUTO_REROUTE", default=True)
REFERRAL_DECLINE_REROUTE_WINDOW_MINUTES = env.int(
    "REFERRAL_DECLINE_REROUTE_WINDOW_MINUTES", default=60
)
REFERRAL_ROUTING_CACHE_SECONDS = env.int("REFERRAL_ROUTING_CACHE_SECONDS", default=60)
REFERRAL_ROUTING_STATS_SECONDS = env.int("REFERRAL_ROUTING_STATS_SECONDS", default=300)
# Notification e-mails whose after-commit hand-off was lost are sent by a sweep.
NOTIFICATION_EMAIL_GRACE_SECONDS = env.int("NOTIFICATION_EMAIL_GRACE_SECONDS", default=60)
NOTIFICATION_EMAIL_MAX_AGE_HOURS = env.int("NOTIFICATION_EMAIL_MAX_AGE_HOURS", default=24)
CELERY_BEAT_SCHEDULE["referrals-response-times"] = {
    "task": "referrals.response_times_refresh",
    "schedule": float(REFERRAL_ROUTING_STATS_SECONDS),
    # Seconds of work at a million referrals: runs queued while the workers were down
    # must not all run on their return (the next one is due an interval later anyway).
    "options": {"expires": float(REFERRAL_ROUTING_STATS_SECONDS)},
}
CELERY_BEAT_SCHEDULE["referrals-notification-email-sweep"] = {
    "task": "referrals.notification_email_sweep",
    "schedule": 60.0,
    "options": {"expires": 120.0},
}
DATA_UPLOAD_MAX_MEMORY_SIZE = (
    2_621_440  # Django's default (2.5 MiB), spelled out for the FHIR limit
)
# FHIR outbox delivery (fhir_gateway/delivery.py, docs/fhir.md "Outbound delivery"): attempts
# before a message is dead-lettered; exponential backoff with full jitter between them (base,
# cap); the bound on one request (connect at most 5 s of it); how long a claimed message is
# leased (keep it above 3 x the timeout + 1 s); sender threads per worker process.
FHIR_OUTBOX_MAX_ATTEMPTS = env.int("FHIR_OUTBOX_MAX_ATTEMPTS", default=24)
FHIR_OUTBOX_BACKOFF_BASE_SECONDS = env.float("FHIR_OUTBOX_BACKOFF_BASE_SECONDS", default=2.0)
FHIR_OUTBOX_BACKOFF_CAP_SECONDS = env.float("FHIR_OUTBOX_BACKOFF_CAP_SECONDS", default=3600.0)
FHIR_OUTBOX_TIMEOUT_SECONDS = env.float("FHIR_OUTBOX_TIMEOUT_SECONDS", default=10.0)
FHIR_OUTBOX_LEASE_SECONDS = env.float("FHIR_OUTBOX_LEASE_SECONDS", default=60.0)
FHIR_OUTBOX_CONCURRENCY = env.int("FHIR_OUTBOX_CONCURRENCY", default=16)
# The largest FHIR request body (413 above it); a raw Binary create: ATTACHMENT_MAX_BYTES.
FHIR_MAX_BODY_BYTES = env.int("FHIR_MAX_BODY_BYTES", default=DATA_UPLOAD_MAX_MEMORY_SIZE)
# Entries of a FHIR batch Bundle (POST /fhir); more are refused whole (413).
FHIR_BATCH_MAX_ENTRIES = env.int("FHIR_BATCH_MAX_ENTRIES", default=100)
# FHIR gateway retention (fhir_gateway/retention.py): delivered outbox messages and pull-feed
# events older than these many days are pruned hourly (0 or less: kept forever).
FHIR_OUTBOX_RETENTION_DAYS = env.int("FHIR_OUTBOX_RETENTION_DAYS", default=30)
FHIR_FEED_RETENTION_DAYS = env.int("FHIR_FEED_RETENTION_DAYS", default=30)
# Days an applied Task update answers its retry as the first (AppliedUpdate); after that a
# retry is answered as any request (0 or less: kept forever).
FHIR_UPDATE_REPLAY_DAYS = env.int("FHIR_UPDATE_REPLAY_DAYS", default=7)
# Finished asynchronous intake jobs (their answers) are kept this many days for polling.
FHIR_INTAKE_RETENTION_DAYS = env.int("FHIR_INTAKE_RETENTION_DAYS", default=7)
FHIR_INTAKE_MAX_ATTEMPTS = env.int("FHIR_INTAKE_MAX_ATTEMPTS", default=5)
# Asynchronous transactions a worker leases and applies in one database transaction.
FHIR_INTAKE_BATCH = env.int("FHIR_INTAKE_BATCH", default=20)
# One member's asynchronous transactions waiting to be applied; more are answered 429.
FHIR_INTAKE_MAX_PENDING_PER_USER = env.int("FHIR_INTAKE_MAX_PENDING_PER_USER", default=5000)
CELERY_BEAT_SCHEDULE["fhir-retention"] = {
    "task": "fhir_gateway.retention_prune",
    "schedule": 3600.0,
    "options": {"expires": 1800.0},
}
CELERY_BEAT_SCHEDULE["accounts-login-logs"] = {
    "task": "accounts.prune_login_logs",
    "schedule": 86400.0,
    "options": {"expires": 3600.0},
}
# Sessions are stored in the database, which never deletes an expired one by itself
# (Django leaves it to `manage.py clearsessions`): the table grew by a row per login.
CELERY_BEAT_SCHEDULE["accounts-clear-sessions"] = {
    "task": "accounts.clear_expired_sessions",
    "schedule": 86400.0,
    "options": {"expires": 3600.0},
}
CELERY_TIMEZONE = "UTC"

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "core.logging.RequestIdFilter"}},
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "filters": ["request_id"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
    },
}

EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="consilium@localhost")
# The SMTP relay (with EMAIL_BACKEND=django.core.mail.backends.smtp.EmailBackend).
EMAIL_HOST = env.str("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=25)
EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env_secret("EMAIL_HOST_PASSWORD") or ""
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=False)
EMAIL_USE_SSL = env.bool("EMAIL_USE_SSL", default=False)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=30)
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured("Set at most one of EMAIL_USE_TLS and EMAIL_USE_SSL.")

# Registry
REGISTRY_IMPORT_BATCH_SIZE = env.int("REGISTRY_IMPORT_BATCH_SIZE", default=1000)

# Referral attachments: largest case file accepted (bytes; over it: 413). 20 MiB default.
ATTACHMENT_MAX_BYTES = env.int("ATTACHMENT_MAX_BYTES", default=20 * 1024 * 1024)
# Audit log and login lockout: the client address is the last of X-Forwarded-For (the one
# the trusted proxy in front appended), only behind such a proxy; otherwise REMOTE_ADDR.
AUDIT_TRUST_X_FORWARDED_FOR = env.bool("AUDIT_TRUST_X_FORWARDED_FOR", default=False)

# Reports (issue 5, docs/metrics.md): small-cell suppression for aggregate-only (ministry)
# views, the verification window of avoided transfers, travel cost per km by requester
# country (ISO code=amount, "default" for the rest), the time zone that decides report
# days, and the watermark job that keeps the rollups up to date.
REPORTS_MIN_CELL = env.int("REPORTS_MIN_CELL", default=5)
REPORTS_VERIFY_DAYS = env.int("REPORTS_VERIFY_DAYS", default=30)
REPORTS_COST_PER_KM: dict[str, float] = {
    code: float(amount)
    for code, amount in env.dict("REPORTS_COST_PER_KM", default={"default": "0.3"}).items()
}
REPORTS_CURRENCY = env.str("REPORTS_CURRENCY", default="USD")
REPORTS_TIME_ZONE = env.str("REPORTS_TIME_ZONE", default=TIME_ZONE)
REPORTS_UPKEEP_INTERVAL = env.float("REPORTS_UPKEEP_INTERVAL", default=10.0)
REPORTS_UPKEEP_BATCH = env.int("REPORTS_UPKEEP_BATCH", default=5000)
REPORTS_GAP_TIMEOUT = env.int("REPORTS_GAP_TIMEOUT", default=300)
CELERY_BEAT_SCHEDULE["reports-catch-up"] = {
    "task": "reports.catch_up",
    "schedule": REPORTS_UPKEEP_INTERVAL,
    "options": {"expires": max(30.0, 3 * REPORTS_UPKEEP_INTERVAL)},
}
