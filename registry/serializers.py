"""Input parsing and output shaping for the registry API."""

from __future__ import annotations

import math
from typing import Any

from django.core.exceptions import MultipleObjectsReturned
from django.utils import timezone
from rest_framework import serializers

from core.values import json_holds_nul
from registry.models import (
    AdministrativeArea,
    ChangeRequest,
    ConsultMode,
    Country,
    Department,
    Endpoint,
    Facility,
    FacilityRevision,
    Practitioner,
    Specialty,
    SupportLink,
)
from registry.validators import INTEGER_MAX, LANGUAGE_TAG


class CodeRelatedField(serializers.SlugRelatedField):
    """A row named by its code. A NUL never names one (PostgreSQL refuses it in text: a
    500 before), and a code two rows share (a specialty code in two code systems) is an
    error to fix, not a guess."""

    default_error_messages = {
        "ambiguous": "Several rows have {slug_name}={value}: it names none of them alone."
    }

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str) and "\x00" in data:
            self.fail("does_not_exist", slug_name=self.slug_field, value="(with a NUL)")
        try:
            return super().to_internal_value(data)
        except MultipleObjectsReturned:
            self.fail("ambiguous", slug_name=self.slug_field, value=str(data))


class FiniteFloatField(serializers.FloatField):
    """A float that is a number: "NaN" and "Infinity" parse as floats and NaN slips past
    min/max checks, so they are refused here."""

    default_error_messages = {"not_finite": "A finite number is required."}

    def to_internal_value(self, data: Any) -> float:
        value = super().to_internal_value(data)
        if not math.isfinite(value):
            self.fail("not_finite")
        return value


class ReplaceOnPut:
    """A full update (PUT) replaces: an optional field the body leaves out takes its
    default (the model field's, or an empty list for a list), as on a create, instead of
    keeping the stored value; a PATCH (``partial``) keeps what it does not name. A model
    serializer updates ``self.instance``; an input serializer is given the facility or
    department it updates as ``context["instance"]`` and names its model in
    ``replace_model``."""

    replace_model: type[Any] | None = None

    def to_internal_value(self, data: Any) -> Any:
        attrs = super().to_internal_value(data)  # type: ignore[misc]
        updating = getattr(self, "instance", None) or self.context.get("instance")  # type: ignore[attr-defined]
        if updating is None or self.partial:  # type: ignore[attr-defined]
            return attrs
        meta = getattr(self, "Meta", None)
        model = self.replace_model or getattr(meta, "model", None)
        assert model is not None
        for field in self.fields.values():  # type: ignore[attr-defined]
            if field.read_only or field.required or field.source in attrs:
                continue
            if isinstance(
                field,
                serializers.ListSerializer | serializers.ListField | serializers.ManyRelatedField,
            ):
                attrs[field.source] = []
            else:
                attrs[field.source] = model._meta.get_field(field.source).get_default()
        return attrs


class CountrySerializer(serializers.ModelSerializer[Country]):
    class Meta:
        model = Country
        fields = ["code", "name", "name_local"]


class AreaSerializer(serializers.ModelSerializer[AdministrativeArea]):
    country = serializers.CharField(source="country.code", read_only=True)

    class Meta:
        model = AdministrativeArea
        fields = ["id", "country", "parent", "level", "code", "name", "name_local"]


class SpecialtySerializer(serializers.ModelSerializer[Specialty]):
    class Meta:
        model = Specialty
        fields = ["system", "code", "display"]


class AreaRefSerializer(serializers.Serializer[AdministrativeArea]):
    id = serializers.IntegerField()
    name = serializers.CharField()


class IdentifierSerializer(serializers.Serializer[dict[str, str]]):
    system = serializers.CharField(max_length=255)
    value = serializers.CharField(max_length=255)


class FacilitySerializer(serializers.ModelSerializer[Facility]):
    country = serializers.CharField(source="country.code")
    area = AreaRefSerializer(allow_null=True)
    province = AreaRefSerializer(allow_null=True)
    parent = serializers.CharField(  # type: ignore[assignment]
        source="parent.code", allow_null=True, default=None
    )
    identifiers = IdentifierSerializer(many=True)

    class Meta:
        model = Facility
        fields = [
            "id",
            "code",
            "name",
            "name_local",
            "country",
            "area",
            "province",
            "tier",
            "facility_type",
            "ownership",
            "operational_status",
            "latitude",
            "longitude",
            "parent",
            "languages",
            "beds",
            "is_remote",
            "identifiers",
            "updated_at",
        ]


