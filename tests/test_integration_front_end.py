"""Integration: the two HTTP front ends (``[server] front_end``) answer alike (kvstore.server.http_front).

Raw-socket tests of what the lean httptools front end must get right first -- pipelining (answers
in request order, a forwarded route in the middle), chunked bodies, bodies cut short, oversize
bodies, malformed request lines behind valid requests -- each run against both front ends, and a
differential test: the same byte sequences sent to a node of each kind must get the same
statuses, header names and bodies.  No assertion depends on speed: every wait is bounded by a
socket timeout or a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import time
from collections.abc import Iterator
from typing import BinaryIO

import pytest

from kvstore.config import Limits
from kvstore.contract import etag_of
from kvstore.harness.local_cluster import LocalCluster
from tests.conftest import FAST_AP, FRONT_ENDS, Reply, http, kv_path

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024  # a small value limit keeps the oversize cases quick
BODY_IDLE_TIMEOUT_MS = 2000
LIMITS = Limits(max_value_bytes=LIMIT, body_idle_timeout_ms=BODY_IDLE_TIMEOUT_MS)
HOST = b"Host: 127.0.0.1\r\n"


def single_node(tmp_path_factory: pytest.TempPathFactory, front_end: str) -> LocalCluster:
    return LocalCluster(1, 1, r=1, w=1, data_dir=str(tmp_path_factory.mktemp(front_end)), ap=FAST_AP,
                        limits=LIMITS, storage="memory", front_end=front_end)


@pytest.fixture(scope="module", params=FRONT_ENDS)
def node(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    cluster = single_node(tmp_path_factory, request.param)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalCluster]]:
    clusters = {front_end: single_node(tmp_path_factory, front_end) for front_end in FRONT_ENDS}
    try:
        for cluster in clusters.values():
            cluster.start()
        yield clusters
    finally:
        for cluster in clusters.values():
            cluster.stop()


def address(cluster: LocalCluster) -> tuple[str, int]:
    member = cluster.base_config.member("n1")
    return member.host, member.http_port


def read_answers(sock: socket.socket | BinaryIO, methods: list[str]) -> list[Reply]:
    """One answer per request, in the order the node sent them (several answers may share a read)."""
    reader = sock.makefile("rb") if isinstance(sock, socket.socket) else sock
    answers = []
    for method in methods:
        status_line = reader.readline(65537)
        assert status_line.startswith(b"HTTP/1."), (status_line, answers)
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := reader.readline(65537)) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        if method != "HEAD" and status not in (100, 204, 304):
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while size := int(reader.readline(65537).split(b";")[0], 16):
                    body += reader.read(size)
                    reader.readline(65537)
                while reader.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
            else:
                body = reader.read(int(headers.get("content-length", "0")))
        answers.append(Reply(status, headers, body))
    return answers


def exchange(cluster: LocalCluster, raw: bytes, methods: list[str]) -> list[Reply]:
    with socket.create_connection(address(cluster), timeout=30) as sock:
        sock.sendall(raw)
        return read_answers(sock, methods)


def put(key: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"PUT {kv_path(key, w=1)} HTTP/1.1\r\n".encode() + HOST + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def get(key: str, extra: bytes = b"") -> bytes:
    return f"GET {kv_path(key, r=1)} HTTP/1.1\r\n".encode() + HOST + extra + b"\r\n"


def test_pipelined_requests_are_answered_in_order(node: LocalCluster) -> None:
    """Ten requests in one write, a forwarded route and a refused request among them."""
    keys = [f"pipe:{i}" for i in range(4)]
    raw = b"".join(put(key, key.encode() * 3) for key in keys)
    raw += b"GET /health HTTP/1.1\r\n" + HOST + b"\r\n"
    raw += f"GET {kv_path('pipe:0', r=9)} HTTP/1.1\r\n".encode() + HOST + b"\r\n"  # 400 invalid_quorum
    raw += b"".join(get(key) for key in reversed(keys))
    methods = ["PUT"] * 4 + ["GET"] * 6
    answers = exchange(node, raw + get("pipe:missing", b"Connection: close\r\n"), methods + ["GET"])
    assert [a.status for a in answers] == [204] * 4 + [200, 400, 200, 200, 200, 200, 404]
    assert json.loads(answers[4].body)["status"] == "ok"
    assert json.loads(answers[5].body)["error"] == "invalid_quorum"
    assert [a.body for a in answers[6:10]] == [key.encode() * 3 for key in reversed(keys)]


def test_chunked_bodies_arrive_whole(node: LocalCluster) -> None:
    value = hashlib.shake_256(b"chunked").digest(LIMIT)
    pieces = [value[i:i + 997] for i in range(0, len(value), 997)]
    chunks = b"".join(b"%x;ext=1\r\n%b\r\n" % (len(p), p) for p in pieces)  # chunk extensions are allowed
    raw = (f"PUT {kv_path('chunked', w=1)} HTTP/1.1\r\n".encode() + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
           + chunks + b"0\r\nX-Trailer: t\r\n\r\n")
    answers = exchange(node, raw + get("chunked", b"Connection: close\r\n"), ["PUT", "GET"])
    assert answers[0].status == 204 and answers[0].headers["etag"] == etag_of(value), answers[0]
    assert (answers[1].status, answers[1].body) == (200, value)


@pytest.mark.parametrize("cut", ["content_length", "chunked"])
def test_a_body_cut_short_is_never_stored(node: LocalCluster, cut: str) -> None:
    """The client sends part of a body and closes its side: nothing is stored, nothing acknowledged."""
    key = f"cut:{cut}"
    framing = b"Content-Length: 1000\r\n\r\n" if cut == "content_length" else b"Transfer-Encoding: chunked\r\n\r\n"
    partial = b"x" * 10 if cut == "content_length" else b"3e8\r\n" + b"x" * 10
    with socket.create_connection(address(node), timeout=30) as sock:
        sock.sendall(f"PUT {kv_path(key, w=1)} HTTP/1.1\r\n".encode() + HOST + framing + partial)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if answer:  # a node may answer a cut body (400/408) or just close: never a 2xx
        assert answer.split(b" ", 2)[1][:1] == b"4", answer
    assert http(node.urls[0], "GET", kv_path(key, r=1)).status == 404


def test_a_stalled_body_is_408_then_the_connection_closes(node: LocalCluster) -> None:
    started = time.monotonic()
    with socket.create_connection(address(node), timeout=60) as sock:
        sock.sendall(f"PUT {kv_path('stalled', w=1)} HTTP/1.1\r\n".encode() + HOST + b"Content-Length: 100\r\n\r\nab")
        [answer] = read_answers(sock, ["PUT"])
        assert sock.recv(1) == b""  # closed after the answer
    assert time.monotonic() - started >= BODY_IDLE_TIMEOUT_MS / 1000.0
    assert answer.status == 408 and json.loads(answer.body)["error"] == "body_timeout"
    assert answer.headers.get("connection", "").lower() == "close"
    assert http(node.urls[0], "GET", kv_path("stalled", r=1)).status == 404


@pytest.mark.parametrize("framing", ["declared", "chunked"])
def test_an_oversize_body_is_413_json(node: LocalCluster, framing: str) -> None:
    body = b"o" * (LIMIT + 1)
    if framing == "declared":
        raw = put("big", body)
    else:
        raw = (f"PUT {kv_path('big', w=1)} HTTP/1.1\r\n".encode() + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + 4096]), body[i:i + 4096])
                          for i in range(0, len(body), 4096)) + b"0\r\n\r\n")
    with socket.create_connection(address(node), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)  # refused early and closed: the answer is still in our receive buffer
        [answer] = read_answers(sock, ["PUT"])
    assert answer.status == 413, answer
    assert json.loads(answer.body) == {
        "error": "value_too_large", "message": f"the value exceeds the limit of {LIMIT} bytes", "limit": LIMIT,
    }
    assert http(node.urls[0], "GET", kv_path("big", r=1)).status == 404


def test_a_declared_oversize_body_is_refused_before_it_is_sent(node: LocalCluster) -> None:
    """With Expect: 100-continue the client need not send a body the node will refuse anyway."""
    with socket.create_connection(address(node), timeout=30) as sock:
        sock.sendall(f"PUT {kv_path('big:expect', w=1)} HTTP/1.1\r\n".encode() + HOST
                     + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))
        reader = sock.makefile("rb")
        answers = read_answers(reader, ["PUT"])
        if answers[0].status == 100:  # aiohttp says 100 Continue before its route refuses the body
            answers += read_answers(reader, ["PUT"])
    assert answers[-1].status == 413 and json.loads(answers[-1].body)["error"] == "value_too_large"


@pytest.mark.parametrize(
    "bad_line",
    [b"GET /kv/a\x01b HTTP/1.1\r\n", b"GET /kv/a HTTP/1.1 extra\r\n", b"GARBAGE\r\n", b"GET  HTTP/1.1\r\n"],
    ids=["control-byte", "extra-token", "no-target", "empty-target"],
)
def test_a_malformed_request_line_is_400_json_after_the_requests_before_it(node: LocalCluster,
                                                                           bad_line: bytes) -> None:
    key = f"before:{bad_line!r}"
    raw = put(key, b"kept") + bad_line + HOST + b"\r\n" + get(key)
    with socket.create_connection(address(node), timeout=30) as sock:
        sock.sendall(raw)
        reader = sock.makefile("rb")
        first = read_answers(reader, ["PUT"])[0]
        if first.status == 400 and node.base_config.server.front_end == "aiohttp":
            # aiohttp refuses the whole read that holds the malformed line, the valid request before
            # it included (it may have been applied: a client sees no answer for it).
            refused = first
        else:
            assert first.status == 204, first
            refused = read_answers(reader, ["GET"])[0]
            assert http(node.urls[0], "GET", kv_path(key, r=1)).body == b"kept"
        assert reader.read(1) == b""  # closed: nothing after a malformed request is read
    assert refused.status == 400 and refused.headers["content-type"].startswith("application/json")
    assert json.loads(refused.body)["error"] == "malformed_request"


def test_http_1_0_and_connection_close_are_honoured(node: LocalCluster) -> None:
    with socket.create_connection(address(node), timeout=30) as sock:
        sock.sendall(f"GET {kv_path('absent')} HTTP/1.0\r\n\r\n".encode())
        [answer] = read_answers(sock, ["GET"])
        assert sock.recv(1) == b""
    assert answer.status == 404


def test_requests_are_counted_in_the_metrics(node: LocalCluster) -> None:
    def count() -> float:
        text = http(node.urls[0], "GET", "/metrics").body.decode()
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('kvstore_requests_total{op="put",status="204"}'))

    before = count()
    exchange(node, b"".join(put(f"metric:{i}", b"m") for i in range(5)) + get("metric:0", b"Connection: close\r\n"),
             ["PUT"] * 5 + ["GET"])
    assert count() == before + 5


# --- the same bytes to both front ends ----------------------------------------------------------

DIFFERENTIAL = {
    "put": put("d:1", b"one"),
    "get": get("d:1"),
    "get-missing": get("d:missing"),
    "bad-quorum": f"GET {kv_path('d:1', r=7)} HTTP/1.1\r\n".encode() + HOST + b"\r\n",
    "unknown-param": b"GET /kv/d:1?color=blue HTTP/1.1\r\n" + HOST + b"\r\n",
    "empty-key": b"GET /kv/ HTTP/1.1\r\n" + HOST + b"\r\n",
    "bad-utf8-key": b"GET /kv/%FF HTTP/1.1\r\n" + HOST + b"\r\n",
    "nul-key": b"GET /kv/a%00b HTTP/1.1\r\n" + HOST + b"\r\n",
    "bad-context": put("d:1", b"two", b"X-Context: %%%\r\n"),
    "forged-context": put("d:1", b"two", b"X-Context: AAAA\r\n"),
    "if-match-eventual": put("d:1", b"two", b'If-Match: "abc"\r\n'),
    "lin-put": b"PUT /kv/d:lin?consistency=linearizable HTTP/1.1\r\n" + HOST + b"If-None-Match: *\r\nContent-Length: 1\r\n\r\nl",
    "lin-put-again": b"PUT /kv/d:lin?consistency=linearizable HTTP/1.1\r\n" + HOST + b"If-None-Match: *\r\nContent-Length: 1\r\n\r\nm",
    "lin-get": b"GET /kv/d:lin?consistency=linearizable HTTP/1.1\r\n" + HOST + b"\r\n",
    "lin-bad-if-match": b"PUT /kv/d:lin?consistency=linearizable HTTP/1.1\r\n" + HOST + b"If-Match: abc\r\nContent-Length: 1\r\n\r\nl",
    "mixed-mode": get("d:lin"),
    "delete": b"DELETE /kv/d:1 HTTP/1.1\r\n" + HOST + b"\r\n",
    "post-kv": b"POST /kv/d:1 HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\n\r\nx",
    "head-kv": b"HEAD /kv/d:1 HTTP/1.1\r\n" + HOST + b"\r\n",
    "no-route": b"GET /nowhere HTTP/1.1\r\n" + HOST + b"\r\n",
    "health": b"GET /health HTTP/1.1\r\n" + HOST + b"\r\n",
    "openapi": b"GET /openapi.json HTTP/1.1\r\n" + HOST + b"\r\n",
    "admin-no-secret": b"POST /admin/repair HTTP/1.1\r\n" + HOST + b"Content-Length: 0\r\n\r\n",
    "timeout-param": f"GET {kv_path('d:1', timeout_ms=0)} HTTP/1.1\r\n".encode() + HOST + b"\r\n",
    "too-large": put("d:big", b"x" * (LIMIT + 1)),
    "gzip-chunked-te": (b"PUT /kv/d:te HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\n\r\n"),
}
# Headers whose value legitimately differs between two nodes or two moments.
VOLATILE = {"date", "server", "x-context", "connection", "keep-alive"}


def comparable(reply: Reply) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in sorted(reply.headers.items()) if k not in VOLATILE}
    return reply.status, headers, reply.body


def test_both_front_ends_give_the_same_answers(both: dict[str, LocalCluster]) -> None:
    differences = []
    for name, raw in DIFFERENTIAL.items():
        method = raw.split(b" ", 1)[0].decode()
        got = {fe: comparable(exchange(c, raw.replace(HOST, HOST + b"Connection: close\r\n", 1), [method])[0])
               for fe, c in both.items()}
        if got["aiohttp"] != got["httptools"]:
            differences.append(f"{name}: aiohttp {got['aiohttp']!r}\n   httptools {got['httptools']!r}")
    assert differences == [], "\n".join(differences)


# --- a client that goes away ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=FRONT_ENDS)
def durable_node(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    cluster = LocalCluster(1, 1, r=1, w=1, data_dir=str(tmp_path_factory.mktemp(f"durable-{request.param}")),
                           ap=FAST_AP, storage="sqlite", fsync="batch", front_end=request.param)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def puts_answered(cluster: LocalCluster) -> float:
    text = http(cluster.urls[0], "GET", "/metrics").body.decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('kvstore_requests_total{op="put",status="204"}'))


def test_a_client_that_resets_mid_write_does_not_cancel_it(durable_node: LocalCluster) -> None:
    """The write in progress when its client resets the connection runs to its end (as aiohttp
    lets a handler finish): the node counts its 204 and stores the value; only the answer is lost."""
    faults = {"X-Cluster-Secret": durable_node.secret}
    slow = http(durable_node.urls[0], "PUT", "/admin/storage-faults", body=json.dumps({"fsync_delay_ms": 1500}).encode(),
                headers=faults)
    assert slow.status == 200, slow
    before = puts_answered(durable_node)
    try:
        sock = socket.create_connection(address(durable_node), timeout=30)
        sock.sendall(put("reset:mid-write", b"landed").replace(b"w=1", b"w=1&timeout_ms=20000"))
        time.sleep(0.3)  # the write now waits for its fsync (1.5 s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset: the node loses the connection while the write is in progress
    finally:
        cleared = http(durable_node.urls[0], "DELETE", "/admin/storage-faults", headers=faults)
        assert cleared.status == 200, cleared
    deadline = time.monotonic() + 30
    while puts_answered(durable_node) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert puts_answered(durable_node) == before + 1  # the request ran to its 204 (a cancelled one is never counted)
    assert http(durable_node.urls[0], "GET", kv_path("reset:mid-write", r=1)).body == b"landed"
