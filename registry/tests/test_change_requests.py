"""Facility admins propose, registry stewards approve or reject; approval applies the change."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection
from django.forms.models import model_to_dict

from accounts.roles import Role
from core.errors import Conflict
from registry import services
from registry.models import ChangeRequest, Facility, FacilityRevision, Tier
from tests.factories import (
    AreaFactory,
    ChangeRequestFactory,
    CountryFactory,
    FacilityFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

API = "/api/v1/change-requests"


def _state(facility: Facility) -> dict:
    facility.refresh_from_db()
    return model_to_dict(facility)


def _propose(client, facility: Facility | None, payload: dict):
    body = {"facility": facility.pk if facility else None, "payload": payload}
    return client.post(f"{API}/", body, format="json")


@pytest.fixture
def proposal(facility_admin, admin_facility) -> ChangeRequest:
    """A pending update of the admin's own facility."""
    return ChangeRequestFactory.create(
        facility=admin_facility,
        proposed_by=facility_admin,
        payload={"name": "Bệnh viện Sản Nhi Lào Cai", "tier": 1, "beds": 450},
    )


# --- proposing ----------------------------------------------------------------------------


def test_facility_admin_proposes_an_update_to_own_facility(
    facility_admin, admin_facility, facility_admin_client
):
    before = _state(admin_facility)

    response = _propose(facility_admin_client, admin_facility, {"name": "Renamed", "beds": 300})

    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["status"] == "pending"
    assert body["facility"] == admin_facility.pk
    assert body["payload"] == {"name": "Renamed", "beds": 300}
    assert body["proposed_by"] == "facility-admin"
    assert body["reviewed_by"] is None
    assert body["reviewed_at"] is None
    change_request = ChangeRequest.objects.get(pk=body["id"])
    assert change_request.proposed_by == facility_admin
    assert _state(admin_facility) == before
    assert FacilityRevision.objects.count() == 0


def test_proposing_for_another_facility_is_403_and_nothing_is_created(facility_admin_client):
    other = FacilityFactory.create(name="Bệnh viện Bạch Mai")
    before = _state(other)

    response = _propose(facility_admin_client, other, {"name": "Hijacked"})

    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"
    assert ChangeRequest.objects.count() == 0
    assert _state(other) == before


def test_facility_admin_without_a_facility_cannot_propose_updates(api_client_for):
    target = FacilityFactory.create()
    homeless = UserFactory.create(roles=[Role.FACILITY_ADMIN], facility=None)

    response = _propose(api_client_for(homeless), target, {"name": "Hijacked"})

    assert response.status_code == 403
    assert ChangeRequest.objects.count() == 0


@pytest.mark.parametrize("role", ["referrer_client", "consultant_client", "ministry_client"])
def test_other_roles_cannot_propose(request, admin_facility, role):
    client = request.getfixturevalue(role)
    before = _state(admin_facility)

    update = _propose(client, admin_facility, {"name": "Hijacked"})
    new = _propose(client, None, {"code": "VN-NEW", "name": "New", "country": "VN", "tier": 3})

    assert update.status_code == 403
    assert new.status_code == 403
    assert ChangeRequest.objects.count() == 0
    assert _state(admin_facility) == before


@pytest.mark.parametrize("role", ["referrer_client", "facility_admin_client"])
def test_refused_proposer_gets_403_even_with_an_invalid_payload(request, role):
    # Authorization comes first: a caller who may not propose learns nothing about validation.
    client = request.getfixturevalue(role)
    other = FacilityFactory.create()

    response = _propose(client, other, {"tier": 9})

    assert response.status_code == 403
    assert ChangeRequest.objects.count() == 0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"tier": 9}, "tier"),
        ({"latitude": 21.0}, "latitude"),
        ({"country": "XX"}, "country"),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_update_payload_is_400_at_proposal_time(
    admin_facility, facility_admin_client, payload, field
):
    before = _state(admin_facility)

    response = _propose(facility_admin_client, admin_facility, payload)

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_payload"
    assert list(body["errors"]) == [field]
    assert ChangeRequest.objects.count() == 0
    assert _state(admin_facility) == before


