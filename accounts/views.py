"""The account pages Django's auth views do not cover as we need: a password change that
stops guessing of the old password, and a password reset by e-mail that cannot flood a
mailbox and lifts a login lockout once the new password is set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from axes.utils import reset as axes_reset
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import PasswordChangeForm, PasswordResetForm
from django.http import HttpResponse, HttpResponseRedirect
from django.urls import reverse_lazy

from accounts.models import User
from accounts.services import password_reset_claim
from referrals.audit import client_ip

# Session key: wrong old passwords given on the password-change page in this session.
_WRONG_OLD_PASSWORDS = "password_change_wrong_old"


class GuardedPasswordChangeView(auth_views.PasswordChangeView):
    """Django's password change, except that ``LOGIN_FAILURE_LIMIT`` wrong old passwords
    in one session end that session: whoever holds a signed-in browser (a shared ward
    workstation left open) must not be able to guess the password behind it without
    limit. The count lives in the session, the thing such a guesser has; logging in again
    needs the password, which the login's own lockout guards."""

    def form_invalid(self, form: PasswordChangeForm) -> HttpResponse:
        if "old_password" in form.errors:
            wrong = int(self.request.session.get(_WRONG_OLD_PASSWORDS, 0)) + 1
            self.request.session[_WRONG_OLD_PASSWORDS] = wrong
            if wrong >= settings.AXES_FAILURE_LIMIT:
                logout(self.request)  # a new, empty session
                messages.error(
                    self.request,
                    "Too many wrong passwords: you were signed out. Log in again.",
                )
                return HttpResponseRedirect(settings.LOGIN_URL)
        return super().form_invalid(form)

    def form_valid(self, form: PasswordChangeForm) -> HttpResponse:
        self.request.session.pop(_WRONG_OLD_PASSWORDS, None)
        return super().form_valid(form)


class ThrottledPasswordResetForm(PasswordResetForm):
    """Django's reset form (no answer says whether the address is known), sending to each
    active account of the address at most one e-mail per ``PASSWORD_RESET_INTERVAL_MINUTES``."""

    def get_users(self, email: str) -> Iterator[Any]:
        for user in super().get_users(email):
            if password_reset_claim(user=user):
                yield user


class PasswordResetView(auth_views.PasswordResetView):
    form_class = ThrottledPasswordResetForm
    success_url = reverse_lazy("password_reset_done")


class PasswordResetDoneView(auth_views.PasswordResetDoneView):
    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        return {
            **super().get_context_data(**kwargs),
            "interval": settings.PASSWORD_RESET_INTERVAL_MINUTES,
        }


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    """Setting the new password also lifts the login lockout of that user name from the
    address that set it (lockouts are per user name and address): the user who locked
    themselves out by forgetting their password can log in at once, while a guesser
    elsewhere stays locked out (a reset must not hand them fresh guesses)."""

    success_url = reverse_lazy("password_reset_complete")

    def form_valid(self, form: Any) -> HttpResponse:
        response = super().form_valid(form)
        user: User = form.user
        axes_reset(ip=client_ip(self.request), username=user.get_username())
        return response
