from __future__ import annotations

from typing import Any, TypeVar

import django_filters
from django import forms
from django.db.models import Model, Q, QuerySet

from core.values import row_id
from registry.models import (
    ConsultMode,
    Department,
    Facility,
    OperationalStatus,
    SupportLink,
    Tier,
)
from registry.selectors import MODE_FLAGS, area_descendant_ids
from registry.text import search_key

M = TypeVar("M", bound=Model)


class RowIdField(forms.Field):
    """A row id: ASCII digits in bigint range. A NumberFilter took "1.9" as 1, and a
    number past 2**63 reached the database (an OverflowError on SQLite: a 500)."""

    default_error_messages = {"invalid": "Give a row id: a whole number from 1 to 2**63-1."}

    def to_python(self, value: Any) -> int | None:
        if value in self.empty_values:
            return None
        found = row_id(value)
        if found is None:
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        return found


class RowIdFilter(django_filters.Filter):
    field_class = RowIdField


class StrictBooleanField(forms.Field):
    """true/false (or 1/0, any case). django-filter's boolean widget turned anything else
    into "no filter", so `accepting=maybe` listed everything without a word."""

    default_error_messages = {"invalid": "Give true or false."}
    WORDS = {"true": True, "1": True, "false": False, "0": False}

    def to_python(self, value: Any) -> bool | None:
        if value in self.empty_values:
            return None
        found = self.WORDS.get(str(value).lower())
        if found is None:
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        return found


class StrictBooleanFilter(django_filters.Filter):
    field_class = StrictBooleanField


def _name_search(queryset: QuerySet[M], field: str, value: str) -> QuerySet[M]:
    """Accent-insensitive: 'benh vien nhi' finds 'Bệnh viện Nhi Trung ương'."""
    for word in search_key(value).split():
        queryset = queryset.filter(**{f"{field}__contains": word})
    return queryset


class FacilityFilter(django_filters.FilterSet):
    country = django_filters.CharFilter(field_name="country__code", lookup_expr="iexact")
    area = RowIdFilter(method="filter_area")
    tier = django_filters.MultipleChoiceFilter(choices=Tier.choices)
    specialty = django_filters.CharFilter(method="filter_specialty")
    mode = django_filters.ChoiceFilter(choices=ConsultMode.choices, method="filter_mode")
    accepting = StrictBooleanFilter(method="filter_accepting")
    active = StrictBooleanFilter(method="filter_active")
    q = django_filters.CharFilter(method="filter_q", max_length=200)
    remote = StrictBooleanFilter(field_name="is_remote")

    class Meta:
        model = Facility
        fields: list[str] = []

    def filter_area(self, qs: QuerySet[Facility], name: str, value: int) -> QuerySet[Facility]:
        return qs.filter(area_id__in=area_descendant_ids(value))

    def filter_specialty(self, qs: QuerySet[Facility], name: str, value: str) -> QuerySet[Facility]:
        return qs.filter(
            id__in=Department.objects.filter(specialty__code=value).values("facility_id")
        )

    def filter_mode(self, qs: QuerySet[Facility], name: str, value: str) -> QuerySet[Facility]:
        departments = Department.objects.filter(**{MODE_FLAGS[value]: True})
        specialty = self.data.get("specialty")
        if specialty:
            departments = departments.filter(specialty__code=specialty)
        return qs.filter(id__in=departments.values("facility_id"))

    def filter_accepting(
        self, qs: QuerySet[Facility], name: str, value: bool
    ) -> QuerySet[Facility]:
        accepting = Department.objects.filter(accepting=True).values("facility_id")
        return qs.filter(id__in=accepting) if value else qs.exclude(id__in=accepting)

    def filter_active(self, qs: QuerySet[Facility], name: str, value: bool) -> QuerySet[Facility]:
        condition = Q(operational_status=OperationalStatus.ACTIVE)
        return qs.filter(condition) if value else qs.exclude(condition)

    def filter_q(self, qs: QuerySet[Facility], name: str, value: str) -> QuerySet[Facility]:
        return _name_search(qs, "search_name", value)


class DepartmentFilter(django_filters.FilterSet):
    facility = RowIdFilter(field_name="facility_id")
    country = django_filters.CharFilter(field_name="facility__country__code", lookup_expr="iexact")
    tier = django_filters.MultipleChoiceFilter(field_name="facility__tier", choices=Tier.choices)
    specialty = django_filters.CharFilter(field_name="specialty__code")
    mode = django_filters.ChoiceFilter(choices=ConsultMode.choices, method="filter_mode")
    accepting = StrictBooleanFilter(field_name="accepting")
    active = StrictBooleanFilter(method="filter_active")
    q = django_filters.CharFilter(method="filter_q", max_length=200)

    class Meta:
        model = Department
        fields: list[str] = []

    def filter_mode(self, qs: QuerySet[Department], name: str, value: str) -> QuerySet[Department]:
        return qs.filter(**{MODE_FLAGS[value]: True})

    def filter_active(
        self, qs: QuerySet[Department], name: str, value: bool
    ) -> QuerySet[Department]:
        condition = Q(facility__operational_status=OperationalStatus.ACTIVE)
        return qs.filter(condition) if value else qs.exclude(condition)

    def filter_q(self, qs: QuerySet[Department], name: str, value: str) -> QuerySet[Department]:
        return _name_search(qs, "facility__search_name", value)


class SupportLinkFilter(django_filters.FilterSet):
    is_cross_border = StrictBooleanFilter(field_name="is_cross_border")
    active = StrictBooleanFilter(field_name="active")

    class Meta:
        model = SupportLink
        fields = ["hub", "spoke"]  # by id; an unknown one is 400
