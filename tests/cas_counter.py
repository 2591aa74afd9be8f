"""A linearizable read + compare-and-set counter that records a checker history through ``kvstore.Client``."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from kvstore.client import AiohttpTransport, Client, KVError
from kvstore.harness.history import HistoryWriter
from kvstore.harness.local_cluster import LocalCluster
from kvstore.harness.workload import error_outcome, read_outcome

LIN = "linearizable"
CLIENT_TIMEOUT_S = 5.0


class CasCounter:
    """Clients add 1 to one key by linearizable read + compare-and-set, recording every op in a history.

    Each op is one request through ``kvstore.Client`` (one per node, never re-sent), recorded with the
    outcome it proves, by the chaos workload's own rules (``kvstore.harness.workload``, kvstore.contract):
    ``ok`` / ``fail`` / ``info``; after an ``info`` the client takes a new process id, as the harness
    does.  ``acked`` counts CAS that returned ok, ``unknown`` CAS whose outcome is info: the final value
    must lie in [acked, acked + unknown].
    """

    def __init__(self, cluster: LocalCluster, key: str, history: HistoryWriter, first_process: int,
                 timeout_ms: int = 3000) -> None:
        self.cluster = cluster
        self.key = key
        self.history = history
        self.transport = AiohttpTransport()
        # timeout_ms of 5 s: the node answers a typed 503 before the client gives up.
        share = timeout_ms / (CLIENT_TIMEOUT_S * 1000)
        self.clients = {n: Client(cluster.url(n), transport=self.transport, timeout_s=CLIENT_TIMEOUT_S,
                                  server_timeout_share=share) for n in cluster.node_ids}
        self._next_process = itertools.count(first_process)
        self.acked = 0
        self.unknown = 0

    async def __aenter__(self) -> CasCounter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()

    async def _op(self, process: int, node: str, f: str, value: Any) -> tuple[str, int | None]:
        """One op; (its outcome, the value a successful read saw)."""
        event = {"process": process, "f": f, "key": self.key, "value": value, "node": node}
        self.history.record({**event, "type": "invoke"})
        client = self.clients[node]
        extra: dict[str, Any] = {}
        try:
            if f == "read":
                kind, extra = read_outcome(await client.get(self.key, consistency=LIN))
            else:
                current, new = value
                if current is None:
                    await client.put_if_absent(self.key, str(new).encode(), consistency=LIN)
                else:
                    await client.cas(self.key, str(current).encode(), str(new).encode(), consistency=LIN)
                kind = "ok"
        except KVError as exc:
            kind, extra = error_outcome(exc)
        self.history.record({**event, "type": kind, **extra})
        seen = extra.get("value")
        return kind, seen if isinstance(seen, int) else None

    async def client(self, node: str, increments: int, deadline: float, stop: asyncio.Event | None = None) -> int:
        """Add up to ``increments`` through ``node`` before ``deadline`` or ``stop``; returns how many were acked."""
        loop = asyncio.get_running_loop()
        process = next(self._next_process)
        done = 0
        while done < increments and loop.time() < deadline and not (stop and stop.is_set()):
            kind, current = await self._op(process, node, "read", None)
            if kind != "ok":
                if kind == "info":
                    process = next(self._next_process)
                await asyncio.sleep(0.05)  # the node is refusing or gone: do not spin
                continue
            new = (current or 0) + 1
            kind, _ = await self._op(process, node, "cas", [current, new])
            if kind == "ok":
                self.acked += 1
                done += 1
            elif kind == "info":
                self.unknown += 1
                process = next(self._next_process)
        return done
