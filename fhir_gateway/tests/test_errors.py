"""Every error under /fhir is an OperationOutcome with the right status and issue code."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.errors import ApplicationError, Conflict, NotFound, PermissionDenied
from fhir_gateway.handlers import HANDLERS
from fhir_gateway.models import FhirResource, IntakeJob
from fhir_gateway.tests.conftest import FHIR_R4, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import service_request, submit, transaction
from referrals.models import Referral
from registry.models import Facility
from tests.factories import UserFactory

COMM = {"resourceType": "Communication", "status": "completed"}


def _stored() -> int:
    return FhirResource.objects.count()


# --------------------------------------------------------------------------- 401


def test_missing_token_is_401_with_www_authenticate(anonymous, network):
    response = anonymous.get(f"/fhir/Organization/{network.hub.pk}")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="fhir"'
    assert outcome_issue(response)["code"] == "login"


@pytest.mark.parametrize("header", ["Bearer nope", "Basic dXNlcjpwdw==", "Bearer", "Token abc"])
def test_bad_token_is_401(network, header):
    response = FhirClient(None).get(f"/fhir/Organization/{network.hub.pk}", Authorization=header)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith('Bearer realm="fhir"')
    assert outcome_issue(response)["code"] == "login"


def test_token_of_inactive_user_is_401(db, network):
    from accounts.services import api_token_issue

    user = UserFactory.create(is_active=False)
    client = FhirClient(api_token_issue(user=user).raw)
    response = client.get(f"/fhir/Organization/{network.hub.pk}")
    assert response.status_code == 401
    assert 'error="invalid_token"' in response["WWW-Authenticate"]


def test_write_without_token_is_401_and_stores_nothing(anonymous, communication_type):
    response = anonymous.post("/fhir/Communication", COMM)
    assert response.status_code == 401
    assert _stored() == 0


def test_metadata_and_versions_need_no_token(anonymous):
    assert anonymous.get("/fhir/metadata").status_code == 200
    assert anonymous.get("/fhir/$versions").status_code == 200


# --------------------------------------------------------------------------- 400


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "structure"),
        (b"  ", "structure"),
        (b"[1, 2]", "structure"),
        (b'"Communication"', "structure"),
        (b"[" * 100_000, "structure"),
        (json.dumps({"resourceType": "Patient"}).encode(), "invalid"),
        (json.dumps({"status": "completed"}).encode(), "invalid"),
        # Not valid FHIR for the model: an unknown element, a wrong type.
        (json.dumps({**COMM, "bogus": 1}).encode(), "structure"),
        (json.dumps({**COMM, "sent": "yesterday"}).encode(), "structure"),
    ],
)
def test_bad_body_is_400_and_stores_nothing(fhir, communication_type, body, code):
    response = fhir.post("/fhir/Communication", body)
    assert response.status_code == 400
    assert outcome_issue(response)["code"] == code
    assert _stored() == 0


@pytest.mark.parametrize(
    "query",
    [
        "_count=abc",
        "_count=-1",
        "_count=%C2%B2",  # "²": str.isdigit says yes, int() says no (a 500 before)
        "_offset=%C2%B2",
        "_offset=x",
        "_total=maybe",
        "_lastUpdated=yesterday",
        "_lastUpdated=sa2024-01-01",
        "_lastUpdated=9999-12-31",  # no end in Python (OverflowError: a 500 before)
        "_lastUpdated=9999-12",
        "_lastUpdated=ge9999-12-31T23:59Z",
        "_lastUpdated=1899-12-31",
        "_lastUpdated=9999-12-31T23:59:58-14:00",  # past 9999 only in UTC
        "_lastUpdated=ge9999-12-31T23:00-14:00",
        "near=abc",
        "near=91|0|10|km",
        "near=10|10|5|mi",
        "active=maybe",
    ],
)
def test_bad_search_parameters_are_400(fhir, network, query):
    resource = "Location" if query.startswith("near") else "Organization"
    response = fhir.get(f"/fhir/{resource}?{query}")
    assert response.status_code == 400
    assert outcome_issue(response)["code"] in {"invalid", "not-supported"}


def test_ignored_parameter_names_are_percent_encoded_in_their_header(fhir, network):
    """Found by test_fuzz.py: a newline in a name made the header raise (a 500)."""
    response = fhir.get("/fhir/Organization?%0Abad=1&col%2Cour=2&h%C3%A0=3")
    assert response.status_code == 200
    assert response["X-FHIR-Ignored-Parameters"] == "%0Abad,col%2Cour,h%C3%A0"


def test_unknown_search_parameter_is_ignored_unless_strict(fhir, network):
    lenient = fhir.get("/fhir/Organization?colour=blue")
    assert lenient.status_code == 200
    assert lenient["X-FHIR-Ignored-Parameters"] == "colour"
    assert json.loads(lenient.content)["link"][0]["url"].endswith("/fhir/Organization?_count=50")
    strict = fhir.get("/fhir/Organization?colour=blue", Prefer="handling=strict")
    assert strict.status_code == 400
    assert outcome_issue(strict)["code"] == "not-supported"


@pytest.mark.parametrize("path", ["/fhir/Organization/bad_id!", "/fhir/Organization/1/_history/x"])
def test_malformed_ids_are_400(fhir, network, path):
    response = fhir.get(path)
    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "invalid"


def test_update_with_mismatched_id_is_400_and_changes_nothing(fhir, communication_type):
    created = fhir.post("/fhir/Communication", COMM)
    logical_id = json.loads(created.content)["id"]
    response = fhir.put(
        f"/fhir/Communication/{logical_id}", {**COMM, "id": "other", "status": "stopped"}
    )
    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "invalid"
    assert FhirResource.objects.get(logical_id=logical_id).version_id == 1


# --------------------------------------------------------------------------- 403/404/405/409


def _raising_handler(monkeypatch: Any, exc: Exception) -> None:
    def search(user: Any, params: Any) -> Any:
        raise exc

    monkeypatch.setattr(HANDLERS["Organization"], "search", search)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (PermissionDenied("Not your facility."), 403, "forbidden"),
        (NotFound("No such department."), 404, "not-found"),
        (Conflict("Already accepted by another department."), 409, "conflict"),
        (ApplicationError("Deadline passed.", status_code=422), 422, "business-rule"),
        (ApplicationError("Bad input."), 400, "invalid"),
    ],
)
def test_application_errors_become_operation_outcomes(
    fhir, network, monkeypatch, exc, status, code
):
    _raising_handler(monkeypatch, exc)
    response = fhir.get("/fhir/Organization")
    assert response.status_code == status
    issue = outcome_issue(response)
    assert issue["code"] == code
    assert issue["diagnostics"] == str(exc)


def test_unexpected_error_is_500_operation_outcome(fhir, network, monkeypatch):
    _raising_handler(monkeypatch, ZeroDivisionError("boom"))
    response = fhir.get("/fhir/Organization")
    assert response.status_code == 500
    issue = outcome_issue(response)
    assert issue["code"] == "exception"
    assert "boom" not in issue["diagnostics"]


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Nonsense",
        "/fhir/Nonsense/1",
        "/fhir/patient",
        "/fhir/Practitioner",
        "/fhir/a/b/c/d/e",
        "/fhir/a/b/c/d/%0A",  # a newline: the catch-all route matched it only without one
    ],
)
def test_unknown_paths_and_types_are_404(fhir, path):
    response = fhir.get(path)
    assert response.status_code == 404
    assert outcome_issue(response)["code"] == "not-found"


def test_unknown_id_is_404(fhir, network):
    response = fhir.get("/fhir/Organization/999999")
    assert response.status_code == 404
    assert outcome_issue(response)["code"] == "not-found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/fhir/Organization", "GET, HEAD"),
        ("PUT", "/fhir/Organization/{pk}", "GET, HEAD"),
        ("DELETE", "/fhir/Organization/{pk}", "GET, HEAD"),
        ("PATCH", "/fhir/Organization/{pk}", "GET, HEAD"),
        ("POST", "/fhir/metadata", "GET, HEAD"),
        ("GET", "/fhir", "POST"),
        ("GET", "/fhir/Patient", "OPTIONS"),
        ("PUT", "/fhir/Patient/x", "GET, HEAD"),
    ],
)
def test_unsupported_interactions_are_405(fhir, network, method, path, allow):
    before = _stored()
    response = fhir.request(method, path.format(pk=network.hub.pk))
    assert response.status_code == 405
    assert response["Allow"] == allow
    assert outcome_issue(response)["code"] == "not-supported"
    assert _stored() == before


def test_integrity_error_is_409(fhir, communication_type, monkeypatch):
    from django.db import IntegrityError

    def create(req: Any) -> Any:
        raise IntegrityError("duplicate key")

    monkeypatch.setattr(communication_type, "create", create)
    response = fhir.post("/fhir/Communication", COMM)
    assert response.status_code == 409
    assert outcome_issue(response)["code"] == "conflict"


# --------------------------------------------------------------------------- 410/412/413/422


def test_deleted_registry_resource_is_410(fhir, network):
    from fhir_gateway.registry_projection import project_registry

    pk = network.lao.pk
    Facility.objects.filter(pk=pk).delete()
    project_registry()
    response = fhir.get(f"/fhir/Organization/{pk}")
    assert response.status_code == 410
    assert outcome_issue(response)["code"] == "deleted"
    assert response["ETag"] == 'W/"2"'
    # Earlier versions stay readable; the deletion version itself is 410.
    assert fhir.get(f"/fhir/Organization/{pk}/_history/1").status_code == 200
    assert fhir.get(f"/fhir/Organization/{pk}/_history/2").status_code == 410


def test_if_match_mismatch_is_412_and_changes_nothing(fhir, communication_type):
    created = fhir.post("/fhir/Communication", COMM)
    logical_id = json.loads(created.content)["id"]
    body = {**COMM, "id": logical_id, "status": "stopped"}
    response = fhir.put(f"/fhir/Communication/{logical_id}", body, **{"If-Match": 'W/"7"'})
    assert response.status_code == 412
    assert outcome_issue(response)["code"] == "conflict"
    row = FhirResource.objects.get(logical_id=logical_id, is_current=True)
    assert (row.version_id, json.loads(row.json_r4)["status"]) == (1, "completed")


def test_malformed_if_match_is_400(fhir, communication_type):
    created = fhir.post("/fhir/Communication", COMM)
    logical_id = json.loads(created.content)["id"]
    body = {**COMM, "id": logical_id}
    response = fhir.put(f"/fhir/Communication/{logical_id}", body, **{"If-Match": "banana"})
    assert response.status_code == 400


def test_body_over_the_limit_is_413_and_stores_nothing(fhir, communication_type, settings):
    settings.FHIR_MAX_BODY_BYTES = 1000
    body = {**COMM, "note": [{"text": "x" * 2000}]}
    response = fhir.post("/fhir/Communication", body)
    assert response.status_code == 413
    assert outcome_issue(response)["code"] == "too-costly"
    assert _stored() == 0


@pytest.mark.parametrize(
    ("body", "element"),
    [
        ({**COMM, "status": "done"}, "Communication.status"),
        ({**COMM, "priority": "whenever"}, "Communication.priority"),
    ],
)
def test_code_outside_required_value_set_is_422(fhir, communication_type, body, element):
    response = fhir.post("/fhir/Communication", body)
    assert response.status_code == 422
    issue = outcome_issue(response)
    assert issue["code"] == "code-invalid"
    assert issue["expression"] == [element]
    assert _stored() == 0


def test_every_error_answer_is_fhir_json(fhir):
    response = fhir.get("/fhir/Nonsense")
    assert response["Content-Type"] == FHIR_R4


# --------------------------------------------------------------------------- found by test_fuzz.py


def _post_transaction(world: Any, bundle: Any, **headers: str) -> Any:
    return world.r4.client.generic(
        "POST",
        "/fhir",
        data=json.dumps(bundle).encode(),
        content_type=FHIR_R4,
        headers=world.r4._headers(headers),
    )


@pytest.mark.parametrize("respond_async", [False, True])
@pytest.mark.parametrize("entry", [True, 3, "x", {"resource": {}}])
def test_a_bundle_entry_that_is_not_an_array_is_400(world, entry, respond_async):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entry}
    headers = {"Prefer": "respond-async"} if respond_async else {}
    response = _post_transaction(world, bundle, **headers)
    assert response.status_code == 400
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("structure", ["Bundle.entry"])
    assert not IntakeJob.objects.exists()
    assert not Referral.objects.exists()


def test_a_transaction_entry_that_is_not_an_object_is_400_naming_it(world):
    bundle = transaction(world)
    bundle["entry"].insert(0, 1)  # the answer is 1:1 with the entries: none may be skipped
    response = _post_transaction(world, bundle)
    assert response.status_code == 400
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("structure", ["Bundle.entry[0]"])
    assert not Referral.objects.exists()


@pytest.mark.parametrize("respond_async", [False, True])
@pytest.mark.parametrize(
    "where",
    [("entry", 1, "resource", "identifier", 0, "value"), ("entry", 1, "resource", "note")],
)
def test_a_nul_character_anywhere_in_a_body_is_400(world, where, respond_async):
    """PostgreSQL cannot store it (and FHIR strings may not hold it): refused up front,
    before an asynchronous job is stored, instead of failing when written."""
    bundle = transaction(world)
    target = bundle
    for step in where[:-1]:
        target = target[step]
    target[where[-1]] = "before\x00after" if where[-1] == "value" else [{"text": "a\x00b"}]
    headers = {"Prefer": "respond-async"} if respond_async else {}
    response = _post_transaction(world, bundle, **headers)
    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "invalid"
    assert not IntakeJob.objects.exists()
    assert not Referral.objects.exists()


def _nested_extension(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"url": "http://example.org/x", "valueString": "v"}
    for _ in range(levels - 1):
        value = {"url": "http://example.org/x", "extension": [value]}
    return value


@pytest.mark.parametrize("respond_async", [False, True])
def test_a_transaction_nested_too_deeply_is_400_not_500(world, respond_async):
    """Found by a review: valid FHIR 150 extensions deep (5.6 kB) exhausted the
    validators' stack (500; an asynchronous job was retried as a server bug)."""
    bundle = transaction(world)
    bundle["entry"][1]["resource"]["extension"] = [_nested_extension(150)]
    headers = {"Prefer": "respond-async"} if respond_async else {}
    response = _post_transaction(world, bundle, **headers)
    assert response.status_code == 400
    issue = outcome_issue(response)
    assert (issue["code"], issue["diagnostics"]) == (
        "structure",
        "The body is nested more than 64 levels deep.",
    )
    assert not IntakeJob.objects.exists()
    assert not Referral.objects.exists()


