"""The master registry: where every referral is routed.

FHIR counterparts (IHE mCSD): Facility = Organization + Location, Department =
HealthcareService, Practitioner/PractitionerRole, Endpoint, SupportLink =
OrganizationAffiliation.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from registry.countries import validate_country_code
from registry.text import search_key
from registry.validators import (
    INTEGER_MAX,
    SECRET_REF,
    endpoint_base_url_key,
    validate_endpoint_base_url,
)


class Country(models.Model):
    code = models.CharField(
        max_length=2,
        unique=True,
        validators=[validate_country_code],
        help_text="ISO 3166-1 alpha-2",
    )
    name = models.CharField(max_length=100)
    name_local = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["code"]
        verbose_name_plural = "countries"
        constraints = [
            models.CheckConstraint(condition=Q(code__regex=r"^[A-Z]{2}$"), name="country_code_iso2")
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.code})"


class AreaLevel(models.IntegerChoices):
    PROVINCE = 1, "Province / region"
    DISTRICT = 2, "District"
    COMMUNE = 3, "Commune / ward"


class AdministrativeArea(models.Model):
    country = models.ForeignKey(Country, on_delete=models.PROTECT, related_name="areas")
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    level = models.PositiveSmallIntegerField(choices=AreaLevel.choices)
    code = models.CharField(max_length=64)
    name = models.CharField(max_length=200)
    name_local = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["country", "level", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["country", "code"], name="area_unique_code_per_country"
            ),
            models.CheckConstraint(condition=~Q(parent=F("id")), name="area_not_own_parent"),
        ]

    def __str__(self) -> str:
        return self.name


class Tier(models.IntegerChoices):
    CENTRAL = 1, "Central / national"
    PROVINCIAL = 2, "Provincial / regional"
    DISTRICT = 3, "District"
    COMMUNE = 4, "Commune / primary"


class Ownership(models.TextChoices):
    PUBLIC = "public", "Public"
    PRIVATE = "private", "Private"
    FAITH_BASED = "faith-based", "Faith-based"
    NGO = "ngo", "Non-governmental"
    MILITARY = "military", "Military"
    OTHER = "other", "Other"


class OperationalStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    SUSPENDED = "suspended", "Suspended"
    INACTIVE = "inactive", "Inactive"
    CLOSED = "closed", "Closed"


class Facility(models.Model):
    code = models.CharField(
        max_length=64, unique=True, help_text="Consilium's own stable facility code"
    )
    name = models.CharField(max_length=255)
    name_local = models.CharField(
        max_length=255, blank=True, help_text="name in the local language"
    )
    search_name = models.CharField(max_length=520, editable=False, db_index=True)
    country = models.ForeignKey(Country, on_delete=models.PROTECT, related_name="facilities")
    area = models.ForeignKey(
        AdministrativeArea,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="facilities",
        help_text="the most specific administrative area",
    )
    province = models.ForeignKey(
        AdministrativeArea,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="derived from area: its level-1 ancestor (for reports and filters)",
    )
    tier = models.PositiveSmallIntegerField(choices=Tier.choices, db_index=True)
    facility_type = models.CharField(max_length=100, blank=True)
    ownership = models.CharField(max_length=20, choices=Ownership.choices, default=Ownership.PUBLIC)
    operational_status = models.CharField(
        max_length=20, choices=OperationalStatus.choices, default=OperationalStatus.ACTIVE
    )
    latitude = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(-90), MaxValueValidator(90)]
    )
    longitude = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(-180), MaxValueValidator(180)]
    )
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    languages = models.JSONField(default=list, blank=True, help_text="BCP-47 codes, e.g. ['vi']")
    beds = models.PositiveIntegerField(
        null=True, blank=True, validators=[MaxValueValidator(INTEGER_MAX)]
    )
    is_remote = models.BooleanField(
        default=False, help_text="island, mountain or otherwise hard-to-reach site"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "facilities"
        indexes = [
            models.Index(fields=["country", "tier"]),
            models.Index(fields=["latitude", "longitude"]),
            models.Index(fields=["operational_status"]),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(tier__gte=1, tier__lte=4), name="facility_tier_1_4"),
            models.CheckConstraint(
                condition=Q(latitude__isnull=True, longitude__isnull=True)
                | Q(
                    latitude__isnull=False,
                    longitude__isnull=False,
                    latitude__gte=-90,
                    latitude__lte=90,
                    longitude__gte=-180,
                    longitude__lte=180,
                ),
                name="facility_coordinates_valid",
            ),
            models.CheckConstraint(condition=~Q(parent=F("id")), name="facility_not_own_parent"),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: object, **kwargs: object) -> None:
        self.search_name = search_key(f"{self.name} {self.name_local}")
        super().save(*args, **kwargs)  # type: ignore[arg-type]

    def clean(self) -> None:
        # Mirrors the database check so forms and services report it as a field error.
        if (self.latitude is None) != (self.longitude is None):
            raise ValidationError({"latitude": "Give both latitude and longitude, or neither."})

    @property
    def is_active(self) -> bool:
        return self.operational_status == OperationalStatus.ACTIVE

    @property
    def has_coordinates(self) -> bool:
        return self.latitude is not None and self.longitude is not None


class FacilityIdentifier(models.Model):
    """An identifier another system gives the facility (system URI + value)."""

    facility = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="identifiers")
    system = models.CharField(max_length=255)
    value = models.CharField(max_length=255)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["system", "value"], name="facility_identifier_unique"),
            models.UniqueConstraint(
                fields=["facility", "system"], name="facility_one_identifier_per_system"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.system}|{self.value}"


class Specialty(models.Model):
    """A SNOMED CT specialty from the HL7 practice-setting value set."""

    SNOMED = "http://snomed.info/sct"

    system = models.CharField(max_length=255, default=SNOMED)
    code = models.CharField(max_length=32)
    display = models.CharField(max_length=200)

    class Meta:
        ordering = ["display"]
        verbose_name_plural = "specialties"
        constraints = [
            models.UniqueConstraint(fields=["system", "code"], name="specialty_unique_code")
        ]

    def __str__(self) -> str:
        return self.display


class ConsultMode(models.TextChoices):
    ASYNC = "async", "Asynchronous e-consult"
    LIVE = "live", "Live teleconsult"
    TRANSFER = "transfer", "Transfer"


class Department(models.Model):
    """A facility's service for one specialty (FHIR HealthcareService)."""

    facility = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="departments")
    specialty = models.ForeignKey(Specialty, on_delete=models.PROTECT, related_name="departments")
    name = models.CharField(max_length=255)
    offers_async = models.BooleanField(default=True)
    offers_live = models.BooleanField(default=False)
    offers_transfer = models.BooleanField(default=False)
    accepting = models.BooleanField(default=True)
    daily_capacity = models.PositiveIntegerField(
        default=20, validators=[MaxValueValidator(INTEGER_MAX)]
    )
    sla_hours = models.PositiveIntegerField(default=48)
    languages = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["facility__name", "specialty__display"]
        constraints = [
            models.UniqueConstraint(
                fields=["facility", "specialty"], name="department_one_per_facility_specialty"
            ),
            models.CheckConstraint(condition=Q(sla_hours__gte=1), name="department_sla_positive"),
        ]
        indexes = [models.Index(fields=["specialty", "accepting"])]

    def __str__(self) -> str:
        return f"{self.name} — {self.facility.name}"

    @property
    def modes(self) -> list[str]:
        flags = (
            (ConsultMode.ASYNC, self.offers_async),
            (ConsultMode.LIVE, self.offers_live),
            (ConsultMode.TRANSFER, self.offers_transfer),
        )
        return [str(mode) for mode, on in flags if on]


