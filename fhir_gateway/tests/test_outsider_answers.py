"""A member system of an unrelated facility learns nothing of another's referral: every
answer it gets naming the referral's ids (reads, vreads, histories, conditional reads,
counting searches with includes, writes) is the answer a never-issued id gets, and its
writes change nothing (security review)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from fhir_gateway.tests.referral_world import (
    World,
    advised,
    body,
    case_file,
    message,
    world,  # noqa: F401
)
from referrals.models import Attachment, Message, Referral, ReferralEvent

UNKNOWN = "CSL-0123456789ABCDEF0123456789ABCDEF"
READS = (
    "Task/{}",
    "Patient/{}",
    "Communication/{}-msg-1",
    "DocumentReference/{}-note-1",
    "DocumentReference/{}-att-1",
    "Binary/{}-att-1",
    "Task/{}/_history/2",
    "Task/{}/_history?_summary=count",
    "Task?_id={}&_summary=count",
    "Task?identifier={}&_include=Task:focus&_revinclude=Communication:part-of",
    "ServiceRequest?identifier=https://codao.example.org/sid/referral|SR-1&_summary=count",
    "Communication?part-of=Task/{}&_summary=count",
    "DocumentReference?related=ServiceRequest/{}&date=ge2000&_summary=count",
)


def _answer(response: Any, logical_id: str) -> tuple[int, Any]:
    text = response.content.decode().replace(logical_id, "<id>")
    data = json.loads(text) if text else None
    if isinstance(data, dict):  # a Bundle's own id, time and links say nothing
        for key in ("id", "meta", "link"):
            data.pop(key, None)
    return response.status_code, data


def test_an_outsider_gets_what_an_unknown_id_gets(world: World) -> None:  # noqa: F811
    task_id = advised(world)
    assert world.r4.post("/fhir/Communication", message(task_id, "Hb 9.1")).status_code == 201
    assert world.r4.post("/fhir/DocumentReference", case_file(task_id)).status_code == 201
    task = body(world.r4.get(f"/fhir/Task/{task_id}"))
    pdf = base64.b64encode(b"%PDF-1.4 x\n%%EOF\n").decode()
    requests: list[Callable[[str], Any]] = [
        *(lambda i, p=p: world.other.get("/fhir/" + p.format(i)) for p in READS),
        lambda i: world.other.get(f"/fhir/Task/{i}", **{"If-None-Match": 'W/"3"'}),
        lambda i: world.other.put(
            f"/fhir/Task/{i}", {**task, "id": i, "status": "cancelled"}, **{"If-Match": 'W/"1"'}
        ),
        lambda i: world.other.patch(
            f"/fhir/Task/{i}", [{"op": "replace", "path": "/status", "value": "cancelled"}]
        ),
        lambda i: world.other.post("/fhir/Communication", message(i, "x")),
        lambda i: world.other.post(
            "/fhir/Binary",
            {
                "resourceType": "Binary",
                "contentType": "application/pdf",
                "securityContext": {"reference": f"ServiceRequest/{i}"},
                "data": pdf,
            },
        ),
    ]
    referral = Referral.objects.get(filler_id=task_id)
    before = (
        referral.version,
        ReferralEvent.objects.count(),
        Message.objects.count(),
        Attachment.objects.count(),
    )
    for index, request in enumerate(requests):
        assert _answer(request(task_id), task_id) == _answer(request(UNKNOWN), UNKNOWN), index
    referral.refresh_from_db()
    assert before == (
        referral.version,
        ReferralEvent.objects.count(),
        Message.objects.count(),
        Attachment.objects.count(),
    )
