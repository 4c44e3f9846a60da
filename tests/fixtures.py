"""Fixtures shared by every app's tests (registered in the root conftest.py).

API clients authenticate the way real callers do: with a bearer token issued by
accounts.services.api_token_issue, never force_authenticate.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.contrib.auth.models import Group
from rest_framework.test import APIClient

from accounts.models import User
from accounts.roles import Role
from accounts.services import api_token_issue
from registry.models import Facility, Specialty
from tests.factories import (
    PEDIATRICS,
    FacilityFactory,
    SpecialtyFactory,
    UserFactory,
    role_groups,
    specialties_load,
)

ClientFor = Callable[[User], APIClient]


@pytest.fixture
def all_role_groups(db: None) -> dict[Role, Group]:
    """The role Groups the accounts/0003 data migration creates (it does not run in tests)."""
    return role_groups()


@pytest.fixture
def specialties(db: None) -> list[Specialty]:
    """The practice-setting specialties the registry/0002 data migration loads."""
    return specialties_load()


@pytest.fixture
def pediatrics(db: None) -> Specialty:
    return SpecialtyFactory.create(code=PEDIATRICS)


@pytest.fixture
def api_client_for(db: None) -> ClientFor:
    """``api_client_for(user)``: an APIClient sending a fresh bearer token of that user."""

    def make(user: User) -> APIClient:
        issued = api_token_issue(user=user, name="tests")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
        return client

    return make


@pytest.fixture
def anonymous_client() -> APIClient:
    return APIClient()


@pytest.fixture
def steward(db: None) -> User:
    return UserFactory.create(username="steward", roles=[Role.REGISTRY_STEWARD])


@pytest.fixture
def referrer(db: None) -> User:
    return UserFactory.create(username="referrer", roles=[Role.REFERRER])


@pytest.fixture
def consultant(db: None) -> User:
    return UserFactory.create(username="consultant", roles=[Role.CONSULTANT])


@pytest.fixture
def coordinator(db: None) -> User:
    return UserFactory.create(username="coordinator", roles=[Role.COORDINATOR])


@pytest.fixture
def ministry(db: None) -> User:
    return UserFactory.create(username="ministry", roles=[Role.MINISTRY])


@pytest.fixture
def admin_facility(db: None) -> Facility:
    """The facility ``facility_admin`` administers."""
    return FacilityFactory.create(code="ADMIN-OWN", name="Bệnh viện Đa khoa tỉnh Lào Cai")


@pytest.fixture
def facility_admin(admin_facility: Facility) -> User:
    return UserFactory.create(
        username="facility-admin", roles=[Role.FACILITY_ADMIN], facility=admin_facility
    )


@pytest.fixture
def steward_client(api_client_for: ClientFor, steward: User) -> APIClient:
    return api_client_for(steward)


@pytest.fixture
def referrer_client(api_client_for: ClientFor, referrer: User) -> APIClient:
    return api_client_for(referrer)


@pytest.fixture
def consultant_client(api_client_for: ClientFor, consultant: User) -> APIClient:
    return api_client_for(consultant)


@pytest.fixture
def coordinator_client(api_client_for: ClientFor, coordinator: User) -> APIClient:
    return api_client_for(coordinator)


@pytest.fixture
def ministry_client(api_client_for: ClientFor, ministry: User) -> APIClient:
    return api_client_for(ministry)


@pytest.fixture
def facility_admin_client(api_client_for: ClientFor, facility_admin: User) -> APIClient:
    return api_client_for(facility_admin)
