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


def test_bearer_authentication_reads_the_memberships_in_its_own_statement(
    django_assert_num_queries: Any,
) -> None:
    from django.db import connection

    from accounts.authentication import user_for_bearer
    from accounts.services import api_token_issue

    user = UserFactory.create(roles=[Role.CONSULTANT, Role.MEMBER_SYSTEM])
    first, second = DepartmentFactory.create(), DepartmentFactory.create()
    user.departments.add(first, second)
    lonely = UserFactory.create()
    for who, roles, departments in (
        (user, {Role.CONSULTANT.value, Role.MEMBER_SYSTEM.value}, {first.pk, second.pk}),
        (lonely, set(), set()),
    ):
        raw = api_token_issue(user=who, name="t").raw
        user_for_bearer(raw)  # stamps last use: later calls are one statement
        postgres = connection.vendor == "postgresql"
        # PostgreSQL: one server-side prepared statement, which bypasses Django's cursor
        # (and its query log): the memberships come with the user, no query is logged.
        with django_assert_num_queries(0 if postgres else 2):
            found, _token = user_for_bearer(raw)
            assert (found.role_names(), found.department_ids()) == (roles, departments)
        stored = type(found).objects.get(pk=who.pk)
        assert [getattr(found, f.attname) for f in stored._meta.concrete_fields] == [
            getattr(stored, f.attname) for f in stored._meta.concrete_fields
        ]
        assert found._state.adding is False and found._state.db == "default"
        # The same as the separate read.
        found.forget_memberships()
        assert (found.role_names(), found.department_ids()) == (roles, departments)
