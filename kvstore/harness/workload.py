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
requests go through an ``Endpoint`` (``kvstore.harness.endpoint``) that never re-sends --
over HTTP its session comes from ``kvstore.client.http_session.client_session``, which
turns off aiohttp's hidden re-send of a dropped PUT/DELETE (a re-send that met a
just-killed node once turned an applied write into a ``fail``); in a simulation
it calls the node's kv core in process.  After an
``info`` the client takes a fresh process id, because its old operation may
still be in flight.  A timed-out or cut read is ``info`` too; the checker
drops every read that did not return ``ok``, so it constrains nothing.

Eventual-mode clients keep the last causal context they saw per key and send it
with writes, as a real Dynamo client does (read-your-context), so siblings mark
genuinely concurrent writes rather than every blind write.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import random
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvstore.contract import OK, answer_outcome, error_body, etag_of, no_answer_outcome
from kvstore.harness.endpoint import ApiRequest, Endpoint, HttpEndpoint, NoAnswerError, content_type
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
    """The clients of one run.  ``nodes`` maps node ids to URLs (reached over HTTP), or is a list of
    node ids reached through ``endpoint`` (e.g. a simulated cluster's)."""

    def __init__(
        self,
        spec: WorkloadSpec,
        nodes: Mapping[str, str] | list[str],
        history: HistoryWriter,
        seed: int,
        endpoint: Endpoint | None = None,
    ) -> None:
        assert spec.mode in MODES, spec.mode
        assert endpoint is not None or isinstance(nodes, Mapping), "node ids without an endpoint"
        self.spec = spec
        self.mode = MODES[spec.mode]
        self.nodes = sorted(nodes)
        self.history = history
        self.seed = seed
        self.counters = Counters()
        self._next_process = itertools.count(spec.clients)
        self._stop = asyncio.Event()
        self.endpoint: Endpoint = endpoint if endpoint is not None else HttpEndpoint(dict(nodes))  # type: ignore[arg-type]
        self._owns_endpoint = endpoint is None

    def new_process(self) -> int:
        return next(self._next_process)

    async def __aenter__(self) -> Workload:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._owns_endpoint:
            await self.endpoint.close()

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
        except NoAnswerError as exc:
            kind = no_answer_outcome(exc.kind)
            extra = {"error": exc.reason}
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
        section = "read" if f == "read" else "write"
        params = {**self.mode[section], **(params_override or {})}
        timeout_ms = int(self.spec.timeout_s * 1000 * 0.8)
        params["timeout_ms"] = timeout_ms
        headers: dict[str, str] = {}
        if key in contexts and self.spec.mode != "linearizable":
            headers["X-Context"] = contexts[key]
        method, body = "GET", None
        if f == "write":
            method, body = "PUT", str(value).encode()
        elif f == "delete":
            method = "DELETE"
        elif f == "cas":
            method, body = "PUT", str(value[1]).encode()
            headers["If-Match"] = etag_of(str(value[0]).encode())
        request = ApiRequest(
            method=method, raw_path="/kv/" + urllib.parse.quote(key, safe=""),
            query={k: str(v) for k, v in params.items()}, headers=headers, body=body,
        )
        resp = await self.endpoint.request(node, request, self.spec.timeout_s)
        raw, status = resp.body, resp.status
        # A read's context covers exactly what the client saw.  A write's context covers all the
        # coordinator knew; it is only safe to reuse when the write left no other sibling.
        if resp.headers.get("X-Context") and (method == "GET" or resp.headers.get("X-Siblings") == "1"):
            contexts[key] = resp.headers["X-Context"]
        doc = error_body(raw) if content_type(resp.headers) == "application/json" else None
        return classify(f, status, raw, doc)


def _as_int(raw: bytes) -> int | str:
    try:
        return int(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return raw.decode(errors="replace")


def classify(f: str, status: int, raw: bytes, doc: Any) -> tuple[str, dict[str, Any]]:
    """Map an HTTP answer to (history type, extra fields), by ``kvstore.contract.answer_outcome``."""
    body = doc if isinstance(doc, dict) else None
    kind = answer_outcome(status, body, read=f == "read")
    if kind != OK:
        error = body.get("error") if body else None
        return kind, {"error": str(error) if error else f"http_{status}"}
    if f != "read":
        return kind, {}
    if status == 200:
        return kind, {"value": _as_int(raw)}
    if status == 404:
        return kind, {"value": None}
    try:  # 300: every sibling
        siblings = [_as_int(base64.b64decode(s["value"], validate=True)) for s in (body or {})["siblings"]]
    except (KeyError, TypeError, ValueError):
        return "info", {"error": "bad_response"}  # a malformed answer proves nothing
    return kind, {"value": None, "siblings": siblings}
