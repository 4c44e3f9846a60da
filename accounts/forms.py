"""The login forms of the web UI and the admin."""

from __future__ import annotations

from typing import Any

from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.validators import MaxLengthValidator


class _UserNameBounded:
    """Django's login form sets the user name field's ``max_length`` (the user model's)
    after the field was built, so no validator checks it: a longer name went on to
    ``authenticate``, and django-axes' record of the failed login (a user name column of
    255) failed with it, a 500 (found by fuzzing the login page). No account has such a
    name: it is refused as a field error, before any login is tried or counted."""

    fields: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["username"]
        if field.max_length is not None:
            field.validators.append(MaxLengthValidator(field.max_length))


class LoginForm(_UserNameBounded, AuthenticationForm):
    pass


class AdminLoginForm(_UserNameBounded, AdminAuthenticationForm):
    pass
