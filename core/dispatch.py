"""Broker hand-offs off the request thread.

An ``on_commit`` hook runs inside the request that committed: a ``.delay()`` there makes the
caller wait for the broker. Measured per message: the embedded SQLAlchemy/SQLite transport
of ``make run`` ~3 ms (p95 ~15 ms, one SQLite commit with fsync each, and its file lock
serialises concurrent requests), Redis ~0.4 ms, and seconds of connection retries when the
broker is down. ``send_later(fn, *args)`` gives the call to one daemon thread per process
instead, which makes the sends one after the other (no lock contention on SQLite).

Durability is unchanged in kind: a send was already lost when the process died between the
commit and the ``.delay()`` (the committed rows stay the record; the FHIR outbox drain picks
up undelivered messages). The window grows from microseconds to the queue's drain time;
``atexit`` drains the queue (for at most ``DRAIN_SECONDS``) on a normal exit.

``CELERY_SEND_IN_BACKGROUND`` False (the test settings) or ``task_always_eager`` (tests that
run tasks in-process) call ``fn`` inline, exactly as before. A full queue does the same
(back-pressure instead of unbounded memory).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

MAX_PENDING = 10_000
DRAIN_SECONDS = 5.0

_Item = tuple[Callable[..., Any], tuple[Any, ...]]

_lock = threading.Lock()
_queue: queue.Queue[_Item] | None = None
_pid: int | None = None


def _run(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except Exception:  # the callers' own error handling comes first; never kill the thread
        logger.exception("background send failed", extra={"fn": getattr(fn, "__name__", fn)})


def _worker(pending: queue.Queue[_Item]) -> None:
    while True:
        fn, args = pending.get()
        try:
            _run(fn, args)
        finally:
            pending.task_done()


def _pending_queue() -> queue.Queue[_Item]:
    """This process's queue and thread (started on first use; again after a fork)."""
    global _queue, _pid
    pid = os.getpid()
    if _queue is None or _pid != pid:
        with _lock:
            if _queue is None or _pid != pid:
                pending: queue.Queue[_Item] = queue.Queue(maxsize=MAX_PENDING)
                threading.Thread(
                    target=_worker, args=(pending,), name="consilium-send", daemon=True
                ).start()
                _queue, _pid = pending, pid
    return _queue


def _inline() -> bool:
    if not getattr(settings, "CELERY_SEND_IN_BACKGROUND", True):
        return True
    from config.celery import app

    return bool(app.conf.task_always_eager)


def send_later(fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn(*args)`` soon on the background thread (inline when configured so, or
    when the queue is full). Exceptions from ``fn`` are logged, never raised here."""
    if _inline():
        _run(fn, args)
        return
    try:
        _pending_queue().put_nowait((fn, args))
    except queue.Full:
        _run(fn, args)


def flush(timeout: float = DRAIN_SECONDS) -> bool:
    """Wait until every queued send ran (tests, shutdown); False on timeout."""
    pending = _queue
    if pending is None or _pid != os.getpid():
        return True
    deadline = time.monotonic() + timeout
    while pending.unfinished_tasks:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


atexit.register(flush)


class Coalesced:
    """A call that many commits ask for and one run answers: ``request()`` after each
    commit; ``fn()`` then runs on a thread of its own, at most once per ``min_interval``
    seconds, and always *after* the latest request (so every commit is followed by a run
    that can see it, within ``min_interval`` plus the run's own time).

    For hand-offs whose task finds its own work (e.g. a drain that applies every pending
    job): under a burst, one broker message serves many commits instead of one each. Inline
    (tests, eager Celery) ``request()`` runs ``fn`` at once, as ``send_later`` does.
    """

    def __init__(self, fn: Callable[[], Any], *, min_interval: float) -> None:
        self.fn = fn
        self.min_interval = min_interval
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._pid: int | None = None

    def request(self) -> None:
        if _inline():
            _run(self.fn, ())
            return
        pid = os.getpid()
        if self._pid != pid:  # first use, or first after a fork: this process's own thread
            with self._lock:
                if self._pid != pid:
                    self._wanted = threading.Event()
                    threading.Thread(
                        target=self._loop,
                        args=(self._wanted,),
                        name=f"consilium-coalesced-{getattr(self.fn, '__name__', 'fn')}",
                        daemon=True,
                    ).start()
                    self._pid = pid
        self._wanted.set()

    def _loop(self, wanted: threading.Event) -> None:
        while True:
            wanted.wait()
            wanted.clear()  # before the run: a request from now on gets a run after this one
            _run(self.fn, ())
            time.sleep(self.min_interval)
