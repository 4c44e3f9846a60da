"""A Task update sent again after its answer was lost (the member's network dropped the
response): the same body, the same If-Match, the same account. It was answered as a new
change from the state the first had made (409/422), or as stale (412), although it had
been applied; now it gets the answer the first had and changes nothing."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from accounts.roles import Role
from fhir_gateway.models import AppliedUpdate, FhirResource, OutboxMessage
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient
from fhir_gateway.tests.referral_world import (
    World,
    member_client,
    read_task,
    submit,
    task_of,
)
from referrals.models import AuditEntry, Referral, ReferralEvent, ReferralState
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def _snapshot(task_id: str) -> tuple[Any, ...]:
    referral = Referral.objects.get(filler_id=task_id)
    return (
        referral.state,
        referral.version,
        ReferralEvent.objects.filter(referral=referral).count(),
        FhirResource.objects.count(),
        OutboxMessage.objects.count(),
        AppliedUpdate.objects.count(),
    )


def _put(client: FhirClient, task: dict[str, Any], if_match: str, version: str = FHIR_R5) -> Any:
    return client.put(
        f"/fhir/Task/{task['id']}",
        task,
        content_type=version,
        Accept=version,
        **{"If-Match": if_match},
    )


def _accept(world: World, version: str = FHIR_R5) -> tuple[str, dict[str, Any], str]:
    """A submitted referral, and the consultant system's accept of it (not yet sent)."""
    task_id = str(task_of(submit(world))["id"])
    read = read_task(world.r5, task_id, version)
    accept = copy.deepcopy(read)
    accept["status"] = "accepted"
    return task_id, accept, f'W/"{read["meta"]["versionId"]}"'


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_an_accept_sent_again_gets_the_first_answer_and_changes_nothing(
    world: World, version: str
) -> None:
    task_id, accept, read_version = _accept(world, version)
    first = _put(world.r5, accept, read_version, version)
    assert first.status_code == 200, first.content
    made = first.json()["meta"]["versionId"]
    assert Referral.objects.get(filler_id=task_id).state == ReferralState.ACCEPTED
    after_first = _snapshot(task_id)

    for if_match in (read_version, "*"):  # the same request, and a client that sends "*"
        AuditEntry.objects.all().delete()
        again = _put(world.r5, accept, if_match, version)

        assert again.status_code == 200, again.content
        assert again.json() == first.json()
        assert (again["ETag"], again["Location"]) == (first["ETag"], first["Location"])
        assert _snapshot(task_id) == after_first
        # Recorded as what it was: the Task read back, nothing updated.
        assert list(AuditEntry.objects.values_list("action", flat=True)) == ["read"]
    assert made == str(Referral.objects.get(filler_id=task_id).version)


def test_only_the_same_body_from_the_same_account_is_a_retry(world: World) -> None:
    task_id, accept, read_version = _accept(world)
    assert _put(world.r5, accept, read_version).status_code == 200
    before = _snapshot(task_id)

    other_words = copy.deepcopy(accept)
    other_words["note"] = [{"text": "Accepted, bring the X-rays."}]
    stale = _put(world.r5, other_words, read_version)
    colleague = UserFactory.create(facility=world.network.hub, roles=[Role.MEMBER_SYSTEM])
    colleague.departments.add(world.network.pediatrics)
    by_colleague = _put(member_client(colleague), accept, read_version)
    in_r4 = _put(world.r5, read_task(world.r5, task_id, FHIR_R4) | {"status": "accepted"},
                 read_version, FHIR_R4)  # fmt: skip

    assert stale.status_code == 412, stale.content
    assert by_colleague.status_code == 412, by_colleague.content
    assert in_r4.status_code == 412, in_r4.content
    assert _snapshot(task_id) == before


def test_after_a_later_change_the_retry_still_gets_its_own_answer(world: World) -> None:
    """The If-Match names the version the retry was made from: it is answered with the
    version it made, not applied to the newer one. With If-Match: * there is no version
    to go by: once another change came after it, it is taken as a change from the current
    state, as any other (here 409: the case is no longer open to an accept)."""
    task_id, accept, read_version = _accept(world)
    first = _put(world.r5, accept, read_version)
    assert first.status_code == 200, first.content
    cancel = read_task(world.r4, task_id, FHIR_R4)
    cancel["status"] = "cancelled"
    cancel["statusReason"] = {"text": "The patient went to another hospital."}
    cancelled = _put(world.r4, cancel, f'W/"{cancel["meta"]["versionId"]}"', FHIR_R4)
    assert cancelled.status_code == 200, cancelled.content
    before = _snapshot(task_id)

    again = _put(world.r5, accept, read_version)
    star = _put(world.r5, accept, "*")

    assert again.status_code == 200, again.content
    assert again.json() == first.json()
    assert star.status_code in (409, 422), star.content
    assert _snapshot(task_id) == before
    assert Referral.objects.get(filler_id=task_id).state == ReferralState.CANCELLED


def test_a_refused_update_is_not_a_retry_of_anything(world: World) -> None:
    """Only an update that was applied is recorded: sending a refused one again is
    refused again (a forward without a reason, an accept sent by the requester)."""
    task_id, accept, read_version = _accept(world)
    forward = copy.deepcopy(accept)
    forward["status"] = "requested"
    forward["owner"] = {"reference": f"HealthcareService/{world.network.cardiology.pk}"}
    before = _snapshot(task_id)

    answers = [
        (_put(world.r5, forward, read_version).status_code,
         _put(world.r4, accept, read_version).status_code)
        for _ in range(2)
    ]  # fmt: skip

    assert answers == [(422, 403), (422, 403)]
    assert _snapshot(task_id) == before


