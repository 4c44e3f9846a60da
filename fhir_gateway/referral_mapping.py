"""Referral <-> FHIR, as plain functions over JSON dicts (the domain never sees FHIR models).

Outbound: ``referral_to_service_request``, ``referral_to_task``, ``referral_to_patient``,
``message_to_communication``, ``consult_note_to_document_reference`` build the resource per
FHIR version (``{"4.0": {...}, "5.0": {...}}``) straight from the domain rows. They are not
validated on the write path (decision 2 measured: building dicts costs microseconds, a
fhir.resources validation ~1 ms per resource); the tests validate every rendering with the
R4B and R5 models.

Inbound: ``service_request_to_intake`` / ``patient_to_intake`` read what we keep of a
member's resources; ``service_request_to_counter_referral`` reads a ServiceRequest
``basedOn`` one of ours (counter-referral); ``task_to_transition`` turns a Task update into
a workflow action.
See docs/fhir.md "Referral mapping" for the tables.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import SplitResult, urlsplit

from django.utils.dateparse import parse_datetime
from django.utils.http import parse_header_parameters

from core.values import ascii_digits, row_id, written_int
from fhir_gateway.outcomes import FhirError
from fhir_gateway.registry_projection import (
    CONSILIUM,
    CONSULT_MODE_SYSTEM,
    USER_SYSTEM,  # Task.input experts
)
from fhir_gateway.storage import fhir_instant
from referrals.models import (
    MIN_BIRTH_YEAR,
    Attachment,
    ConsultNote,
    DeclineReason,
    Disposition,
    Message,
    PatientSex,
    Priority,
    Referral,
    ReferralState,
    latest_birth_year,
)
from referrals.services import PLACER_MAX_LENGTH
from referrals.workflow import FINISHED_STATES, TRANSITIONS_BY_ACTION
from registry.models import ConsultMode

S = ReferralState
R4 = "4.0"
R5 = "5.0"
VERSIONS = (R4, R5)

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
BSER_BUSINESS_STATUS = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
REFERRAL_STATE_SYSTEM = f"{CONSILIUM}/CodeSystem/referral-state"
DECLINE_REASON_SYSTEM = f"{CONSILIUM}/CodeSystem/decline-reason"
DISPOSITION_SYSTEM = f"{CONSILIUM}/CodeSystem/consult-disposition"
DISPOSITION_EXTENSION = f"{CONSILIUM}/StructureDefinition/consult-disposition"
FILLER_SYSTEM = f"{CONSILIUM}/sid/referral"
CONSULT_NOTE_CODE = "11488-4"
# Task.input / Task.output codes of ours. Inputs: the transition's input names with "-".
TASK_INPUT_SYSTEM = f"{CONSILIUM}/CodeSystem/task-input"
TASK_OUTPUT_SYSTEM = f"{CONSILIUM}/CodeSystem/task-output"
# States in which the Task shows the planned conference (time, experts, link) in Task.input.
CONFERENCE_STATES = frozenset({S.SCHEDULED, S.IN_CONFERENCE})
REFERRAL_CATEGORY = {"system": SNOMED, "code": "3457005", "display": "Patient referral"}

# Task.status for each referral state (docs/fhir.md has the table and the reasons).
TASK_STATUS: dict[str, str] = {
    S.DRAFT: "draft",
    S.SUBMITTED: "requested",
    S.ACCEPTED: "accepted",
    S.DECLINED: "rejected",
    S.CANCELLED: "cancelled",
    S.EXPIRED: "failed",
    S.INFO_REQUESTED: "on-hold",
    S.SCHEDULED: "in-progress",
    S.IN_CONFERENCE: "in-progress",
    # Advice given, but the requester still closes out (or asks for a transfer).
    S.ADVISED: "in-progress",
    S.CLOSED_LOCAL: "completed",
    S.TRANSFER_REQUESTED: "in-progress",
    S.TRANSFER_ACCEPTED: "in-progress",
    S.IN_TRANSIT: "in-progress",
    S.ARRIVED: "in-progress",
    S.COMPLETED: "completed",
}

# BSeR Task business-status codes (STU1) where one means our state; ours otherwise.
BSER_CODES: dict[str, tuple[str, str]] = {
    S.SUBMITTED: ("2.0", "Service Request Created"),
    S.ACCEPTED: ("3.0", "Service Request Accepted"),
    S.DECLINED: ("4.0", "Service Request Declined"),
    S.CANCELLED: ("6.0", "Service Request Fulfillment Cancelled"),
    S.CLOSED_LOCAL: ("7.0", "Service Request Fulfillment Completed"),
    S.COMPLETED: ("7.0", "Service Request Fulfillment Completed"),
}


def service_request_status(state: str) -> str:
    if state == S.DRAFT:
        return "draft"
    if state in (S.DECLINED, S.CANCELLED, S.EXPIRED):
        return "revoked"
    if state in (S.CLOSED_LOCAL, S.COMPLETED):
        return "completed"
    return "active"


def task_status(referral: Referral) -> str:
    """Task.status: TASK_STATUS, except that a submitted referral its department has
    acknowledged is ``received``."""
    if referral.state == S.SUBMITTED and referral.acknowledged_at is not None:
        return "received"
    return TASK_STATUS[referral.state]


def task_statuses_for(status: str) -> list[str]:
    """The referral states a Task.status search value stands for (``received`` and
    ``requested`` are both ``submitted``: the search tells them apart by acknowledged_at)."""
    if status == "received":
        return [S.SUBMITTED]
    return [state for state, code in TASK_STATUS.items() if code == status]


# --------------------------------------------------------------------------- ids / refs


def task_id(referral: Referral) -> str:
    return referral.filler_id


service_request_id = task_id
patient_id = task_id


# A referral's messages, consult notes and case files: "<filler id><separator><number>",
# the row's number within its referral (referrals.numbering), never its database key.
MESSAGE_SEPARATOR, NOTE_SEPARATOR, CASE_FILE_SEPARATOR = "-msg-", "-note-", "-att-"
# The types whose resources belong to a referral (Task, ServiceRequest and Patient have
# the filler id itself).
REFERRAL_TYPES = frozenset(
    {"Task", "ServiceRequest", "Patient", "Communication", "DocumentReference"}
)


def message_id(referral: Referral, number: int) -> str:
    return f"{referral.filler_id}{MESSAGE_SEPARATOR}{number}"


def message_number(referral: Referral, logical_id: str) -> int | None:
    """The number of the referral's message a Communication id names; None when it names
    no message of this referral."""
    prefix = f"{referral.filler_id}{MESSAGE_SEPARATOR}"
    written = logical_id[len(prefix) :] if logical_id.startswith(prefix) else ""
    # As message_id writes it: ids are strings, "…-msg-01" names no message.
    return written_int(written)


def note_id(referral: Referral, number: int) -> str:
    return f"{referral.filler_id}{NOTE_SEPARATOR}{number}"


def case_file_id(filler_id: str, number: int) -> str:
    """The id of a case file's DocumentReference and of its Binary."""
    return f"{filler_id}{CASE_FILE_SEPARATOR}{number}"


