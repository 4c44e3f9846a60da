"""Secure defaults: checked in a fresh interpreter so the environment is exactly what we set."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _settings_in_env(env: dict[str, str], expression: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import os, django; os.environ['DJANGO_SETTINGS_MODULE']='config.settings.base';"
        f"django.setup(); from django.conf import settings; print({expression})"
    )
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "DJANGO_SETTINGS_MODULE"}
        and not k.startswith(("EMAIL_", "API_TOKEN_"))
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_debug_a_secret_key_is_required() -> None:
    result = _settings_in_env({}, "settings.SECRET_KEY")

    assert result.returncode != 0
    assert "SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is off" in result.stderr


def test_without_debug_cookies_are_secure_and_no_host_is_allowed() -> None:
    result = _settings_in_env(
        {"SECRET_KEY": "x" * 50},
        "settings.DEBUG, settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE, settings.ALLOWED_HOSTS",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False True True []"


def test_secret_key_can_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-a-file-" + "y" * 40 + "\n")

    result = _settings_in_env({"SECRET_KEY_FILE": str(secret)}, "settings.SECRET_KEY")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from-a-file-" + "y" * 40


def test_the_smtp_relay_comes_from_the_environment(tmp_path: Path) -> None:
    password_file = tmp_path / "smtp"
    password_file.write_text("relay-secret\n", encoding="utf-8")
    result = _settings_in_env(
        {
            "SECRET_KEY": "x" * 50,
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": "smtp.example.org",
            "EMAIL_PORT": "587",
            "EMAIL_HOST_USER": "consilium",
            "EMAIL_HOST_PASSWORD_FILE": str(password_file),
            "EMAIL_USE_TLS": "1",
        },
        "settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_HOST_USER, "
        "settings.EMAIL_HOST_PASSWORD, settings.EMAIL_USE_TLS",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["smtp.example.org", "587", "consilium", "relay-secret", "True"]


@pytest.mark.parametrize(
    "env", [{"API_TOKEN_DEFAULT_TTL_DAYS": "0"}, {"EMAIL_USE_TLS": "1", "EMAIL_USE_SSL": "1"}]
)
def test_settings_that_cannot_work_are_refused_at_start(env: dict[str, str]) -> None:
    result = _settings_in_env({"SECRET_KEY": "x" * 50, **env}, "1")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr


def test_env_example_lists_every_variable_the_settings_read() -> None:
    root = Path(__file__).resolve().parents[2]
    source = (root / "config" / "settings" / "base.py").read_text(encoding="utf-8")
    read = set(re.findall(r'env(?:\.\w+|_secret)\(\s*"([A-Z0-9_]+)"', source))
    example = (root / ".env.example").read_text(encoding="utf-8")
    listed = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", example, flags=re.MULTILINE))
    assert read and sorted(read - listed) == []


def test_web_sessions_last_a_shift_and_end_with_the_browser() -> None:
    result = _settings_in_env(
        {"SECRET_KEY": "x" * 50},
        "settings.SESSION_COOKIE_AGE, settings.SESSION_EXPIRE_AT_BROWSER_CLOSE",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["43200", "True"]


@pytest.mark.parametrize("key", ["change-me", "short-key-of-31-characters-xxxx"])
def test_without_debug_a_guessable_secret_key_is_refused(key: str) -> None:
    assert len(key) < 32 or key == "change-me"
    result = _settings_in_env({"SECRET_KEY": key}, "settings.SECRET_KEY")
    assert result.returncode != 0
    assert "at least 32 random characters" in result.stderr


def _env_example() -> dict[str, str]:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    return dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE))


def _manage_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``manage.py check`` in a fresh interpreter: the environment is ``env`` alone (no
    variable of .env.example leaks in from the one running the tests)."""
    names = set(_env_example()) | {"DJANGO_SETTINGS_MODULE", "DEBUG"}
    clean = {k: v for k, v in os.environ.items() if k not in names and not k.endswith("_FILE")}
    return subprocess.run(
        [sys.executable, "manage.py", "check", *args],
        cwd=ROOT,
        env={**clean, "SECRET_KEY": "x" * 50, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_env_example_values_satisfy_the_settings_rules() -> None:
    values = _env_example()
    timeout = float(values["FHIR_OUTBOX_TIMEOUT_SECONDS"])
    lease = float(values["FHIR_OUTBOX_LEASE_SECONDS"])
    assert lease >= 3 * timeout + 1  # fhir_gateway.delivery's bound on a batch
    # All its values together: every check passes (its SECRET_KEY placeholder is refused
    # on purpose: a real one stands in for it).
    result = _manage_check({**values, "SECRET_KEY": "x" * 50}, "--deploy", "--fail-level", "ERROR")
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"FHIR_OUTBOX_LEASE_SECONDS": "30"}, "core.E001"),  # 3 x 10 + 1 = 31 at least
        ({"FHIR_OUTBOX_TIMEOUT_SECONDS": "20", "FHIR_OUTBOX_LEASE_SECONDS": "60"}, "core.E001"),
        ({"FHIR_OUTBOX_TIMEOUT_SECONDS": "0"}, "core.E002"),
        ({"REPORTS_UPKEEP_INTERVAL": "0"}, "core.E002"),
        ({"REFERRAL_ROUTING_STATS_SECONDS": "-5"}, "core.E002"),
        ({"SESSION_COOKIE_AGE": "0"}, "core.E002"),
        ({"LOGIN_LOCKOUT_MINUTES": "0"}, "core.E002"),
        ({"FHIR_OUTBOX_MAX_ATTEMPTS": "0"}, "core.E003"),
        ({"FHIR_OUTBOX_CONCURRENCY": "0"}, "core.E003"),
        ({"FHIR_INTAKE_BATCH": "0"}, "core.E003"),
        ({"FHIR_BATCH_MAX_ENTRIES": "0"}, "core.E003"),
        ({"REPORTS_UPKEEP_BATCH": "0"}, "core.E003"),
        ({"LOGIN_FAILURE_LIMIT": "0"}, "core.E003"),
        ({"NOTIFICATION_EMAIL_GRACE_SECONDS": "-1"}, "core.E004"),
        (
            {"FHIR_OUTBOX_BACKOFF_CAP_SECONDS": "1", "FHIR_OUTBOX_BACKOFF_BASE_SECONDS": "2"},
            "core.E005",
        ),
        ({"REPORTS_TIME_ZONE": "Mars/Olympus_Mons"}, "core.E006"),
    ],
)
def test_settings_that_cannot_work_are_refused_by_the_system_checks(
    env: dict[str, str], error: str
) -> None:
    result = _manage_check(env)
    assert result.returncode != 0
    assert error in result.stderr, result.stderr


