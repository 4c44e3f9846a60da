"""Secure defaults: checked in a fresh interpreter so the environment is exactly what we set."""

import os
import subprocess
import sys
from pathlib import Path

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