def test_a_create_nested_too_deeply_is_400_and_stores_nothing(world):
    resource = service_request(world)
    resource["extension"] = [_nested_extension(150)]
    stored = _stored()
    response = world.r4.post("/fhir/ServiceRequest", resource)
    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "structure"
    assert not Referral.objects.exists()
    assert _stored() == stored


def test_validation_past_the_stack_is_400_not_500():
    """What passed the body check (a stored job, a patched resource) and still recurses."""
    from fhir_gateway.outcomes import FhirError
    from fhir_gateway.storage import validate_resource

    resource: dict[str, Any] = {"resourceType": "Task", "status": "requested", "intent": "order"}
    resource["extension"] = [_nested_extension(600)]
    with pytest.raises(FhirError) as caught:
        validate_resource(resource, "4.0")
    assert (caught.value.status, str(caught.value)) == (400, "Task is nested too deeply.")


def test_a_value_the_database_refuses_is_422_not_500(world, monkeypatch):
    """The safety net behind the checks: a DataError is the input's fault."""
    from django.db import DataError

    from fhir_gateway import referral_resources

    def refuses(*args: Any, **kwargs: Any) -> Any:
        raise DataError("value too long for type character varying(255)")

    monkeypatch.setattr(referral_resources, "_submit", refuses)
    response = _post_transaction(world, transaction(world))
    assert response.status_code == 422
    assert outcome_issue(response)["code"] == "invalid"
    assert not Referral.objects.exists()


