"""HTTP-per-message transport: the naive baseline the stream transport is measured against.

Theory of operation
-------------------
Every internal message is one HTTP POST of a msgpack body to the peer's
``/internal/msg`` route (keep-alive connection pooling, as a typical aiohttp
client would do).  Same contract and fault rules as ``StreamTransport``; it
exists so ``benchmarks/bench_transport.py`` can compare the two in one run.
Nodes use it only when started with ``KVSTORE_TRANSPORT=http``.

As with the stream transport, ``call`` does not wait for ``start``: ``start`` only means
"incoming messages may arrive now", and a node's mechanisms call peers before it (the Paxos
acceptor registers its incarnation at every peer from its own ``start``, which runs before the
transport's).  So the client session is made by the first outgoing call.  After ``close`` a call
is refused with ``PeerUnavailable`` (nothing sent).  What the stream transport does and this one
does not: no link handshake (so no ``links`` table, no protocol-version check: ``/cluster``
shows no link state) and no TLS client (a node refuses to start with ``http`` and ``[tls]``);
the cluster secret and the sender's member id ride on every request's headers instead.
Fault rules: outgoing ones here, incoming ones at the receiving route (``/internal/msg`` holds a
dropped message unanswered for the caller's declared ``X-Call-Timeout-Ms``, so the caller times
out as in a partition).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp
import msgpack

from kvstore.client.http_session import client_session
from kvstore.transport.base import FaultRules, Handler, Message, PeerUnavailable, RemoteError


class HttpTransport:
    def __init__(self, node_id: str, secret: str, peer_urls: dict[str, str], faults: FaultRules | None = None) -> None:
        self.node_id = node_id
        self._secret = secret
        self._peer_urls = peer_urls
        self.faults = faults or FaultRules()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def add_peers(self, peers: Mapping[str, tuple[str, int, int]]) -> None:
        for member, (host, _peer_port, http_port) in sorted(peers.items()):
            if member != self.node_id:
                self._peer_urls[member] = f"http://{host}:{http_port}"

    async def start(self, handler: Handler) -> None:
        # Incoming messages arrive through the node's HTTP app (/internal/msg), not here.
        pass

    def _client(self) -> aiohttp.ClientSession:
        # Made by the first call, not by start(): see the module docstring.
        if self._session is None:
            self._session = client_session(connector=aiohttp.TCPConnector(limit=256))
        return self._session

    async def call(self, peer: str, message: Message, timeout_s: float) -> Message:
        if self._closed:
            raise PeerUnavailable(peer, "transport closed", maybe_delivered=False)
        base_url = self._peer_urls.get(peer)
        if base_url is None:
            raise PeerUnavailable(peer, "unknown peer", maybe_delivered=False)
        delay_s = self.faults.outgoing_delay_s(peer)
        if delay_s is None:
            await asyncio.sleep(timeout_s)
            raise PeerUnavailable(peer, "timeout (link cut)", maybe_delivered=False)
        if delay_s:
            await asyncio.sleep(delay_s)
        try:
            async with self._client().post(
                base_url + "/internal/msg",
                data=msgpack.packb(message, use_bin_type=True),
                headers={
                    "X-Cluster-Secret": self._secret, "X-Node": self.node_id,
                    # a receiver that drops this message (its incoming fault rule) holds it this long
                    "X-Call-Timeout-Ms": str(max(0, int(timeout_s * 1000))),
                },
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                body = await resp.read()
                content_type = resp.content_type
        except aiohttp.ClientConnectorError as exc:
            raise PeerUnavailable(peer, f"connect failed: {exc}", maybe_delivered=False) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PeerUnavailable(peer, f"{type(exc).__name__}", maybe_delivered=True) from None
        return decode_reply(peer, resp.status, content_type, body)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()


def decode_reply(peer: str, status: int, content_type: str, body: bytes) -> Message:
    """The peer's answer to one ``/internal/msg`` POST, or the typed error it stands for.

    The node answers a message with msgpack, but its HTTP layer refuses some requests before
    the message handler runs (a wrong secret, an oversize body) with the public API's JSON
    error body; both are errors *from the peer*, so both become ``RemoteError`` with the
    peer's stable code.  A body that is neither is still an answer from the peer (the request
    reached it), so it is a ``RemoteError`` too, never an untyped decoding exception.
    """
    if content_type == "application/json":
        try:
            data: Any = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and "error" in data:
            raise RemoteError(peer, str(data["error"]), str(data.get("message", "")))
        raise RemoteError(peer, "bad_reply", f"HTTP {status} with a JSON body that is not an error")
    try:
        reply: Any = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException):
        raise RemoteError(peer, "bad_reply", f"HTTP {status} with an undecodable body") from None
    if isinstance(reply, dict) and (reply.get("remote_error") or "error" in reply and status >= 400):
        raise RemoteError(peer, str(reply.get("error")), str(reply.get("message", "")))
    if status >= 400:
        raise RemoteError(peer, "bad_reply", f"HTTP {status} without an error body")
    if not isinstance(reply, dict):
        raise RemoteError(peer, "bad_reply", f"HTTP {status} with a reply that is not a map")
    return reply
