from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _media_and_email(settings: Any, tmp_path: Path) -> None:
    settings.MEDIA_ROOT = tmp_path / "media"
