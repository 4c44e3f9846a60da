from pathlib import Path

from django.conf import settings

from referrals.state_machine_doc import DOC_PATH, render
from referrals.workflow import TRANSITIONS


def test_committed_doc_matches_the_table() -> None:
    committed = (Path(settings.BASE_DIR) / DOC_PATH).read_text(encoding="utf-8")
    assert committed == render(), "run: python manage.py state_machine_doc"


def test_doc_names_every_action() -> None:
    text = render()
    for t in TRANSITIONS:
        assert f"| `{t.action}` |" in text
        assert f": {t.action}\n" in text