def filler_of(resource_type: str, logical_id: str) -> str | None:
    """The filler id of the referral a resource belongs to; None for other types."""
    if resource_type not in REFERRAL_TYPES:
        return None
    if resource_type in ("Communication", "DocumentReference"):
        for separator in (MESSAGE_SEPARATOR, NOTE_SEPARATOR, CASE_FILE_SEPARATOR):
            filler, found, _number = logical_id.rpartition(separator)
            if found:
                return filler
    return logical_id


def _ref(resource_type: str, logical_id: Any, display: str = "") -> dict[str, str]:
    out = {"reference": f"{resource_type}/{logical_id}"}
    if display:
        out["display"] = display
    return out


def _coding(system: str, code: str, display: str = "") -> dict[str, str]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _identifiers(referral: Referral) -> list[dict[str, Any]]:
    return [
        {
            "use": "usual",
            "type": {"coding": [_coding(V2_0203, "PLAC", "Placer Identifier")]},
            "system": referral.placer_system,
            "value": referral.placer_value,
        },
        {
            "use": "official",
            "type": {"coding": [_coding(V2_0203, "FILL", "Filler Identifier")]},
            "system": FILLER_SYSTEM,
            "value": referral.filler_id,
        },
    ]


def _specialty_concept(referral: Referral) -> dict[str, Any]:
    specialty = referral.specialty
    return {"coding": [_coding(specialty.system, specialty.code, specialty.display)]}


def _mode_concept(referral: Referral) -> dict[str, Any]:
    return {
        "coding": [_coding(CONSULT_MODE_SYSTEM, referral.mode, ConsultMode(referral.mode).label)]
    }


# --------------------------------------------------------------------------- outbound


def _based_on(referral: Referral) -> dict[str, Any]:
    """A counter-referral is based on the order it answers (one query for a child loaded
    without its parent; none for the others)."""
    if referral.parent_referral_id is None:
        return {}
    parent = referral.parent_referral
    assert parent is not None
    return {"basedOn": [_ref("ServiceRequest", service_request_id(parent))]}


def referral_to_service_request(referral: Referral) -> dict[str, dict[str, Any]]:
    """The order: what is asked, of which specialty, by whom, for whom."""
    rid = service_request_id(referral)
    common: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": rid,
        "identifier": _identifiers(referral),
        **_based_on(referral),
        "status": service_request_status(referral.state),
        "intent": "order",
        "category": [{"coding": [dict(REFERRAL_CATEGORY)]}],
        "priority": Priority(referral.priority).label,
    }
    tail: dict[str, Any] = {
        "subject": _ref("Patient", patient_id(referral)),
        "authoredOn": fhir_instant(referral.created_at),
        "requester": _ref("Organization", referral.requester_facility_id),
        "performerType": _specialty_concept(referral),
    }
    if referral.assigned_department_id is not None:
        tail["performer"] = [_ref("HealthcareService", referral.assigned_department_id)]
    question = {"text": referral.clinical_question}
    r4 = {**common, "code": _mode_concept(referral), **tail, "reasonCode": [question]}
    r5 = {**common, "code": {"concept": _mode_concept(referral)}, **tail}
    r5["reason"] = [{"concept": question}]
    return {R4: r4, R5: r5}


def _business_status(state: str) -> dict[str, Any]:
    codings = [_coding(REFERRAL_STATE_SYSTEM, state, S(state).label)]
    if state in BSER_CODES:
        code, display = BSER_CODES[state]
        codings.append(_coding(BSER_BUSINESS_STATUS, code, display))
    return {"coding": codings, "text": S(state).label}


@dataclass(frozen=True)
class TaskContext:
    """What the Task shows besides the referral row (from the event log)."""

    last_modified: datetime
    status_reason_code: str = ""
    status_reason_text: str = ""
    consult_note_numbers: list[int] = field(default_factory=list)
    # Read only in CONFERENCE_STATES / FINISHED_STATES (publish skips the queries otherwise).
    conference_expert_ids: list[int] = field(default_factory=list)
    counter_referral_ids: list[str] = field(default_factory=list)  # their filler ids


def _task_input(code: str, **value: Any) -> dict[str, Any]:
    return {"type": {"coding": [_coding(TASK_INPUT_SYSTEM, code)]}, **value}


def conference_inputs(referral: Referral, expert_ids: list[int]) -> list[dict[str, Any]]:
    """The planned conference as the schedule action's Task.input: a member changes these
    on a scheduled Task to reschedule (``task_to_transition``)."""
    if referral.state not in CONFERENCE_STATES or referral.conference_at is None:
        return []
    inputs = [_task_input("scheduled-at", valueDateTime=fhir_instant(referral.conference_at))]
    inputs += [
        _task_input("experts", valueIdentifier={"system": USER_SYSTEM, "value": str(pk)})
        for pk in sorted(expert_ids)
    ]
    if referral.conference_url:
        inputs.append(_task_input("video-url", valueUrl=referral.conference_url))
    return inputs