def test_the_lease_rule_bound_itself_is_accepted() -> None:
    result = _manage_check({"FHIR_OUTBOX_TIMEOUT_SECONDS": "10", "FHIR_OUTBOX_LEASE_SECONDS": "31"})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", ["config.wsgi", "config.asgi"])
def test_the_web_application_refuses_to_start_with_unworkable_settings(module: str) -> None:
    result = _settings_in_env(
        {"SECRET_KEY": "x" * 50, "FHIR_OUTBOX_LEASE_SECONDS": "5"},
        f"__import__('{module}')",
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and "FHIR_OUTBOX_LEASE_SECONDS" in result.stderr


def test_celery_worker_and_beat_refuse_to_start_with_unworkable_settings(settings) -> None:
    from config.celery import _refuse_unworkable_settings

    _refuse_unworkable_settings()  # the test settings work
    settings.FHIR_INTAKE_BATCH = 0
    with pytest.raises(SystemExit, match="FHIR_INTAKE_BATCH must be at least 1"):
        _refuse_unworkable_settings()


def test_relative_runtime_paths_are_the_project_directory_s(tmp_path: Path) -> None:
    """A worker started from another directory writes where the web process reads."""
    code = (
        "import os, django; os.environ['DJANGO_SETTINGS_MODULE']='config.settings.base';"
        "django.setup(); from django.conf import settings as s;"
        "print(s.VAR_DIR, s.MEDIA_ROOT, s.STATIC_ROOT, s.CELERY_BEAT_SCHEDULE_FILENAME,"
        " s.DATABASES['default']['NAME'], s.CELERY_BROKER_URL, sep='\\n')"
    )
    names = {"DEBUG", "SECRET_KEY", "DJANGO_SETTINGS_MODULE", "DATABASE_URL", "CELERY_BROKER_URL"}
    clean = {k: v for k, v in os.environ.items() if k not in names | {"VAR_DIR", "MEDIA_ROOT"}}
    env = {**clean, "PYTHONPATH": str(ROOT), "DEBUG": "1"}

    def paths(**extra: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,  # not the project directory
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    var, media, static, beat, database, broker = paths(VAR_DIR="./run-var", MEDIA_ROOT="uploads")
    assert var == str(ROOT / "run-var") and media == str(ROOT / "uploads")
    assert static == str(ROOT / "run-var" / "static")
    assert beat == str(ROOT / "run-var" / "celerybeat-schedule")
    assert database == str(ROOT / "run-var" / "consilium.sqlite3")
    assert broker == f"sqla+sqlite:///{ROOT / 'run-var' / 'celery-broker.sqlite3'}"
    assert paths(VAR_DIR=".env-var")[1] == str(ROOT / ".env-var" / "media")
    assert paths()[:2] == [str(ROOT / "var"), str(ROOT / "var" / "media")]
    absolute = tmp_path / "elsewhere"
    assert paths(VAR_DIR=str(absolute), MEDIA_ROOT=str(absolute / "m"))[:2] == [
        str(absolute),
        str(absolute / "m"),
    ]


def test_an_empty_reports_time_zone_is_time_zone_and_accepted() -> None:
    """``REPORTS_TIME_ZONE=`` (set, empty) is ``TIME_ZONE`` where reports read it
    (``reports.services.report_time_zone``): a configuration that works, so neither the
    checks nor the web, worker or beat start-up may refuse it (E006 did: the processes
    would not start)."""
    result = _manage_check({"REPORTS_TIME_ZONE": ""})
    assert result.returncode == 0, result.stderr
    shown = _settings_in_env(
        {"SECRET_KEY": "x" * 50, "REPORTS_TIME_ZONE": ""},
        "__import__('config.wsgi') and __import__('reports.services').services.report_time_zone()",
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "UTC"
