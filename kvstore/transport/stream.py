"""The real inter-node transport: persistent, multiplexed, framed msgpack over TCP.

Theory of operation
-------------------
Each node keeps at most one outgoing TCP connection per peer and sends every
call on it, tagged with a request id; the peer answers out of order as its
handlers finish, and a reader task resolves each call's future with its reply
(a call is that one future and a ``loop.call_at`` deadline timer: no task or
``wait_for`` per call; ``start_call`` hands the future itself to a caller that
waits for many calls at once, such as the coordinator).  This
is the shape of Cassandra's and Riak's internode messaging: no connection set-up
or HTTP parsing per message, and many replica writes in flight on one socket.

Frames are ``4-byte big-endian length + msgpack``.  A connection starts with a
hello frame carrying the sender's member id, the cluster secret and the peer
protocol version; a peer with another version, the wrong secret, or one that is
not a member of this cluster, gets a refusal frame (``{"ok": false, "error":
code, "message": why}``) and is disconnected before any message is read (the
internal protocol is as protected as the admin HTTP routes).  The caller sees
the refusal's reason in its ``PeerUnavailable``.  Both sides record the refusal
in ``links`` (kvstore.transport.links), which ``/cluster`` and ``kvstore status`` show per
member, so a refused link is never mistaken for a healthy or merely silent peer.

Until it has authenticated, a connection can cost the node very little: its
hello may be at most ``MAX_HELLO_BYTES`` (a larger length is refused before a
byte of the frame is buffered), it must arrive within the hello timeout, and at
most ``max_unauthenticated`` connections may be waiting for theirs; a new one
beyond that closes the oldest waiting one (a real peer's hello takes one round
trip, so it is never the oldest for long).  Refusals anyone can provoke are
logged rate-limited.

Failure semantics: a call that cannot connect fails with
``PeerUnavailable(maybe_delivered=False)``; once the frame was written, a
timeout or a dropped connection gives ``maybe_delivered=True``.  Fault rules
(partitions, delay, loss) are applied on send and on receipt, so a symmetric
partition holds even if only one side has installed it yet.

Bounds: frame size (after authentication), in-flight calls per peer, and
concurrent handlers per incoming connection are all capped; over the cap a
call fails fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import itertools
import logging
import ssl
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from kvstore.clock import Clock, SystemClock
from kvstore.ratelog import RateLimitedLog
from kvstore.transport.base import FaultRules, Handler, Message, PeerUnavailable, RemoteError
from kvstore.transport.links import LinkTable

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 16 * 1024 * 1024
# A hello is {"node": id, "secret": s} and the config caps both (128 and 1024 bytes), so this is
# ample for a real peer while an unauthenticated stranger cannot make the node buffer more.
MAX_HELLO_BYTES = 4096
MAX_REFUSAL_MESSAGE_CHARS = 1024  # a refusal frame must fit in the caller's MAX_HELLO_BYTES
MAX_CLAIMED_ID_CHARS = 128  # a longer "node" in a hello is no member id (config caps ids at 128 bytes)
DEFAULT_HELLO_TIMEOUT_S = 2.0
DEFAULT_MAX_UNAUTHENTICATED = 64
MAX_INFLIGHT_PER_PEER = 8192
MAX_HANDLERS_PER_CONNECTION = 4096
CONNECT_TIMEOUT_S = 1.0
# The peer protocol's version, sent in the hello: nodes that frame or spell messages differently
# refuse each other's links with ``version_mismatch`` (shown in /cluster) instead of failing at the
# first message.  A hello without it is from a node that predates the field: version 1.
PROTOCOL_VERSION = 1
_HEADER = struct.Struct(">I")


def _pack(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


class FrameTooLarge(ConnectionError):
    def __init__(self, length: int, max_bytes: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds {max_bytes}")
        self.length = length


class HelloRefused(Exception):
    """Why an incoming connection is not authenticated; sent back to the peer before closing.

    ``claimed`` is the member id the hello named, if it named one (not proven: it was refused)."""

    def __init__(self, code: str, message: str, claimed: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.claimed = claimed


class HandshakeRefused(ConnectionError):
    """The peer refused our hello (its refusal frame's code and message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"handshake refused: {code}: {message}")
        self.code = code
        self.message = message


async def _read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> Any:
    header = await reader.readexactly(_HEADER.size)
    (length,) = _HEADER.unpack(header)
    if length > max_bytes:
        raise FrameTooLarge(length, max_bytes)
    return msgpack.unpackb(await reader.readexactly(length), raw=False)


class _FrameWriter:
    """Coalesces the frames produced during one event-loop iteration into one socket write.

    A quorum write sends a request and receives a reply on each peer link; under load many are
    produced in the same iteration, and one ``write`` each was a syscall each (the profile in
    docs/benchmarks.md).  Frames are appended to a buffer and flushed by a callback scheduled
    for the end of the iteration, so ordering per connection is kept and latency is unchanged.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._frames: list[bytes] = []
        self._scheduled = False

    def send(self, frame: bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("connection closing")
        self._frames.append(frame)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        frames, self._frames = self._frames, []
        if not frames or self.writer.is_closing():
            return
        # On a dead connection the reader side notices and fails the pending calls.
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.writer.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def buffered_bytes(self) -> int:
        return self.writer.transport.get_write_buffer_size()


class _PeerConnection:
    """One outgoing connection and its table of pending calls.

    A call is one future, resolved (or failed) directly by the connection's reader, by its
    deadline timer (``loop.call_at``) or by the connection's loss: no task, no ``wait_for``.
    Whoever finishes it first wins; a cancelled call (its caller gave up) is forgotten at
    once, so the table holds exactly the calls someone still waits for.
    """

    def __init__(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.reader = reader
        self.writer = writer
        self.out = _FrameWriter(writer)
        self.pending: dict[int, tuple[asyncio.Future[Any], asyncio.TimerHandle]] = {}
        self.ids = itertools.count(1)
        self.reader_task: asyncio.Task[None] | None = None
        self.closed = False

    def start(self, message: Message, timeout_s: float) -> asyncio.Future[Any]:
        """Send one call and return its future (a reply, ``RemoteError`` or ``PeerUnavailable``)."""
        loop = self.loop
        fut: asyncio.Future[Any] = loop.create_future()
        if len(self.pending) >= MAX_INFLIGHT_PER_PEER:
            fut.set_exception(PeerUnavailable(self.peer, "too many calls in flight", maybe_delivered=False))
            return fut
        request_id = next(self.ids)
        try:
            self.out.send(_pack([request_id, message]))
        except (ConnectionError, RuntimeError) as exc:
            fut.set_exception(PeerUnavailable(self.peer, f"send failed: {exc!r}", maybe_delivered=False))
            return fut
        timer = loop.call_at(loop.time() + max(0.001, timeout_s), self._expire, request_id)
        self.pending[request_id] = (fut, timer)
        fut.add_done_callback(functools.partial(self._forget, request_id))
        return fut

    def _expire(self, request_id: int) -> None:
        entry = self.pending.pop(request_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(PeerUnavailable(self.peer, "timeout", maybe_delivered=True))

    def _forget(self, request_id: int, fut: asyncio.Future[Any]) -> None:
        # Only a cancelled call is still in the table here (every other way out pops it first).
        if fut.cancelled():
            entry = self.pending.pop(request_id, None)
            if entry is not None:
                entry[1].cancel()

    def resolve(self, request_id: int, reply: Any) -> None:
        """The reply to a call: its future's result (or ``RemoteError``); a late one is ignored."""
        entry = self.pending.pop(request_id, None)
        if entry is None:
            return  # timed out, cancelled or never ours
        fut, timer = entry
        timer.cancel()
        if fut.done():
            return
        if isinstance(reply, dict) and reply.get("remote_error"):
            fut.set_exception(RemoteError(self.peer, str(reply.get("error")), str(reply.get("message", ""))))
        else:
            fut.set_result(reply)

    def fail_all(self, exc_factory: Callable[[], Exception]) -> None:
        self.closed = True
        pending, self.pending = self.pending, {}
        for fut, timer in pending.values():
            timer.cancel()
            if not fut.done():
                fut.set_exception(exc_factory())


class StreamTransport:
    def __init__(
        self,
        node_id: str,
        secret: str,
        peers: dict[str, tuple[str, int]],
        listen: tuple[str, int],
        faults: FaultRules | None = None,
        *,
        hello_timeout_s: float = DEFAULT_HELLO_TIMEOUT_S,
        max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
        clock: Clock | None = None,
        protocol_version: int = PROTOCOL_VERSION,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        assert hello_timeout_s > 0 and max_unauthenticated >= 1
        self.node_id = node_id
        self._secret = secret
        self._peers = peers
        self._listen = listen
        self.faults = faults or FaultRules()
        self._hello_timeout_s = hello_timeout_s
        self._max_unauthenticated = max_unauthenticated
        # Insertion order is arrival order: the first entry is the oldest connection still waiting.
        self._unauthenticated: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()
        self._refusals = RateLimitedLog(log)
        self._clock = clock or SystemClock()
        self._protocol_version = protocol_version
        # Mutual TLS (kvstore.tls): the listener requires a certificate from the cluster's CA, the
        # dialler checks the listener's against the CA and the member's host.  Both or neither.
        assert (server_ssl is None) == (client_ssl is None)
        self._server_ssl = server_ssl
        self._client_ssl = client_ssl
        # What the handshakes said, both ways (kvstore.transport.links): /cluster shows it per member.
        self.links = LinkTable(peers, self._clock)
        self._handler: Handler | None = None
        self._server: asyncio.Server | None = None
        self._conns: dict[str, _PeerConnection] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._incoming: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def add_peers(self, peers: Mapping[str, tuple[str, int, int]]) -> None:
        for member, (host, peer_port, _http_port) in sorted(peers.items()):
            if member != self.node_id:
                self._peers[member] = (host, peer_port)

    # --- server side ------------------------------------------------------------------

    async def start(self, handler: Handler) -> None:
        self._handler = handler
        # With TLS, the handshake happens before _serve and has the hello's time budget.  (Done by the
        # loop: uvloop's start_tls on an accepted stream loses a ClientHello that arrived with it.)
        handshake_timeout = self._hello_timeout_s if self._server_ssl is not None else None
        self._server = await asyncio.start_server(
            self._serve, self._listen[0], self._listen[1], ssl=self._server_ssl, ssl_handshake_timeout=handshake_timeout
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._incoming.add(writer)
        self._admit_unauthenticated(writer)
        sender = "?"
        try:
            try:
                sender = await asyncio.wait_for(self._authenticate(reader), self._hello_timeout_s)
            except TimeoutError:
                self._refuse(writer, HelloRefused("hello_timeout", f"no hello within {self._hello_timeout_s:g} s"))
                return
            except HelloRefused as refusal:
                self._refuse(writer, refusal)
                return
            finally:
                self._unauthenticated.pop(writer, None)
            self.links.authenticated(sender)
            writer.write(_pack({"ok": True}))
            out = _FrameWriter(writer)
            slots = asyncio.Semaphore(MAX_HANDLERS_PER_CONNECTION)
            while True:
                frame = await _read_frame(reader)
                request_id, message = frame
                if self.faults.incoming_dropped(sender):
                    continue  # a partitioned peer's message vanishes: the caller times out
                await slots.acquire()
                task = asyncio.create_task(self._answer(sender, request_id, message, out, slots))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError, TypeError):
            pass
        except Exception:  # a bug in framing must not kill the server loop
            log.exception("internal connection from %s failed", sender)
        finally:
            self._incoming.discard(writer)
            writer.close()

    async def _authenticate(self, reader: asyncio.StreamReader) -> str:
        """Read the hello and return the sender's member id, or raise ``HelloRefused``."""
        try:
            hello = await _read_frame(reader, MAX_HELLO_BYTES)
        except FrameTooLarge as exc:
            raise HelloRefused(
                "hello_too_large", f"a hello is at most {MAX_HELLO_BYTES} bytes, this one announced {exc.length}"
            ) from None
        except (ValueError, TypeError, msgpack.UnpackException):
            raise HelloRefused("bad_hello", "the hello is not a msgpack map") from None
        if not isinstance(hello, dict) or not isinstance(hello.get("secret"), str):
            raise HelloRefused("bad_hello", "the hello must be a map with the member id and the cluster secret")
        node = hello.get("node")
        claimed = node if isinstance(node, str) and len(node) <= MAX_CLAIMED_ID_CHARS else None
        protocol = hello.get("protocol", 1)
        if protocol != self._protocol_version:
            raise HelloRefused(
                "version_mismatch",
                f"this node speaks peer protocol {self._protocol_version}, the hello says {protocol!r}",
                claimed,
            )
        given = hello["secret"].encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(given, self._secret.encode("utf-8")):
            raise HelloRefused("unauthorized", "wrong cluster secret", claimed)
        if not isinstance(node, str) or node not in self._peers:
            members = ", ".join(sorted([*self._peers, self.node_id]))
            what = "this node's own id" if node == self.node_id else "not a member of this cluster"
            raise HelloRefused("unknown_member", f"node id {node!r} is {what} (members: {members})", claimed)
        return node

    def _admit_unauthenticated(self, writer: asyncio.StreamWriter) -> None:
        while len(self._unauthenticated) >= self._max_unauthenticated:
            oldest, _ = self._unauthenticated.popitem(last=False)
            self._refuse(
                oldest,
                HelloRefused(
                    "too_many_unauthenticated",
                    f"more than {self._max_unauthenticated} connections are waiting to authenticate",
                ),
            )
            oldest.close()  # its _serve sees the end of the stream and cleans up
        self._unauthenticated[writer] = None

    def _refuse(self, writer: asyncio.StreamWriter, refusal: HelloRefused) -> None:
        """Tell the peer why (best effort: it may have gone), log it rate-limited; the caller closes."""
        peer = writer.get_extra_info("peername")
        self._refusals.warning(refusal.code, "refused a peer connection from %s: %s", peer, refusal)
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None
        self.links.refused_incoming(refusal.claimed, refusal.code, refusal.message, address)
        if not writer.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                reply = {"ok": False, "error": refusal.code, "message": refusal.message[:MAX_REFUSAL_MESSAGE_CHARS]}
                writer.write(_pack(reply))

    async def _answer(
        self,
        sender: str,
        request_id: int,
        message: Message,
        out: _FrameWriter,
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            assert self._handler is not None
            try:
                reply = await self._handler(sender, message)
            except Exception as exc:  # report, don't hang the caller until its timeout
                log.exception("handler failed for %s from %s", message.get("op"), sender)
                reply = {"error": "internal", "message": str(exc), "remote_error": True}
            # A reply is subject to the partition too: the way back is an outgoing message.
            delay_s = self.faults.outgoing_delay_s(sender)
            if delay_s is None:
                return
            if delay_s:
                await asyncio.sleep(delay_s)
            if not out.writer.is_closing():
                out.send(_pack([request_id, reply]))
                if out.buffered_bytes() > 1 << 20:
                    await out.writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            slots.release()

    # --- client side ------------------------------------------------------------------

    async def _connection(self, peer: str) -> _PeerConnection:
        conn = self._conns.get(peer)
        if conn is not None and not conn.closed:
            return conn
        lock = self._connecting.setdefault(peer, asyncio.Lock())
        async with lock:
            conn = self._conns.get(peer)
            if conn is not None and not conn.closed:
                return conn
            if peer not in self._peers:
                raise PeerUnavailable(peer, "unknown peer", maybe_delivered=False)
            host, port = self._peers[peer]
            writer = None
            try:
                if self._client_ssl is not None:
                    connect = asyncio.open_connection(host, port, ssl=self._client_ssl, server_hostname=host)
                else:
                    connect = asyncio.open_connection(host, port)
                reader, writer = await asyncio.wait_for(connect, CONNECT_TIMEOUT_S)
                hello = {"node": self.node_id, "secret": self._secret, "protocol": self._protocol_version}
                writer.write(_pack(hello))
                try:
                    ack = await asyncio.wait_for(_read_frame(reader, MAX_HELLO_BYTES), CONNECT_TIMEOUT_S)
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
                    if self._client_ssl is None:
                        raise
                    # TLS 1.3: the listener checks our certificate after our handshake has completed.
                    raise HandshakeRefused(
                        "tls_rejected",
                        "the peer closed the TLS connection before answering the hello: most likely it does not "
                        f"trust this node's certificate (signed by another CA?) ({exc!r})",
                    ) from None
                if not isinstance(ack, dict) or not ack.get("ok"):
                    code, why = (ack.get("error"), ack.get("message")) if isinstance(ack, dict) else (None, None)
                    raise HandshakeRefused(str(code or "refused"), str(why or "no reason given"))
            except ssl.SSLCertVerificationError as exc:
                if writer is not None:
                    writer.close()
                why = f"this node does not trust the certificate of {host}:{port}: {exc.verify_message or exc}"
                self._refusals.warning(f"refused_by:{peer}", "peer %s: %s", peer, why)
                self.links.refused_on_our_attempt(peer, "tls_rejected", why)
                raise PeerUnavailable(peer, f"connect failed: tls_rejected: {why}", maybe_delivered=False) from None
            except ssl.SSLError as exc:  # an alert from the listener during the handshake (TLS 1.2)
                if writer is not None:
                    writer.close()
                why = f"the TLS handshake failed: {exc.reason or exc}"
                self._refusals.warning(f"refused_by:{peer}", "peer %s: %s", peer, why)
                self.links.refused_by_peer(peer, "tls_rejected", why)
                raise PeerUnavailable(peer, f"connect failed: tls_rejected: {why}", maybe_delivered=False) from None
            except HandshakeRefused as refusal:
                if writer is not None:
                    writer.close()
                # One line per peer at once, then rate-limited: the pinger retries every interval.
                self._refusals.warning(f"refused_by:{peer}", "peer %s %s", peer, refusal)
                self.links.refused_by_peer(peer, refusal.code, refusal.message)
                raise PeerUnavailable(peer, f"connect failed: {refusal}", maybe_delivered=False) from None
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
                if writer is not None:
                    writer.close()
                self.links.handshake_failed(peer)
                raise PeerUnavailable(peer, f"connect failed: {exc!r}", maybe_delivered=False) from None
            self.links.handshake_succeeded(peer)
            conn = _PeerConnection(peer, reader, writer)
            conn.reader_task = asyncio.create_task(self._read_replies(peer, conn))
            self._conns[peer] = conn
            return conn

    async def _read_replies(self, peer: str, conn: _PeerConnection) -> None:
        try:
            while True:
                request_id, reply = await _read_frame(conn.reader)
                conn.resolve(request_id, reply)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, TypeError):
            pass
        finally:
            conn.fail_all(lambda: PeerUnavailable(peer, "connection lost", maybe_delivered=True))
            conn.writer.close()
            if self._conns.get(peer) is conn:
                del self._conns[peer]

    def start_call(self, peer: str, message: Message, timeout_s: float) -> asyncio.Future[Message] | None:
        """``call`` as a future the connection's reader resolves, without a task per call.

        Only on the fast path: an open connection and no fault rule for the peer (a rule's delay,
        loss or cut, and connecting, need the waiting ``call`` does).  None means: use ``call``.
        The future fails as ``call`` raises; cancelling it forgets the call.
        """
        if peer in self.faults.links:
            return None
        conn = self._conns.get(peer)
        if conn is None or conn.closed:
            return None
        return conn.start(message, timeout_s)

    async def call(self, peer: str, message: Message, timeout_s: float) -> Message:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if peer in self.faults.links:
            delay_s = self.faults.outgoing_delay_s(peer)
            if delay_s is None:
                # Cut: the message is never sent.  Waiting out the timeout (rather than failing at
                # once) is what a real partition looks like to the caller.
                await asyncio.sleep(max(0.0, timeout_s))
                raise PeerUnavailable(peer, "timeout (link cut)", maybe_delivered=False)
            if delay_s:
                await asyncio.sleep(min(delay_s, max(0.0, timeout_s)))
        conn = self._conns.get(peer)
        if conn is None or conn.closed:
            try:
                conn = await asyncio.wait_for(self._connection(peer), max(0.001, deadline - loop.time()))
            except TimeoutError:
                raise PeerUnavailable(peer, "connect timeout", maybe_delivered=False) from None
        # Awaiting the future directly: a cancelled caller cancels it, which forgets the call.
        return await conn.start(message, deadline - loop.time())  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.fail_all(lambda: PeerUnavailable("?", "transport closed", maybe_delivered=True))
            conn.writer.close()
            if conn.reader_task is not None:
                conn.reader_task.cancel()
        self._conns.clear()
        for writer in list(self._incoming):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