class Practitioner(models.Model):
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="practitioner",
    )
    family_name = models.CharField(max_length=150)
    given_name = models.CharField(max_length=150, blank=True)
    license_number = models.CharField(max_length=64, blank=True)
    languages = models.JSONField(default=list, blank=True)
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["family_name", "given_name"]

    def __str__(self) -> str:
        return f"{self.given_name} {self.family_name}".strip()


class PractitionerRole(models.Model):
    class Code(models.TextChoices):
        CONSULTANT = "consultant", "Consultant"
        DOCTOR = "doctor", "Doctor"
        NURSE = "nurse", "Nurse"
        COORDINATOR = "coordinator", "Coordinator"

    practitioner = models.ForeignKey(Practitioner, on_delete=models.CASCADE, related_name="roles")
    facility = models.ForeignKey(
        Facility, on_delete=models.CASCADE, related_name="practitioner_roles"
    )
    department = models.ForeignKey(
        Department,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="practitioner_roles",
    )
    code = models.CharField(max_length=20, choices=Code.choices, default=Code.DOCTOR)
    active = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["practitioner", "facility", "department", "code"],
                name="practitioner_role_unique",
            )
        ]

    def __str__(self) -> str:
        return f"{self.practitioner} — {self.get_code_display()} @ {self.facility}"