def test_invalid_new_facility_payload_names_every_missing_field(facility_admin_client):
    response = _propose(facility_admin_client, None, {"name": "Trạm Y tế xã"})

    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"code", "country", "tier"}
    assert ChangeRequest.objects.count() == 0
    assert Facility.objects.count() == 1  # the admin's own


@pytest.mark.parametrize(
    ("body", "field"),
    [({"facility": 999999, "payload": {}}, "facility"), ({"payload": ["name"]}, "payload")],
)
def test_malformed_proposal_is_400(facility_admin_client, body, field):
    response = facility_admin_client.post(f"{API}/", body, format="json")

    assert response.status_code == 400
    assert list(response.json()["detail"]) == [field]
    assert ChangeRequest.objects.count() == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"beds": 450, "note": "\x00"},
        {"beds": 450, "x\x00": 1},
        {"identifiers": [{"system": "urn:moh", "value": "01-1", "extra": ["\x00"]}]},
    ],
)
def test_a_proposal_holding_nul_where_no_field_reads_it_is_400(
    admin_facility, facility_admin_client, payload
):
    """Found by fuzzing: the payload is stored as proposed (jsonb), also what the facility
    fields do not read, and NUL there failed the INSERT (a 500)."""
    before = _state(admin_facility)

    response = _propose(facility_admin_client, admin_facility, payload)

    assert response.status_code == 400
    assert response.json()["detail"] == {"payload": ["Null characters are not allowed."]}
    assert ChangeRequest.objects.count() == 0
    assert _state(admin_facility) == before


@pytest.mark.parametrize("payload", [{}, {"note": "please"}, {"x": 1, "y": [2]}])
def test_a_proposal_naming_no_facility_field_is_400(admin_facility, facility_admin_client, payload):
    """It was stored (201), and a steward could approve a change that changed nothing."""
    before = _state(admin_facility)

    response = _propose(facility_admin_client, admin_facility, payload)

    assert response.status_code == 400, response.json()
    assert response.json()["code"] == "invalid_payload"
    assert ChangeRequest.objects.count() == 0
    assert _state(admin_facility) == before


# --- approving ----------------------------------------------------------------------------


def test_steward_approval_applies_the_change_and_records_a_revision(
    steward, steward_client, proposal, admin_facility
):
    response = steward_client.post(f"{API}/{proposal.pk}/approve/", {"comment": "Checked"})

    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "approved"
    assert body["reviewed_by"] == "steward"
    assert body["review_comment"] == "Checked"
    proposal.refresh_from_db()
    assert proposal.status == ChangeRequest.Status.APPROVED
    assert proposal.reviewed_by == steward
    assert proposal.reviewed_at is not None
    admin_facility.refresh_from_db()
    assert (admin_facility.name, admin_facility.tier, admin_facility.beds) == (
        "Bệnh viện Sản Nhi Lào Cai",
        Tier.CENTRAL,
        450,
    )
    revision = FacilityRevision.objects.get(facility=admin_facility)
    assert revision.source == "change-request"
    assert revision.change_request == proposal
    assert revision.changed_by == steward
    assert revision.changes == {
        "name": ["Bệnh viện Đa khoa tỉnh Lào Cai", "Bệnh viện Sản Nhi Lào Cai"],
        "tier": [2, 1],
        "beds": [None, 450],
    }
    history = steward_client.get(f"/api/v1/facilities/{admin_facility.pk}/revisions/").json()
    assert [(r["source"], r["change_request"]) for r in history["results"]] == [
        ("change-request", proposal.pk)
    ]


