"""Measure and MeasureReport: the reports app's figures, rules and suppression over FHIR."""

from __future__ import annotations

import json
from typing import Any

import pytest

from accounts.models import User
from accounts.roles import Role
from accounts.services import api_token_issue
from fhir_gateway.measures import DATA_ABSENT, SUPPRESSION_EXTENSION
from fhir_gateway.models import FhirResource
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.versions import model_class
from reports.fhir import measure_definitions, measure_report_data
from reports.selectors import filters_parse
from reports.services import reports_catch_up
from reports.tests.scenario import Network, build_network, run_scenario
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PROVINCES = ("Ha Noi", "Quang Ninh", "Lao Cai", "Vientiane")


@pytest.fixture
def scenario(db: Any, settings: Any) -> Network:
    """The reports app's hand-computed scenario (reports/tests/scenario.py)."""
    settings.REPORTS_TIME_ZONE = "UTC"
    settings.REPORTS_MIN_CELL = 5
    settings.REPORTS_VERIFY_DAYS = 30
    settings.REPORTS_COST_PER_KM = {"VN": 0.25, "LA": 0.5, "default": 0.3}
    net = run_scenario(build_network())
    reports_catch_up()
    return net


@pytest.fixture
def ministry(db: Any, settings: Any) -> FhirClient:
    """A ministry account and no report data (for what is refused before any figure)."""
    settings.REPORTS_MIN_CELL = 5
    return _client(UserFactory.create(roles=[Role.MINISTRY]))


def _client(user: User) -> FhirClient:
    return FhirClient(api_token_issue(user=user, name="t").raw)


def _get(client: FhirClient, path: str, version: str = FHIR_R4) -> Any:
    response = client.get(path, Accept=version)
    assert response.status_code == 200, response.content
    return json.loads(response.content)


def _evaluate(client: FhirClient, measure: str, version: str = FHIR_R4, **params: str) -> Any:
    query = "&".join(
        f"{k}={v}" for k, v in {"periodStart": "2025", "periodEnd": "2025", **params}.items()
    )
    report = _get(client, f"/fhir/Measure/{measure}/$evaluate-measure?{query}", version)
    model_class("MeasureReport", version[-3:]).model_validate(report)
    return report


def _count(population_holder: dict[str, Any]) -> int | str:
    """The initial-population count, or "masked" when it is absent for suppression."""
    [population] = population_holder["population"]
    if "count" in population:
        return int(population["count"])
    [absent] = population["_count"]["extension"]
    assert absent["url"] == DATA_ABSENT
    return str(absent["valueCode"])


def _strata(report: dict[str, Any], version: str = FHIR_R4) -> dict[str, dict[str, Any]]:
    [stratifier] = report["group"][0]["stratifier"]
    key = "valueCodeableConcept" if version == FHIR_R5 else "value"
    return {s[key]["text"].partition(": ")[2]: s for s in stratifier["stratum"]}


# --------------------------------------------------------------------------- Measure


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_one_measure_per_metric_in_both_versions(scenario: Network, version: str):
    client = _client(scenario.ministry)

    found = _get(client, "/fhir/Measure?_count=100", version)

    definitions = measure_definitions()
    assert found["total"] == len(definitions)
    urls = {e["resource"]["url"] for e in found["entry"]}
    assert urls == {d["url"] for d in definitions}
    for entry in found["entry"]:
        model_class("Measure", version[-3:]).model_validate(entry["resource"])
    avoided = _get(client, "/fhir/Measure/avoided", version)
    assert (avoided["url"], avoided["title"]) == (
        "urn:consilium:measure:avoided",
        "Transfers avoided",
    )
    assert avoided["scoring"]["coding"][0]["code"] == "cohort"
    rate = _get(client, "/fhir/Measure/avoidance-rate", version)
    assert rate["scoring"]["coding"][0]["code"] == "proportion"
    by_url = _get(client, "/fhir/Measure?url=urn:consilium:measure:avoided", version)
    assert [e["resource"]["id"] for e in by_url["entry"]] == ["avoided"]
    by_name = _get(client, "/fhir/Measure?name=TransferConsidered", version)
    assert [e["resource"]["id"] for e in by_name["entry"]] == ["transfer-considered"]
    # A string parameter: not only the exact name (a start, or any part, case-insensitive;
    # "Accept" and name:contains=hours found nothing).
    starts = _get(client, "/fhir/Measure?name=Accept", version)
    assert [e["resource"]["id"] for e in starts["entry"]] == ["accept-hours", "accepted"]
    part = _get(client, "/fhir/Measure?name:contains=hours", version)
    assert [e["resource"]["id"] for e in part["entry"]] == ["accept-hours", "advice-hours"]
    either = _get(client, "/fhir/Measure?name=transfers%20avoided,sla", version)
    assert [e["resource"]["id"] for e in either["entry"]] == ["avoided", "sla-share"]
    # Stored once, like every served resource.
    assert FhirResource.objects.filter(resource_type="Measure").count() == len(definitions)


