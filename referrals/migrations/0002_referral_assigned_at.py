# Routing: when the current department got the case, indexed for the live load per day.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("referrals", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="referral",
            name="assigned_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="referral",
            index=models.Index(
                fields=["assigned_department", "assigned_at"], name="referral_department_load"
            ),
        ),
    ]