def referral_to_task(referral: Referral, context: TaskContext) -> dict[str, dict[str, Any]]:
    """The workflow: who must act, in which state, until when."""
    tid = task_id(referral)
    base: dict[str, Any] = {
        "resourceType": "Task",
        "id": tid,
        "identifier": _identifiers(referral),
        "status": task_status(referral),
    }
    reason: dict[str, Any] | None = None
    if referral.state in (S.DECLINED, S.CANCELLED) and (
        context.status_reason_code or context.status_reason_text
    ):
        reason = {}
        if context.status_reason_code:
            label = dict(DeclineReason.choices).get(context.status_reason_code, "")
            reason["coding"] = [
                _coding(DECLINE_REASON_SYSTEM, context.status_reason_code, str(label))
            ]
        if context.status_reason_text:
            reason["text"] = context.status_reason_text
    rest: dict[str, Any] = {
        "businessStatus": _business_status(referral.state),
        "intent": "order",
        "priority": Priority(referral.priority).label,
        "focus": _ref("ServiceRequest", service_request_id(referral)),
        "for": _ref("Patient", patient_id(referral)),
        "authoredOn": fhir_instant(referral.created_at),
        "lastModified": fhir_instant(context.last_modified),
        "requester": _ref("Organization", referral.requester_facility_id),
    }
    if referral.assigned_department_id is not None:
        rest["owner"] = _ref("HealthcareService", referral.assigned_department_id)
    if referral.deadline is not None:
        rest["restriction"] = {"period": {"end": fhir_instant(referral.deadline)}}
    inputs = conference_inputs(referral, context.conference_expert_ids)
    if inputs:
        rest["input"] = inputs
    outputs = [
        {
            "type": {"coding": [_coding(LOINC, CONSULT_NOTE_CODE, "Consult note")]},
            "valueReference": _ref("DocumentReference", note_id(referral, number)),
        }
        for number in context.consult_note_numbers
    ]
    if referral.state in FINISHED_STATES:
        outputs += [
            {
                "type": {
                    "coding": [_coding(TASK_OUTPUT_SYSTEM, "counter-referral", "Counter-referral")]
                },
                "valueReference": _ref("ServiceRequest", filler),
            }
            for filler in context.counter_referral_ids
        ]
    if outputs:
        rest["output"] = outputs
    r4 = dict(base)
    r5 = dict(base)
    if reason is not None:
        r4["statusReason"] = reason
        r5["statusReason"] = {"concept": reason}
    r4.update(rest)
    r5.update(rest)
    # R4 names the asked specialty in performerType; R5 in requestedPerformer.
    r4["performerType"] = [_specialty_concept(referral)]
    r5["requestedPerformer"] = [{"concept": _specialty_concept(referral)}]
    return {R4: r4, R5: r5}


def split_patient_ref(ref: str) -> tuple[str, str]:
    """patient_ref -> (system, value): ``system|value`` split at the first ``|`` (a URI
    has none; the value may); ``|value`` is a value without a system that holds a ``|``
    (``patient_into_intake``); no ``|``: a value alone."""
    system, sep, value = ref.partition("|")
    return (system, value) if sep else ("", ref)


def referral_to_patient(referral: Referral) -> dict[str, dict[str, Any]]:
    """Minimum necessary: the sender's pseudonymous identifier, gender, birth year."""
    patient: dict[str, Any] = {"resourceType": "Patient", "id": patient_id(referral)}
    if referral.patient_ref:
        system, value = split_patient_ref(referral.patient_ref)
        patient["identifier"] = [{"system": system, "value": value} if system else {"value": value}]
    patient["gender"] = referral.patient_sex or PatientSex.UNKNOWN
    if referral.patient_birth_year:
        patient["birthDate"] = f"{referral.patient_birth_year:04d}"
    return {R4: patient, R5: dict(patient)}


def _author_ref(referral: Referral, author_facility_id: int | None) -> dict[str, str] | None:
    return _ref("Organization", author_facility_id) if author_facility_id else None


def message_to_communication(
    referral: Referral, message: Message, *, author_facility_id: int | None
) -> dict[str, dict[str, Any]]:
    base: dict[str, Any] = {
        "resourceType": "Communication",
        "id": message_id(referral, message.number),
        "partOf": [_ref("Task", task_id(referral))],
    }
    if message.in_response_to is not None:
        base["inResponseTo"] = [
            _ref("Communication", message_id(referral, message.in_response_to.number))
        ]
    base.update(
        {
            "status": "completed",
            "subject": _ref("Patient", patient_id(referral)),
            "sent": fhir_instant(message.created_at),
        }
    )
    sender = _author_ref(referral, author_facility_id)
    if sender:
        base["sender"] = sender
    r4 = {**base, "payload": [{"contentString": message.text}]}
    data = base64.b64encode(message.text.encode()).decode()
    r5 = {
        **base,
        "payload": [
            {"contentAttachment": {"contentType": "text/plain; charset=utf-8", "data": data}}
        ],
    }
    return {R4: r4, R5: r5}


def consult_note_to_document_reference(
    referral: Referral, note: ConsultNote, *, author_facility_id: int | None
) -> dict[str, dict[str, Any]]:
    base: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": note_id(referral, note.number),
        "extension": [{"url": DISPOSITION_EXTENSION, "valueCode": note.disposition}],
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [_coding(LOINC, CONSULT_NOTE_CODE, "Consult note")]},
        "subject": _ref("Patient", patient_id(referral)),
        "date": fhir_instant(note.created_at),
    }
    author = _author_ref(referral, author_facility_id)
    if author:
        base["author"] = [author]
    base["description"] = Disposition(note.disposition).label
    content = [
        {
            "attachment": {
                "contentType": "text/plain; charset=utf-8",
                "data": base64.b64encode(note.text.encode()).decode(),
                "title": "Consult note",
            }
        }
    ]
    if note.conference_minutes:  # a live conference's record, beside its advice
        content.append(
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(note.conference_minutes.encode()).decode(),
                    "title": "Conference minutes",
                }
            }
        )
    order = _ref("ServiceRequest", service_request_id(referral))
    r4 = {**base, "content": content, "context": {"related": [order]}}
    r5 = {**base, "basedOn": [order], "content": content}
    return {R4: r4, R5: r5}


def case_file_to_document_reference(
    referral: Referral, attachment: Attachment, kinds: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """A case file's DocumentReference: its metadata and the url of its bytes
    (``Binary/<same id>``); ``kinds``: the ``type`` and ``category`` its member sent over
    FHIR (CodeableConcepts, the same in R4 and R5)."""
    doc_id = case_file_id(referral.filler_id, attachment.number)
    file: dict[str, Any] = {
        "contentType": attachment.content_type,
        # Relative: resolved against the server's base, like a reference.
        "url": f"Binary/{doc_id}",
        "size": attachment.size,
    }
    if attachment.sha1:  # FHIR's hash is SHA-1, base64 (files stored before it: none)
        file["hash"] = base64.b64encode(bytes.fromhex(attachment.sha1)).decode("ascii")
    file["title"] = attachment.original_name
    base: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "status": "current",
        **(kinds or {}),
        "subject": _ref("Patient", patient_id(referral)),
        "date": fhir_instant(attachment.created),
    }
    order = _ref("ServiceRequest", service_request_id(referral))
    # R5's Attachment.size is an integer64: a JSON string (R4's unsignedInt, a number).
    r5_file = {**file, "size": str(attachment.size)}
    return {
        R4: {**base, "content": [{"attachment": file}], "context": {"related": [order]}},
        R5: {**base, "basedOn": [order], "content": [{"attachment": r5_file}]},
    }


