"""Outbox order per (subject, endpoint): one member's outage no longer holds the other
member's updates about the same referral. Existing messages move to their endpoint's
aggregate (``<subject>:endpoint:<id>``), renumbered in their old order."""

from typing import Any

from django.db import migrations

_POSTGRES = """
UPDATE fhir_gateway_outboxmessage AS o
SET aggregate_key = n.key, seq = n.seq
FROM (
    SELECT id,
           aggregate_key || ':endpoint:' || endpoint_id AS key,
           row_number() OVER (PARTITION BY aggregate_key, endpoint_id ORDER BY seq) AS seq
    FROM fhir_gateway_outboxmessage
    WHERE aggregate_key NOT LIKE '%%:endpoint:%%'
) AS n
WHERE o.id = n.id
"""


def split(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(_POSTGRES)
        return
    message = apps.get_model("fhir_gateway", "OutboxMessage")
    seqs: dict[str, int] = {}
    batch = []
    rows = (
        message.objects.exclude(aggregate_key__contains=":endpoint:")
        .order_by("aggregate_key", "seq")
        .only("id", "aggregate_key", "endpoint_id", "seq")
    )
    for row in list(rows):  # SQLite: the embedded demo, a small table
        key = f"{row.aggregate_key}:endpoint:{row.endpoint_id}"
        seqs[key] = seqs.get(key, 0) + 1
        row.aggregate_key, row.seq = key, seqs[key]
        batch.append(row)
        if len(batch) >= 2000:
            message.objects.bulk_update(batch, ["aggregate_key", "seq"])
            batch = []
    if batch:
        message.objects.bulk_update(batch, ["aggregate_key", "seq"])


class Migration(migrations.Migration):
    dependencies = [("fhir_gateway", "0009_create_key")]

    operations = [migrations.RunPython(split, migrations.RunPython.noop, elidable=True)]
