"""The async Python client of the public HTTP API (``kvstore.Client``).

Theory of operation
-------------------
A ``Client`` holds a ``ClientTransport`` -- by default ``AiohttpTransport``, one
pooled ``aiohttp.ClientSession`` with a bounded connector; tests and the
simulator inject their own -- and a list of node URLs.  Any node can coordinate any request, so each call
picks a starting node round-robin and walks the list from there, moving nodes
that recently refused a connection to the back so a dead node costs one failed
connect every ``down_cooldown_s`` rather than one per request.
Everything else in the project that speaks to a node's public or admin API
goes through this client and its transport too: the chaos workload (one
``Client`` per node), the nemesis's and the membership commands' admin calls
(``kvstore.client.admin.AdminClient``, a ``Client`` per node on a shared
transport), the explorer's probes and the benchmarks' Python generators.

What it guarantees, and what it refuses to hide:

* **Failover is safe by construction.**  If the connection could not even be
  made (refused, DNS failure, connect timeout) nothing was sent, so every
  operation silently moves to the next node.  If the request may have been
  sent (the server disconnected, the read timed out), a *read* moves on, but a
  *write* may already have been applied, so by default it is **not** re-sent:
  the call raises ``RequestTimeout(code="indeterminate", indeterminate=True)``
  and the caller decides (read the key, then write again with its context).
  ``retry_writes=True`` opts in to re-sending such a write to the next node;
  the ``PutResult`` then says ``retried=True`` and lists the earlier failure in
  ``attempts``.  A re-sent write is not idempotent in a Dynamo store: if both
  copies land, the second one is a concurrent version (a sibling, possibly of
  the same value).  Conditional writes (``cas``, ``put_if_absent``,
  ``if_match=``) are never re-sent, even then, because the re-send would be
  judged against the state the first copy may have created (a spurious 412).
  aiohttp's own hidden re-send of PUT/DELETE after a disconnect is switched
  off (``kvstore.client.http_session``), so every copy sent is one listed in
  ``attempts``.
* **Server answers are final.**  An HTTP response is never retried on another
  node: a 503 from one coordinator describes the replicas, which the next
  coordinator would ask too.  Retry policy above that is the caller's.
* **Every error is typed** (tree below; the root ``KvstoreError`` is shared with
  the server's errors, in ``kvstore.contract``) and carries ``status`` (None when no
  HTTP response arrived), ``code`` (the server's JSON ``error`` field, or a
  client-side code), ``message``, ``node`` (the URL that answered or was last
  tried), ``attempts`` and ``indeterminate``, decided by the one outcome
  classification of ``kvstore.contract`` (shared with the chaos harness and
  the benchmarks).  ``indeterminate=False`` (``outcome == "fail"``) means the
  answer proves the request was not applied: a 4xx, a 5xx that says
  ``"indeterminate": false``, or no node could be connected to.  ``True``
  (``outcome == "info"``) means it may have been, or may still become
  visible: a timeout or a cut connection after the request may have been
  sent, any 5xx that does not say ``"indeterminate": false`` (a quorum that
  may still land, an unexplained node failure), or an earlier attempt of this
  call that may have landed before a retry failed.  A history checker records
  the first as ``fail`` and the second as ``info``.  For a read, which changes
  nothing, ``indeterminate`` only tells "unanswered" from "refused".
* **Timeouts**: ``timeout_s`` (on the client, overridable per call) bounds
  each attempt, connect included.  The server is sent ``timeout_ms`` at 90% of
  it so that, when the replicas are slow, the coordinator gives up first and
  answers with a typed 503 that says whether a write is indeterminate, instead
  of the client cutting the connection and knowing nothing.

Siblings: a ``GET`` that finds concurrent versions (HTTP 300) returns every
one of them as a ``Sibling(value, timestamp_ns)`` in ``GetResult.siblings``
and ``value=None``, unless the client has a ``resolver`` (``list[Sibling] ->
bytes``), which then supplies ``value``.  The shipped ``lww_resolver`` keeps
the sibling with the highest ``timestamp_ns`` (ties and missing timestamps
broken by the bytes, so every client picks the same one).  Resolving only
changes what the caller sees: to settle the conflict on the server, ``put``
the chosen value with ``context=result.context``.

Exceptions::

    KVError                       .status .code .message .node .attempts .indeterminate
     +-- BadRequest               400  .code = invalid_quorum | invalid_key | invalid_context | bad_context
                                       | invalid_parameter  (bad_context: a context the cluster did not
                                       issue for this key, or read before the key's deletion was reaped)
     +-- Unauthorized             401  admin route without the right X-Cluster-Secret
     +-- PreconditionFailed       412  .current = ETag of the current value (None: absent)
     +-- ValueTooLarge            413  .limit = bytes
     +-- Overloaded               429, or 503 "overloaded"
     +-- QuorumUnavailable        503  .needed .acknowledged .indeterminate
     +-- RequestTimeout           503 "timeout", or no answer in time  .indeterminate
     +-- NodeUnreachable          no node could be reached (status None)
     +-- ServerError              any other 5xx (e.g. 503 storage_unavailable)

Any other unexpected status raises ``KVError`` itself.  A ``GET`` of a missing
key is not an error: it returns ``found=False``.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from yarl import URL

from kvstore import __version__
from kvstore.client.http_session import client_session, no_answer_kind
from kvstore.contract import (
    INFO,
    KvstoreError,
    Outcome,
    error_body,
    etag_of,
    no_answer_outcome,
    refusal_outcome,
)

__all__ = [
    "AiohttpTransport",
    "Attempt",
    "BadRequest",
    "Client",
    "ClientTransport",
    "GetResult",
    "KVError",
    "KvstoreError",
    "Lost",
    "NodeUnreachable",
    "NotSent",
    "Overloaded",
    "PreconditionFailed",
    "PutResult",
    "QuorumUnavailable",
    "RequestTimeout",
    "Resolver",
    "ServerError",
    "Sibling",
    "Unauthorized",
    "ValueTooLarge",
    "etag_of",
    "Outcome",
    "lww_resolver",
]

Quorum = int | Literal["one", "quorum", "all"]
Consistency = Literal["eventual", "quorum", "linearizable"]

# The server's accepted range for timeout_ms (kvstore.server.kv_api.RequestParams).
_SERVER_TIMEOUT_MS = (1, 60_000)
_SERVER_TIMEOUT_SHARE = 0.9


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Sibling:
    """One concurrent version of a value.  ``timestamp_ns`` is the coordinator's wall clock, if sent."""

    value: bytes
    timestamp_ns: int | None = None


