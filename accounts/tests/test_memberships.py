"""Roles and departments: read together, once per user object, by the first call needing
either (one query for both)."""

from __future__ import annotations

from typing import Any

import pytest

from accounts.models import User
from accounts.roles import Role
from tests.factories import DepartmentFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_roles_and_departments_are_read_together_in_one_query(
    django_assert_num_queries: Any,
) -> None:
    user = UserFactory.create(roles=[Role.CONSULTANT, Role.COORDINATOR])
    first, second = DepartmentFactory.create(), DepartmentFactory.create()
    user.departments.add(first, second)
    fresh = User.objects.get(pk=user.pk)
    with django_assert_num_queries(1):
        assert fresh.role_names() == {Role.CONSULTANT.value, Role.COORDINATOR.value}
        assert fresh.department_ids() == {first.pk, second.pk}
        assert fresh.has_role(Role.COORDINATOR) and not fresh.has_role(Role.MINISTRY)
    other = User.objects.get(pk=user.pk)
    with django_assert_num_queries(1):  # departments first: the same single read
        assert other.department_ids() == {first.pk, second.pk}
        assert other.role_names() == {Role.CONSULTANT.value, Role.COORDINATOR.value}


def test_a_user_with_neither_and_forgetting_re_reads(django_assert_num_queries: Any) -> None:
    user = UserFactory.create()
    with django_assert_num_queries(1):
        assert (user.role_names(), user.department_ids()) == (frozenset(), frozenset())
    department = DepartmentFactory.create()
    user.departments.add(department)
    assert user.department_ids() == frozenset()  # cached for this object (the request)
    user.forget_memberships()
    with django_assert_num_queries(1):
        assert user.department_ids() == {department.pk}
