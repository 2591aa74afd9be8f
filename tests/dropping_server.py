"""A tiny HTTP/1.1 server for outcome tests: it reads a whole request, counts it, and then drops the
connection without answering, as a node killed right after applying a write does.

``reply_status`` makes it answer every request with that status (an empty JSON error body) instead.
``refuse_after`` closes the listening socket after that many requests, so a re-send (if any client
made one) would meet a refused connection, which is how the harness once turned an applied write
into a ``fail``.  Raw asyncio on purpose: every byte it does (and does not) send is in this file.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Received:
    method: str
    path: str
    body: bytes


@dataclass
class DroppingServer:
    refuse_after: int | None = None
    reply_status: int | None = None
    requests: list[Received] = field(default_factory=list)
    _server: asyncio.Server | None = None
    url: str = ""

    async def __aenter__(self) -> DroppingServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._server is not None and self._server.is_serving():
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.transport.abort()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        body = await reader.readexactly(length) if length else b""
        self.requests.append(Received(method, path, body))
        if self.refuse_after is not None and len(self.requests) >= self.refuse_after:
            self.close()  # "killed": nothing listens any more
        if self.reply_status is not None:
            body = b'{"error": "overloaded", "message": "canned"}'
            writer.write(f"HTTP/1.1 {self.reply_status} Canned\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
            writer.close()
            return
        writer.transport.abort()  # the request was read (and, for a node, applied); no answer comes back
