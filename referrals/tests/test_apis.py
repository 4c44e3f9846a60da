"""The REST surface: intake, lists, detail with ETag, one URL per action, If-Match."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from accounts.models import User
from referrals.models import Referral, ReferralEvent, ReferralState
from referrals.tests.conftest import World
from referrals.workflow import TRANSITIONS


def client_for(user: User) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def submit_body(world: World, **overrides: Any) -> dict[str, Any]:
    body = {
        "placer_system": "urn:district-his",
        "placer_value": "SR-API-1",
        "specialty": world.paeds.code,
        "priority": "urgent",
        "clinical_question": "Fever for 5 days.",
        "patient": {"ref": "P-77", "sex": "female", "birth_year": 2022},
        "department": world.hub_paeds.pk,
    }
    body.update(overrides)
    return body


def test_submit_201_then_200_for_the_same_placer_id(world: World) -> None:
    client = client_for(world.referrer)
    first = client.post("/api/v1/referrals/", submit_body(world), format="json")
    assert first.status_code == 201, first.json()
    body = first.json()
    assert (body["state"], body["version"], body["priority"]) == ("submitted", 1, "urgent")
    assert body["patient"] == {"ref": "P-77", "sex": "female", "birth_year": 2022}
    assert body["available_actions"] == ["cancel"]
    assert first["ETag"] == '"1"'
    again = client.post("/api/v1/referrals/", submit_body(world), format="json")
    assert again.status_code == 200
    assert again.json()["id"] == body["id"]
    assert again.json()["resubmission_differs"] == []
    assert "resubmission_differs" not in body
    assert Referral.objects.count() == 1


def test_a_resubmission_that_says_otherwise_is_told_what_was_not_applied(world: World) -> None:
    """The same placer identifier with another question and priority answered 200 with
    the first submission and said nothing of the change (FHIR warns)."""
    client = client_for(world.referrer)
    first = client.post("/api/v1/referrals/", submit_body(world), format="json").json()
    changed = submit_body(
        world, clinical_question="Fever for 6 days.", priority="stat", patient={"ref": "P-78"}
    )
    again = client.post("/api/v1/referrals/", changed, format="json")
    assert again.status_code == 200
    assert again.json()["resubmission_differs"] == ["clinical_question", "priority", "patient"]
    stored = Referral.objects.get()
    assert (stored.pk, stored.version) == (first["id"], 1)
    assert (stored.clinical_question, stored.patient_ref) == ("Fever for 5 days.", "P-77")


def test_submit_with_bad_input_is_400(world: World) -> None:
    response = client_for(world.referrer).post(
        "/api/v1/referrals/", submit_body(world, specialty="000", priority="soon"), format="json"
    )
    assert response.status_code == 400
    assert set(response.json()["detail"]) == {"priority"} or "specialty" in str(response.json())
    assert Referral.objects.count() == 0


def test_ministry_cannot_submit(world: World) -> None:
    response = client_for(world.ministry_at_hub).post(
        "/api/v1/referrals/", submit_body(world), format="json"
    )
    assert response.status_code == 403
    assert Referral.objects.count() == 0


def test_detail_has_timeline_actions_and_etag(world: World) -> None:
    referral = world.referral_in(ReferralState.ACCEPTED)
    response = client_for(world.consultant).get(f"/api/v1/referrals/{referral.pk}/")
    assert response.status_code == 200
    body = response.json()
    assert [(e["seq"], e["action"]) for e in body["events"]] == [(1, "submit"), (2, "accept")]
    assert body["available_actions"] == ["forward", "request_info", "schedule", "advise"]
    assert response["ETag"] == '"2"'


@pytest.mark.parametrize("who", ["foreign_referrer", "consultant2", "ministry", "ministry_at_hub"])
def test_outside_scope_is_404_everywhere(world: World, who: str) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    client = client_for(getattr(world, who))
    assert client.get(f"/api/v1/referrals/{referral.pk}/").status_code == 404
    assert client.post(f"/api/v1/referrals/{referral.pk}/accept/").status_code == 404
    assert (
        client.post(f"/api/v1/referrals/{referral.pk}/cancel/", {"reason": "x"}).status_code == 404
    )
    assert Referral.objects.get(pk=referral.pk).version == 1


def test_wrong_side_is_403(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    response = client_for(world.referrer).post(f"/api/v1/referrals/{referral.pk}/accept/")
    assert response.status_code == 403
    assert Referral.objects.get(pk=referral.pk).state == "submitted"


def test_every_non_system_action_has_a_url(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    client = client_for(world.consultant)
    for t in TRANSITIONS:
        response = client.post(f"/api/v1/referrals/{referral.pk}/{t.action}/")
        assert response.status_code != 404 if t.side != "system" else response.status_code == 404


def test_action_and_wrong_state_409(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    client = client_for(world.consultant)
    response = client.post(f"/api/v1/referrals/{referral.pk}/accept/")
    assert response.status_code == 200
    assert response["ETag"] == '"2"'
    again = client.post(f"/api/v1/referrals/{referral.pk}/accept/")
    assert again.status_code == 409
    assert (again.json()["code"], again.json()["state"], again.json()["version"]) == (
        "transition_not_allowed",
        "accepted",
        2,
    )


def test_action_with_inputs(world: World) -> None:
    referral = world.referral_in(ReferralState.ACCEPTED)
    response = client_for(world.consultant).post(
        f"/api/v1/referrals/{referral.pk}/advise/",
        {"disposition": "manage_locally", "text": "Oral antibiotics."},
        format="json",
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["state"] == "advised"
    assert [(n["disposition"], n["text"]) for n in body["consult_notes"]] == [
        ("manage_locally", "Oral antibiotics.")
    ]
    bad = client_for(world.referrer).post(
        f"/api/v1/referrals/{referral.pk}/close_local/", {"outcome": "avoided"}, format="json"
    )
    assert bad.status_code == 400
    assert Referral.objects.get(pk=referral.pk).state == "advised"


def test_if_match(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    client = client_for(world.consultant)
    stale = client.post(f"/api/v1/referrals/{referral.pk}/accept/", HTTP_IF_MATCH='"0"')
    assert stale.status_code == 412
    assert (stale.json()["state"], stale.json()["version"]) == ("submitted", 1)
    assert ReferralEvent.objects.filter(referral=referral).count() == 1
    fresh = client.post(f"/api/v1/referrals/{referral.pk}/accept/", HTTP_IF_MATCH='W/"1"')
    assert fresh.status_code == 200


def test_lists(world: World) -> None:
    world.submit()
    world.submit(actor=world.foreign_referrer, requester_facility=world.foreign_district)
    outgoing = client_for(world.referrer).get("/api/v1/referrals/outgoing/").json()
    assert outgoing["count"] == 1
    worklist = client_for(world.consultant).get(
        f"/api/v1/referrals/worklist/?department={world.hub_paeds.pk}"
    )
    assert worklist.json()["count"] == 2
    foreign = client_for(world.consultant2).get(
        f"/api/v1/referrals/worklist/?department={world.hub_paeds.pk}"
    )
    assert foreign.status_code == 404


def test_worklist_endpoint_query_count_is_constant(world: World) -> None:
    def fresh_client() -> APIClient:
        # a fresh user object, as each real request loads one (no cached roles)
        return client_for(User.objects.get(pk=world.consultant.pk))

    world.submit()
    with CaptureQueriesContext(connection) as few:
        assert fresh_client().get("/api/v1/referrals/worklist/").json()["count"] == 1
    for _ in range(15):
        world.submit()
    with CaptureQueriesContext(connection) as many:
        assert fresh_client().get("/api/v1/referrals/worklist/").json()["count"] == 16
    assert len(few.captured_queries) == len(many.captured_queries)


@pytest.mark.parametrize("path", ["/api/v1/referrals/", "/api/v1/referrals/{pk}/decline/"])
def test_json_nested_deeper_than_python_follows_is_400(world: World, path: str) -> None:
    """Found by tests/test_api_fuzz.py: DRF's JSON parser let RecursionError through."""
    referral = world.submit()
    response = client_for(world.consultant).post(
        path.format(pk=referral.pk),
        "[" * 100_000 + "]" * 100_000,
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response["Content-Type"].startswith("application/problem+json")
    assert "nested too deeply" in response.json()["detail"]
    assert Referral.objects.count() == 1


@pytest.mark.parametrize("number", ["1e400", "-1e400"])
def test_a_json_number_beyond_a_float_is_400(world: World, number: str) -> None:
    """Found by fuzzing a running server: Python reads 1e400 as infinity, and a primary
    key field (the submit's department) turned it into an uncaught OverflowError: a 500."""
    body = json.dumps(submit_body(world, department=world.hub_paeds.pk))
    body = body.replace(f'"department": {world.hub_paeds.pk}', f'"department": {number}')
    assert number in body
    response = client_for(world.referrer).post(
        "/api/v1/referrals/", body, content_type="application/json"
    )
    assert response.status_code == 400, response.content
    assert response["Content-Type"].startswith("application/problem+json")
    assert "out of range" in response.json()["detail"]
    assert not Referral.objects.exists()
    fine = client_for(world.referrer).post(
        "/api/v1/referrals/",
        body.replace(number, f"{world.hub_paeds.pk}.0"),
        content_type="application/json",
    )
    assert fine.status_code == 201, fine.content  # a float that is a number still parses


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/referrals/{pk}/decline/", '{"reason_code": "\\ud800"}'),
        ("/api/v1/referrals/{pk}/decline/", '{"reason_code": "other", "\\udfff": 1}'),
        ("/api/v1/referrals/", '{"placer_system": "s", "placer_value": "v", "mode": "\\ud800"}'),
    ],
)
def test_a_lone_surrogate_in_json_is_400_and_changes_nothing(
    world: World, path: str, body: str
) -> None:
    """Found by fuzzing: a choice whose error repeats a lone surrogate (JSON's "\\ud800"
    escape) could not be encoded as UTF-8, a 500."""
    referral = world.submit()
    response = client_for(world.consultant).post(
        path.format(pk=referral.pk), body, content_type="application/json"
    )
    assert response.status_code == 400
    assert response["Content-Type"].startswith("application/problem+json")
    assert "lone surrogate" in response.json()["detail"]
    referral.refresh_from_db()
    assert (referral.state, referral.version) == (ReferralState.SUBMITTED, 1)
    assert Referral.objects.count() == 1
    assert ReferralEvent.objects.filter(referral=referral).count() == 1
