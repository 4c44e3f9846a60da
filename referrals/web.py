"""Server-rendered pages for clinicians (session login, plain forms, no JavaScript).

Thin like ``apis.py``: parse a form, call one service or selector, render. Every referral
is loaded through ``selectors.referral_get_for_user`` (404 outside one's scope, always
404 for ministry officials); every state change goes through ``services.referral_submit``
or ``services.referral_transition``. The action forms are generated from
``workflow.TRANSITIONS``, so a new input in the table appears here without a template
change.

The department choices of an action form are read here: the forward form lists routing's
candidates (``routing.forward_candidates``, the forward guard's rules, best first); the
counter-referral form the requesting facility's accepting departments.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Page, Paginator
from django.db import IntegrityError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from accounts.models import User
from accounts.roles import Role
from core.errors import ApplicationError, Conflict, NotFound
from referrals import selectors, services
from referrals.audit import audit_record
from referrals.models import (
    MIN_BIRTH_YEAR,
    AuditAction,
    CloseOutOutcome,
    DeclineReason,
    Disposition,
    PatientSex,
    Priority,
    Referral,
    ReferralState,
    latest_birth_year,
)
from referrals.routing import forward_candidates, intake_choices
from referrals.workflow import TERMINAL_STATES, TRANSITIONS_BY_ACTION, InputField, Transition
from registry.models import ConsultMode, Department, Specialty

WEB_PLACER_SYSTEM = "urn:consilium:web"
PAGE_SIZE = 50
# A select longer than this is unusable; the API takes any id.
MAX_CHOICES = 300
# The new-referral form offers routing's best few departments per specialty.
INTAKE_CHOICES_PER_SPECIALTY = 5
MAX_TEXT = services.MAX_TEXT
logger = logging.getLogger(__name__)

STALE_MESSAGE = (
    "This referral was changed by someone else after you opened it (it is now at version "
    "{version}, you had {expected}). Nothing was changed: reload the page, check the "
    "current state, and try again."
)
# Labels for the choice inputs of the table (the table keeps only the values).
CHOICE_LABELS: dict[str, str] = {
    **dict(DeclineReason.choices),
    **dict(Disposition.choices),
    **dict(CloseOutOutcome.choices),
}
FIELD_LABELS: dict[str, str] = {
    "reason_code": "Reason",
    "note": "Note",
    "department": "Department",
    "reason": "Reason",
    "question": "Question to the requester",
    "text": "Text",
    "scheduled_at": "Conference date and time (UTC)",
    "experts": "Experts invited",
    "video_url": "Video link",
    "minutes": "Conference minutes",
    "disposition": "Disposition",
    "transfer_originally_considered": "A transfer was originally considered for this patient",
    "outcome": "Close-out: is a transfer / face-to-face referral now avoided?",
    "clinical_question": "Clinical question",
}

# Help for people, where the workflow's help is written for API clients (ISO 8601, ids).
FIELD_HELP: dict[str, str] = {
    "scheduled_at": "In UTC, and in the future.",
    "experts": "Consultants of this specialty to invite; hold Ctrl (⌘ on a Mac) to choose several.",
    "video_url": "The link the participants open to join, e.g. https://meet.example.org/…",
}
ACTION_LABELS: dict[str, str] = {
    "accept": "Accept",
    "decline": "Decline",
    "forward": "Forward to another department",
    "cancel": "Cancel the referral",
    "request_info": "Ask for more information",
    "provide_info": "Provide the information asked",
    "schedule": "Schedule a live conference",
    "start_conference": "Start the conference",
    "finish_conference": "Finish the conference with a consult note",
    "advise": "Advise (consult note)",
    "close_local": "Close locally (answer the close-out)",
    "request_transfer": "Request a transfer",
    "accept_transfer": "Accept the transfer",
    "depart": "Patient departed",
    "arrive": "Patient arrived",
    "complete": "Complete",
    "counter_refer": "Refer back down (counter-referral)",
}


def _user(request: HttpRequest) -> User:
    user = request.user
    assert isinstance(user, User)
    return user


def _sees_referrals(user: User) -> bool:
    return user.is_active and not user.has_role(Role.MINISTRY)


def _may_submit(user: User) -> bool:
    return user.facility_id is not None and user.has_role(Role.REFERRER) and _sees_referrals(user)


def action_label(action: str) -> str:
    return ACTION_LABELS.get(action, action.replace("_", " ").capitalize())


def login_required_keeping_typed(
    back_to: Callable[..., str],
) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """``login_required`` for a page that takes a form: a post from a browser whose session
    ended meanwhile (timed out, logged out in another tab) is not sent through the login
    page (which would drop the post and then show the page as if nothing had happened) but
    answered "nothing was changed", with what was typed to copy and a link to log in again
    and come back to ``back_to(**kwargs)``. Nothing about any referral is looked up."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        guarded = login_required(view)

        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method == "POST" and not request.user.is_authenticated:
                login = f"{settings.LOGIN_URL}?{urlencode({'next': back_to(**kwargs)}, safe='/')}"
                context = {"typed": _typed(request.POST), "login_url": login}
                return render(request, "referrals/session_ended.html", context, status=403)
            return guarded(request, *args, **kwargs)

        return wrapper

    return decorator


