"""Name normalisation for accent-insensitive search (Vietnamese, Lao transliterations, ...)."""

from __future__ import annotations

import re

from unidecode import unidecode

_SPACES = re.compile(r"\s+")


def search_key(text: str) -> str:
    """'Bệnh viện Nhi Trung ương' -> 'benh vien nhi trung uong'."""
    return _SPACES.sub(" ", unidecode(text or "")).strip().lower()
