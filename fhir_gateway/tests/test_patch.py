"""PATCH (JSON Patch, JSON Merge Patch) under /fhir: applied to the current version and
stored through the type's update, so a Task PATCH is the same workflow step as a PUT."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fhir_gateway import patching
from fhir_gateway.handlers import WriteRequest
from fhir_gateway.models import FhirResource
from fhir_gateway.outcomes import FhirError
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import World, submit, task_of
from referrals.models import Referral, ReferralEvent, ReferralState

pytestmark = pytest.mark.django_db

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
COMM = {
    "resourceType": "Communication",
    "identifier": [{"system": "urn:test:placer", "value": "A-1"}],
    "status": "in-progress",
}


def _snapshot(task_id: str) -> tuple[str, int, int, int]:
    referral = Referral.objects.get(filler_id=task_id)
    return (
        referral.state,
        referral.version,
        ReferralEvent.objects.filter(referral=referral).count(),
        FhirResource.objects.filter(logical_id=task_id).count(),
    )


_NOTE = {"op": "add", "path": "/note", "value": [{"text": "a"}]}


def _submitted(world: World) -> str:
    return str(task_of(submit(world))["id"])


# --------------------------------------------------------------------------- Task workflow


def test_json_patch_on_the_task_accepts_the_referral(world):
    task_id = _submitted(world)
    patch = [
        {"op": "test", "path": "/status", "value": "requested"},
        {"op": "replace", "path": "/status", "value": "accepted"},
    ]
    response = world.r5.patch(
        f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5, **{"If-Match": 'W/"1"'}
    )
    assert response.status_code == 200, response.content
    assert response["ETag"] == 'W/"2"'
    task = json.loads(response.content)
    assert (task["status"], task["meta"]["versionId"]) == ("accepted", "2")
    referral = Referral.objects.get(filler_id=task_id)
    assert (referral.state, referral.version) == (ReferralState.ACCEPTED, 2)
    assert ReferralEvent.objects.filter(referral=referral).latest("seq").action == "accept"
    # What the PATCH answered is what a read gives (the stored version).
    assert world.r5.get(f"/fhir/Task/{task_id}", Accept=FHIR_R5).content == response.content


def test_merge_patch_as_fhirpy_sends_it_declines_with_a_reason(world):
    """fhirpy's ``patch(**fields)``: a JSON object under application/json."""
    task_id = _submitted(world)
    response = world.r4.client.patch(  # the R4 consultant view of the same Task
        f"/fhir/Task/{task_id}",
        data=json.dumps({"status": "rejected", "statusReason": {"text": "Out of scope."}}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {_consultant_token(world)}"},
    )
    assert response.status_code == 200, response.content
    referral = Referral.objects.get(filler_id=task_id)
    assert referral.state == ReferralState.DECLINED
    event = ReferralEvent.objects.filter(referral=referral).latest("seq")
    assert (event.action, event.reason) == ("decline", "Out of scope.")


def _consultant_token(world: World) -> str:
    token = world.r5.token
    assert token is not None
    return token


def test_merge_patch_null_removes_an_element():
    resource = {"resourceType": "Task", "id": "a", "note": [{"text": "x"}], "status": "ready"}
    patched = patching.apply_patch(resource, {"note": None, "status": "accepted"}, max_bytes=100)
    assert patched == {"resourceType": "Task", "id": "a", "status": "accepted"}
    assert resource["note"] == [{"text": "x"}]  # the input is not changed in place


def test_a_failed_test_operation_is_422_and_changes_nothing(world):
    task_id = _submitted(world)
    before = _snapshot(task_id)
    patch = [
        {"op": "test", "path": "/status", "value": "accepted"},
        {"op": "replace", "path": "/status", "value": "rejected"},
    ]
    response = world.r5.patch(f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5)
    assert response.status_code == 422
    assert outcome_issue(response)["code"] == "processing"
    assert _snapshot(task_id) == before


def test_a_stale_if_match_is_412_and_changes_nothing(world):
    task_id = _submitted(world)
    before = _snapshot(task_id)
    patch = [{"op": "replace", "path": "/status", "value": "accepted"}]
    response = world.r5.patch(
        f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5, **{"If-Match": 'W/"7"'}
    )
    assert response.status_code == 412
    assert outcome_issue(response)["code"] == "conflict"
    assert _snapshot(task_id) == before


def test_a_patch_is_checked_as_the_put_of_its_result_would_be(world):
    """The requester's system may not accept its own referral, by PATCH as by PUT."""
    task_id = _submitted(world)
    before = _snapshot(task_id)
    response = world.r4.patch(
        f"/fhir/Task/{task_id}", [{"op": "replace", "path": "/status", "value": "accepted"}]
    )
    assert response.status_code == 403, response.content
    assert _snapshot(task_id) == before


def test_a_task_outside_the_callers_scope_is_404(world):
    task_id = _submitted(world)
    before = _snapshot(task_id)
    response = world.other.patch(
        f"/fhir/Task/{task_id}", [{"op": "replace", "path": "/status", "value": "cancelled"}]
    )
    assert response.status_code == 404
    assert _snapshot(task_id) == before


@pytest.mark.parametrize(
    ("patch", "status", "code"),
    [
        ([{"op": "replace", "path": "/id", "value": "other"}], 422, "processing"),
        ([{"op": "replace", "path": "/resourceType", "value": "Patient"}], 422, "processing"),
        ([{"op": "remove", "path": "/no/such/element"}], 422, "processing"),
        ([{"op": "replace", "path": "", "value": []}], 422, "processing"),
        ([{"op": "frobnicate", "path": "/status"}], 400, "structure"),
        ([{"path": "/status"}], 400, "structure"),
        (["not an operation"], 400, "structure"),
        ([{"op": "replace", "path": 7, "value": "x"}], 400, "structure"),
        ([{"op": "replace", "path": "status", "value": "accepted"}], 400, "structure"),
        ([{"op": "copy", "path": "/x"}], 400, "structure"),
        ([{"op": "add", "path": "/note"}], 400, "structure"),
        ([{"op": "test", "path": "/status", "value": "requested"}] * 101, 422, "too-costly"),
        ([{"op": "replace", "path": "/status", "value": "\u0000"}], 400, "invalid"),
        ("null", 400, "structure"),
        ("[", 400, "structure"),
        ([{"op": "replace", "path": "/status", "value": "no-such-status"}], 422, "code-invalid"),
        # "/-" is the place after an array's last element: nothing to copy, move or test.
        ([_NOTE, {"op": "copy", "from": "/note/-", "path": "/note/0"}], 422, "processing"),
        ([_NOTE, {"op": "move", "from": "/note/-", "path": "/x"}], 422, "processing"),
        ([_NOTE, {"op": "test", "path": "/note/-", "value": {"text": "a"}}], 422, "processing"),
        ([{"op": ["replace"], "path": "/status", "value": "accepted"}], 400, "structure"),
        ([{"op": {}, "path": "/status", "value": "accepted"}], 400, "structure"),
    ],
)
def test_bad_patches_are_refused_and_change_nothing(world, patch, status, code):
    task_id = _submitted(world)
    before = _snapshot(task_id)
    response = world.r5.patch(f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5)
    assert response.status_code == status, response.content
    issue = outcome_issue(response)
    assert issue["code"] == code
    assert _snapshot(task_id) == before


def test_a_patch_that_changes_nothing_answers_the_current_version(world):
    """Only ``test`` operations (a guard), or none: 200, no new version, no event."""
    task_id = _submitted(world)
    before = _snapshot(task_id)
    for patch in ([], [{"op": "test", "path": "/status", "value": "requested"}]):
        response = world.r5.patch(f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5)
        assert response.status_code == 200, response.content
        assert response["ETag"] == 'W/"1"'
        assert json.loads(response.content)["status"] == "requested"
    assert _snapshot(task_id) == before


def test_copies_that_would_grow_the_resource_past_the_limit_are_refused(world, settings):
    """A small body must not build a huge resource: each copy doubling a list."""
    settings.FHIR_MAX_BODY_BYTES = 20_000
    task_id = _submitted(world)
    before = _snapshot(task_id)
    patch = [{"op": "add", "path": "/note", "value": [{"text": "x" * 100}]}]
    patch += [{"op": "copy", "from": "/note", "path": "/note/-"}] * 40
    response = world.r5.patch(f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5)
    assert response.status_code == 422
    assert outcome_issue(response)["code"] == "too-costly"
    assert _snapshot(task_id) == before


def _nested(levels: int) -> Any:
    """``levels`` levels of nested extensions (two JSON levels each), valid FHIR."""
    value: Any = {"url": "http://example.org/x", "valueString": "v"}
    for _ in range(levels - 1):
        value = {"url": "http://example.org/x", "extension": [value]}
    return value


def test_a_body_nested_too_deeply_is_400_not_500(world):
    """Valid FHIR 150 extensions deep (5.6 kB) exhausted the validators' stack: a 500
    before bodies were depth-checked."""
    task_id = _submitted(world)
    before = _snapshot(task_id)
    for patch, content_type in (
        ([{"op": "add", "path": "/extension", "value": [_nested(150)]}], JSON_PATCH),
        ({"extension": [_nested(150)]}, MERGE_PATCH),
    ):
        response = world.r5.patch(
            f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5, content_type=content_type
        )
        assert response.status_code == 400, response.content
        issue = outcome_issue(response)
        assert issue["code"] == "structure"
        assert issue["diagnostics"] == "The body is nested more than 64 levels deep."
    assert _snapshot(task_id) == before


def test_copies_that_nest_the_resource_too_deeply_are_refused(world):
    """A shallow body whose copy puts a branch inside itself doubles its depth."""
    task_id = _submitted(world)
    before = _snapshot(task_id)
    inner = "/extension/0" + "/extension/0" * 19  # the 20th level of a 20-level chain
    patch = [
        {"op": "add", "path": "/extension", "value": [_nested(20)]},
        {"op": "copy", "from": "/extension", "path": f"{inner}/extension"},
    ]
    response = world.r5.patch(f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5)
    assert response.status_code == 422, response.content
    issue = outcome_issue(response)
    assert issue["code"] == "processing"
    assert "nests more than 64 levels" in issue["diagnostics"]
    assert _snapshot(task_id) == before


def test_a_copy_nested_past_the_stack_is_400_not_500():
    deep: Any = "leaf"
    for _ in range(600):
        deep = {"a": deep}
    with pytest.raises(FhirError) as caught:
        patching.apply_patch(
            {"resourceType": "Task", "extension": deep},
            [{"op": "copy", "from": "/extension", "path": "/note"}],
            max_bytes=10**6,
        )
    assert (caught.value.status, str(caught.value)) == (400, "The patch is nested too deeply.")


def test_a_patch_in_the_wrong_state_is_409_and_changes_nothing(world):
    """Decline is an answer to a submitted referral; an accepted one cannot be declined."""
    task_id = _submitted(world)
    assert (
        world.r5.patch(
            f"/fhir/Task/{task_id}", [{"op": "replace", "path": "/status", "value": "accepted"}]
        ).status_code
        == 200
    )
    before = _snapshot(task_id)
    response = world.r5.patch(
        f"/fhir/Task/{task_id}",
        [
            {"op": "replace", "path": "/status", "value": "rejected"},
            {"op": "add", "path": "/statusReason", "value": {"concept": {"text": "Full."}}},
        ],
        Accept=FHIR_R5,
    )
    assert response.status_code == 409, response.content
    assert _snapshot(task_id) == before


def test_a_task_patch_is_reapplied_after_a_concurrent_transition(world, monkeypatch):
    """Between the read and the write routing notifies the department (a system event: a
    new Task version, same state); the Task's update refuses the version read (412) and
    the patch is applied again on the new one."""
    from django.utils import timezone

    from fhir_gateway.handlers import HANDLERS
    from referrals.services import referral_transition

    task_id = _submitted(world)
    referral = Referral.objects.get(filler_id=task_id)
    Referral.objects.filter(pk=referral.pk).update(deadline=timezone.now())
    handler = HANDLERS["Task"]
    real_update = handler.update
    assert real_update is not None
    calls: list[str | None] = []

    def update(req: WriteRequest) -> Any:
        calls.append(req.if_match)
        if len(calls) == 1:
            referral_transition(actor=None, referral_id=referral.pk, action="escalation_notify")
        return real_update(req)

    monkeypatch.setattr(handler, "update", update)
    response = world.r5.patch(
        f"/fhir/Task/{task_id}", [{"op": "replace", "path": "/status", "value": "accepted"}]
    )
    assert response.status_code == 200, response.content
    assert calls == ['W/"1"', 'W/"2"']
    assert response["ETag"] == 'W/"3"'
    actions = list(
        ReferralEvent.objects.filter(referral=referral)
        .order_by("seq")
        .values_list("action", flat=True)
    )
    assert actions == ["submit", "escalation_notify", "accept"]


def test_fhirpath_patch_is_422_not_supported(world):
    task_id = _submitted(world)
    before = _snapshot(task_id)
    parameters = {"resourceType": "Parameters", "parameter": [{"name": "operation"}]}
    response = world.r5.patch(f"/fhir/Task/{task_id}", parameters, content_type=FHIR_R5)
    assert response.status_code == 422
    assert outcome_issue(response)["code"] == "not-supported"
    assert _snapshot(task_id) == before


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON_PATCH, {"status": "accepted"}),  # JSON Patch must be an array
        (MERGE_PATCH, [{"op": "replace", "path": "/status", "value": "accepted"}]),
    ],
)
def test_a_body_of_the_wrong_shape_for_its_type_is_400(world, content_type, body):
    task_id = _submitted(world)
    before = _snapshot(task_id)
    response = world.r5.patch(f"/fhir/Task/{task_id}", body, content_type=content_type)
    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "structure"
    assert _snapshot(task_id) == before