# --- the new-referral form -------------------------------------------------------------------


class ReferralNewForm(forms.Form):
    # Generated when the form is shown: submitting the same form twice (double click, back
    # button, a retry on a bad connection) finds the first referral (idempotent intake).
    placer_value = forms.UUIDField(widget=forms.HiddenInput)
    specialty = forms.ModelChoiceField(
        queryset=Specialty.objects.order_by("display"), empty_label="Choose a specialty"
    )
    mode = forms.ChoiceField(choices=ConsultMode.choices, initial=ConsultMode.ASYNC)
    priority = forms.TypedChoiceField(
        choices=Priority.choices, coerce=int, initial=Priority.ROUTINE
    )
    clinical_question = forms.CharField(
        max_length=MAX_TEXT, widget=forms.Textarea(attrs={"rows": 6, "cols": 70})
    )
    patient_ref = forms.CharField(
        label="Patient reference (pseudonymous)",
        max_length=128,
        required=False,
        help_text="An identifier only your hospital can resolve; never a name. Leave it "
        "empty to send a de-identified case.",
    )
    patient_sex = forms.ChoiceField(
        label="Patient sex", choices=PatientSex.choices, initial=PatientSex.UNKNOWN
    )
    patient_birth_year = forms.IntegerField(
        label="Patient birth year", min_value=MIN_BIRTH_YEAR, max_value=2100, required=False
    )
    # A select of routing's candidates, validated as "a department of this specialty" only:
    # the submit judges the real case, so a list that moved since the page was shown (or a
    # mode the list was not built for) refuses nothing the intake would take.
    department = forms.IntegerField(
        label="Department (optional)",
        min_value=1,
        max_value=2**63 - 1,
        required=False,
        widget=forms.Select,
        help_text="Leave it to routing, or choose a department of the specialty above "
        "(routing's best candidates for your facility).",
    )
    # Shown when the same question was just sent: the user confirms a second referral.
    send_again = forms.BooleanField(
        label="Yes, send it as a new referral", required=False, widget=forms.CheckboxInput
    )

    def __init__(self, *args: Any, facility_id: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        widget = self.fields["department"].widget
        assert isinstance(widget, forms.Select)
        widget.choices = [("", "Let routing choose"), *intake_department_choices(facility_id)]

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean() or {}
        chosen, specialty = data.get("department"), data.get("specialty")
        if (
            chosen is not None
            and specialty is not None
            and not Department.objects.filter(pk=chosen, specialty=specialty).exists()
        ):
            self.add_error("department", "That department is not of the chosen specialty.")
        return data

    def clean_clinical_question(self) -> str:
        value = str(self.cleaned_data["clinical_question"]).strip()
        if not value:
            raise forms.ValidationError("A clinical question is required.")
        return value

    def clean_patient_birth_year(self) -> int | None:
        value: int | None = self.cleaned_data.get("patient_birth_year")
        if value is not None and value > latest_birth_year():
            raise forms.ValidationError("The birth year cannot be in the future.")
        return value


def intake_department_choices(facility_id: int) -> list[tuple[str, list[tuple[int, str]]]]:
    """The new-referral form's departments, grouped by specialty: routing's best
    candidates for the facility (``routing.intake_choices``)."""
    found = intake_choices(facility_id, per_specialty=INTAKE_CHOICES_PER_SPECIALTY)
    names = dict(Specialty.objects.filter(pk__in=found).values_list("pk", "display"))
    return [
        (
            names[specialty_id],
            [(s.department_id, f"{s.department_name} — {s.facility_name}") for s in best],
        )
        for specialty_id, best in sorted(found.items(), key=lambda item: names[item[0]])
    ]


@login_required_keeping_typed(lambda: reverse("web-referral-new"))
@require_http_methods(["GET", "POST"])
def referral_new(request: HttpRequest) -> HttpResponse:
    user = _user(request)
    if not _sees_referrals(user):
        raise Http404("No such page.")
    if not _may_submit(user):
        return render(
            request,
            "referrals/forbidden.html",
            {"reason": "Only referring clinicians of a facility can submit referrals."},
            status=403,
        )
    assert user.facility_id is not None  # _may_submit
    facility_id = user.facility_id
    if request.method == "GET":
        form = ReferralNewForm(initial={"placer_value": uuid.uuid4()}, facility_id=facility_id)
        return render(request, "referrals/new.html", {"form": form})
    form = ReferralNewForm(request.POST, facility_id=facility_id)
    if not form.is_valid():
        if "placer_value" in form.errors:
            # A damaged hidden token: a fresh one, so the corrected form can be sent.
            repaired = request.POST.copy()
            repaired["placer_value"] = str(uuid.uuid4())
            form = ReferralNewForm(repaired, facility_id=facility_id)
            form.is_valid()
            form.add_error(None, "The form was damaged (no valid submission identifier).")
        return render(request, "referrals/new.html", {"form": form}, status=400)
    data: dict[str, Any] = form.cleaned_data
    assert user.facility is not None
    earlier = (
        None
        if data["send_again"]
        else selectors.referral_recent_duplicate(
            user,
            specialty_id=data["specialty"].pk,
            clinical_question=data["clinical_question"],
            patient_ref=data["patient_ref"],
        )
    )
    if earlier is not None and earlier.placer_value != str(data["placer_value"]):
        # The same case again under a new form (the back button re-renders the page with a
        # new submission id): held back until the user says it is a new referral.
        return render(
            request,
            "referrals/new.html",
            {"form": form, "duplicate_of": earlier},
            status=409,
        )
    try:
        referral, created = services.referral_submit(
            actor=user,
            requester_facility=user.facility,
            placer_system=WEB_PLACER_SYSTEM,
            placer_value=str(data["placer_value"]),
            specialty=data["specialty"],
            clinical_question=data["clinical_question"],
            mode=data["mode"],
            priority=data["priority"],
            patient_ref=data["patient_ref"],
            patient_sex=data["patient_sex"],
            patient_birth_year=data["patient_birth_year"],
            department=(
                Department.objects.get(pk=data["department"]) if data["department"] else None
            ),
        )
    except ApplicationError as exc:
        # A chosen department the case cannot go to (its mode, identifiable data): there.
        where = "department" if exc.code == "department_not_candidate" else None
        form.add_error(where, exc.message)
        return render(request, "referrals/new.html", {"form": form}, status=exc.status_code)
    audit_record(request, AuditAction.CREATE if created else AuditAction.READ, [referral.pk])
    if created:
        if referral.assigned_department_id is None:
            messages.warning(request, _unrouted_message(referral))
        else:
            messages.success(request, f"Referral {referral.filler_id} was submitted.")
    else:
        messages.info(request, f"This form was already submitted as {referral.filler_id}.")
    return HttpResponseRedirect(reverse("web-referral-detail", args=[referral.pk]), status=303)


def _unrouted_message(referral: Referral) -> str:
    """Why a submitted referral has no department, and what happens next."""
    assert referral.deadline is not None  # set at submit, department or not
    return (
        f"Referral {referral.filler_id} was submitted, but no department can take it yet: "
        "none of its specialty and mode accepts referrals from a higher tier or through a "
        "support link of your facility (across a border: with a data-sharing agreement). "
        "It is routed again every minute until its deadline "
        f"({referral.deadline:%Y-%m-%d %H:%M} UTC); if none can take it by then, it expires "
        "and you are told."
    )


# --- lists -------------------------------------------------------------------------------------


def _page(request: HttpRequest, queryset: Any) -> Page[Referral]:
    paginator = Paginator(queryset, PAGE_SIZE)
    page = paginator.get_page(request.GET.get("page"))
    # Same rule as the API: one audit row per referral shown, one INSERT per page.
    audit_record(request, AuditAction.READ, [r.pk for r in page.object_list])
    return page


def _state_param(request: HttpRequest) -> str | None:
    state = request.GET.get("state") or None
    return state if state in ReferralState.values else None


@login_required
def referral_outgoing_page(request: HttpRequest) -> HttpResponse:
    user = _user(request)
    if not _sees_referrals(user):
        raise Http404("No such page.")
    state = _state_param(request)
    page = _page(request, selectors.referral_outgoing(user, state=state))
    caption = "Outgoing referrals" + (f" in state {state}" if state else "")
    return render(
        request,
        "referrals/outgoing.html",
        {
            "page": page,
            "caption": caption,
            "query": urlencode({"state": state}) if state else "",
            "may_submit": _may_submit(user),
            "now": timezone.now(),
        },
    )


@login_required
def referral_worklist_page(request: HttpRequest) -> HttpResponse:
    user = _user(request)
    if not _sees_referrals(user):
        raise Http404("No such page.")
    raw = request.GET.get("department") or None
    department_id: int | None = None
    if raw is not None:
        try:
            department_id = int(raw)
        except ValueError as exc:
            raise Http404("No such department.") from exc
    try:
        queryset = selectors.referral_worklist(user, department_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc
    departments = list(
        user.departments.select_related("facility", "specialty").order_by("name", "id")
    )
    current = next((d for d in departments if d.pk == department_id), None)
    page = _page(request, queryset)
    return render(
        request,
        "referrals/worklist.html",
        {
            "page": page,
            "departments": departments,
            "department": current,
            "query": urlencode({"department": department_id}) if department_id else "",
            "now": timezone.now(),
        },
    )


# --- detail and actions ------------------------------------------------------------------------


def _department_label(department: Department) -> str:
    return f"{department.name} — {department.facility.name}"


def department_choices(referral: Referral, transition: Transition) -> list[tuple[str, str]]:
    """The departments offered for a department input.

    counter_refer: accepting departments of the original requesting facility. Otherwise
    (forward): routing's candidates for the referral's specialty, best first, those the
    forward guard would take (the guard still has the last word: the choices may be stale
    when the form is posted)."""
    if transition.action == "counter_refer":
        departments = Department.objects.filter(
            accepting=True, facility_id=referral.requester_facility_id
        ).select_related("facility")
        return [
            (str(d.pk), _department_label(d))
            for d in departments.order_by("name", "id")[:MAX_CHOICES]
        ]
    return [
        (str(s.department_id), f"{s.department_name} — {s.facility_name}")
        for s in forward_candidates(referral, limit=MAX_CHOICES)
    ]


def expert_choices(referral: Referral) -> list[tuple[str, str]]:
    """Consultants working in a department of the referral's specialty or of its
    department's (local read)."""
    users = (
        selectors.referral_expert_candidates(referral)
        .select_related("facility")
        .order_by("username")[:MAX_CHOICES]
    )
    return [
        (
            str(u.pk),
            f"{u.get_full_name() or u.username}{' — ' + u.facility.name if u.facility else ''}",
        )
        for u in users
    ]


# Choice labels per input where one value means different things in different inputs
# ("transfer": a consult mode, or the disposition "transfer the patient").
FIELD_CHOICE_LABELS: dict[str, dict[str, str]] = {"mode": dict(ConsultMode.choices)}


def _choice_label(value: str, field: str = "") -> str:
    labels = FIELD_CHOICE_LABELS.get(field, CHOICE_LABELS)
    return str(labels.get(value, value.replace("_", " ")))


def _form_field(spec: InputField, referral: Referral, transition: Transition) -> forms.Field:
    label = FIELD_LABELS.get(spec.name, spec.name.replace("_", " ").capitalize())
    help_text = FIELD_HELP.get(spec.name, spec.help)
    common: dict[str, Any] = {"label": label, "required": spec.required, "help_text": help_text}
    if spec.kind == "text":
        return forms.CharField(
            max_length=MAX_TEXT, widget=forms.Textarea(attrs={"rows": 4, "cols": 60}), **common
        )
    if spec.kind == "choice":
        choices = [(c, _choice_label(c, spec.name)) for c in spec.choices]
        # Nothing preselected: an untouched select would send its first option, an answer
        # (a close-out "avoided", a decline reason) nobody gave.
        empty = "Choose one" if spec.required else "—"
        return forms.ChoiceField(choices=[("", empty), *choices], **common)
    if spec.kind == "bool":
        if spec.required:
            # Yes or no, chosen: an unticked checkbox sent "no" for a user who never looked
            # at it (the close-out's "was a transfer originally considered?" is the
            # denominator of the reports' avoidance rate).
            return forms.TypedChoiceField(
                choices=[("", "Choose one"), ("yes", "Yes"), ("no", "No")],
                coerce=lambda value: value == "yes",
                empty_value=None,
                **common,
            )
        # An optional one: a checkbox, unticked = False.
        return forms.BooleanField(label=label, required=False, help_text=help_text)
    if spec.kind == "datetime":
        return forms.DateTimeField(
            widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
            input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"],
            **common,
        )
    if spec.kind == "department":
        return forms.TypedChoiceField(
            choices=[("", "Choose a department"), *department_choices(referral, transition)],
            coerce=int,
            **common,
        )
    if spec.kind == "users":
        return forms.TypedMultipleChoiceField(
            choices=expert_choices(referral), coerce=int, **common
        )
    if spec.kind == "url":
        return forms.URLField(max_length=500, assume_scheme="https", **common)
    raise ValueError(f"unknown input kind {spec.kind}")  # pragma: no cover


class ActionForm(forms.Form):
    expected_version = forms.IntegerField(widget=forms.HiddenInput, min_value=0)

    def __init__(
        self, *args: Any, referral: Referral, transition: Transition, **kwargs: Any
    ) -> None:
        kwargs.setdefault("prefix", transition.action)
        kwargs.setdefault("initial", {"expected_version": referral.version})
        super().__init__(*args, **kwargs)
        self.transition = transition
        self.action = transition.action
        self.label = action_label(transition.action)
        self.description = transition.description
        for spec in transition.inputs:
            self.fields[spec.name] = _form_field(spec, referral, transition)

    def inputs(self) -> dict[str, Any]:
        """The cleaned inputs for ``referral_transition`` (empty optional ones left out)."""
        data: dict[str, Any] = {}
        for spec in self.transition.inputs:
            value = self.cleaned_data.get(spec.name)
            if spec.kind == "bool":
                data[spec.name] = bool(value)
            elif value not in (None, "", []):
                data[spec.name] = value
        return data


def _open_question(referral: Referral) -> str | None:
    """The text of the question the requester is asked to answer (``provide_info``): it
    was shown only among the messages, away from the form."""
    question = selectors.referral_open_question_id(referral)
    found = [m.text for m in referral.messages.all() if m.pk == question]
    return found[0] if found else None


def _no_department_to_choose(form: ActionForm) -> bool:
    """An action that needs a department when none can be offered (a counter-referral to a
    hospital without departments, a forward with no candidate): not offered at all, rather
    than a form that can only fail."""
    field = form.fields.get("department")
    if field is None or not field.required:
        return False
    return not any(value for value, _label in getattr(field, "choices", []))


def _authors(referral: Referral) -> dict[int, User]:
    ids = {n.author_id for n in referral.consult_notes.all()} | {
        m.author_id for m in referral.messages.all()
    }
    ids.discard(None)
    if not ids:
        return {}
    return {u.pk: u for u in User.objects.filter(pk__in=ids)}


def _named(items: Iterable[Any], authors: dict[int, User]) -> list[dict[str, Any]]:
    return [{"item": item, "author": authors.get(item.author_id)} for item in items]


def _conference_status(referral: Referral, events: list[Any]) -> str:
    """What the referral's conference time is now: planned, in progress, held, or a plan
    the case left without holding it (cancelled, say); "" when none was planned."""
    if referral.conference_at is None:
        return ""
    if referral.state == ReferralState.SCHEDULED:
        return "planned"
    if referral.state == ReferralState.IN_CONFERENCE:
        return "in progress"
    if any(e.action == "finish_conference" for e in events):
        return "held"
    return "planned, not held"


def _render_detail(
    request: HttpRequest,
    user: User,
    referral: Referral,
    *,
    bound: ActionForm | None = None,
    error: str | None = None,
    status: int = 200,
    message_text: str = "",
    message_key: str = "",
    message_duplicate: bool = False,
) -> HttpResponse:
    forms_by_action = []
    offered = services.referral_available_actions(user, referral)
    for action in offered:
        if bound is not None and bound.action == action:
            forms_by_action.append(bound)
            continue
        form = ActionForm(referral=referral, transition=TRANSITIONS_BY_ACTION[action])
        if not _no_department_to_choose(form):
            forms_by_action.append(form)
    authors = _authors(referral)
    events = list(referral.events.all())
    for event in events:  # a decline's reason code beside its note (the note may be empty)
        code = (event.payload or {}).get("reason_code") if event.action == "decline" else None
        label = DeclineReason(code).label if code in DeclineReason.values else code
        event.shown_reason = " — ".join(str(p) for p in (label, event.reason) if p)  # type: ignore[attr-defined]
    context = {
        "referral": referral,
        "events": events,
        "conference": _conference_status(referral, events),
        "notes": _named(referral.consult_notes.all(), authors),
        "messages_": _named(referral.messages.all(), authors),
        "experts": list(referral.conference_experts.all()),
        "close_out": getattr(referral, "close_out", None),
        # Referred back down: the ones the user may open (the timeline only names them).
        "counter_referrals": list(
            selectors.referral_visible(user)
            .filter(parent_referral=referral)
            .order_by("pk")
            .values_list("pk", "filler_id")
        ),
        # The case this one answers, linked only for a user who may open it (else a 404).
        "parent_visible": referral.parent_referral_id is not None
        and selectors.referral_visible(user).filter(pk=referral.parent_referral_id).exists(),
        # What the answer replies to, shown above the form that answers it.
        "open_question": _open_question(referral) if "provide_info" in offered else None,
        "can_message": bool(services.actor_sides(user, referral))
        and referral.state not in TERMINAL_STATES
        and referral.state != ReferralState.DRAFT,
        "action_forms": forms_by_action,
        "error": error,
        "message_text": message_text,
        "message_duplicate": message_duplicate,
        # A refused form the case no longer offers (its state moved on): what was typed.
        "unsent": _typed(bound.data) if bound is not None and bound.action not in offered else [],
        # A new token per page shown; a refused message keeps its own (nothing was stored).
        "message_key": message_key or uuid.uuid4().hex,
        "now": timezone.now(),
    }
    audit_record(request, AuditAction.READ, [referral.pk])
    return render(request, "referrals/detail.html", context, status=status)


def _get(user: User, referral_id: int) -> Referral:
    try:
        return selectors.referral_get_for_user(user, referral_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc


# Posted fields that are no one's typing (hidden keys, the version the page showed).
_NOT_TYPED = frozenset(
    {"csrfmiddlewaretoken", "expected_version", "client_key", "placer_value", "send_again"}
)


def _typed(posted: Any) -> list[tuple[str, str]]:
    """What a user typed into a posted form, labelled, to show back instead of losing it."""
    typed = []
    for name in posted:
        field = name.rpartition("-")[2]  # action forms prefix their fields
        value = str(posted.get(name, ""))
        if field not in _NOT_TYPED and value.strip():
            typed.append((field.replace("_", " ").capitalize(), value))
    return typed


def _gone(request: HttpRequest) -> HttpResponse:
    """A post about a referral the user cannot see (any more: a colleague forwarded it
    while the page was open). 404 as for any unknown id (nothing about the referral is
    told), but what the user typed is shown back instead of lost."""
    return render(request, "referrals/gone.html", {"typed": _typed(request.POST)}, status=404)


def _get_or_gone(request: HttpRequest, user: User, pk: int) -> Referral | HttpResponse:
    """The referral a page posts about, or ``_gone`` when the user cannot see it (a GET
    of an unknown id is a plain 404)."""
    try:
        return selectors.referral_get_for_user(user, pk)
    except NotFound:
        if request.method == "POST":
            return _gone(request)
        raise Http404("No such referral.") from None


def _already_done(user: User, referral: Referral, action: str, expected: int) -> bool:
    """Whether every change since the version the form showed is this user's own
    ``action`` (a double click, or the form posted again): not "someone else". Only for
    actions that take no input: a second question, advice or time typed in another tab is
    not the first one again (review)."""
    if TRANSITIONS_BY_ACTION[action].inputs:
        return False
    since = list(
        referral.events.filter(seq__gt=expected).values_list("actor_id", "action").distinct()
    )
    return since == [(user.pk, action)]


@login_required
def referral_detail_page(request: HttpRequest, pk: int) -> HttpResponse:
    user = _user(request)
    return _render_detail(request, user, _get(user, pk))


@login_required_keeping_typed(lambda pk, **_: reverse("web-referral-detail", args=[pk]))
@require_http_methods(["GET", "POST"])
def referral_action(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    user = _user(request)
    referral = _get_or_gone(request, user, pk)
    if isinstance(referral, HttpResponse):
        return referral
    if request.method == "GET":  # the address bar after a refused action: the case's page
        return HttpResponseRedirect(reverse("web-referral-detail", args=[pk]), status=303)
    transition = TRANSITIONS_BY_ACTION.get(action)
    if transition is None or transition.side == "system":
        raise Http404("No such action.")
    form = ActionForm(request.POST, referral=referral, transition=transition)
    if not form.is_valid():
        error = "Please correct the errors below; nothing was changed."
        return _render_detail(request, user, referral, bound=form, error=error, status=400)
    expected: int = form.cleaned_data["expected_version"]
    try:
        done = services.referral_transition(
            actor=user,
            referral_id=referral.pk,
            action=action,
            expected_version=expected,
            **form.inputs(),
        )
    except Conflict as exc:
        fresh = _get_or_gone(request, user, pk)  # (forwarded away meanwhile: gone)
        if isinstance(fresh, HttpResponse):
            return fresh
        if exc.code == "version_mismatch":
            if _already_done(user, fresh, action, expected):
                messages.info(request, f"{action_label(action)}: already done (your first click).")
                return HttpResponseRedirect(reverse("web-referral-detail", args=[pk]), status=303)
            message = STALE_MESSAGE.format(version=fresh.version, expected=expected)
            # The fresh page, with what was typed kept in its form at the fresh version:
            # the user sees what changed, then may send it again (or not).
            typed = request.POST.copy()
            typed[f"{action}-expected_version"] = str(fresh.version)
            kept = ActionForm(typed, referral=fresh, transition=transition)
            return _render_detail(request, user, fresh, bound=kept, error=message, status=409)
        # Refused as it stands (a guard: a time in the past, an expert not allowed): the
        # case did not change, so the form is shown again with what was typed.
        return _render_detail(request, user, fresh, bound=form, error=exc.message, status=409)
    except NotFound:
        return _gone(request)
    except IntegrityError as exc:  # a constraint refused the write (as the API's 409)
        logger.warning("web action refused by a constraint", extra={"error": str(exc)})
        fresh = _get_or_gone(request, user, pk)
        if isinstance(fresh, HttpResponse):
            return fresh
        error = "This change conflicts with data stored meanwhile; nothing was changed."
        return _render_detail(request, user, fresh, bound=form, error=error, status=409)
    except ApplicationError as exc:
        for name, problem in exc.extra.get("errors", {}).items():
            form.add_error(name if name in form.fields else None, str(problem))
        return _render_detail(
            request, user, referral, bound=form, error=exc.message, status=exc.status_code
        )
    audit_record(request, AuditAction.TRANSITION, [referral.pk], detail=action)
    if action == "submit" and done.assigned_department_id is None:
        # A submit routing could not place: say why, and until when.
        messages.warning(request, _unrouted_message(done))
    else:
        messages.success(request, f"{action_label(action)}: done.")
    try:
        selectors.referral_get_for_user(user, pk)
    except NotFound:
        # The action took the case out of the user's scope (forwarded elsewhere).
        return HttpResponseRedirect(reverse("web-referral-worklist"), status=303)
    return HttpResponseRedirect(reverse("web-referral-detail", args=[pk]), status=303)


@login_required_keeping_typed(lambda pk: reverse("web-referral-detail", args=[pk]))
@require_http_methods(["GET", "POST"])
def referral_message(request: HttpRequest, pk: int) -> HttpResponse:
    """A message to the other side that changes no state (``referral_message_post``)."""
    user = _user(request)
    referral = _get_or_gone(request, user, pk)
    if isinstance(referral, HttpResponse):
        return referral
    if request.method == "GET":
        return HttpResponseRedirect(
            reverse("web-referral-detail", args=[pk]) + "#messages", status=303
        )
    text = str(request.POST.get("text", ""))
    key = str(request.POST.get("client_key", "")).strip()
    earlier = (
        None
        if request.POST.get("send_again")
        else selectors.message_recent_duplicate(
            user, referral_id=referral.pk, text=text, client_key=key
        )
    )
    if earlier is not None:
        # The same text again under a new key (a page the back button showed again): held
        # back until the user says it is a new message.
        error = (
            f"You sent this same message at {earlier.created_at:%Y-%m-%d %H:%M} UTC "
            f"(message {earlier.number}); it was not sent again. Tick the box below only "
            "to send it a second time."
        )
        return _render_detail(
            request,
            user,
            referral,
            error=error,
            status=409,
            message_text=text,
            message_key=key,
            message_duplicate=True,
        )
    try:
        _referral, _message, created = services.referral_message_post(
            actor=user, referral_id=referral.pk, text=text, client_key=key
        )
    except NotFound:
        return _gone(request)
    except ApplicationError as exc:
        return _render_detail(
            request,
            user,
            referral,
            error=exc.message,
            status=exc.status_code,
            message_text=text,  # what was typed is not lost
            # A used or damaged key gets a fresh one; any other refusal keeps it.
            message_key="" if exc.code in ("message_key_used", "message_key_invalid") else key,
        )
    if not created:  # the same form posted again (double click, reload, retry)
        messages.info(request, "This message was already sent; it was not sent again.")
    else:
        audit_record(request, AuditAction.CREATE, [referral.pk], object_type="message")
        messages.success(request, "Message sent.")
    return HttpResponseRedirect(reverse("web-referral-detail", args=[pk]) + "#messages", status=303)
