"""Every kind of Bundle the gateway answers keeps FHIR's Bundle invariants (bdl-*), R4 and
R5. fhir.resources checks structure and cardinality but not these; a review found the pull
feed breaking two of them (R5 bdl-7, bdl-3b). Each rule below is the FHIRPath invariant of
the Bundle definition (R4 4.0.1, R5 5.0.0) written out in Python (the FHIRPath library on
PyPI pins an older python-dateutil than ours)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from fhir_gateway import intake
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5
from fhir_gateway.tests.referral_world import (
    World,
    body,
    submit,
    task_of,
    transaction,
    update_task,
    with_binary_file,
)

pytestmark = pytest.mark.django_db

_WRITES = ("POST", "PATCH", "PUT")


def _bdl7(kind: str, entries: list[dict[str, Any]]) -> bool:
    """A fullUrl twice only with distinct meta.versionId, except in a history Bundle."""
    keys = [
        (e["fullUrl"], str(e.get("resource", {}).get("meta", {}).get("versionId", "")))
        for e in entries
        if "fullUrl" in e
    ]
    return kind == "history" or len(keys) == len(set(keys))


def _problems(bundle: dict[str, Any], version: str) -> list[str]:
    kind = bundle["type"]
    entries: list[dict[str, Any]] = bundle.get("entry", [])
    found: list[str] = []

    def check(rule: str, ok: bool) -> None:
        if not ok:
            found.append(f"{rule} ({kind})")

    check(
        "bdl-1 total only in a search or history",
        "total" not in bundle or kind in ("searchset", "history"),
    )
    check(
        "bdl-2 entry.search only in a search",
        kind == "searchset" or not any("search" in e for e in entries),
    )
    check(
        "bdl-5 an entry has a resource, request or response",
        all("resource" in e or "request" in e or "response" in e for e in entries),
    )
    check(
        "bdl-8 fullUrl is not version specific",
        all("/_history/" not in e.get("fullUrl", "") for e in entries),
    )
    if version == FHIR_R4:
        check(
            "bdl-3 request iff batch/transaction/history",
            all(("request" in e) == (kind in ("batch", "transaction", "history")) for e in entries),
        )
        check(
            "bdl-4 response iff batch-/transaction-response/history",
            all(
                ("response" in e) == (kind in ("batch-response", "transaction-response", "history"))
                for e in entries
            ),
        )
        check("bdl-7 fullUrl unique (or distinct versions)", _bdl7(kind, entries))
        return found
    if kind in ("document", "message", "searchset", "collection"):
        check(
            "bdl-3a entries are resources only",
            all("resource" in e and "request" not in e and "response" not in e for e in entries),
        )
    if kind == "history":
        check(
            "bdl-3b history entries: request, response, a resource iff a write",
            all(
                "request" in e
                and "response" in e
                and ((e["request"].get("method") in _WRITES) == ("resource" in e))
                for e in entries
            ),
        )
    if kind in ("transaction", "batch"):
        check(
            "bdl-3c requests: a resource iff a write",
            all(
                "method" in e.get("request", {})
                and ((e["request"]["method"] in _WRITES) == ("resource" in e))
                for e in entries
            ),
        )
    if kind in ("transaction-response", "batch-response"):
        check("bdl-3d every entry answered", all("response" in e for e in entries))
    check("bdl-7 fullUrl unique (or distinct versions)", _bdl7(kind, entries))
    if kind not in ("transaction", "transaction-response", "batch", "batch-response"):
        check(
            "bdl-15 fullUrl (or a POST)",
            all("fullUrl" in e or e.get("request", {}).get("method") == "POST" for e in entries),
        )
    if kind == "searchset":
        check(
            "bdl-18 a searchset has its self link",
            any(
                link.get("relation") == "self" and link.get("url")
                for link in bundle.get("link", [])
            ),
        )
    if kind == "subscription-notification":
        check(
            "bdl-13 a SubscriptionStatus first",
            bool(entries)
            and (entries[0].get("resource", {}).get("resourceType") == "SubscriptionStatus"),
        )
    return found


def _nested(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The Bundle and the Bundles it carries (an asynchronous answer holds the
    transaction-response)."""
    out = [bundle]
    for entry in bundle.get("entry", []):
        if entry.get("resource", {}).get("resourceType") == "Bundle":
            out += _nested(entry["resource"])
    return out


