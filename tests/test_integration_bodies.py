"""Request bodies arrive whole or are refused: no PUT is acknowledged with a truncated value.

Every value is sent over a raw socket in three ways -- the whole request in one write, the body in
slow pieces (separate writes with pauses, so the node sees it arrive in parts), and with chunked
transfer-encoding (chunks written separately) -- in every consistency mode, including linearizable
compare-and-set (``If-Match``) and create (``If-None-Match: *``).  After the 204 the test compares a
hash of the sent bytes with:

* the ``ETag`` the node answered and a read through the public API, and
* the copy stored on *every* replica, read without any coordinator merging copies:
  - eventual/quorum data: the internal ``replica_get`` message posted to each node's
    ``/internal/msg`` route (with the cluster secret); the node answers from its own storage only;
  - linearizable registers: each node's Paxos acceptor state, read straight from its ``paxos.db``
    (sqlite, opened read-only).  A write is acknowledged once a majority accepted it; the late
    accept reaches the third replica in the background, so the test waits (bounded) for all three.

One cluster (3 nodes, N=3: every node is a replica of every key) serves every case.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.client import HTTPResponse
from pathlib import Path

import msgpack
import pytest

from kvstore.client import etag_of
from kvstore.config import Limits
from kvstore.harness.local_cluster import LocalCluster
from kvstore.protocol import versions
from kvstore.protocol.paxos import AcceptorState
from kvstore.protocol.ring import key_token
from tests.conftest import FAST_AP, FRONT_ENDS, Reply, http, kv_path

pytestmark = pytest.mark.integration

LIMIT = Limits().max_value_bytes  # 1 MiB, the node's default
SIZES = [0, 1, 64 * 1024 + 1, 300 * 1024, LIMIT]
WAYS = ["one_write", "slow_pieces", "chunked"]
MODES = ["eventual", "quorum", "linearizable", "linearizable_if_none_match", "linearizable_if_match"]
PAUSE_S = 0.03  # between the pieces of a slow or chunked body: the node sees the body arrive in parts
BODY_IDLE_TIMEOUT_MS = 3000  # far above PAUSE_S, so only the stalled-body test ever meets it
TIMEOUT_MS = 20_000  # generous: a 1 MiB write to three fsyncing replicas on a busy 2-core machine


@pytest.fixture(scope="module", params=FRONT_ENDS)
def cluster3(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    limits = Limits(body_idle_timeout_ms=BODY_IDLE_TIMEOUT_MS)
    cluster = LocalCluster(3, 3, data_dir=str(tmp_path_factory.mktemp("bodies")), ap=FAST_AP, limits=limits,
                           front_end=request.param)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16] + f"/{len(data)}B"


def pieces(body: bytes, count: int = 4) -> list[bytes]:
    step = max(1, -(-len(body) // count))
    return [body[i : i + step] for i in range(0, len(body), step)] or [b""]


def send_raw(url: str, method: str, path: str, body: bytes, way: str, headers: dict[str, str] | None = None,
             timeout_s: float = 60.0) -> Reply:
    """One request over a fresh socket, its body sent ``way``; the node's answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        try:
            if way == "one_write":
                sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            elif way == "slow_pieces":
                sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
                for piece in pieces(body):
                    time.sleep(PAUSE_S)
                    sock.sendall(piece)
            elif way == "chunked":
                sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
                for piece in pieces(body):
                    time.sleep(PAUSE_S)
                    if piece:
                        sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sock.sendall(b"0\r\n\r\n")
            else:
                raise AssertionError(way)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node answered early and closed: its answer is still in our receive buffer
        response = HTTPResponse(sock, method=method)
        response.begin()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        sock.close()


def replica_copy_ap(cluster: LocalCluster, node_id: str, key: str) -> list[bytes]:
    """The live values node ``node_id`` holds for ``key`` in its own storage (no coordinator)."""
    message = msgpack.packb({"op": "replica_get", "key": key, "token": key_token(key)}, use_bin_type=True)
    reply = http(cluster.url(node_id), "POST", "/internal/msg", body=message,
                 headers={"X-Cluster-Secret": cluster.secret, "X-Node": "test",
                          "Content-Type": "application/msgpack"})
    assert reply.status == 200, (reply.status, reply.body[:200])
    blob = msgpack.unpackb(reply.body, raw=False)["obj"]
    return [] if blob is None else list(versions.decode(blob).live_values)


def replica_copy_register(cluster: LocalCluster, node_id: str, key: str) -> bytes | None:
    """The register value node ``node_id``'s acceptor has accepted for ``key`` (None: nothing)."""
    path = Path(cluster.data_dir) / node_id / "paxos.db"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT blob FROM kv WHERE token = ? AND key = ?", (key_token(key), key)).fetchone()
    finally:
        conn.close()
    if row is None:
        return None
    state = AcceptorState.decode(row[0])
    return None if state.value is None else state.value.value