# --------------------------------------------------------------------------- inbound


def reference_of(value: Any) -> str:
    return str(value.get("reference") or "") if isinstance(value, dict) else ""


_DEFAULT_PORTS = {"http": 80, "https": 443}
# An absolute URL: a scheme, then "://" (a conditional reference's query may hold one).
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def under_base(url: str, base: str) -> str | None:
    """What follows ``base`` in ``url`` ('Task/1'), or None when ``url`` is not under it:
    compared as URLs (scheme and host in any case, the default port written or not)."""

    def origin(parts: SplitResult) -> tuple[str, str, int | None]:
        try:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
        except ValueError:  # a port that is no number
            port = -1
        return parts.scheme.lower(), (parts.hostname or "").lower(), port

    try:
        ours, theirs = urlsplit(base), urlsplit(url)
    except ValueError:  # an unbalanced [ in the host
        return None
    prefix = ours.path.rstrip("/") + "/"
    if origin(ours) != origin(theirs) or not theirs.path.startswith(prefix):
        return None
    return theirs.path[len(prefix) :]


def own_reference(reference: str, base: str, where: str) -> str:
    """A reference a write resolves to one of our resources (a department, a referral's
    Task / ServiceRequest / Patient / message, the requesting Organization), made relative:
    an absolute URL on this server's ``base`` (as searches read one: ``under_base``) is
    that resource; one on another server names a resource there, not ours with the same
    id: 422 ``business-rule`` naming ``where`` (it was read as ours). Relative, ``urn:``
    and ``#`` references are returned as they are."""
    if not _ABSOLUTE.match(reference):
        return reference
    local = under_base(reference, base)
    if local is None:
        raise FhirError(
            422,
            "business-rule",
            f"{where} {reference[:120]!r} names a resource on another server, not one of "
            f"ours: name it relative (Type/<id>) or under this server's base ({base}).",
            expression=[where],
        )
    return local


