"""Fixtures of the FHIR gateway tests: a FHIR client, a small registry, stub member servers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.test import Client

from accounts.services import api_token_issue
from fhir_gateway.handlers import HANDLERS, ResourceHandler, register, stored_resource_handler
from fhir_gateway.registry_projection import project_registry
from registry.models import Department, Endpoint, Facility, PractitionerRole, SupportLink
from tests.factories import (
    CARDIOLOGY,
    PEDIATRICS,
    AreaFactory,
    CountryFactory,
    DepartmentFactory,
    EndpointFactory,
    FacilityFactory,
    FacilityIdentifierFactory,
    PractitionerRoleFactory,
    SpecialtyFactory,
    SupportLinkFactory,
    UserFactory,
)

FHIR_R4 = "application/fhir+json; fhirVersion=4.0"
FHIR_R5 = "application/fhir+json; fhirVersion=5.0"


class FhirClient:
    """Django's test client speaking FHIR with a bearer token."""

    def __init__(self, token: str | None) -> None:
        self.client = Client()
        self.token = token

    def _headers(self, headers: dict[str, str]) -> dict[str, str]:
        out = dict(headers)
        if self.token is not None and "Authorization" not in out:
            out["Authorization"] = f"Bearer {self.token}"
        return out

    def get(self, path: str, **headers: str) -> Any:
        return self.client.get(path, headers=self._headers(headers))

    def post(self, path: str, body: Any, content_type: str = FHIR_R4, **headers: str) -> Any:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        return self.client.post(
            path, data=data, content_type=content_type, headers=self._headers(headers)
        )

    def put(self, path: str, body: Any, content_type: str = FHIR_R4, **headers: str) -> Any:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        return self.client.put(
            path, data=data, content_type=content_type, headers=self._headers(headers)
        )

    def patch(
        self,
        path: str,
        body: Any,
        content_type: str = "application/json-patch+json",
        **headers: str,
    ) -> Any:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        return self.client.patch(
            path, data=data, content_type=content_type, headers=self._headers(headers)
        )

    def delete(self, path: str, **headers: str) -> Any:
        return self.client.delete(path, headers=self._headers(headers))

    def request(self, method: str, path: str, **headers: str) -> Any:
        return self.client.generic(method, path, headers=self._headers(headers))


@pytest.fixture
def member_user(db: None) -> Any:
    return UserFactory.create(facility=FacilityFactory.create(code="MEMBER"))


@pytest.fixture
def fhir(member_user: Any) -> FhirClient:
    return FhirClient(api_token_issue(user=member_user, name="fhir-tests").raw)


@pytest.fixture
def anonymous(db: None) -> FhirClient:
    return FhirClient(None)


def outcome_issue(response: Any) -> dict[str, Any]:
    """The single issue of an OperationOutcome answer (asserts the shape)."""
    body = json.loads(response.content)
    assert body["resourceType"] == "OperationOutcome", body
    assert len(body["issue"]) == 1
    return body["issue"][0]


@pytest.fixture
def no_serialisation(monkeypatch: Any) -> None:
    """From here on, any fhir.resources validation or serialisation fails the test."""
    from fhir_core.fhirabstractmodel import FHIRAbstractModel

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fhir.resources was called on the read path")

    for name in ("model_dump_json", "model_dump", "model_validate", "model_validate_json"):
        monkeypatch.setattr(FHIRAbstractModel, name, refuse)


@pytest.fixture
def communication_type() -> Iterator[ResourceHandler]:
    """A writable stored type (plain storage, no domain mapping) for the write-path tests."""
    previous = HANDLERS.get("Communication")
    handler = register(stored_resource_handler("Communication"))
    yield handler
    if previous is None:
        HANDLERS.pop("Communication", None)
    else:
        register(previous)