@pytest.mark.parametrize("role", [Role.REGISTRY_STEWARD, Role.MEMBER_SYSTEM])
def test_accounts_without_a_reporting_role_are_refused(db: Any, role: Role):
    client = _client(UserFactory.create(roles=[role]))

    for path in (
        "/fhir/Measure",
        "/fhir/Measure/avoided",
        "/fhir/Measure/avoided/$evaluate-measure?periodStart=2025&periodEnd=2025",
    ):
        response = client.get(path)
        assert response.status_code == 403, path
        assert outcome_issue(response)["code"] == "forbidden"
    assert not FhirResource.objects.filter(resource_type="Measure").exists()


# --------------------------------------------------------------------------- MeasureReport


def test_referrer_gets_their_facility_unsuppressed(scenario: Network):
    client = _client(scenario.referrer_l1)  # Vientiane District Hospital: #8, #13, #19

    submitted = _evaluate(client, "submitted")
    avoided = _evaluate(client, "avoided", FHIR_R5)

    assert (submitted["type"], submitted["status"]) == ("summary", "complete")
    assert submitted["period"] == {"start": "2025-01-01", "end": "2025-12-31"}
    assert _count(submitted["group"][0]) == 3  # below 5, shown: not aggregate-only
    assert _count(avoided["group"][0]) == 2
    assert "extension" not in submitted  # no filter, no suppression
    other = _evaluate(client, "submitted", subject=f"Organization/{scenario.d1.pk}")
    assert _count(other["group"][0]) == 0  # another facility: outside their scope
    assert other["subject"] == {"reference": f"Organization/{scenario.d1.pk}"}


def test_figures_are_the_reports_apps_own(scenario: Network):
    client = _client(scenario.consultant_h2)
    filters = filters_parse({"from": "2025-01-01", "to": "2025-03-31", "by": "period"})
    expected = {
        g["measure"]: g for g in measure_report_data(scenario.consultant_h2, filters)["groups"]
    }

    for code in ("accepted", "declined", "avoided"):
        report = _evaluate(
            client, code, periodStart="2025-01", periodEnd="2025-03", stratifier="period"
        )
        group = expected[f"urn:consilium:measure:{code}"]
        assert _count(report["group"][0]) == group["value"]
        strata = _strata(report)
        assert {label: _count(s) for label, s in strata.items()} == {
            s["stratum"]["period"]: s["value"] for s in group["strata"]
        }
    assert _count(_evaluate(client, "accepted")["group"][0]) == 2  # H2P: #5, #17


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_ministry_never_sees_a_count_below_the_threshold(scenario: Network, version: str):
    client = _client(scenario.ministry)
    counts = [
        d["name"].replace("_", "-") for d in measure_definitions() if d["scoring"] == "cohort"
    ]

    seen_masked = 0
    for measure in counts:
        for stratifier in ("", "province", "hub", "tier", "specialty"):
            extra = {"stratifier": stratifier} if stratifier else {}
            report = _evaluate(client, measure, version, **extra)
            figures = [_count(report["group"][0])]
            if stratifier:
                figures += [_count(s) for s in _strata(report, version).values()]
            for figure in figures:
                assert figure == "masked" or (
                    isinstance(figure, int) and (figure == 0 or figure >= 5)
                ), (
                    measure,
                    stratifier,
                )
            seen_masked += figures.count("masked")
            suppression = [e for e in report["extension"] if e["url"] == SUPPRESSION_EXTENSION]
            assert suppression == [{"url": SUPPRESSION_EXTENSION, "valueInteger": 5}]
    assert seen_masked > 0  # the scenario has small cells: they were hidden, not absent


