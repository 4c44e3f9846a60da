"""The registry in Django's admin. Saves go through the rules the API keeps (the services'
checks, as form errors rather than database errors) and leave the same history: a
facility's revision, its province derived from its area, its links' border flag."""

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

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
from registry.services import (
    area_problem,
    area_province,
    area_save,
    department_problem,
    facility_admin_saved,
    facility_border_problem,
    facility_delete,
    facility_identifier_keys,
    facility_parent_problem,
    facility_snapshot,
    facility_tier_problem,
    support_link_problem,
)


class RegistryForm(forms.ModelForm[Any]):
    """A model form that also asks the service what is wrong with the row as it would be
    saved (after Django's own checks have put the form's values on the instance)."""

    def _post_clean(self) -> None:
        super()._post_clean()  # type: ignore[misc]
        if not self.errors and (problem := self.registry_problem(self.instance)):
            field, message = problem
            self.add_error(field, message)

    def registry_problem(self, instance: Any) -> tuple[str | None, str] | None:
        raise NotImplementedError


class AreaForm(RegistryForm):
    def registry_problem(self, instance: AdministrativeArea) -> tuple[str | None, str] | None:
        problem = area_problem(instance)
        return ("parent", problem) if problem else None


@admin.register(Country)
class CountryAdmin(admin.ModelAdmin[Country]):
    list_display = ("code", "name", "name_local")
    search_fields = ("code", "name")


@admin.register(AdministrativeArea)
class AdministrativeAreaAdmin(admin.ModelAdmin[AdministrativeArea]):
    form = AreaForm
    list_display = ("name", "level", "country", "parent", "code")
    list_filter = ("country", "level")
    list_select_related = ("country", "parent")
    search_fields = ("name", "code")
    autocomplete_fields = ("parent",)

    def save_model(self, request: Any, obj: AdministrativeArea, form: Any, change: bool) -> None:
        area_save(area=obj)  # its facilities' addresses and provinces change with it


class FacilityIdentifierInline(admin.TabularInline[FacilityIdentifier, Facility]):
    model = FacilityIdentifier
    extra = 0


class DepartmentForm(RegistryForm):
    def registry_problem(self, instance: Department) -> tuple[str | None, str] | None:
        if self.cleaned_data.get("DELETE"):
            return None  # a row being deleted
        # an inline row of a facility being added has no facility yet: its modes are
        # checked here, two rows of one specialty by the formset
        problem = department_problem(instance)
        return (None, problem.message) if problem else None


class DepartmentInline(admin.TabularInline[Department, Facility]):
    model = Department
    form = DepartmentForm
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


class FacilityForm(RegistryForm):
    def registry_problem(self, instance: Facility) -> tuple[str | None, str] | None:
        if problem := facility_parent_problem(instance):
            return ("parent", problem)
        if problem := facility_border_problem(instance):
            return ("country", problem)
        if problem := facility_tier_problem(instance):
            return ("tier", problem)
        return None


@admin.register(Facility)
class FacilityAdmin(admin.ModelAdmin[Facility]):
    form = FacilityForm
    readonly_fields = ("province",)  # derived from the area
    list_display = ("name", "code", "tier", "country", "province", "operational_status")
    list_filter = ("tier", "country", "operational_status", "ownership", "is_remote")
    list_select_related = ("country", "province")
    search_fields = ("name", "name_local", "search_name", "code")
    autocomplete_fields = ("area", "province", "parent")
    inlines = [FacilityIdentifierInline, DepartmentInline]

    def save_model(self, request: Any, obj: Facility, form: Any, change: bool) -> None:
        # The revision is written once the inline identifiers are saved (save_related).
        form.registry_before = None
        if change:
            stored = Facility.objects.get(pk=obj.pk)
            form.registry_before = (facility_snapshot(stored), facility_identifier_keys(obj.pk))
        obj.province = area_province(obj.area)
        super().save_model(request, obj, form, change)

    def save_related(self, request: Any, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        before, identifiers = form.registry_before or (None, None)
        facility_admin_saved(
            actor=request.user,
            facility=form.instance,
            before=before,
            identifiers_before=identifiers,
        )

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
    form = DepartmentForm
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


class SupportLinkForm(RegistryForm):
    def registry_problem(self, instance: SupportLink) -> tuple[str | None, str] | None:
        problem = support_link_problem(instance)
        return (None, problem.message) if problem else None


@admin.register(SupportLink)
class SupportLinkAdmin(admin.ModelAdmin[SupportLink]):
    form = SupportLinkForm
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
    """Append-only history: viewed here, never added, changed or deleted."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

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
