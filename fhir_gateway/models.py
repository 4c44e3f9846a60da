"""Stored FHIR resources (decision 2), the outbound outbox (decision 1), the pull feed and
asynchronous intake jobs."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from core.fields import DocumentTextField


class FhirResource(models.Model):
    """One version of one resource, stored as the exact JSON bytes we serve.

    ``json_r4``/``json_r5`` hold the same version rendered in R4 and R5 (either may be empty
    when no rendering in that version exists); ``fhir_version`` is the version it was written
    in. Reads splice these texts into answers; nothing on the read path re-serialises.
    """

    resource_type = models.CharField(max_length=64)
    logical_id = models.CharField(max_length=64)
    version_id = models.PositiveIntegerField()
    last_updated = models.DateTimeField(default=timezone.now)
    fhir_version = models.CharField(max_length=3, default="4.0")
    json_r4 = DocumentTextField(blank=True)
    json_r5 = DocumentTextField(blank=True)
    # sha256 of the content without meta: a projection stores a new version only on change.
    content_hash = models.CharField(max_length=64, blank=True)
    is_current = models.BooleanField(default=True)
    deleted = models.BooleanField(default=False)
    # The registry row a projected resource comes from (joins searches to registry tables).
    source_pk = models.BigIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["resource_type", "logical_id", "version_id"],
                name="fhir_resource_unique_version",
            ),
            models.UniqueConstraint(
                fields=["resource_type", "logical_id"],
                condition=Q(is_current=True),
                name="fhir_resource_one_current",
            ),
        ]
        indexes = [
            models.Index(
                fields=["resource_type", "source_pk"],
                condition=Q(is_current=True),
                name="fhir_resource_current_source",
            ),
            models.Index(
                fields=["resource_type", "last_updated"],
                condition=Q(is_current=True),
                name="fhir_resource_current_updated",
            ),
            # Searches scoped by source (referral / registry row): the count and the page's
            # sort key come from the index alone (index-only scan); the JSON of the page's
            # rows is then read by primary key (views._search).
            models.Index(
                fields=["resource_type", "source_pk"],
                include=["logical_id", "id"],
                condition=Q(is_current=True, deleted=False),
                name="fhir_resource_live_source",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.resource_type}/{self.logical_id}/_history/{self.version_id}"

    def json_for(self, version: str) -> str:
        return self.json_r5 if version == "5.0" else self.json_r4


class FhirSearchToken(models.Model):
    """A token/reference value of the current version of a resource, for searches."""

    resource = models.ForeignKey(FhirResource, on_delete=models.CASCADE, related_name="tokens")
    resource_type = models.CharField(max_length=64)
    param = models.CharField(max_length=64)
    system = models.CharField(max_length=255, blank=True)
    value = models.CharField(max_length=255)

    class Meta:
        indexes = [models.Index(fields=["resource_type", "param", "value", "system"])]

    def __str__(self) -> str:
        return f"{self.resource_type}.{self.param}={self.system}|{self.value}"


class OutboxMessage(models.Model):
    """A resource version a member must receive, written in the same transaction as the change.

    Messages of one aggregate (e.g. "referral:123") are delivered in ``seq`` order: a message
    goes out only once every earlier one of its aggregate is delivered.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        IN_FLIGHT = "in_flight", "In flight"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed (will retry)"
        DEAD = "dead", "Dead (needs a person)"

    class Method(models.TextChoices):
        PUT = "PUT", "PUT"
        POST = "POST", "POST"

    endpoint = models.ForeignKey(
        "registry.Endpoint", on_delete=models.PROTECT, related_name="outbox_messages"
    )
    aggregate_key = models.CharField(max_length=100)
    seq = models.PositiveIntegerField()
    resource_type = models.CharField(max_length=64)
    logical_id = models.CharField(max_length=64)
    version_id = models.PositiveIntegerField(null=True, blank=True)
    # A fixed payload (JSON text) when the message does not send a stored resource version.
    payload = DocumentTextField(blank=True)
    payload_fhir_version = models.CharField(max_length=3, blank=True)
    http_method = models.CharField(max_length=6, choices=Method.choices, default=Method.PUT)
    idempotency_key = models.CharField(max_length=100, unique=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    claimed_at = models.DateTimeField(null=True, blank=True)
    claim_token = models.CharField(max_length=32, blank=True)
    last_error = models.TextField(blank=True)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    replay_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replays"
    )
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["aggregate_key", "seq"]
        constraints = [
            models.UniqueConstraint(
                fields=["aggregate_key", "seq"], name="outbox_unique_seq_per_aggregate"
            ),
        ]
        indexes = [
            # Due work: the drain's first scan (delivery._claim_batch).
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status__in=["pending", "failed"]),
                name="outbox_due",
            ),
            models.Index(
                fields=["claimed_at"], condition=Q(status="in_flight"), name="outbox_in_flight"
            ),
            models.Index(fields=["status", "created_at"], name="outbox_status_created"),
        ]

    def __str__(self) -> str:
        return f"{self.aggregate_key}#{self.seq} {self.resource_type}/{self.logical_id}"