@pytest.mark.parametrize("request_value", ["x", [{"method": "POST", "url": "ServiceRequest"}], 1])
def test_a_transaction_entry_whose_request_is_not_an_object_is_422(world, request_value):
    bundle = transaction(world)
    bundle["entry"][1]["request"] = request_value
    response = _post_transaction(world, bundle)
    assert response.status_code == 422
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("not-supported", ["Bundle.entry[1]"])
    assert not Referral.objects.exists()


@pytest.mark.parametrize("part", ["system", "value"])
def test_a_placer_identifier_over_255_characters_is_422(world, part):
    bundle = transaction(world)
    bundle["entry"][1]["resource"]["identifier"][0][part] = "x" * 256
    response = _post_transaction(world, bundle)
    assert response.status_code == 422
    issue = outcome_issue(response)
    assert (issue["code"], issue["expression"]) == ("invalid", ["ServiceRequest.identifier"])
    assert not Referral.objects.exists()
    bundle["entry"][1]["resource"]["identifier"][0][part] = "x" * 255  # the longest accepted
    assert _post_transaction(world, bundle).status_code == 200


def test_a_nul_in_if_none_exist_is_400(world):
    response = world.r4.client.generic(
        "POST",
        "/fhir/ServiceRequest",
        data=json.dumps(service_request(world)).encode(),
        content_type=FHIR_R4,
        headers=world.r4._headers({"If-None-Exist": "identifier=%00"}),
    )
    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "invalid"
    assert not Referral.objects.exists()


