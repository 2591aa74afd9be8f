"""The peer port's hello, in process on real sockets: a refusal carries its reason to the caller."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack
import pytest

from kvstore.harness.local_cluster import free_ports
from kvstore.transport.base import PeerUnavailable
from kvstore.transport.stream import StreamTransport

SECRET = "secret-123"


async def _answer(sender: str, message: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "sender": sender}


async def _hello_reply(port: int, hello: dict[str, Any]) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = msgpack.packb(hello, use_bin_type=True)
        writer.write(struct.pack(">I", len(body)) + body)
        (length,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 10))
        reply = msgpack.unpackb(await reader.readexactly(length), raw=False)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and then the node hangs up
        return reply
    finally:
        writer.close()


async def test_a_caller_the_node_does_not_know_learns_why_it_is_refused() -> None:
    port_a, port_b, port_c = free_ports(3)
    server = StreamTransport("b", SECRET, {"a": ("127.0.0.1", port_a)}, ("127.0.0.1", port_b))
    stranger = StreamTransport("c", SECRET, {"b": ("127.0.0.1", port_b)}, ("127.0.0.1", port_c))
    wrong_secret = StreamTransport("a", "other-secret", {"b": ("127.0.0.1", port_b)}, ("127.0.0.1", port_a))
    member = StreamTransport("a", SECRET, {"b": ("127.0.0.1", port_b)}, ("127.0.0.1", port_a))
    await server.start(_answer)
    try:
        with pytest.raises(PeerUnavailable) as refused:
            await stranger.call("b", {"op": "ping"}, 5.0)
        assert "unknown_member" in refused.value.reason and "'c'" in refused.value.reason
        assert refused.value.maybe_delivered is False
        with pytest.raises(PeerUnavailable) as refused:
            await wrong_secret.call("b", {"op": "ping"}, 5.0)
        assert "unauthorized" in refused.value.reason
        assert await member.call("b", {"op": "ping"}, 5.0) == {"ok": True, "sender": "a"}
    finally:
        for transport in (member, wrong_secret, stranger, server):
            await transport.close()


@pytest.mark.parametrize(
    "hello,code",
    [
        ({"node": "a", "secret": "s\u00e9cret-123"}, "unauthorized"),  # non-ASCII: hmac refused the str
        ({"node": "b", "secret": SECRET}, "unknown_member"),  # the node's own id
        ({"node": 7, "secret": SECRET}, "unknown_member"),
        ({"node": "a"}, "bad_hello"),
        ([1, 2], "bad_hello"),
    ],
)
async def test_bad_hellos_get_a_refusal_frame(hello: Any, code: str) -> None:
    port_a, port_b = free_ports(2)
    server = StreamTransport("b", SECRET, {"a": ("127.0.0.1", port_a)}, ("127.0.0.1", port_b))
    await server.start(_answer)
    try:
        reply = await _hello_reply(port_b, hello)
        assert reply["ok"] is False and reply["error"] == code, reply
    finally:
        await server.close()


async def test_both_ends_record_a_refused_link_and_a_good_handshake_clears_it() -> None:
    """kvstore.transport.links: the refused caller knows it is refused (and why), the refusing node knows whom
    it refused and from where; one good handshake later both are clear."""
    port_a, port_b = free_ports(2)
    server = StreamTransport("b", SECRET, {"a": ("127.0.0.1", port_a)}, ("127.0.0.1", port_b))
    wrong = StreamTransport("a", "other-secret", {"b": ("127.0.0.1", port_b)}, ("127.0.0.1", port_a))
    right = StreamTransport("a", SECRET, {"b": ("127.0.0.1", port_b)}, ("127.0.0.1", port_a))
    await server.start(_answer)
    try:
        for _ in range(3):
            with pytest.raises(PeerUnavailable):
                await wrong.call("b", {"op": "ping"}, 5.0)
        out = wrong.links.refuses_us("b")
        assert out is not None and out.code == "unauthorized" and out.count == 3
        incoming = server.links.we_refuse("a")
        assert incoming is not None and incoming.code == "unauthorized" and incoming.count == 3
        assert incoming.address is not None and incoming.address.startswith("127.0.0.1:")
        assert await right.call("b", {"op": "ping"}, 5.0) == {"ok": True, "sender": "a"}
        assert right.links.refuses_us("b") is None
        assert server.links.we_refuse("a") is None
    finally:
        for transport in (right, wrong, server):
            await transport.close()


async def test_another_protocol_version_is_refused_as_a_version_mismatch() -> None:
    port_a, port_b = free_ports(2)
    server = StreamTransport("b", SECRET, {"a": ("127.0.0.1", port_a)}, ("127.0.0.1", port_b))
    newer = StreamTransport("a", SECRET, {"b": ("127.0.0.1", port_b)}, ("127.0.0.1", port_a), protocol_version=2)
    await server.start(_answer)
    try:
        with pytest.raises(PeerUnavailable) as refused:
            await newer.call("b", {"op": "ping"}, 5.0)
        assert "version_mismatch" in refused.value.reason and "protocol 1" in refused.value.reason
        out = newer.links.refuses_us("b")
        assert out is not None and out.code == "version_mismatch"
        incoming = server.links.we_refuse("a")
        assert incoming is not None and incoming.code == "version_mismatch"
        # A hello without the field predates it: version 1, accepted.
        reply = await _hello_reply_open(port_b, {"node": "a", "secret": SECRET})
        assert reply == {"ok": True}
    finally:
        for transport in (newer, server):
            await transport.close()


async def test_a_stranger_with_the_secret_is_listed_by_the_id_it_claims() -> None:
    port_b, port_c = free_ports(2)
    server = StreamTransport("b", SECRET, {}, ("127.0.0.1", port_b))
    stranger = StreamTransport("c", SECRET, {"b": ("127.0.0.1", port_b)}, ("127.0.0.1", port_c))
    await server.start(_answer)
    try:
        with pytest.raises(PeerUnavailable):
            await stranger.call("b", {"op": "ping"}, 5.0)
        (entry,) = server.links.strangers_json()
        assert entry["id"] == "c" and entry["code"] == "unknown_member" and entry["count"] == 1
    finally:
        for transport in (stranger, server):
            await transport.close()


async def _hello_reply_open(port: int, hello: dict[str, Any]) -> Any:
    """The node's answer to a hello it accepts (the connection stays open; we close it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = msgpack.packb(hello, use_bin_type=True)
        writer.write(struct.pack(">I", len(body)) + body)
        (length,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 10))
        return msgpack.unpackb(await reader.readexactly(length), raw=False)
    finally:
        writer.close()