def write_params(mode: str) -> dict[str, object]:
    if mode in ("eventual", "quorum"):
        return {"w": "all", "consistency": mode, "timeout_ms": TIMEOUT_MS}
    return {"consistency": "linearizable", "timeout_ms": TIMEOUT_MS}


def precondition(cluster: LocalCluster, mode: str, key: str) -> dict[str, str]:
    """The headers that make this mode's write; seeds the key when the mode is compare-and-set."""
    if mode == "linearizable_if_none_match":
        return {"If-None-Match": "*"}
    if mode == "linearizable_if_match":
        seeded = http(cluster.urls[0], "PUT", kv_path(key, **write_params(mode)), body=b"seed",
                      headers={"If-None-Match": "*"})
        assert seeded.status == 204, (seeded.status, seeded.body)
        return {"If-Match": seeded.headers["etag"]}
    return {}


def stored_copies(cluster: LocalCluster, mode: str, key: str) -> dict[str, str]:
    """node -> digest of its stored copy; for registers, waits (bounded) for the late accepts."""
    if mode in ("eventual", "quorum"):
        copies = {}
        for node_id in cluster.node_ids:
            live = replica_copy_ap(cluster, node_id, key)
            copies[node_id] = digest(live[0]) if len(live) == 1 else f"{len(live)} live values"
        return copies
    deadline = time.monotonic() + 20.0
    while True:
        held = {n: replica_copy_register(cluster, n, key) for n in cluster.node_ids}
        settled = None not in held.values() and len(set(held.values())) == 1
        if settled or time.monotonic() > deadline:
            return {n: "nothing accepted" if v is None else digest(v) for n, v in held.items()}
        time.sleep(0.1)


@pytest.mark.parametrize("mode", MODES)
def test_every_body_arrives_whole_on_every_replica(cluster3: LocalCluster, mode: str) -> None:
    problems: list[str] = []
    checked = 0
    for way in WAYS:
        for size in SIZES:
            key = f"body:{mode}:{way}:{size}"
            # Not a repeated pattern: a shifted or truncated copy cannot hash the same.
            body = hashlib.shake_256(key.encode()).digest(size) if size else b""
            coordinator = cluster3.urls[(SIZES.index(size) + WAYS.index(way)) % 3]
            headers = precondition(cluster3, mode, key)
            reply = send_raw(coordinator, "PUT", kv_path(key, **write_params(mode)), body, way, headers)
            where = f"{way} {size}B"
            if reply.status != 204:
                problems.append(f"{where}: PUT answered {reply.status} {reply.body[:200]!r}")
                continue
            if reply.headers.get("etag") != etag_of(body):
                problems.append(f"{where}: ETag {reply.headers.get('etag')} is not the sent value's {etag_of(body)}")
            read_params = {"r": "all"} if mode in ("eventual", "quorum") else {"consistency": "linearizable"}
            got = http(cluster3.urls[0], "GET", kv_path(key, **read_params, timeout_ms=TIMEOUT_MS))
            if got.status != 200 or got.body != body:
                problems.append(f"{where}: read back {got.status} {digest(got.body)}, sent {digest(body)}")
            for node_id, copy in stored_copies(cluster3, mode, key).items():
                checked += 1
                if copy != digest(body):
                    problems.append(f"{where}: replica {node_id} holds {copy}, sent {digest(body)}")
    assert problems == [], "\n".join(problems)
    assert checked == len(WAYS) * len(SIZES) * 3  # every replica of every value was compared


@pytest.mark.parametrize("way", WAYS)
def test_one_byte_over_the_limit_is_refused_and_stores_nothing(cluster3: LocalCluster, way: str) -> None:
    for mode in MODES:
        key = f"over:{mode}:{way}"
        headers = precondition(cluster3, mode, key)
        body = b"o" * (LIMIT + 1)
        reply = send_raw(cluster3.urls[1], "PUT", kv_path(key, **write_params(mode)), body, way, headers)
        assert reply.status == 413, (mode, reply.status, reply.body[:200])
        assert json.loads(reply.body) == {
            "error": "value_too_large", "message": f"the value exceeds the limit of {LIMIT} bytes", "limit": LIMIT,
        }
        for node_id in cluster3.node_ids:
            if mode in ("eventual", "quorum"):
                assert replica_copy_ap(cluster3, node_id, key) == [], (mode, node_id)
            else:
                seed = b"seed" if mode == "linearizable_if_match" else None
                assert replica_copy_register(cluster3, node_id, key) in (seed, None), (mode, node_id)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/pid/status")


