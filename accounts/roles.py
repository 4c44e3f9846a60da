"""Roles are Django groups with these names; one constant per role."""

from django.db import models


class Role(models.TextChoices):
    REFERRER = "referrer", "Referring clinician"
    CONSULTANT = "consultant", "Consultant"
    COORDINATOR = "coordinator", "Coordinator"
    MINISTRY = "ministry", "Ministry official"
    REGISTRY_STEWARD = "registry-steward", "Registry steward"
    FACILITY_ADMIN = "facility-admin", "Facility administrator"
    MEMBER_SYSTEM = "member-system", "Member hospital system"
