"""kvstore.Client against scripted fake nodes (no real cluster).

``FakeNode`` is a small aiohttp app on 127.0.0.1 (a free port, its own thread
and loop, so sync CLI tests can use it too).  By default it is a toy
single-copy store that follows the HTTP contract; a test overrides any reply
with ``node.script``.  Every reply it sends (except deliberate disconnects) is
checked against the OpenAPI document, so the client is only ever tested
against responses the spec promises.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import pytest
from aiohttp import web

import kvstore
from kvstore.client import (
    AiohttpTransport,
    Attempt,
    BadRequest,
    Client,
    GetResult,
    KVError,
    KvstoreError,
    Lost,
    NodeUnreachable,
    NotSent,
    Overloaded,
    PreconditionFailed,
    PutResult,
    QuorumUnavailable,
    RequestTimeout,
    ServerError,
    Sibling,
    Unauthorized,
    ValueTooLarge,
    etag_of,
    key_path,
    lww_resolver,
)
from tests.openapi_util import OpenAPIMismatch, validate_response

SECRET = "s3cret"


# --------------------------------------------------------------------------- the fake node


@dataclass
class Recorded:
    method: str
    raw_path: str
    key: str | None
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Canned:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    disconnect: bool = False

    @classmethod
    def json(cls, status: int, data: Any, headers: dict[str, str] | None = None) -> Canned:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    @classmethod
    def error(cls, status: int, code: str, message: str = "canned", **extra: Any) -> Canned:
        return cls.json(status, {"error": code, "message": message, **extra})


Script = Callable[[Recorded], Canned | None]


def ctx(n: int) -> str:
    return base64.urlsafe_b64encode(f"v{n}".encode()).rstrip(b"=").decode()


class FakeNode:
    def __init__(self, node_id: str = "n1") -> None:
        self.node_id = node_id
        self.requests: list[Recorded] = []
        self.spec_violations: list[str] = []
        self.script: Script | None = None
        self.store: dict[str, bytes] = {}
        self.version = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._runner: web.AppRunner | None = None

    def start(self) -> FakeNode:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def count(self, method: str | None = None) -> int:
        return sum(1 for r in self.requests if method is None or r.method == method)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        key = unquote(raw_path[len("/kv/"):]) if raw_path.startswith("/kv/") else None
        rec = Recorded(request.method, raw_path, key, dict(parse_qsl(request.rel_url.raw_query_string)),
                       dict(request.headers), await request.read())
        self.requests.append(rec)
        canned = (self.script(rec) if self.script else None) or self.default(rec)
        if canned.delay_s:
            await asyncio.sleep(canned.delay_s)
        if canned.disconnect:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=204)
        headers = {"Content-Type": "application/octet-stream"} if canned.body else {}
        headers.update(canned.headers)
        template = "/kv/{key}" if key is not None else raw_path
        try:
            validate_response(request.method, template, canned.status, headers, canned.body)
        except OpenAPIMismatch as exc:
            self.spec_violations.append(str(exc))
        return web.Response(status=canned.status, body=canned.body, headers=headers)

    def default(self, rec: Recorded) -> Canned:
        """A toy single-copy store that follows the contract."""
        if rec.raw_path == "/health":
            return Canned.json(200, {"status": "ok", "node": self.node_id})
        if rec.raw_path == "/metrics":
            return Canned(200, b"# TYPE kvstore_requests_total counter\nkvstore_requests_total 1.0\n",
                          {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
        if rec.raw_path == "/cluster":
            return Canned.json(200, cluster_body(self.node_id))
        if rec.raw_path == "/admin/repair":
            if rec.headers.get("X-Cluster-Secret") != SECRET:
                return Canned.error(401, "unauthorized", "this route needs the cluster secret")
            return Canned.json(202, {"status": "started", "ranges": 3})
        assert rec.key is not None, rec.raw_path
        current = self.store.get(rec.key)
        if rec.method == "GET":
            if current is None:
                return Canned.error(404, "not_found", "no value for this key")
            return Canned(200, current, {"X-Context": ctx(self.version), "ETag": etag_of(current)})
        if_match, if_none = rec.headers.get("If-Match"), rec.headers.get("If-None-Match")
        current_etag = etag_of(current) if current is not None else None
        if (if_match is not None and if_match != current_etag) or (if_none == "*" and current is not None):
            return Canned.error(412, "precondition_failed", "the precondition did not hold", current=current_etag)
        self.version += 1
        # X-Siblings: live values left by an eventual/quorum write (one copy, no siblings: 0 or 1).
        live = {} if rec.query.get("consistency") == "linearizable" else {"X-Siblings": "0"}
        if rec.method == "DELETE":
            self.store.pop(rec.key, None)
            return Canned(204, headers={"X-Context": ctx(self.version), **live})
        self.store[rec.key] = rec.body
        live = {k: "1" for k in live}
        return Canned(204, headers={"X-Context": ctx(self.version), "ETag": etag_of(rec.body), **live})


def cluster_body(node_id: str) -> dict[str, Any]:
    return {
        "node": node_id,
        "members": [
            {"id": "n1", "url": "http://127.0.0.1:7001", "state": "up", "phi": 0.0, "ownership": 33.4},
            {"id": "n2", "url": "http://127.0.0.1:7002", "state": "up", "phi": 0.52, "ownership": 33.3},
            {"id": "n3", "url": "http://127.0.0.1:7003", "state": "down", "phi": None, "ownership": 33.3},
        ],
        "replicas": 3, "r": 2, "w": 2, "vnodes": 64, "conflict_mode": "siblings", "consistency": "eventual",
        "sloppy": True, "pending_hints": {"n1": 0, "n2": 0, "n3": 17},
    }


def dead_url() -> str:
    """A URL nothing listens on: connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def fake_factory() -> Iterator[Callable[[], FakeNode]]:
    nodes: list[FakeNode] = []

    def make() -> FakeNode:
        node = FakeNode(f"n{len(nodes) + 1}").start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()
    violations = [v for node in nodes for v in node.spec_violations]
    assert not violations, "the fake node sent replies the OpenAPI document does not allow:\n" + "\n".join(violations)


