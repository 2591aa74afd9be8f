"""A lean HTTP/1.1 front end for the data path (``/kv/*``), parsed by ``httptools`` (llhttp).

Theory of operation
-------------------
Profiles of a node (docs/benchmarks.md, "Profile") put the aiohttp request path alone at 140-250 us
of CPU per request: more than a whole replicated write may cost.  This module serves the public
port with a plain ``asyncio.Protocol`` per connection that parses with ``httptools`` (the C
llhttp parser uvicorn uses) and answers ``/kv/*`` through the same kv request core as the aiohttp
route (``kvstore.server.kv_api.KvApi.handle``), so both front ends give the same answers, errors and
metrics; only the bytes around them are made here.  Selected with ``[server] front_end =
"httptools"`` (``kvstore.config.ServerSettings``).

Everything else is **forwarded in-process to the node's aiohttp application**, on the same
port and without any socket: each client connection that sends a request the fast path does not
take (another route, another method, an absolute or non-ASCII target, a ``Content-Encoding``, an
``Upgrade``) gets its own aiohttp ``RequestHandler`` (made by the aiohttp server's factory,
exactly as for a real connection) driven through ``_AiohttpLink``: the request is re-framed
(same request line and header fields, the body re-sent with its ``Content-Length`` or re-chunked
as it arrives) and aiohttp's answer is relayed byte for byte; a response
parser only finds where that answer ends.  So the admin, metrics, OpenAPI and cluster routes,
405s with their ``Allow``, 417s and gzip bodies are aiohttp's own answers, not copies.

Per connection, requests are parsed as their bytes arrive and answered **one at a time, in
order** (HTTP/1.1 pipelining): a worker task takes the next parsed request, answers it, writes
the answer.  Bounds:

* a request line longer than ``MAX_REQUEST_LINE_BYTES`` is 414 ``uri_too_long``; a header
  field longer than ``MAX_HEADER_FIELD_BYTES`` 431 ``header_too_large``; more than
  ``MAX_HEADER_COUNT`` fields 431 ``too_many_headers``; anything llhttp refuses (request line,
  version, ``Content-Length: abc``, chunk sizes, ``Transfer-Encoding`` with ``Content-Length``)
  400 ``malformed_request``: the limits and codes of ``kvstore.server.api``.  Each is answered after
  the requests before it, then the connection is closed.
* a body is read **completely** before the core sees it (Content-Length or chunked), at most
  ``max_value_bytes`` (413 ``value_too_large``, from the declared length at once); a body that
  stops arriving for ``body_idle_timeout_ms`` is 408 ``body_timeout``; a body cut by a malformed
  chunk is 400 ``malformed_request``.  Bytes of a refused body are discarded, never buffered,
  and the connection is closed after the answer.  ``Expect: 100-continue`` is answered when the
  core asks for the body.
* at most ``MAX_PIPELINED`` parsed requests wait behind the one being answered, and at most
  ``max_value_bytes`` + 64 KiB of their bodies; beyond either, the socket is not read until the
  worker catches up (TCP flow control, not a refusal).
* a client that goes away does not cancel the request being answered (aiohttp does not cancel
  its handler either): a write half-way through its replicas finishes and its answer is dropped;
  for the client it is indeterminate, as any request without an answer (``kvstore.contract``).
* the connection cap, the header timeout and the idle timeout of ``kvstore.server.http_guard`` (the
  same ``ConnectionGuard``, so the same refusals, metrics and log lines): a new connection beyond
  ``max_http_connections`` closes the longest-idle one or is answered 503; headers that take
  longer than ``http_header_timeout_ms`` from their first byte while the connection is not busy
  answering get 408 ``request_timeout``; a connection with nothing to do for
  ``http_idle_timeout_ms`` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, cast
from urllib.parse import parse_qsl

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from kvstore.config import Limits
from kvstore.errors import BadRequest, BodyTimeout, ValueTooLarge
from kvstore.server.api import MAX_HEADER_COUNT, MAX_HEADER_FIELD_BYTES, MAX_REQUEST_LINE_BYTES
from kvstore.server.http_guard import LINGER_S, ConnectionGuard, canned_response
from kvstore.server.kv_api import CORE_HEADERS, KV_METHODS, ApiRequest, ApiResponse, KvApi

log = logging.getLogger(__name__)

MAX_PIPELINED = 32
# A head is a request line and at most MAX_HEADER_COUNT fields, each bounded (kvstore.server.api).
MAX_HEAD_BYTES = MAX_REQUEST_LINE_BYTES + MAX_HEADER_COUNT * (MAX_HEADER_FIELD_BYTES + 4)
QUEUED_BODY_SLACK_BYTES = 64 * 1024
KV_PREFIX_BYTES = b"/kv/"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("ascii") for s in HTTPStatus}
# Request headers a forwarded request is re-framed without (its body is re-sent as it arrives).
HOP_BY_HOP = {b"content-length", b"transfer-encoding"}
# The request header fields the kv core reads (kvstore.server.kv_api): only these are decoded for it.
CORE_HEADER_NAMES = frozenset(name.lower().encode("ascii") for name in CORE_HEADERS)
NO_HEADERS: Mapping[str, str] = CIMultiDictProxy(CIMultiDict())
NO_QUERY: Mapping[str, str] = MappingProxyType({})
MAX_REMEMBERED_QUERIES = 256

ProtocolFactory = Callable[[], asyncio.Protocol]


class _Refusal(Exception):
    """A request refused while parsing its head; ``answer`` is the complete response."""

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.answer = answer


def _refusal(status: int, code: str, message: str) -> _Refusal:
    return _Refusal(canned_response(f"{status} {HTTPStatus(status).phrase}", code, message))


class _DateCache:
    """The ``Date`` header, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())  # the Date header is wall-clock time by definition
        if now != self._second:
            self._second = now
            self._line = b"Date: " + email.utils.formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        return self._line


