"""How the chaos workload reaches a node's kv API: over HTTP, or in-process in a simulation.

Theory of operation
-------------------
The workload (``kvstore.harness.workload``) decides *what* to send and how to classify the answer
(``kvstore.contract``); an ``Endpoint`` only carries one request to one node and brings back
either its answer (``ApiResponse``) or the proof that there was none (``NoAnswerError`` with the
contract's ``NoAnswer`` kind: ``unreachable`` -- never sent, so certainly not applied --,
``timeout`` or ``disconnected`` -- it may have been applied).  Two implementations:

* ``HttpEndpoint``: the real cluster, through the project's one aiohttp session factory
  (``kvstore.client.http_session.client_session``: each request is sent exactly once).
* ``kvstore.sim.cluster.SimEndpoint``: a simulated cluster, calling the node's kv core in
  process after a simulated client-to-node delay.

Both send exactly one request per call; neither retries.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any, Protocol

import aiohttp
from multidict import CIMultiDict

from kvstore.client.http_session import client_session, no_answer_kind
from kvstore.contract import NoAnswer
from kvstore.server.kv_api import ApiRequest, ApiResponse

__all__ = ["ApiRequest", "ApiResponse", "Endpoint", "HttpEndpoint", "NoAnswerError", "content_type"]


class NoAnswerError(Exception):
    """A request got no answer; ``kind`` says what that proves (kvstore.contract.no_answer_outcome)."""

    def __init__(self, kind: NoAnswer, reason: str) -> None:
        super().__init__(f"no answer ({kind}): {reason}")
        self.kind: NoAnswer = kind
        self.reason = reason


class Endpoint(Protocol):
    async def request(self, node: str, request: ApiRequest, timeout_s: float) -> ApiResponse:
        """Send ``request`` to ``node`` once; its answer, or ``NoAnswerError`` within ``timeout_s``."""
        ...

    async def close(self) -> None: ...


def content_type(headers: Mapping[str, str]) -> str:
    """The media type of an answer, without parameters (``application/json``)."""
    return headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


class HttpEndpoint:
    """Nodes reached over HTTP at their URLs, one aiohttp session (no hidden re-sends)."""

    def __init__(self, urls: Mapping[str, str]) -> None:
        self.urls = dict(urls)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = client_session(connector=aiohttp.TCPConnector(limit=0, force_close=False))
        return self._session

    async def request(self, node: str, request: ApiRequest, timeout_s: float) -> ApiResponse:
        url = self.urls[node] + request.raw_path
        if request.query:
            url += "?" + urllib.parse.urlencode(dict(request.query))
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._client().request(
                request.method, url, data=request.body, headers=dict(request.headers), timeout=timeout
            ) as resp:
                raw = await resp.read()
                return ApiResponse(resp.status, CIMultiDict(resp.headers), raw)
        except (TimeoutError, aiohttp.ClientError) as exc:
            kind = no_answer_kind(exc)
            assert kind is not None, exc
            reason: Any = {"unreachable": "connection_refused", "timeout": "timeout"}.get(kind, type(exc).__name__)
            raise NoAnswerError(kind, str(reason)) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