@pytest.fixture
def fake(fake_factory: Callable[[], FakeNode]) -> FakeNode:
    return fake_factory()


def siblings_reply(*items: tuple[bytes, int | None]) -> Canned:
    body = {"siblings": [{"value": base64.b64encode(v).decode(), "timestamp_ns": t} for v, t in items],
            "context": ctx(9)}
    return Canned.json(300, body, {"X-Context": ctx(9)})


# --------------------------------------------------------------------------- reads and writes


async def test_put_get_delete_round_trip(fake: FakeNode) -> None:
    async with Client([fake.url]) as kv:
        put = await kv.put("user:42", b"hello", w=2)
        assert isinstance(put, PutResult)
        assert put.context == ctx(1) and put.etag == etag_of(b"hello")
        assert put.node == fake.url and put.retried is False
        assert [(a.outcome, a.status) for a in put.attempts] == [("response", 204)]

        got = await kv.get("user:42", r=2)
        assert isinstance(got, GetResult)
        assert got.found and got.value == b"hello" and got.values == [b"hello"]
        assert got.siblings == [Sibling(b"hello", None)] and not got.conflict
        assert got.etag == etag_of(b"hello") and got.context == ctx(1) and got.node == fake.url

        deleted = await kv.delete("user:42", context=got.context)
        assert deleted.context == ctx(2) and deleted.etag is None
        assert (put.siblings, put.others, deleted.siblings, deleted.others) == (1, 0, 0, 0)

        gone = await kv.get("user:42")
        assert gone == GetResult(value=None, siblings=[], context=None, etag=None, node=fake.url, found=False)
    put_req, get_req, del_req = fake.requests[0], fake.requests[1], fake.requests[2]
    assert put_req.method == "PUT" and put_req.body == b"hello" and put_req.query["w"] == "2"
    assert "X-Context" not in put_req.headers
    assert get_req.query["r"] == "2"
    assert del_req.method == "DELETE" and del_req.headers["X-Context"] == ctx(1) and del_req.body == b""