class _QueryCache:
    """Query strings parsed once: clients send the same few (``?consistency=quorum&w=2``) again and again.

    A query is what ``parse_qsl(keep_blank_values=True)`` makes of it, first value of a repeated
    name winning (as ``MultiDict.get``, what the aiohttp route gives the core); the mappings are
    read-only, as they are shared.  At most ``MAX_REMEMBERED_QUERIES`` are kept; others are parsed
    each time.
    """

    def __init__(self) -> None:
        self._parsed: dict[str, Mapping[str, str]] = {}

    def parse(self, query_string: str) -> Mapping[str, str]:
        query = self._parsed.get(query_string)
        if query is None:
            fields: dict[str, str] = {}
            for name, value in parse_qsl(query_string, keep_blank_values=True):
                fields.setdefault(name, value)
            query = MappingProxyType(fields)
            if len(self._parsed) < MAX_REMEMBERED_QUERIES:
                self._parsed[query_string] = query
        return query


class FrontEnd:
    """The listener-wide parts: the kv core, the aiohttp server to forward to, the guard."""

    def __init__(self, kv_api: KvApi, aiohttp_server: ProtocolFactory, guard: ConnectionGuard, limits: Limits) -> None:
        self.kv_api = kv_api
        self.aiohttp_server = aiohttp_server
        self.guard = guard
        self.max_value_bytes = limits.max_value_bytes
        self.queued_body_cap = limits.max_value_bytes + QUEUED_BODY_SLACK_BYTES
        self.body_idle_timeout_s = limits.body_idle_timeout_ms / 1000.0
        self.body_idle_timeout_ms = limits.body_idle_timeout_ms
        self.idle_timeout_s = limits.http_idle_timeout_ms / 1000.0
        self.dates = _DateCache()
        self.queries = _QueryCache()
        self.connections: set[KvConnection] = set()

    def protocol_factory(self) -> ProtocolFactory:
        return lambda: KvConnection(self)

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close_transport()
        self.guard.close()


class _Request:
    """One request as parsed: its head, and its body as it arrives."""

    __slots__ = ("method", "url", "headers", "header_bytes", "keep_alive", "fast", "expect_continue",
                 "content_length", "chunked", "parts", "size", "complete", "overflow", "broken", "progress",
                 "sink", "refusal", "http_version", "dispatched", "queued_bytes",
                 "transfer_encoding", "core_headers")

    def __init__(self) -> None:
        self.method = ""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.keep_alive = True
        self.fast = False  # answered here (True) or forwarded to aiohttp
        self.expect_continue = False
        self.content_length: int | None = None
        self.chunked = False
        self.transfer_encoding = b"chunked"
        self.parts: list[bytes] = []
        self.size = 0  # body bytes received (also those discarded past a bound)
        self.complete = False
        self.overflow = False  # body bytes were discarded: more arrived than may be held
        self.broken: BadRequest | None = None  # the body can never complete: why
        self.progress: asyncio.Future[None] | None = None  # woken on body bytes, completion, failure
        self.sink: Callable[[bytes], None] | None = None  # a forwarded body goes straight on
        self.refusal: bytes | None = None  # answer this instead (a refused head)
        self.http_version = "1.1"
        self.dispatched = False  # its head is complete: it is queued or being answered
        self.queued_bytes = 0  # its body bytes counted in KvConnection.queued_body_bytes
        self.core_headers: list[tuple[bytes, bytes]] | None = None  # the fields the kv core reads

    def wake(self) -> None:
        if self.progress is not None and not self.progress.done():
            self.progress.set_result(None)


