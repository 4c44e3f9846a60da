"""Referrals: a lower-tier facility asks an upper-tier department for help.

The state lives on ``Referral.state``; every change of it is an append-only
``ReferralEvent`` (the event log is the truth: reports and FHIR Task history derive from
it). The allowed changes are defined once, in ``referrals.workflow.TRANSITIONS``.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone
from guardian.models import UserObjectPermissionBase

from registry.models import ConsultMode

# A patient's birth year: from 1900 to this year where it is already latest (UTC+14), so a
# birth today anywhere on Earth is taken (every entry point: web, API, FHIR).
MIN_BIRTH_YEAR = 1900


def latest_birth_year(now: datetime | None = None) -> int:
    return ((now or timezone.now()) + timedelta(hours=14)).year


class ReferralState(models.TextChoices):
    DRAFT = "draft", "Draft"
    SUBMITTED = "submitted", "Submitted"
    ACCEPTED = "accepted", "Accepted"
    DECLINED = "declined", "Declined"
    CANCELLED = "cancelled", "Cancelled"
    EXPIRED = "expired", "Expired"
    INFO_REQUESTED = "info_requested", "Information requested"
    SCHEDULED = "scheduled", "Conference scheduled"
    IN_CONFERENCE = "in_conference", "In conference"
    ADVISED = "advised", "Advised"
    CLOSED_LOCAL = "closed_local", "Closed locally (transfer avoided)"
    TRANSFER_REQUESTED = "transfer_requested", "Transfer requested"
    TRANSFER_ACCEPTED = "transfer_accepted", "Transfer accepted"
    IN_TRANSIT = "in_transit", "In transit"
    ARRIVED = "arrived", "Arrived"
    COMPLETED = "completed", "Completed"


class Priority(models.IntegerChoices):
    """Stored as a rank so that ``ORDER BY priority`` is stat > asap > urgent > routine and
    the worklist index serves the sort. The label is the FHIR request-priority code."""

    STAT = 1, "stat"
    ASAP = 2, "asap"
    URGENT = 3, "urgent"
    ROUTINE = 4, "routine"

    @classmethod
    def from_code(cls, code: str) -> Priority:
        for member in cls:
            if member.label == code:
                return member
        raise ValueError(code)


class PatientSex(models.TextChoices):
    FEMALE = "female", "Female"
    MALE = "male", "Male"
    OTHER = "other", "Other"
    UNKNOWN = "unknown", "Unknown"


class DeclineReason(models.TextChoices):
    OUTSIDE_SPECIALTY = "outside_specialty", "Outside the department's specialty"
    NO_CAPACITY = "no_capacity", "No capacity"
    INSUFFICIENT_INFORMATION = "insufficient_information", "Insufficient information"
    NOT_INDICATED = "not_indicated", "Referral not indicated"
    OTHER = "other", "Other"


class Disposition(models.TextChoices):
    MANAGE_LOCALLY = "manage_locally", "Manage locally"
    TRANSFER = "transfer", "Transfer the patient"
    FURTHER_TESTS = "further_tests", "Further tests"
    FOLLOW_UP = "follow_up", "Follow-up consultation"


class CloseOutOutcome(models.TextChoices):
    AVOIDED = "avoided", "Transfer / face-to-face referral avoided"
    STILL_NEEDED = "still_needed", "Transfer / face-to-face referral still needed"
    NOT_APPLICABLE = "not_applicable", "Not applicable"


def new_filler_id() -> str:
    # Random, not the row id: it can be set before the INSERT (one write per intake) and
    # does not reveal volumes to other facilities.
    return "CSL-" + uuid.uuid4().hex.upper()


# The states a department's worklist shows (neither draft nor terminal). Spelled out here
# for the partial worklist index; ``selectors.OPEN_STATES`` derives the same set from the
# workflow table and a test keeps the two equal (else the index would silently go unused).
WORKLIST_STATES: tuple[str, ...] = (
    ReferralState.SUBMITTED,
    ReferralState.ACCEPTED,
    ReferralState.INFO_REQUESTED,
    ReferralState.SCHEDULED,
    ReferralState.IN_CONFERENCE,
    ReferralState.ADVISED,
    ReferralState.TRANSFER_REQUESTED,
    ReferralState.TRANSFER_ACCEPTED,
    ReferralState.IN_TRANSIT,
    ReferralState.ARRIVED,
)


class Referral(models.Model):
    placer_system = models.CharField(
        max_length=255, help_text="identifier system of the sender's order (FHIR placer)"
    )
    placer_value = models.CharField(max_length=255)
    filler_id = models.CharField(max_length=40, unique=True, default=new_filler_id)
    requester_facility = models.ForeignKey(
        "registry.Facility", on_delete=models.PROTECT, related_name="outgoing_referrals"
    )
    requester = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="submitted_referrals",
    )
    requester_practitioner = models.ForeignKey(
        "registry.Practitioner",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="referrals",
    )
    # Minimum necessary: a pseudonymous id the sender can resolve, no names.
    patient_ref = models.CharField(max_length=128, blank=True)
    patient_sex = models.CharField(
        max_length=10, choices=PatientSex.choices, default=PatientSex.UNKNOWN
    )
    patient_birth_year = models.PositiveSmallIntegerField(null=True, blank=True)
    specialty = models.ForeignKey(
        "registry.Specialty", on_delete=models.PROTECT, related_name="referrals"
    )
    mode = models.CharField(max_length=10, choices=ConsultMode.choices, default=ConsultMode.ASYNC)
    priority = models.PositiveSmallIntegerField(choices=Priority.choices, default=Priority.ROUTINE)
    clinical_question = models.TextField()
    assigned_department = models.ForeignKey(
        "registry.Department",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="incoming_referrals",
    )
    deadline = models.DateTimeField(null=True, blank=True)
    # When the current department got the case (submit/forward/reroute): routing counts a
    # department's load today from it (index below) without reading the event log.
    assigned_at = models.DateTimeField(null=True, blank=True)
    # When the assigned department acknowledged it (the acknowledge action); cleared when
    # the referral is reassigned (forward, reroute).
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    campaign = models.CharField(max_length=100, blank=True)
    state = models.CharField(
        max_length=20, choices=ReferralState.choices, default=ReferralState.DRAFT
    )
    # Number of events recorded; the ETag, and the If-Match / expected_version check.
    version = models.PositiveIntegerField(default=0)
    parent_referral = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="counter_referrals",
        help_text="the referral this one answers (counter-referral back down)",
    )
    # Live conference (set by the `schedule` transition).
    conference_at = models.DateTimeField(null=True, blank=True)
    conference_url = models.URLField(max_length=500, blank=True)
    conference_experts = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="conference_referrals"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            # Idempotent intake: a retried submission finds the first one.
            models.UniqueConstraint(
                fields=["requester_facility", "placer_system", "placer_value"],
                name="referral_unique_placer_per_facility",
            ),
            models.CheckConstraint(
                condition=~Q(parent_referral=models.F("id")), name="referral_not_own_parent"
            ),
        ]
        indexes = [
            models.Index(
                fields=["assigned_department", "state", "priority", "deadline"],
                name="referral_worklist",
            ),
            # The open worklist of one department in its exact order (priority, deadline,
            # id): a page is an index range scan that stops after 50 rows, whatever the
            # number of open cases. Partial: open rows only (small, cheap to keep up).
            models.Index(
                fields=["assigned_department", "priority", "deadline", "id"],
                name="referral_open_worklist",
                condition=Q(state__in=WORKLIST_STATES),
            ),
            models.Index(fields=["requester_facility", "created_at"], name="referral_outgoing"),
            models.Index(fields=["state", "deadline"], name="referral_state_deadline"),
            models.Index(
                fields=["assigned_department", "assigned_at"], name="referral_department_load"
            ),
        ]

    def __str__(self) -> str:
        return self.filler_id

    @property
    def priority_code(self) -> str:
        return str(Priority(self.priority).label)


class ActorSide(models.TextChoices):
    REQUESTER = "requester", "Requesting facility"
    ASSIGNEE = "assignee", "Assigned department"
    SYSTEM = "system", "System"


class ReferralEvent(models.Model):
    """One transition of one referral. Append-only: never updated, never deleted."""

    referral = models.ForeignKey(Referral, on_delete=models.PROTECT, related_name="events")
    seq = models.PositiveIntegerField(help_text="1, 2, … per referral; equals the new version")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="referral_events",
    )
    actor_side = models.CharField(max_length=10, choices=ActorSide.choices)
    at = models.DateTimeField(default=timezone.now)
    action = models.CharField(max_length=32)
    from_state = models.CharField(max_length=20, choices=ReferralState.choices)
    to_state = models.CharField(max_length=20, choices=ReferralState.choices)
    # The department assigned after the event: reports group response times by it.
    department = models.ForeignKey(
        "registry.Department",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="referral_events",
    )
    reason = models.TextField(blank=True)
    payload = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["referral", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["referral", "seq"], name="referral_event_unique_seq"),
        ]
        indexes = [models.Index(fields=["action", "at"], name="referral_event_action_at")]

    def __str__(self) -> str:
        return f"{self.referral_id}#{self.seq} {self.action}"


class ConsultNote(models.Model):
    referral = models.ForeignKey(Referral, on_delete=models.CASCADE, related_name="consult_notes")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    disposition = models.CharField(max_length=20, choices=Disposition.choices)
    text = models.TextField()
    conference_minutes = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # The referral's own numbering (1, 2, ...; referrals.numbering): the FHIR id carries it.
    number = models.PositiveIntegerField()

    class Meta:
        ordering = ["referral", "created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["referral", "number"], name="consult_note_number_once")
        ]

    def __str__(self) -> str:
        return f"{self.referral_id}: {self.disposition}"


class Message(models.Model):
    referral = models.ForeignKey(Referral, on_delete=models.CASCADE, related_name="messages")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    text = models.TextField()
    in_response_to = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="responses"
    )
    created_at = models.DateTimeField(default=timezone.now)
    # Set by the web form when it is shown: the same form posted twice (a double click, a
    # reload that re-posts, a retry on a bad connection) finds the first message.
    client_key = models.CharField(max_length=64, blank=True, default="")
    # The referral's own numbering (1, 2, ...; referrals.numbering): the FHIR id carries it.
    number = models.PositiveIntegerField()

    class Meta:
        ordering = ["referral", "created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["referral", "number"], name="message_number_once"),
            models.UniqueConstraint(
                fields=["referral", "author", "client_key"],
                condition=~models.Q(client_key=""),
                name="message_client_key_once",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.referral_id}: message {self.pk}"


class CloseOut(models.Model):
    """The mandatory close-out question: was a transfer originally considered, and is it
    now avoided? The avoided-transfer share in reports is computed from these."""

    referral = models.OneToOneField(Referral, on_delete=models.CASCADE, related_name="close_out")
    transfer_originally_considered = models.BooleanField()
    outcome = models.CharField(max_length=20, choices=CloseOutOutcome.choices)
    answered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    answered_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.referral_id}: {self.outcome}"


# --- attachments, notifications, audit, explicit grants (see docs/permissions.md) --------


def attachment_upload_to(instance: Attachment, filename: str) -> str:
    # Never the client's name in a path: a random name per file, grouped by referral.
    return f"attachments/{instance.referral_id}/{uuid.uuid4().hex}"


class Attachment(models.Model):
    """A case file (PDF, JPEG, PNG, DICOM). ``content_type`` is sniffed from the bytes."""

    referral = models.ForeignKey(Referral, on_delete=models.PROTECT, related_name="attachments")
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    file = models.FileField(upload_to=attachment_upload_to, max_length=255)
    original_name = models.CharField(max_length=255)
    content_type = models.CharField(max_length=100)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    # FHIR's Attachment.hash is SHA-1: kept beside it for the DocumentReference (blank on
    # files stored before it was).
    sha1 = models.CharField(max_length=40, blank=True, default="")
    created = models.DateTimeField(default=timezone.now)
    # The referral's own numbering (1, 2, ...; referrals.numbering): the FHIR id carries it.
    number = models.PositiveIntegerField()

    class Meta:
        ordering = ["referral", "created", "id"]
        constraints = [
            models.UniqueConstraint(fields=["referral", "number"], name="attachment_number_once")
        ]

    def __str__(self) -> str:
        return f"{self.referral_id}: {self.original_name}"


class Notification(models.Model):
    """An in-app notice about one event to one user (also e-mailed when they have an
    address). Unique per (recipient, event): the notify task is safe to run twice."""

    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications"
    )
    referral = models.ForeignKey(Referral, on_delete=models.CASCADE, related_name="+")
    event = models.ForeignKey(ReferralEvent, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=32)
    text = models.TextField()
    created = models.DateTimeField(default=timezone.now)
    read_at = models.DateTimeField(null=True, blank=True)
    emailed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["recipient", "event"], name="notification_once_per_recipient_event"
            ),
        ]
        indexes = [
            models.Index(fields=["recipient", "read_at", "-created"]),
            # The e-mail sweep's scan: only the rows still waiting for their e-mail.
            models.Index(
                fields=["created"],
                condition=models.Q(emailed_at__isnull=True),
                name="notification_email_pending",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.recipient_id}: {self.kind} {self.referral_id}"


class DepartmentDayLoad(models.Model):
    """Referrals currently assigned to a department, by the local day they were assigned
    (routing's live load); kept in the transitions' transactions. See referrals/load.py."""

    department = models.ForeignKey(
        "registry.Department", on_delete=models.CASCADE, related_name="+"
    )
    day = models.DateField()
    # Concurrent intake to one department spreads over SHARDS rows (referral id modulo),
    # so transactions do not queue on one row lock until their commit; readers sum them.
    shard = models.PositiveSmallIntegerField(default=0)
    assigned = models.IntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["department", "day", "shard"], name="department_day_load_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.department_id} {self.day}: {self.assigned}"


class DepartmentResponseTime(models.Model):
    """Median hours from assignment to accept per department over the last 30 days, for
    routing. Written by the beat job ``referrals.response_times_refresh`` (one grouped
    query over the event log), read by routing: the heavy query never runs in a request."""

    department = models.OneToOneField(
        "registry.Department", on_delete=models.CASCADE, primary_key=True, related_name="+"
    )
    median_hours = models.FloatField()
    samples = models.PositiveIntegerField()
    computed_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.department_id}: {self.median_hours:.1f} h"


class AuditAction(models.TextChoices):
    READ = "read", "Read"
    CREATE = "create", "Create"
    UPDATE = "update", "Update"
    DOWNLOAD = "download", "Download"
    TRANSITION = "transition", "Transition"


class AuditEntry(models.Model):
    """Who read or wrote which patient data, when, from where. Append-only.

    ``referral_id`` is a plain column (no foreign key): the log outlives and never blocks
    the rows it talks about, and writing it never locks them. ``user`` is a foreign key
    for the ORM only (no constraint in the database, whose per-row check locked the
    user's row 50 times for a search page: ~0.7 ms of a ~2 ms audit INSERT at 1M
    referrals, docs/performance.md); ``audit_user_at`` is its index. A user who has
    entries cannot be deleted (PROTECT, checked by Django: the log keeps who read what;
    deactivate the account instead)."""

    at = models.DateTimeField(default=timezone.now)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_constraint=False,
        db_index=False,
    )
    action = models.CharField(max_length=12, choices=AuditAction.choices)
    object_type = models.CharField(max_length=32)
    object_id = models.CharField(max_length=64)
    referral_id = models.BigIntegerField(null=True)
    detail = models.CharField(max_length=64, blank=True)
    ip_address = models.GenericIPAddressField(null=True)
    user_agent = models.CharField(max_length=255, blank=True)
    request_id = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name_plural = "audit entries"
        indexes = [
            models.Index(fields=["referral_id", "at"], name="audit_referral_at"),
            models.Index(fields=["user", "at"], name="audit_user_at"),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.user_id} {self.action} {self.object_type}"


class ReferralUserObjectPermission(UserObjectPermissionBase):
    """django-guardian grants on referrals with a real foreign key (direct, indexed,
    joinable) instead of the generic varchar ``object_pk``."""

    content_object = models.ForeignKey(Referral, on_delete=models.CASCADE)

    class Meta(UserObjectPermissionBase.Meta):
        abstract = False