async def test_parameters_are_sent_as_the_contract_spells_them(fake: FakeNode) -> None:
    async with Client([fake.url], timeout_s=3.0) as kv:
        await kv.get("k", r="quorum", consistency="quorum", sloppy=False, timeout_s=2.0)
        await kv.put("k", b"v", w="all", consistency="eventual", sloppy=True, context="abc")
        await kv.delete("k", w=1)
    get_q, put_q, del_q = (r.query for r in fake.requests)
    # timeout_ms sits below the client's own timeout so the server answers (typed) before the client gives up.
    assert get_q == {"r": "quorum", "consistency": "quorum", "sloppy": "false", "timeout_ms": "1800"}
    assert put_q == {"w": "all", "consistency": "eventual", "sloppy": "true", "timeout_ms": "2700"}
    assert del_q == {"w": "1", "timeout_ms": "2700"}
    assert fake.requests[1].headers["X-Context"] == "abc"


@pytest.mark.parametrize("key", ["user:42", "a/b", "a b?c#d&e=f", "ключ-🔑", "..", ".", "%2F", "+plus+"])
async def test_keys_are_percent_encoded_as_one_path_segment(fake: FakeNode, key: str) -> None:
    async with Client([fake.url]) as kv:
        await kv.put(key, b"v")
        got = await kv.get(key)
    assert got.value == b"v"
    assert [r.key for r in fake.requests] == [key, key]
    assert "/" not in fake.requests[0].raw_path[len("/kv/"):]


async def test_not_found_keeps_the_tombstone_context(fake: FakeNode) -> None:
    fake.script = lambda rec: Canned.json(404, {"error": "not_found", "message": "deleted"}, {"X-Context": ctx(5)})
    async with Client([fake.url]) as kv:
        got = await kv.get("gone")
    assert not got.found and got.value is None and got.values == [] and got.context == ctx(5)


async def test_siblings_without_a_resolver(fake: FakeNode) -> None:
    fake.script = lambda rec: siblings_reply((b"left", 10), (b"right", 20))
    async with Client([fake.url]) as kv:
        got = await kv.get("k")
    assert got.found and got.conflict and got.value is None and got.etag is None
    assert got.siblings == [Sibling(b"left", 10), Sibling(b"right", 20)]
    assert got.values == [b"left", b"right"] and got.context == ctx(9)


async def test_lww_resolver_picks_the_latest_sibling(fake: FakeNode) -> None:
    fake.script = lambda rec: siblings_reply((b"newest", 30), (b"old", 10), (b"middle", 20))
    async with Client([fake.url], resolver=kvstore.lww_resolver) as kv:
        got = await kv.get("k")
    assert got.value == b"newest"
    assert len(got.siblings) == 3, "resolving must not hide the siblings"


async def test_custom_resolver_receives_every_sibling(fake: FakeNode) -> None:
    fake.script = lambda rec: siblings_reply((b"a", None), (b"b", None))
    seen: list[list[Sibling]] = []

    def union(siblings: list[Sibling]) -> bytes:
        seen.append(siblings)
        return b",".join(sorted(s.value for s in siblings))

    async with Client([fake.url], resolver=union) as kv:
        got = await kv.get("k")
    assert got.value == b"a,b"
    assert seen == [[Sibling(b"a"), Sibling(b"b")]]


def test_lww_resolver_ties_and_missing_timestamps() -> None:
    assert lww_resolver([Sibling(b"a", 5), Sibling(b"b", 5)]) == b"b"  # tie: larger bytes, same on every client
    assert lww_resolver([Sibling(b"zzz", None), Sibling(b"a", 0)]) == b"a"  # a timestamp beats none
    assert lww_resolver([Sibling(b"x", None), Sibling(b"y", None)]) == b"y"
    with pytest.raises(ValueError):
        lww_resolver([])


async def test_malformed_siblings_reply_is_a_server_error(fake: FakeNode) -> None:
    fake.script = lambda rec: Canned(300, b"<html>", {"Content-Type": "text/html", "X-Context": "c"})
    async with Client([fake.url]) as kv:
        with pytest.raises(ServerError) as info:
            await kv.get("k")
    assert info.value.code == "bad_response" and info.value.status == 300
    fake.spec_violations.clear()  # deliberately off-spec


# --------------------------------------------------------------------------- conditional writes