class ProjectionCheckpoint(models.Model):
    """Where the registry projection got to (its next run projects changes since then)."""

    name = models.CharField(max_length=50, unique=True)
    watermark = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} @ {self.watermark:%Y-%m-%d %H:%M:%S}"


class FeedEvent(models.Model):
    """A stored version a party facility must hear of, for members that pull ($events).

    Written by ``publish`` in the transaction of the change, one row per stored version
    and party facility (the outbox's messages without endpoints). ``number`` is the
    facility's dense event number, assigned only after the row committed, under a
    per-facility lock (``feed.feed_number``): a row that commits later always gets a higher
    number than every number already handed out, whatever its id.
    """

    facility_id = models.BigIntegerField()  # plain column: no lock on the registry row
    number = models.BigIntegerField(null=True, blank=True)
    resource_type = models.CharField(max_length=64)
    logical_id = models.CharField(max_length=64)
    version_id = models.PositiveIntegerField()
    referral_id = models.BigIntegerField(null=True, blank=True)
    occurred_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["facility_id", "number"], name="feed_unique_number_per_facility"
            ),
        ]
        indexes = [
            # Rows still to be numbered, in numbering order (small: recent rows only).
            models.Index(
                fields=["facility_id", "id"],
                condition=Q(number__isnull=True),
                name="feed_unnumbered",
            ),
            # Retention (feed.feed_prune): the oldest numbered rows, in order, so each
            # batch reads only what it deletes. Partial: a row enters it once, when it is
            # numbered (the numbering UPDATE writes every index entry of the row anyway).
            models.Index(
                fields=["occurred_at"],
                condition=Q(number__isnull=False),
                name="feed_numbered_occurred",
            ),
        ]

    def __str__(self) -> str:
        number = self.number if self.number is not None else "?"
        return f"{self.facility_id}#{number} {self.resource_type}/{self.logical_id}"


class FeedHorizon(models.Model):
    """How far retention pruned a facility's feed: every event numbered up to
    ``pruned_through`` may be gone (``feed.feed_prune``).

    Numbering continues above it even when every row of the facility was pruned, and a
    member asking for a number at or below it is told the events are no longer kept
    (410) instead of silently getting the oldest that are.
    """

    facility_id = models.BigIntegerField(unique=True)
    pruned_through = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.facility_id} pruned through #{self.pruned_through}"


class FeedSubscription(models.Model):
    """The feed state of a stored ``Subscription`` resource: whose it is and the
    facility's last event number when it was created (its events come after)."""

    logical_id = models.CharField(max_length=64, unique=True)
    facility_id = models.BigIntegerField()
    start_number = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"Subscription/{self.logical_id} ({self.facility_id} after #{self.start_number})"


