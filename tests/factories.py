"""factory_boy factories shared by every app's tests.

Tests run with --no-migrations, so the data migrations that create the role Groups
(accounts 0003) and the SNOMED specialties (registry 0002) never run: these factories
create the Groups and Specialty rows on demand, get-or-create style.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import factory
from django.contrib.auth.models import Group
from factory.django import DjangoModelFactory

from accounts.models import User
from accounts.roles import Role
from registry.models import (
    AdministrativeArea,
    AreaLevel,
    ChangeRequest,
    Country,
    Department,
    Endpoint,
    Facility,
    FacilityIdentifier,
    Practitioner,
    PractitionerRole,
    Specialty,
    SupportLink,
    Tier,
)
from registry.services import area_province
from registry.specialties import PRACTICE_SETTING_SPECIALTIES

SPECIALTY_DISPLAY: dict[str, str] = dict(PRACTICE_SETTING_SPECIALTIES)
PEDIATRICS = "394537008"
CARDIOLOGY = "394579002"
NEUROLOGY = "394591006"


def role_groups() -> dict[Role, Group]:
    """Every role Group, as migration accounts/0003_roles would have created them."""
    return {role: Group.objects.get_or_create(name=str(role))[0] for role in Role}


def specialties_load() -> list[Specialty]:
    """The whole practice-setting value set, as migration registry/0002 would load it."""
    return [SpecialtyFactory.create(code=code) for code, _ in PRACTICE_SETTING_SPECIALTIES]


def _country_code(n: int) -> str:
    # Assigned ISO 3166-1 codes (the registry refuses any other) of small or uninhabited
    # territories, clear of the countries tests name explicitly (VN, LA, KH, TH, KE...).
    codes = [
        "AQ",
        "BV",
        "HM",
        "GS",
        "TF",
        "UM",
        "IO",
        "CC",
        "CX",
        "NF",
        "PN",
        "TK",
        "NU",
        "WF",
        "YT",
        "BL",
        "MF",
        "PM",
        "SJ",
        "AX",
        "FK",
        "GI",
        "GG",
        "JE",
        "IM",
        "BQ",
        "CW",
        "SX",
        "AI",
        "MS",
        "VG",
        "TC",
        "KY",
        "BM",
        "AW",
        "MO",
        "EH",
        "VA",
        "SM",
        "LI",
    ]
    return codes[n % len(codes)]


class CountryFactory(DjangoModelFactory[Country]):
    class Meta:
        model = Country
        django_get_or_create = ("code",)

    code = factory.Sequence(_country_code)
    name = factory.LazyAttribute(lambda o: f"Country {o.code}")
    name_local = ""


class AreaFactory(DjangoModelFactory[AdministrativeArea]):
    """A province by default; pass ``parent=`` (and a lower ``level``) for districts."""

    class Meta:
        model = AdministrativeArea

    country = factory.Maybe(
        "parent",
        yes_declaration=factory.SelfAttribute("parent.country"),
        no_declaration=factory.SubFactory(CountryFactory, code="VN", name="Viet Nam"),
    )
    parent = None
    level = factory.Maybe(
        "parent",
        yes_declaration=factory.LazyAttribute(lambda o: o.parent.level + 1),
        no_declaration=AreaLevel.PROVINCE,
    )
    code = factory.Sequence(lambda n: f"A{n:04d}")
    name = factory.Sequence(lambda n: f"Area {n}")
    name_local = ""


class FacilityFactory(DjangoModelFactory[Facility]):
    """An active provincial facility in Viet Nam without coordinates, unless told otherwise.

    ``province`` is derived from ``area`` as the services do; ``country`` follows ``area``.
    """

    class Meta:
        model = Facility

    code = factory.Sequence(lambda n: f"FAC-{n:05d}")
    name = factory.Sequence(lambda n: f"Facility {n}")
    name_local = ""
    area = None
    country = factory.Maybe(
        "area",
        yes_declaration=factory.SelfAttribute("area.country"),
        no_declaration=factory.SubFactory(CountryFactory, code="VN", name="Viet Nam"),
    )
    province = factory.LazyAttribute(lambda o: area_province(o.area))
    tier = Tier.PROVINCIAL
    latitude = None
    longitude = None


class FacilityIdentifierFactory(DjangoModelFactory[FacilityIdentifier]):
    class Meta:
        model = FacilityIdentifier

    facility = factory.SubFactory(FacilityFactory)
    system = "https://moh.gov.vn/facility-code"
    value = factory.Sequence(lambda n: f"{n:05d}")


class SpecialtyFactory(DjangoModelFactory[Specialty]):
    """A SNOMED CT practice-setting specialty, get-or-create by (system, code)."""

    class Meta:
        model = Specialty
        django_get_or_create = ("system", "code")

    system = Specialty.SNOMED
    code = factory.Sequence(
        lambda n: PRACTICE_SETTING_SPECIALTIES[n % len(PRACTICE_SETTING_SPECIALTIES)][0]
    )
    display = factory.LazyAttribute(lambda o: SPECIALTY_DISPLAY.get(o.code, f"Specialty {o.code}"))


class DepartmentFactory(DjangoModelFactory[Department]):
    """An accepting department offering asynchronous e-consults."""

    class Meta:
        model = Department

    facility = factory.SubFactory(FacilityFactory)
    specialty = factory.SubFactory(SpecialtyFactory)
    name = factory.LazyAttribute(lambda o: f"{o.specialty.display} department")
    offers_async = True
    offers_live = False
    offers_transfer = False
    accepting = True


class UserFactory(DjangoModelFactory[User]):
    """A user; ``UserFactory.create(roles=[Role.REFERRER])`` puts them in the role Groups."""

    class Meta:
        model = User
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.org")
    password = factory.django.Password("correct horse battery staple")
    facility = None

    @factory.post_generation
    def roles(obj: User, create: bool, extracted: Iterable[Role] | None, **kwargs: Any) -> None:
        if not create or not extracted:
            return
        groups = role_groups()
        obj.groups.add(*(groups[Role(role)] for role in extracted))
        # has_role() caches roles and departments on the instance; forget what it saw.
        obj.forget_memberships()


class PractitionerFactory(DjangoModelFactory[Practitioner]):
    class Meta:
        model = Practitioner

    family_name = factory.Sequence(lambda n: f"Nguyen {n}")
    given_name = "An"


class PractitionerRoleFactory(DjangoModelFactory[PractitionerRole]):
    class Meta:
        model = PractitionerRole

    practitioner = factory.SubFactory(PractitionerFactory)
    department = factory.SubFactory(DepartmentFactory)
    facility = factory.SelfAttribute("department.facility")
    code = PractitionerRole.Code.CONSULTANT


class EndpointFactory(DjangoModelFactory[Endpoint]):
    class Meta:
        model = Endpoint

    facility = factory.SubFactory(FacilityFactory)
    name = factory.LazyAttribute(lambda o: f"{o.facility.name} FHIR")
    base_url = factory.Sequence(lambda n: f"https://fhir{n}.example.org/fhir")
    fhir_version = Endpoint.FhirVersion.R4


class SupportLinkFactory(DjangoModelFactory[SupportLink]):
    """A central hub supporting a district spoke in the same country.

    ``SupportLinkFactory.create(specialties=[...])`` limits the link to those specialties.
    """

    class Meta:
        model = SupportLink
        skip_postgeneration_save = True

    hub = factory.SubFactory(FacilityFactory, tier=Tier.CENTRAL)
    spoke = factory.SubFactory(FacilityFactory, tier=Tier.DISTRICT)
    agreement_reference = ""

    @factory.post_generation
    def specialties(
        obj: SupportLink, create: bool, extracted: Iterable[Specialty] | None, **kwargs: Any
    ) -> None:
        if create and extracted:
            obj.specialties.set(extracted)


class ChangeRequestFactory(DjangoModelFactory[ChangeRequest]):
    """A pending proposal from the facility's own administrator."""

    class Meta:
        model = ChangeRequest

    facility = factory.SubFactory(FacilityFactory)
    payload = factory.LazyFunction(lambda: {"name": "Proposed name"})
    proposed_by = factory.SubFactory(
        UserFactory,
        roles=[Role.FACILITY_ADMIN],
        facility=factory.SelfAttribute("..facility"),
    )
