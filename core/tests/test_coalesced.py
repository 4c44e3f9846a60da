"""core.dispatch.Coalesced: many requests, few runs, and always a run after the last one."""

from __future__ import annotations

import threading
from typing import Any

from core.dispatch import Coalesced


def test_requests_during_a_run_are_served_by_one_run_after_it(settings: Any) -> None:
    settings.CELERY_SEND_IN_BACKGROUND = True  # the thread, not inline as in other tests
    first_started, release = threading.Event(), threading.Event()
    runs: list[int] = []
    counter = {"requests": 0}
    second_done = threading.Event()

    def fn() -> None:
        runs.append(counter["requests"])  # how many requests this run came after
        if len(runs) == 1:
            first_started.set()
            release.wait(10)
        else:
            second_done.set()

    kick = Coalesced(fn, min_interval=0.01)
    counter["requests"] += 1
    kick.request()
    assert first_started.wait(10)
    for _ in range(50):  # while the first run is busy
        counter["requests"] += 1
        kick.request()
    release.set()

    assert second_done.wait(10)
    assert runs == [1, 51]  # one run for the first request, one for the fifty after it
    second_done.clear()
    assert not second_done.wait(0.2)  # and no more runs without requests


def test_inline_when_sends_are_inline(settings: Any) -> None:
    settings.CELERY_SEND_IN_BACKGROUND = False
    runs: list[str] = []
    kick = Coalesced(lambda: runs.append(threading.current_thread().name), min_interval=1)

    kick.request()
    kick.request()

    assert runs == [threading.current_thread().name] * 2
