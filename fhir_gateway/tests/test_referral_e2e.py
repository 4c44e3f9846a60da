"""End to end with a real FHIR client library (fhirpy) against the running server:
an R4 district hospital system submits, an R5 consultant system answers."""

from __future__ import annotations

from typing import Any

import pytest
from fhirpy import SyncFHIRClient

from accounts.services import api_token_issue
from fhir_gateway import referral_mapping as m
from fhir_gateway.models import OutboxMessage
from fhir_gateway.tests.conftest import FHIR_R5
from fhir_gateway.tests.referral_world import World, transaction
from referrals.models import Referral, ReferralState


def _client(live_server: Any, user: Any, **headers: str) -> SyncFHIRClient:
    token = api_token_issue(user=user, name="e2e").raw
    return SyncFHIRClient(
        f"{live_server.url}/fhir", authorization=f"Bearer {token}", extra_headers=headers or None
    )


@pytest.mark.django_db(transaction=True)
def test_full_lifecycle_r4_submitter_r5_consultant(live_server: Any, world: World) -> None:
    submitter = _client(live_server, world.submitter)
    r5 = {"Accept": FHIR_R5, "Content-Type": FHIR_R5}
    consultant = _client(live_server, world.consultant, **r5)

    # R4 submitter: one transaction Bundle (Patient + ServiceRequest + Task).
    answer = submitter.execute("", method="post", data=transaction(world, "E2E-1"))
    assert answer["type"] == "transaction-response"
    task_id = answer["entry"][2]["resource"]["id"]
    owner = f"HealthcareService/{world.network.pediatrics.pk}"
    assert answer["entry"][2]["resource"]["owner"]["reference"] == owner

    # R5 consultant: its worklist, with the orders included.
    found = consultant.resources("Task").search(owner=owner, status="requested").fetch_raw()
    assert [e["resource"]["id"] for e in found["entry"]] == [task_id]
    tasks = consultant.resources("Task").search(owner=owner).include("Task", "focus").fetch_raw()
    assert {e["resource"]["resourceType"] for e in tasks["entry"]} == {"Task", "ServiceRequest"}

    # Accept (If-Match on the version it read).
    task = consultant.reference("Task", task_id).to_resource()
    assert "requestedPerformer" in task  # the R5 rendering
    accepting = _client(live_server, world.consultant, **r5, **{"If-Match": 'W/"1"'})
    task["status"] = "accepted"
    accepted = accepting.resource("Task", **task.serialize())
    accepted.save()
    assert accepted["status"] == "accepted"

    # A Communication (R5 has no contentString: a text attachment).
    question = consultant.resource(
        "Communication",
        status="completed",
        partOf=[{"reference": f"Task/{task_id}"}],
        payload=[{"contentCodeableConcept": {"text": "Any echocardiogram?"}}],
    )
    question.save()
    assert Referral.objects.get().state == ReferralState.INFO_REQUESTED
    reply = submitter.resource(
        "Communication",
        status="completed",
        partOf=[{"reference": f"Task/{task_id}"}],
        inResponseTo=[{"reference": f"Communication/{question.id}"}],
        payload=[{"contentString": "Normal echo yesterday."}],
    )
    reply.save()

    # The consult note.
    note = consultant.resource(
        "DocumentReference",
        status="current",
        extension=[{"url": m.DISPOSITION_EXTENSION, "valueCode": "manage_locally"}],
        type={"coding": [{"system": "http://loinc.org", "code": "11488-4"}]},
        basedOn=[{"reference": f"ServiceRequest/{task_id}"}],
        content=[{"attachment": {"contentType": "text/plain", "data": "SVZJRyArIGFzcGlyaW4="}}],
    )
    note.save()

    # The R4 submitter reads the updated Task.
    seen = submitter.reference("Task", task_id).to_resource()
    assert seen["status"] == "in-progress"
    assert seen["businessStatus"]["coding"][0]["code"] == "advised"
    assert seen["output"][0]["valueReference"]["reference"] == f"DocumentReference/{note.id}"
    assert "performerType" in seen  # the R4 rendering
    referral = Referral.objects.get()
    assert referral.state == ReferralState.ADVISED
    assert referral.consult_notes.get().text == "IVIG + aspirin"

    # Both members were sent every change, each in its own version.
    sent = OutboxMessage.objects.filter(aggregate_key=f"referral:{referral.pk}")
    by_endpoint = {
        endpoint.fhir_version: [
            (x.resource_type, x.version_id) for x in sent.filter(endpoint=endpoint).order_by("seq")
        ]
        for endpoint in (world.spoke_endpoint, world.hub_endpoint)
    }
    assert set(by_endpoint) == {"4.0", "5.0"}
    assert by_endpoint["4.0"] == by_endpoint["5.0"]
    assert [v for t, v in by_endpoint["4.0"] if t == "Task"] == [1, 2, 3, 4, 5]
    assert ("DocumentReference", 1) in by_endpoint["5.0"]
    assert sum(1 for t, _v in by_endpoint["5.0"] if t == "Communication") == 2
