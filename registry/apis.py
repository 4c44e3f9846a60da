"""Thin REST views over the registry: parse, call one service or selector, shape output."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import MultipleObjectsReturned
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.models import User
from core.errors import ApplicationError, Conflict, NotFound
from registry import services
from registry.filters import DepartmentFilter, FacilityFilter, SupportLinkFilter
from registry.models import (
    AdministrativeArea,
    ChangeRequest,
    Country,
    Department,
    Endpoint,
    Facility,
    Practitioner,
    Specialty,
    SupportLink,
)
from registry.permissions import StewardWritesOthersRead, is_steward
from registry.selectors import department_queryset, departments_near, facility_queryset
from registry.serializers import (
    AreaSerializer,
    ChangeRequestInputSerializer,
    ChangeRequestSerializer,
    CountrySerializer,
    DepartmentInputSerializer,
    DepartmentSerializer,
    EndpointSerializer,
    FacilityInputSerializer,
    FacilityRevisionSerializer,
    FacilitySerializer,
    NearbyDepartmentSerializer,
    NearbyQuerySerializer,
    PractitionerSerializer,
    ReviewInputSerializer,
    SpecialtySerializer,
    SupportLinkSerializer,
)

READ_AND_WRITE = ["get", "post", "put", "patch", "head", "options"]


def _user(request: Request) -> User:
    assert isinstance(request.user, User)
    return request.user


class ByCodeMixin:
    """Detail views addressed by a code: a NUL in the path names nothing (PostgreSQL refuses
    it in text: a 500 before); a code two rows share is a 409, not a guess."""

    lookup_field = "code"

    def get_object(self) -> Any:
        code = self.kwargs[self.lookup_field]  # type: ignore[attr-defined]
        if "\x00" in code:
            raise NotFound("Nothing has that code.")
        try:
            return super().get_object()  # type: ignore[misc]
        except MultipleObjectsReturned:
            raise Conflict(f"Several rows have the code {code!r}.") from None


class CountryViewSet(ByCodeMixin, viewsets.ReadOnlyModelViewSet[Country]):
    queryset = Country.objects.all()
    serializer_class = CountrySerializer


class AreaViewSet(viewsets.ReadOnlyModelViewSet[AdministrativeArea]):
    queryset = AdministrativeArea.objects.select_related("country")
    serializer_class = AreaSerializer
    filterset_fields = {"country__code": ["exact"], "level": ["exact"], "parent": ["exact"]}


class SpecialtyViewSet(ByCodeMixin, viewsets.ReadOnlyModelViewSet[Specialty]):
    queryset = Specialty.objects.all()
    serializer_class = SpecialtySerializer


class FacilityViewSet(viewsets.ModelViewSet[Facility]):
    """Facilities. Everyone authenticated reads; registry stewards write (no deletes: close
    a facility by setting its operational status)."""

    permission_classes = [StewardWritesOthersRead]
    serializer_class = FacilitySerializer
    filterset_class = FacilityFilter
    http_method_names = READ_AND_WRITE

    def get_queryset(self) -> QuerySet[Facility]:
        return facility_queryset().order_by("name", "id")

    def _parse(self, request: Request, instance: Facility | None, partial: bool) -> dict[str, Any]:
        parser = FacilityInputSerializer(
            data=request.data, partial=partial, context={"instance": instance}
        )
        parser.is_valid(raise_exception=True)
        return dict(parser.validated_data)

    @extend_schema(request=FacilityInputSerializer, responses={201: FacilitySerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self._parse(request, None, partial=False)
        facility = services.facility_create(actor=_user(request), data=data)
        return Response(
            FacilitySerializer(facility_queryset().get(pk=facility.pk)).data,
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(request=FacilityInputSerializer, responses=FacilitySerializer)
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        instance = self.get_object()
        data = self._parse(request, instance, partial=kwargs.get("partial", False))
        services.facility_update(actor=_user(request), facility=instance, data=data)
        return Response(FacilitySerializer(facility_queryset().get(pk=instance.pk)).data)

    @extend_schema(responses=FacilityRevisionSerializer(many=True))
    @action(detail=True, methods=["get"])
    def revisions(self, request: Request, pk: str | None = None) -> Response:
        facility = self.get_object()
        revisions = facility.revisions.select_related("changed_by")
        page = (
            self.paginator.paginate_queryset(revisions, request, view=self)
            if self.paginator
            else None
        )
        assert page is not None
        return self.get_paginated_response(FacilityRevisionSerializer(page, many=True).data)


class DepartmentViewSet(viewsets.ModelViewSet[Department]):
    permission_classes = [StewardWritesOthersRead]
    serializer_class = DepartmentSerializer
    filterset_class = DepartmentFilter
    http_method_names = READ_AND_WRITE

    def get_queryset(self) -> QuerySet[Department]:
        return department_queryset().order_by("facility__name", "specialty__display", "id")

    @extend_schema(request=DepartmentInputSerializer, responses={201: DepartmentSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        parser = DepartmentInputSerializer(data=request.data)
        parser.is_valid(raise_exception=True)
        department = services.department_save(actor=_user(request), data=parser.validated_data)
        return Response(
            DepartmentSerializer(department_queryset().get(pk=department.pk)).data,
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(request=DepartmentInputSerializer, responses=DepartmentSerializer)
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        instance = self.get_object()
        parser = DepartmentInputSerializer(
            data=request.data, partial=kwargs.get("partial", False), context={"instance": instance}
        )
        parser.is_valid(raise_exception=True)
        services.department_save(
            actor=_user(request), data=parser.validated_data, department=instance
        )
        return Response(DepartmentSerializer(department_queryset().get(pk=instance.pk)).data)

    @extend_schema(
        parameters=[
            OpenApiParameter("specialty", str, description="SNOMED CT specialty code"),
            OpenApiParameter("lat", float),
            OpenApiParameter("lon", float),
            OpenApiParameter("facility", int, description="use this facility's coordinates"),
            OpenApiParameter("radius_km", float),
            OpenApiParameter("mode", str, enum=["async", "live", "transfer"]),
            OpenApiParameter("limit", int),
        ],
        responses=NearbyDepartmentSerializer(many=True),
    )
    @action(detail=False, methods=["get"], filterset_class=None, pagination_class=None)
    def nearby(self, request: Request) -> Response:
        """Accepting departments offering a specialty within radius_km, nearest first."""
        query = NearbyQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        q = query.validated_data
        found = departments_near(
            specialty_code=q["specialty"],
            latitude=q["lat"],
            longitude=q["lon"],
            radius_km=q["radius_km"],
            mode=q.get("mode"),
            exclude_facility_id=q["facility"].pk if q.get("facility") else None,
            limit=q["limit"],
        )
        return Response(NearbyDepartmentSerializer(found, many=True).data)  # type: ignore[arg-type]


class PractitionerViewSet(viewsets.ReadOnlyModelViewSet[Practitioner]):
    queryset = Practitioner.objects.prefetch_related("roles").order_by("family_name", "id")
    serializer_class = PractitionerSerializer


class EndpointViewSet(viewsets.ModelViewSet[Endpoint]):
    permission_classes = [StewardWritesOthersRead]
    queryset = Endpoint.objects.order_by("id")
    serializer_class = EndpointSerializer
    filterset_fields = ["facility", "fhir_version", "status"]
    http_method_names = READ_AND_WRITE

    def perform_create(self, serializer: Any) -> None:
        serializer.instance = services.endpoint_save(
            actor=_user(self.request), data=serializer.validated_data
        )

    def perform_update(self, serializer: Any) -> None:
        serializer.instance = services.endpoint_save(
            actor=_user(self.request), data=serializer.validated_data, endpoint=serializer.instance
        )


class SupportLinkViewSet(viewsets.ModelViewSet[SupportLink]):
    permission_classes = [StewardWritesOthersRead]
    queryset = SupportLink.objects.prefetch_related("specialties").order_by("id")
    serializer_class = SupportLinkSerializer
    filterset_class = SupportLinkFilter
    http_method_names = READ_AND_WRITE

    def _save(self, serializer: Any, link: SupportLink | None) -> None:
        data = dict(serializer.validated_data)
        specialties = data.pop("specialties", None)
        serializer.instance = services.support_link_save(
            actor=_user(self.request), data=data, specialties=specialties, link=link
        )

    def perform_create(self, serializer: Any) -> None:
        self._save(serializer, None)

    def perform_update(self, serializer: Any) -> None:
        self._save(serializer, serializer.instance)


def change_request_get_for_user(user: User, pk: Any) -> ChangeRequest:
    """The only way views load a change request: stewards see all, proposers their own."""
    queryset = ChangeRequest.objects.select_related("facility", "proposed_by", "reviewed_by")
    if not is_steward(user):
        queryset = queryset.filter(proposed_by=user)
    try:
        return queryset.get(pk=int(pk))
    except (ValueError, TypeError, ChangeRequest.DoesNotExist) as exc:
        raise NotFound("No such change request.") from exc


class ChangeRequestViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    viewsets.GenericViewSet[ChangeRequest],
):
    """Facility admins propose facility additions/updates; registry stewards approve or
    reject them. Approval applies the payload and records a revision."""

    permission_classes = [IsAuthenticated]
    serializer_class = ChangeRequestSerializer
    filterset_fields = ["status", "facility"]

    queryset = ChangeRequest.objects.none()  # for the schema; real rows come from get_queryset

    def get_queryset(self) -> QuerySet[ChangeRequest]:
        if getattr(self, "swagger_fake_view", False):
            return ChangeRequest.objects.none()
        user = _user(self.request)
        queryset = ChangeRequest.objects.select_related("proposed_by", "reviewed_by").order_by(
            "-proposed_at", "-id"
        )
        return queryset if is_steward(user) else queryset.filter(proposed_by=user)

    def get_object(self) -> ChangeRequest:
        return change_request_get_for_user(_user(self.request), self.kwargs["pk"])

    def _parse_payload(self, change_request_facility: Facility | None, payload: Any) -> Any:
        parser = FacilityInputSerializer(
            data=payload,
            partial=change_request_facility is not None,
            context={"instance": change_request_facility},
        )
        if not parser.is_valid():
            raise ApplicationError(
                "The proposed facility data is invalid.",
                code="invalid_payload",
                extra={"errors": parser.errors},
            )
        return parser.validated_data

    @extend_schema(request=ChangeRequestInputSerializer, responses={201: ChangeRequestSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        parser = ChangeRequestInputSerializer(data=request.data)
        parser.is_valid(raise_exception=True)
        facility = parser.validated_data.get("facility")
        services.change_request_check_may_propose(actor=_user(request), facility=facility)
        # Validate now so a steward never approves something that cannot be applied, or
        # that applies nothing (only keys no facility field reads, or none).
        if not self._parse_payload(facility, parser.validated_data["payload"]):
            raise ApplicationError(
                "The proposal changes nothing: name at least one facility field.",
                code="invalid_payload",
                extra={"errors": {"payload": ["No facility field."]}},
            )
        change_request = services.change_request_propose(
            actor=_user(request), facility=facility, payload=parser.validated_data["payload"]
        )
        return Response(
            ChangeRequestSerializer(change_request).data, status=status.HTTP_201_CREATED
        )

    @extend_schema(request=ReviewInputSerializer, responses=ChangeRequestSerializer)
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str | None = None) -> Response:
        change_request = self.get_object()
        review = ReviewInputSerializer(data=request.data)
        review.is_valid(raise_exception=True)
        if not is_steward(_user(request)):
            raise services.PermissionDenied("Only registry stewards may approve changes.")
        data = self._parse_payload(change_request.facility, change_request.payload)
        approved = services.change_request_approve(
            actor=_user(request),
            change_request=change_request,
            data=data,
            comment=review.validated_data["comment"],
        )
        return Response(ChangeRequestSerializer(approved).data)

    @extend_schema(request=ReviewInputSerializer, responses=ChangeRequestSerializer)
    @action(detail=True, methods=["post"])
    def reject(self, request: Request, pk: str | None = None) -> Response:
        change_request = self.get_object()
        review = ReviewInputSerializer(data=request.data)
        review.is_valid(raise_exception=True)
        rejected = services.change_request_reject(
            actor=_user(request),
            change_request=change_request,
            comment=review.validated_data["comment"],
        )
        return Response(ChangeRequestSerializer(rejected).data)
