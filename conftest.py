from pathlib import Path
from typing import Any

import pytest

# Factories' fixtures (API clients per role, users, specialties) for every app's tests.
pytest_plugins = ["tests.fixtures"]


@pytest.fixture(autouse=True)
def _media_and_email(settings: Any, tmp_path: Path) -> None:
    settings.MEDIA_ROOT = tmp_path / "media"