async def test_cas_sends_the_etag_of_expected_and_succeeds(fake: FakeNode) -> None:
    async with Client([fake.url]) as kv:
        await kv.put("k", b"v2")
        result = await kv.cas("k", expected=b"v2", new=b"v3")
        assert result.etag == etag_of(b"v3")
        assert (await kv.get("k")).value == b"v3"
    cas_req = fake.requests[1]
    assert cas_req.headers["If-Match"] == etag_of(b"v2")
    # The server only offers compare-and-set linearizably, so that is the default for conditional writes.
    assert cas_req.query["consistency"] == "linearizable"


async def test_cas_mismatch_raises_precondition_failed_with_current(fake: FakeNode) -> None:
    async with Client([fake.url]) as kv:
        await kv.put("k", b"actual")
        with pytest.raises(PreconditionFailed) as info:
            await kv.cas("k", expected=b"stale", new=b"v3")
    err = info.value
    assert err.status == 412 and err.code == "precondition_failed" and err.current == etag_of(b"actual")
    assert err.node == fake.url and fake.store["k"] == b"actual"


async def test_put_if_absent_creates_once(fake: FakeNode) -> None:
    async with Client([fake.url]) as kv:
        await kv.put_if_absent("k", b"first")
        with pytest.raises(PreconditionFailed) as info:
            await kv.put_if_absent("k", b"second")
    assert info.value.current == etag_of(b"first")
    assert [r.headers.get("If-None-Match") for r in fake.requests] == ["*", "*"]
    assert fake.store["k"] == b"first"


async def test_explicit_if_match_accepts_an_unquoted_etag(fake: FakeNode) -> None:
    async with Client([fake.url]) as kv:
        await kv.put("k", b"v")
        await kv.put("k", b"w", if_match=etag_of(b"v").strip('"'), consistency="linearizable")
    assert fake.requests[1].headers["If-Match"] == etag_of(b"v")


async def test_client_side_argument_errors(fake: FakeNode) -> None:
    async with Client([fake.url]) as kv:
        with pytest.raises(TypeError):
            await kv.put("k", "text")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await kv.put("k", b"v", if_match='"x"', if_absent=True)
        with pytest.raises(TypeError):
            await kv.get("k", r=True)  # type: ignore[arg-type]
    assert fake.requests == []
    with pytest.raises(ValueError):
        Client([])
    with pytest.raises(ValueError):
        Client(["127.0.0.1:7001"])


@pytest.mark.parametrize(
    ("method", "header", "siblings", "others"),
    [("put", "1", 1, 0), ("put", "3", 3, 2), ("delete", "0", 0, 0), ("delete", "2", 2, 2),
     ("put", None, None, None), ("delete", "x", None, None)],
)
async def test_writes_report_the_live_values_they_left(
    fake: FakeNode, method: str, header: str | None, siblings: int | None, others: int | None
) -> None:
    """A write without (or with a stale) context leaves what it did not see alive: a delete that did not delete."""
    headers = {"X-Context": ctx(3)} | ({"X-Siblings": header} if header is not None else {})
    fake.script = lambda rec: Canned(204, headers=headers)
    async with Client([fake.url]) as kv:
        result = await (kv.put("k", b"v") if method == "put" else kv.delete("k"))
    assert (result.siblings, result.others) == (siblings, others)
    fake.spec_violations.clear()  # "x" is off-spec on purpose


