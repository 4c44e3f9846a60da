"""Messages, consult notes and case files get a per-referral number for their FHIR ids.

Rows stored before this migration keep their database key as their number: the ids
members already hold (``<filler id>-msg-<key>``) keep naming the same resources.
One UPDATE per table (measured on PostgreSQL: see docs/operations.md).
"""

from django.db import migrations, models


def _number_stored_rows(table: str) -> migrations.RunSQL:
    return migrations.RunSQL(
        f"UPDATE {table} SET number = id", reverse_sql=migrations.RunSQL.noop
    )


class Migration(migrations.Migration):
    dependencies = [
        ("referrals", "0009_message_client_key"),
    ]

    operations = []
    for model, table, name in (
        ("message", "referrals_message", "message_number_once"),
        ("consultnote", "referrals_consultnote", "consult_note_number_once"),
        ("attachment", "referrals_attachment", "attachment_number_once"),
    ):
        operations += [
            migrations.AddField(
                model_name=model, name="number", field=models.PositiveIntegerField(null=True)
            ),
            _number_stored_rows(table),
            migrations.AlterField(
                model_name=model, name="number", field=models.PositiveIntegerField()
            ),
            migrations.AddConstraint(
                model_name=model,
                constraint=models.UniqueConstraint(fields=["referral", "number"], name=name),
            ),
        ]