@pytest.mark.parametrize(
    "content_type",
    ["application/xml-patch+xml", "text/plain", "", f"{JSON_PATCH}; fhirVersion=3.0"],
)
def test_patch_formats_we_do_not_apply_are_415(world, content_type):
    task_id = _submitted(world)
    before = _snapshot(task_id)
    response = world.r5.patch(
        f"/fhir/Task/{task_id}",
        [{"op": "replace", "path": "/status", "value": "accepted"}],
        content_type=content_type,
    )
    assert response.status_code == 415
    assert outcome_issue(response)["code"] == "not-supported"
    assert _snapshot(task_id) == before


def test_the_fhir_version_parameter_chooses_the_rendering_patched(world):
    """R5 Task.statusReason is a CodeableReference; patched in R5 it is understood."""
    task_id = _submitted(world)
    patch = [
        {"op": "replace", "path": "/status", "value": "rejected"},
        {"op": "add", "path": "/statusReason", "value": {"concept": {"text": "No bed."}}},
    ]
    response = world.r5.patch(
        f"/fhir/Task/{task_id}",
        patch,
        content_type=f"{JSON_PATCH}; fhirVersion=5.0",
        Accept=FHIR_R4,
    )
    assert response.status_code == 200, response.content
    assert json.loads(response.content)["statusReason"]["text"] == "No bed."  # answered in R4
    event = ReferralEvent.objects.filter(referral__filler_id=task_id).latest("seq")
    assert (event.action, event.reason) == ("decline", "No bed.")


