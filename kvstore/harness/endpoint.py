"""How the chaos workload reaches a node's kv API in a simulation: an ``Endpoint`` under the one client.

Theory of operation
-------------------
The workload (``kvstore.harness.workload``) sends every request through ``kvstore.client.Client``,
the one client contract: what to send, what an answer proves (``kvstore.contract``), no re-sends.
Over HTTP the client's own ``AiohttpTransport`` carries it.  A simulated cluster has no sockets;
its nodes are reached through an ``Endpoint`` (``kvstore.sim.cluster.SimEndpoint``: the node's kv
core, called in process after a simulated client-to-node delay), which carries one request to one
node and brings back either its answer (``ApiResponse``) or the proof that there was none
(``NoAnswerError`` with the contract's ``NoAnswer`` kind: ``unreachable`` -- never sent, so
certainly not applied --, ``timeout`` or ``disconnected`` -- it may have been applied).

``EndpointTransport`` is the ``ClientTransport`` over an ``Endpoint``: node URLs are
``http://<node id>`` (``endpoint_urls``), ``unreachable`` becomes the client's ``NotSent`` and the
other two its ``Lost``.  It sends exactly one request per call and never retries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol
from urllib.parse import parse_qsl

from kvstore.client import Lost, NotSent
from kvstore.contract import NoAnswer
from kvstore.server.kv_api import ApiRequest, ApiResponse

__all__ = ["ApiRequest", "ApiResponse", "Endpoint", "EndpointTransport", "NoAnswerError", "endpoint_urls"]

_SCHEME = "http://"


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


def endpoint_urls(node_ids: Iterable[str]) -> dict[str, str]:
    """The URL a ``Client`` over an ``EndpointTransport`` uses for each node id."""
    return {node: _SCHEME + node for node in node_ids}


class EndpointTransport:
    """A ``kvstore.client.ClientTransport`` whose requests an ``Endpoint`` carries (URLs from ``endpoint_urls``)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
        timeout_s: float, connect_timeout_s: float,
    ) -> tuple[int, Mapping[str, str], bytes]:
        assert url.startswith(_SCHEME), url
        node, _, rest = url[len(_SCHEME):].partition("/")
        raw_path, _, query = rest.partition("?")
        request = ApiRequest(method, "/" + raw_path, _query(query), headers, body)
        try:
            answer = await self.endpoint.request(node, request, timeout_s)
        except NoAnswerError as exc:
            if exc.kind == "unreachable":
                raise NotSent(exc.reason) from None
            raise Lost("timeout" if exc.kind == "timeout" else "disconnected", exc.reason) from None
        return answer.status, answer.headers, answer.body

    async def close(self) -> None:
        await self.endpoint.close()


def _query(text: str) -> dict[str, str]:
    """The query of a client URL; the simulator parses one per request, and the client's are plain
    ``name=value`` pairs (numbers, mode names) that need no unquoting."""
    if "%" in text or "+" in text:
        return dict(parse_qsl(text, keep_blank_values=True))
    return dict(pair.partition("=")[::2] for pair in text.split("&") if pair)