# --------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("canned", "exc_type", "fields"),
    [
        (Canned.error(400, "invalid_quorum", "w=9 is outside 1..N (N=3)"), BadRequest,
         {"status": 400, "code": "invalid_quorum", "message": "w=9 is outside 1..N (N=3)"}),
        (Canned.error(400, "invalid_key", "the key is empty"), BadRequest, {"code": "invalid_key"}),
        (Canned.error(400, "invalid_context", "bad"), BadRequest, {"code": "invalid_context", "indeterminate": False}),
        (Canned.error(412, "precondition_failed", current=None), PreconditionFailed,
         {"status": 412, "current": None}),
        (Canned.error(413, "value_too_large", limit=1048576), ValueTooLarge, {"status": 413, "limit": 1048576}),
        (Canned.error(429, "overloaded"), Overloaded, {"status": 429, "code": "overloaded", "indeterminate": False}),
        # A 5xx that does not say "indeterminate": false proves nothing (kvstore.contract): unknown.
        (Canned.error(503, "overloaded"), Overloaded, {"status": 503, "indeterminate": True}),
        (Canned.error(503, "quorum_unavailable", needed=2, acknowledged=1, indeterminate=True), QuorumUnavailable,
         {"status": 503, "needed": 2, "acknowledged": 1, "indeterminate": True}),
        (Canned.error(503, "quorum_unavailable", needed=3, acknowledged=0, indeterminate=False), QuorumUnavailable,
         {"needed": 3, "acknowledged": 0, "indeterminate": False}),
        (Canned.error(503, "timeout", indeterminate=True), RequestTimeout,
         {"status": 503, "code": "timeout", "indeterminate": True}),
        (Canned.error(503, "storage_unavailable", "storage error: disk full", indeterminate=True), ServerError,
         {"status": 503, "code": "storage_unavailable", "indeterminate": True}),
        (Canned.error(503, "overloaded", "the storage write queue is full", indeterminate=False), Overloaded,
         {"status": 503, "indeterminate": False}),
        # A node bug mid-write may strike after the replicas took it: the client cannot call that a failure.
        (Canned.error(500, "internal", "internal error; see the node's log"), ServerError,
         {"status": 500, "code": "internal", "indeterminate": True}),
    ],
)
async def test_each_error_code_raises_its_exception(
    fake: FakeNode, canned: Canned, exc_type: type[KVError], fields: dict[str, Any]
) -> None:
    fake.script = lambda rec: canned
    async with Client([fake.url]) as kv:
        with pytest.raises(exc_type) as info:
            await kv.put("k", b"v")
    err = info.value
    assert type(err) is exc_type and isinstance(err, KVError)
    for name, value in fields.items():
        assert getattr(err, name) == value, name
    assert err.node == fake.url and err.message
    assert fake.count() == 1, "a server answer is final: no failover, no retry"


async def test_unauthorized_from_the_server_and_without_a_secret(fake: FakeNode) -> None:
    async with Client([fake.url], secret="wrong") as kv:
        with pytest.raises(Unauthorized) as info:
            await kv.repair()
    assert info.value.status == 401 and info.value.code == "unauthorized"
    async with Client([fake.url]) as kv:
        with pytest.raises(Unauthorized):
            await kv.repair()  # refused locally: no secret configured
    assert fake.count() == 1
    async with Client([fake.url], secret=SECRET) as kv:
        assert await kv.repair() == {"status": "started", "ranges": 3}


async def test_a_non_json_error_from_a_proxy_is_still_typed(fake: FakeNode) -> None:
    fake.script = lambda rec: Canned(502, b"Bad Gateway", {"Content-Type": "text/plain"})
    async with Client([fake.url]) as kv:
        with pytest.raises(ServerError) as info:
            await kv.get("k")
    assert info.value.status == 502 and info.value.code == "http_502" and info.value.message == "Bad Gateway"
    async with Client([fake.url]) as kv:
        with pytest.raises(ServerError) as info:
            await kv.put("k", b"v")
    assert info.value.indeterminate is True, "a 5xx that does not say it wrote nothing may have written"
    fake.spec_violations.clear()  # deliberately off-spec: not a kvstore node


async def test_an_unmapped_status_raises_the_base_error(fake: FakeNode) -> None:
    fake.script = lambda rec: Canned.error(409, "consistency_conflict", "try again")
    async with Client([fake.url]) as kv:
        with pytest.raises(KVError) as info:
            await kv.put("k", b"v")
    assert type(info.value) is KVError
    assert (info.value.status, info.value.code, info.value.message) == (409, "consistency_conflict", "try again")
    fake.spec_violations.clear()  # 409 is not in the public contract


def test_error_str_is_one_line_with_status_code_and_node() -> None:
    err = QuorumUnavailable("1 of the 2 required replicas answered", status=503, code="quorum_unavailable",
                            node="http://n1", needed=2, acknowledged=1, indeterminate=True)
    assert str(err) == "503 quorum_unavailable: 1 of the 2 required replicas answered [http://n1]"