def _get(client: Any, path: str, version: str) -> dict[str, Any]:
    response = client.get(path, Accept=version)
    assert response.status_code == 200, (path, response.content[:300])
    return body(response)


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_every_bundle_kind_keeps_the_bundle_invariants(world: World, version: str) -> None:
    bundles: dict[str, dict[str, Any]] = {}
    # The consultant's Subscription exists before the events it is to hear of.
    subscription = world.r5.post(
        "/fhir/Subscription",
        {
            "resourceType": "Subscription",
            "status": "requested",
            "topic": "https://consilium.example.org/fhir/SubscriptionTopic/referral",
            "channelType": {"code": "rest-hook"},
            "content": "id-only",
        },
        content_type=FHIR_R5,
        Accept=FHIR_R5,
    )
    assert subscription.status_code == 201, subscription.content
    sub_id = body(subscription)["id"]

    answer = world.r4.post("/fhir", with_binary_file(transaction(world, "SR-INV")), Accept=version)
    assert answer.status_code == 200, answer.content
    bundles["transaction-response"] = body(answer)
    task_id = str(task_of(submit(world, "SR-2"))["id"])
    assert (
        update_task(world.r5, task_id, lambda t: t.update(status="received"), FHIR_R5).status_code
        == 200
    )
    assert (
        update_task(world.r5, task_id, lambda t: t.update(status="accepted"), FHIR_R5).status_code
        == 200
    )
    message = world.r5.post(
        "/fhir/Communication",
        {
            "resourceType": "Communication",
            "status": "completed",
            "partOf": [{"reference": f"Task/{task_id}"}],
            "payload": [{"contentString": "Weight?"}],
        },
        content_type=FHIR_R4,
    )
    assert message.status_code == 201, message.content
    queued = world.r4.post("/fhir", transaction(world, "SR-3"), Prefer="respond-async")
    assert queued.status_code == 202
    intake.intake_drain()
    poll = urlsplit(str(queued["Content-Location"])).path
    bundles["async answer"] = _get(world.r4, poll, version)

    owner = f"HealthcareService/{world.network.pediatrics.pk}"
    bundles["search"] = _get(
        world.r5,
        f"/fhir/Task?owner={owner}&_include=Task:focus&_revinclude=Communication:part-of&_count=1",
        version,
    )
    bundles["search, subset"] = _get(world.r5, "/fhir/Task?_elements=owner", version)
    bundles["search, count"] = _get(world.r5, "/fhir/Task?_summary=count", version)
    bundles["history"] = _get(world.r5, f"/fhir/Task/{task_id}/_history", version)
    bundles["registry search"] = _get(world.r4, "/fhir/Organization?_count=2", version)
    bundles["subscription $events"] = _get(
        world.r5, f"/fhir/Subscription/{sub_id}/$events", version
    )
    bundles["subscription $status"] = _get(
        world.r5, f"/fhir/Subscription/{sub_id}/$status", version
    )
    bundles["facility $events"] = _get(world.r5, "/fhir/$events", version)
    read = {"request": {"method": "GET", "url": f"Task/{task_id}"}}
    batch = world.r5.post(  # a read twice (one fullUrl), a search, an error
        "/fhir",
        {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                read,
                read,
                {"request": {"method": "GET", "url": "Task?_count=1"}},
                {"request": {"method": "GET", "url": "Task/unknown"}},
            ],
        },
        content_type=version,
        Accept=version,
    )
    assert batch.status_code == 200, batch.content
    bundles["batch-response"] = body(batch)

    assert len(bundles["subscription $events"].get("entry", [])) > 3  # events to check
    problems = {
        name: found
        for name, bundle in bundles.items()
        for nested in _nested(bundle)
        if (found := _problems(nested, version))
    }
    assert problems == {}
