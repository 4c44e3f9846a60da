"""Input parsing and output shapes for the referral API. Action inputs are generated from
``workflow.TRANSITIONS`` so the OpenAPI schema always matches the table."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, tzinfo
from typing import Any

from django.utils import timezone
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from referrals.models import (
    MIN_BIRTH_YEAR,
    CloseOut,
    CloseOutOutcome,
    ConsultNote,
    Disposition,
    Message,
    PatientSex,
    Priority,
    Referral,
    ReferralEvent,
)
from referrals.workflow import InputField, Transition
from registry.models import ConsultMode, Department, Specialty

PRIORITY_CODES = [str(p.label) for p in Priority]


class PatientSerializer(serializers.Serializer[Any]):
    ref = serializers.CharField(max_length=128, required=False, allow_blank=True, default="")
    sex = serializers.ChoiceField(choices=PatientSex.choices, default=PatientSex.UNKNOWN)
    birth_year = serializers.IntegerField(
        min_value=MIN_BIRTH_YEAR, max_value=2100, required=False, allow_null=True, default=None
    )


class ReferralSubmitSerializer(serializers.Serializer[Any]):
    placer_system = serializers.CharField(max_length=255)
    placer_value = serializers.CharField(max_length=255)
    specialty = serializers.CharField(help_text="SNOMED CT specialty code, e.g. 394537008")
    specialty_system = serializers.CharField(default=Specialty.SNOMED)
    # Values only (no labels): registry's `modes` already owns the labelled ConsultMode enum
    # in the schema, and two names for one choice set is a schema warning.
    mode = serializers.ChoiceField(choices=list(ConsultMode.values), default=ConsultMode.ASYNC)
    priority = serializers.ChoiceField(choices=PRIORITY_CODES, default="routine")
    clinical_question = serializers.CharField(max_length=20_000)
    patient = PatientSerializer(required=False)
    department = serializers.PrimaryKeyRelatedField(
        queryset=Department.objects.select_related("facility"),
        required=False,
        allow_null=True,
        help_text="the department asked (must be a routing candidate: GET "
        "/referrals/{id}/suggestions/); empty = routing assigns the best candidate",
    )
    campaign = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    draft = serializers.BooleanField(default=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        try:
            attrs["specialty"] = Specialty.objects.get(
                system=attrs.pop("specialty_system"), code=attrs["specialty"]
            )
        except Specialty.DoesNotExist as exc:
            raise serializers.ValidationError({"specialty": "unknown specialty code"}) from exc
        attrs["priority"] = Priority.from_code(attrs["priority"])
        return attrs


class AwareDateTimeField(serializers.DateTimeField):
    """A date-time with its time zone: DRF would read ``2031-01-01T10:00`` as UTC, whose
    10 o'clock the sender may not have meant."""

    default_error_messages = {
        **serializers.DateTimeField.default_error_messages,
        "naive": "Give the time zone (ISO 8601, e.g. 2031-01-01T10:00:00+07:00).",
    }

    def to_internal_value(self, value: Any) -> Any:
        if isinstance(value, str):
            try:
                parsed = parse_datetime(value.strip())
            except ValueError:  # a date-time that does not exist: DRF says so
                parsed = None
            if parsed is not None and timezone.is_naive(parsed):
                self.fail("naive")
        return super().to_internal_value(value)


_FIELD_KINDS: dict[str, Any] = {
    "text": lambda f: serializers.CharField(max_length=20_000, help_text=f.help),
    "choice": lambda f: serializers.ChoiceField(choices=list(f.choices), help_text=f.help),
    "bool": lambda f: serializers.BooleanField(help_text=f.help),
    "datetime": lambda f: AwareDateTimeField(help_text=f.help),
    "department": lambda f: serializers.IntegerField(help_text=f.help or "department id"),
    "users": lambda f: serializers.ListField(
        child=serializers.IntegerField(), min_length=1, help_text=f.help
    ),
    "url": lambda f: serializers.URLField(max_length=500, help_text=f.help),
}


