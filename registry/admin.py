from typing import Any

from django.contrib import admin
from django.db.models import QuerySet

from registry.models import (
    AdministrativeArea,
    ChangeRequest,
    Country,
    Department,
    Endpoint,
    Facility,
    FacilityIdentifier,
    FacilityRevision,
    Practitioner,
    PractitionerRole,
    Specialty,
    SupportLink,
)
from registry.services import area_save, facility_delete


@admin.register(Country)
class CountryAdmin(admin.ModelAdmin[Country]):
    list_display = ("code", "name", "name_local")
    search_fields = ("code", "name")


@admin.register(AdministrativeArea)
class AdministrativeAreaAdmin(admin.ModelAdmin[AdministrativeArea]):
    list_display = ("name", "level", "country", "parent", "code")
    list_filter = ("country", "level")
    list_select_related = ("country", "parent")
    search_fields = ("name", "code")
    autocomplete_fields = ("parent",)

    def save_model(self, request: Any, obj: AdministrativeArea, form: Any, change: bool) -> None:
        area_save(area=obj)  # its facilities' addresses change with it


class FacilityIdentifierInline(admin.TabularInline[FacilityIdentifier, Facility]):
    model = FacilityIdentifier
    extra = 0


class DepartmentInline(admin.TabularInline[Department, Facility]):
    model = Department
    extra = 0
    fields = (
        "specialty",
        "name",
        "offers_async",
        "offers_live",
        "offers_transfer",
        "accepting",
        "daily_capacity",
        "sla_hours",
    )
    autocomplete_fields = ("specialty",)


@admin.register(Facility)
class FacilityAdmin(admin.ModelAdmin[Facility]):
    list_display = ("name", "code", "tier", "country", "province", "operational_status")
    list_filter = ("tier", "country", "operational_status", "ownership", "is_remote")
    list_select_related = ("country", "province")
    search_fields = ("name", "name_local", "search_name", "code")
    autocomplete_fields = ("area", "province", "parent")
    inlines = [FacilityIdentifierInline, DepartmentInline]

    def delete_model(self, request: Any, obj: Facility) -> None:
        facility_delete(facility=obj)  # its children lose their parent

    def delete_queryset(self, request: Any, queryset: QuerySet[Facility]) -> None:
        for facility in queryset:
            facility_delete(facility=facility)


@admin.register(Specialty)
class SpecialtyAdmin(admin.ModelAdmin[Specialty]):
    list_display = ("code", "display", "system")
    search_fields = ("code", "display")


@admin.register(Department)
class DepartmentAdmin(admin.ModelAdmin[Department]):
    list_display = ("name", "facility", "specialty", "accepting", "daily_capacity", "sla_hours")
    list_filter = ("accepting", "offers_async", "offers_live", "offers_transfer")
    list_select_related = ("facility", "specialty")
    search_fields = ("name", "facility__name")
    autocomplete_fields = ("facility", "specialty")


@admin.register(Practitioner)
class PractitionerAdmin(admin.ModelAdmin[Practitioner]):
    list_display = ("family_name", "given_name", "license_number", "active")
    search_fields = ("family_name", "given_name", "license_number")


@admin.register(PractitionerRole)
class PractitionerRoleAdmin(admin.ModelAdmin[PractitionerRole]):
    list_display = ("practitioner", "code", "facility", "department", "active")
    list_select_related = ("practitioner", "facility", "department")
    autocomplete_fields = ("practitioner", "facility", "department")


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin[Endpoint]):
    list_display = ("base_url", "facility", "fhir_version", "status")
    list_filter = ("fhir_version", "status")
    list_select_related = ("facility",)
    autocomplete_fields = ("facility",)


@admin.register(SupportLink)
class SupportLinkAdmin(admin.ModelAdmin[SupportLink]):
    list_display = ("hub", "spoke", "is_cross_border", "valid_from", "valid_to", "active")
    list_filter = ("is_cross_border", "active")
    list_select_related = ("hub", "spoke")
    autocomplete_fields = ("hub", "spoke")
    filter_horizontal = ("specialties",)


@admin.register(ChangeRequest)
class ChangeRequestAdmin(admin.ModelAdmin[ChangeRequest]):
    list_display = ("id", "facility", "status", "proposed_by", "proposed_at", "reviewed_by")
    list_filter = ("status",)
    list_select_related = ("facility", "proposed_by", "reviewed_by")
    readonly_fields = ("proposed_by", "proposed_at", "reviewed_by", "reviewed_at", "status")


@admin.register(FacilityRevision)
class FacilityRevisionAdmin(admin.ModelAdmin[FacilityRevision]):
    list_display = ("facility", "changed_at", "changed_by", "source")
    list_select_related = ("facility", "changed_by")
    readonly_fields = (
        "facility",
        "changed_at",
        "changed_by",
        "source",
        "change_request",
        "changes",
    )
