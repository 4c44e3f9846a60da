"""What a review of the outbox found (each test names what it was): one member's state
must never stall the others' deliveries, a message that cannot be sent is that message's
outcome (never the batch's), a send never outlasts its lease, a throttling member's
Retry-After is honoured. Stub members are real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import UTC, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from fhir_gateway import delivery
from fhir_gateway.models import FhirResource, OutboxMessage
from fhir_gateway.storage import store_version
from fhir_gateway.tasks import deliver_outbox, outbox_drain_task
from fhir_gateway.tests.test_outbox import _enqueue as enqueue
from fhir_gateway.tests.test_outbox import _resource
from registry.models import Endpoint
from tests.factories import EndpointFactory

Status = OutboxMessage.Status


def _enqueue(endpoint: Endpoint, aggregate: str, row: FhirResource) -> OutboxMessage:
    return enqueue(endpoint, aggregate, row, schedule=False)  # the drain must find it


def test_messages_held_behind_a_suspended_endpoint_do_not_stall_the_drain(
    db: Any, stub_member: Any
) -> None:
    """250 referrals whose first message waits for a suspended endpoint: the 500 messages
    queued behind them filled every batch's candidates and were dropped, so the drain
    claimed nothing and stopped — no retry, no lost hand-off, no lease of any member ran."""
    stub = stub_member()
    active = EndpointFactory.create(base_url=stub.base_url)
    suspended = EndpointFactory.create(base_url=stub.base_url, status=Endpoint.Status.SUSPENDED)
    row = _resource("c1")
    old = timezone.now() - timedelta(hours=1)
    OutboxMessage.objects.bulk_create(
        OutboxMessage(
            endpoint=endpoint,
            aggregate_key=f"referral:held{n}",
            seq=seq,
            resource_type="Communication",
            logical_id="c1",
            version_id=row.version_id,
            idempotency_key=f"held-{n}-{seq}",
            next_attempt_at=old,
        )
        for n in range(250)
        for seq, endpoint in ((1, suspended), (2, active), (3, active))
    )
    retry = _enqueue(active, "referral:healthy", row)
    OutboxMessage.objects.filter(pk=retry.pk).update(status=Status.FAILED, attempts=1)
    lost = _enqueue(active, "referral:other", row)

    assert outbox_drain_task() == 2  # beat's task, batches of 500

    retry.refresh_from_db()
    lost.refresh_from_db()
    assert (retry.status, lost.status) == (Status.DELIVERED, Status.DELIVERED)
    # The held ones still wait, in order, for their endpoint.
    assert not OutboxMessage.objects.filter(aggregate_key__startswith="referral:held").exclude(
        status=Status.PENDING
    )
    assert sorted(r["key"] for r in stub.requests) == sorted(
        [retry.idempotency_key, lost.idempotency_key]
    )


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("HIS_TOKEN_FILE", "/nonexistent/his-token", "cannot be read: FileNotFoundError"),
        ("HIS_TOKEN", "abc\ndef", "is not a printable ASCII token"),
        ("HIS_TOKEN", "Bearer-\u79d8\u5bc6", "is not a printable ASCII token"),
    ],
    ids=["missing-file", "newline", "not-latin-1"],
)
def test_a_secret_that_cannot_be_sent_kills_its_message_only(
    db: Any,
    stub_member: Any,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    reason: str,
) -> None:
    """An unreadable secret file crashed every drain (the poison message stayed first in
    line); a header http.client refuses threw away the whole batch's outcomes (the others
    were re-sent for ever, the poison one never went dead)."""
    monkeypatch.setenv(variable, value)
    stub = stub_member()
    broken = EndpointFactory.create(
        base_url=stub.base_url, auth_type="bearer", auth_secret_ref="HIS_TOKEN"
    )
    healthy = EndpointFactory.create(base_url=stub.base_url)
    row = _resource("c1")
    poison = _enqueue(broken, "referral:A", row)
    ok = _enqueue(healthy, "referral:B", row)

    report = delivery.outbox_drain(limit=10, concurrency=1)

    assert (report.delivered, report.dead) == (1, 1)
    poison.refresh_from_db()
    ok.refresh_from_db()
    assert ok.status == Status.DELIVERED
    assert poison.status == Status.DEAD
    assert reason in poison.last_error
    assert [r["key"] for r in stub.requests] == [ok.idempotency_key]
    # The single path says the same, without raising.
    again = _enqueue(broken, "referral:C", row)
    assert deliver_outbox(again.pk) == "skipped"
    again.refresh_from_db()
    assert again.status == Status.DEAD


def test_a_base_url_with_a_query_is_dead_with_the_reason(db: Any, stub_member: Any) -> None:
    """It was sent to {base}?tenant=x/Communication/c1."""
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url + "?tenant=codao")
    message = _enqueue(endpoint, "referral:1", _resource("c1"))
    assert deliver_outbox(message.pk) == "skipped"
    message.refresh_from_db()
    assert message.status == Status.DEAD
    assert "has a query or fragment" in message.last_error
    assert stub.requests == []


class _RawMember:
    """A member on a bare socket of 127.0.0.1, each connection handled by ``_handle`` on a
    thread of its own (to misbehave below HTTP)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/fhir"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class _Trickle(_RawMember):
    """A member that answers 200 with a body of 30 bytes, one every 0.1 s; with ``head``
    "status" it trickles its status line instead, with "headers" a header line after the
    status line: one byte every 0.1 s for 6 s."""

    def __init__(self, *, head: str = "") -> None:
        self.head = head
        super().__init__()

    def _handle(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")[1:]
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            rest += conn.recv(65536)
        try:
            if self.head:
                conn.sendall(
                    b"HTTP/1.1 200 " if self.head == "status" else b"HTTP/1.1 200 OK\r\nX: "
                )
                for _ in range(60):
                    time.sleep(0.1)
                    conn.sendall(b"x")
                conn.sendall(b"\r\nContent-Length: 0\r\n\r\n")
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
            for _ in range(30):
                time.sleep(0.1)
                conn.sendall(b"x")
        except OSError:
            pass  # the client stopped reading and closed
        conn.close()


def test_a_trickled_answer_is_read_no_longer_than_the_timeout(db: Any, settings: Any) -> None:
    """The read timeout bounds each receive, not the answer: a member trickling its body
    kept the send open for 3 s past a 0.5 s timeout, past the lease, and the message was
    sent again meanwhile. The status came at once; it counts."""
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 0.5
    member = _Trickle()
    try:
        endpoint = EndpointFactory.create(base_url=member.base_url)
        message = _enqueue(endpoint, "referral:1", _resource("c1"))
        started = time.monotonic()
        assert deliver_outbox(message.pk) == "delivered"
        assert time.monotonic() - started < 1.5
    finally:
        member.close()


@pytest.mark.parametrize("head", ["status", "headers"])
def test_a_trickled_status_line_or_header_ends_the_send_at_its_deadline(
    db: Any, settings: Any, head: str
) -> None:
    """Each receive of the status line and headers was bounded by the read timeout, not
    the answer: a member sending them a byte per 0.1 s held the send for 6 s past a 0.5 s
    timeout (and past the lease). The watchdog ends it at connect bound + timeout (1 s
    here). An answer whose head did not come whole is no answer: a failure, retried later
    (a complete head counts even when the body trickles, above)."""
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 0.5
    member = _Trickle(head=head)
    try:
        endpoint = EndpointFactory.create(base_url=member.base_url)
        message = _enqueue(endpoint, "referral:1", _resource("c1"))
        started = time.monotonic()
        assert deliver_outbox(message.pk) == "failed"
        assert time.monotonic() - started < 2.5
        message.refresh_from_db()
        assert message.status == Status.FAILED
        assert message.last_error == "no answer within 1 s (status line or headers)"
        assert not delivery._WATCHDOG._armed and not delivery._WATCHDOG._fired
    finally:
        member.close()


class _SlowReader(_RawMember):
    """A member that reads requests 64 KiB per 0.05 s and never answers."""

    def _handle(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                time.sleep(0.05)
        except OSError:
            pass
        conn.close()


def test_a_request_the_member_reads_slowly_ends_within_the_timeout(db: Any, settings: Any) -> None:
    """Writing the request is bounded in all, not per write (Python's ``sendall`` counts
    its timeout over the whole call, and the headers and body go in one call): a member
    reading an 8 MB message 64 KiB per 0.05 s, never idle for a whole timeout, would
    otherwise hold the send for 6 s."""
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 0.5
    member = _SlowReader()
    try:
        endpoint = EndpointFactory.create(base_url=member.base_url)
        with transaction.atomic():
            row = store_version(
                resource_type="Communication",
                logical_id="large",
                resource={
                    "resourceType": "Communication",
                    "status": "completed",
                    "payload": [{"contentString": "x" * 8_000_000}],
                },
                fhir_version="4.0",
            )
        message = _enqueue(endpoint, "referral:1", row)
        started = time.monotonic()
        assert deliver_outbox(message.pk) == "failed"
        assert time.monotonic() - started < 2.5
        message.refresh_from_db()
        assert "timed out" in message.last_error
    finally:
        member.close()


class _KeepAlive:
    """An HTTP/1.1 member that keeps connections alive; answer n waits ``delays[n]`` s."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = list(delays)
        self.peers: list[tuple[str, int]] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    delay = outer.delays.pop(0) if outer.delays else 0.0
                    outer.peers.append(self.client_address)
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir/Communication/c"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _claim(url: str, number: int) -> delivery.Claim:
    return delivery.Claim(number, "t", "PUT", url, b'{"resourceType":"Communication"}', {"X": "1"})


def test_a_finished_sends_deadline_never_cuts_the_next_send_on_its_connection(
    settings: Any, monkeypatch: Any
) -> None:
    """urllib3 returns a connection to the pool as soon as the body is read, before the
    send ends: found by a review, a send whose end was delayed past its deadline (here a
    sleep) had its deadline fire on the kept-alive connection another send had taken, and
    that send failed although its member answered within its limits. The pool now
    disarms a connection when it comes back."""
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 1.0  # deadlines: start + 2 s
    member = _KeepAlive([0.0, 0.9])
    real_disarm = delivery._disarm
    results: dict[str, delivery.Answer] = {}
    first_started = time.monotonic()

    def late_disarm() -> bool:
        if threading.current_thread().name == "first" and "second" not in results:
            time.sleep(max(0.0, first_started + 1.5 - time.monotonic()))
            second = threading.Thread(
                target=lambda: results.__setitem__("second", delivery._send(_claim(member.url, 2))),
                name="second",
            )
            second.start()
            second.join(10)
        return real_disarm()

    monkeypatch.setattr(delivery, "_disarm", late_disarm)
    try:
        first = threading.Thread(
            target=lambda: results.__setitem__("first", delivery._send(_claim(member.url, 1))),
            name="first",
        )
        first.start()
        first.join(15)

        assert len(set(member.peers)) == 1  # the second send took the first's connection
        assert results["first"].status == 200
        assert results["second"].status == 200, results["second"]
        assert not delivery._WATCHDOG._armed and not delivery._WATCHDOG._fired
    finally:
        member.close()


def test_kept_alive_connections_are_reused_and_left_alone(settings: Any) -> None:
    """Sends that end in time disarm their deadline: their kept-alive connection is used
    by the next send, not shut down under it."""
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 0.5
    member = _KeepAlive([0.0] * 5)
    try:
        answers = [delivery._send(_claim(member.url, n)) for n in range(5)]
        time.sleep(1.2)  # past every deadline
        answers.append(delivery._send(_claim(member.url, 5)))
    finally:
        member.close()
    assert [a.status for a in answers] == [200] * 6
    assert len(set(member.peers)) == 1  # one connection throughout
    assert not delivery._WATCHDOG._armed and not delivery._WATCHDOG._fired


def test_a_forked_child_starts_a_watchdog_of_its_own() -> None:
    """The parent's heap names the parent's sockets (shutting one down from the child
    would cut the parent's connection) and its lock may be held at the fork."""
    parent = delivery._WATCHDOG
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it has a new one, and exit at once
        os.write(write, b"1" if delivery._WATCHDOG is not parent else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.close(write)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("aggregates", [1, 6], ids=["one-run", "six-runs"])
def test_no_request_starts_when_it_could_outlast_the_lease(
    stub_member: Any, settings: Any, aggregates: int
) -> None:
    """A batch sends each aggregate's run in order under one lease: six answers of 0.3 s
    (each within the 0.5 s timeout) outlasted a 2.5 s lease minus the two timeouts a
    request may take, and a drain sent some of them a second time — in one long run, and
    (found by a review of the first fix) as the first request of runs the sender thread
    reached late."""
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 0.5
    settings.FHIR_OUTBOX_LEASE_SECONDS = 2.5
    stub = stub_member([("slow", 0.3)] * 40)
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    messages = [
        _enqueue(endpoint, f"referral:{i % aggregates}", _resource(f"c{i}")) for i in range(6)
    ]

    report = delivery.outbox_deliver_batch(limit=50, concurrency=1)

    # 2.5 - 2 x 0.5 - 1 = 0.5 s of sending: two or three answers, the rest back in the
    # queue, its attempts not counted.
    assert 1 <= report.delivered < len(messages)
    assert report.released == len(messages) - report.delivered
    assert OutboxMessage.objects.filter(status=Status.DELIVERED).count() == report.delivered
    assert not OutboxMessage.objects.filter(status=Status.PENDING, attempts__gt=0).exists()
    while delivery.outbox_deliver_batch(limit=50, concurrency=1).claimed:
        pass
    keys = [r["key"] for r in stub.requests]
    assert sorted(keys) == sorted(m.idempotency_key for m in messages)  # each once
    for aggregate in {m.aggregate_key for m in messages}:  # in order per aggregate
        mine = [m.idempotency_key for m in messages if m.aggregate_key == aggregate]
        assert [k for k in keys if k in mine] == mine


class _Throttling(BaseHTTPRequestHandler):
    retry_after = "3600"

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(429)
        self.send_header("Retry-After", type(self).retry_after)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


def test_a_throttling_members_retry_after_is_honoured(db: Any) -> None:
    """429 with Retry-After: 3600 was retried within 2 s, and dead after 8 such attempts
    (~4 minutes) while the member only asked for patience."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Throttling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = EndpointFactory.create(
            base_url=f"http://127.0.0.1:{server.server_address[1]}/fhir"
        )
        message = _enqueue(endpoint, "referral:1", _resource("c1"))
        before = timezone.now()
        assert deliver_outbox(message.pk) == "failed"
        message.refresh_from_db()
        wait = (message.next_attempt_at - before).total_seconds()
        assert 3599 <= wait <= 3602
        assert (message.status, message.last_status_code) == (Status.FAILED, 429)
    finally:
        server.shutdown()
        server.server_close()


def test_retry_after_values() -> None:
    now = timezone.now().replace(microsecond=0)
    later = format_datetime(now + timedelta(seconds=120), usegmt=True)
    assert delivery.retry_after_seconds("120", now) == 120
    assert delivery.retry_after_seconds(later, now) == 120
    assert delivery.retry_after_seconds("99999999", now) == delivery.MAX_RETRY_AFTER_SECONDS
    assert (
        delivery.retry_after_seconds(format_datetime(now - timedelta(days=1), usegmt=True), now)
        == 0
    )
    # asctime (no zone: GMT, RFC 9110 5.6.7) and leading zeros (found by a review)
    asctime = (now + timedelta(seconds=120)).astimezone(UTC).strftime("%a %b %d %H:%M:%S %Y")
    assert delivery.retry_after_seconds(asctime, now) == 120
    assert delivery.retry_after_seconds("0000000000120", now) == 120
    for bad in (None, "", "-5", "soon", "1.5", "\u0661\u0662"):
        assert delivery.retry_after_seconds(bad, now) is None, bad


@pytest.mark.parametrize(
    "url",
    [
        "/admin/fhir_gateway/outboxmessage/?resource_type__exact=%00",
        "/admin/fhir_gateway/outboxmessage/?status__exact=%00",
        "/admin/fhir_gateway/intakejob/?status__exact=%00",
    ],
)
def test_an_admin_filter_with_a_nul_is_400_not_500(admin_client: Any, url: str) -> None:
    response = admin_client.get(url)
    assert response.status_code == 400


@pytest.mark.django_db(transaction=True)
def test_a_lease_too_short_for_the_bound_still_delivers(stub_member: Any, settings: Any) -> None:
    """Found by a review: a bound just above zero let no run start; every batch claimed
    and released the same messages until the drain gave up."""
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 0.5
    settings.FHIR_OUTBOX_LEASE_SECONDS = 2.000001
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    messages = [_enqueue(endpoint, f"referral:{i}", _resource(f"c{i}")) for i in range(30)]
    report = delivery.outbox_drain(limit=50, concurrency=4)
    assert (report.delivered, report.released) == (len(messages), 0)


@pytest.mark.django_db(transaction=True)
def test_the_lease_bound_counts_from_before_the_claim(
    stub_member: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: the bound ran from after the claim's commit while the lease ran
    from before it, so a slow claim let requests start past the bound."""
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 0.5
    settings.FHIR_OUTBOX_LEASE_SECONDS = 2.5  # bound: 0.5 s after the claim began
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    messages = [_enqueue(endpoint, f"referral:{i}", _resource(f"c{i}")) for i in range(3)]
    claim = delivery._claim_batch

    def slow_claim(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.8)
        return claim(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(delivery, "_claim_batch", slow_claim)
        report = delivery.outbox_drain(limit=50, concurrency=1)
    assert (report.claimed, report.delivered, report.released) == (3, 0, 3)
    assert stub.requests == []
    assert delivery.outbox_drain(limit=50, concurrency=1).delivered == len(messages)
