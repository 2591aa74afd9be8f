"""TEMPORARY: how the simulator builds a node and reaches its kv API until issue 12's composition lands.

Theory of operation
-------------------
SIM_PLAN.md gives the agreed interfaces: ``kvstore.assembly.assemble_node(cfg, NodeSeams)`` builds
a Node with all its collaborators, and ``kvstore.api.KvApi.handle(ApiRequest) -> ApiResponse`` is
the kv request core without aiohttp.  Until they are merged into main, this module provides the
same shapes over today's code, each in one clearly marked place:

* ``assemble_node``: ``Node(...)`` + ``server.install_extensions`` (what ``server.build_node``
  does), and the data store's durability from the store (``durable``), not from ``cfg.storage``.
* ``KvApi.handle``: today's aiohttp route (``error_middleware`` + ``kv_handler``) called with a
  minimal stand-in for ``aiohttp.web.Request`` (no socket, no parser: only what the handler reads).

At the merge the simulator imports the real ones instead (``kvstore/sim/cluster.py`` and
``chaos/endpoint.py`` import from here) and this module is deleted.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict, MultiDict

from kvstore.clock import Clock
from kvstore.config import NodeConfig
from kvstore.metrics import Metrics
from kvstore.node import Node
from kvstore.storage.base import Storage
from kvstore.transport.base import Transport


@dataclass(frozen=True)
class ApiRequest:
    method: str  # "GET" | "PUT" | "DELETE"
    raw_path: str  # percent-encoded path as sent, e.g. "/kv/user%3A42"
    query: Mapping[str, str]
    headers: Mapping[str, str]  # looked up case-insensitively
    body: bytes | None  # already read and bounded by the adapter (None for GET/DELETE)


@dataclass(frozen=True)
class ApiResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class NodeSeams:
    transport: Transport
    data: Storage
    hints: Storage
    paxos: Storage
    clock: Clock
    rng: random.Random
    metrics: Metrics | None = None


# ---------------------------------------------------------------- SHIM 1 of 2: node assembly


def assemble_node(cfg: NodeConfig, seams: NodeSeams, *, durable_data: bool) -> Node:
    """SHIM for ``kvstore.assembly.assemble_node`` (A1): the same Node server.build_node makes."""
    from kvstore.server import install_extensions

    node = Node(cfg, transport=seams.transport, data=seams.data, hints=seams.hints, paxos=seams.paxos,
                clock=seams.clock, rng=seams.rng, metrics=seams.metrics)
    install_extensions(node)
    node.durable_data = durable_data  # A1: from the store's ``durable`` attribute
    return node


# ---------------------------------------------------------------- SHIM 2 of 2: the kv request core


class KvApi:
    """SHIM for ``kvstore.api.KvApi`` (A1): today's aiohttp kv route, called without aiohttp's server."""

    def __init__(self, node: Node) -> None:
        from kvstore.api import build_app

        self.app = build_app(node)
        for hook in getattr(node, "app_hooks", []):
            hook(self.app)

    async def handle(self, request: ApiRequest) -> ApiResponse:
        from kvstore.api import error_middleware, kv_handler

        stand_in = cast(web.Request, _RequestStandIn(self.app, request))
        response = await error_middleware(stand_in, kv_handler)
        assert isinstance(response, web.Response), response
        body = response.body
        assert body is None or isinstance(body, bytes), type(body)
        return ApiResponse(response.status, CIMultiDict(response.headers), body or b"")


class _Body:
    def __init__(self, body: bytes) -> None:
        self._body = body

    async def readany(self) -> bytes:
        await asyncio.sleep(0)
        body, self._body = self._body, b""
        return body


class _URL:
    def __init__(self, raw_path: str) -> None:
        self.raw_path = raw_path


class _RequestStandIn:
    """What kv_handler and error_middleware read of an ``aiohttp.web.Request``."""

    def __init__(self, app: web.Application, request: ApiRequest) -> None:
        self.app = app
        self.method = request.method
        self.rel_url = _URL(request.raw_path)
        self.path = unquote(request.raw_path)
        self.query: MultiDict[str] = MultiDict(request.query)
        self.headers: CIMultiDict[str] = CIMultiDict(request.headers)
        self.content_length = len(request.body) if request.body is not None else None
        self.content = _Body(request.body or b"")

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"the simulator's request stand-in has no {name!r} (the shim needs it)")
