"""Property-based fuzzing of the REST API under /api: bad input never gives a 500.

Modelled on fhir_gateway/tests/test_fuzz.py. Each test starts from a VALID request (checked
by ``test_the_fuzzed_requests_start_valid``) and applies random mutations to its JSON body
(drop a key, a value of another JSON type, huge / unicode / NUL strings, huge numbers,
negative ids, ids of other objects, unknown keys) or to its query string, path ids and
headers (Content-Type, charset, Accept, If-Match, Authorization, raw bodies). Every answer
must be < 500, and every 4xx a JSON problem (``core.exceptions.api_exception_handler``:
an object with ``status``, ``code`` and ``detail``). An exception Django logs on
``django.request`` (the 500 handler) counts as a 500.

What it found, each fixed and pinned by a test of its own (tests/test_api_errors.py): JSON
nested deeper than the interpreter follows, a NUL in a report filter or a web-form
message, report dates whose period arithmetic left Python's date range, HTML 404 pages
for /api paths that route nowhere, and report errors rendered as CSV / XLSX bytes.
``API_FUZZ_SCALE=10`` hunts ten times longer.

Each example runs in a savepoint rolled back at its end (``rolled_back``), so examples do
not see each other's writes. Deterministic (``derandomize``).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from hypothesis import event, given, settings
from hypothesis import strategies as st

from accounts.models import User
from accounts.roles import Role
from accounts.services import api_token_issue
from referrals.apis import ACTION_VIEWS
from referrals.models import WORKLIST_STATES, Notification, Referral, ReferralState
from referrals.tests.conftest import build_world
from referrals.workflow import TRANSITIONS_BY_ACTION
from registry.models import ChangeRequest, Endpoint, Facility, Practitioner, SupportLink
from tests import fuzzing
from tests.factories import (
    CARDIOLOGY,
    AreaFactory,
    ChangeRequestFactory,
    EndpointFactory,
    PractitionerRoleFactory,
    SpecialtyFactory,
    SupportLinkFactory,
    UserFactory,
)
from tests.fuzzing import (
    JSON,
    ErrorLog,
    Mutations,
    Pool,
    Sent,
    assert_no_server_error,
    junk_values,
    logged_errors,
    rolled_back,
    wire,
)

pytestmark = pytest.mark.django_db

API = "/api/v1"


def fuzz_settings(max_examples: int) -> settings:
    """``API_FUZZ_SCALE=10`` tries ten times as many examples (a longer hunt)."""
    return fuzzing.fuzz_settings(max_examples, "API_FUZZ_SCALE")


# --------------------------------------------------------------------------- server errors


SERVER_LOGGERS = ("django.request", "core", "accounts", "referrals", "registry", "reports")


@pytest.fixture
def server_errors() -> Iterator[ErrorLog]:
    """Exceptions logged at ERROR (Django's 500 handler, the apps' own loggers)."""
    with logged_errors(*SERVER_LOGGERS) as log:
        yield log


def check(response: Any, sent: Sent, errors: ErrorLog) -> None:
    """The rule: < 500, and every 4xx is a JSON problem."""
    status = response.status_code
    event(f"answer {status}")  # pytest --hypothesis-show-statistics shows the spread
    assert_no_server_error(response, sent, errors)
    content_type = response.get("Content-Type", "")
    if 400 <= status < 500:
        accept = {k.lower(): v for k, v in sent.headers.items()}.get("accept", "")
        if "text/html" in accept:
            return  # the browsable API renders its errors as a page: asked for
        assert "json" in content_type, (
            f"{status} with Content-Type {content_type!r} for\n{sent}\n{response.content[:300]!r}"
        )
        try:
            problem = json.loads(response.content)
        except ValueError as exc:
            raise AssertionError(f"{status} answer not JSON for\n{sent}") from exc
        assert isinstance(problem, dict), f"{status} answer not an object for\n{sent}"
        assert problem.get("status") == status and "detail" in problem and "code" in problem, (
            f"{status} not a problem: {problem}\n{sent}"
        )
    elif status < 300 and response.content and "json" in content_type:
        json.loads(response.content)


def encode(payload: JSON) -> bytes:
    if isinstance(payload, bytes):
        return payload
    return json.dumps(payload).encode("utf-8", "surrogatepass")


def quote(value: str) -> str:
    return urllib.parse.quote(value, safe="", errors="surrogatepass")


# --------------------------------------------------------------------------- junk values

NASTY_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "null",
    "true",
    "0",
    "-1",
    "1.5",
    "1e999",
    "NaN",
    "Infinity",
    "9" * 30,
    "-" + "9" * 20,
    "x" * 30_000,
    "\uff58",  # a full-width x
    "\u0663",  # an Arabic-Indic digit: int() reads it as 3
    "Ω≈ç√∫ Bệnh viện Nhi",
    "😀" * 10,
    "<script>",
    "'; DROP TABLE x;--",
    "%00",
    "%",
    "../..",
    "\n\t",
    "2024-13-45",
    "2024-02-30",
    "0000-00-00",
    "9999-12-31T23:59:59+14:00",
    "2099-12-01T09:00:00",
    "2099-12-01T09:00:00+99:00",
    "-0001-01-01",
    "10000-01-01",
    "https://",
    "javascript:alert(1)",
    "http://[::1",
]

KEY_POOL = [
    "id",
    "pk",
    "expected_version",
    "version",
    "state",
    "department",
    "facility",
    "payload",
    "specialty",
    "bogus",
    "",
    "__proto__",
]

BIG = [2**31, 2**63, 2**64, -(2**63) - 1, 10**30, -1, 0]

junk = junk_values(NASTY_STRINGS, KEY_POOL, BIG)


# --------------------------------------------------------------------------- mutations


OPS = ["drop", "junk", "plausible", "plausible", "id", "unknown_key", "wrap", "unwrap"]


mutate = Mutations(junk, KEY_POOL, OPS)


# --------------------------------------------------------------------------- the network


# The states a user action can start from, each with one referral in it: a draft, every
# open state, and one that is finished.
STATES = [ReferralState.DRAFT, *WORKLIST_STATES, ReferralState.COMPLETED]


class Net:
    """The referral world of referrals/tests/conftest.py, plus the registry's other rows,
    users of every role with their HTTP clients (bearer tokens), and one referral in each
    state a user action starts from."""

    def __init__(self) -> None:
        w = build_world()
        self.w = w
        area = AreaFactory.create(country=w.country, code="FZ01", name="Tỉnh Fuzz")
        Facility.objects.filter(pk__in=[w.district.pk, w.hub.pk]).update(area=area, province=area)
        self.area = area
        self.cardiology = SpecialtyFactory.create(code=CARDIOLOGY)
        self.steward = UserFactory.create(username="fz-steward", roles=[Role.REGISTRY_STEWARD])
        self.coordinator = UserFactory.create(
            username="fz-coordinator", roles=[Role.COORDINATOR], facility=w.district
        )
        self.facility_admin = UserFactory.create(
            username="fz-admin", roles=[Role.FACILITY_ADMIN], facility=w.hub2
        )
        self.endpoint: Endpoint = EndpointFactory.create(facility=w.hub)
        self.link: SupportLink = SupportLinkFactory.create(
            hub=w.hub, spoke=w.district, specialties=[w.paeds]
        )
        self.change_request: ChangeRequest = ChangeRequestFactory.create(
            facility=w.hub2, proposed_by=self.facility_admin
        )
        role = PractitionerRoleFactory.create(department=w.hub_paeds)
        self.practitioner: Practitioner = role.practitioner
        self.referrals: dict[str, Referral] = {s: w.referral_in(s) for s in STATES}
        self.users: dict[str, User] = {
            "referrer": w.referrer,
            "foreign_referrer": w.foreign_referrer,
            "consultant": w.consultant,
            "consultant2": w.consultant2,
            "district_consultant": w.district_consultant,
            "ministry": w.ministry,
            "ministry_at_hub": w.ministry_at_hub,
            "steward": self.steward,
            "coordinator": self.coordinator,
            "facility_admin": self.facility_admin,
        }
        self.tokens = {
            name: api_token_issue(user=user, name="fuzz").raw for name, user in self.users.items()
        }
        self.notifications = list(Notification.objects.values_list("pk", flat=True)[:3])

    def __repr__(self) -> str:  # hypothesis prints it with each falsifying example
        return f"Net(referrals={ {s: r.pk for s, r in self.referrals.items()} })"

    def client(self, who: str) -> Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who != "anonymous" else {}
        return Client(raise_request_exception=False, headers=headers)

    def ids(self) -> list[JSON]:
        """Ids of other objects and junk ids, as JSON values."""
        w = self.w
        real: list[JSON] = [
            w.hub_paeds.pk,
            w.hub2_paeds.pk,
            w.district_paeds.pk,
            w.hub.pk,
            w.district.pk,
            w.referrer.pk,
            w.consultant.pk,
            self.steward.pk,
            self.referrals[ReferralState.ACCEPTED].pk,
            self.endpoint.pk,
            self.area.pk,
            self.change_request.pk,
        ]
        return [
            *real,
            *(str(i) for i in real[:4]),
            *BIG,
            -5,
            1.5,
            1e300,
            "abc",
            "\u0663",
            "",
            None,
            True,
            [],
            {},
            [w.hub_paeds.pk],
            {"id": w.hub_paeds.pk},
        ]


@pytest.fixture
def net(db: None, server_errors: ErrorLog) -> Net:
    return Net()


def send(
    net: Net,
    who: str,
    method: str,
    path: str,
    payload: JSON = None,
    content_type: str = "application/json",
    **headers: str,
) -> tuple[Any, Sent]:
    """The request as a server gets it: the body as bytes, headers as WSGI has them."""
    client = net.client(who)
    data = b"" if payload is None else encode(payload)
    response = client.generic(
        method,
        path,
        data=data,
        content_type=wire(content_type),
        headers={k: wire(v) for k, v in headers.items()},
    )
    shown = {"Content-Type": content_type, **headers} if payload is not None else dict(headers)
    return response, Sent(method, path, {"as": who, **shown}, payload)


# --------------------------------------------------------------------------- valid bodies


def submit_body(net: Net, placer: str = "FZ-NEW") -> dict[str, Any]:
    return {
        "placer_system": "urn:district-his",
        "placer_value": placer,
        "specialty": net.w.paeds.code,
        "priority": "urgent",
        "mode": "async",
        "clinical_question": "Fever for 5 days.",
        "patient": {"ref": "P-77", "sex": "female", "birth_year": 2022},
        "department": net.w.hub_paeds.pk,
        "campaign": "",
        "draft": False,
    }


def action_body(net: Net, action: str) -> dict[str, Any]:
    """Valid inputs of ``action`` (referrals/tests/conftest.py's, as JSON)."""
    body = dict(net.w.inputs_for(action))
    if action == "schedule":
        body["scheduled_at"] = (timezone.now() + timedelta(days=2)).isoformat()
    return body


def action_start(net: Net, action: str) -> tuple[Referral, str]:
    """A referral the action is allowed on, and who takes it."""
    transition = TRANSITIONS_BY_ACTION[action]
    state = next(s for s in STATES if s in transition.sources)
    who = "referrer" if transition.side == "requester" else "consultant"
    return net.referrals[state], who


def facility_body(code: str = "FZ-NEW") -> dict[str, Any]:
    return {
        "code": code,
        "name": "Bệnh viện mới",
        "country": "VN",
        "tier": 3,
        "latitude": 21.0,
        "longitude": 105.8,
        "languages": ["vi"],
        "beds": 100,
        "identifiers": [{"system": "https://moh.gov.vn/facility-code", "value": "99999"}],
    }


def registry_writes(net: Net) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(who, method, path, body) of valid registry writes."""
    w = net.w
    return [
        ("steward", "POST", f"{API}/facilities/", facility_body()),
        ("steward", "PATCH", f"{API}/facilities/{w.hub.pk}/", {"name": "Renamed", "beds": 5}),
        ("steward", "PUT", f"{API}/facilities/{w.hub2.pk}/", facility_body("P1")),
        (
            "steward",
            "POST",
            f"{API}/departments/",
            {
                "facility": w.hub.pk,
                "specialty": CARDIOLOGY,
                "name": "Khoa Tim mạch",
                "modes": ["async", "live"],
                "daily_capacity": 4,
                "sla_hours": 24,
                "languages": ["vi"],
            },
        ),
        ("steward", "PATCH", f"{API}/departments/{w.hub_paeds.pk}/", {"accepting": False}),
        (
            "steward",
            "POST",
            f"{API}/endpoints/",
            {"facility": w.district.pk, "base_url": "https://fhir.d1.example.org/fhir"},
        ),
        ("steward", "PATCH", f"{API}/endpoints/{net.endpoint.pk}/", {"status": "suspended"}),
        (
            "steward",
            "POST",
            f"{API}/support-links/",
            {
                "hub": w.hub2.pk,
                "spoke": w.district.pk,
                "specialties": [w.paeds.code],
                "valid_from": "2024-01-01",
                "valid_to": "2030-01-01",
            },
        ),
        ("steward", "PATCH", f"{API}/support-links/{net.link.pk}/", {"active": False}),
        (
            "facility_admin",
            "POST",
            f"{API}/change-requests/",
            {"facility": w.hub2.pk, "payload": {"name": "Bệnh viện tỉnh", "beds": 200}},
        ),
        (
            "steward",
            "POST",
            f"{API}/change-requests/{net.change_request.pk}/approve/",
            {"comment": "ok"},
        ),
        (
            "steward",
            "POST",
            f"{API}/change-requests/{net.change_request.pk}/reject/",
            {"comment": "no"},
        ),
    ]


def registry_pool(net: Net) -> Pool:
    w = net.w
    return Pool(
        ids=net.ids(),
        fields=[
            (("code",), ["C1", "FZ NEW", "x" * 65, "FZ-Ω"]),
            (("country",), ["VN", "vn", "XX", "", 1]),
            (("area",), [net.area.pk, 10**20, -1, "1"]),
            (("tier",), [1, 4, 5, 0, "3", "x"]),
            (("latitude",), [91, -90, "NaN", "Infinity", 1e308, None]),
            (("longitude",), [181, None, "1e999", "-0"]),
            (("parent",), ["C1", "P1", "nope", None]),
            (("languages",), [[], ["VI"], ["vi"] * 21, "vi", [None], ["x" * 17]]),
            (("beds",), [-1, 2**63, 10**30, "1"]),
            (("identifiers",), [[], [{}], [{"system": "a", "value": "b"}] * 2, {"a": 1}]),
            (("identifiers", 0, "value"), ["x" * 256, "", None, 1]),
            (("operational_status",), ["closed", "bogus"]),
            (("ownership",), ["public", "bogus"]),
            (("facility",), [w.hub.pk, w.district.pk, 2**63, -1, "x", None]),
            (("specialty",), [CARDIOLOGY, "000", "", 394537008]),
            (("modes",), [[], ["async"] * 4, ["bogus"], "async", ["transfer"]]),
            (("daily_capacity",), [-1, 2**31, 2**63]),
            (("sla_hours",), [0, 24 * 31, 2**63]),
            (("base_url",), ["ftp://x", "http://", "x" * 2000, "https://fhir.hub.example.org"]),
            (("fhir_version",), ["4.0.1", "5.0.0", "bogus"]),
            (("auth_type",), ["none", "bogus"]),
            (("status",), ["active", "off", "bogus"]),
            (("hub",), [w.hub.pk, w.district.pk, w.hub2.pk, 2**63, -1]),
            (("spoke",), [w.hub.pk, w.district.pk, w.foreign_district.pk]),
            (("specialties",), [[], ["000"], [CARDIOLOGY, CARDIOLOGY], "x"]),
            (("valid_from",), ["2031-01-01", "0001-01-01", "9999-12-31", "x", None]),
            (("valid_to",), ["2000-01-01", "10000-01-01", None]),
            (("payload",), [{}, [], "x", {"code": "C1"}, {"name": "x" * 300}, {"country": "XX"}]),
            (("payload", "parent"), ["P1", "C1", None]),
            (("payload", "area"), [net.area.pk, 10**20]),
            (("comment",), ["", None, "x" * 30_000, 1]),
        ],
    )


# --------------------------------------------------------------------------- 0. baseline


def test_the_fuzzed_requests_start_valid(net: Net, server_errors: ErrorLog) -> None:
    """Unmutated, each base request succeeds: the fuzzing starts from valid input."""
    with rolled_back():
        response, sent = send(net, "referrer", "POST", f"{API}/referrals/", submit_body(net))
        assert response.status_code == 201, f"{sent}\n{response.content!r}"
    for action in ACTION_VIEWS:
        referral, who = action_start(net, action)
        with rolled_back():
            response, sent = send(
                net,
                who,
                "POST",
                f"{API}/referrals/{referral.pk}/{action}/",
                action_body(net, action),
                **{"If-Match": f'"{referral.version}"'},
            )
            assert response.status_code == 200, f"{sent}\n{response.content!r}"
    for who, method, path, body in registry_writes(net):
        with rolled_back():
            response, sent = send(net, who, method, path, body)
            assert response.status_code in (200, 201), f"{sent}\n{response.content!r}"
    for path in list_paths(net):
        with rolled_back():
            who = "steward" if "change-requests" in path else "referrer"
            who = "consultant" if "worklist" in path else who
            response, sent = send(net, who, "GET", path + "?page=1")
            assert response.status_code == 200, f"{sent}\n{response.content!r}"
    assert not [r for r in server_errors.records if r.exc_info]


# --------------------------------------------------------------------------- 1. intake


@fuzz_settings(max_examples=250)
@given(data=st.data())
def test_mutated_submissions_never_500(
    net: Net, server_errors: ErrorLog, data: st.DataObject
) -> None:
    existing = net.referrals[ReferralState.SUBMITTED].placer_value
    placer = data.draw(st.sampled_from(["FZ-NEW", "FZ-NEW", existing]), label="placer")
    w = net.w
    pool = Pool(
        ids=net.ids(),
        fields=[
            (("placer_value",), ["x" * 256, "", " ", "\x00", existing]),
            (("placer_system",), ["x" * 256, "", "\x00"]),
            (("specialty",), [CARDIOLOGY, "000", "", 394537008, None]),
            (("specialty_system",), ["", "http://loinc.org", "\x00"]),
            (("priority",), ["routine", "asap", "stat", "bogus", 1, ""]),
            (("mode",), ["live", "transfer", "bogus", None]),
            (("clinical_question",), ["", " ", "\x00", "x" * 20_001]),
            (("patient",), [None, {}, [], "x", {"ref": "x" * 129}]),
            (("patient", "birth_year"), [1899, 2101, "2022", True, 2**63, None, 2022.5]),
            (("patient", "sex"), ["male", "other", "unknown", "bogus", ""]),
            (("patient", "ref"), ["x" * 129, "", None, "\x00"]),
            (
                ("department",),
                [w.hub2_paeds.pk, w.district_paeds.pk, None, 2**63, -1, "x", str(w.hub_paeds.pk)],
            ),
            (("campaign",), ["x" * 101, None, "\x00"]),
            (("draft",), [True, "yes", "maybe", 1, None]),
        ],
    )
    body = mutate(data, submit_body(net, placer), pool)
    who = data.draw(
        st.sampled_from(["referrer"] * 4 + ["coordinator", "consultant", "ministry_at_hub"]),
        label="who",
    )
    with rolled_back():
        response, sent = send(net, who, "POST", f"{API}/referrals/", body)
        check(response, sent, server_errors)


# --------------------------------------------------------------------------- 2. actions

IF_MATCH_VALUES = [
    "*",
    "",
    '"1"',
    'W/"1"',
    '"99"',
    '"-1"',
    '"0"',
    '"99999999999999999999999"',
    '"' + "9" * 5000 + '"',
    '"abc"',
    '""',
    "W/",
    '"1", "2"',
    '"\u0663"',
    '"1.0"',
    '" 1"',
    '"1_000"',
    '"+1"',
    "\x00",
]


@fuzz_settings(max_examples=500)
@given(data=st.data())
def test_mutated_actions_never_500(net: Net, server_errors: ErrorLog, data: st.DataObject) -> None:
    """Every workflow action on a referral it is allowed on (sometimes another), with
    mutated inputs, odd If-Match and other callers."""
    w = net.w
    action = data.draw(st.sampled_from(sorted(ACTION_VIEWS)), label="action")
    referral, who = action_start(net, action)
    if data.draw(st.integers(0, 5), label="other referral") == 5:
        referral = data.draw(st.sampled_from(list(net.referrals.values())), label="referral")
    if data.draw(st.integers(0, 4), label="other caller") == 4:
        who = data.draw(st.sampled_from(sorted(net.users)), label="who")
    now = timezone.now()
    pool = Pool(
        ids=net.ids(),
        fields=[
            (("department",), [w.hub_paeds.pk, w.district_paeds.pk, w.hub2_paeds.pk, 2**63, -1]),
            (("reason_code",), ["no_capacity", "other", "bogus", 1]),
            (("reason",), ["", " ", "\x00", "x" * 20_001]),
            (("note",), ["", None, "\x00", "x" * 20_001]),
            (("question",), ["", "\x00", "x" * 20_001]),
            (("text",), ["", "\x00", "x" * 20_001]),
            (("clinical_question",), ["", "x" * 20_001]),
            (
                ("scheduled_at",),
                [
                    (now - timedelta(days=1)).isoformat(),
                    "2099-12-01T09:00:00",
                    "2099-12-01",
                    "9999-12-31T23:59:59+14:00",
                    "0001-01-01T00:00:00-14:00",
                    "2099-12-01T09:00:00+23:59",
                    1e12,
                ],
            ),
            (
                ("experts",),
                [
                    [],
                    [w.ministry.pk],
                    [2**63],
                    [-1],
                    [w.consultant.pk] * 3,
                    [str(w.consultant.pk)],
                    [1.5],
                    w.consultant.pk,
                ],
            ),
            (("video_url",), ["ftp://x", "https://" + "x" * 600, "javascript:alert(1)", ""]),
            (("minutes",), ["", "x" * 20_001]),
            (("disposition",), ["transfer", "manage_locally", "bogus", ""]),
            (("transfer_originally_considered",), [False, "true", "yes", 1, None]),
            (("outcome",), ["avoided", "transferred", "bogus", ""]),
            (("expected_version",), [referral.version, referral.version - 1, -1, "x", 2**63]),
        ],
    )
    body = mutate(data, action_body(net, action), pool)
    headers: dict[str, str] = {}
    if data.draw(st.integers(0, 2), label="with If-Match") > 0:
        headers["If-Match"] = data.draw(
            st.sampled_from([f'"{referral.version}"', f'W/"{referral.version}"', *IF_MATCH_VALUES]),
            label="if_match",
        )
    with rolled_back():
        path = f"{API}/referrals/{referral.pk}/{action}/"
        response, sent = send(net, who, "POST", path, body, **headers)
        check(response, sent, server_errors)


# --------------------------------------------------------------------------- 3. lists


def list_paths(net: Net) -> list[str]:
    return [
        f"{API}/referrals/outgoing/",
        f"{API}/referrals/worklist/",
        f"{API}/notifications/",
        f"{API}/countries/",
        f"{API}/areas/",
        f"{API}/specialties/",
        f"{API}/facilities/",
        f"{API}/departments/",
        f"{API}/practitioners/",
        f"{API}/endpoints/",
        f"{API}/support-links/",
        f"{API}/change-requests/",
        f"{API}/facilities/{net.w.hub.pk}/revisions/",
        f"{API}/reports/",
        f"{API}/reports/summary/",
        f"{API}/reports/response-times/",
        f"{API}/reports/capacity/",
        f"{API}/reports/metrics/",
    ]


PARAMS = [
    "page",
    "page_size",
    "state",
    "department",
    "unread",
    "ordering",
    "search",
    "q",
    "country",
    "country__code",
    "level",
    "parent",
    "area",
    "tier",
    "specialty",
    "mode",
    "accepting",
    "active",
    "remote",
    "facility",
    "fhir_version",
    "status",
    "hub",
    "spoke",
    "is_cross_border",
    "period",
    "from",
    "to",
    "province",
    "campaign",
    "cross_border",
    "by",
    "metric",
    "format",
    "lat",
    "lon",
    "radius_km",
    "limit",
]
PLAUSIBLE_VALUES = [
    "1",
    "2",
    "0",
    "-1",
    "500",
    "501",
    "99999999999999999999",
    "9223372036854775808",
    "1e3",
    "1.5",
    "true",
    "false",
    "yes",
    "2",
    "submitted",
    "accepted",
    "draft",
    "bogus",
    "VN",
    "vn",
    "XX",
    "394537008",
    "async",
    "live",
    "transfer",
    "4.0.1",
    "active",
    "pending",
    "day",
    "week",
    "month",
    "quarter",
    "year",
    "2024-01-01",
    "2024-12-31",
    "2024-02-30",
    "0001-01-01",
    "9999-12-31",
    "2024-01-01T00:00:00Z",
    "country",
    "specialty,tier",
    "specialty,specialty",
    ",",
    "referrals",
    "avoided_transfers",
    "json",
    "csv",
    "xlsx",
    "api",
    "html",
    "21.0",
    "105.8",
    "91",
    "nan",
    "inf",
    "-name",
    "name",
    "bệnh viện",
    "last",
]


def query_values(net: Net) -> st.SearchStrategy[str]:
    ids = [str(i) for i in net.ids() if isinstance(i, int | str) and not isinstance(i, bool)]
    return st.one_of(
        st.sampled_from(PLAUSIBLE_VALUES),
        st.sampled_from(ids),
        st.sampled_from(NASTY_STRINGS),
        st.text(max_size=10),
    )


@fuzz_settings(max_examples=450)
@given(data=st.data())
def test_random_list_queries_never_500(
    net: Net, server_errors: ErrorLog, data: st.DataObject
) -> None:
    """List, report and search endpoints with random filters, pages and junk."""
    paths = [*list_paths(net), f"{API}/departments/nearby/", f"{API}/reports/drilldown/"]
    path = data.draw(st.sampled_from(paths), label="path")
    pairs = data.draw(
        st.lists(
            st.tuples(st.sampled_from(PARAMS) | st.text(max_size=6), query_values(net)),
            max_size=5,
        ),
        label="params",
    )
    if data.draw(st.booleans(), label="raw"):  # unencoded: stray %, &, ; and unicode
        query = "&".join(f"{n}={v}" for n, v in pairs)
        query = urllib.parse.quote(query, safe="=&%;,+", errors="surrogatepass")
    else:
        query = urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote, errors="surrogatepass")
    who = data.draw(
        st.sampled_from(["referrer", "consultant", "ministry", "steward", "coordinator"]),
        label="who",
    )
    with rolled_back():
        response, sent = send(net, who, "GET", f"{path}?{query}")
        check(response, sent, server_errors)


# --------------------------------------------------------------------------- 4. registry writes


@fuzz_settings(max_examples=350)
@given(data=st.data())
def test_mutated_registry_writes_never_500(
    net: Net, server_errors: ErrorLog, data: st.DataObject
) -> None:
    who, method, path, body = data.draw(st.sampled_from(registry_writes(net)), label="write")
    if data.draw(st.integers(0, 5), label="other method") == 5:
        method = data.draw(st.sampled_from(["PUT", "PATCH", "POST"]), label="method")
    if data.draw(st.integers(0, 6), label="other caller") == 6:
        who = data.draw(st.sampled_from(sorted(net.users)), label="who")
    changed = mutate(data, body, registry_pool(net))
    with rolled_back():
        response, sent = send(net, who, method, path, changed)
        check(response, sent, server_errors)


# --------------------------------------------------------------------------- 5. ids in paths


@fuzz_settings(max_examples=250)
@given(data=st.data())
def test_junk_ids_in_paths_never_500(
    net: Net, server_errors: ErrorLog, data: st.DataObject
) -> None:
    """Details, sub-resources and actions with ids that route but name nothing (or
    something else, or another caller's)."""
    digits = st.sampled_from(
        [str(r.pk) for r in net.referrals.values()]
        + ["0", "9" * 19, "9" * 30, "9223372036854775808", "1" + "0" * 400]
    )
    segment = st.one_of(
        digits,
        st.sampled_from([str(i) for i in net.ids() if isinstance(i, int)]),
        st.sampled_from([*NASTY_STRINGS[:16], "-1", "1.5", " 1", "C1", "VN", "394537008"]),
        st.text(max_size=8),
    )
    kind = data.draw(
        st.sampled_from(
            [
                "referral",
                "suggestions",
                "attachments",
                "attachment",
                "action",
                "notification",
                "registry",
                "revisions",
                "review",
            ]
        ),
        label="kind",
    )
    number = data.draw(digits, label="number")
    other = quote(data.draw(segment, label="segment"))
    method = "GET"
    if kind == "referral":
        path = f"{API}/referrals/{number}/"
    elif kind == "suggestions":
        path = f"{API}/referrals/{number}/suggestions/"
    elif kind == "attachments":
        path = f"{API}/referrals/{number}/attachments/"
    elif kind == "attachment":
        path = f"{API}/referrals/{number}/attachments/{data.draw(digits, label='aid')}/"
    elif kind == "action":
        action = data.draw(st.sampled_from(sorted(ACTION_VIEWS)), label="action")
        path, method = f"{API}/referrals/{number}/{action}/", "POST"
    elif kind == "notification":
        path, method = f"{API}/notifications/{number}/read/", "POST"
    elif kind == "revisions":
        path = f"{API}/facilities/{other}/revisions/"
    elif kind == "review":
        verb = data.draw(st.sampled_from(["approve", "reject"]), label="verb")
        path, method = f"{API}/change-requests/{other}/{verb}/", "POST"
    else:
        resource = data.draw(
            st.sampled_from(
                [
                    "countries",
                    "areas",
                    "specialties",
                    "facilities",
                    "departments",
                    "practitioners",
                    "endpoints",
                    "support-links",
                    "change-requests",
                ]
            ),
            label="resource",
        )
        path = f"{API}/{resource}/{other}/"
        method = data.draw(st.sampled_from(["GET", "GET", "PATCH", "PUT"]), label="method")
    who = data.draw(st.sampled_from(sorted(net.users)), label="who")
    with rolled_back():
        body: JSON = {} if method != "GET" else None
        response, sent = send(net, who, method, path, body)
        check(response, sent, server_errors)


# --------------------------------------------------------------------------- 5b. reports

REPORT_VALUES: dict[str, list[str]] = {
    "period": ["day", "week", "month", "quarter", "year", "", "DAY", "decade"],
    "from": ["2024-01-01", "0001-01-01", "0001-01-02", "9999-12-31", "2024-02-30", "20240101"],
    "to": ["2024-12-31", "9999-12-31", "9999-12-30", "0001-01-01", "2023-01-01", "2024-1-1"],
    "country": ["VN", "vn", "XX", "", "V", "VNM"],
    "province": ["1", "-1", "99999999999999999999", "x", "\u0663"],
    "tier": ["1", "4", "5", "0", "-1", "9" * 30, "1.0"],
    "facility": ["1", "2", "-1", "9223372036854775808", "1e3"],
    "hub": ["1", "3", "-1", "9223372036854775808"],
    "specialty": ["394537008", "394579002", "000", ""],
    "campaign": ["", "x", "\x00", "x" * 5000],
    "cross_border": ["true", "false", "1", "0", "yes", "maybe", ""],
    "by": [
        "period",
        "country,specialty",
        "tier,hub,facility,province,campaign,cross_border",
        "period,period",
        ",",
        "bogus",
        "specialty," * 50,
    ],
    "metric": ["referrals", "submitted", "avoided_transfers", "advised", "bogus", ""],
    "format": ["json", "csv", "xlsx", "api", "html", "pdf", ""],
    "page": ["1", "2", "-1", "x"],
}
REPORT_PATHS = [
    f"{API}/reports/",
    f"{API}/reports/summary/",
    f"{API}/reports/response-times/",
    f"{API}/reports/capacity/",
    f"{API}/reports/drilldown/",
    f"{API}/reports/metrics/",
]


@fuzz_settings(max_examples=150)
@given(data=st.data())
def test_random_report_filters_never_500(
    net: Net, server_errors: ErrorLog, data: st.DataObject
) -> None:
    """Reports with junk date ranges, filters, groupings and formats (and Accept)."""
    path = data.draw(st.sampled_from(REPORT_PATHS), label="path")
    pairs: list[tuple[str, str]] = []
    for name, values in REPORT_VALUES.items():
        if data.draw(st.integers(0, 2), label=f"with {name}") == 2:
            value = data.draw(st.sampled_from(values) | st.sampled_from(NASTY_STRINGS), label=name)
            pairs.append((name, value))
    query = urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote, errors="surrogatepass")
    headers: dict[str, str] = {}
    if data.draw(st.integers(0, 3), label="with Accept") == 3:
        headers["Accept"] = data.draw(st.sampled_from(ACCEPTS), label="Accept")
    who = data.draw(
        st.sampled_from(["referrer", "consultant", "ministry", "coordinator", "steward"]),
        label="who",
    )
    with rolled_back():
        response, sent = send(net, who, "GET", f"{path}?{query}", **headers)
        check(response, sent, server_errors)


# --------------------------------------------------------------------------- 5c. raw bodies


@fuzz_settings(max_examples=200)
@given(data=st.data())
def test_raw_bodies_never_500(net: Net, server_errors: ErrorLog, data: st.DataObject) -> None:
    """Bodies that are not a JSON object (or not JSON, or nested too deep) sent as JSON
    to every kind of write."""
    accepted = net.referrals[ReferralState.ACCEPTED]
    writes = [
        ("referrer", "POST", f"{API}/referrals/"),
        ("consultant", "POST", f"{API}/referrals/{accepted.pk}/advise/"),
        ("consultant", "POST", f"{API}/referrals/{accepted.pk}/accept/"),
        *((who, method, path) for who, method, path, _ in registry_writes(net)),
        ("referrer", "POST", f"{API}/notifications/1/read/"),
    ]
    who, method, path = data.draw(st.sampled_from(writes), label="write")
    body = data.draw(st.sampled_from(RAW_BODIES), label="body")
    content_type = data.draw(
        st.sampled_from(["application/json", "application/json; charset=utf-8", *CONTENT_TYPES]),
        label="Content-Type",
    )
    with rolled_back():
        response, sent = send(net, who, method, path, body, content_type)
        check(response, sent, server_errors)


# --------------------------------------------------------------------------- 6. headers, bodies

CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/json; charset=utf-16",
    "application/json; charset=nope",
    "application/json; charset=",
    "application/json;;;",
    "application/problem+json",
    "application/fhir+json",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "multipart/form-data; boundary=x",
    "multipart/form-data; boundary=",
    "text/plain",
    "text/html",
    "application/xml",
    "",
    ";",
    "=",
    "*/*",
    "APPLICATION/JSON",
    "application/json; q=nan",
    "application/json; boundary=" + "x" * 5000,
]
ACCEPTS = [
    "application/json",
    "application/problem+json",
    "*/*",
    "text/csv",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/xml",
    "image/png",
    "application/json; version=2",
    "application/json; q=0",
    "application/json; q=abc",
    "application/json; indent=4",
    "application/json; indent=x",
    "application/json; indent=-1",
    "application/json; indent=99999999999999",
    "",
    ";",
    ",,,",
]
AUTHORIZATIONS = [
    "Bearer",
    "Bearer ",
    "Bearer a b",
    "Bearer \x00",
    "Bearer Ω",
    "Bearer " + "x" * 10_000,
    "bearer {token}",
    "BEARER {token}",
    "Bearer  {token}",
    "Bearer {token}x",
    "Basic Zm9vOmJhcg==",
    "Basic !!!",
    "Token {token}",
    "",
]
RAW_BODIES: list[bytes] = [
    b"",
    b"null",
    b"[]",
    b"0",
    b'"x"',
    b"{",
    b"{}}",
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": 1e999}',
    b'{"a": 1' + b"0" * 5000 + b"}",
    b'{"a": "\\ud800"}',
    b'{"a": "\\u0000"}',
    b"\xff\xfe{}",
    b"\xef\xbb\xbf{}",
    b"\x00\x00\x00",
    b"a=1&b=2",
    b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
]
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=30)