# --------------------------------------------------------------------------- failover and retries


async def test_connection_refused_fails_over_silently(fake: FakeNode) -> None:
    dead = dead_url()
    async with Client([dead, fake.url]) as kv:
        put = await kv.put("k", b"v")
        got = await kv.get("k")
    assert put.retried is False and put.node == fake.url
    assert [a.outcome for a in put.attempts] == ["unreachable", "response"]
    assert put.attempts[0].node == dead and not put.attempts[0].may_have_been_applied
    assert got.value == b"v" and got.node == fake.url


async def test_a_refusing_node_is_tried_last_for_a_while(fake: FakeNode) -> None:
    dead = dead_url()
    async with Client([dead, fake.url], down_cooldown_s=60) as kv:
        first = await kv.put("k", b"1")   # rotation starts at the dead node
        await kv.put("k", b"2")           # starts at the live node
        third = await kv.put("k", b"3")   # would start at the dead node, but it is cooling down
    assert [a.node for a in first.attempts] == [dead, fake.url]
    assert [a.node for a in third.attempts] == [fake.url]


async def test_requests_rotate_over_live_nodes(fake_factory: Callable[[], FakeNode]) -> None:
    a, b = fake_factory(), fake_factory()
    async with Client([a.url, b.url]) as kv:
        for _ in range(4):
            await kv.health()
    assert (a.count(), b.count()) == (2, 2)


async def test_every_node_refusing_raises_node_unreachable() -> None:
    dead1, dead2 = dead_url(), dead_url()
    async with Client([dead1, dead2]) as kv:
        with pytest.raises(NodeUnreachable) as info:
            await kv.put("k", b"v")
    err = info.value
    assert err.status is None and err.code == "unreachable"
    assert sorted(a.node for a in err.attempts) == sorted([dead1, dead2])
    assert all(a.outcome == "unreachable" for a in err.attempts)
    assert dead1 in err.message and dead2 in err.message


async def test_write_after_a_disconnect_is_retried_on_opt_in_and_says_so(
    fake_factory: Callable[[], FakeNode],
) -> None:
    flaky, good = fake_factory(), fake_factory()
    flaky.script = lambda rec: Canned(204, disconnect=True)
    async with Client([flaky.url, good.url], retry_writes=True) as kv:
        result = await kv.put("k", b"v")
    assert result.retried is True and result.node == good.url
    assert [(a.node, a.outcome) for a in result.attempts] == [(flaky.url, "disconnected"), (good.url, "response")]
    assert result.attempts[0].may_have_been_applied and result.attempts[0].error
    assert flaky.requests[0].body == b"v" and good.requests[0].body == b"v"
    assert flaky.count() == 1, "no hidden re-send to the same node (aiohttp's own retry must stay off)"


async def test_an_error_after_a_retried_write_is_indeterminate(fake_factory: Callable[[], FakeNode]) -> None:
    """The second node's definite refusal says nothing about the first copy, which may have landed."""
    flaky, refusing = fake_factory(), fake_factory()
    flaky.script = lambda rec: Canned(204, disconnect=True)
    refusing.script = lambda rec: Canned.error(503, "quorum_unavailable", needed=2, acknowledged=0,
                                               indeterminate=False)
    async with Client([flaky.url, refusing.url], retry_writes=True) as kv:
        with pytest.raises(QuorumUnavailable) as info:
            await kv.put("k", b"v")
    assert info.value.indeterminate is True and info.value.acknowledged == 0
    assert [a.outcome for a in info.value.attempts] == ["disconnected", "response"]


@pytest.mark.parametrize(
    ("canned", "outcome"),
    [
        (Canned.error(500, "internal", "boom"), "info"),
        (Canned.error(503, "storage_unavailable", "io", indeterminate=True), "info"),
        (Canned.error(503, "quorum_unavailable", needed=2, acknowledged=0, indeterminate=False), "fail"),
        (Canned.error(400, "invalid_quorum", "r=9"), "fail"),
    ],
)
async def test_read_errors_follow_the_one_outcome_classification(fake: FakeNode, canned: Canned, outcome: str) -> None:
    """A read changes nothing; its indeterminate only tells "unanswered" (info) from "refused" (fail)."""
    fake.script = lambda rec: canned
    async with Client([fake.url]) as kv:
        with pytest.raises(KVError) as info:
            await kv.get("k")
    assert info.value.outcome == outcome and info.value.indeterminate is (outcome == "info")


