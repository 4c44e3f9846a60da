"""Wait until a health URL answers 200 (``make run`` prints its address only then).

    python scripts/wait_healthy.py http://127.0.0.1:8000/healthz [timeout seconds] [server pid]

Exit 0 when healthy; 1 (with the last answer) when the timeout (default 120 s) passes or
the server process given has exited (it failed to start: no use waiting).
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(url: str, timeout: float, pid: int | None = None) -> int:
    # Our own server, asked directly: urllib would send even 127.0.0.1 through an
    # http_proxy of the environment that no_proxy does not exempt.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return 0
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read(300).decode(errors='replace')}"
        except OSError as exc:
            last = str(exc)
        if not _alive(pid):
            print(f"the server exited before it was healthy: {last}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"not healthy after {timeout:.0f} s: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(
        main(
            sys.argv[1],
            float(sys.argv[2]) if len(sys.argv) > 2 else 120.0,
            int(sys.argv[3]) if len(sys.argv) > 3 else None,
        )
    )
