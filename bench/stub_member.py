"""A minimal, fast HTTP/1.1 keep-alive member stub for the outbound bench (bench only).

    .venv/bin/python bench/stub_member.py PORT

asyncio ``Protocol`` parsing just enough HTTP/1.1 (request line, Content-Length) to answer
every request ``200`` with an empty body on the same connection; counts requests and prints
the count on SIGTERM. ``http.server`` costs ~1 ms per request in Python threads, which
would be what the bench measures.
"""

from __future__ import annotations

import asyncio
import signal
import sys

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Type: application/fhir+json\r\n\r\n"
COUNT = [0]


class Member(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end >= 0 else None].strip())
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            COUNT[0] += 1
            self.transport.write(ANSWER)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Member, "127.0.0.1", port, backlog=1024)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    print("ready", flush=True)
    async with server:
        await stop
    print(COUNT[0], flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