def test_new_facility_proposal_creates_the_facility_on_approval(
    steward, steward_client, facility_admin_client
):
    vietnam = CountryFactory.create(code="VN")
    lao_cai = AreaFactory.create(country=vietnam, code="10", name="Lào Cai")
    proposed = _propose(
        facility_admin_client,
        None,
        {
            "code": "VN-10-SAPA",
            "name": "Trung tâm Y tế thị xã Sa Pa",
            "country": "VN",
            "area": lao_cai.pk,
            "tier": 3,
            "is_remote": True,
        },
    )
    assert proposed.status_code == 201, proposed.json()
    assert proposed.json()["facility"] is None
    assert not Facility.objects.filter(code="VN-10-SAPA").exists()

    approved = steward_client.post(f"{API}/{proposed.json()['id']}/approve/", {})

    assert approved.status_code == 200, approved.json()
    facility = Facility.objects.get(code="VN-10-SAPA")
    assert approved.json()["facility"] == facility.pk
    assert (facility.tier, facility.is_remote, facility.province) == (3, True, lao_cai)
    revision = FacilityRevision.objects.get(facility=facility)
    assert revision.source == "change-request"
    assert revision.change_request_id == proposed.json()["id"]
    assert revision.changed_by == steward
    assert revision.changes["code"] == [None, "VN-10-SAPA"]


def test_approving_twice_is_409_with_the_current_status(steward_client, proposal, admin_facility):
    first = steward_client.post(f"{API}/{proposal.pk}/approve/", {})
    after_first = _state(admin_facility)

    second = steward_client.post(f"{API}/{proposal.pk}/approve/", {})

    assert first.status_code == 200
    assert second.status_code == 409
    assert second.json()["code"] == "conflict"
    assert second.json()["current_status"] == "approved"
    assert FacilityRevision.objects.count() == 1
    assert _state(admin_facility) == after_first


def test_approving_a_rejected_request_is_409_and_applies_nothing(
    steward_client, proposal, admin_facility
):
    before = _state(admin_facility)
    steward_client.post(f"{API}/{proposal.pk}/reject/", {"comment": "Not a maternity hospital"})

    response = steward_client.post(f"{API}/{proposal.pk}/approve/", {})

    assert response.status_code == 409
    assert response.json()["current_status"] == "rejected"
    assert _state(admin_facility) == before
    assert FacilityRevision.objects.count() == 0