def test_ministry_report_by_province_hides_the_small_cells(scenario: Network):
    client = _client(scenario.ministry)

    report = _evaluate(client, "avoided", stratifier="province")

    strata = {label: _count(s) for label, s in _strata(report).items()}
    # Quang Ninh 5 shown; Lao Cai 2 and Vientiane 2 hidden; zero shown; total 9 shown.
    assert strata == {"Ha Noi": 0, "Quang Ninh": 5, "Lao Cai": "masked", "Vientiane": "masked"}
    assert _count(report["group"][0]) == 9
    by_hub = {
        label: _count(s)
        for label, s in _strata(_evaluate(client, "avoided", stratifier="hub")).items()
    }
    # H1 7, H2 2: hiding H2 alone would let 9 - 7 reveal it, so H1 goes too.
    assert by_hub["Central Hospital"] == "masked"
    assert by_hub["Quang Ninh Provincial Hospital"] == "masked"
    rate = _evaluate(client, "avoidance-rate", FHIR_R5, stratifier="province")
    hidden = _strata(rate, FHIR_R5)["Vientiane"]["measureScoreQuantity"]
    assert hidden == {"extension": [{"url": DATA_ABSENT, "valueCode": "masked"}]}
    assert "value" in _strata(rate, FHIR_R5)["Quang Ninh"]["measureScoreQuantity"]


def test_ministry_may_not_cross_two_stratifiers(ministry: FhirClient):
    response = ministry.get(
        "/fhir/Measure/avoided/$evaluate-measure?periodStart=2025&periodEnd=2025"
        "&stratifier=period,province"
    )

    assert response.status_code == 400
    assert outcome_issue(response)["code"] == "invalid"


@pytest.mark.parametrize(
    ("query", "status", "code", "names"),
    [
        ("periodEnd=2025", 400, "required", "periodStart"),
        ("periodStart=2025-13&periodEnd=2025", 400, "invalid", "periodStart"),
        ("periodStart=2025-01-01T00:00:00Z&periodEnd=2025", 400, "invalid", "periodStart"),
        ("periodStart=2025-03&periodEnd=2025-01", 400, "invalid", "periodEnd"),
        ("periodStart=2025&periodEnd=2025&country=ZZ&tier=9", 400, "invalid", "country"),
        ("periodStart=2025&periodEnd=2025&stratifier=ward", 400, "invalid", "stratifier"),
        ("periodStart=2025&periodEnd=2025&subject=Patient/1", 400, "invalid", "subject"),
        # Ids are strings: Organization/07 is not Organization/7 (it was read as facility 7)
        ("periodStart=2025&periodEnd=2025&subject=Organization/07", 400, "invalid", "subject"),
        pytest.param(  # more digits than a row id has (int() raises past 4,300 of them)
            f"periodStart=2025&periodEnd=2025&subject=Organization/{'9' * 5000}",
            400,
            "invalid",
            "subject",
            id="subject-of-5000-digits",
        ),
        ("periodStart=2025&periodEnd=2025&colour=red", 400, "not-supported", "colour"),
        (
            "periodStart=2025&periodEnd=2025&reportType=subject-list",
            422,
            "not-supported",
            "summary",
        ),
    ],
)
def test_bad_parameters_are_answered_not_500(
    ministry: FhirClient, query: str, status: int, code: str, names: str
):
    response = ministry.get(f"/fhir/Measure/avoided/$evaluate-measure?{query}")

    assert response.status_code == status, response.content
    issue = outcome_issue(response)
    assert issue["code"] == code
    assert names in issue["diagnostics"]