Resolver = Callable[[list[Sibling]], bytes]


def lww_resolver(siblings: list[Sibling]) -> bytes:
    """Last write wins: the highest ``timestamp_ns``; ties (and missing timestamps) broken by the bytes.

    Wall clocks are not synchronized, so "last" is only as good as the clocks:
    this silently drops the other concurrent writes.  Deterministic, so every
    client resolving the same siblings picks the same value.
    """
    if not siblings:
        raise ValueError("lww_resolver needs at least one sibling")
    best = max(siblings, key=lambda s: (s.timestamp_ns if s.timestamp_ns is not None else -1, s.value))
    return best.value


@dataclass(frozen=True)
class GetResult:
    """What a ``GET`` found.

    * ``found``: some live value exists (HTTP 200 or 300).
    * ``siblings``: every live version the server returned: one for a 200,
      two or more for a 300 (a conflict), none when not found.
    * ``value``: the single value (200), the resolver's choice (300 with a
      resolver), else None (not found, or a 300 without a resolver).
    * ``context``: the opaque causal context to pass back on the next write
      of this same key (also present for a deleted key whose tombstone is
      known).  The cluster signs it for the key: a context of another key, or
      an altered one, is refused with ``BadRequest`` code ``bad_context``.
    * ``etag``: the server's ETag of ``value`` for a 200, else None.
    * ``node``: the URL of the node that answered.
    """

    value: bytes | None
    siblings: list[Sibling]
    context: str | None
    etag: str | None
    node: str
    found: bool

    @property
    def values(self) -> list[bytes]:
        """The sibling values, in the server's order."""
        return [s.value for s in self.siblings]

    @property
    def conflict(self) -> bool:
        return len(self.siblings) > 1