class KvConnection(asyncio.Protocol):
    """One client connection of the httptools front end (see the module docstring)."""

    def __init__(self, front: FrontEnd) -> None:
        self.front = front
        self.handler = None  # ConnectionGuard bookkeeping: no aiohttp protocol owns this connection
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: _Request | None = None  # the request whose bytes are arriving
        self.queue: deque[_Request] = deque()
        self.queued_body_bytes = 0
        self.busy = False  # the worker is answering a request
        self.closing = False
        self.worker: asyncio.Task[None] | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.paused_by: set[str] = set()
        # Both timers are lazy (one TimerHandle per connection, not one per request): a request
        # only notes when its head began or when the connection became idle, and a timer that
        # fires early re-arms itself for the deadline that time gives.
        self.header_timer: asyncio.TimerHandle | None = None
        self.head_started: float | None = None  # loop time the incomplete head began
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_since: float | None = None  # loop time the connection became idle
        self.linger_timer: asyncio.TimerHandle | None = None
        self.link: _AiohttpLink | None = None
        self.tunnel = False  # after an Upgrade: every byte goes to aiohttp
        self.refused = False
        self.answering: _Request | None = None
        self.head_bytes = 0  # bytes received while a request's head is incomplete
        self.tunnel_open = False  # the Upgrade request went to aiohttp: bytes may follow it
        self.pending_tunnel_bytes = b""
        self.closing_after_queue = False
        self.failed = False  # the byte stream cannot be parsed further: read nothing more

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.front.guard.admit(self):
            self.refused = True
            self._refuse_connection(self.transport)
            return
        self.front.connections.add(self)
        self.worker = asyncio.get_running_loop().create_task(self._serve())
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.refused or self.closing or self.failed:
            return
        if self.tunnel:
            self._to_tunnel(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # The request before the offset asked to switch protocols: aiohttp answers it and
            # every byte after it on this connection.
            self.tunnel = True
            self._to_tunnel(data[upgrade.args[0]:] if upgrade.args else b"")
            return
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        request = self.parsing
        if request is not None and not request.dispatched:
            # httptools holds a header's pieces until the field ends: bound what a head may cost.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse_head(_refusal(431, "header_too_large",
                                           f"the request head exceeds {MAX_HEAD_BYTES} bytes").answer)

    def _to_tunnel(self, data: bytes) -> None:
        if self.tunnel_open and self.link is not None:
            self.link.feed(data)
        elif data:
            self.pending_tunnel_bytes += data
            self._pause("tunnel", True)  # until the worker reaches the Upgrade request

    def eof_received(self) -> bool | None:
        if self.refused:
            return False
        request = self.parsing
        if request is not None and request.dispatched and not request.complete:
            request.broken = BadRequest("incomplete_body", "the connection closed before the whole body arrived")
            request.wake()
        # Answer what was asked (a client may half-close after its requests), then close.
        self.closing_after_queue = True
        return bool(self.queue or self.busy)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_timers()
        if self.refused:
            self.front.guard.done_lingering(self)
            return
        self.front.connections.discard(self)
        self.front.guard.forget(self)
        current = self.parsing
        if current is not None:
            current.broken = current.broken or BadRequest(
                "incomplete_body", "the connection closed before the whole body arrived")
            current.wake()
        for request in self.queue:
            request.wake()
        if self.link is not None:
            self.link.client_gone()
        # The request being answered is not cancelled (as aiohttp does not cancel a handler when
        # its client goes): a write half-way through its replicas finishes; its answer is dropped.
        waiter = self.wakeup
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        if self.link is not None:
            self.link.pause_writing()

    def resume_writing(self) -> None:
        if self.link is not None:
            self.link.resume_writing()

    # --- httptools callbacks (inside feed_data) --------------------------------------------------

    def on_message_begin(self) -> None:
        request = _Request()
        self.parsing = request
        self.head_bytes = 0
        self.idle_since = None
        self.front.guard.mark_busy(self)
        loop = asyncio.get_running_loop()
        self.head_started = loop.time()
        if self.header_timer is None:
            self.header_timer = loop.call_later(self.front.guard.header_timeout_s, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.url += url
        if len(request.url) > MAX_REQUEST_LINE_BYTES:  # what aiohttp's parser bounds (kvstore.server.api)
            raise _refusal(414, "uri_too_long", f"the request line exceeds {MAX_REQUEST_LINE_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.parsing
        assert request is not None
        if len(name) + len(value) > MAX_HEADER_FIELD_BYTES:
            raise _refusal(431, "header_too_large", f"a header field exceeds {MAX_HEADER_FIELD_BYTES} bytes")
        request.headers.append((name, value))
        if len(request.headers) > MAX_HEADER_COUNT:
            raise _refusal(431, "too_many_headers", f"the request has more than {MAX_HEADER_COUNT} header fields")

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None
        parser = self.parser
        request.method = parser.get_method().decode("ascii")
        request.keep_alive = parser.should_keep_alive()
        request.http_version = parser.get_http_version()
        self.head_started = None
        url = request.url
        fast = (
            request.method in KV_METHODS
            and url.startswith(KV_PREFIX_BYTES)
            and url.isascii()
            and b"#" not in url
            and not parser.should_upgrade()
        )
        for name, value in request.headers:
            lname = name.lower()
            if lname == b"content-length":
                with contextlib.suppress(ValueError):
                    request.content_length = int(value)
            elif lname == b"transfer-encoding":
                # llhttp accepts a request's Transfer-Encoding only with chunked last: its body is
                # de-chunked here and re-chunked when forwarded, under the same header.
                request.chunked = True
                request.transfer_encoding = value
                if value.strip().lower() != b"chunked":
                    fast = False
            elif lname == b"content-encoding":
                if value.strip().lower() != b"identity":
                    fast = False
            elif lname == b"expect" and fast:
                if value.strip().lower() == b"100-continue":
                    request.expect_continue = True
                else:
                    request.refusal = _refusal(
                        417, "expectation_failed", "the only Expect this node meets is 100-continue"
                    ).answer
            elif lname in CORE_HEADER_NAMES:
                if request.core_headers is None:
                    request.core_headers = []
                request.core_headers.append((name, value))
        request.fast = fast
        self._enqueue(request)

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.size += len(body)
        if request.sink is not None:  # a forwarded body, being answered: straight to aiohttp
            request.sink(body)
        elif request.overflow:
            pass
        elif request.fast and (request.size > self.front.queued_body_cap or request.refusal is not None):
            request.overflow = True  # refused anyway: hold nothing more of it
            self._unqueue_bytes(request)
            request.parts.clear()
        else:
            request.parts.append(body)
            if request is not self.answering:
                request.queued_bytes += len(body)
                self.queued_body_bytes += len(body)
                self._flow()
        request.wake()

    def on_message_complete(self) -> None:
        request = self.parsing
        assert request is not None
        request.complete = True
        self.parsing = None
        request.wake()

    # --- the worker: one request at a time, answers in order -----------------------------------

    def _unqueue_bytes(self, request: _Request) -> None:
        self.queued_body_bytes -= request.queued_bytes
        request.queued_bytes = 0
        self._flow()

    def _enqueue(self, request: _Request) -> None:
        request.dispatched = True
        self.queue.append(request)
        self._flow()
        waiter = self.wakeup
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flow(self) -> None:
        """Stop reading the socket while too much waits behind the request being answered."""
        too_much = len(self.queue) > MAX_PIPELINED or self.queued_body_bytes > self.front.queued_body_cap
        self._pause("queue", too_much)

    def _pause(self, reason: str, paused: bool) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        was = bool(self.paused_by)
        if paused:
            self.paused_by.add(reason)
        else:
            self.paused_by.discard(reason)
        if was != bool(self.paused_by):
            if self.paused_by:
                transport.pause_reading()
            else:
                transport.resume_reading()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.closing:
                if not self.queue:
                    if self.closing_after_queue:
                        self.close_transport()
                        return
                    self._became_idle()
                    self.wakeup = loop.create_future()
                    await self.wakeup
                    self.wakeup = None
                    continue
                request = self.queue.popleft()
                self._unqueue_bytes(request)
                self.busy = True
                self.answering = request
                try:
                    keep_open = await self._answer(request)
                finally:
                    self.busy = False
                    self.answering = None
                if not keep_open:
                    self.close_transport()
                    return
        except asyncio.CancelledError:
            return
        except Exception:  # a bug: close this connection, keep the node
            log.exception("http front end: unhandled error; closing the connection")
            self.close_transport()

    async def _answer(self, request: _Request) -> bool:
        """Answer one request; False: close the connection after it."""
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return False
        if request.refusal is not None:
            transport.write(request.refusal)
            return False
        if not request.fast:
            return await self._forward(request)
        url = request.url.decode("ascii")
        path, _, query_string = url.partition("?")
        fields = request.core_headers
        headers: Mapping[str, str] = NO_HEADERS if fields is None else CIMultiDict(
            (name.decode("ascii", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in fields
        )
        query = self.front.queries.parse(query_string) if query_string else NO_QUERY
        core_request = ApiRequest(request.method, path, query, headers)
        read_value = functools.partial(self._read_body, request) if request.method == "PUT" else None
        response = await self.front.kv_api.handle(core_request, read_value)
        if transport.is_closing():
            return False
        if request.complete:
            keep_open = request.keep_alive and not response.close_connection
            transport.write(self._encode(response, keep_open, request))
            return keep_open
        # Answered before its body was read (a 400, a 413 from the declared length): the rest
        # is discarded as it arrives, and the connection lives on if that rest is small.
        request.overflow = True
        request.parts.clear()
        drain = (request.keep_alive and not response.close_connection and request.broken is None
                 and (request.content_length or 0) <= self.front.queued_body_cap)
        transport.write(self._encode(response, drain, request))
        return drain and await self._drained(request)

    async def _drained(self, request: _Request) -> bool:
        """Wait for the end of a body nobody reads; False: it is too long, stalls or breaks."""
        loop = asyncio.get_running_loop()
        while not request.complete:
            if request.size > self.front.queued_body_cap or request.broken is not None:
                return False
            request.progress = loop.create_future()
            try:
                async with asyncio.timeout(self.front.body_idle_timeout_s):
                    await request.progress
            except TimeoutError:
                return False
            finally:
                request.progress = None
        return True

    async def _read_body(self, request: _Request, limit: int) -> bytes:
        """The whole body, or 413 past ``limit``, 408 if it stalls, 400 if it is malformed."""
        if request.content_length is not None and request.content_length > limit:
            raise ValueTooLarge(f"the value exceeds the limit of {limit} bytes", limit=limit)
        if (request.expect_continue and not request.complete and self.transport is not None
                and not self.transport.is_closing()):
            request.expect_continue = False
            self.transport.write(CONTINUE)
        loop = asyncio.get_running_loop()
        while not request.complete:
            if request.size > limit:
                raise ValueTooLarge(f"the value exceeds the limit of {limit} bytes", limit=limit)
            if request.broken is not None:
                raise request.broken
            request.progress = loop.create_future()
            try:
                async with asyncio.timeout(self.front.body_idle_timeout_s):
                    await request.progress
            except TimeoutError:
                raise BodyTimeout(
                    f"no body bytes arrived for {self.front.body_idle_timeout_ms} ms; the request is refused"
                ) from None
            finally:
                request.progress = None
        if request.size > limit:
            raise ValueTooLarge(f"the value exceeds the limit of {limit} bytes", limit=limit)
        return b"".join(request.parts)

    def _encode(self, response: ApiResponse, keep_open: bool, request: _Request) -> bytes:
        """The whole answer, head and body, as one bytes (one write, one send)."""
        fields = ""
        for name, value in response.headers.items():
            fields += f"{name}: {value}\r\n"
        body = response.body
        if body or "Content-Type" in response.headers:  # a 204 has neither, as from aiohttp
            fields += f"Content-Length: {len(body)}\r\n"
        if not keep_open:
            fields += "Connection: close\r\n"
        elif request.http_version == "1.0":
            fields += "Connection: keep-alive\r\n"
        status_line = STATUS_LINES.get(response.status) or f"HTTP/1.1 {response.status} Unknown\r\n".encode()
        return b"".join((status_line, fields.encode(), self.front.dates.line(), b"\r\n", body))

    # --- forwarding to aiohttp -----------------------------------------------------------------

    async def _forward(self, request: _Request) -> bool:
        transport = self.transport
        assert transport is not None
        if self.link is None or self.link.closed:
            self.link = _AiohttpLink(self, self.front.aiohttp_server())
        link = self.link
        done = link.expect_response(head_only=request.method == "HEAD")
        link.feed(self._reframed_head(request))
        if self.tunnel and request.complete and not self.queue:  # the Upgrade request: the last one parsed
            self.tunnel_open = True
            if self.pending_tunnel_bytes:
                link.feed(self.pending_tunnel_bytes)
                self.pending_tunnel_bytes = b""
            self._pause("tunnel", False)
            await link.until_closed()
            return False
        chunked = request.content_length is None and request.chunked

        def pump(piece: bytes) -> None:
            if piece:
                link.feed(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)

        for piece in request.parts:
            pump(piece)
        request.parts.clear()
        request.sink = None if request.complete else pump
        loop = asyncio.get_running_loop()
        while not done.done():
            if request.complete and request.sink is not None:
                request.sink = None
            if request.complete and chunked:
                chunked = False
                link.feed(b"0\r\n\r\n")
            if request.broken is not None and not request.complete:
                link.client_gone()
                return False
            waiters: list[asyncio.Future[Any]] = [done]
            if not request.complete:
                request.progress = loop.create_future()
                waiters.append(request.progress)
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            request.progress = None
        request.sink = None
        keep_open = done.result() and request.complete and request.keep_alive and not link.closed
        return keep_open

    def _reframed_head(self, request: _Request) -> bytes:
        lines = [f"{request.method} ".encode("ascii") + request.url + f" HTTP/{request.http_version}\r\n".encode()]
        for name, value in request.headers:
            if name.lower() not in HOP_BY_HOP:
                lines.append(name + b": " + value + b"\r\n")
        if request.content_length is not None:
            lines.append(b"Content-Length: %d\r\n" % request.content_length)
        elif request.chunked:
            lines.append(b"Transfer-Encoding: " + request.transfer_encoding + b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    # --- timers and closing ----------------------------------------------------------------------

    def _became_idle(self) -> None:
        if self.parsing is None:
            self.front.guard.mark_idle(self)
            self._arm_idle()

    def _arm_idle(self) -> None:
        loop = asyncio.get_running_loop()
        self.idle_since = loop.time()
        if self.idle_timer is None:
            self.idle_timer = loop.call_later(self.front.idle_timeout_s, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self.idle_timer = None
        if self.idle_since is None:  # busy since: the next idle period arms it again
            return
        loop = asyncio.get_running_loop()
        deadline = self.idle_since + self.front.idle_timeout_s
        if loop.time() < deadline:  # idle again since the timer was armed: not long enough yet
            self.idle_timer = loop.call_at(deadline, self._idle_timeout)
            return
        if self.parsing is None and not self.busy and not self.queue:
            self.close_transport()

    def _header_timeout(self) -> None:
        self.header_timer = None
        transport = self.transport
        started = self.head_started
        if transport is None or transport.is_closing() or self.parsing is None or started is None:
            return  # no head is incomplete: the next one arms it again
        loop = asyncio.get_running_loop()
        deadline = started + self.front.guard.header_timeout_s
        if loop.time() < deadline:  # armed for an earlier head: this one's time has not come
            self.header_timer = loop.call_at(deadline, self._header_timeout)
            return
        if self.busy or self.queue:  # bytes that arrive while answering do not count against it
            self.header_timer = loop.call_later(self.front.guard.header_timeout_s, self._header_timeout)
            return
        self.front.guard.header_timed_out()
        transport.write(self.front.guard.too_slow_response)
        self.close_transport()

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        detail = " ".join(str(exc).split())[:300] or "unparseable bytes"
        current = self.parsing
        self.parsing = None
        self.failed = True
        self._pause("failed", True)  # nothing after a malformed message can be parsed
        if current is not None and current.dispatched:
            # The head was accepted; its body is malformed (e.g. a chunk size): the core, or
            # the forwarding, learns it when it waits for the body.
            current.broken = BadRequest("malformed_request", f"malformed HTTP request: {detail}")
            current.wake()
            self.closing_after_queue = True
            return
        refusal = exc.__context__ if isinstance(exc.__context__, _Refusal) else None
        self._refuse_head(refusal.answer if refusal is not None else canned_response(
            "400 Bad Request", "malformed_request", f"malformed HTTP request: {detail}"
        ))

    def _refuse_head(self, answer: bytes) -> None:
        """Answer ``answer`` after the requests before it, then close: the stream cannot be resynced."""
        self.parsing = None
        self.failed = True
        self._pause("failed", True)
        self.head_started = None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        bad = _Request()
        bad.refusal = answer
        bad.complete = True
        self._enqueue(bad)

    def _refuse_connection(self, transport: asyncio.Transport) -> None:
        guard = self.front.guard
        transport.write(guard.overloaded_response)
        if transport.can_write_eof() and guard.may_linger(self):
            transport.write_eof()
            self.linger_timer = asyncio.get_running_loop().call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def is_writing(self) -> bool:
        return self.transport is not None and self.transport.get_write_buffer_size() > 0

    def close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self.header_timer, self.idle_timer, self.linger_timer):
            if timer is not None:
                timer.cancel()
        self.header_timer = self.idle_timer = self.linger_timer = None


class _ResponseEnd:
    """httptools callbacks finding where one relayed aiohttp response ends."""

    def __init__(self, link: _AiohttpLink, head_only: bool) -> None:
        self.link = link
        self.head_only = head_only
        self.parser = httptools.HttpResponseParser(self)

    def _interim(self) -> bool:  # a 100 Continue precedes the answer (101 ends the HTTP part)
        return 100 <= self.parser.get_status_code() < 200 and self.parser.get_status_code() != 101

    def on_headers_complete(self) -> None:
        if self.head_only and not self._interim():
            self.link.response_done(self.parser.should_keep_alive())

    def on_message_complete(self) -> None:
        if not self.head_only and not self._interim():
            self.link.response_done(self.parser.should_keep_alive())


class _AiohttpLink(asyncio.Transport):
    """An in-process connection to the node's aiohttp application, owned by one client
    connection: what is written here goes to that client; ``feed`` gives aiohttp request bytes."""

    def __init__(self, client: KvConnection, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.client = client
        self.protocol = protocol
        self.closed = False
        self._end: _ResponseEnd | None = None
        self._done: asyncio.Future[bool] | None = None
        self._closed_future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        protocol.connection_made(self)

    # --- used by KvConnection --------------------------------------------------------------------

    def expect_response(self, head_only: bool) -> asyncio.Future[bool]:
        self._end = _ResponseEnd(self, head_only)
        self._done = asyncio.get_running_loop().create_future()
        return self._done

    def feed(self, data: bytes) -> None:
        if not self.closed:
            self.protocol.data_received(data)

    def response_done(self, keep_alive: bool) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(keep_alive)
        self._end = None

    async def until_closed(self) -> None:
        await self._closed_future

    def client_gone(self) -> None:
        self._lose()

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    # --- asyncio.Transport, as aiohttp uses it ---------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        client = self.client.transport
        if self.closed or client is None or client.is_closing():
            return
        client.write(data)
        end = self._end
        if end is not None and not self.client.tunnel:
            try:
                end.parser.feed_data(bytes(data))
            except httptools.HttpParserError:
                log.exception("http front end: aiohttp's answer did not parse; closing the connection")
                self.response_done(False)
                self.close()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        # Called by aiohttp after an answer with Connection: close, or when idle past its keep-alive.
        asyncio.get_running_loop().call_soon(self._lose)

    def abort(self) -> None:
        self.close()

    def _lose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._done is not None and not self._done.done():
            self._done.set_result(False)
        if not self._closed_future.done():
            self._closed_future.set_result(None)
        self.protocol.connection_lost(None)
        if self.client.tunnel:
            self.client.close_transport()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        client = self.client.transport
        if name == "socket" or client is None:
            return default
        return client.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.client._pause("aiohttp", True)

    def resume_reading(self) -> None:
        self.client._pause("aiohttp", False)

    def is_reading(self) -> bool:
        return "aiohttp" not in self.client.paused_by

    def get_write_buffer_size(self) -> int:
        client = self.client.transport
        return 0 if client is None else client.get_write_buffer_size()

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol
