"""The admin calls of one cluster, node by node (``AdminClient``): link faults, clock skew, disk faults, repair, membership.

Theory of operation
-------------------
The chaos harness, the membership commands and the explorer act on *one* node at a time (its link
rules, its clock, its disk), so an ``AdminClient`` sends each call to the node it names and never
fails over.  It speaks through the same ``ClientTransport`` as ``kvstore.client.Client`` (one
``Client`` per node URL, all sharing one transport), so it inherits the client contract unchanged:
each call is sent exactly once (an admin call has side effects; nothing re-sends it, neither this
code nor aiohttp), authenticated with ``X-Cluster-Secret``, and every failure is a typed
``KVError`` (``kvstore.contract``'s family) whose ``indeterminate`` says whether the call may still
have taken effect: ``NodeUnreachable`` (nothing was sent), ``RequestTimeout`` (it may have been),
or the node's own JSON error (``BadRequest`` ``invalid_body``, ``Unauthorized``, a 409
``change_in_progress`` of a membership change ...).

Results are typed where the harness reads them (``Membership``, the skew as a float); link rules and
disk faults come back as the JSON the node reports, which is what the caller installed.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvstore.client import AiohttpTransport, Client, ClientTransport, ServerError

__all__ = ["AdminClient", "LinkRules", "Membership", "read_cluster"]

LinkRules = dict[str, dict[str, Any]]  # peer id -> {drop_out, drop_in, delay_ms, jitter_ms, loss}


@dataclass(frozen=True)
class Membership:
    """``GET``/``POST /admin/membership``: the configuration in force and the change's progress."""

    config: dict[str, Any]
    progress: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.config["version"])

    @property
    def phase(self) -> str:
        return str(self.config["phase"])

    @property
    def done(self) -> bool:
        """A stable configuration whose change (if any) finished every step."""
        return self.phase == "stable" and self.progress.get("step") == "done"

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "progress": self.progress}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], node: str) -> Membership:
        config, progress = doc.get("config"), doc.get("progress")
        if not isinstance(config, dict) or not isinstance(progress, dict) or "version" not in config:
            raise ServerError("/admin/membership answered without config and progress", code="bad_response",
                              node=node, indeterminate=True)
        return cls(config, progress)


class AdminClient:
    """Admin routes of the nodes at ``urls`` (node id -> URL), with the cluster ``secret``.

    ``transport``: shared with the caller's ``Client``s (default: a pooled ``AiohttpTransport`` this
    object owns and closes).  ``timeout_s`` bounds each call, connect included.
    """

    def __init__(
        self,
        urls: Mapping[str, str],
        secret: str,
        *,
        transport: ClientTransport | None = None,
        timeout_s: float = 5.0,
        connect_timeout_s: float = 1.0,
        ca_file: str | None = None,
    ) -> None:
        if not secret:
            raise ValueError("the admin routes need the cluster secret")
        self.urls = dict(urls)
        self.secret = secret
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._owns_transport = transport is None
        if transport is None:
            context = ssl.create_default_context(cafile=ca_file) if ca_file is not None else None
            transport = AiohttpTransport(max_connections=16, ssl_context=context)
        elif ca_file is not None:
            raise ValueError("ca_file configures the default transport; give the injected one its own TLS")
        self.transport: ClientTransport = transport
        self._clients: dict[str, Client] = {}

    def client(self, node: str) -> Client:
        """The ``Client`` bound to ``node`` alone (no failover: an admin call is about that node)."""
        client = self._clients.get(node)
        if client is None:
            if node not in self.urls:
                raise KeyError(f"no node {node!r} (nodes: {', '.join(sorted(self.urls))})")
            client = Client(self.urls[node], secret=self.secret, transport=self.transport,
                            timeout_s=self.timeout_s, connect_timeout_s=self.connect_timeout_s)
            self._clients[node] = client
        return client

    async def call(self, node: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One authenticated admin call to ``node``, sent once; its JSON answer, else a ``KVError``."""
        return await self.client(node)._json(method, path, timeout_s=None, admin=True, body=body)

    # -- link faults (kvstore.transport.links)

    async def link_rules(self, node: str) -> LinkRules:
        return _rules(await self.call(node, "GET", "/admin/faults"))

    async def set_link_rules(self, node: str, rules: Mapping[str, Mapping[str, Any]]) -> LinkRules:
        """Replace ``node``'s link rules (peer id -> rule); the rules now in force."""
        return _rules(await self.call(node, "PUT", "/admin/faults", {"rules": {p: dict(r) for p, r in rules.items()}}))

    async def clear_link_rules(self, node: str) -> None:
        await self.call(node, "DELETE", "/admin/faults")

    # -- clock and disk

    async def set_clock_skew(self, node: str, skew_ms: float) -> float:
        """Move ``node``'s wall clock by ``skew_ms`` (0 heals); the skew now in force."""
        doc = await self.call(node, "POST", "/admin/clock", {"skew_ms": skew_ms})
        skew = doc.get("skew_ms")
        return float(skew) if isinstance(skew, int | float) else float(skew_ms)

    async def disk_faults(self, node: str) -> dict[str, Any]:
        return await self.call(node, "GET", "/admin/storage-faults")

    async def set_disk_faults(self, node: str, faults: Mapping[str, Any]) -> dict[str, Any]:
        """Set ``node``'s disk faults (kvstore/storage/faulty.py); what the node now reports."""
        return await self.call(node, "PUT", "/admin/storage-faults", dict(faults))

    async def clear_disk_faults(self, node: str) -> dict[str, Any]:
        return await self.call(node, "DELETE", "/admin/storage-faults")

    # -- anti-entropy, status, membership

    async def repair(self, node: str) -> dict[str, Any]:
        """Start an anti-entropy round on ``node``."""
        return await self.call(node, "POST", "/admin/repair")

    async def status(self, node: str) -> dict[str, Any]:
        """``GET /cluster`` as ``node`` sees it (membership, ownership, who is up)."""
        return await self.client(node).cluster()

    async def membership(self, node: str) -> Membership:
        return Membership.from_json(await self.call(node, "GET", "/admin/membership"), self.urls[node])

    async def change_membership(self, node: str, change: Mapping[str, Any]) -> Membership:
        """``POST /admin/membership`` (join/leave/replace/resume/abort, docs/membership.md); ``node``
        drives the change.  Answers once the change began (202)."""
        return Membership.from_json(await self.call(node, "POST", "/admin/membership", dict(change)),
                                    self.urls[node])

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        if self._owns_transport:
            await self.transport.close()

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def read_cluster(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """``GET /cluster`` of the node at ``url`` (how a tool attaches to a running cluster: its members'
    URLs, vnodes, N, conflict mode); a failure is the client's ``KVError``."""
    async with Client(url, timeout_s=timeout_s) as client:
        return await client.cluster()


def _rules(doc: Mapping[str, Any]) -> LinkRules:
    rules = doc.get("rules")
    return dict(rules) if isinstance(rules, dict) else {}