class Endpoint(models.Model):
    """A member hospital system's FHIR base URL."""

    class FhirVersion(models.TextChoices):
        # The versions the gateway sends (R4B, 4.3, was listed once: an endpoint saved with
        # it got nothing but dead messages; rows stored with it still are dead-lettered).
        R4 = "4.0", "R4 (4.0.1)"
        R5 = "5.0", "R5 (5.0.0)"

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"
        ERROR = "error", "Error"
        OFF = "off", "Off"

    class AuthType(models.TextChoices):
        NONE = "none", "None"
        BEARER = "bearer", "Bearer token"
        BASIC = "basic", "HTTP basic"

    facility = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="endpoints")
    name = models.CharField(max_length=200, blank=True)
    base_url = models.URLField(max_length=500, validators=[validate_endpoint_base_url])
    fhir_version = models.CharField(
        max_length=3, choices=FhirVersion.choices, default=FhirVersion.R4
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ACTIVE)
    auth_type = models.CharField(max_length=10, choices=AuthType.choices, default=AuthType.NONE)
    # A reference to a secret (env var or file name), never the secret itself.
    auth_secret_ref = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["facility", "base_url"], name="endpoint_unique_url"),
        ]

    def __str__(self) -> str:
        return f"{self.base_url} (FHIR {self.fhir_version})"

    def clean(self) -> None:
        errors: dict[str, str] = {}
        # Stored in its compared form, so the unique constraint sees what delivery sees.
        self.base_url = endpoint_base_url_key(self.base_url)
        if self.facility_id is not None and self.base_url:
            others = Endpoint.objects.filter(facility_id=self.facility_id).exclude(pk=self.pk)
            # Compared in Python: rows stored before the normal form may differ in case.
            if any(
                endpoint_base_url_key(url) == self.base_url
                for url in others.values_list("base_url", flat=True)
            ):
                errors["base_url"] = "This facility already has an endpoint with this base URL."
        # Delivery reads the secret that auth_secret_ref names: bearer or basic without
        # one can never send, and a reference auth type "none" never reads is a mistake.
        ref, problem = self.auth_secret_ref, ""
        if self.auth_type == self.AuthType.NONE:
            if ref:
                problem = 'auth_type "none" reads no secret: leave auth_secret_ref empty.'
        elif not ref:
            problem = (
                f'auth_type "{self.auth_type}" needs auth_secret_ref: the name of the '
                "environment variable (or NAME_FILE) that holds the credential."
            )
        elif not SECRET_REF.match(ref):
            problem = (
                "auth_secret_ref is the name of an environment variable (letters, digits, "
                "underscores), not the secret itself."
            )
        if problem:
            errors["auth_secret_ref"] = problem
        if errors:
            raise ValidationError(errors)


class SupportLink(models.Model):
    """Hub supports spoke for some specialties (mCSD OrganizationAffiliation)."""

    hub = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="spoke_links")
    spoke = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="hub_links")
    specialties = models.ManyToManyField(
        Specialty, blank=True, related_name="support_links", help_text="empty = all specialties"
    )
    valid_from = models.DateField(default=timezone.localdate)
    valid_to = models.DateField(null=True, blank=True)
    is_cross_border = models.BooleanField(default=False, editable=False)
    agreement_reference = models.CharField(
        max_length=200, blank=True, help_text="data-sharing agreement (required across borders)"
    )
    identifiable_data_allowed = models.BooleanField(
        default=True, help_text="may identifiable patient data cross this link?"
    )
    active = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~Q(hub=F("spoke")), name="support_link_not_self"),
            models.UniqueConstraint(
                fields=["hub", "spoke", "valid_from"], name="support_link_unique"
            ),
            models.CheckConstraint(
                condition=Q(valid_to__isnull=True) | Q(valid_to__gte=F("valid_from")),
                name="support_link_period_ordered",
            ),
            models.CheckConstraint(
                condition=Q(is_cross_border=False) | ~Q(agreement_reference=""),
                name="support_link_cross_border_needs_agreement",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.hub} → {self.spoke}"

    def save(self, *args: object, **kwargs: object) -> None:
        # Derived, stored so the database can enforce the agreement rule above.
        self.is_cross_border = self.hub.country_id != self.spoke.country_id
        super().save(*args, **kwargs)  # type: ignore[arg-type]


class ChangeRequest(models.Model):
    """A facility add/update proposed by a facility admin, applied when a steward approves."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"

    facility = models.ForeignKey(
        Facility,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="change_requests",
        help_text="empty for a proposed new facility",
    )
    payload = models.JSONField(help_text="proposed field values")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    proposed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    proposed_at = models.DateTimeField(default=timezone.now)
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    review_comment = models.TextField(blank=True)

    class Meta:
        ordering = ["-proposed_at"]
        indexes = [models.Index(fields=["status", "proposed_at"])]

    def __str__(self) -> str:
        return f"Change #{self.pk} ({self.status})"


class FacilityRevision(models.Model):
    """Append-only history of every change to a facility."""

    facility = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="revisions")
    changed_at = models.DateTimeField(default=timezone.now)
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    source = models.CharField(max_length=30, help_text="api, import, change-request, seed, admin")
    change_request = models.ForeignKey(
        ChangeRequest, null=True, blank=True, on_delete=models.SET_NULL, related_name="revisions"
    )
    changes = models.JSONField(help_text="{field: [old, new]}")

    class Meta:
        ordering = ["-changed_at", "-id"]

    def __str__(self) -> str:
        return f"{self.facility_id} @ {self.changed_at:%Y-%m-%d %H:%M}"