def test_each_applied_update_is_recorded_once_with_its_versions(world: World) -> None:
    task_id, accept, read_version = _accept(world)
    assert _put(world.r5, accept, read_version).status_code == 200
    cancel = read_task(world.r4, task_id, FHIR_R4)
    cancel["status"] = "cancelled"
    cancel["statusReason"] = {"text": "Seen elsewhere."}
    cancel_version = f'W/"{cancel["meta"]["versionId"]}"'
    assert _put(world.r4, cancel, cancel_version, FHIR_R4).status_code == 200
    assert _put(world.r4, cancel, cancel_version, FHIR_R4).status_code == 200  # a retry

    rows = list(
        AppliedUpdate.objects.order_by("base_version").values_list(
            "resource_type", "logical_id", "base_version", "result_version", "user"
        )
    )
    version = Referral.objects.get(filler_id=task_id).version
    assert rows == [
        ("Task", task_id, version - 2, version - 1, world.consultant.pk),
        ("Task", task_id, version - 1, version, world.submitter.pk),
    ]


JSON_PATCH = "application/json-patch+json"


def _patch(client: FhirClient, task_id: str, patch: Any, if_match: str | None) -> Any:
    headers = {"If-Match": if_match} if if_match else {}
    return client.patch(
        f"/fhir/Task/{task_id}", patch, content_type=JSON_PATCH, Accept=FHIR_R5, **headers
    )


def test_a_patch_sent_again_with_its_if_match_gets_the_first_answer(world: World) -> None:
    """The patch is applied to the version its If-Match names, and the update knows that
    result: the first answer again, nothing changed. A patch the account did not send to
    that version (another one, or only tests) is stale, 412, as before."""
    task_id, _accept_body, read_version = _accept(world)
    accept = [{"op": "replace", "path": "/status", "value": "accepted"}]
    first = _patch(world.r5, task_id, accept, read_version)
    assert first.status_code == 200, first.content
    before = _snapshot(task_id)

    AuditEntry.objects.all().delete()
    again = _patch(world.r5, task_id, accept, read_version)
    assert again.status_code == 200, again.content
    assert again.json() == first.json()
    assert list(AuditEntry.objects.values_list("action", flat=True)) == ["read"]

    reject = [
        {"op": "replace", "path": "/status", "value": "rejected"},
        {"op": "add", "path": "/statusReason", "value": {"concept": {"text": "Full."}}},
    ]
    only_tests = [{"op": "test", "path": "/status", "value": "requested"}]
    unknown_version = _patch(world.r5, task_id, accept, 'W/"99"')
    assert _patch(world.r5, task_id, reject, read_version).status_code == 412
    assert _patch(world.r5, task_id, only_tests, read_version).status_code == 412
    assert unknown_version.status_code == 412
    # Without If-Match the patch goes to the current version: already accepted, 200.
    assert _patch(world.r5, task_id, accept, None).status_code == 200
    assert _snapshot(task_id) == before


def test_a_stale_patch_that_is_no_retry_is_412_whatever_it_does_to_the_named_version(
    world: World,
) -> None:
    """A stale If-Match is 412 unless the patch is the retry of an applied one (docs/fhir.md
    PATCH). Applied to the version the If-Match names only to recognise a retry, a patch
    that does not apply there (a failed test, a missing path), or whose result the update
    would refuse (not valid FHIR, another id) was answered 422 / 400 instead."""
    task_id, _accept_body, read_version = _accept(world)
    accept = [{"op": "replace", "path": "/status", "value": "accepted"}]
    assert _patch(world.r5, task_id, accept, read_version).status_code == 200
    before = _snapshot(task_id)

    patches = [
        [{"op": "test", "path": "/status", "value": "accepted"}, *accept],
        [{"op": "remove", "path": "/statusReason"}],
        [{"op": "replace", "path": "/status", "value": "no-such-status"}],
        [{"op": "replace", "path": "/id", "value": "another"}],
    ]
    answers = [_patch(world.r5, task_id, patch, read_version) for patch in patches]

    assert [a.status_code for a in answers] == [412] * len(patches), [a.content for a in answers]
    assert _snapshot(task_id) == before


def test_the_retry_of_a_forward_from_a_department_no_longer_a_party_is_404(
    world: World,
) -> None:
    """The Task is looked up in the caller's scope before any record of the update: a
    department that forwarded the case away gets 404 for its retry (as any request of a
    non-party), not the version it made, with its If-Match or with *."""
    task_id, accept, read_version = _accept(world)
    forward = copy.deepcopy(accept)
    forward["status"] = "requested"
    forward["owner"] = {"reference": f"HealthcareService/{world.network.cardiology.pk}"}
    forward["statusReason"] = {"concept": {"text": "Not ours: cardiology."}}
    assert _put(world.r5, forward, read_version).status_code == 200
    before = _snapshot(task_id)

    answers = [_put(world.r5, forward, if_match) for if_match in (read_version, "*")]

    assert [a.status_code for a in answers] == [404, 404], [a.content for a in answers]
    assert _snapshot(task_id) == before