def test_metadata_declares_patch_for_task_only_among_referral_types(fhir):
    statement = json.loads(fhir.get("/fhir/metadata").content)
    assert statement["patchFormat"] == [JSON_PATCH, MERGE_PATCH]
    codes = {
        r["type"]: {i["code"] for i in r["interaction"]} for r in statement["rest"][0]["resource"]
    }
    assert "patch" in codes["Task"]
    assert "patch" not in codes["ServiceRequest"]
    assert "patch" not in codes["Organization"]


def test_patch_where_not_supported_is_405_with_allow(world):
    task_id = _submitted(world)
    response = world.r4.patch(
        f"/fhir/ServiceRequest/{task_id}", [{"op": "remove", "path": "/note"}]
    )
    assert response.status_code == 405
    assert "PATCH" not in response["Allow"]
    options = world.r5.patch(f"/fhir/Task/{task_id}x", [])
    assert options.status_code == 404


# --------------------------------------------------------------------------- stored types


def test_a_patch_without_if_match_is_reapplied_after_a_concurrent_change(
    fhir, communication_type, monkeypatch
):
    """Between the read and the write another change stores version 2: the update refuses
    the stale version (412), the patch is read and applied again, on version 2."""
    logical_id = json.loads(fhir.post("/fhir/Communication", COMM).content)["id"]
    real_update = communication_type.update
    calls: list[str | None] = []

    def update(req: WriteRequest) -> Any:
        calls.append(req.if_match)
        if len(calls) == 1:  # the concurrent writer, committed before this write
            concurrent = {**COMM, "id": logical_id, "status": "completed"}
            real_update(WriteRequest(req.user, req.resource_type, concurrent, req.fhir_version,
                                     logical_id=logical_id, if_match='W/"1"'))  # fmt: skip
        return real_update(req)

    monkeypatch.setattr(communication_type, "update", update)
    # Two operations, the second changing what the first added: applied again as sent.
    patch = [
        {"op": "add", "path": "/note", "value": [{"text": "Seen."}]},
        {"op": "add", "path": "/note/-", "value": {"text": "Replied."}},
    ]
    response = fhir.patch(f"/fhir/Communication/{logical_id}", patch)
    assert response.status_code == 200, response.content
    assert calls == ['W/"1"', 'W/"2"']
    stored = json.loads(response.content)
    assert stored["meta"]["versionId"] == "3"
    assert stored["status"] == "completed"
    assert stored["note"] == [{"text": "Seen."}, {"text": "Replied."}]