def test_superscript_digits_in_a_history_or_version_id_are_400(fhir, communication_type):
    """Found by a fuzz hunt: "²" passed ``str.isdigit`` and failed ``int`` (500)."""
    logical_id = json.loads(fhir.post("/fhir/Communication", COMM).content)["id"]
    for path in (
        f"/fhir/Communication/{logical_id}/_history/%C2%B2",
        f"/fhir/Communication/{logical_id}/_history?_count=%C2%B2",
    ):
        response = fhir.get(path)
        assert response.status_code == 400, path
        assert outcome_issue(response)["code"] == "invalid"


def test_over_a_thousand_parameters_is_400_not_500(world: Any) -> None:
    """Found by a review: Django's TooManyFieldsSent (DATA_UPLOAD_MAX_NUMBER_FIELDS) was
    answered 500."""
    query = "&".join(f"_include:iterate=Task:focus{n}" for n in range(1001))
    response = world.r4.get(f"/fhir/Task?{query}")
    assert response.status_code == 400, response.content
    assert outcome_issue(response)["code"] == "too-costly"


@pytest.mark.parametrize(
    "query",
    [
        "Organization?name:text=Mahosot",
        "Organization?address-country:exact=LA",
        "Task?identifier:above=x|y",
        "Task?_id:missing=true",
        "Task?requester:not=Organization/1",
    ],
)
def test_an_unsupported_modifier_on_a_known_parameter_is_400_even_leniently(
    fhir: Any, network: Any, query: str
) -> None:
    """Found by a review: it was ignored, and the search answered every facility (more
    than asked for; with :not, the very one excluded)."""
    response = fhir.get(f"/fhir/{query}")
    assert response.status_code == 400, response.content
    assert "modifier" in outcome_issue(response)["diagnostics"]
    contains = fhir.get("/fhir/Organization?name:contains=maho")
    assert contains.status_code == 200


