"""Connection limits of the public HTTP port: a connection cap, a header timeout, an idle timeout.

Theory of operation
-------------------
aiohttp bounds the size of a request line and headers, but not how many connections a client may
open nor how long it may take to send its headers: a client that sends them a byte at a time
(slowloris) or opens connections and sends nothing holds file descriptors until the process runs
out.  ``serve`` therefore listens through ``GuardedSite``, which wraps every connection's aiohttp
protocol in a thin ``GuardedConnection``.  It sees the same events (connect, bytes, close) and adds:

* a **header timeout**: from the first byte of a request to the moment aiohttp dispatches it (its
  headers are complete), at most ``header_timeout_s``; past it the client is answered 408
  ``{"error": "request_timeout"}`` and the connection is closed.
* the **idle timeout** is aiohttp's own ``keepalive_timeout`` (``serve`` passes it): a connection
  with no complete request within that time of opening or of its last response is closed.
* a **connection cap**: at most ``max_connections`` are served at once.  A new connection beyond it
  closes the longest-idle one (no request in progress and no byte of a next one), which is what
  nginx does with keep-alive connections when it runs short; when none is idle the newcomer is
  answered ``503 {"error": "overloaded", "indeterminate": false}`` with ``Connection: close`` and
  is never read.  So idle connections can never lock out a client that sends a request, and a
  client only sees 503 when every slot is really working (or stuck in its headers, which the header
  timeout bounds).  The refusal is followed by a short lingering close (write side shut, input
  discarded for at most ``LINGER_S``) so the client reads the 503 instead of a reset; at most
  ``MAX_LINGERING`` refusals linger, beyond that they are closed at once.

Descriptors held by the HTTP port are thus at most ``max_connections + MAX_LINGERING``.  Closes for
a limit are counted in ``kvstore_http_connections_closed_total{reason}`` and logged rate-limited.

A request is dispatched and finished as seen by ``middleware()``, which must be the application's
outermost middleware.  Bytes that arrive while a request is being handled (its body, or a pipelined
next request) do not start the header timer, nor do the rest of a body the handler did not read
(aiohttp drains it, for at most its ``lingering_time``); the next bytes after those do.  So a
pipelined request left incomplete when the previous one finishes is bounded by the header timeout
once it sends more, and by the idle timeout if it sends nothing more.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, cast

from aiohttp import StreamReader, web

from kvstore.ratelog import RateLimitedLog
from kvstore.runtime.metrics import Metrics

log = logging.getLogger(__name__)

LINGER_S = 2.0
MAX_LINGERING = 64

ProtocolFactory = Callable[[], asyncio.Protocol]
Route = Callable[[web.Request], Any]


def canned_response(status: str, code: str, message: str, **extra: Any) -> bytes:
    """A complete HTTP/1.1 response with a JSON error body, for answering below aiohttp."""
    body = json.dumps({"error": code, "message": message, **extra}).encode("utf-8")
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
    )
    if status.startswith("503"):
        head += "Retry-After: 1\r\n"
    return (head + "\r\n").encode("ascii") + body


class Guarded(Protocol):
    """What the guard needs of a connection (``GuardedConnection``, or ``kvstore.server.http_front``'s)."""

    @property
    def handler(self) -> object | None: ...

    def is_writing(self) -> bool: ...

    def close_transport(self) -> None: ...


class ConnectionGuard:
    """The limits and the bookkeeping shared by every connection of one HTTP listener."""

    def __init__(self, max_connections: int, header_timeout_s: float, metrics: Metrics | None = None) -> None:
        assert max_connections >= 1 and header_timeout_s > 0
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self._metrics = metrics
        self._open: set[Guarded] = set()
        # Insertion order is the order in which connections became idle: the first is the longest idle.
        self._idle: OrderedDict[Guarded, None] = OrderedDict()
        self._by_handler: dict[object, GuardedConnection] = {}
        self._lingering: set[Guarded] = set()
        self._log = RateLimitedLog(log)
        self.overloaded_response = canned_response(
            "503 Service Unavailable",
            "overloaded",
            f"the node already serves {max_connections} connections, its limit; retry later",
            indeterminate=False,
        )
        self.too_slow_response = canned_response(
            "408 Request Timeout",
            "request_timeout",
            f"the request headers did not arrive within {header_timeout_s:g} s",
        )

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def protocol_factory(self, make_handler: ProtocolFactory) -> ProtocolFactory:
        return lambda: GuardedConnection(self, make_handler)

    def middleware(self) -> Any:
        @web.middleware
        async def connection_guard(request: web.Request, handler: Route) -> web.StreamResponse:
            conn = self._by_handler.get(request.protocol)
            if conn is None:  # an app served without the guard (tests build apps directly)
                return await handler(request)  # type: ignore[no-any-return]
            conn.request_started()
            try:
                return await handler(request)  # type: ignore[no-any-return]
            finally:
                conn.request_finished(request.content)

        return connection_guard

    def close(self) -> None:
        for conn in list(self._lingering):
            conn.close_transport()

    # --- bookkeeping, called by GuardedConnection ----------------------------------------------

    def admit(self, conn: Guarded) -> bool:
        if len(self._open) >= self.max_connections:
            victim = self._longest_idle()
            if victim is None:
                self._closed("over_capacity")
                self._log.warning(
                    "over_capacity",
                    "refused an http connection with 503: %d connections open, none idle (limits.max_http_connections)",
                    len(self._open),
                )
                return False
            self._closed("idle_evicted")
            self._log.warning(
                "idle_evicted",
                "closed the longest-idle http connection to admit a new one: %d open (limits.max_http_connections)",
                len(self._open),
            )
            self.forget(victim)
            victim.close_transport()
        self._open.add(conn)
        self._idle[conn] = None
        self._gauge()
        return True

    def _longest_idle(self) -> Guarded | None:
        # A response still being flushed is not idle yet.  The scan is bounded by the cap.
        victim = next((conn for conn in self._idle if not conn.is_writing()), None)
        if victim is not None:
            del self._idle[victim]
        return victim

    def register(self, handler: object, conn: GuardedConnection) -> None:
        self._by_handler[handler] = conn

    def mark_busy(self, conn: Guarded) -> None:
        self._idle.pop(conn, None)

    def mark_idle(self, conn: Guarded) -> None:
        if conn in self._open:
            self._idle[conn] = None
            self._idle.move_to_end(conn)

    def forget(self, conn: Guarded) -> None:
        self._open.discard(conn)
        self._idle.pop(conn, None)
        if conn.handler is not None:
            self._by_handler.pop(conn.handler, None)
        self._gauge()

    def header_timed_out(self) -> None:
        self._closed("header_timeout")
        self._log.warning(
            "header_timeout",
            "closed an http connection whose request headers took over %g s (limits.http_header_timeout_ms)",
            self.header_timeout_s,
        )

    def may_linger(self, conn: Guarded) -> bool:
        if len(self._lingering) >= MAX_LINGERING:
            return False
        self._lingering.add(conn)
        return True

    def done_lingering(self, conn: Guarded) -> None:
        self._lingering.discard(conn)

    def _closed(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.http_connections_closed.labels(reason=reason).inc()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.http_connections_open.set(len(self._open))


class GuardedConnection(asyncio.Protocol):
    """One client connection: forwards every event to aiohttp's protocol and enforces the limits."""

    def __init__(self, guard: ConnectionGuard, make_handler: ProtocolFactory) -> None:
        self._guard = guard
        self._make_handler = make_handler
        self.handler: asyncio.Protocol | None = None  # None: refused, never handed to aiohttp
        self._transport: asyncio.Transport | None = None
        self._in_request = False
        # The body of the last request, while aiohttp is still draining what the handler did not read.
        self._draining: StreamReader | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._transport = transport
        if not self._guard.admit(self):
            self._refuse(transport)
            return
        self.handler = self._make_handler()
        self._guard.register(self.handler, self)
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            return  # a refused connection: its request is discarded unread
        if self._in_request:
            self.handler.data_received(data)
            return
        self.handler.data_received(data)  # first: aiohttp's parser feeds any body it belongs to
        if self._draining is not None:
            if self._draining.is_eof():
                self._draining = None  # a next request's bytes in this same chunk wait for the next one
            return
        self._guard.mark_busy(self)
        if self._header_timer is None:
            self._header_timer = asyncio.get_running_loop().call_later(
                self._guard.header_timeout_s, self._header_timeout
            )

    def eof_received(self) -> bool | None:
        if self.handler is None:
            return False  # the client read the refusal and closed: close our side too
        return self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self.handler is None:
            self._guard.done_lingering(self)
            return
        self._guard.forget(self)
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    # --- the limits -----------------------------------------------------------------------------

    def request_started(self) -> None:
        self._in_request = True
        self._guard.mark_busy(self)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def request_finished(self, body: StreamReader) -> None:
        self._in_request = False
        self._draining = None if body.is_eof() else body
        self._guard.mark_idle(self)

    def is_writing(self) -> bool:
        return self._transport is not None and self._transport.get_write_buffer_size() > 0

    def close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _header_timeout(self) -> None:
        self._header_timer = None
        transport = self._transport
        if self._in_request or transport is None or transport.is_closing():
            return
        self._guard.header_timed_out()
        transport.write(self._guard.too_slow_response)
        transport.close()

    def _refuse(self, transport: asyncio.Transport) -> None:
        transport.write(self._guard.overloaded_response)
        if transport.can_write_eof() and self._guard.may_linger(self):
            transport.write_eof()
            self._linger_timer = asyncio.get_running_loop().call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._linger_timer = None


class GuardedSite(web.BaseSite):
    """A TCP listener like ``web.TCPSite`` whose connections pass through a ``ConnectionGuard``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ConnectionGuard,
        host: str,
        port: int,
        *,
        backlog: int = 128,
        reuse_address: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._guard = guard
        self._host = host
        self._port = port
        self._reuse_address = reuse_address
        self._ssl_context = ssl_context  # HTTPS (kvstore.tls); the guard sees the decrypted bytes

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            ssl=self._ssl_context,
            # A TLS handshake comes before the first byte the header timer sees: bound it the same way.
            ssl_handshake_timeout=self._guard.header_timeout_s if self._ssl_context is not None else None,
        )

    async def stop(self) -> None:
        await super().stop()
        self._guard.close()
