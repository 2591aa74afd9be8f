"""The live explorer's HTTP and WebSocket surface (aiohttp), on 127.0.0.1 only.

Theory of operation
-------------------
The page (``static/index.html`` with ``app.js`` and ``app.css``, shipped in the package:
nothing is fetched from elsewhere, it works offline) opens a WebSocket at ``/api/ws`` and
receives the session's ``snapshot`` every ``PUSH_INTERVAL_S`` (one JSON text frame, built once
per tick for every open socket; no snapshot is built while nobody watches).  Everything the
user does is a ``POST /api/action`` with a JSON body (``LiveSession.act``): the answer is 200
``{"ok": true, "message"}`` or 400/409 ``{"error", "message"}`` -- never a traceback.
Pictures that are costly or large come on demand: ``GET /api/placement?key=&node=`` (the
node's own placement route, the ring SVG and the replicas' copies) and
``GET /api/counterexample/{id}`` (the checker's timeline).

The actions kill processes, so the app refuses a request another web site could make from
the user's browser: a POST must carry ``X-Explorer: 1`` (a header a cross-origin page cannot
send without a CORS preflight this server never grants) and an ``Origin``, when present, must
be this server's own; WebSocket upgrades are held to the same origin rule.  Open sockets are
bounded (``MAX_SOCKETS``), as is an action's body (``MAX_BODY_BYTES``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import webbrowser
from importlib import resources
from typing import Any

from aiohttp import WSMsgType, web

from kvstore.ui.session import ActionError, LiveSession

log = logging.getLogger("kvstore.ui")

PUSH_INTERVAL_S = 0.5
MAX_SOCKETS = 16
MAX_BODY_BYTES = 16 * 1024
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
SESSION_KEY: web.AppKey[LiveSession] = web.AppKey("session", LiveSession)
SOCKETS_KEY: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def _static(name: str) -> bytes | None:
    node = resources.files("kvstore.ui").joinpath("static").joinpath(name)
    return node.read_bytes() if node.is_file() else None


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or origin == f"http://{request.host}"


async def index(request: web.Request) -> web.Response:
    body = _static("index.html")
    assert body is not None, "index.html ships with the package"
    return web.Response(body=body, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    suffix = name[name.rfind("."):] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
        return _error(404, "no_route", f"no file {name!r}")
    body = _static(name)
    if body is None:
        return _error(404, "no_route", f"no file {name!r}")
    return web.Response(body=body, content_type=STATIC_TYPES[suffix], headers={"Cache-Control": "no-store"})


async def state(request: web.Request) -> web.Response:
    return web.json_response(request.app[SESSION_KEY].snapshot())


async def action(request: web.Request) -> web.Response:
    if request.headers.get("X-Explorer") != "1" or not _same_origin(request):
        return _error(403, "forbidden", "actions come from the explorer's own page (X-Explorer: 1, same origin)")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return _error(413, "body_too_large", f"an action is at most {MAX_BODY_BYTES} bytes")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        return _error(413, "body_too_large", f"an action is at most {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "invalid_body", "expected a JSON object")
    if not isinstance(body, dict):
        return _error(400, "invalid_body", "expected a JSON object")
    session = request.app[SESSION_KEY]
    try:
        message = await session.act(body)
    except ActionError as exc:
        busy = str(exc).startswith("busy") or str(exc).startswith("not running")
        return _error(409 if busy else 400, "busy" if busy else "refused", str(exc))
    return web.json_response({"ok": True, "message": message})


async def placement(request: web.Request) -> web.Response:
    key = request.query.get("key", "")
    node = request.query.get("node") or None
    try:
        return web.json_response(await request.app[SESSION_KEY].placement_of(key, node))
    except ActionError as exc:
        return _error(400, "refused", str(exc))
    except AssertionError:
        return _error(409, "busy", "the cluster is not up yet")


async def counterexample(request: web.Request) -> web.Response:
    try:
        ident = int(request.match_info["ident"])
    except ValueError:
        return _error(400, "invalid_parameter", "a counterexample id is a number")
    found = request.app[SESSION_KEY].counterexamples.get(ident)
    if found is None:
        return _error(404, "not_found", f"no counterexample {ident} (only the latest are kept)")
    return web.json_response(found)


async def websocket(request: web.Request) -> web.StreamResponse:
    sockets = request.app[SOCKETS_KEY]
    if not _same_origin(request):
        return _error(403, "forbidden", "the live feed is for the explorer's own page")
    if len(sockets) >= MAX_SOCKETS:
        return _error(503, "overloaded", f"at most {MAX_SOCKETS} pages may watch at once")
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4096)
    await ws.prepare(request)
    sockets.add(ws)
    try:
        await ws.send_str(json.dumps(request.app[SESSION_KEY].snapshot()))
        async for msg in ws:  # the page only listens; anything it sends is ignored
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        sockets.discard(ws)
    return ws


async def _publish(app: web.Application) -> None:
    session, sockets = app[SESSION_KEY], app[SOCKETS_KEY]
    while True:
        await asyncio.sleep(PUSH_INTERVAL_S)
        if not sockets:
            continue
        try:
            text = json.dumps(session.snapshot())
        except Exception:  # a bug in a figure must not stop the feed: log it, keep going
            log.exception("building the page's snapshot failed")
            continue
        for ws in list(sockets):
            if ws.closed:
                sockets.discard(ws)
                continue
            try:
                await asyncio.wait_for(ws.send_str(text), 2.0)
            except (ConnectionError, TimeoutError, RuntimeError):
                sockets.discard(ws)
                await ws.close()


async def _start_publisher(app: web.Application) -> Any:
    task = asyncio.create_task(_publish(app), name="ui-publish")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    sockets: set[web.WebSocketResponse] = app[SOCKETS_KEY]
    for ws in list(sockets):
        await ws.close()


def build_app(session: LiveSession) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SESSION_KEY] = session
    app[SOCKETS_KEY] = set()
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/state", state)
    app.router.add_get("/api/ws", websocket)
    app.router.add_post("/api/action", action)
    app.router.add_get("/api/placement", placement)
    app.router.add_get("/api/counterexample/{ident}", counterexample)
    app.cleanup_ctx.append(_start_publisher)
    return app


async def serve(session: LiveSession, host: str, port: int, open_browser: bool) -> int:
    """Serve the page, start the session's clusters, run until cancelled; clean up either way."""
    runner = web.AppRunner(build_app(session), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        url = f"http://{host}:{bound}/"
        print(f"kvstore live explorer: {url}", flush=True)
        if open_browser:
            await asyncio.to_thread(webbrowser.open, url)
        try:
            await session.start()
        except Exception as exc:
            print(f"kvstore live explorer: could not start: {exc}", flush=True)
            return 1
        print(f"kvstore live explorer: running ({', '.join(session.cfg.modes)}); histories in {session.out_dir}; "
              "Ctrl-C stops every node", flush=True)
        await asyncio.Event().wait()
        return 0
    finally:
        await session.close()
        await runner.cleanup()
