"""Rebuild (the log walked referral by referral) == the watermark job (walked by id, in
small random batches interleaved with ingest), on a simulated network driven through
referrals.services.

The suite runs 300 simulated referrals (~1,600 events): intake through the real services
costs ~25 ms per transition here (routing), 2,000 referrals took 260 s. REPORTS_SIM_SUITE
changes the suite's count; REPORTS_SIM_COUNT=50000 runs the issue's 50,000 (slow-marked).

The issue's acceptance check, ``test_rebuild_equals_incremental_on_bulk_simulated_referrals``,
writes SUITE_BULK_COUNT (10,000; the 50,000 variant is opt-in, see below) referrals with ``referrals.simulation.simulate_bulk`` (COPY, the lifecycle
model of ``manage.py simulate_referrals --bulk``), runs catch-up batches of uneven size
after every written batch, then rebuilds; daily and monthly rollups, histograms and facts
must be identical.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from referrals import routing, simulation
from referrals.tests.conftest import world  # noqa: F401  (the fixture)
from reports.models import DailyRollup
from reports.services import reports_catch_up, reports_catch_up_batch, reports_rebuild
from reports.tests.scenario import Driver, Network, at, build_network
from reports.tests.test_scenario import _snapshot

# Position of "submitted" in a DailyRollup snapshot row (test_scenario._rows column order).
SUBMITTED = [f.name for f in DailyRollup._meta.concrete_fields if f.name != "id"].index("submitted")

pytestmark = pytest.mark.django_db


def simulate(net: Network, count: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    d = Driver(net)
    patients = [f"sim-{i}" for i in range(max(count // 3, 1))]
    for number in range(1000, 1000 + count):
        facility = rng.choice([net.d1, net.c1, net.l1])
        cardio = facility.pk != net.l1.pk and rng.random() < 0.25
        specialty = net.cardio if cardio else net.paeds
        department = net.h1c if cardio else rng.choice([net.h1p, net.h1p, net.h2p])
        if facility.pk == net.l1.pk:
            department = net.h1p
        t = at("2025-01-01", rng.uniform(0, 24 * 150))
        d.submit(
            number,
            facility,
            specialty,
            department,
            rng.choice(patients),
            t,
            campaign=rng.choice(["", "", "heart-2025"]),
        )

        def step(hours: float) -> Any:
            nonlocal t
            t = t + timedelta(hours=hours)
            return t

        roll = rng.random()
        if roll < 0.08:
            d.act(number, "decline", step(rng.uniform(0.5, 30)), reason_code="no_capacity")
            continue
        if roll < 0.12:
            d.act(number, "cancel", step(rng.uniform(0.5, 10)), reason="Improved.")
            continue
        if roll < 0.16:
            d.act(number, "expire", step(department.sla_hours + 1))
            continue
        if roll < 0.24 and department.pk == net.h1p.pk:
            d.act(
                number,
                "forward",
                step(rng.uniform(0.5, 8)),
                department=net.h2p.pk,
                reason="Closer.",
            )
        d.act(number, "accept", step(rng.uniform(0.2, 60)))
        d.advise(number, step(rng.uniform(0.5, 48)))
        roll = rng.random()
        if roll < 0.15:
            d.act(number, "request_transfer", step(1), reason="Needs surgery.")
            d.act(number, "accept_transfer", step(1))
            if rng.random() < 0.7:
                d.act(number, "depart", step(2))
                d.act(number, "arrive", step(4))
                d.act(number, "complete", step(24))
        elif roll < 0.9:
            considered = rng.random() < 0.7
            outcome = (
                rng.choice(["avoided", "avoided", "still_needed"])
                if considered
                else ("not_applicable")
            )
            d.close(number, step(rng.uniform(1, 72)), considered, outcome)
        if rng.random() < 0.3:
            # Incremental upkeep runs while ingest goes on, in uneven batches.
            reports_catch_up_batch(batch_size=rng.randint(1, 60))
    reports_catch_up()


def _run(count: int, report_settings: Any) -> None:
    net = build_network()
    simulate(net, count)
    incremental = _snapshot()
    assert sum(r[SUBMITTED] for r in incremental[0]) == count

    reports_rebuild()

    assert _snapshot() == incremental


def test_rebuild_equals_incremental_on_a_simulated_network(report_settings: Any) -> None:
    _run(int(os.environ.get("REPORTS_SIM_SUITE", "300")), report_settings)


# The issue asks for 50,000. Measured on the 2-core box with other suites running (load
# 6-14): 10,000 referrals (55,000 events) take 50-80 s; 50,000 (276,519 events) passed in
# 7 min at load 7 and ~10 min at load 14 (bulk write 100 s, catch-up 220 s, rebuild 215 s,
# snapshots 55 s), over the ~2.5 min this suite may spend on it. The suite runs SUITE_BULK_COUNT; REPORTS_BULK_50K=1 runs the 50,000.
SUITE_BULK_COUNT = int(os.environ.get("REPORTS_SIM_COUNT", "10000"))
bulk_simulation = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the bulk simulation path writes with COPY"
)


def _run_bulk(count: int) -> None:
    routing.routing_cache_clear()
    rng = random.Random(5)

    def catch_up_while_inserting(_written: int) -> None:
        # Incremental upkeep between inserted batches, in uneven batch sizes.
        for _ in range(rng.randint(1, 4)):
            reports_catch_up_batch(batch_size=rng.randint(500, 8000))

    written = simulation.simulate_bulk(
        count=count,
        seed=11,
        days=400,
        batch=2500,
        now=timezone.now(),
        progress=catch_up_while_inserting,
    )
    assert written >= count
    reports_catch_up()
    incremental = _snapshot()
    assert sum(r[SUBMITTED] for r in incremental[0]) >= count
    assert len(incremental[1]) == written
    assert len(incremental[2]) > 12  # several months
    assert len(incremental[3]) > 0

    reports_rebuild()

    rebuilt = _snapshot()
    for name, before, after in zip(
        ("daily", "facts", "monthly", "histograms"), incremental, rebuilt, strict=True
    ):
        assert before == after, name


@bulk_simulation
def test_rebuild_equals_incremental_on_bulk_simulated_referrals(
    world: Any,  # noqa: F811
    report_settings: Any,
) -> None:
    _run_bulk(SUITE_BULK_COUNT)


@bulk_simulation
@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("REPORTS_BULK_50K"),
    reason="opt-in (REPORTS_BULK_50K=1): the issue's 50,000 bulk referrals take 7-10 min "
    "on 2 busy cores, over the suite budget; the suite runs the same check on 10,000",
)
def test_rebuild_equals_incremental_on_50000_bulk_simulated_referrals(
    world: Any,  # noqa: F811
    report_settings: Any,
) -> None:
    _run_bulk(50_000)