def test_a_patch_that_keeps_losing_the_race_is_412_and_changes_nothing(
    fhir, communication_type, monkeypatch
):
    """Another writer stores a version before each of the three attempts."""
    logical_id = json.loads(fhir.post("/fhir/Communication", COMM).content)["id"]
    real_update = communication_type.update
    calls: list[str | None] = []

    def update(req: WriteRequest) -> Any:
        calls.append(req.if_match)
        current = FhirResource.objects.get(logical_id=logical_id, is_current=True).version_id
        concurrent = {**COMM, "id": logical_id, "status": ["completed", "stopped"][current % 2]}
        real_update(WriteRequest(req.user, req.resource_type, concurrent, req.fhir_version,
                                 logical_id=logical_id, if_match=f'W/"{current}"'))  # fmt: skip
        return real_update(req)

    monkeypatch.setattr(communication_type, "update", update)
    response = fhir.patch(
        f"/fhir/Communication/{logical_id}",
        [{"op": "add", "path": "/note", "value": [{"text": "Seen."}]}],
    )
    assert response.status_code == 412
    assert calls == ['W/"1"', 'W/"2"', 'W/"3"']
    # Only the other writer's three versions: no note anywhere.
    versions = FhirResource.objects.filter(logical_id=logical_id)
    assert versions.count() == 4
    assert not any("Seen." in row.json_r4 for row in versions)


