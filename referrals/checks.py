"""Settings the referral workflow cannot run with (``manage.py check``, run at startup)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, register


@register()
def unrouted_deadline_check(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """0 or less would expire every unrouted referral at the next run of the job, while the
    submit page says it is routed again until its deadline (review)."""
    hours = settings.REFERRAL_UNROUTED_DEADLINE_HOURS
    if isinstance(hours, int) and hours >= 1:
        return []
    return [
        Error(
            f"REFERRAL_UNROUTED_DEADLINE_HOURS must be a whole number of hours, at least 1 "
            f"(it is {hours!r}).",
            id="referrals.E001",
        )
    ]