@dataclass(frozen=True)
class Attempt:
    """One try of a request against one node.

    ``outcome``: ``response`` (an HTTP response arrived; ``status`` is set),
    ``unreachable`` (no connection: nothing was sent), ``timeout`` or
    ``disconnected`` (the request may have been sent and applied).
    """

    node: str
    outcome: Literal["response", "unreachable", "timeout", "disconnected"]
    status: int | None = None
    error: str | None = None

    @property
    def may_have_been_applied(self) -> bool:
        return self.outcome in ("timeout", "disconnected")


@dataclass(frozen=True)
class PutResult:
    """What a write (put, delete, cas, put_if_absent) got back.

    ``retried`` is True when the write was sent again after an attempt that
    may already have been applied (listed in ``attempts``, which holds every
    try in order, the successful one last; only with ``retry_writes=True``).

    ``siblings``: how many live values the key has after the write (the
    server's ``X-Siblings``; None when it does not say, as for linearizable
    writes).  ``others``: how many of them this write did not store: for a
    put ``siblings - 1``, for a delete ``siblings``.  Anything above 0 means
    values the write's context did not cover are still alive: a put without
    (or with a stale) context left the old value beside the new one as a
    sibling; a delete without one **did not delete** the value.  Read the key
    and write again with the read's context.  ``context`` covers every value
    the coordinator knew, so it is only safe to reuse for the next write when
    ``others == 0``.
    """

    context: str | None
    etag: str | None
    node: str
    retried: bool
    attempts: list[Attempt] = field(default_factory=list)
    siblings: int | None = None
    others: int | None = None


# --------------------------------------------------------------------------- errors