def test_a_100mb_chunked_body_is_refused_without_buffering_it(cluster3: LocalCluster) -> None:
    """The node answers 413 once the body passes the limit; it never holds the 100 MB."""
    node_id = "n3"
    url = cluster3.url(node_id)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    peak_before_kib = peak_rss_kib(cluster3.pid(node_id))
    total, chunk = 100 * 1024 * 1024, b"z" * (1024 * 1024)
    answered = threading.Event()
    sent = [0]

    sock = socket.create_connection((host, int(port)), timeout=60)

    def sender() -> None:
        try:
            sock.sendall(f"PUT {kv_path('huge', w=2)} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
            while sent[0] < total and not answered.is_set():
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent[0] += len(chunk)
            if not answered.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the node stopped reading and closed: expected once it has refused the body

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        response = HTTPResponse(sock, method="PUT")
        response.begin()
        answered.set()
        status, raw = response.status, response.read()
    finally:
        answered.set()
        thread.join(timeout=60)
        sock.close()
    assert not thread.is_alive()
    assert status == 413, (status, raw[:200])
    assert json.loads(raw)["error"] == "value_too_large"
    growth_mib = (peak_rss_kib(cluster3.pid(node_id)) - peak_before_kib) / 1024
    assert growth_mib < 40, f"the node's peak RSS grew by {growth_mib:.0f} MiB while refusing a 100 MB body"
    assert all(replica_copy_ap(cluster3, n, "huge") == [] for n in cluster3.node_ids)
    assert http(url, "GET", "/health").status == 200


STALLED = {
    "content_length_short": b"Content-Length: 100\r\n\r\n0123456789",
    "chunked_unfinished": b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    # aiohttp's C parser stops feeding a body at a malformed chunk without failing it: the
    # stall is what ends the request.  (When the bad chunk arrives in the same read as the
    # headers, the parser refuses the request at once instead: 400 malformed_request.)
    "chunked_malformed_midway": b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
}


@pytest.mark.parametrize("case", sorted(STALLED))
def test_a_stalled_body_is_refused_with_408_and_stores_nothing(cluster3: LocalCluster, case: str) -> None:
    url = cluster3.urls[2]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    key = f"stalled:{case}"
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"PUT {kv_path(key, w=2)} HTTP/1.1\r\nHost: {host}\r\n".encode() + STALLED[case])
        if case == "chunked_malformed_midway":
            time.sleep(PAUSE_S)  # the node is reading the body by now (or will be when this arrives)
            sock.sendall(b"zz\r\nabc\r\n0\r\n\r\n")
        response = HTTPResponse(sock, method="PUT")
        response.begin()  # the socket timeout bounds this wait
        status, raw = response.status, response.read()
    body = json.loads(raw)
    if case == "chunked_malformed_midway" and status == 400:
        assert body["error"] == "malformed_request" and "chunk" in body["message"], body
    else:
        assert status == 408, (status, raw[:200])
        assert body == {
            "error": "body_timeout",
            "message": f"no body bytes arrived for {BODY_IDLE_TIMEOUT_MS} ms; the request is refused",
        }
        assert response.getheader("Connection", "").lower() == "close"
    assert all(replica_copy_ap(cluster3, n, key) == [] for n in cluster3.node_ids)


def test_a_content_encoded_body_is_decoded_bounded_or_refused(cluster3: LocalCluster) -> None:
    """Content-Encoding: gzip is decoded (the decoded bytes are the value and count against the
    limit); a body that is not what it claims is a 400, not a 500; a bomb is a 413, not 512 MiB."""
    url = cluster3.urls[0]
    value = hashlib.shake_256(b"gzip").digest(200_000)
    ok = send_raw(url, "PUT", kv_path("gzip:ok", w="all"), gzip.compress(value), "one_write",
                  {"Content-Encoding": "gzip"})
    assert ok.status == 204 and ok.headers["etag"] == etag_of(value), ok
    assert all(replica_copy_ap(cluster3, n, "gzip:ok") == [value] for n in cluster3.node_ids)

    bad = send_raw(url, "PUT", kv_path("gzip:bad"), b"not gzip at all", "one_write", {"Content-Encoding": "gzip"})
    assert bad.status == 400 and json.loads(bad.body)["error"] == "malformed_body", bad

    peak_before_kib = peak_rss_kib(cluster3.pid("n1"))
    bomb = gzip.compress(bytes(256 * 1024 * 1024), 9)  # 256 MiB of zeros in about 256 KiB
    refused = send_raw(url, "PUT", kv_path("gzip:bomb"), bomb, "chunked", {"Content-Encoding": "gzip"})
    assert refused.status == 413 and json.loads(refused.body)["error"] == "value_too_large", refused
    growth_mib = (peak_rss_kib(cluster3.pid("n1")) - peak_before_kib) / 1024
    assert growth_mib < 40, f"the node's peak RSS grew by {growth_mib:.0f} MiB decoding a gzip bomb"
    assert all(replica_copy_ap(cluster3, n, key) == [] for n in cluster3.node_ids for key in ("gzip:bad", "gzip:bomb"))