@pytest.mark.parametrize("method", ["put", "delete"])
async def test_by_default_a_write_after_a_disconnect_is_indeterminate_and_not_resent(
    fake_factory: Callable[[], FakeNode], method: str,
) -> None:
    flaky, good = fake_factory(), fake_factory()
    flaky.script = lambda rec: Canned(204, disconnect=True)
    async with Client([flaky.url, good.url]) as kv:
        with pytest.raises(RequestTimeout) as info:
            await (kv.put("k", b"v") if method == "put" else kv.delete("k"))
    assert info.value.indeterminate is True and info.value.code == "indeterminate"
    assert info.value.outcome == "info"
    assert [a.outcome for a in info.value.attempts] == ["disconnected"]
    assert flaky.count() == 1 and good.count() == 0, "one request: no hidden and no default re-send"


async def test_conditional_write_is_never_resent(fake_factory: Callable[[], FakeNode]) -> None:
    flaky, good = fake_factory(), fake_factory()
    flaky.script = lambda rec: Canned(204, disconnect=True)
    async with Client([flaky.url, good.url]) as kv:
        with pytest.raises(RequestTimeout) as info:
            await kv.cas("k", expected=b"a", new=b"b")
    assert info.value.indeterminate is True
    assert good.count() == 0, "a re-sent CAS would be judged against the state the first copy may have created"


async def test_read_after_a_disconnect_fails_over_silently(fake_factory: Callable[[], FakeNode]) -> None:
    flaky, good = fake_factory(), fake_factory()
    flaky.script = lambda rec: Canned(200, disconnect=True)
    good.store["k"] = b"v"
    async with Client([flaky.url, good.url]) as kv:
        got = await kv.get("k")
    assert got.value == b"v" and got.node == good.url
    assert flaky.count() == 1


async def test_write_that_may_have_landed_everywhere_is_indeterminate(fake_factory: Callable[[], FakeNode]) -> None:
    a, b = fake_factory(), fake_factory()
    a.script = b.script = lambda rec: Canned(204, disconnect=True)
    async with Client([a.url, b.url], retry_writes=True) as kv:
        with pytest.raises(RequestTimeout) as info:
            await kv.put("k", b"v")
    assert info.value.indeterminate is True and len(info.value.attempts) == 2
    assert a.count() == 1 and b.count() == 1


# --------------------------------------------------------------------------- timeouts


async def test_read_timeout_is_an_unanswered_request_timeout(fake: FakeNode) -> None:
    fake.script = lambda rec: Canned(200, b"late", {"X-Context": "c", "ETag": etag_of(b"late")}, delay_s=1.0)
    async with Client([fake.url], timeout_s=0.2) as kv:
        started = time.monotonic()
        with pytest.raises(RequestTimeout) as info:
            await kv.get("k")
        elapsed = time.monotonic() - started
    assert info.value.indeterminate is True and info.value.outcome == "info" and info.value.status is None
    assert elapsed < 0.9, "the client must give up at its own timeout"
    assert fake.requests[0].query["timeout_ms"] == "180"


async def test_write_timeout_is_indeterminate_and_fails_over_to_a_live_node(
    fake_factory: Callable[[], FakeNode],
) -> None:
    slow, good = fake_factory(), fake_factory()
    slow.script = lambda rec: Canned(204, headers={"X-Context": "c", "ETag": etag_of(b"v")}, delay_s=1.0)
    async with Client([slow.url, good.url], timeout_s=0.2, retry_writes=True) as kv:
        result = await kv.put("k", b"v")
    assert result.retried is True and [a.outcome for a in result.attempts] == ["timeout", "response"]