class FacilityInputSerializer(ReplaceOnPut, serializers.Serializer[dict[str, Any]]):
    """Parses a facility create/update (also the payload of a change request)."""

    replace_model = Facility

    code = serializers.RegexField(r"^[A-Za-z0-9._:\-]{1,64}$")
    name = serializers.CharField(max_length=255)
    name_local = serializers.CharField(max_length=255, required=False, allow_blank=True)
    country = CodeRelatedField(slug_field="code", queryset=Country.objects.all())
    area = serializers.PrimaryKeyRelatedField(
        queryset=AdministrativeArea.objects.all(), required=False, allow_null=True
    )
    tier = serializers.ChoiceField(choices=Facility._meta.get_field("tier").choices or [])
    facility_type = serializers.CharField(max_length=100, required=False, allow_blank=True)
    ownership = serializers.ChoiceField(
        choices=Facility._meta.get_field("ownership").choices or [], required=False
    )
    operational_status = serializers.ChoiceField(
        choices=Facility._meta.get_field("operational_status").choices or [], required=False
    )
    latitude = FiniteFloatField(min_value=-90, max_value=90, required=False, allow_null=True)
    longitude = FiniteFloatField(min_value=-180, max_value=180, required=False, allow_null=True)
    parent = CodeRelatedField(  # type: ignore[assignment]
        slug_field="code", queryset=Facility.objects.all(), required=False, allow_null=True
    )
    languages = serializers.ListField(
        child=serializers.RegexField(LANGUAGE_TAG), required=False, max_length=20
    )
    beds = serializers.IntegerField(
        min_value=0, max_value=INTEGER_MAX, required=False, allow_null=True
    )
    is_remote = serializers.BooleanField(required=False)
    identifiers = IdentifierSerializer(many=True, required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        instance: Facility | None = self.context.get("instance")
        lat = attrs.get("latitude", instance.latitude if instance else None)
        lon = attrs.get("longitude", instance.longitude if instance else None)
        if (lat is None) != (lon is None):
            raise serializers.ValidationError(
                {"latitude": "Give both latitude and longitude, or neither."}
            )
        country = attrs.get("country", instance.country if instance else None)
        area = attrs.get("area", instance.area if instance else None)
        if area is not None and country is not None and area.country_id != country.pk:
            raise serializers.ValidationError({"area": "The area is in another country."})
        parent = attrs.get("parent")
        if parent is not None and instance is not None and parent.pk == instance.pk:
            raise serializers.ValidationError({"parent": "A facility cannot be its own parent."})
        identifiers = attrs.get("identifiers") or []
        systems = [i["system"] for i in identifiers]
        if len(systems) != len(set(systems)):
            raise serializers.ValidationError({"identifiers": "At most one identifier per system."})
        return attrs


class DepartmentSerializer(serializers.ModelSerializer[Department]):
    facility = serializers.SerializerMethodField()
    specialty = SpecialtySerializer()
    modes = serializers.ListField(child=serializers.CharField(), read_only=True)

    class Meta:
        model = Department
        fields = [
            "id",
            "facility",
            "specialty",
            "name",
            "modes",
            "accepting",
            "daily_capacity",
            "sla_hours",
            "languages",
            "updated_at",
        ]

    def get_facility(self, obj: Department) -> dict[str, Any]:
        f = obj.facility
        return {
            "id": f.pk,
            "code": f.code,
            "name": f.name,
            "tier": f.tier,
            "country": f.country.code,
        }


class DepartmentInputSerializer(ReplaceOnPut, serializers.Serializer[dict[str, Any]]):
    replace_model = Department

    facility = serializers.PrimaryKeyRelatedField(queryset=Facility.objects.all())
    specialty = CodeRelatedField(slug_field="code", queryset=Specialty.objects.all())
    name = serializers.CharField(max_length=255)
    modes = serializers.ListField(
        child=serializers.ChoiceField(choices=ConsultMode.choices), min_length=1, max_length=3
    )
    accepting = serializers.BooleanField(required=False)
    daily_capacity = serializers.IntegerField(min_value=0, max_value=INTEGER_MAX, required=False)
    sla_hours = serializers.IntegerField(min_value=1, max_value=24 * 30, required=False)
    # The facility's rule: a BCP-47 tag ("not a tag" was stored before).
    languages = serializers.ListField(
        child=serializers.RegexField(LANGUAGE_TAG, max_length=16), required=False, max_length=20
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        modes = attrs.pop("modes", None)
        if modes is not None:
            attrs["offers_async"] = ConsultMode.ASYNC in modes
            attrs["offers_live"] = ConsultMode.LIVE in modes
            attrs["offers_transfer"] = ConsultMode.TRANSFER in modes
        return attrs


class NearbyQuerySerializer(serializers.Serializer[dict[str, Any]]):
    specialty = serializers.CharField(max_length=32)
    lat = FiniteFloatField(min_value=-90, max_value=90, required=False)
    lon = FiniteFloatField(min_value=-180, max_value=180, required=False)
    facility = serializers.PrimaryKeyRelatedField(queryset=Facility.objects.all(), required=False)
    radius_km = FiniteFloatField(min_value=0.1, max_value=5000, default=100)
    mode = serializers.ChoiceField(choices=ConsultMode.choices, required=False)
    limit = serializers.IntegerField(min_value=1, max_value=500, default=50)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        facility: Facility | None = attrs.get("facility")
        if facility is not None:
            if not facility.has_coordinates:
                raise serializers.ValidationError({"facility": "This facility has no coordinates."})
            attrs["lat"], attrs["lon"] = facility.latitude, facility.longitude
        elif "lat" not in attrs or "lon" not in attrs:
            raise serializers.ValidationError("Give lat and lon, or a facility.")
        return attrs


class NearbyDepartmentSerializer(serializers.Serializer[dict[str, Any]]):
    department_id = serializers.IntegerField()
    department_name = serializers.CharField()
    facility_id = serializers.IntegerField()
    facility_code = serializers.CharField()
    facility_name = serializers.CharField()
    facility_tier = serializers.IntegerField()
    country = serializers.CharField()
    specialty_code = serializers.CharField()
    specialty_display = serializers.CharField()
    modes = serializers.ListField(child=serializers.CharField())
    accepting = serializers.BooleanField()
    distance_km = serializers.FloatField()


class PractitionerSerializer(serializers.ModelSerializer[Practitioner]):
    roles = serializers.SerializerMethodField()

    class Meta:
        model = Practitioner
        fields = ["id", "family_name", "given_name", "languages", "active", "roles"]

    def get_roles(self, obj: Practitioner) -> list[dict[str, Any]]:
        return [
            {"facility": r.facility_id, "department": r.department_id, "code": r.code}
            for r in obj.roles.all()
        ]


class EndpointSerializer(ReplaceOnPut, serializers.ModelSerializer[Endpoint]):
    class Meta:
        model = Endpoint
        fields = [
            "id",
            "facility",
            "name",
            "base_url",
            "fhir_version",
            "status",
            "auth_type",
            "auth_secret_ref",
        ]
        # Written, never shown: every authenticated user reads endpoints, and the name
        # says where a credential lives. Checked with auth_type by Endpoint.clean().
        extra_kwargs = {"auth_secret_ref": {"write_only": True}}


class SupportLinkSerializer(ReplaceOnPut, serializers.ModelSerializer[SupportLink]):
    specialties = CodeRelatedField(
        slug_field="code", many=True, queryset=Specialty.objects.all(), required=False
    )

    class Meta:
        model = SupportLink
        fields = [
            "id",
            "hub",
            "spoke",
            "specialties",
            "valid_from",
            "valid_to",
            "is_cross_border",
            "agreement_reference",
            "identifiable_data_allowed",
            "active",
        ]
        read_only_fields = ["is_cross_border"]
        validators: list[Any] = []  # the service reports duplicates as 409

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # A new link without valid_from starts today (the model default).
        valid_from = (
            attrs.get("valid_from", getattr(self.instance, "valid_from", None))
            or timezone.localdate()
        )
        valid_to = attrs.get("valid_to", getattr(self.instance, "valid_to", None))
        if valid_from and valid_to and valid_to < valid_from:
            raise serializers.ValidationError({"valid_to": "Must not be before valid_from."})
        return attrs


class ChangeRequestSerializer(serializers.ModelSerializer[ChangeRequest]):
    proposed_by = serializers.CharField(source="proposed_by.username", read_only=True)
    reviewed_by = serializers.CharField(
        source="reviewed_by.username", read_only=True, allow_null=True, default=None
    )

    class Meta:
        model = ChangeRequest
        fields = [
            "id",
            "facility",
            "payload",
            "status",
            "proposed_by",
            "proposed_at",
            "reviewed_by",
            "reviewed_at",
            "review_comment",
        ]
        read_only_fields = fields


class ChangeRequestInputSerializer(serializers.Serializer[dict[str, Any]]):
    facility = serializers.PrimaryKeyRelatedField(
        queryset=Facility.objects.all(), required=False, allow_null=True
    )
    payload = serializers.DictField()

    def validate_payload(self, value: dict[str, Any]) -> dict[str, Any]:
        # Stored as proposed (jsonb), also what the facility fields do not read: NUL there
        # failed the INSERT, a 500 (found by fuzzing).
        if json_holds_nul(value):
            raise serializers.ValidationError("Null characters are not allowed.")
        return value


class ReviewInputSerializer(serializers.Serializer[dict[str, Any]]):
    comment = serializers.CharField(required=False, allow_blank=True, default="")


class FacilityRevisionSerializer(serializers.ModelSerializer[FacilityRevision]):
    changed_by = serializers.CharField(source="changed_by.username", allow_null=True, default=None)

    class Meta:
        model = FacilityRevision
        fields = ["id", "changed_at", "changed_by", "source", "change_request", "changes"]