class IntakeJob(models.Model):
    """A transaction Bundle accepted with ``Prefer: respond-async`` (fhir_gateway/intake.py).

    The request body is kept as it came; a worker applies it later, as the caller, in one
    database transaction with this row's completion, so a job is applied exactly once.
    ``result`` is the answer the synchronous request would have had (a transaction-response
    Bundle or an OperationOutcome, in ``answer_version``) and ``result_status`` its status.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DONE = "done", "Done"
        CANCELLED = "cancelled", "Cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="fhir_intake_jobs"
    )
    body = models.TextField()
    fhir_version = models.CharField(max_length=3)
    answer_version = models.CharField(max_length=3)
    base = models.CharField(max_length=500)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    # The referral's priority as a rank (1 stat ... 4 routine, referrals.models.Priority),
    # read at accept (intake.priority_of): a member's urgent Bundles are applied before its
    # earlier routine ones. A database default too: web processes still running the code
    # of before this column insert without it while the migration is deployed.
    priority = models.SmallIntegerField(default=4, db_default=4)
    attempts = models.PositiveIntegerField(default=0)
    # Not before this (after an unexpected error: backoff); new jobs: when they came.
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True)
    result_status = models.PositiveIntegerField(null=True, blank=True)
    result = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            # Work to do, each member's most urgent then oldest due first (intake._due_jobs:
            # the members with pending jobs, then each one's due jobs), and the per-member
            # cap on pending jobs (intake.intake_accept).
            models.Index(
                fields=["user", "priority", "next_attempt_at"],
                condition=Q(status="pending"),
                name="intake_pending_user_priority",
            ),
            # Retention of finished jobs (intake.intake_prune).
            models.Index(
                fields=["finished_at"], condition=~Q(status="pending"), name="intake_finished"
            ),
        ]

    def __str__(self) -> str:
        return f"intake {self.pk} ({self.status})"


class CreateKey(models.Model):
    """The identifier a member's conditional create (``If-None-Exist: identifier=s|v``) of
    a referral's Communication or DocumentReference named, and the resource it made: a
    retry after a lost answer finds it (storage.conditional_create) instead of posting the
    message again. Kept as long as the resources are (they are never deleted)."""

    resource_type = models.CharField(max_length=40)
    # The referral (as FhirResource.source_pk) and the caller's facility: a key is the
    # member's own within the referral (the other party's equal key is another message).
    source_pk = models.BigIntegerField()
    facility_id = models.BigIntegerField()
    system = models.CharField(max_length=255)
    value = models.CharField(max_length=255)
    logical_id = models.CharField(max_length=64)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["resource_type", "source_pk", "facility_id", "system", "value"],
                name="fhir_create_key_unique",
            )
        ]

    def __str__(self) -> str:
        return f"{self.resource_type} {self.system}|{self.value} -> {self.logical_id}"


class AppliedUpdate(models.Model):
    """A Task update a member's system sent (``PUT``, or a ``PATCH`` as the PUT of its
    result) and the version it made: the version it was applied to, the account, and a
    digest of what was sent. A retry after a lost answer — the same body, the same
    ``If-Match``, the same account — is answered with the version the first made, instead
    of being taken as a new change from the state the first moved to (409/422) or refused
    as stale (412): nothing applied twice (``referral_resources._task_update``). Written in
    the update's transaction; one per version made (versions follow one another). Kept
    ``FHIR_UPDATE_REPLAY_DAYS`` (``referral_resources.applied_update_prune``, beat's hourly
    retention): a retry after that is answered as any other request would be."""

    resource_type = models.CharField(max_length=40)
    logical_id = models.CharField(max_length=64)
    base_version = models.PositiveIntegerField()
    result_version = models.PositiveIntegerField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    digest = models.CharField(max_length=64)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["resource_type", "logical_id", "base_version"],
                name="fhir_applied_update_unique_base",
            )
        ]
        # Retention deletes the oldest first, in batches: walked in ``at`` order.
        indexes = [models.Index(fields=["at"], name="fhir_applied_update_at")]

    def __str__(self) -> str:
        return (
            f"{self.resource_type}/{self.logical_id} {self.base_version} -> {self.result_version}"
        )