async def test_per_call_timeout_overrides_the_client_default(fake: FakeNode) -> None:
    fake.script = lambda rec: Canned(204, headers={"X-Context": "c", "ETag": etag_of(b"v")}, delay_s=0.5)
    async with Client([fake.url], timeout_s=0.1) as kv:
        result = await kv.put("k", b"v", timeout_s=2.0)
        with pytest.raises(RequestTimeout) as info:
            await kv.put("k", b"v")
    assert result.retried is False and info.value.indeterminate is True
    assert [r.query["timeout_ms"] for r in fake.requests] == ["1800", "90"]


# --------------------------------------------------------------------------- cluster routes and lifecycle


async def test_cluster_and_health(fake: FakeNode) -> None:
    async with Client(fake.url) as kv:
        cluster = await kv.cluster()
        health = await kv.health()
        metrics = await kv.metrics()
    assert cluster["replicas"] == 3 and cluster["pending_hints"]["n3"] == 17
    assert [m["id"] for m in cluster["members"]] == ["n1", "n2", "n3"]
    assert health == {"status": "ok", "node": "n1"}
    assert "kvstore_requests_total" in metrics
    assert [r.raw_path for r in fake.requests] == ["/cluster", "/health", "/metrics"]


async def test_close_is_idempotent_and_final(fake: FakeNode) -> None:
    kv = Client([fake.url], max_connections=3)
    async with kv:
        await kv.health()
        assert isinstance(kv.transport, AiohttpTransport)
        session = kv.transport.session
        assert session is not None and session.connector is not None
        assert session.connector.limit == 3
    await kv.close()
    with pytest.raises(RuntimeError):
        await kv.health()


def test_exports_from_the_package() -> None:
    for name in ("Client", "GetResult", "PutResult", "Sibling", "lww_resolver", "KVError", "BadRequest",
                 "Unauthorized", "PreconditionFailed", "ValueTooLarge", "Overloaded", "QuorumUnavailable",
                 "RequestTimeout", "NodeUnreachable", "ServerError", "Attempt"):
        assert getattr(kvstore, name) is not None, name
    assert kvstore.__version__
    assert issubclass(kvstore.NodeUnreachable, kvstore.KVError)
    assert Attempt("n", "timeout").may_have_been_applied and not Attempt("n", "unreachable").may_have_been_applied


def test_key_path_encoding() -> None:
    assert key_path("user:42") == "/kv/user%3A42"
    assert key_path("a/b") == "/kv/a%2Fb"
    assert key_path("..") == "/kv/%2E%2E"


# --------------------------------------------------------------------------- an injected transport


class ScriptedTransport:
    """A ClientTransport that answers from a script, per node URL, and records what was sent."""

    def __init__(self, script: dict[str, list[object]]) -> None:
        self.script = script
        self.sent: list[tuple[str, str]] = []
        self.closed = False

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
        timeout_s: float, connect_timeout_s: float,
    ) -> tuple[int, Mapping[str, str], bytes]:
        node = url.split("/kv/")[0]
        self.sent.append((method, url))
        answer = self.script[node].pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, tuple)
        return answer

    async def close(self) -> None:
        self.closed = True


async def test_an_injected_transport_carries_every_request_and_stays_the_callers() -> None:
    transport = ScriptedTransport({
        "http://a:1": [NotSent("cannot connect: refused")],
        "http://b:2": [(204, {"ETag": etag_of(b"v")}, b"")],
    })
    async with Client(["http://a:1", "http://b:2"], transport=transport) as kv:
        await kv.put("k", b"v")
    # Nothing left for a: the client went on to b.  The caller's transport is not closed by the client.
    assert [m for m, _ in transport.sent] == ["PUT", "PUT"]
    assert transport.closed is False


async def test_a_lost_write_through_an_injected_transport_is_indeterminate_and_not_resent() -> None:
    transport = ScriptedTransport({
        "http://a:1": [Lost("disconnected", "connection lost")],
        "http://b:2": [(204, {}, b"")],
    })
    async with Client(["http://a:1", "http://b:2"], transport=transport) as kv:
        with pytest.raises(RequestTimeout) as caught:
            await kv.put("k", b"v")
    assert caught.value.indeterminate and caught.value.outcome == "info"
    assert isinstance(caught.value, KvstoreError)
    assert len(transport.sent) == 1  # one request, one outcome: never re-sent to b