def _field(spec: InputField) -> serializers.Field[Any, Any, Any, Any]:
    field: serializers.Field[Any, Any, Any, Any] = _FIELD_KINDS[spec.kind](spec)
    # Through the constructor kwargs: a serializer deep-copies its declared fields by
    # re-creating them from those, so setting ``field.required`` afterwards was lost.
    field._kwargs["required"] = spec.required  # type: ignore[attr-defined]
    field.required = spec.required
    return field


def action_input_serializer(transition: Transition) -> type[serializers.Serializer[Any]] | None:
    if not transition.inputs:
        return None
    name = "".join(part.title() for part in transition.action.split("_")) + "InputSerializer"
    fields = {spec.name: _field(spec) for spec in transition.inputs}
    return type(name, (serializers.Serializer,), fields)


class SpecialtyRefSerializer(serializers.Serializer[Any]):
    system = serializers.CharField()
    code = serializers.CharField()
    display = serializers.CharField()


class FacilityRefSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    code = serializers.CharField()
    name = serializers.CharField()


class DepartmentRefSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    name = serializers.CharField()
    facility = FacilityRefSerializer()


class ReferralListSerializer(serializers.ModelSerializer[Referral]):
    priority = serializers.ChoiceField(source="priority_code", choices=PRIORITY_CODES)
    mode = serializers.ChoiceField(choices=list(ConsultMode.values))
    specialty = SpecialtyRefSerializer()
    requester_facility = FacilityRefSerializer()
    assigned_department = DepartmentRefSerializer(allow_null=True)

    class Meta:
        model = Referral
        fields = [
            "id",
            "filler_id",
            "placer_system",
            "placer_value",
            "state",
            "version",
            "priority",
            "mode",
            "specialty",
            "requester_facility",
            "assigned_department",
            "deadline",
            "campaign",
            "parent_referral",
            "created_at",
        ]


# The list rows (worklist, outgoing) are built from plain tuples, not through the
# serializer above: for a 50-row page, model instances plus DRF's per-field machinery cost
# several times the query (docs/performance.md). ``ReferralListSerializer`` stays the
# documented schema; a test keeps both outputs identical.
_PRIORITY_CODE: dict[int, str] = {int(p.value): str(p.label) for p in Priority}


