"""The workload: concurrent clients, each bound to one node, doing register ops.

Theory of operation
-------------------
As in Jepsen's ``independent`` register tests, each key is its own register and
every written value is unique (``client * 1_000_000 + sequence``), so a read
names exactly the write it observed.  Client ``i`` talks only to node
``i mod n``: partitions cut nodes from each other, never a client from its node,
so what a client sees is what its side of the partition can do.

Each client draws its operations from its own ``random.Random(seed, i)``: the same
seed gives the same sequence of choices (their timing still depends on the
cluster).  Outcomes map to history types by what the answer *proves*, with the
one classification of ``kvstore.contract`` (shared with the client and the
benchmarks): ``ok`` it happened; ``fail`` it certainly did not (a 4xx, a 5xx
that says ``"indeterminate": false``, a connection never established);
``info`` anything else that may have reached a node (a timeout, a cut
connection, any other 5xx).  That holds only if each operation is sent once:
every request goes through ``kvstore.client.Client`` (one per node, bound to that
node alone, so it never fails over), which never re-sends a write and whose
transport never re-sends anything -- over HTTP its ``AiohttpTransport`` turns off
aiohttp's hidden re-send of a dropped PUT/DELETE (a re-send that met a just-killed
node once turned an applied write into a ``fail``); in a simulation an
``EndpointTransport`` (``kvstore.harness.endpoint``) calls the node's kv core in
process.  The client's typed outcome is the record: an answer (``ok``, or an error
whose ``indeterminate`` is false) or ``NotSent`` prove it; ``Lost`` is ``info``.  After an
``info`` the client takes a fresh process id, because its old operation may
still be in flight.  A timed-out or cut read is ``info`` too; the checker
drops every read that did not return ``ok``, so it constrains nothing.

Eventual-mode clients keep the last causal context they saw per key and send it
with writes, as a real Dynamo client does (read-your-context), so siblings mark
genuinely concurrent writes rather than every blind write.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvstore.client import AiohttpTransport, Client, ClientTransport, GetResult, KVError, PutResult
from kvstore.contract import FAIL, INFO, OK, etag_of
from kvstore.harness.history import HistoryWriter

MODES: dict[str, dict[str, Any]] = {
    # AP: sloppy quorum, R=W=1, hinted handoff, siblings
    "eventual": {"conflict_mode": "siblings", "read": {"consistency": "eventual", "r": 1, "sloppy": "true"},
                 "write": {"consistency": "eventual", "w": 1, "sloppy": "true"}, "cas": False},
    "eventual-lww": {"conflict_mode": "lww", "read": {"consistency": "eventual", "r": 1, "sloppy": "true"},
                     "write": {"consistency": "eventual", "w": 1, "sloppy": "true"}, "cas": False},
    # strict R=W=2 of N=3 on primaries only
    "quorum": {"conflict_mode": "siblings", "read": {"consistency": "quorum", "r": 2},
               "write": {"consistency": "quorum", "w": 2}, "cas": False},
    # CP: CASPaxos per key
    "linearizable": {"conflict_mode": "siblings", "read": {"consistency": "linearizable"},
                     "write": {"consistency": "linearizable"}, "cas": True},
}


@dataclass
class WorkloadSpec:
    mode: str
    keys: list[str]
    clients: int = 10
    rate_per_s: float = 100.0  # all clients together
    read_fraction: float = 0.5
    cas_fraction: float = 0.15  # only where the mode supports compare-and-set
    delete_fraction: float = 0.03
    timeout_s: float = 1.0


@dataclass
class Counters:
    ok: int = 0
    fail: int = 0
    info: int = 0
    completed_times_ns: list[int] = field(default_factory=list)


class Workload:
    """The clients of one run.  ``nodes`` maps node ids to the URLs their kv API answers at; ``transport``
    carries the requests (default: a real HTTP ``AiohttpTransport`` this workload owns; a simulated
    cluster passes its ``EndpointTransport`` with ``endpoint_urls``)."""

    def __init__(
        self,
        spec: WorkloadSpec,
        nodes: Mapping[str, str],
        history: HistoryWriter,
        seed: int,
        transport: ClientTransport | None = None,
    ) -> None:
        assert spec.mode in MODES, spec.mode
        self.spec = spec
        self.mode = MODES[spec.mode]
        self.urls = dict(nodes)
        self.nodes = sorted(nodes)
        self.history = history
        self.seed = seed
        self.counters = Counters()
        self._next_process = itertools.count(spec.clients)
        self._stop = asyncio.Event()
        self._owns_transport = transport is None
        # Each client has one request in flight; the final reads come after the clients stopped.
        self.transport: ClientTransport = transport or AiohttpTransport(max_connections=max(64, 2 * spec.clients))
        self._clients: dict[str, Client] = {}

    def client(self, node: str) -> Client:
        """The ``Client`` bound to ``node`` alone: a workload client never fails over to another node."""
        client = self._clients.get(node)
        if client is None:
            client = Client(
                self.urls[node], transport=self.transport, timeout_s=self.spec.timeout_s,
                connect_timeout_s=self.spec.timeout_s, server_timeout_share=SERVER_TIMEOUT_SHARE,
            )
            self._clients[node] = client
        return client

    def new_process(self) -> int:
        return next(self._next_process)

    async def __aenter__(self) -> Workload:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for client in self._clients.values():
            await client.close()
        if self._owns_transport:
            await self.transport.close()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.spec.clients)))

    async def _client(self, index: int) -> None:
        rng = random.Random(f"{self.seed}:client:{index}")
        node = self.nodes[index % len(self.nodes)]
        process = index
        contexts: dict[str, str] = {}
        last_read: dict[str, int | None] = {}
        interval_s = self.spec.clients / self.spec.rate_per_s
        for seq in itertools.count():
            if self._stop.is_set():
                return
            key = rng.choice(self.spec.keys)
            roll = rng.random()
            value: Any
            if roll < self.spec.read_fraction:
                f, value = "read", None
            elif self.mode["cas"] and roll < self.spec.read_fraction + self.spec.cas_fraction:
                expected = last_read.get(key)
                f, value = ("cas", [expected, index * 1_000_000 + seq]) if expected is not None else ("read", None)
            elif roll > 1.0 - self.spec.delete_fraction:
                f, value = "delete", None
            else:
                f, value = "write", index * 1_000_000 + seq
            pause_s = interval_s * rng.uniform(0.5, 1.5)
            completion = await self.perform(process, node, f, key, value, contexts, last_read, client=index)
            if completion == "info":
                process = self.new_process()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause_s)

    async def perform(
        self,
        process: int,
        node: str,
        f: str,
        key: str,
        value: Any,
        contexts: dict[str, str] | None = None,
        last_read: dict[str, int | None] | None = None,
        params_override: dict[str, Any] | None = None,
        client: int | None = None,
    ) -> str:
        """Run one op, recording invoke and completion; returns the completion type.

        ``client`` (the workload client's index) is recorded too: a client keeps its causal
        contexts across the fresh process ids it takes after an ``info``, so only this field says
        which ops share a context (e.g. a client's delete covering its own earlier write)."""
        contexts = contexts if contexts is not None else {}
        base = {"process": process, "f": f, "key": key, "node": node, "mode": self.spec.mode}
        if client is not None:
            base["client"] = client
        self.history.record({**base, "type": "invoke", "value": value})
        try:
            kind, extra = await self._request(node, f, key, value, contexts, params_override)
        except KVError as exc:
            kind, extra = error_outcome(exc)
        event = {**base, "type": kind, "value": value, **extra}
        if kind == "ok" and f == "read" and last_read is not None:
            last_read[key] = extra.get("value")
        self.history.record(event)
        setattr(self.counters, kind, getattr(self.counters, kind) + 1)
        self.counters.completed_times_ns.append(self.history.now())
        return kind

    async def _request(
        self,
        node: str,
        f: str,
        key: str,
        value: Any,
        contexts: dict[str, str],
        params_override: dict[str, Any] | None,
    ) -> tuple[str, dict[str, Any]]:
        """Send one op through the node's ``Client``; (``ok``, extra fields), or the client's ``KVError``."""
        section = "read" if f == "read" else "write"
        params = {**self.mode[section], **(params_override or {})}
        consistency = params.get("consistency")
        sloppy = _flag(params.get("sloppy"))
        client = self.client(node)
        if f == "read":
            got = await client.get(key, r=params.get("r"), consistency=consistency, sloppy=sloppy)
            # A read's context covers exactly what the client saw.
            if got.context:
                contexts[key] = got.context
            return read_outcome(got)
        context = contexts.get(key) if self.spec.mode != "linearizable" else None
        put: PutResult
        if f == "write":
            put = await client.put(key, str(value).encode(), context=context, w=params.get("w"),
                                   consistency=consistency, sloppy=sloppy)
        elif f == "delete":
            put = await client.delete(key, context=context, w=params.get("w"), consistency=consistency,
                                      sloppy=sloppy)
        else:
            assert f == "cas", f
            put = await client.put(key, str(value[1]).encode(), context=context, w=params.get("w"),
                                   consistency=consistency, sloppy=sloppy,
                                   if_match=etag_of(str(value[0]).encode()))
        # A write's context covers all the coordinator knew; it is only safe to reuse when the write
        # left no other sibling.
        if put.context and put.siblings == 1:
            contexts[key] = put.context
        return OK, {}


# The share of the op timeout the node gets as ``timeout_ms``: a node that gives up first answers
# with a typed 503 (it says whether a write may land) instead of the client cutting the request.
SERVER_TIMEOUT_SHARE = 0.8

# The history's ``error`` for an op that got no HTTP answer, by the client's last attempt.
_NO_ANSWER_ERRORS = {"unreachable": "connection_refused", "timeout": "timeout"}


def _flag(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    return str(value).lower() == "true"


def _as_int(raw: bytes) -> int | str:
    try:
        return int(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return raw.decode(errors="replace")


def read_outcome(got: GetResult) -> tuple[str, dict[str, Any]]:
    """A read the client answered: the value it names (a 200), every sibling (a 300), or none (a 404)."""
    if got.value is not None:
        return OK, {"value": _as_int(got.value)}
    if not got.found:
        return OK, {"value": None}
    return OK, {"value": None, "siblings": [_as_int(v) for v in got.values]}


def error_outcome(exc: KVError) -> tuple[str, dict[str, Any]]:
    """(history type, extra fields) of an op the client raised for, by ``kvstore.contract``: ``info`` when
    it may have taken effect (``indeterminate``: Lost, a 5xx that does not deny it, a malformed answer),
    ``fail`` when the answer or the never-made connection proves it did not."""
    kind = INFO if exc.indeterminate else FAIL
    if exc.status is not None or not exc.attempts:
        return kind, {"error": exc.code}
    last = exc.attempts[-1]
    return kind, {"error": _NO_ANSWER_ERRORS.get(last.outcome, last.error or last.outcome)}