def split_reference(reference: str) -> tuple[str, str]:
    """'…/HealthcareService/12' or 'HealthcareService/12/_history/3' -> (type, id)."""
    parts = [p for p in reference.split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2:
        return "", reference
    return parts[-2], parts[-1]


def _concepts(resource: dict[str, Any], element: str, version: str) -> list[dict[str, Any]]:
    """CodeableConcepts of an element (R5 CodeableReference unwrapped)."""
    raw = resource.get(element)
    items = raw if isinstance(raw, list) else [raw] if isinstance(raw, dict) else []
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        concept = item.get("concept") if "concept" in item else item
        if isinstance(concept, dict):
            out.append(concept)
    return out


def _concept_text(concept: dict[str, Any]) -> str:
    if concept.get("text"):
        return str(concept["text"])
    return "; ".join(
        str(c.get("display") or c.get("code"))
        for c in concept.get("coding") or []
        if isinstance(c, dict) and (c.get("display") or c.get("code"))
    )


def codes_of(concepts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (str(c.get("system") or ""), str(c.get("code") or ""))
        for concept in concepts
        for c in concept.get("coding") or []
        if isinstance(c, dict) and c.get("code")
    ]


@dataclass
class Intake:
    """What we keep of a member's ServiceRequest (+ Patient, + Task)."""

    placer_system: str
    placer_value: str
    specialty_codes: list[tuple[str, str]]
    clinical_question: str
    priority: int
    mode: str
    requester_reference: str
    performer_references: list[str]
    patient_ref: str = ""
    patient_sex: str = PatientSex.UNKNOWN
    patient_birth_year: int | None = None


def placer_identifier(resource: dict[str, Any]) -> tuple[str, str] | None:
    """The identifier typed PLAC, else the first with system and value."""
    candidates = [i for i in resource.get("identifier") or [] if isinstance(i, dict)]
    for ident in candidates:
        codes = [c.get("code") for c in (ident.get("type") or {}).get("coding") or []]
        if "PLAC" in codes and ident.get("system") and ident.get("value"):
            return str(ident["system"]), str(ident["value"])
    for ident in candidates:
        if ident.get("system") and ident.get("value") and ident.get("system") != FILLER_SYSTEM:
            return str(ident["system"]), str(ident["value"])
    return None


def _clinical_question(resource: dict[str, Any], version: str) -> str:
    element = "reasonCode" if version == R4 else "reason"
    texts = [_concept_text(c) for c in _concepts(resource, element, version)]
    texts += [str(n.get("text")) for n in resource.get("note") or [] if isinstance(n, dict)]
    question = "\n".join(t for t in texts if t and t != "None").strip()
    if not question:
        raise FhirError(
            422,
            "required",
            f"The clinical question is required: ServiceRequest.{element}.text or "
            "ServiceRequest.note.text.",
            expression=[f"ServiceRequest.{element}"],
        )
    return question


def _own_code(system: str, value: str, allowed: list[str], element: str) -> str:
    """A code of one of our code systems must be one of its codes: 422 ``code-invalid``
    (an unknown one was read as the default — a consult mode ``teleport`` as async)."""
    if value not in allowed:
        raise FhirError(
            422,
            "code-invalid",
            f"{element}: {value[:50]!r} is not a code of {system} (one of {', '.join(allowed)}).",
            expression=[element],
        )
    return value


def _consult_mode(resource: dict[str, Any], version: str) -> str:
    """The consult mode named in ServiceRequest.code, if any (async when absent)."""
    code = resource.get("code")
    concept = code.get("concept") if isinstance(code, dict) and version == R5 else code
    for system, value in codes_of([concept] if isinstance(concept, dict) else []):
        if system == CONSULT_MODE_SYSTEM:
            element = "ServiceRequest.code" + (".concept" if version == R5 else "")
            return _own_code(system, value, list(ConsultMode.values), element)
    return ConsultMode.ASYNC.value


def department_reference(value: Any, where: str) -> str:
    """The reference of a performer / owner; one named without it (an identifier or a
    display alone) is 422: it cannot be honoured, and ignoring it would send the referral
    where the sender did not ask."""
    reference = reference_of(value)
    if not reference:
        raise FhirError(
            422,
            "business-rule",
            f"{where} names no reference: name the department as HealthcareService/<id> "
            "(GET HealthcareService?organization=…&specialty=…), or leave it out to let "
            "routing choose.",
            expression=[where],
        )
    return reference


def _performer_references(resource: dict[str, Any]) -> list[str]:
    return [
        department_reference(performer, f"ServiceRequest.performer[{index}]")
        for index, performer in enumerate(resource.get("performer") or [])
    ]


def _check_intent(resource: dict[str, Any]) -> None:
    if resource.get("intent") not in ("order", "original-order", "proposal", "plan"):
        raise FhirError(
            422,
            "business-rule",
            "ServiceRequest.intent must be order (a referral is an order).",
            expression=["ServiceRequest.intent"],
        )


def based_on_referral(resource: dict[str, Any], base: str) -> str | None:
    """The id of the ServiceRequest (one of our referrals) this one is ``basedOn``: then it
    is a counter-referral. Only a relative reference (``ServiceRequest/<id>``) or an
    absolute URL on this server's ``base`` (``under_base``, as every write reads one)
    points at this server; an absolute URL elsewhere (the member's own order) and anything
    else (a CarePlan) are not ours to read and are ignored, as for any ServiceRequest."""
    local = []
    for reference in (reference_of(r) for r in resource.get("basedOn") or []):
        if _ABSOLUTE.match(reference):
            reference = under_base(reference, base) or ""
        if reference and "://" not in reference and not reference.startswith("urn:"):
            local.append(reference)
    ids = [
        logical_id
        for kind, logical_id in (split_reference(reference) for reference in local)
        if kind == "ServiceRequest"
    ]
    if len(ids) > 1:
        raise FhirError(
            422,
            "business-rule",
            "ServiceRequest.basedOn names several ServiceRequests; a counter-referral answers "
            "one referral.",
            expression=["ServiceRequest.basedOn"],
        )
    return ids[0] if ids else None


@dataclass(frozen=True)
class CounterReferralAsk:
    """What a counter-referral ServiceRequest asks (``counter_refer``'s inputs)."""

    original_id: str
    performer_references: list[str]
    clinical_question: str
    specialty_codes: list[tuple[str, str]]
    subject_reference: str
    requester_reference: str
    priority: str = "routine"  # the request-priority code
    mode: str = ConsultMode.ASYNC.value


def service_request_to_counter_referral(
    resource: dict[str, Any], version: str, base: str
) -> CounterReferralAsk:
    """A ServiceRequest ``basedOn`` one of our referrals, from its assigned department's
    system: refer the patient back down, with its own priority (``ServiceRequest.priority``,
    routine when absent) and consult mode (``ServiceRequest.code``, async when absent)."""
    original_id = based_on_referral(resource, base)
    assert original_id is not None
    _check_intent(resource)
    if resource.get("status") != "active":
        raise FhirError(
            422,
            "business-rule",
            f"A counter-referral's ServiceRequest.status must be active, not "
            f"{resource.get('status')!r}.",
            expression=["ServiceRequest.status"],
        )
    # Anything beside the department is refused where the department is read.
    performers = _performer_references(resource)
    if not any(split_reference(p)[0] == "HealthcareService" for p in performers):
        raise FhirError(
            422,
            "required",
            "ServiceRequest.performer must name the department (HealthcareService) of the "
            "original requesting facility that takes the patient back.",
            expression=["ServiceRequest.performer"],
        )
    return CounterReferralAsk(
        original_id=original_id,
        performer_references=performers,
        clinical_question=_clinical_question(resource, version),
        specialty_codes=codes_of(_concepts(resource, "performerType", version)),
        subject_reference=reference_of(resource.get("subject")),
        requester_reference=reference_of(resource.get("requester")),
        priority=str(resource.get("priority") or "routine"),
        mode=_consult_mode(resource, version),
    )


def service_request_to_intake(resource: dict[str, Any], version: str, base: str) -> Intake:
    """Raise 422 with the element at fault when the order does not fit our rules."""
    if based_on_referral(resource, base) is not None:
        raise FhirError(
            422,
            "business-rule",
            "A ServiceRequest basedOn one of our referrals is a counter-referral: POST it to "
            "ServiceRequest on its own, not in a transaction.",
            expression=["ServiceRequest.basedOn"],
        )
    _check_intent(resource)
    if resource.get("status") != "active":
        # A draft would be submitted, routed and published all the same (and a stored draft
        # could not be submitted later: ServiceRequest has no update): drafts stay in the
        # member's own system until they are sent.
        raise FhirError(
            422,
            "business-rule",
            f"A new referral's ServiceRequest.status must be active, not "
            f"{resource.get('status')!r} (keep drafts in your own system until you send them).",
            expression=["ServiceRequest.status"],
        )
    placer = placer_identifier(resource)
    if placer is None:
        raise FhirError(
            422,
            "required",
            "ServiceRequest.identifier needs the placer identifier (system and value, type "
            "PLAC): it makes resubmission idempotent.",
            expression=["ServiceRequest.identifier"],
        )
    if max(len(placer[0]), len(placer[1])) > PLACER_MAX_LENGTH:
        raise FhirError(
            422,
            "invalid",
            "The placer identifier's system and value must be at most "
            f"{PLACER_MAX_LENGTH} characters.",
            expression=["ServiceRequest.identifier"],
        )
    specialty = codes_of(_concepts(resource, "performerType", version))
    if not specialty:
        raise FhirError(
            422,
            "required",
            "ServiceRequest.performerType must name the requested specialty as a SNOMED CT "
            "practice-setting code (e.g. http://snomed.info/sct|394537008 Pediatric specialty).",
            expression=["ServiceRequest.performerType"],
        )
    question = _clinical_question(resource, version)
    mode = _consult_mode(resource, version)
    performers = _performer_references(resource)
    return Intake(
        placer_system=placer[0],
        placer_value=placer[1],
        specialty_codes=specialty,
        clinical_question=question,
        priority=Priority.from_code(str(resource.get("priority") or "routine")).value,
        mode=mode,
        requester_reference=reference_of(resource.get("requester")),
        performer_references=performers,
    )


def patient_ref_of(ident: dict[str, Any], where: str) -> str:
    """The stored patient reference (``system|value``) of a Patient identifier."""
    system, value = str(ident.get("system") or ""), str(ident["value"])
    if "|" in system:  # no URI holds one; the stored form splits at the first
        raise FhirError(
            422, "value", f"{where}.system must not contain '|'.", expression=[f"{where}.system"]
        )
    # A value alone is stored bare, unless it holds a "|": then as "|value".
    ref = f"{system}|{value}" if system or "|" in value else value
    if len(ref) > 128:
        raise FhirError(
            422,
            "too-long",
            f"{where} (system|value) must be at most 128 characters.",
            expression=[where],
        )
    return ref


def patient_into_intake(intake: Intake, patient: dict[str, Any]) -> None:
    """Minimum necessary: identifier (pseudonymous), gender, birth year; the rest dropped."""
    for ident in patient.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value"):
            intake.patient_ref = patient_ref_of(ident, "Patient.identifier")
            break
    gender = patient.get("gender")
    if gender in PatientSex.values:
        intake.patient_sex = str(gender)
    birth = str(patient.get("birthDate") or "")
    if len(birth) >= 4 and ascii_digits(birth[:4]):
        year = int(birth[:4])
        if not MIN_BIRTH_YEAR <= year <= latest_birth_year():
            raise FhirError(
                422,
                "business-rule",
                f"Patient.birthDate {birth[:10]!r} is in the future or before 1900.",
                expression=["Patient.birthDate"],
            )
        intake.patient_birth_year = year


# Task elements a member may change with PUT (everything else must stay as we sent it).
TASK_MUTABLE = frozenset(
    {
        "meta",
        "text",
        "status",
        "statusReason",
        "businessStatus",
        "input",
        "owner",
        "lastModified",
        "output",
    }
)
# Codes of Task.input (TASK_INPUT_SYSTEM) carry an action's inputs (the transition's input
# names, "-" for "_"): scheduled-at, experts, video-url, minutes, disposition, text,
# transfer-originally-considered, outcome.
# A new businessStatus (a code of REFERRAL_STATE_SYSTEM) asks for the one action that leads
# there. Not here: accept / decline / cancel (Task.status), advise (a consult note),
# request_info / provide_info (Communications), forward (a new Task.owner), counter_refer
# (a new ServiceRequest basedOn the referral), reschedule (new conference inputs on a
# scheduled Task).
BUSINESS_STATUS_ACTIONS: dict[str, str] = {
    S.SCHEDULED: "schedule",
    S.IN_CONFERENCE: "start_conference",
    # Only from in_conference; e-consult advice (from accepted) is a consult note.
    S.ADVISED: "finish_conference",
    S.CLOSED_LOCAL: "close_local",
    S.TRANSFER_REQUESTED: "request_transfer",
    S.TRANSFER_ACCEPTED: "accept_transfer",
    S.IN_TRANSIT: "depart",
    S.ARRIVED: "arrive",
    S.COMPLETED: "complete",
}
# Task.status values that carry an action themselves (with a consistent businessStatus).
_STATUS_ACTIONS: dict[str, str] = {
    S.ACCEPTED: "accepted",
    S.DECLINED: "rejected",
    S.CANCELLED: "cancelled",
}
# The inputs a reschedule may change (the schedule action's, shown on a scheduled Task).
_CONFERENCE_INPUTS = ("scheduled-at", "experts", "video-url")


@dataclass(frozen=True)
class TaskChange:
    action: str
    inputs: dict[str, Any]


def _status_reason(resource: dict[str, Any], version: str) -> tuple[str, str]:
    concepts = _concepts(resource, "statusReason", version)
    code = ""
    for system, value in codes_of(concepts):
        if system == DECLINE_REASON_SYSTEM:
            code = _own_code(system, value, list(DeclineReason.values), "Task.statusReason")
    text = "; ".join(t for t in (_concept_text(c) for c in concepts) if t)
    return code, text


def business_state(resource: dict[str, Any]) -> str | None:
    """Our referral state in Task.businessStatus (REFERRAL_STATE_SYSTEM), if any."""
    concept = resource.get("businessStatus")
    codings = concept.get("coding") or [] if isinstance(concept, dict) else []
    for coding in codings:
        if (
            isinstance(coding, dict)
            and coding.get("system") == REFERRAL_STATE_SYSTEM
            and coding.get("code") in ReferralState.values
        ):
            return str(coding["code"])
    return None


# The Task.input codes a member may send as a valueCoding, and the code system it must be
# of (a valueCode is read as ours; a coding of another system is not ours).
_INPUT_CODING_SYSTEMS = {"disposition": DISPOSITION_SYSTEM}


def _input_value(item: dict[str, Any], where: str, code: str) -> Any:
    """The value of a Task.input: a primitive ``value[x]``, a ``valueCoding`` of the
    input's own code system, an expert's ``valueIdentifier``; 422 for anything else (a
    CodeableConcept, a Reference, a Period: no input of ours takes one)."""
    for key, value in item.items():
        if not key.startswith("value"):
            continue
        if key == "valueCoding" and isinstance(value, dict):
            system = _INPUT_CODING_SYSTEMS.get(code)
            if system is None or value.get("system") != system:
                wanted = f"a coding of {system}" if system else "a primitive value[x]"
                raise FhirError(
                    422,
                    "code-invalid",
                    f"{where}.valueCoding: the {code[:40]} input takes {wanted}.",
                    expression=[f"{where}.valueCoding"],
                )
            return value.get("code")
        if key == "valueIdentifier" and isinstance(value, dict):
            if value.get("system") not in (None, USER_SYSTEM):
                raise FhirError(
                    422,
                    "business-rule",
                    f"{where}: an expert is an identifier of {USER_SYSTEM}.",
                    expression=[where],
                )
            return value.get("value")
        if isinstance(value, dict | list):
            raise FhirError(
                422,
                "business-rule",
                f"{where}.{key[:40]}: the {code[:40]} input takes a primitive value[x] "
                "(valueString, valueCode, valueDateTime, valueBoolean, valueUrl…).",
                expression=[f"{where}.{key[:40]}"],
            )
        return value
    raise FhirError(422, "required", f"{where} has no value.", expression=[where])


@dataclass(frozen=True)
class _Input:
    code: str
    value: Any

    def same(self, other: _Input) -> bool:
        """Equal values; a date-time equal as an instant and an expert equal as a user id
        (a client may re-format them: "04" and " 4" name the user "4" shows)."""
        if self.code != other.code:
            return False
        if self.code == "experts":
            mine_id, their_id = row_id(self.value), row_id(other.value)
            if mine_id is not None and their_id is not None:
                return mine_id == their_id
        if self.code == "scheduled-at" and isinstance(self.value, str):
            try:
                mine, theirs = parse_datetime(self.value), parse_datetime(str(other.value))
            except ValueError:  # well-formed but impossible: the service says why
                mine = theirs = None
            if mine is not None and theirs is not None:
                return mine == theirs
        return bool(self.value == other.value)


def _read_inputs(resource: dict[str, Any]) -> list[_Input]:
    """Task.input as (our code, value); 422 for an item without our code or a value."""
    out = []
    for index, item in enumerate(resource.get("input") or []):
        where = f"Task.input[{index}]"
        item = item if isinstance(item, dict) else {}
        codings = (item.get("type") or {}).get("coding") or []
        codes = [
            c.get("code")
            for c in codings
            if isinstance(c, dict) and c.get("system") == TASK_INPUT_SYSTEM
        ]
        if not codes:
            raise FhirError(
                422,
                "business-rule",
                f"{where}.type must be a code of {TASK_INPUT_SYSTEM}.",
                expression=[f"{where}.type"],
            )
        out.append(_Input(str(codes[0]), _input_value(item, where, str(codes[0]))))
    return out


def _not_in(items: list[_Input], shown: list[_Input]) -> list[_Input]:
    """The items a member added: what the server showed (echoed back) is not an input."""
    return [item for item in items if not any(item.same(s) for s in shown)]


def _task_inputs(action: str, given: list[_Input], text: str) -> dict[str, Any]:
    """The action's inputs: its reason / note from statusReason text, the others from
    Task.input (our codes); 422 for an input the action does not take."""
    transition = TRANSITIONS_BY_ACTION[action]
    by_code: dict[str, list[Any]] = {}
    for item in given:
        by_code.setdefault(item.code, []).append(item.value)
    names = {f.name.replace("_", "-"): f for f in transition.inputs}
    unknown = sorted(set(by_code) - set(names) | (set(by_code) & {"reason", "note"}))
    if unknown:
        raise FhirError(
            422,
            "business-rule",
            f"{action} takes no Task.input {', '.join(unknown)} (reasons and notes go in "
            "Task.statusReason.text).",
            expression=["Task.input"],
        )
    inputs: dict[str, Any] = {}
    for code, input_field in names.items():
        if input_field.name in ("reason", "note"):
            if text:
                inputs[input_field.name] = text
        elif input_field.kind == "users":
            inputs[input_field.name] = list(dict.fromkeys(by_code.get(code, [])))
        elif code in by_code:
            values = list(dict.fromkeys(by_code[code]))
            if len(values) > 1:  # a new value beside the one shown: which one is meant?
                raise FhirError(
                    422,
                    "business-rule",
                    f"Task.input {code} takes one value; {len(values)} were sent (replace "
                    "the one the Task shows, do not add another).",
                    expression=["Task.input"],
                )
            inputs[input_field.name] = values[0]
    return inputs


def _reschedule(shown: list[_Input], sent: list[_Input]) -> list[_Input] | None:
    """The conference a member asks for by changing a scheduled Task's inputs: per code, what
    it sent, else what the Task shows (so sending only a new scheduled-at is enough). None
    when that is the conference already planned."""
    sent_codes = {item.code for item in sent}
    wanted = [item for item in shown if item.code not in sent_codes] + sent
    if not _not_in(wanted, shown) and not _not_in(shown, wanted):  # the same, repeats aside
        return None
    return wanted


def _refuse(message: str, element: str) -> FhirError:
    return FhirError(422, "business-rule", message, expression=[element])


def task_to_transition(
    current: dict[str, Any], incoming: dict[str, Any], version: str, base: str
) -> TaskChange:
    """The workflow action a Task update asks for; 422 for any other change.

    - Task.status received / accepted / rejected / cancelled: acknowledge / accept /
      decline / cancel;
    - a new Task.owner (a HealthcareService) with statusReason text: forward;
    - a new businessStatus (our referral-state code): the action leading to that state
      (BUSINESS_STATUS_ACTIONS), its inputs in Task.input, its reason / note in
      statusReason text; Task.status may stay or become the new state's status;
    - on a scheduled Task, new conference inputs (scheduled-at, experts, video-url) with
      everything else unchanged: schedule again (reschedule).

    Task.input items the server shows (the planned conference) and the member echoes back
    are not inputs; only new or changed ones are. A Task.owner on another server than
    ``base`` is no department of ours: 422 (``own_reference``).
    """
    changed = sorted(
        key
        for key in set(current) | set(incoming)
        if key not in TASK_MUTABLE and current.get(key) != incoming.get(key)
    )
    if changed:
        raise FhirError(
            422,
            "business-rule",
            "Only Task.status, businessStatus and owner (with statusReason and input) may be "
            f"changed by an update; changed: {', '.join(changed)}.",
            expression=[f"Task.{name}" for name in changed],
        )
    if current.get("output") != incoming.get("output"):
        raise FhirError(
            422,
            "business-rule",
            "Task.output is set by the server: POST the consult note as a DocumentReference "
            "(LOINC 11488-4) based on the referral, a counter-referral as a ServiceRequest "
            "basedOn it, instead.",
            expression=["Task.output"],
        )
    code, text = _status_reason(incoming, version)
    old_status, new_status = current.get("status"), incoming.get("status")
    old_state, new_state = business_state(current), business_state(incoming)
    shown, sent = _read_inputs(current), _read_inputs(incoming)
    added = _not_in(sent, shown)
    if current.get("businessStatus") != incoming.get("businessStatus") and new_state is None:
        raise _refuse(
            f"Task.businessStatus must carry a code of {REFERRAL_STATE_SYSTEM} (our states).",
            "Task.businessStatus",
        )
    # The same department however written (absolute URL on this server's base,
    # /_history/n) is no new owner; one on another server is none of ours.
    owner = split_reference(own_reference(reference_of(incoming.get("owner")), base, "Task.owner"))
    if split_reference(reference_of(current.get("owner"))) != owner:
        kind, department = owner
        if kind != "HealthcareService" or not ascii_digits(department):
            raise _refuse(
                "Task.owner must be a HealthcareService (the new department).", "Task.owner"
            )
        if written_int(department) is None:
            # Logical ids are strings: HealthcareService/01 is not HealthcareService/1 (it
            # was read as a number: a forward there, or to where the case already is).
            raise _refuse(
                f"Task.owner HealthcareService/{department[:40]} is not a department of the "
                "network.",
                "Task.owner",
            )
        if new_state not in (old_state, S.SUBMITTED) or new_status not in (old_status, "requested"):
            raise _refuse(
                "A new Task.owner forwards the referral: it starts again as submitted there; "
                "change nothing else.",
                "Task.owner",
            )
        if not text:
            raise _refuse(
                "A forward needs its reason in Task.statusReason.text.", "Task.statusReason"
            )
        return TaskChange("forward", {"department": department, "reason": text})
    # A new state reached by Task.status itself (accepted + status accepted) is the status
    # path below; any other new state is the action leading there.
    if (
        new_state is not None
        and new_state != old_state
        and _STATUS_ACTIONS.get(new_state) != new_status
    ):
        action = BUSINESS_STATUS_ACTIONS.get(new_state)
        if action is None:
            raise _refuse(
                f"Task.businessStatus {new_state!r} cannot be set by an update: use "
                f"{', '.join(BUSINESS_STATUS_ACTIONS)} (accepted / rejected / cancelled go "
                "by Task.status, advice by a consult note, a forward by Task.owner).",
                "Task.businessStatus",
            )
        if action == "finish_conference" and old_state != S.IN_CONFERENCE:
            raise _refuse(
                "Task.businessStatus advised ends a live conference (from in_conference); "
                "e-consult advice is a consult note: POST a DocumentReference (LOINC 11488-4) "
                "based on the referral.",
                "Task.businessStatus",
            )
        if new_status not in (old_status, TASK_STATUS[new_state]):
            raise _refuse(
                f"Task.status {new_status!r} does not go with businessStatus {new_state!r} "
                f"({TASK_STATUS[new_state]!r}).",
                "Task.status",
            )
        return TaskChange(action, _task_inputs(action, added, text))
    if old_state == S.SCHEDULED and new_state == old_state and new_status == old_status:
        wanted = _reschedule(shown, sent)
        if wanted is not None:
            return TaskChange("schedule", _task_inputs("schedule", wanted, text))
    if added:
        raise _refuse(
            "Task.input goes with a businessStatus change (or, on a scheduled Task, changes "
            f"the conference: {', '.join(_CONFERENCE_INPUTS)}) only.",
            "Task.input",
        )
    if new_status == old_status:
        raise _refuse(f"Task.status is already {new_status!r}: nothing to do.", "Task.status")
    if new_status == "received":  # from requested; elsewhere the workflow says 409
        return TaskChange("acknowledge", {})
    if new_status == "accepted":
        return TaskChange("accept", {})
    if new_status == "rejected":
        inputs: dict[str, Any] = {"reason_code": code or DeclineReason.OTHER.value}
        if text:
            inputs["note"] = text
        return TaskChange("decline", inputs)
    if new_status == "cancelled":
        return TaskChange("cancel", {"reason": text or "Cancelled by the requester's system."})
    raise _refuse(
        f"Task.status {new_status!r} cannot be set by a member: use received, accepted, "
        "rejected (with statusReason) or cancelled, or change Task.businessStatus / "
        "Task.owner.",
        "Task.status",
    )


def communication_text(resource: dict[str, Any]) -> str:
    """The text of a Communication: R4 contentString, R5 text attachment or concept text."""
    parts: list[str] = []
    for payload in resource.get("payload") or []:
        if not isinstance(payload, dict):
            continue
        if payload.get("contentString"):
            parts.append(str(payload["contentString"]))
        attachment = payload.get("contentAttachment")
        if isinstance(attachment, dict):
            parts.append(attachment_text(attachment, "Communication.payload"))
        concept = payload.get("contentCodeableConcept")
        if isinstance(concept, dict) and _concept_text(concept):
            parts.append(_concept_text(concept))
    return "\n".join(p for p in parts if p).strip()


def attachment_bytes(attachment: dict[str, Any], where: str) -> bytes:
    # FHIR's base64Binary may hold whitespace (MIME's 76-column lines).
    text = "".join(str(attachment.get("data") or "").split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FhirError(400, "structure", f"{where}.data is not base64.") from exc


# Python codecs that decode bytes to text but are no charset a member would declare
# (escapes, IDNA, UTF-7: deprecated, and it can hide markup), refused like unknown ones.
_NOT_CHARSETS = frozenset(
    {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "utf-7", "undefined"}
)
_BIG_ENDIAN_WITHOUT_BOM = {"utf-16": "utf-16-be", "utf-32": "utf-32-be"}
_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def attachment_text(attachment: dict[str, Any], where: str) -> str:
    """The text of a text/* attachment, decoded in its declared charset (UTF-8 when none
    is declared). A file of another type is refused, not reduced to its title: a
    message or a consult note is text here, files go as case files."""
    content_type = str(attachment.get("contentType") or "text/plain")
    media_type, parameters = parse_header_parameters(content_type)
    if not media_type.startswith("text/"):
        raise FhirError(
            422,
            "not-supported",
            f"{where}: a {media_type[:80]!r} attachment is not text; send a file as a case "
            "file (a DocumentReference with its Binary) and its text here.",
            expression=[f"{where}.contentType"],
        )
    charset = parameters.get("charset") or "utf-8"
    data = attachment_bytes(attachment, where)
    try:
        codec = codecs.lookup(charset).name
        if codec in _NOT_CHARSETS:
            raise LookupError(codec)
        if codec in _BIG_ENDIAN_WITHOUT_BOM and not data.startswith(_BOMS):
            codec = _BIG_ENDIAN_WITHOUT_BOM[codec]  # RFC 2781 §4.3: no BOM, big-endian
        if codec == "utf-8":  # a BOM is a signature, not text (the UTF-16/32 codecs drop theirs)
            codec = "utf-8-sig"
        text = data.decode(codec)
        text.encode("utf-8")  # a lone surrogate (UTF-7 can make one) is no text
    except UnicodeError as exc:
        raise FhirError(400, "structure", f"{where}.data is not {charset[:40]} text.") from exc
    except (LookupError, ValueError) as exc:  # no codec, or none of text (base64), or a NUL
        raise FhirError(
            422,
            "not-supported",
            f"{where}: the charset {charset[:40]!r} is not known.",
            expression=[f"{where}.contentType"],
        ) from exc
    return text


def disposition_of(resource: dict[str, Any]) -> str:
    """The consult note's disposition: our extension, else a category coding of ours."""
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == DISPOSITION_EXTENSION:
            return str(ext.get("valueCode") or "")
    for system, code in codes_of(_concepts(resource, "category", R4)):
        if system == DISPOSITION_SYSTEM:
            return code
    return ""
