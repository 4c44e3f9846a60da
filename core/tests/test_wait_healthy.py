"""scripts/wait_healthy.py: `make run` prints its address once /healthz answers 200."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "wait_healthy.py"


@pytest.fixture
def health() -> Iterator[tuple[str, list[int]]]:
    """A server on 127.0.0.1 answering /healthz with the statuses queued (then the last)."""
    statuses: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b'{"status": "unhealthy", "failing": {"broker": "x"}}')

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/healthz", statuses
    server.shutdown()
    server.server_close()


def test_waits_through_503_until_200(health: tuple[str, list[int]]) -> None:
    url, statuses = health
    statuses += [503, 503, 200]
    done = subprocess.run([sys.executable, SCRIPT, url, "30"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert statuses == [200]  # both 503s were read before it returned


def test_gives_up_with_the_last_answer(health: tuple[str, list[int]]) -> None:
    url, statuses = health
    statuses.append(503)
    done = subprocess.run([sys.executable, SCRIPT, url, "1"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "not healthy after 1 s: HTTP 503" in done.stderr and "broker" in done.stderr


def test_a_proxy_in_the_environment_is_not_asked(health: tuple[str, list[int]]) -> None:
    """urllib sends even 127.0.0.1 through http_proxy unless no_proxy names it: behind a
    proxy `make run` waited its 120 s and never printed the address."""
    import os

    url, statuses = health
    statuses.append(200)
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy",)}
    env.update(http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    done = subprocess.run(
        [sys.executable, SCRIPT, url, "3"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr


def test_stops_when_the_server_it_waits_for_has_exited(health: tuple[str, list[int]]) -> None:
    """A web server that failed to start (its port taken, say) is not waited for 120 s."""
    url, statuses = health
    statuses.append(503)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    done = subprocess.run(
        [sys.executable, SCRIPT, url, "60", str(dead.pid)], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "the server exited before it was healthy: HTTP 503" in done.stderr