def test_head_answers_as_get_without_a_body(world):
    """HEAD wherever GET is (RFC 9110): monitoring and link checkers use it."""
    get = world.r4.get("/fhir/metadata")
    head = world.r4.client.generic("HEAD", "/fhir/metadata", headers=world.r4._headers({}))
    task_head = world.r4.client.generic("HEAD", "/fhir/Task", headers=world.r4._headers({}))

    assert (get.status_code, head.status_code, task_head.status_code) == (200, 200, 200)
    assert head.content == b""
    assert head["Content-Length"] == str(len(get.content))
    assert head["Content-Type"] == get["Content-Type"]
    refused = world.r4.client.generic("PUT", "/fhir/metadata", headers=world.r4._headers({}))
    assert refused.status_code == 405
    assert refused["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("charset", ["ISO-8859-1", "utf-16", "utf8"])
def test_a_post_search_form_in_another_charset_is_415(world, charset):
    """Found by fuzzing a running server: Django reads form bodies as UTF-8 only and raised
    BadRequest for any other charset, which the gateway answered as a 500 (Apache
    HttpClient's form entity declares ISO-8859-1 by default)."""
    submit(world, "CHARSET")
    response = world.r4.post(
        "/fhir/Task/_search",
        b"status=requested",
        content_type=f"application/x-www-form-urlencoded; charset={charset}",
    )
    assert response.status_code == 415, response.content
    issue = outcome_issue(response)
    assert issue["code"] == "not-supported"
    assert "UTF-8" in issue["diagnostics"]
    utf8 = world.r4.post(
        "/fhir/Task/_search",
        b"status=requested",
        content_type="application/x-www-form-urlencoded; charset=UTF-8",
    )
    assert utf8.status_code == 200, utf8.content
    assert utf8.json()["total"] == 1