class KVError(KvstoreError):
    """Base of every client error (the client side of the one family in ``kvstore.contract``); also
    raised as-is for an unexpected status."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        node: str = "",
        body: Mapping[str, Any] | None = None,
        attempts: Sequence[Attempt] = (),
        indeterminate: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.node = node
        self.body: dict[str, Any] = dict(body or {})
        self.attempts: list[Attempt] = list(attempts)
        self.indeterminate = indeterminate

    def __str__(self) -> str:
        where = f" [{self.node}]" if self.node else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.message}{where}"


class BadRequest(KVError):
    """400: the request was malformed; ``code`` says which part."""


class Unauthorized(KVError):
    """401: the route needs the cluster secret."""


class PreconditionFailed(KVError):
    """412: a conditional write found another value (``current`` is its ETag, None when absent)."""

    def __init__(self, message: str, *, current: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.current = current


class ValueTooLarge(KVError):
    """413: the value exceeds the node's limit (``limit`` bytes)."""

    def __init__(self, message: str, *, limit: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.limit = limit


class Overloaded(KVError):
    """429, or 503 ``overloaded``: the node shed the request; back off and retry."""


class QuorumUnavailable(KVError):
    """503: fewer than ``needed`` replicas answered.

    ``indeterminate``: the write may still become visible (some replica took it).
    """

    def __init__(
        self, message: str, *, needed: int | None = None, acknowledged: int | None = None, **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.needed = needed
        self.acknowledged = acknowledged


class RequestTimeout(KVError):
    """No answer in time (server 503 ``timeout``, or client-side).  ``indeterminate``: a write may have been applied."""


class NodeUnreachable(KVError):
    """No node could be reached; nothing was applied."""


class ServerError(KVError):
    """A 5xx the contract does not name (a node bug or a proxy)."""


def error_from_response(status: int, body: bytes, node: str, attempts: Sequence[Attempt] = ()) -> KVError:
    """Map an HTTP error response to its typed exception (``indeterminate`` per kvstore.contract)."""
    data = error_body(body)  # {} when not our node (a proxy?): still a typed error, with the text as message
    code = str(data.get("error") or f"http_{status}")
    message = str(data.get("message") or body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}")
    kw: dict[str, Any] = {
        "status": status, "code": code, "node": node, "body": data, "attempts": attempts,
        "indeterminate": refusal_outcome(status, data) == INFO,
    }
    if status == 400:
        return BadRequest(message, **kw)
    if status == 401:
        return Unauthorized(message, **kw)
    if status == 412:
        current = data.get("current")
        return PreconditionFailed(message, current=current if isinstance(current, str) else None, **kw)
    if status == 413:
        limit = data.get("limit")
        return ValueTooLarge(message, limit=limit if isinstance(limit, int) else None, **kw)
    if status == 429 or (status == 503 and code == "overloaded"):
        return Overloaded(message, **kw)
    if status == 503 and code == "quorum_unavailable":
        return QuorumUnavailable(
            message, needed=_int_or_none(data.get("needed")), acknowledged=_int_or_none(data.get("acknowledged")),
            **kw,
        )
    if status == 503 and code == "timeout":
        return RequestTimeout(message, **kw)
    if status >= 500:
        return ServerError(message, **kw)
    return KVError(message, **kw)


def _count_or_none(header: str | None) -> int | None:
    return int(header) if header is not None and header.isascii() and header.isdigit() else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------- transport


@dataclass
class _Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    node: str
    attempts: list[Attempt]


class NotSent(Exception):
    """The connection could not be made: the request never left (a certain failure)."""


class Lost(Exception):
    """The request may have been sent but no complete response came back (indeterminate)."""

    def __init__(self, outcome: Literal["timeout", "disconnected"], detail: str) -> None:
        super().__init__(detail)
        self.outcome: Literal["timeout", "disconnected"] = outcome


class ClientTransport(Protocol):
    """How a ``Client`` sends one HTTP request to one node: exactly once, never re-sent.

    Returns ``(status, headers, body)`` for any HTTP answer; raises ``NotSent`` when nothing left
    (connection refused, connect timeout) and ``Lost`` when the request may have reached the node
    without a complete answer.  The default is ``AiohttpTransport``; tests and the simulator inject
    their own (an in-process transport that hands requests to a node's kv core).
    """

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
        timeout_s: float, connect_timeout_s: float,
    ) -> tuple[int, Mapping[str, str], bytes]: ...

    async def close(self) -> None: ...


class AiohttpTransport:
    """The real client transport: one pooled aiohttp session (bounded connector), re-send switched off."""

    def __init__(self, *, max_connections: int = 64, ssl_context: ssl.SSLContext | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.ssl_context = ssl_context  # None: aiohttp's default verification (https with the system CAs)
        self.session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self.session is None:
            # Created lazily: a ClientSession must be made inside the running loop.
            # client_session: aiohttp's hidden re-send of a dropped PUT/DELETE is off.
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, limit_per_host=self.max_connections, ssl=self.ssl_context or True
            )
            self.session = client_session(
                connector=connector, headers={"User-Agent": f"kvstore-client/{__version__}"}
            )
        return self.session

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
        timeout_s: float, connect_timeout_s: float,
    ) -> tuple[int, Mapping[str, str], bytes]:
        session = self.session or self._ensure_session()
        # A load loop sends thousands of requests with the same few timeouts: build each once.
        timeout = self._timeouts.get((timeout_s, connect_timeout_s))
        if timeout is None:
            if len(self._timeouts) >= 64:
                self._timeouts.clear()
            # sock_connect is separate so a connect timeout is known to have sent nothing.
            timeout = self._timeouts[(timeout_s, connect_timeout_s)] = aiohttp.ClientTimeout(
                total=timeout_s, sock_connect=min(connect_timeout_s, timeout_s))
        try:
            async with session.request(
                method, URL(url, encoded=True), headers=headers or None, data=body, timeout=timeout,
                allow_redirects=False,
            ) as resp:
                payload = await resp.read()
                return resp.status, resp.headers, payload
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = no_answer_kind(exc)
            assert kind is not None, exc
            if no_answer_outcome(kind) != INFO:  # never connected: nothing was sent
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise NotSent(f"cannot connect: {exc.os_error.strerror or exc.os_error}") from None
                raise NotSent(f"connect timed out after {min(connect_timeout_s, timeout_s):g}s") from None
            if kind == "timeout":
                raise Lost("timeout", f"no response within {timeout_s:g}s") from None
            raise Lost("disconnected", f"connection lost: {exc or type(exc).__name__}") from None

    async def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


