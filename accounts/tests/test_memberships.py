"""Roles and departments: read once per request (one query for both with a bearer token)."""

from __future__ import annotations

from typing import Any

import pytest

from accounts.models import User
from accounts.roles import Role
from tests.factories import DepartmentFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_load_memberships_equals_the_separate_reads_in_one_query(
    django_assert_num_queries: Any,
) -> None:
    user = UserFactory.create(roles=[Role.CONSULTANT, Role.COORDINATOR])
    first, second = DepartmentFactory.create(), DepartmentFactory.create()
    user.departments.add(first, second)
    separate = User.objects.get(pk=user.pk)
    expected = (separate.role_names(), separate.department_ids())
    assert expected == (
        frozenset({Role.CONSULTANT.value, Role.COORDINATOR.value}),
        frozenset({first.pk, second.pk}),
    )
    fresh = User.objects.get(pk=user.pk)
    with django_assert_num_queries(1):
        fresh.load_memberships()
        assert (fresh.role_names(), fresh.department_ids()) == expected
        assert fresh.has_role(Role.COORDINATOR) and not fresh.has_role(Role.MINISTRY)


def test_load_memberships_of_a_user_with_neither(django_assert_num_queries: Any) -> None:
    user = UserFactory.create()
    with django_assert_num_queries(1):
        user.load_memberships()
        assert (user.role_names(), user.department_ids()) == (frozenset(), frozenset())
