"""core.rows: the hand-written reads and inserts of the write path load and store what the
ORM would."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import models

from core.rows import fetch_models, insert_rows
from fhir_gateway.models import FeedEvent
from registry.models import Department, Endpoint, Specialty
from tests.factories import DepartmentFactory, EndpointFactory

pytestmark = pytest.mark.django_db


def _fields(instance: models.Model) -> dict[str, Any]:
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


def test_fetch_models_loads_every_field_as_the_orm_does() -> None:
    department = DepartmentFactory.create(languages=["vi", "en"])
    EndpointFactory.create(facility=department.facility)
    EndpointFactory.create(facility=department.facility, status=Endpoint.Status.SUSPENDED)
    for model, where, params, orm in (
        (Department, "id = %s", [department.pk], Department.objects.filter(pk=department.pk)),
        (
            Specialty,
            "code IN (%s) ORDER BY id",
            [department.specialty.code],
            Specialty.objects.filter(code__in=[department.specialty.code]).order_by("pk"),
        ),
        (
            Endpoint,
            "facility_id IN (%s) AND status = %s ORDER BY id",
            [department.facility_id, "active"],
            Endpoint.objects.filter(facility=department.facility, status="active").order_by("pk"),
        ),
    ):
        found = fetch_models(model, where, params)
        expected = list(orm)
        assert [_fields(f) for f in found] == [_fields(e) for e in expected], model
        assert found and all(not f._state.adding for f in found)
    assert fetch_models(Department, "id = %s", [department.pk])[0].languages == ["vi", "en"]


def test_insert_rows_stores_what_bulk_create_would_and_answers_ids_in_order() -> None:
    rows = [
        {"facility_id": 7, "resource_type": "Task", "logical_id": f"t{n}", "version_id": 1}
        for n in range(5)
    ]
    ids = insert_rows(FeedEvent, rows, returning_ids=True)

    stored = list(FeedEvent.objects.filter(pk__in=ids).order_by("pk"))
    assert [e.pk for e in stored] == ids
    assert [e.logical_id for e in stored] == [f"t{n}" for n in range(5)]  # row order
    assert all(e.number is None and e.referral_id is None for e in stored)  # defaults
    assert all(e.occurred_at is not None for e in stored)  # a callable default, per row
    assert insert_rows(FeedEvent, []) == []