def test_unknown_and_unevaluated_measures(ministry: FhirClient):
    client = ministry
    path = "$evaluate-measure?periodStart=2025&periodEnd=2025"

    assert client.get(f"/fhir/Measure/nothing/{path}").status_code == 404
    assert client.get("/fhir/Measure/nothing").status_code == 404
    response = client.get(f"/fhir/Measure/accept-hours/{path}")
    assert response.status_code == 422
    assert outcome_issue(response)["code"] == "not-supported"


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_every_declared_measure_interaction_and_operation_is_served(
    scenario: Network, version: str
):
    client = _client(scenario.ministry)
    statement = _get(client, "/fhir/metadata", version)
    [entry] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Measure"]
    paths = {
        "read": "/fhir/Measure/avoided",
        "vread": "/fhir/Measure/avoided/_history/1",
        "search-type": "/fhir/Measure",
    }
    assert {i["code"] for i in entry["interaction"]} == set(paths)
    for interaction in entry["interaction"]:
        assert client.get(paths[interaction["code"]], Accept=version).status_code == 200
    for param in entry["searchParam"]:
        value = {"uri": "urn:consilium:measure:avoided", "date": "ge2020-01-01"}.get(
            param["type"], "avoided"
        )
        response = client.get(
            f"/fhir/Measure?{param['name']}={value}", Accept=version, Prefer="handling=strict"
        )
        assert response.status_code == 200, (param["name"], response.content)
    assert [o["name"] for o in entry["operation"]] == ["evaluate-measure"]
    _evaluate(client, "avoided", version)


def test_evaluate_measure_may_be_posted_a_parameters_resource(scenario: Network) -> None:
    """FHIR lets every operation be POSTed its parameters (they answered 405)."""
    client = _client(scenario.ministry)
    got = _evaluate(client, "avoided", subject=f"Organization/{scenario.d1.pk}")
    posted = client.post(
        "/fhir/Measure/avoided/$evaluate-measure",
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "periodStart", "valueDate": "2025"},
                {"name": "periodEnd", "valueDate": "2025"},
                {
                    "name": "subject",
                    "valueReference": {"reference": f"Organization/{scenario.d1.pk}"},
                },
            ],
        },
        content_type=FHIR_R4,
        Accept=FHIR_R4,
    )
    assert posted.status_code == 200, posted.content
    answer = json.loads(posted.content)
    assert answer["group"] == got["group"] and answer["subject"] == got["subject"]

    wrong = client.post(
        "/fhir/Measure/avoided/$evaluate-measure",
        {"resourceType": "Patient"},
        content_type=FHIR_R4,
        Accept=FHIR_R4,
    )
    nested = client.post(
        "/fhir/Measure/avoided/$evaluate-measure",
        {"resourceType": "Parameters", "parameter": [{"name": "x", "part": [{"name": "y"}]}]},
        content_type=FHIR_R4,
        Accept=FHIR_R4,
    )
    assert (wrong.status_code, nested.status_code) == (400, 400)


def test_a_filter_does_not_reveal_what_it_cuts_away(scenario: Network):
    """Avoided: 9 in all, LA 2 (masked by country). Filtered to VN the 7 would give LA's
    2 by difference: masked too (suppression rule 6, docs/metrics.md)."""
    client = _client(scenario.ministry)

    assert _count(_evaluate(client, "avoided")["group"][0]) == 9
    assert _count(_evaluate(client, "avoided", country="VN")["group"][0]) == "masked"
    assert _count(_evaluate(client, "avoided", **{"cross-border": "false"})["group"][0]) == (
        "masked"
    )


def test_masked_is_per_figure_not_per_report(scenario: Network):
    """Avoidance rate by hub: D1 (hub of the counter-referral) has nothing considered, so
    it has no rate (not-applicable); H2's 2 avoided are hidden, so its rate is masked."""
    client = _client(scenario.ministry)

    report = _evaluate(client, "avoidance-rate", stratifier="hub")

    reasons = {
        label: s["measureScore"]["extension"][0]["valueCode"]
        for label, s in _strata(report).items()
        if "extension" in s["measureScore"]
    }
    assert reasons == {
        "Van Don District Hospital": "not-applicable",
        "Quang Ninh Provincial Hospital": "masked",
        "Central Hospital": "masked",
    }
