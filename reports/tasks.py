"""Celery tasks of the reports app."""

from __future__ import annotations

from celery import shared_task

from reports.services import reports_catch_up


@shared_task(name="reports.catch_up", ignore_result=True)
def reports_catch_up_task() -> int:
    """Apply new referral events to the report tables (beat: REPORTS_UPKEEP_INTERVAL).
    Safe to run twice or concurrently: the watermark row is locked per batch."""
    return reports_catch_up()