def _normalize_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"node URL must look like http://host:port, got {url!r}")
    return url.rstrip("/")


def key_path(key: str) -> str:
    """``/kv/<percent-encoded key>``.  ``.`` and ``..`` are encoded too, so no URL layer treats them as dot-segments."""
    if not isinstance(key, str):
        raise TypeError(f"key must be str, got {type(key).__name__}")
    encoded = quote(key, safe="")
    if key in (".", ".."):
        encoded = encoded.replace(".", "%2E")
    return "/kv/" + encoded


class Client:
    """An async client for a set of kvstore nodes.  Use as ``async with Client([...]) as kv:``."""

    def __init__(
        self,
        nodes: Sequence[str] | str,
        *,
        timeout_s: float = 5.0,
        connect_timeout_s: float = 1.0,
        resolver: Resolver | None = None,
        retry_writes: bool = False,
        secret: str | None = None,
        max_connections: int = 64,
        down_cooldown_s: float = 2.0,
        ca_file: str | None = None,
        transport: ClientTransport | None = None,
        server_timeout_share: float = _SERVER_TIMEOUT_SHARE,
    ) -> None:
        """``ca_file``: the PEM CA that signed the nodes' certificates, for https:// nodes of a cluster
        with TLS (docs/deployment.md); without it https:// is verified against the system's CAs.
        ``server_timeout_share``: the share of ``timeout_s`` sent to the node as ``timeout_ms`` (the
        chaos workload leaves its answers more headroom on a busy machine)."""
        urls = [nodes] if isinstance(nodes, str) else list(nodes)
        if not urls:
            raise ValueError("Client needs at least one node URL")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not 0 < server_timeout_share <= 1:
            raise ValueError("server_timeout_share must be in (0, 1]")
        self.server_timeout_share = server_timeout_share
        self.nodes: list[str] = [_normalize_url(u) for u in urls]
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.resolver = resolver
        self.retry_writes = retry_writes
        self.secret = secret
        self.max_connections = max_connections
        self.down_cooldown_s = down_cooldown_s
        if ca_file is not None and transport is not None:
            raise ValueError("ca_file configures the default transport; give the injected one its own TLS")
        # ssl.create_default_context raises if the CA file is unreadable: a clear error at construction.
        ssl_context = ssl.create_default_context(cafile=ca_file) if ca_file is not None else None
        # The client closes a transport it made; an injected one belongs to the caller.
        self._owns_transport = transport is None
        self.transport: ClientTransport = transport or AiohttpTransport(
            max_connections=max_connections, ssl_context=ssl_context
        )
        self._closed = False
        self._rotation = itertools.count()
        self._down_until: dict[str, float] = {}

    # -- lifecycle

    async def __aenter__(self) -> Client:
        self._check_open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the transport (if the client made it).  Idempotent; the client cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._owns_transport:
            await self.transport.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this kvstore.Client is closed")

    # -- key-value operations

    async def get(
        self,
        key: str,
        *,
        r: Quorum | None = None,
        consistency: Consistency | None = None,
        sloppy: bool | None = None,
        timeout_s: float | None = None,
    ) -> GetResult:
        """Read ``key``.  A missing key returns ``found=False``; see ``GetResult`` for siblings."""
        timeout = self._timeout(timeout_s)
        query = _kv_query(r=r, w=None, consistency=consistency, sloppy=sloppy, timeout_s=timeout,
                          share=self.server_timeout_share)
        reply = await self._request("GET", key_path(key), query=query, timeout_s=timeout, write=False)
        context = reply.headers.get("X-Context") or None
        if reply.status == 200:
            sibling = Sibling(reply.body)
            return GetResult(
                value=reply.body, siblings=[sibling], context=context,
                etag=reply.headers.get("ETag"), node=reply.node, found=True,
            )
        if reply.status == 300:
            siblings, body_context = _parse_siblings(reply)
            value = self.resolver(list(siblings)) if self.resolver is not None else None
            return GetResult(
                value=value, siblings=siblings, context=context or body_context,
                etag=None, node=reply.node, found=True,
            )
        if reply.status == 404 and _error_code(reply.body) == "not_found":
            return GetResult(value=None, siblings=[], context=context, etag=None, node=reply.node, found=False)
        raise error_from_response(reply.status, reply.body, reply.node, reply.attempts)

    async def put(
        self,
        key: str,
        value: bytes,
        *,
        context: str | None = None,
        w: Quorum | None = None,
        consistency: Consistency | None = None,
        sloppy: bool | None = None,
        timeout_s: float | None = None,
        if_match: str | None = None,
        if_absent: bool = False,
    ) -> PutResult:
        """Write ``value``.  Pass the ``context`` of the read it is based on, or it becomes a sibling.

        Without a context on a key that has a value, the write is concurrent
        with that value and both survive: ``result.others`` (see
        ``PutResult``) is then above 0.

        ``if_match`` (an ETag) / ``if_absent`` make it a conditional write
        (compare-and-set); the server only offers those under
        ``consistency="linearizable"``, which is then the default.
        """
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"value must be bytes, got {type(value).__name__}")
        if if_match is not None and if_absent:
            raise ValueError("if_match and if_absent are mutually exclusive")
        headers: dict[str, str] = {}
        if context:
            headers["X-Context"] = context
        conditional = if_match is not None or if_absent
        if if_match is not None:
            headers["If-Match"] = normalize_etag(if_match)
        if if_absent:
            headers["If-None-Match"] = "*"
        if conditional and consistency is None:
            consistency = "linearizable"
        return await self._write(
            "PUT", key, bytes(value), headers, w=w, consistency=consistency, sloppy=sloppy,
            timeout_s=timeout_s, may_retry=not conditional,
        )

    async def delete(
        self,
        key: str,
        *,
        context: str | None = None,
        w: Quorum | None = None,
        consistency: Consistency | None = None,
        sloppy: bool | None = None,
        timeout_s: float | None = None,
    ) -> PutResult:
        """Delete ``key`` (writes a tombstone).  Pass the read's ``context`` so the delete supersedes it.

        Without a context (or with a stale one) the tombstone is concurrent
        with the stored value, which **survives**: the call still succeeds, and
        ``result.others`` says how many values are still alive (0: deleted).
        """
        headers = {"X-Context": context} if context else {}
        return await self._write(
            "DELETE", key, None, headers, w=w, consistency=consistency, sloppy=sloppy,
            timeout_s=timeout_s, may_retry=True,
        )

    async def cas(
        self,
        key: str,
        expected: bytes,
        new: bytes,
        *,
        w: Quorum | None = None,
        consistency: Consistency | None = None,
        timeout_s: float | None = None,
    ) -> PutResult:
        """Write ``new`` only if the current value is ``expected``; else ``PreconditionFailed``."""
        return await self.put(
            key, new, w=w, consistency=consistency, timeout_s=timeout_s, if_match=etag_of(bytes(expected))
        )

    async def put_if_absent(
        self,
        key: str,
        value: bytes,
        *,
        w: Quorum | None = None,
        consistency: Consistency | None = None,
        timeout_s: float | None = None,
    ) -> PutResult:
        """Create ``key`` only if it has no live value; else ``PreconditionFailed``."""
        return await self.put(key, value, w=w, consistency=consistency, timeout_s=timeout_s, if_absent=True)

    # -- cluster operations

    async def cluster(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /cluster``: membership, ring ownership, N/R/W and pending hints, as one node sees them."""
        return await self._json("GET", "/cluster", timeout_s=timeout_s)

    async def placement(self, key: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /cluster/keys/{key}/placement``: the key's token, preference list and stand-ins,
        as the answering node sees them."""
        return await self._json("GET", f"/cluster/keys/{quote(key, safe='')}/placement", timeout_s=timeout_s)

    async def health(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /health`` of the first node that answers."""
        return await self._json("GET", "/health", timeout_s=timeout_s)

    async def metrics(self, *, timeout_s: float | None = None) -> str:
        """``GET /metrics``: the Prometheus text of the first node that answers."""
        timeout = self._timeout(timeout_s)
        reply = await self._request("GET", "/metrics", query={}, timeout_s=timeout, write=False)
        if reply.status != 200:
            raise error_from_response(reply.status, reply.body, reply.node, reply.attempts)
        return reply.body.decode("utf-8", "replace")

    async def repair(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``POST /admin/repair``: start an anti-entropy round (needs ``secret``)."""
        return await self._json("POST", "/admin/repair", timeout_s=timeout_s, admin=True)

    # -- internals

    def _timeout(self, timeout_s: float | None) -> float:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError("timeout_s must be positive")
        return timeout

    async def _json(
        self, method: str, path: str, *, timeout_s: float | None, admin: bool = False, body: Any = None,
    ) -> dict[str, Any]:
        """One request whose answer is a JSON object (``body``: a JSON document to send, None: none)."""
        timeout = self._timeout(timeout_s)
        headers: dict[str, str] = {}
        if admin:
            if not self.secret:
                raise Unauthorized("this route needs the cluster secret: Client(..., secret=...)", code="unauthorized")
            headers["X-Cluster-Secret"] = self.secret
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        # An admin call is not re-sent after a possible delivery: a POST/PUT/DELETE has side effects.
        reply = await self._request(
            method, path, query={}, timeout_s=timeout, write=admin and method != "GET", headers=headers,
            body=payload, may_retry=False,
        )
        if not 200 <= reply.status < 300:
            raise error_from_response(reply.status, reply.body, reply.node, reply.attempts)
        try:
            data = json.loads(reply.body)
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            # A 2xx that is not our answer proves nothing about what happened (kvstore.contract).
            raise ServerError(f"{path} did not return a JSON object", status=reply.status, code="bad_response",
                              node=reply.node, attempts=reply.attempts, indeterminate=True)
        return data

    async def _write(
        self,
        method: str,
        key: str,
        body: bytes | None,
        headers: dict[str, str],
        *,
        w: Quorum | None,
        consistency: Consistency | None,
        sloppy: bool | None,
        timeout_s: float | None,
        may_retry: bool,
    ) -> PutResult:
        timeout = self._timeout(timeout_s)
        query = _kv_query(r=None, w=w, consistency=consistency, sloppy=sloppy, timeout_s=timeout,
                          share=self.server_timeout_share)
        reply = await self._request(
            method, key_path(key), query=query, timeout_s=timeout, write=True, headers=headers, body=body,
            may_retry=may_retry and self.retry_writes,
        )
        if not 200 <= reply.status < 300:
            error = error_from_response(reply.status, reply.body, reply.node, reply.attempts)
            # This answer is about the last copy only; an earlier copy (retry_writes=True) may have landed.
            if any(a.may_have_been_applied for a in reply.attempts):
                error.indeterminate = True
            raise error
        siblings = _count_or_none(reply.headers.get("X-Siblings"))
        return PutResult(
            context=reply.headers.get("X-Context") or None,
            etag=reply.headers.get("ETag") or None,
            node=reply.node,
            retried=any(a.may_have_been_applied for a in reply.attempts),
            attempts=reply.attempts,
            siblings=siblings,
            others=None if siblings is None else max(0, siblings - (1 if body is not None else 0)),
        )

    def _order(self) -> list[str]:
        if len(self.nodes) == 1:  # a client bound to one node (the chaos workload's, an admin call's)
            return self.nodes
        start = next(self._rotation) % len(self.nodes)
        rotated = self.nodes[start:] + self.nodes[:start]
        now = time.monotonic()
        # Stable sort: nodes that recently refused connections go last, otherwise round-robin order.
        return sorted(rotated, key=lambda url: self._down_until.get(url, 0.0) > now)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str],
        timeout_s: float,
        write: bool,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        may_retry: bool = True,
    ) -> _Reply:
        """Send to one node after another until one answers with any HTTP response (see the module docstring)."""
        self._check_open()
        attempts: list[Attempt] = []
        suffix = path + ("?" + urlencode(query) if query else "")
        for node in self._order():
            try:
                status, reply_headers, reply_body = await self.transport.request(
                    method, node + suffix, headers or {}, body, timeout_s, self.connect_timeout_s
                )
            except NotSent as exc:
                attempts.append(Attempt(node, "unreachable", error=str(exc)))
                self._down_until[node] = time.monotonic() + self.down_cooldown_s
                continue
            except Lost as exc:
                attempts.append(Attempt(node, exc.outcome, error=str(exc)))
                if write and not may_retry:
                    raise _indeterminate(attempts) from None
                continue
            self._down_until.pop(node, None)
            attempts.append(Attempt(node, "response", status=status))
            return _Reply(status, reply_headers, reply_body, node, attempts)
        if write and any(a.may_have_been_applied for a in attempts):
            raise _indeterminate(attempts)
        summary = "; ".join(f"{a.node}: {a.error}" for a in attempts)
        last = attempts[-1].node if attempts else ""
        if any(a.may_have_been_applied for a in attempts):  # a read some node may have served, unanswered
            raise RequestTimeout(f"no node answered in time ({summary})", code="timeout", node=last,
                                 attempts=attempts, indeterminate=True)
        raise NodeUnreachable(f"could not reach any node ({summary})", code="unreachable", node=last,
                              attempts=attempts)