def _iso(value: datetime | None, zone: tzinfo) -> str | None:
    """What DRF's DateTimeField renders (ISO 8601 in the current time zone, UTC as Z)."""
    if value is None:
        return None
    text = value.astimezone(zone).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def referral_list_data(rows: Iterable[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """The list representation of rows in ``selectors.LIST_COLUMNS`` order."""
    zone = timezone.get_current_timezone()
    data = []
    for (
        pk,
        filler_id,
        placer_system,
        placer_value,
        state,
        version,
        priority,
        mode,
        specialty_system,
        specialty_code,
        specialty_display,
        requester_id,
        requester_code,
        requester_name,
        department_id,
        department_name,
        department_facility_id,
        department_facility_code,
        department_facility_name,
        deadline,
        campaign,
        parent_id,
        created_at,
    ) in rows:
        data.append(
            {
                "id": pk,
                "filler_id": str(filler_id),
                "placer_system": placer_system,
                "placer_value": placer_value,
                "state": state,
                "version": version,
                "priority": _PRIORITY_CODE[priority],
                "mode": mode,
                "specialty": {
                    "system": specialty_system,
                    "code": specialty_code,
                    "display": specialty_display,
                },
                "requester_facility": {
                    "id": requester_id,
                    "code": requester_code,
                    "name": requester_name,
                },
                "assigned_department": None
                if department_id is None
                else {
                    "id": department_id,
                    "name": department_name,
                    "facility": {
                        "id": department_facility_id,
                        "code": department_facility_code,
                        "name": department_facility_name,
                    },
                },
                "deadline": _iso(deadline, zone),
                "campaign": campaign,
                "parent_referral": parent_id,
                "created_at": _iso(created_at, zone),
            }
        )
    return data


class ReferralEventSerializer(serializers.ModelSerializer[ReferralEvent]):
    actor = serializers.CharField(source="actor.username", default=None)
    # Plain strings: one shared state enum in the schema, not one per field name.
    from_state = serializers.CharField(help_text="a referral state")
    to_state = serializers.CharField(help_text="a referral state")

    class Meta:
        model = ReferralEvent
        fields = [
            "seq",
            "at",
            "action",
            "from_state",
            "to_state",
            "actor",
            "actor_side",
            "department",
            "reason",
            "payload",
        ]


class ConsultNoteSerializer(serializers.ModelSerializer[ConsultNote]):
    # Same choice set as the action inputs, so the schema has one DispositionEnum.
    disposition = serializers.ChoiceField(choices=list(Disposition.values))

    class Meta:
        model = ConsultNote
        fields = ["id", "author", "disposition", "text", "conference_minutes", "created_at"]


class MessageSerializer(serializers.ModelSerializer[Message]):
    class Meta:
        model = Message
        fields = ["id", "author", "text", "in_response_to", "created_at"]


class CloseOutSerializer(serializers.ModelSerializer[CloseOut]):
    outcome = serializers.ChoiceField(choices=list(CloseOutOutcome.values))

    class Meta:
        model = CloseOut
        fields = ["transfer_originally_considered", "outcome", "answered_by", "answered_at"]


class ReferralDetailSerializer(ReferralListSerializer):
    patient = serializers.SerializerMethodField()
    conference = serializers.SerializerMethodField()
    events = ReferralEventSerializer(many=True)
    consult_notes = ConsultNoteSerializer(many=True)
    messages = MessageSerializer(many=True)
    close_out = serializers.SerializerMethodField()
    available_actions = serializers.SerializerMethodField()

    class Meta(ReferralListSerializer.Meta):
        fields = [
            *ReferralListSerializer.Meta.fields,
            "acknowledged_at",
            "clinical_question",
            "patient",
            "conference",
            "updated_at",
            "events",
            "consult_notes",
            "messages",
            "close_out",
            "available_actions",
        ]

    @extend_schema_field(PatientSerializer)
    def get_patient(self, obj: Referral) -> dict[str, Any]:
        return {
            "ref": obj.patient_ref,
            "sex": obj.patient_sex,
            "birth_year": obj.patient_birth_year,
        }

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_conference(self, obj: Referral) -> dict[str, Any] | None:
        if obj.conference_at is None:
            return None
        return {
            "at": obj.conference_at.isoformat(),
            "url": obj.conference_url,
            "experts": sorted(u.pk for u in obj.conference_experts.all()),
        }

    @extend_schema_field(CloseOutSerializer(allow_null=True))
    def get_close_out(self, obj: Referral) -> dict[str, Any] | None:
        close_out = getattr(obj, "close_out", None)
        return CloseOutSerializer(close_out).data if close_out is not None else None

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_available_actions(self, obj: Referral) -> list[str]:
        return list(self.context.get("available_actions", []))


class ReferralResubmissionSerializer(ReferralDetailSerializer):
    """The answer to a resubmission (idempotent intake): the referral as it is, and what
    this submission said otherwise than it (none of which was applied)."""

    resubmission_differs = serializers.SerializerMethodField()

    class Meta(ReferralDetailSerializer.Meta):
        fields = [*ReferralDetailSerializer.Meta.fields, "resubmission_differs"]

    @extend_schema_field(
        serializers.ListField(
            child=serializers.ChoiceField(
                choices=["clinical_question", "priority", "mode", "patient", "specialty"]
            ),
            help_text="the fields this submission said otherwise than the referral its "
            "placer identifier names; none of it was applied (empty: the same)",
        )
    )
    def get_resubmission_differs(self, obj: Referral) -> list[str]:
        return list(self.context["resubmission_differs"])


class SuggestionSerializer(serializers.Serializer[Any]):
    """One routing candidate (``referrals.routing.Suggestion``)."""

    department_id = serializers.IntegerField()
    department_name = serializers.CharField()
    facility_id = serializers.IntegerField()
    facility_name = serializers.CharField()
    facility_tier = serializers.IntegerField()
    country = serializers.CharField()
    score = serializers.FloatField()
    allowed = serializers.BooleanField(
        help_text="false: reachable only without identifiable patient data"
    )
    reasons = serializers.ListField(child=serializers.CharField())
    distance_km = serializers.FloatField(allow_null=True)
    capacity_left = serializers.IntegerField()
    median_response_hours = serializers.FloatField(allow_null=True)