@fuzz_settings(max_examples=350)
@given(data=st.data())
def test_odd_headers_and_bodies_never_500(
    net: Net, server_errors: ErrorLog, data: st.DataObject
) -> None:
    """Valid requests with odd Content-Type / Accept / If-Match / Authorization headers,
    or raw bodies that are not JSON, not UTF-8, nested too deep, or form-encoded."""
    accepted = net.referrals[ReferralState.ACCEPTED]
    kind = data.draw(
        st.sampled_from(["submit", "advise", "facility", "list", "report", "attachment"]),
        label="request",
    )
    who, method, payload = "referrer", "POST", None
    path = f"{API}/referrals/"
    body: JSON = None
    if kind == "submit":
        body = submit_body(net)
    elif kind == "advise":
        who, path = "consultant", f"{API}/referrals/{accepted.pk}/advise/"
        body = action_body(net, "advise")
    elif kind == "facility":
        who, path = "steward", f"{API}/facilities/{net.w.hub.pk}/"
        method, body = "PATCH", {"name": "Renamed"}
    elif kind == "list":
        method, path = "GET", f"{API}/referrals/outgoing/?page=1"
    elif kind == "report":
        method, path = "GET", f"{API}/reports/?by=specialty&from=2024-01-01"
    else:
        path = f"{API}/referrals/{accepted.pk}/attachments/"
    headers: dict[str, str] = {}
    if data.draw(st.integers(0, 2), label="with Accept") == 2:
        headers["Accept"] = data.draw(st.sampled_from(ACCEPTS) | header_text, label="Accept")
    if data.draw(st.integers(0, 3), label="with If-Match") == 3:
        headers["If-Match"] = data.draw(st.sampled_from(IF_MATCH_VALUES), label="If-Match")
    if data.draw(st.integers(0, 4), label="with Authorization") == 4:
        auth = data.draw(st.sampled_from(AUTHORIZATIONS) | header_text, label="Authorization")
        headers["Authorization"] = auth.replace("{token}", net.tokens[who])
    for name in ("X-Request-ID", "Accept-Language", "X-Forwarded-For", "Content-Length"):
        if data.draw(st.integers(0, 9), label=f"with {name}") == 9:
            headers[name] = data.draw(
                st.sampled_from(["", "-1", "9" * 30, "x" * 100, "vi", "1.2.3.4, ::1"])
                | header_text,
                label=name,
            )
    if headers.get("Content-Length") is not None:
        del headers["Content-Length"]  # the test client sets it from the body
    content_type = data.draw(st.sampled_from(CONTENT_TYPES) | header_text, label="Content-Type")
    if method != "GET":
        raw = data.draw(st.integers(0, 2), label="raw body") == 2 or body is None
        payload = data.draw(st.sampled_from(RAW_BODIES), label="body") if raw else encode(body)
        if not raw and "latin-1" in content_type:
            payload = json.dumps(body, ensure_ascii=False).encode("latin-1", "replace")
    with rolled_back():
        response, sent = send(net, who, method, path, payload, content_type, **headers)
        check(response, sent, server_errors)