@dataclass
class Network:
    hub: Facility
    spoke: Facility
    lao: Facility
    pediatrics: Department
    cardiology: Department
    endpoint: Endpoint
    link: SupportLink
    role: PractitionerRole


@pytest.fixture
def network(db: None) -> Network:
    """Three facilities (Hà Nội hub, island spoke, Lao hospital), two departments, one link."""
    vn = CountryFactory.create(code="VN", name="Viet Nam")
    la = CountryFactory.create(code="LA", name="Lao PDR")
    hanoi = AreaFactory.create(country=vn, name="Hà Nội", code="HN")
    hub = FacilityFactory.create(
        code="BVNTU",
        name="Bệnh viện Nhi Trung ương",
        name_local="Vietnam National Children's Hospital",
        country=vn,
        area=hanoi,
        tier=1,
        latitude=21.0245,
        longitude=105.8012,
    )
    spoke = FacilityFactory.create(
        code="CODAO",
        name="Trung tâm Y tế Côn Đảo",
        country=vn,
        tier=3,
        latitude=8.6833,
        longitude=106.6,
        parent=hub,
    )
    lao = FacilityFactory.create(
        code="LAO-01", name="Mahosot Hospital", country=la, tier=1, latitude=17.96, longitude=102.61
    )
    FacilityIdentifierFactory.create(facility=hub, system="https://moh.gov.vn/fac", value="01-001")
    pediatrics = DepartmentFactory.create(
        facility=hub, specialty=SpecialtyFactory.create(code=PEDIATRICS), name="Khoa Nhi tổng hợp"
    )
    cardiology = DepartmentFactory.create(
        facility=hub, specialty=SpecialtyFactory.create(code=CARDIOLOGY), name="Tim mạch"
    )
    endpoint = EndpointFactory.create(facility=spoke, base_url="https://codao.example.org/fhir")
    link = SupportLinkFactory.create(hub=hub, spoke=spoke, specialties=[pediatrics.specialty])
    role = PractitionerRoleFactory.create(department=pediatrics)
    project_registry()
    return Network(hub, spoke, lao, pediatrics, cardiology, endpoint, link, role)


# --------------------------------------------------------------------------- stub members


@dataclass
class StubMember:
    """A member FHIR server on 127.0.0.1 that applies each Idempotency-Key once.

    ``script`` is consumed one entry per request: an int status to answer, or
    ("slow", seconds) to apply the change and answer 200 only after sleeping (the client
    times out first). When the script is empty the stub answers 200.
    """

    script: list[Any] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # keys, in the order applied
    bodies: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    base_url: str = ""

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, float]:
        key = headers.get("Idempotency-Key", "")
        with self.lock:
            self.requests.append(
                {
                    "method": method,
                    "path": path,
                    "key": key,
                    "content_type": headers.get("Content-Type", ""),
                    "authorization": headers.get("Authorization", ""),
                    "body": body,
                }
            )
            step = self.script.pop(0) if self.script else 200
            if isinstance(step, int) and step >= 300:
                return step, 0.0
            if key not in self.bodies:  # apply once per key
                self.applied.append(key)
                self.bodies[key] = body
            return 200, float(step[1]) if isinstance(step, tuple) else 0.0


def _handler_class(stub: StubMember) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            status, delay = stub.handle(self.command, self.path, self.headers, body)
            if delay:
                time.sleep(delay)
            payload = b'{"resourceType":"OperationOutcome","issue":[]}'
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_PUT = _serve
        do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


@pytest.fixture
def stub_member() -> Iterator[Callable[..., StubMember]]:
    servers: list[ThreadingHTTPServer] = []

    def start(script: list[Any] | None = None) -> StubMember:
        stub = StubMember(script=list(script or []))
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(stub))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        stub.base_url = f"http://127.0.0.1:{server.server_address[1]}/fhir"
        return stub

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# The referral network of the referral mapping tests (defined beside its builders).
from fhir_gateway.tests.referral_world import world  # noqa: E402, F401