def _indeterminate(attempts: list[Attempt]) -> RequestTimeout:
    summary = "; ".join(f"{a.node}: {a.error}" for a in attempts)
    return RequestTimeout(
        f"the write may or may not have been applied ({summary})",
        code="indeterminate", node=attempts[-1].node, attempts=attempts, indeterminate=True,
    )


def _kv_query(
    *, r: Quorum | None, w: Quorum | None, consistency: str | None, sloppy: bool | None, timeout_s: float,
    share: float = _SERVER_TIMEOUT_SHARE,
) -> dict[str, str]:
    query: dict[str, str] = {}
    for name, q in (("r", r), ("w", w)):
        if q is not None:
            if isinstance(q, bool) or not isinstance(q, int | str):
                raise TypeError(f"{name} must be an int or one|quorum|all")
            query[name] = str(q)
    if consistency is not None:
        query["consistency"] = consistency
    if sloppy is not None:
        query["sloppy"] = "true" if sloppy else "false"
    low, high = _SERVER_TIMEOUT_MS
    query["timeout_ms"] = str(min(high, max(low, int(timeout_s * 1000 * share))))
    return query


def normalize_etag(etag: str) -> str:
    """Accept an ETag with or without its quotes (CLI users drop them); send it quoted."""
    etag = etag.strip()
    if etag == "*" or (len(etag) >= 2 and etag.startswith('"') and etag.endswith('"')):
        return etag
    return f'"{etag}"'


def _error_code(body: bytes) -> str | None:
    code = error_body(body).get("error")
    return None if code is None else str(code)


def _parse_siblings(reply: _Reply) -> tuple[list[Sibling], str | None]:
    def bad(why: str) -> ServerError:
        # A malformed answer proves nothing (kvstore.contract: when in doubt, info).
        return ServerError(f"malformed 300 response: {why}", status=300, code="bad_response", node=reply.node,
                           attempts=reply.attempts, indeterminate=True)

    try:
        data = json.loads(reply.body)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("siblings"), list):
        raise bad("no siblings list")
    siblings: list[Sibling] = []
    for item in data["siblings"]:
        if not isinstance(item, dict) or not isinstance(item.get("value"), str):
            raise bad("a sibling without a base64 value")
        try:
            value = base64.b64decode(item["value"], validate=True)
        except (binascii.Error, ValueError):
            raise bad("a sibling value is not base64") from None
        siblings.append(Sibling(value, _int_or_none(item.get("timestamp_ns"))))
    context = data.get("context")
    return siblings, context if isinstance(context, str) else None