# --------------------------------------------------------------------------- 7. the web forms


@fuzz_settings(max_examples=60)
@given(data=st.data())
def test_web_form_posts_never_500(net: Net, server_errors: ErrorLog, data: st.DataObject) -> None:
    """The clinicians' POST forms (session login) with junk fields: never a 500 (4xx and
    form pages are HTML here)."""
    referral, who = action_start(
        net, data.draw(st.sampled_from(sorted(ACTION_VIEWS)), label="action")
    )
    action = data.draw(st.sampled_from(sorted(ACTION_VIEWS)), label="posted action")
    user = net.users[who]
    path = data.draw(
        st.sampled_from(
            [
                "/referrals/new/",
                f"/referrals/{referral.pk}/messages/",
                f"/referrals/{referral.pk}/actions/{action}/",
            ]
        ),
        label="path",
    )
    fields = {**submit_body(net), **action_body(net, action), "text": "Hb 9.1"}
    fields.pop("patient")
    form: dict[str, Any] = {}
    for name, value in fields.items():
        if data.draw(st.integers(0, 4), label=f"keep {name}") == 4:
            continue
        if data.draw(st.integers(0, 2), label=f"junk {name}") == 2:
            value = data.draw(
                st.sampled_from([t for t in NASTY_STRINGS if t != "\ud800"])
                | st.text(st.characters(blacklist_categories=["Cs"]), max_size=8),
                label=name,
            )
        form[name] = value if isinstance(value, str) else json.dumps(value)
    client = Client(raise_request_exception=False)
    client.force_login(user)
    with rolled_back():
        response = client.post(path, form)
        sent = Sent("POST", path, {"as": who, "Content-Type": "multipart/form-data"}, form)
        assert_no_server_error(response, sent, server_errors)