def test_with_if_match_a_concurrent_change_is_not_retried(fhir, communication_type):
    logical_id = json.loads(fhir.post("/fhir/Communication", COMM).content)["id"]
    fhir.put(
        f"/fhir/Communication/{logical_id}",
        {**COMM, "id": logical_id, "status": "completed"},
        **{"If-Match": 'W/"1"'},
    )
    response = fhir.patch(
        f"/fhir/Communication/{logical_id}",
        [{"op": "add", "path": "/note", "value": [{"text": "Seen."}]}],
        **{"If-Match": 'W/"1"'},
    )
    assert response.status_code == 412
    assert FhirResource.objects.filter(logical_id=logical_id).count() == 2


def test_a_deleted_resource_is_410(fhir, communication_type):
    logical_id = json.loads(fhir.post("/fhir/Communication", COMM).content)["id"]
    assert fhir.delete(f"/fhir/Communication/{logical_id}").status_code == 204
    response = fhir.patch(
        f"/fhir/Communication/{logical_id}", [{"op": "remove", "path": "/status"}]
    )
    assert response.status_code == 410
    assert FhirResource.objects.filter(logical_id=logical_id).count() == 2


def test_a_body_above_the_limit_is_413(fhir, communication_type, settings):
    logical_id = json.loads(fhir.post("/fhir/Communication", COMM).content)["id"]
    settings.FHIR_MAX_BODY_BYTES = 100
    patch = [{"op": "add", "path": "/note", "value": [{"text": "x" * 200}]}]
    response = fhir.patch(f"/fhir/Communication/{logical_id}", patch)
    assert response.status_code == 413
    assert FhirResource.objects.filter(logical_id=logical_id).count() == 1


def test_an_empty_patch_body_is_400(world):
    task_id = _submitted(world)
    before = _snapshot(task_id)
    response = world.r5.client.generic(
        "PATCH",
        f"/fhir/Task/{task_id}",
        data=b" ",
        content_type=JSON_PATCH,
        headers={"Authorization": f"Bearer {_consultant_token(world)}"},
    )
    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "structure"
    assert _snapshot(task_id) == before


def test_apply_patch_errors_are_fhir_errors():
    with pytest.raises(FhirError) as caught:
        patching.apply_patch(
            {"resourceType": "Task"}, [{"op": "move", "from": "/x", "path": "/y"}], max_bytes=100
        )
    assert caught.value.status == 422


def test_json_patch_test_tells_a_boolean_from_a_number():
    """RFC 6902 4.6 (Python's == says True == 1)."""
    resource = {"resourceType": "Task", "id": "a", "flag": True, "n": 1}
    for path, value in (("/flag", 1), ("/n", True), ("/n", "1")):
        with pytest.raises(FhirError) as caught:
            patching.apply_patch(
                resource, [{"op": "test", "path": path, "value": value}], max_bytes=100
            )
        assert caught.value.status == 422, (path, value)
    same = [
        {"op": "test", "path": "/n", "value": 1.0},
        {"op": "test", "path": "/flag", "value": True},
    ]
    assert patching.apply_patch(resource, same, max_bytes=100) == resource


def test_if_match_star_applies_a_patch_to_the_current_version(world) -> None:
    """``If-Match: *`` (any current version, RFC 9110) as the Task PUT takes it."""
    task_id = _submitted(world)
    patch = [{"op": "replace", "path": "/status", "value": "accepted"}]

    response = world.r5.patch(f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5, **{"If-Match": "*"})

    assert response.status_code == 200, response.content
    assert Referral.objects.get(filler_id=task_id).state == ReferralState.ACCEPTED
