"""The shared fixtures live in tests/fixtures.py, registered for the whole project by the
root conftest.py (pytest_plugins); a conftest here would only reach tests under tests/."""