def test_approval_that_no_longer_applies_is_409_and_the_request_stays_pending(
    steward_client, facility_admin_client
):
    CountryFactory.create(code="VN")
    proposed = _propose(
        facility_admin_client, None, {"code": "VN-DUP", "name": "New", "country": "VN", "tier": 4}
    )
    FacilityFactory.create(code="VN-DUP")  # someone else took the code meanwhile

    response = steward_client.post(f"{API}/{proposed.json()['id']}/approve/", {})

    assert response.status_code == 409
    change_request = ChangeRequest.objects.get(pk=proposed.json()["id"])
    assert change_request.status == ChangeRequest.Status.PENDING
    assert change_request.facility is None
    assert change_request.reviewed_by is None
    assert Facility.objects.filter(code="VN-DUP").count() == 1
    assert FacilityRevision.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_concurrent_approvals_apply_the_change_once(monkeypatch):
    # Two stewards approve at once; the first holds its transaction open while it applies the
    # change. The row lock makes the second wait, then see "approved" and get a conflict.
    stewards = [UserFactory.create(roles=[Role.REGISTRY_STEWARD]) for _ in range(2)]
    change_request = ChangeRequestFactory.create(payload={"beds": 120})
    slow_update = services.facility_update

    def facility_update_slowly(**kwargs):
        facility = slow_update(**kwargs)
        time.sleep(0.5)
        return facility

    monkeypatch.setattr(services, "facility_update", facility_update_slowly)
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def approve(steward):
        try:
            start.wait()
            services.change_request_approve(
                actor=steward, change_request=change_request, data={"beds": 120}
            )
            outcomes.append("applied")
        except Conflict as conflict:
            outcomes.append(f"conflict: {conflict.extra['current_status']}")
        finally:
            connection.close()

    threads = [threading.Thread(target=approve, args=(s,)) for s in stewards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert sorted(outcomes) == ["applied", "conflict: approved"]
    assert FacilityRevision.objects.filter(change_request=change_request).count() == 1
    change_request.refresh_from_db()
    assert change_request.status == ChangeRequest.Status.APPROVED
    assert change_request.facility is not None
    assert change_request.facility.beds == 120


def test_proposer_cannot_approve_own_request(facility_admin_client, proposal, admin_facility):
    before = _state(admin_facility)

    response = facility_admin_client.post(f"{API}/{proposal.pk}/approve/", {})

    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"
    proposal.refresh_from_db()
    assert proposal.status == ChangeRequest.Status.PENDING
    assert proposal.reviewed_by is None
    assert _state(admin_facility) == before
    assert FacilityRevision.objects.count() == 0


def test_proposer_cannot_reject_own_request(facility_admin_client, proposal):
    response = facility_admin_client.post(f"{API}/{proposal.pk}/reject/", {"comment": "Oops"})

    assert response.status_code == 403
    proposal.refresh_from_db()
    assert proposal.status == ChangeRequest.Status.PENDING
    assert proposal.review_comment == ""


@pytest.mark.parametrize("action", ["approve", "reject"])
def test_other_non_stewards_do_not_even_see_the_request(
    referrer_client, proposal, admin_facility, action
):
    before = _state(admin_facility)

    response = referrer_client.post(f"{API}/{proposal.pk}/{action}/", {"comment": "x"})

    assert response.status_code == 404
    proposal.refresh_from_db()
    assert proposal.status == ChangeRequest.Status.PENDING
    assert _state(admin_facility) == before


# --- rejecting ----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [{}, {"comment": ""}, {"comment": "   "}])
def test_rejection_needs_a_comment(steward_client, proposal, body):
    response = steward_client.post(f"{API}/{proposal.pk}/reject/", body, format="json")

    assert response.status_code == 400
    assert response.json()["code"] == "comment_required"
    proposal.refresh_from_db()
    assert proposal.status == ChangeRequest.Status.PENDING
    assert proposal.reviewed_by is None


def test_rejection_closes_the_request_and_leaves_the_facility_alone(
    steward, steward_client, proposal, admin_facility
):
    before = _state(admin_facility)

    response = steward_client.post(
        f"{API}/{proposal.pk}/reject/", {"comment": "Tier 1 needs a ministry decision"}
    )

    assert response.status_code == 200
    assert response.json()["status"] == "rejected"
    proposal.refresh_from_db()
    assert proposal.status == ChangeRequest.Status.REJECTED
    assert proposal.reviewed_by == steward
    assert proposal.review_comment == "Tier 1 needs a ministry decision"
    assert _state(admin_facility) == before
    assert FacilityRevision.objects.count() == 0


def test_rejecting_an_approved_request_is_409(steward_client, proposal):
    steward_client.post(f"{API}/{proposal.pk}/approve/", {})

    response = steward_client.post(f"{API}/{proposal.pk}/reject/", {"comment": "Changed my mind"})

    assert response.status_code == 409
    assert response.json()["current_status"] == "approved"
    proposal.refresh_from_db()
    assert proposal.status == ChangeRequest.Status.APPROVED
    assert proposal.review_comment == ""


# --- who sees what ------------------------------------------------------------------------


def test_proposer_sees_only_own_requests(facility_admin_client, proposal):
    someone_elses = ChangeRequestFactory.create()  # another facility's admin

    listed = facility_admin_client.get(f"{API}/")
    own = facility_admin_client.get(f"{API}/{proposal.pk}/")
    other = facility_admin_client.get(f"{API}/{someone_elses.pk}/")

    assert [c["id"] for c in listed.json()["results"]] == [proposal.pk]
    assert own.status_code == 200
    assert other.status_code == 404
    assert other.json()["code"] == "not_found"


def test_steward_sees_every_request_and_filters_by_status(steward_client, proposal):
    rejected = ChangeRequestFactory.create(status=ChangeRequest.Status.REJECTED)

    everything = steward_client.get(f"{API}/")
    pending = steward_client.get(f"{API}/?status=pending")
    closed = steward_client.get(f"{API}/?status=rejected")

    assert {c["id"] for c in everything.json()["results"]} == {proposal.pk, rejected.pk}
    assert [c["id"] for c in pending.json()["results"]] == [proposal.pk]
    assert [c["id"] for c in closed.json()["results"]] == [rejected.pk]
