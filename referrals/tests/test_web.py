"""The clinicians' web pages (referrals/web.py) through Django's test client."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import User
from accounts.roles import Role
from fhir_gateway.models import OutboxMessage
from referrals import routing, services
from referrals.models import AuditEntry, CloseOut, ConsultNote, Message, Referral
from referrals.tests.conftest import World, _user
from registry.models import Department, Specialty

pytestmark = pytest.mark.django_db


def client_for(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def new_referral_form(world: World, **overrides: Any) -> dict[str, Any]:
    data = {
        "placer_value": str(uuid.uuid4()),
        "specialty": str(world.paeds.pk),
        "mode": "async",
        "priority": "3",
        "clinical_question": "Fever for 5 days in a 2-year-old.",
        "patient_ref": "P-123",
        "patient_sex": "female",
        "patient_birth_year": "2023",
    }
    data.update(overrides)
    return data


def action_post(referral: Referral, action: str, version: int | None = None, **inputs: Any):
    data = {f"{action}-expected_version": referral.version if version is None else version}
    data.update({f"{action}-{name}": value for name, value in inputs.items()})
    return data


# --- home -------------------------------------------------------------------------------------


def test_home_links_by_role(world: World) -> None:
    body = client_for(world.referrer).get("/").content.decode()
    assert "Registry" in body  # the registry summary stays
    assert 'href="/referrals/new/"' in body and 'href="/referrals/outgoing/"' in body
    assert 'href="/reports/"' in body and "/referrals/worklist/" not in body

    body = client_for(world.consultant).get("/").content.decode()
    assert f'href="/referrals/worklist/?department={world.hub_paeds.pk}"' in body
    assert "/referrals/new/" not in body

    body = client_for(world.ministry).get("/").content.decode()
    assert 'href="/reports/"' in body
    assert "/referrals/" not in body


def test_outgoing_page_of_a_user_without_facility_says_why_it_is_empty(world: World) -> None:
    world.referrer.facility = None
    world.referrer.save()
    body = client_for(world.referrer).get("/referrals/outgoing/").content.decode()
    assert 'id="no-facility"' in body and "<table" not in body
    body = client_for(world.consultant).get("/referrals/outgoing/").content.decode()
    assert 'id="no-facility"' not in body and "Referrals sent by Central Children" in body


def test_pages_need_a_login(world: World) -> None:
    referral = world.submit()
    for url in ("/", "/referrals/new/", "/referrals/outgoing/", f"/referrals/{referral.pk}/"):
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_a_post_after_the_session_ended_says_nothing_was_done_and_keeps_the_text(
    world: World,
) -> None:
    """Logged out (timed out, or in another tab) with a form open: the post was sent to the
    login page, which then led to the case's page as if nothing had happened, and what was
    typed was gone."""
    referral = world.referral_in("advised")
    version = referral.version
    anonymous = Client()

    response = anonymous.post(
        f"/referrals/{referral.pk}/actions/request_transfer/",
        action_post(referral, "request_transfer", reason="Cần chuyển PICU <b>now</b>"),
    )

    assert response.status_code == 403
    body = response.content.decode()
    assert "Your session has ended" in body and "Nothing was changed" in body
    assert "Cần chuyển PICU &lt;b&gt;now&lt;/b&gt;</textarea>" in body
    assert f'href="/accounts/login/?next=/referrals/{referral.pk}/"' in body
    referral.refresh_from_db()
    assert (referral.state, referral.version) == ("advised", version)

    response = anonymous.post(
        f"/referrals/{referral.pk}/messages/", {"text": "Kết quả xét nghiệm", "client_key": "k"}
    )
    assert response.status_code == 403 and "Kết quả xét nghiệm</textarea>" in (
        response.content.decode()
    )
    assert not Message.objects.filter(referral=referral).exists()

    response = anonymous.post("/referrals/new/", new_referral_form(world))
    assert response.status_code == 403
    body = response.content.decode()
    assert "Fever for 5 days in a 2-year-old.</textarea>" in body
    assert 'href="/accounts/login/?next=/referrals/new/"' in body
    assert "placer" not in body.lower()  # hidden keys are no one's typing
    assert Referral.objects.count() == 1


def test_a_form_with_an_outdated_csrf_token_says_nothing_was_done_and_keeps_the_text(
    world: World,
) -> None:
    """Logging in again in another tab renews the CSRF token: a form opened before fails
    the check. That was Django's bare "CSRF verification failed. Request aborted." page,
    with no way back and what was typed lost."""
    referral = world.referral_in("advised")
    version = referral.version
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.referrer)
    client.get(f"/referrals/{referral.pk}/")  # the CSRF cookie
    data = action_post(referral, "request_transfer", reason="Cần chuyển <b>PICU</b>")
    data["csrfmiddlewaretoken"] = "x" * 64  # the token of a page from before

    response = client.post(
        f"/referrals/{referral.pk}/actions/request_transfer/",
        data,
        HTTP_ORIGIN="http://testserver",  # our own page (a browser sends it)
    )

    assert response.status_code == 403
    body = response.content.decode()
    assert 'id="csrf-failure"' in body and "Nothing was changed" in body
    assert "Cần chuyển &lt;b&gt;PICU&lt;/b&gt;</textarea>" in body
    # The form's address, which leads back to the case's page.
    assert f'href="/referrals/{referral.pk}/actions/request_transfer/"' in body
    referral.refresh_from_db()
    assert (referral.state, referral.version) == ("advised", version)

    # Posted from another site: the page, but nothing of the post is shown back.
    response = client.post(
        f"/referrals/{referral.pk}/actions/request_transfer/",
        data,
        HTTP_ORIGIN="https://evil.example",
    )
    assert response.status_code == 403
    body = response.content.decode()
    assert 'id="csrf-failure"' in body and "PICU" not in body
    referral.refresh_from_db()
    assert (referral.state, referral.version) == ("advised", version)

    # A login form left open: the page, never the password typed.
    response = Client(enforce_csrf_checks=True).post(
        "/accounts/login/",
        {"username": "dr-x", "password": "s3cret-typed", "csrfmiddlewaretoken": "x" * 64},
        HTTP_ORIGIN="http://testserver",
    )
    assert response.status_code == 403
    body = response.content.decode()
    assert 'id="csrf-failure"' in body and "s3cret-typed" not in body


# --- new referral ---------------------------------------------------------------------------


def test_new_referral_form_lists_specialties(world: World) -> None:
    response = client_for(world.referrer).get("/referrals/new/")
    assert response.status_code == 200
    body = response.content.decode()
    assert '<label for="id_specialty">' in body
    assert f'<option value="{world.paeds.pk}">Pediatric specialty</option>' in body
    assert 'name="placer_value"' in body


def test_submit_creates_exactly_one_referral_and_is_idempotent(world: World) -> None:
    client = client_for(world.referrer)
    data = new_referral_form(world)
    response = client.post("/referrals/new/", data)
    assert response.status_code == 303
    referral = Referral.objects.get()
    assert response["Location"] == f"/referrals/{referral.pk}/"
    assert referral.state == "submitted"
    assert referral.placer_system == "urn:consilium:web"
    assert referral.placer_value == data["placer_value"]
    assert referral.requester_facility == world.district
    assert referral.requester == world.referrer
    assert referral.priority == 3 and referral.patient_birth_year == 2023
    # Routing assigned an upper-tier paediatrics department.
    assert referral.assigned_department in (world.hub_paeds, world.hub2_paeds)
    assert AuditEntry.objects.filter(referral_id=referral.pk, action="create").count() == 1

    # The same form again (double click, back button): still one referral.
    again = client.post("/referrals/new/", data)
    assert again.status_code == 303 and again["Location"] == response["Location"]
    assert Referral.objects.count() == 1

    page = client.get(response["Location"])
    assert "was submitted" in page.content.decode() or "already submitted" in page.content.decode()


def test_the_same_case_under_a_new_form_is_held_back_until_confirmed(world: World) -> None:
    """The back button re-renders the form with a new submission id (Chromium keeps what
    was typed): the same question for the same patient is not sent twice unasked."""
    client = client_for(world.referrer)
    first = client.post("/referrals/new/", new_referral_form(world))
    assert first.status_code == 303
    again = new_referral_form(world)  # a new submission id, the same case
    assert again["placer_value"] != Referral.objects.get().placer_value

    held = client.post("/referrals/new/", again)

    assert held.status_code == 409
    body = held.content.decode()
    assert "not</strong> sent again" in body and Referral.objects.get().filler_id in body
    assert 'name="send_again"' in body
    # A checkbox's label follows it and reads as a sentence (no trailing colon).
    assert ">Yes, send it as a new referral</label>" in body
    assert Referral.objects.count() == 1

    other = client.post(
        "/referrals/new/", {**new_referral_form(world), "clinical_question": "Another case?"}
    )
    confirmed = client.post("/referrals/new/", {**again, "send_again": "on"})

    assert other.status_code == 303 and confirmed.status_code == 303
    assert Referral.objects.count() == 3


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"clinical_question": "   "}, "clinical_question", "required"),
        ({"specialty": ""}, "specialty", "required"),
        ({"specialty": "999999"}, "specialty", "Select a valid choice"),
        ({"priority": "9"}, "priority", "Select a valid choice"),
        ({"patient_birth_year": "3000"}, "patient_birth_year", "less than or equal"),
        ({"placer_value": "not-a-uuid"}, "__all__", "The form was damaged"),
    ],
)
def test_submit_validation_errors(
    world: World, overrides: dict[str, str], field: str, message: str
) -> None:
    response = client_for(world.referrer).post(
        "/referrals/new/", new_referral_form(world, **overrides)
    )
    assert response.status_code == 400
    body = response.content.decode()
    assert "The referral was not submitted" in body
    assert message in body
    assert field in response.context["form"].errors
    assert Referral.objects.count() == 0


def test_submit_only_for_referrers_with_a_facility(world: World) -> None:
    response = client_for(world.consultant).post("/referrals/new/", new_referral_form(world))
    assert response.status_code == 403
    assert "Only referring clinicians" in response.content.decode()
    no_facility = User.objects.create_user(username="nofac", password="x")
    no_facility.groups.add(*world.referrer.groups.all())
    assert client_for(no_facility).get("/referrals/new/").status_code == 403
    assert client_for(world.ministry).get("/referrals/new/").status_code == 404
    assert Referral.objects.count() == 0


# --- lists -----------------------------------------------------------------------------------


def test_outgoing_and_worklist_tables(world: World) -> None:
    referral = world.submit(priority=1)
    body = client_for(world.referrer).get("/referrals/outgoing/").content.decode()
    assert "<caption>Outgoing referrals" in body
    assert referral.filler_id in body and "Paediatrics C1" in body

    filtered = client_for(world.referrer).get("/referrals/outgoing/?state=advised")
    assert referral.filler_id not in filtered.content.decode()
    assert "in state advised" in filtered.content.decode()

    client = client_for(world.consultant)
    for url in ("/referrals/worklist/", f"/referrals/worklist/?department={world.hub_paeds.pk}"):
        response = client.get(url)
        assert response.status_code == 200
        body = response.content.decode()
        assert "<caption>Open referrals" in body
        assert referral.filler_id in body and world.district.name in body and "stat" in body

    # Another department's consultant sees nothing of it.
    assert (
        referral.filler_id
        not in client_for(world.consultant2).get("/referrals/worklist/").content.decode()
    )
    assert (
        referral.filler_id
        not in client_for(world.foreign_referrer).get("/referrals/outgoing/").content.decode()
    )


def test_worklist_of_a_department_one_does_not_work_in_is_404(world: World) -> None:
    client = client_for(world.consultant)
    assert client.get(f"/referrals/worklist/?department={world.hub2_paeds.pk}").status_code == 404
    assert client.get("/referrals/worklist/?department=abc").status_code == 404
    ministry = client_for(world.ministry_at_hub)
    assert ministry.get("/referrals/worklist/").status_code == 404
    assert ministry.get(f"/referrals/worklist/?department={world.hub_paeds.pk}").status_code == 404
    assert ministry.get("/referrals/outgoing/").status_code == 404


def _queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200
    return len(captured)


@pytest.mark.parametrize("page", ["/referrals/outgoing/", "/referrals/worklist/"])
def test_list_query_count_is_constant(world: World, page: str) -> None:
    user = world.referrer if "outgoing" in page else world.consultant
    client = client_for(user)
    for _ in range(2):
        world.submit()
    few = _queries(client, page)
    for _ in range(25):
        world.submit()
    many = _queries(client, page)
    assert many == few
    assert len(client.get(page).context["page"].object_list) == 27


def test_lists_are_paginated_by_50(world: World) -> None:
    for _ in range(51):
        world.submit()
    client = client_for(world.referrer)
    first = client.get("/referrals/outgoing/")
    assert len(first.context["page"].object_list) == 50
    assert 'rel="next"' in first.content.decode()
    second = client.get("/referrals/outgoing/?page=2")
    assert len(second.context["page"].object_list) == 1


# --- detail --------------------------------------------------------------------------------------


def test_detail_is_404_outside_scope_and_for_ministry(world: World) -> None:
    referral = world.submit()
    url = f"/referrals/{referral.pk}/"
    for user in (world.foreign_referrer, world.consultant2, world.ministry, world.ministry_at_hub):
        assert client_for(user).get(url).status_code == 404, user.username
        post = client_for(user).post(f"{url}actions/accept/", action_post(referral, "accept"))
        assert post.status_code == 404, user.username
    assert client_for(world.referrer).get("/referrals/999999/").status_code == 404
    assert Referral.objects.get(pk=referral.pk).state == "submitted"
    assert not AuditEntry.objects.filter(user__in=[world.ministry, world.ministry_at_hub]).exists()


def test_detail_shows_the_case_and_is_audited(world: World) -> None:
    referral = world.act(world.act(world.submit(), "accept"), "request_info")
    response = client_for(world.referrer).get(f"/referrals/{referral.pk}/")
    assert response.status_code == 200
    body = response.content.decode()
    assert referral.filler_id in body
    assert "Fever for 5 days" in body
    assert "<caption>Every change of this referral" in body
    assert "Latest blood count?" in body  # the question, as a message
    # The requester may answer or cancel; the textarea is labelled.
    assert 'id="action-provide_info"' in body and 'id="action-cancel"' in body
    assert '<label for="id_provide_info-text">' in body
    assert 'id="action-accept"' not in body
    assert AuditEntry.objects.filter(
        referral_id=referral.pk, user=world.referrer, action="read"
    ).exists()


def test_action_forms_are_generated_from_the_table(world: World) -> None:
    referral = world.submit()
    body = client_for(world.consultant).get(f"/referrals/{referral.pk}/").content.decode()
    for action in ("accept", "decline", "forward"):
        assert f'id="action-{action}"' in body
    assert '<select name="decline-reason_code"' in body
    assert '<option value="no_capacity">No capacity</option>' in body
    # Forward: a department select with the other paediatrics department.
    assert '<select name="forward-department"' in body
    assert f'<option value="{world.hub2_paeds.pk}">' in body
    assert f'name="accept-expected_version" value="{referral.version}"' in body

    accepted = world.act(referral, "accept")
    body = client_for(world.consultant).get(f"/referrals/{accepted.pk}/").content.decode()
    assert 'type="datetime-local"' in body  # schedule
    assert '<select name="schedule-experts"' in body and "multiple" in body
    assert '<select name="advise-disposition"' in body


def test_consultant_accepts_and_advises(world: World) -> None:
    referral = world.submit()
    client = client_for(world.consultant)
    url = f"/referrals/{referral.pk}/"
    response = client.post(f"{url}actions/accept/", action_post(referral, "accept"))
    assert response.status_code == 303 and response["Location"] == url
    referral.refresh_from_db()
    assert referral.state == "accepted"
    assert AuditEntry.objects.filter(action="transition", detail="accept").count() == 1

    response = client.post(
        f"{url}actions/advise/",
        action_post(referral, "advise", disposition="manage_locally", text="Oral antibiotics."),
    )
    assert response.status_code == 303
    referral.refresh_from_db()
    assert referral.state == "advised"
    assert ConsultNote.objects.get(referral=referral).text == "Oral antibiotics."
    assert "Oral antibiotics." in client.get(url).content.decode()


def _still_open(referral: Referral, version: int) -> None:
    """A refused close-out changed nothing: still advised, same version, no answer kept."""
    referral.refresh_from_db()
    assert (referral.state, referral.version) == ("advised", version)
    assert not CloseOut.objects.filter(referral=referral).exists()


def test_close_local_transfer_considered_is_a_chosen_yes_or_no(world: World) -> None:
    """Half of the close-out question (the avoidance rate's denominator): an unticked
    checkbox recorded "no" for a user who never looked at it; now it is a required yes/no
    that starts unanswered."""
    referral = world.referral_in("advised")
    version = referral.version
    client = client_for(world.referrer)
    url = f"/referrals/{referral.pk}/actions/close_local/"
    # (it starts at "Choose one": test_required_choices_start_unanswered_…)
    unanswered = client.post(url, action_post(referral, "close_local", outcome="not_applicable"))

    assert unanswered.status_code == 400
    assert "This field is required." in unanswered.content.decode()
    _still_open(referral, version)

    answered = action_post(
        referral, "close_local", outcome="not_applicable", transfer_originally_considered="no"
    )
    assert client.post(url, answered).status_code == 303
    close_out = CloseOut.objects.get(referral=referral)
    assert close_out.transfer_originally_considered is False
    assert close_out.outcome == "not_applicable"


def test_required_choices_start_unanswered_so_an_untouched_select_is_no_answer(
    world: World,
) -> None:
    """A required select shown with its first option picked sends that option when the
    user never touched it: a close-out "avoided" (the reports' headline) or "a transfer
    was considered", a decline "outside the specialty", a disposition "manage locally"
    nobody chose."""
    advised = world.referral_in("advised")
    submitted = world.submit()
    accepted = world.act(world.submit(), "accept")
    pages = [
        (world.referrer, advised, "close_local-outcome"),
        (world.referrer, advised, "close_local-transfer_originally_considered"),
        (world.consultant, submitted, "decline-reason_code"),
        (world.consultant, accepted, "advise-disposition"),
    ]
    for user, referral, name in pages:
        body = client_for(user).get(f"/referrals/{referral.pk}/").content.decode()
        select = body.split(f'<select name="{name}"', 1)[1].split("</select>", 1)[0]
        first_option = select.split("<option", 2)[1]
        assert first_option.startswith(' value="" selected>Choose'), (name, first_option)

    # Posted untouched: a field error, and nothing changed.
    version = advised.version
    response = client_for(world.referrer).post(
        f"/referrals/{advised.pk}/actions/close_local/",
        action_post(advised, "close_local", outcome="", transfer_originally_considered="yes"),
    )
    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    _still_open(advised, version)


def test_avoided_without_a_transfer_considered_is_refused_and_changes_nothing(
    world: World,
) -> None:
    """The contradiction would drop the case from the reports' headline (avoided transfers
    count only those considered) without telling anyone."""
    referral = world.referral_in("advised")
    version = referral.version
    client = client_for(world.referrer)
    url = f"/referrals/{referral.pk}/actions/close_local/"

    refused = client.post(
        url,
        action_post(
            referral, "close_local", outcome="avoided", transfer_originally_considered="no"
        ),
    )

    assert refused.status_code == 409
    assert "only have been avoided if one was originally considered" in refused.content.decode()
    _still_open(referral, version)
    ticked = action_post(
        referral, "close_local", outcome="avoided", transfer_originally_considered="yes"
    )
    assert client.post(url, ticked).status_code == 303
    assert CloseOut.objects.get(referral=referral).outcome == "avoided"


def test_stale_version_shows_a_clear_message_and_changes_nothing(world: World) -> None:
    referral = world.submit()
    stale_version = referral.version
    # Someone else accepts meanwhile (through the service).
    services.referral_transition(actor=world.consultant, referral_id=referral.pk, action="accept")
    response = client_for(world.consultant).post(
        f"/referrals/{referral.pk}/actions/decline/",
        action_post(referral, "decline", version=stale_version, reason_code="no_capacity"),
    )
    assert response.status_code == 409
    body = response.content.decode()
    assert "changed by someone else" in body and "reload the page" in body
    referral.refresh_from_db()
    assert referral.state == "accepted" and referral.version == stale_version + 1
    # The page shows the current state and its actions.
    assert 'id="action-advise"' in body


def test_form_errors_change_nothing(world: World) -> None:
    referral = world.act(world.submit(), "accept")
    response = client_for(world.consultant).post(
        f"/referrals/{referral.pk}/actions/advise/",
        action_post(referral, "advise", disposition="nonsense", text=""),
    )
    assert response.status_code == 400
    body = response.content.decode()
    assert "nothing was changed" in body
    assert "This field is required." in body and "Select a valid choice" in body
    referral.refresh_from_db()
    assert referral.state == "accepted"
    assert not ConsultNote.objects.exists()


def test_bad_expected_version_is_a_form_error_not_a_500(world: World) -> None:
    referral = world.submit()
    response = client_for(world.consultant).post(
        f"/referrals/{referral.pk}/actions/accept/", {"accept-expected_version": "x"}
    )
    assert response.status_code == 400
    assert "The form was damaged" in response.content.decode()
    assert Referral.objects.get(pk=referral.pk).state == "submitted"


def test_application_errors_are_shown_and_change_nothing(world: World) -> None:
    referral = world.act(world.submit(), "accept")
    client = client_for(world.consultant)
    past = (timezone.now() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    response = client.post(
        f"/referrals/{referral.pk}/actions/schedule/",
        action_post(
            referral,
            "schedule",
            scheduled_at=past,
            experts=[world.consultant.pk],
            video_url="https://meet.example.org/x",
        ),
    )
    assert response.status_code == 409
    assert "must be scheduled in the future" in response.content.decode()
    referral.refresh_from_db()
    assert referral.state == "accepted" and referral.conference_at is None

    # The wrong side: the referrer cannot accept (403, with the service's message).
    submitted = world.submit()
    response = client_for(world.referrer).post(
        f"/referrals/{submitted.pk}/actions/accept/", action_post(submitted, "accept")
    )
    assert response.status_code == 403
    assert "Only the assigned department may accept" in response.content.decode()
    # Not allowed from the state; unknown and system actions.
    response = client.post(
        f"/referrals/{referral.pk}/actions/accept/", action_post(referral, "accept")
    )
    assert response.status_code == 409 and "Cannot accept" in response.content.decode()
    assert client.post(f"/referrals/{referral.pk}/actions/nope/", {}).status_code == 404
    assert client.post(f"/referrals/{referral.pk}/actions/expire/", {}).status_code == 404
    # The address bar after a refused action (a GET of the action's URL): the case's page.
    address_bar = client.get(f"/referrals/{referral.pk}/actions/accept/")
    assert address_bar.status_code == 303
    assert address_bar["Location"] == f"/referrals/{referral.pk}/"
    assert client.get(f"/referrals/{referral.pk}/messages/")["Location"].startswith(
        f"/referrals/{referral.pk}/"
    )


def test_schedule_in_the_future_with_experts(world: World) -> None:
    referral = world.act(world.submit(), "accept")
    future = (timezone.now() + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    response = client_for(world.consultant).post(
        f"/referrals/{referral.pk}/actions/schedule/",
        action_post(
            referral,
            "schedule",
            scheduled_at=future,
            experts=[world.consultant.pk, world.consultant2.pk],
            video_url="https://meet.example.org/x",
        ),
    )
    assert response.status_code == 303
    referral.refresh_from_db()
    assert referral.state == "scheduled"
    assert set(referral.conference_experts.values_list("pk", flat=True)) == {
        world.consultant.pk,
        world.consultant2.pk,
    }


def test_the_conference_row_says_whether_it_was_held(world: World) -> None:
    """The planned time and its video link read the same after the conference as before
    it: the row now says planned / in progress / held / planned, not held."""
    client = client_for(world.consultant)

    def row(referral: Referral) -> str:
        page = client.get(f"/referrals/{referral.pk}/").content.decode()
        start = page.index('<th scope="row">Conference</th>')
        return page[start : page.index("</tr>", start)]

    held = world.act(world.act(world.submit(), "accept"), "schedule")
    Referral.objects.filter(pk=held.pk).update(conference_url="https://meet.example.org/x")
    assert "(planned)" in row(held) and "video link" in row(held)
    held = world.act(held, "start_conference")
    assert "(in progress)" in row(held) and "video link" in row(held)
    held = world.act(held, "finish_conference")
    assert "(held)" in row(held) and "video link" not in row(held)

    dropped = world.act(world.act(world.act(world.submit(), "accept"), "schedule"), "cancel")
    assert "(planned, not held)" in row(dropped)
    assert "Conference" not in client.get(f"/referrals/{world.submit().pk}/").content.decode()


def test_forward_moves_the_case_out_of_scope(world: World) -> None:
    referral = world.submit()
    response = client_for(world.consultant).post(
        f"/referrals/{referral.pk}/actions/forward/",
        action_post(referral, "forward", department=world.hub2_paeds.pk, reason="closer"),
    )
    assert response.status_code == 303 and response["Location"] == "/referrals/worklist/"
    referral.refresh_from_db()
    assert referral.assigned_department == world.hub2_paeds
    assert client_for(world.consultant).get(f"/referrals/{referral.pk}/").status_code == 404


def test_messages(world: World) -> None:
    referral = world.submit()
    client = client_for(world.referrer)
    response = client.post(f"/referrals/{referral.pk}/messages/", {"text": "X-ray attached."})
    assert response.status_code == 303
    assert Message.objects.get(referral=referral).text == "X-ray attached."
    assert client.post(f"/referrals/{referral.pk}/messages/", {"text": " "}).status_code == 400
    nul = client.post(f"/referrals/{referral.pk}/messages/", {"text": "a\x00b"})
    assert nul.status_code == 400  # found by tests/test_api_fuzz.py (it was a 500)
    assert b"NUL" in nul.content
    outsider = client_for(world.foreign_referrer)
    assert outsider.post(f"/referrals/{referral.pk}/messages/", {"text": "hi"}).status_code == 404
    assert Message.objects.count() == 1


def test_a_refused_message_keeps_what_was_typed(world: World) -> None:
    referral = world.submit()
    text = "x" * (services.MAX_TEXT + 1)

    response = client_for(world.referrer).post(
        f"/referrals/{referral.pk}/messages/", {"text": text}
    )

    assert response.status_code == 400
    assert f">{text}</textarea>" in response.content.decode()
    assert not referral.messages.exists()


def _message_key(page: str) -> str:
    return page.split('name="client_key" value="')[1].split('"')[0]


def test_a_message_form_posted_twice_sends_one_message(world: World) -> None:
    """A double click or a reload that re-posts the form: the second post finds the first
    message; the next form shown carries a new key, so a new message is sent."""
    referral = world.submit()
    client = client_for(world.referrer)
    key = _message_key(client.get(f"/referrals/{referral.pk}/").content.decode())
    form = {"text": "X-ray attached.", "client_key": key}

    first = client.post(f"/referrals/{referral.pk}/messages/", form, follow=True)
    second = client.post(f"/referrals/{referral.pk}/messages/", form, follow=True)

    assert first.status_code == second.status_code == 200
    assert "Message sent." in first.content.decode()
    assert "already sent; it was not sent again" in second.content.decode()
    assert list(referral.messages.values_list("text", flat=True)) == ["X-ray attached."]
    assert AuditEntry.objects.filter(object_type="message").count() == 1
    next_key = _message_key(second.content.decode())
    assert next_key != key
    client.post(
        f"/referrals/{referral.pk}/messages/",
        {"text": "X-ray attached.", "client_key": next_key, "send_again": "1"},
    )
    assert referral.messages.count() == 2
    # The key is the author's own: the other side's message with the same key is its own.
    other = client_for(world.consultant)
    assert (
        other.post(
            f"/referrals/{referral.pk}/messages/", {"text": "Seen.", "client_key": key}
        ).status_code
        == 303
    )
    assert referral.messages.count() == 3


def test_the_same_message_sent_again_from_a_page_shown_again_is_held_back(
    world: World,
) -> None:
    """The back button after sending shows the page again (a new key) and the browser
    restores the text typed: sending it posted the same message a second time (found in a
    browser walk)."""
    referral = world.submit()
    client = client_for(world.referrer)
    url = f"/referrals/{referral.pk}/"
    sent = {"text": "Cân nặng 12 kg.", "client_key": _message_key(client.get(url).content.decode())}
    client.post(f"{url}messages/", sent)
    shown_again = {**sent, "client_key": _message_key(client.get(url).content.decode())}

    held = client.post(f"{url}messages/", {**shown_again, "text": " Cân nặng 12 kg. "})

    assert held.status_code == 409
    page = held.content.decode()
    assert "You sent this same message" in page and "it was not sent again" in page
    assert "> Cân nặng 12 kg. </textarea>" in page and 'name="send_again"' in page
    assert list(referral.messages.values_list("text", flat=True)) == ["Cân nặng 12 kg."]
    # Once the other side answered, the same text is a new message; so is a ticked box.
    services.referral_message_post(actor=world.consultant, referral_id=referral.pk, text="?")
    assert client.post(f"{url}messages/", shown_again).status_code == 303
    again = {**shown_again, "client_key": _message_key(client.get(url).content.decode())}
    assert client.post(f"{url}messages/", {**again, "send_again": "1"}).status_code == 303
    assert referral.messages.count() == 4


def test_schedule_form_explains_its_fields_to_people(world: World) -> None:
    referral = world.referral_in("accepted")
    page = client_for(world.consultant).get(f"/referrals/{referral.pk}/").content.decode()
    form = page.split('id="action-schedule"')[1].split("</form>")[0]
    assert "In UTC, and in the future." in form and "hold Ctrl" in form
    assert "ISO 8601" not in form and "user ids" not in form


def test_a_message_form_used_again_for_another_text_loses_nothing(world: World) -> None:
    """The back button restores a page whose key already sent a message; a new text sent
    from it was answered "already sent" and dropped (found by a review)."""
    referral = world.submit()
    client = client_for(world.referrer)
    key = _message_key(client.get(f"/referrals/{referral.pk}/").content.decode())
    client.post(f"/referrals/{referral.pk}/messages/", {"text": "Weight 14 kg.", "client_key": key})

    again = client.post(
        f"/referrals/{referral.pk}/messages/", {"text": "Now febrile.", "client_key": key}
    )

    assert again.status_code == 409
    page = again.content.decode()
    assert ">Now febrile.</textarea>" in page and "was not sent" in page
    fresh = _message_key(page)
    assert fresh != key
    assert list(referral.messages.values_list("text", flat=True)) == ["Weight 14 kg."]
    client.post(
        f"/referrals/{referral.pk}/messages/", {"text": "Now febrile.", "client_key": fresh}
    )
    assert list(referral.messages.values_list("text", flat=True)) == [
        "Weight 14 kg.",
        "Now febrile.",
    ]


def test_a_refused_message_keeps_its_key(world: World) -> None:
    referral = world.submit()
    client = client_for(world.referrer)
    response = client.post(
        f"/referrals/{referral.pk}/messages/", {"text": " ", "client_key": "k-1"}
    )
    assert response.status_code == 400
    assert _message_key(response.content.decode()) == "k-1"
    assert not referral.messages.exists()
    too_long = client.post(
        f"/referrals/{referral.pk}/messages/", {"text": "hi", "client_key": "k" * 65}
    )
    assert too_long.status_code == 400 and not referral.messages.exists()
    assert len(_message_key(too_long.content.decode())) == 32  # a fresh one: the page works


def test_a_message_key_with_a_nul_is_refused_with_a_fresh_key(world: World) -> None:
    """Found by fuzzing the web forms: a key holding NUL reached PostgreSQL's lookup of
    the key (a 500). Refused like a key too long: nothing sent, what was typed kept, and
    a fresh key so the page works."""
    referral = world.submit()
    client = client_for(world.referrer)

    response = client.post(
        f"/referrals/{referral.pk}/messages/", {"text": "Weight 14 kg.", "client_key": "k\x00"}
    )

    assert response.status_code == 400
    page = response.content.decode()
    assert ">Weight 14 kg.</textarea>" in page
    assert len(_message_key(page)) == 32
    assert not referral.messages.exists()
    assert not OutboxMessage.objects.filter(resource_type="Communication").exists()


def test_an_action_with_no_department_to_choose_is_not_offered(world: World) -> None:
    """A counter-referral goes to a department of the requesting hospital: one without
    departments gets no form that can only fail."""
    referral = world.referral_in("advised")
    client = client_for(world.consultant)
    Department.objects.filter(facility_id=referral.requester_facility_id).delete()

    page = client.get(f"/referrals/{referral.pk}/").content.decode()

    assert 'id="action-advise"' not in page  # (already advised)
    assert 'id="action-counter_refer"' not in page


def test_consult_modes_are_labelled_as_modes_and_admin_only_for_staff(world: World) -> None:
    referral = world.referral_in("advised")  # from the district, which has a paediatrics ward
    page = client_for(world.consultant).get(f"/referrals/{referral.pk}/").content.decode()

    assert 'id="action-counter_refer"' in page
    mode = page.split('name="counter_refer-mode"')[1].split("</select>")[0]
    assert "Transfer the patient" not in mode and ">Transfer</option>" in mode
    assert 'href="/admin/"' not in page
    world.consultant.is_staff = True
    world.consultant.save()
    assert 'href="/admin/"' in client_for(world.consultant).get("/").content.decode()


# --- cross-border clinicians' findings: nothing typed is lost, nothing misleads ------------


def test_a_draft_takes_no_message_and_is_submitted_afterwards(world: World) -> None:
    """A message on a draft was queued to the department it names before the case was
    sent, and then its submit could never be published (a 500 in the web UI)."""
    draft = world.submit(draft=True)
    client = client_for(world.referrer)
    page = client.get(f"/referrals/{draft.pk}/").content.decode()
    assert 'id="message-form"' not in page
    assert "Draft created (UTC)" in page
    refused = client.post(
        f"/referrals/{draft.pk}/messages/", {"text": "Weight 12 kg.", "client_key": "k1"}
    )
    assert refused.status_code == 409
    body = refused.content.decode()
    assert "submit it first" in body and "Weight 12 kg." in body  # the text kept to copy
    assert not Message.objects.exists()
    assert not OutboxMessage.objects.filter(resource_type="Communication").exists()
    sent = client.post(f"/referrals/{draft.pk}/actions/submit/", action_post(draft, "submit"))
    assert sent.status_code == 303
    assert Referral.objects.get(pk=draft.pk).state == "submitted"


def test_a_message_refused_by_the_state_keeps_its_text(world: World) -> None:
    referral = world.submit()
    world.act(referral, "cancel")
    response = client_for(world.referrer).post(
        f"/referrals/{referral.pk}/messages/", {"text": "A long note typed meanwhile."}
    )
    assert response.status_code == 409
    body = response.content.decode()
    assert 'id="message-unsent"' in body and "A long note typed meanwhile." in body
    assert not Message.objects.exists()


def test_an_action_on_a_case_a_colleague_forwarded_away_keeps_what_was_typed(
    world: World,
) -> None:
    referral = world.submit()
    version = referral.version
    world.act(referral, "forward")  # to hub2: the hub's consultant no longer sees it
    response = client_for(world.consultant).post(
        f"/referrals/{referral.pk}/actions/decline/",
        action_post(
            Referral(version=version),
            "decline",
            reason_code="no_capacity",
            reason="Our ward is full until Monday.",
        ),
    )
    assert response.status_code == 404
    body = response.content.decode()
    assert "Nothing was changed" in body and "Our ward is full until Monday." in body
    assert ">Reason</label>" in body and "Expected version" not in body
    assert "Hub" not in body and str(referral.filler_id) not in body  # nothing about the case
    referral.refresh_from_db()
    assert (referral.state, referral.assigned_department_id) == ("submitted", world.hub2_paeds.pk)
    # An id that never existed answers the same
    unknown = client_for(world.consultant).post(
        "/referrals/987654/actions/accept/", {"accept-expected_version": "1"}
    )
    assert unknown.status_code == 404


def test_an_action_refused_by_its_guard_keeps_the_typed_form(world: World) -> None:
    referral = world.act(world.submit(), "accept")
    past = (timezone.now() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    response = client_for(world.consultant).post(
        f"/referrals/{referral.pk}/actions/schedule/",
        action_post(
            referral,
            "schedule",
            scheduled_at=past,
            experts=[world.consultant2.pk],
            video_url="https://meet.example.org/room-7",
        ),
    )
    assert response.status_code == 409
    body = response.content.decode()
    assert 'value="https://meet.example.org/room-7"' in body
    assert f'value="{past}"' in body
    assert Referral.objects.get(pk=referral.pk).conference_at is None


def test_a_second_click_on_the_same_action_is_already_done_not_someone_else(
    world: World,
) -> None:
    referral = world.submit()
    client = client_for(world.consultant)
    url = f"/referrals/{referral.pk}/actions/accept/"
    assert client.post(url, action_post(referral, "accept")).status_code == 303
    again = client.post(url, action_post(referral, "accept"), follow=True)
    body = again.content.decode()
    assert "already done (your first click)" in body and "someone else" not in body
    assert Referral.objects.get(pk=referral.pk).version == referral.version + 1
    # A colleague's accept since the page was shown is still "someone else"
    colleague = _user("consultant-b", Role.CONSULTANT, world.hub, world.hub_paeds)
    other = world.submit()
    services.referral_transition(actor=colleague, referral_id=other.pk, action="accept")
    response = client.post(f"/referrals/{other.pk}/actions/accept/", action_post(other, "accept"))
    assert response.status_code == 409 and "someone else" in response.content.decode()


def test_messages_are_shown_with_their_numbers(world: World) -> None:
    referral = world.act(world.submit(), "accept")
    first, _c = services.referral_message_post(
        actor=world.referrer, referral_id=referral.pk, text="First."
    )[1:]
    services.referral_message_post(
        actor=world.consultant,
        referral_id=referral.pk,
        text="Answer.",
        in_response_to_id=first.pk,
    )
    body = client_for(world.referrer).get(f"/referrals/{referral.pk}/").content.decode()
    assert "Message 1 ·" in body and "Message 2 ·" in body
    assert f'in reply to <a href="#message-{first.pk}">message 1</a>' in body


def test_a_write_refused_by_a_constraint_is_a_409_page_not_a_500(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the API answers it (a draft whose message had been queued before this release
    could not be published at submit: a 500 here)."""
    from django.db import IntegrityError

    draft = world.submit(draft=True)

    def refused(**_kwargs: Any) -> Referral:
        raise IntegrityError("duplicate key value violates unique constraint")

    monkeypatch.setattr(services, "referral_transition", refused)
    response = client_for(world.referrer).post(
        f"/referrals/{draft.pk}/actions/submit/", action_post(draft, "submit")
    )
    assert response.status_code == 409
    assert "nothing was changed" in response.content.decode()
    assert Referral.objects.get(pk=draft.pk).state == "draft"


def test_a_submit_no_department_can_take_says_why_and_until_when(world: World) -> None:
    """The intake form warned; the draft's submit said "Submit: done." (clinician)."""
    for department in (world.hub_paeds, world.hub2_paeds):
        department.accepting = False
        department.save()
    draft = world.submit(draft=True, department=None)
    client = client_for(world.referrer)
    response = client.post(
        f"/referrals/{draft.pk}/actions/submit/", action_post(draft, "submit"), follow=True
    )
    body = response.content.decode()
    sent = Referral.objects.get(pk=draft.pk)
    assert (sent.state, sent.assigned_department_id) == ("submitted", None)
    assert "no department can take it yet" in body and "Submit: done." not in body
    assert f"{sent.deadline:%Y-%m-%d %H:%M} UTC" in body


def test_the_new_referral_form_may_name_a_department(world: World) -> None:
    """Only the API could choose one: in the web the island doctor's case always went
    where routing sent it (the demo's loop to the children's hospital needed the API)."""
    routing.routing_cache_clear()
    client = client_for(world.referrer)
    body = client.get("/referrals/new/").content.decode()
    assert '<optgroup label="Pediatric specialty">' in body
    for department in (world.hub_paeds, world.hub2_paeds):
        assert f'<option value="{department.pk}">{department.name} — ' in body
    assert f"{world.district_paeds.name} — " not in body  # its own: never

    routed = client.post("/referrals/new/", new_referral_form(world))
    default = Referral.objects.get().assigned_department
    chosen = world.hub2_paeds if default == world.hub_paeds else world.hub_paeds
    response = client.post(
        "/referrals/new/",
        new_referral_form(world, department=chosen.pk, clinical_question="Rash since Monday."),
    )

    assert routed.status_code == response.status_code == 303
    assert Referral.objects.order_by("-pk").first().assigned_department == chosen  # type: ignore[union-attr]


def test_the_form_offers_the_facilitys_own_hubs_beyond_the_best_few(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's island doctor did not find the children's hospital (its support-link hub)
    among routing's best five paediatrics departments: nearer ones came first. With none
    of the best few offered, the linked hub still is."""
    from registry.models import SupportLink

    SupportLink.objects.create(hub=world.hub2, spoke=world.district)
    routing.routing_cache_clear()
    monkeypatch.setattr("referrals.web.INTAKE_CHOICES_PER_SPECIALTY", 0)

    offered = routing.intake_choices(world.district.pk, per_specialty=0)[world.paeds.pk]
    body = client_for(world.referrer).get("/referrals/new/").content.decode()

    assert [s.department_id for s in offered] == [world.hub2_paeds.pk]
    assert f'<option value="{world.hub2_paeds.pk}">{world.hub2_paeds.name} — ' in body
    assert f"{world.hub_paeds.name} — " not in body


def test_a_chosen_department_of_another_specialty_is_a_field_error(world: World) -> None:
    derm = Specialty.objects.create(code="394582007", display="Dermatology")
    hub_derm = Department.objects.create(facility=world.hub, specialty=derm, name="Derm C1")
    routing.routing_cache_clear()
    response = client_for(world.referrer).post(
        "/referrals/new/", new_referral_form(world, department=hub_derm.pk)
    )
    assert response.status_code == 400
    assert "That department is not of the chosen specialty." in response.content.decode()
    assert not Referral.objects.exists()


def test_the_original_links_its_counter_referrals_for_those_who_may_open_them(
    world: World,
) -> None:
    """The timeline named the counter-referral's event but nothing led to it (clinician)."""
    referral = world.referral_in("advised")
    world.act(referral, "counter_refer")
    back = Referral.objects.get(parent_referral=referral)

    page = client_for(world.consultant).get(f"/referrals/{referral.pk}/").content.decode()
    assert f'<a href="/referrals/{back.pk}/">{back.filler_id}</a>' in page
    # The original's referrer may not open it (it is the district ward's): no link to a 404
    referrer = client_for(world.referrer)
    assert referrer.get(f"/referrals/{back.pk}/").status_code == 404
    assert (
        f'href="/referrals/{back.pk}/"'
        not in referrer.get(f"/referrals/{referral.pk}/").content.decode()
    )


def test_a_counter_referral_links_the_case_it_answers_only_for_who_may_open_it(
    world: World,
) -> None:
    """ "Answers referral #id" linked to a 404 for a user who sees the counter-referral (its
    department's) but not the original (another facility's case)."""
    referral = world.referral_in("advised")
    world.act(referral, "counter_refer")
    back = Referral.objects.get(parent_referral=referral)
    # Staff of the receiving department whose account belongs to another facility.
    outsider = _user("district-locum", Role.CONSULTANT, world.hub2, world.district_paeds)
    assert client_for(outsider).get(f"/referrals/{referral.pk}/").status_code == 404

    page = client_for(outsider).get(f"/referrals/{back.pk}/").content.decode()

    assert f'href="/referrals/{referral.pk}/"' not in page
    assert f"#{referral.pk} (not shared with you)" in page
    # Who may open it still gets the link.
    consultant_page = client_for(world.consultant).get(f"/referrals/{back.pk}/").content.decode()
    assert f'<a href="/referrals/{referral.pk}/">#{referral.pk}</a>' in consultant_page


def test_the_timeline_shows_a_declines_reason_code_beside_its_note(world: World) -> None:
    """The code the consultant chose (what the requester most needs to know) was kept in
    the event but the timeline showed only the free-text note."""
    referral = world.submit()
    world.act(referral, "decline")  # reason_code no_capacity, note "full today"

    page = client_for(world.referrer).get(f"/referrals/{referral.pk}/").content.decode()

    row = page.split('<tr data-action="decline">', 1)[1].split("</tr>", 1)[0]
    assert "No capacity — full today" in row


def test_the_answer_form_shows_the_question_it_answers(world: World) -> None:
    """The consultant's question was shown only among the messages, not where the
    requester answers it."""
    referral = world.act(world.act(world.submit(), "accept"), "request_info")

    page = client_for(world.referrer).get(f"/referrals/{referral.pk}/").content.decode()

    form = page.split('id="action-provide_info"', 1)[1].split("</form>", 1)[0]
    assert '<blockquote id="open-question">Latest blood count?</blockquote>' in form
    # The consultant, who asked it, has no answer form.
    other = client_for(world.consultant).get(f"/referrals/{referral.pk}/").content.decode()
    assert 'id="open-question"' not in other
