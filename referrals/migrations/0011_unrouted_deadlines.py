"""Referrals no department could take, submitted before unrouted referrals had a deadline:
they get it now (from their submit, capped by priority, as ``services.referral_deadline``),
so the deadline job gives them a last try and then expires them and tells the requester,
instead of routing them again for ever (review)."""

from datetime import timedelta

from django.conf import settings
from django.db import migrations

# services.PRIORITY_MAX_HOURS as it is at this migration (stat, asap, urgent; routine none).
CAPS = {1: 1, 2: 4, 3: 24}


def set_deadlines(apps, schema_editor):
    Referral = apps.get_model("referrals", "Referral")
    ReferralEvent = apps.get_model("referrals", "ReferralEvent")
    hours = int(settings.REFERRAL_UNROUTED_DEADLINE_HOURS)
    waiting = Referral.objects.filter(
        state="submitted", assigned_department__isnull=True, deadline__isnull=True
    )
    for referral in waiting.only("pk", "priority", "created_at").iterator():
        submitted = (
            ReferralEvent.objects.filter(referral_id=referral.pk, action="submit")
            .values_list("at", flat=True)
            .first()
        ) or referral.created_at
        cap = CAPS.get(referral.priority)
        limit = min(hours, cap) if cap is not None else hours
        Referral.objects.filter(pk=referral.pk).update(
            deadline=submitted + timedelta(hours=limit)
        )


class Migration(migrations.Migration):
    dependencies = [("referrals", "0010_referral_numbering")]

    operations = [migrations.RunPython(set_deadlines, migrations.RunPython.noop)]
