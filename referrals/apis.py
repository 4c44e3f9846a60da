"""Thin REST views over referrals: parse, call one service or selector, shape output.

One URL per action, generated from ``workflow.TRANSITIONS``; the action names in a
referral's ``available_actions`` are the last segment of those URLs."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import User
from core.errors import ApplicationError, Conflict, NotFound
from core.pagination import Pagination
from core.rows import QueryRows, SqlRows
from referrals import routing, selectors, services
from referrals.audit import audit_record
from referrals.models import AuditAction, Referral, ReferralState
from referrals.serializers import (
    ReferralDetailSerializer,
    ReferralListSerializer,
    ReferralResubmissionSerializer,
    ReferralSubmitSerializer,
    SuggestionSerializer,
    action_input_serializer,
    referral_list_data,
)
from referrals.workflow import TRANSITIONS, Transition


def _user(request: Request) -> User:
    assert isinstance(request.user, User)
    return request.user


def _etag(referral: Referral) -> str:
    return f'"{referral.version}"'


def _if_match(request: Request) -> int | None:
    """The version in If-Match, None when absent or ``*``; unparsable never matches."""
    header = request.headers.get("If-Match")
    if header is None or header.strip() == "*":
        return None
    value = header.strip().removeprefix("W/").strip('"')
    try:
        return int(value)
    except ValueError:
        return -1


def _detail_response(
    user: User,
    referral_id: int,
    status_code: int = 200,
    resubmission_differs: list[str] | None = None,
) -> Response:
    referral = selectors.referral_get_for_user(user, referral_id)
    context: dict[str, Any] = {
        "available_actions": services.referral_available_actions(user, referral)
    }
    serializer: type[ReferralDetailSerializer] = ReferralDetailSerializer
    if resubmission_differs is not None:
        context["resubmission_differs"] = resubmission_differs
        serializer = ReferralResubmissionSerializer
    response = Response(serializer(referral, context=context).data, status=status_code)
    response["ETag"] = _etag(referral)
    return response


PROBLEM = OpenApiResponse(description="JSON problem (RFC 9457)")
IF_MATCH = OpenApiParameter(
    "If-Match",
    str,
    OpenApiParameter.HEADER,
    description='the ETag (version) you last saw, e.g. "3"; 412 when it changed',
)


class ReferralSubmitApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="referrals_create",
        request=ReferralSubmitSerializer,
        responses={
            201: ReferralDetailSerializer,
            200: OpenApiResponse(
                ReferralResubmissionSerializer,
                description="idempotent resubmission: the referral the placer identifier "
                "names, as it is, and what this submission said otherwise (not applied)",
            ),
            400: PROBLEM,
            403: PROBLEM,
            409: PROBLEM,
        },
    )
    def post(self, request: Request) -> Response:
        parser = ReferralSubmitSerializer(data=request.data)
        parser.is_valid(raise_exception=True)
        data = dict(parser.validated_data)
        patient = data.pop("patient", None) or {}
        user = _user(request)
        if user.facility is None:
            raise ApplicationError("Only facility staff submit referrals.", status_code=403)
        referral, created = services.referral_submit(
            actor=user,
            requester_facility=user.facility,
            patient_ref=patient.get("ref", ""),
            patient_sex=patient.get("sex", "unknown"),
            patient_birth_year=patient.get("birth_year"),
            **data,
        )
        audit_record(request, AuditAction.CREATE if created else AuditAction.READ, [referral.pk])
        if created:
            return _detail_response(user, referral.pk, status.HTTP_201_CREATED)
        # Idempotent intake answers the first submission; a retry that says otherwise
        # learns that none of it was applied (as FHIR's warning issue says).
        differs = selectors.referral_resubmission_differences(
            referral,
            clinical_question=data["clinical_question"],
            priority=data["priority"],
            mode=data["mode"],
            specialty_id=data["specialty"].pk,
            patient_ref=patient.get("ref", ""),
        )
        return _detail_response(user, referral.pk, status.HTTP_200_OK, differs)


class _ListApi(APIView):
    permission_classes = [IsAuthenticated]

    def _page(self, request: Request, rows: QueryRows | SqlRows) -> Response:
        paginator = Pagination()
        data = referral_list_data(paginator.paginate_rows(rows, request, view=self))
        audit_record(request, AuditAction.READ, [r["id"] for r in data])  # one INSERT per page
        return paginator.get_paginated_response(data)


class StateQuerySerializer(serializers.Serializer[Any]):
    state = serializers.ChoiceField(choices=ReferralState.choices, required=False)


class WorklistQuerySerializer(StateQuerySerializer):
    department = serializers.IntegerField(required=False)


class ReferralOutgoingApi(_ListApi):
    @extend_schema(
        operation_id="referrals_outgoing",
        parameters=[StateQuerySerializer],
        responses=ReferralListSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        query = StateQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return self._page(
            request,
            selectors.referral_outgoing_rows(
                _user(request), state=query.validated_data.get("state")
            ),
        )


class ReferralWorklistApi(_ListApi):
    @extend_schema(
        operation_id="referrals_worklist",
        parameters=[WorklistQuerySerializer],
        responses={200: ReferralListSerializer(many=True), 404: PROBLEM},
        description="Open referrals of your department(s): stat > asap > urgent > routine, "
        "then deadline.",
    )
    def get(self, request: Request) -> Response:
        query = WorklistQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        state = query.validated_data.get("state")
        return self._page(
            request,
            selectors.referral_worklist_rows(
                _user(request),
                query.validated_data.get("department"),
                states=(state,) if state else None,
            ),
        )


class ReferralDetailApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="referrals_retrieve",
        responses={200: ReferralDetailSerializer, 404: PROBLEM},
    )
    def get(self, request: Request, pk: int) -> Response:
        response = _detail_response(_user(request), pk)
        audit_record(request, AuditAction.READ, [pk])
        return response


class ReferralActionApi(APIView):
    """Base of the per-action views generated below."""

    permission_classes = [IsAuthenticated]
    transition: Transition
    input_serializer: type[serializers.Serializer[Any]] | None = None

    def run(self, request: Request, pk: int) -> Response:
        inputs: dict[str, Any] = {}
        if self.input_serializer is not None:
            parser = self.input_serializer(data=request.data)
            parser.is_valid(raise_exception=True)
            inputs = dict(parser.validated_data)
        user = _user(request)
        try:
            referral = services.referral_transition(
                actor=user,
                referral_id=pk,
                action=self.transition.action,
                expected_version=_if_match(request),
                **inputs,
            )
        except Conflict as exc:
            if exc.code == "version_mismatch":
                raise ApplicationError(
                    exc.message, code="precondition_failed", status_code=412, extra=exc.extra
                ) from exc
            raise
        audit_record(request, AuditAction.TRANSITION, [pk], detail=self.transition.action)
        try:
            return _detail_response(user, pk)
        except NotFound:
            # The action took the case out of the caller's scope (forward to another
            # department): confirm it without showing the referral any more.
            body = {"id": referral.pk, "state": referral.state, "version": referral.version}
            return Response(body, headers={"ETag": _etag(referral)})


def _action_view(transition: Transition) -> type[ReferralActionApi]:
    input_serializer = action_input_serializer(transition)

    class View(ReferralActionApi):
        @extend_schema(
            operation_id=f"referrals_{transition.action}",
            summary=f"{transition.action}: {', '.join(sorted(transition.sources))} → "
            f"{transition.target or '(unchanged)'}",
            description=transition.description,
            request=input_serializer,
            parameters=[IF_MATCH],
            responses={
                200: ReferralDetailSerializer,
                400: PROBLEM,
                403: PROBLEM,
                404: PROBLEM,
                409: OpenApiResponse(description="not allowed from the current state"),
                412: OpenApiResponse(description="If-Match does not match the version"),
            },
            tags=["referral actions"],
        )
        def post(self, request: Request, pk: int) -> Response:
            return self.run(request, pk)

    View.transition = transition
    View.input_serializer = input_serializer
    View.__name__ = View.__qualname__ = (
        "".join(p.title() for p in transition.action.split("_")) + "ReferralApi"
    )
    return View


# System actions (expire) have no URL: only the deadline job takes them.
ACTION_VIEWS: dict[str, type[ReferralActionApi]] = {
    t.action: _action_view(t) for t in TRANSITIONS if t.side != "system"
}


class ReferralSuggestionsApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="referrals_suggestions",
        responses={200: SuggestionSerializer(many=True), 404: PROBLEM},
        description="Routing candidates for this referral, best first, with reasons and "
        "score (departments already tried are left out).",
    )
    def get(self, request: Request, pk: int) -> Response:
        referral = selectors.referral_get_for_user(_user(request), pk)
        suggestions = routing.suggest_departments(referral)
        return Response(SuggestionSerializer(suggestions, many=True).data)
