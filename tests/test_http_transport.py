"""The HTTP baseline transport turns every answer from a peer into a reply or a typed RemoteError."""

from __future__ import annotations

import json

import msgpack
import pytest
from aiohttp import web

from kvstore.transport.base import Message, RemoteError
from kvstore.transport.http import HttpTransport, decode_reply

JSON = "application/json"
MSGPACK = "application/msgpack"


@pytest.mark.parametrize(
    ("status", "content_type", "body", "code"),
    [
        (401, JSON, json.dumps({"error": "unauthorized", "message": "bad secret"}).encode(), "unauthorized"),
        (413, JSON, json.dumps({"error": "too_large", "message": "body"}).encode(), "too_large"),
        (500, JSON, b"{not json", "bad_reply"),
        (400, JSON, b"[1, 2]", "bad_reply"),
        (200, MSGPACK, msgpack.packb({"error": "recovering", "remote_error": True}), "recovering"),
        (503, MSGPACK, msgpack.packb({"error": "overloaded", "message": "busy"}), "overloaded"),
        (200, MSGPACK, b"\xc1", "bad_reply"),
        (200, MSGPACK, msgpack.packb([1, 2]), "bad_reply"),
        (502, "text/plain", b"", "bad_reply"),
    ],
)
def test_errors_become_remote_errors_with_the_peers_code(status: int, content_type: str, body: bytes, code: str) -> None:
    with pytest.raises(RemoteError) as caught:
        decode_reply("n2", status, content_type, body)
    assert caught.value.code == code
    assert caught.value.peer == "n2"


def test_a_reply_map_is_returned() -> None:
    assert decode_reply("n2", 200, MSGPACK, msgpack.packb({"ok": True, "v": b"x"})) == {"ok": True, "v": b"x"}


async def echo(sender: str, message: Message) -> Message:
    return message


async def test_a_json_refusal_from_the_peers_http_layer_is_a_remote_error() -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "unauthorized", "message": "wrong cluster secret"}, status=401)

    app = web.Application()
    app.router.add_post("/internal/msg", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        transport = HttpTransport("n1", "wrong", {"n2": f"http://127.0.0.1:{port}"})
        await transport.start(echo)
        try:
            with pytest.raises(RemoteError) as caught:
                await transport.call("n2", {"op": "ping"}, timeout_s=30.0)
            assert caught.value.code == "unauthorized"
        finally:
            await transport.close()
    finally:
        await runner.cleanup()
