"""Admin routes for membership changes: ``GET/POST /admin/membership`` (secret required).

``POST`` bodies (JSON; an unknown field is 400 ``invalid_body``):

* ``{"action": "join", "id": ..., "host": ..., "http_port": ..., "peer_port": ..., "machine": ...}``
  (``machine`` optional: the machine it runs on, for placement; kvstore.protocol.ring)
* ``{"action": "leave", "id": ...}``
* ``{"action": "replace", "id": <leaving>, "by": <joining>, "host": ..., "http_port": ..., "peer_port": ...,
  "machine": ...}`` (``machine`` optional, as for join)
* ``{"action": "resume"}`` / ``{"action": "abort"}`` (the change in progress)

Answer 202 with the configuration the register now holds and the driver's progress; the range
move continues in the background on the node that was asked (``GET`` shows where it is).  A
refused change is 409 (``change_in_progress``, ``already_member``, ``unknown_member``,
``too_few_members``, ``address_in_use``, ``conflict``, ``no_change_in_progress``,
``change_running``) or 400 (``invalid_body``, ``invalid_action``); the register being
unreachable is the usual 503 ``quorum_unavailable``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from kvstore.errors import BadRequest, NodeError
from kvstore.protocol.membership import Address, MembershipError
from kvstore.server.api import NODE_KEY, admin_json, refuse_unknown_fields, require_secret

ACTIONS = ("join", "leave", "replace", "resume", "abort")
FIELDS = {
    "join": ("action", "id", "host", "http_port", "peer_port", "machine"),
    "leave": ("action", "id"),
    "replace": ("action", "id", "by", "host", "http_port", "peer_port", "machine"),
    "resume": ("action",),
    "abort": ("action",),
}
MAX_ID_BYTES = 128  # the peer hello carries the id (kvstore.config.MAX_MEMBER_ID_BYTES)


class MembershipRefused(NodeError):
    status = 409

    def __init__(self, exc: MembershipError) -> None:
        super().__init__(exc.message)
        self.code = exc.code
        if exc.code in ("invalid_action", "invalid_config"):
            self.status = 400


def _member_id(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value.encode()) > MAX_ID_BYTES or not value.isprintable():
        raise BadRequest("invalid_body", f"{name} must be a printable member id of 1..{MAX_ID_BYTES} bytes")
    return value


def _address(data: dict[str, Any]) -> Address:
    try:
        optional = {"machine": data["machine"]} if "machine" in data else {}
        return Address.from_wire({**{k: data.get(k) for k in ("host", "http_port", "peer_port")}, **optional})
    except MembershipError as exc:
        raise BadRequest("invalid_body", exc.message) from None


def _document(request: web.Request) -> dict[str, Any]:
    reconfig = request.app[NODE_KEY].parts.reconfig
    return {"config": request.app[NODE_KEY].config.to_wire(), "progress": dict(reconfig.progress)}


async def membership_get(request: web.Request) -> web.Response:
    require_secret(request)
    return web.json_response(_document(request))


async def membership_post(request: web.Request) -> web.Response:
    data = await admin_json(request)
    action = data.get("action")
    if action not in ACTIONS:
        raise BadRequest("invalid_action", f"action must be one of {', '.join(ACTIONS)}")
    refuse_unknown_fields(data, FIELDS[action], "the body")
    member = _member_id(data, "id") if action in ("join", "leave", "replace") else None
    by = _member_id(data, "by") if action == "replace" else None
    address = _address(data) if action in ("join", "replace") else None
    node = request.app[NODE_KEY]
    try:
        await node.parts.reconfig.begin(action, member, address, by)
    except MembershipError as exc:
        raise MembershipRefused(exc) from None
    return web.json_response(_document(request), status=202)


def membership_routes() -> list[web.RouteDef]:
    return [web.get("/admin/membership", membership_get), web.post("/admin/membership", membership_post)]
