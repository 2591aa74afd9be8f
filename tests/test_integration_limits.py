"""Integration: what an unauthenticated peer or a misbehaving HTTP client can cost a node (issue 11, item 7).

Every test talks raw TCP to real node processes.  The clusters are configured with small limits
so the tests are quick; no assertion depends on speed: a cut must happen within its timeout plus a
generous margin, and never before the timeout (measured from before the first byte we send, so
the node's timer started later than ours).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from kvstore.config import Limits
from kvstore.harness.local_cluster import LocalCluster, free_ports, port_is_free, write_private
from tests.conftest import FAST_AP, FRONT_ENDS, http, kv_path

pytestmark = pytest.mark.integration

MARGIN_S = 10.0  # how late a timer may fire on a busy machine before a test calls it a failure
# How early a timer may seem to fire: the event loop's clock is read once per loop iteration.
TIMER_SLACK_S = 0.1
HEADER_TIMEOUT_S = 1.0
MAX_HTTP_CONNECTIONS = 8
MAX_UNAUTHENTICATED = 4
# Cluster "guarded": a small connection cap and header timeout; idle and hello timeouts so long
# that they cannot be what cuts a connection during a test.
GUARDED_LIMITS = Limits(
    max_http_connections=MAX_HTTP_CONNECTIONS,
    http_header_timeout_ms=int(HEADER_TIMEOUT_S * 1000),
    http_idle_timeout_ms=600_000,
    peer_hello_timeout_ms=600_000,
    max_unauthenticated_peer_connections=MAX_UNAUTHENTICATED,
)
IDLE_TIMEOUT_S = 1.0
HELLO_TIMEOUT_S = 1.0
# Cluster "impatient": short idle and hello timeouts; a header timeout too long to interfere.
IMPATIENT_LIMITS = Limits(
    http_header_timeout_ms=600_000,
    http_idle_timeout_ms=int(IDLE_TIMEOUT_S * 1000),
    peer_hello_timeout_ms=int(HELLO_TIMEOUT_S * 1000),
)


@pytest.fixture(scope="module", params=FRONT_ENDS)
def guarded(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """Two nodes, N=2, so a w=2 write proves that the real peers still authenticate and talk."""
    cluster = LocalCluster(
        2, 2, r=1, w=2, data_dir=str(tmp_path_factory.mktemp("guarded")), ap=FAST_AP, limits=GUARDED_LIMITS,
        front_end=request.param,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module", params=FRONT_ENDS)
def impatient(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        1, 1, r=1, w=1, data_dir=str(tmp_path_factory.mktemp("impatient")), ap=FAST_AP, limits=IMPATIENT_LIMITS,
        front_end=request.param,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# --- helpers ------------------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the node sends until it closes the connection (True) or the deadline (False)."""
    received = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], min(0.5, max(0.0, deadline - time.monotonic())))
        if not ready:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionError:
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


def peer_frame(payload: bytes) -> object:
    (length,) = struct.unpack(">I", payload[:4])
    assert len(payload) == 4 + length, payload
    return msgpack.unpackb(payload[4:], raw=False)


def hello(node: str, secret: str) -> bytes:
    body = msgpack.packb({"node": node, "secret": secret}, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def metric(cluster: LocalCluster, node_id: str, name: str, labels: str = "") -> float:
    text = http(cluster.url(node_id), "GET", "/metrics").body.decode()
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def log_lines(cluster: LocalCluster, node_id: str) -> list[str]:
    return cluster.log_path(node_id).read_text(errors="replace").splitlines()


def quorum_write_works(cluster: LocalCluster, key: str) -> None:
    reply = http(cluster.url("n1"), "PUT", kv_path(key, w=2), body=b"still-works")
    assert reply.status == 204, reply


# --- the peer port ------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the node's RSS from /proc")
def test_huge_hello_lengths_are_refused_before_buffering(guarded: LocalCluster) -> None:
    """Today's main buffered a 16 MiB hello per connection before authenticating (+317 MB for 16)."""
    port = guarded.base_config.member("n1").peer_port
    pid = guarded.pid("n1")
    before = rss_bytes(pid)
    announced = 16 * 1024 * 1024 - 1  # the largest frame the old code accepted
    chunk = b"\x00" * (1024 * 1024)
    peak = before
    socks = []
    try:
        for _ in range(16):
            sock = connect(port)
            socks.append(sock)
            try:
                sock.sendall(struct.pack(">I", announced))
                for _ in range(announced // len(chunk)):
                    sock.sendall(chunk)
            except (ConnectionError, TimeoutError):
                pass  # what we want: the node stopped reading and closed
            peak = max(peak, rss_bytes(pid))
        deadline = time.monotonic() + MARGIN_S
        for sock in socks:
            _, closed = read_until_closed(sock, deadline)
            assert closed, "the node kept an unauthenticated connection with an oversized hello open"
        peak = max(peak, rss_bytes(pid))
    finally:
        for sock in socks:
            sock.close()
    assert peak - before < 32 * 1024 * 1024, f"RSS grew by {(peak - before) / 2**20:.0f} MiB"
    quorum_write_works(guarded, "after-huge-hellos")


def test_a_hello_from_a_non_member_is_refused_with_a_reason(guarded: LocalCluster) -> None:
    port = guarded.base_config.member("n1").peer_port
    with connect(port) as sock:
        sock.sendall(hello("intruder", guarded.secret))
        received, closed = read_until_closed(sock, time.monotonic() + MARGIN_S)
    assert closed
    refusal = peer_frame(received)
    assert isinstance(refusal, dict) and refusal["ok"] is False and refusal["error"] == "unknown_member"
    assert "'intruder'" in refusal["message"] and "not a member" in refusal["message"]
    # The wrong secret learns nothing about the membership.
    with connect(port) as sock:
        sock.sendall(hello("intruder", "not-the-secret"))
        received, closed = read_until_closed(sock, time.monotonic() + MARGIN_S)
    assert closed
    refusal = peer_frame(received)
    assert isinstance(refusal, dict) and refusal["error"] == "unauthorized" and "intruder" not in refusal["message"]
    # One clear line in the node's log, no traceback.
    deadline = time.monotonic() + MARGIN_S
    while not (lines := [line for line in log_lines(guarded, "n1") if "'intruder'" in line]):
        assert time.monotonic() < deadline, "the refusal was not logged"
        time.sleep(0.1)
    assert len(lines) == 1 and "WARNING" in lines[0] and "not a member" in lines[0], lines
    assert not any("Traceback" in line for line in log_lines(guarded, "n1"))
    quorum_write_works(guarded, "after-intruder")


def test_unauthenticated_peer_connections_are_capped(guarded: LocalCluster) -> None:
    """Beyond the cap the oldest waiting connection is closed with a reason (hello timeout: 10 min)."""
    port = guarded.base_config.member("n1").peer_port
    extra = 6
    socks = [connect(port) for _ in range(MAX_UNAUTHENTICATED + extra)]
    try:
        deadline = time.monotonic() + MARGIN_S
        for sock in socks[:extra]:
            received, closed = read_until_closed(sock, deadline)
            assert closed, "a connection beyond the cap of waiting connections was kept open"
            refusal = peer_frame(received)
            assert isinstance(refusal, dict) and refusal["error"] == "too_many_unauthenticated", refusal
        # The real peers authenticate at once and are never among the waiting ones for long.
        quorum_write_works(guarded, "after-many-silent-peers")
    finally:
        for sock in socks:
            sock.close()


def test_a_peer_that_never_says_hello_is_cut_after_the_hello_timeout(impatient: LocalCluster) -> None:
    port = impatient.base_config.member("n1").peer_port
    started = time.monotonic()
    with connect(port) as sock:
        received, closed = read_until_closed(sock, started + HELLO_TIMEOUT_S + MARGIN_S)
    elapsed = time.monotonic() - started
    assert closed and elapsed >= HELLO_TIMEOUT_S
    refusal = peer_frame(received)
    assert isinstance(refusal, dict) and refusal["error"] == "hello_timeout", refusal


# --- the public HTTP port -----------------------------------------------------------------------


def test_slow_headers_are_cut_after_the_header_timeout(guarded: LocalCluster) -> None:
    """Slowloris: the headers trickle in a byte at a time and never end."""
    before = metric(guarded, "n1", "kvstore_http_connections_closed_total", 'reason="header_timeout"')
    port = guarded.base_config.member("n1").http_port
    started = time.monotonic()
    deadline = started + HEADER_TIMEOUT_S + MARGIN_S
    received = b""
    closed = False
    with connect(port) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            while not closed and time.monotonic() < deadline:
                sock.sendall(b"a")
                more, closed = read_until_closed(sock, min(deadline, time.monotonic() + 0.1))
                received += more
        except ConnectionError:
            closed = True
    elapsed = time.monotonic() - started
    assert closed, f"slow headers held the connection for {elapsed:.1f} s"
    assert elapsed >= HEADER_TIMEOUT_S
    if received:  # the 408 is best effort: the client was still sending when the node closed
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"] == "request_timeout"
    after = metric(guarded, "n1", "kvstore_http_connections_closed_total", 'reason="header_timeout"')
    assert after >= before + 1


def read_answer(sock: socket.socket, deadline: float) -> bytes:
    """One whole answer (head and its Content-Length body) from a keep-alive connection."""
    received = b""
    while time.monotonic() < deadline:
        head, sep, rest = received.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(rest) >= length:
                return received
        ready, _, _ = select.select([sock], [], [], 0.5)
        if ready:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the whole answer")
            received += chunk
    raise TimeoutError("no whole answer before the deadline")


def test_a_slow_head_after_a_quick_request_gets_its_own_header_timeout(guarded: LocalCluster) -> None:
    """The header timer is not re-armed per request: one armed for an earlier head must not cut a
    later one before that one's own timeout."""
    port = guarded.base_config.member("n1").http_port
    with connect(port) as sock:
        sock.sendall(f"GET {kv_path('quick-then-slow', r=1)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert read_answer(sock, time.monotonic() + MARGIN_S).startswith(b"HTTP/1.1 404")
        time.sleep(HEADER_TIMEOUT_S / 2)
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        deadline = started + HEADER_TIMEOUT_S + MARGIN_S
        closed = False
        try:
            while not closed and time.monotonic() < deadline:
                sock.sendall(b"a")
                _, closed = read_until_closed(sock, min(deadline, time.monotonic() + 0.1))
        except ConnectionError:
            closed = True
    assert closed
    assert time.monotonic() - started >= HEADER_TIMEOUT_S - TIMER_SLACK_S


def test_the_rest_of_an_unread_body_is_not_taken_for_slow_headers(guarded: LocalCluster) -> None:
    """A request refused before its body was read: aiohttp drains the body, the connection lives on."""
    port = guarded.base_config.member("n1").http_port
    with connect(port) as sock:
        sock.sendall(
            f"PUT {kv_path('unread', w=9)} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n".encode()
            + b"x" * 50
        )
        answer = b""
        while b"}" not in answer:  # the JSON error body ends the response
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 400"), answer
        sock.sendall(b"x" * 50)  # the rest of the body, after the answer
        # Nothing may cut the connection now: waiting longer than the header timeout proves it.
        received, closed = read_until_closed(sock, time.monotonic() + 3 * HEADER_TIMEOUT_S)
        assert (received, closed) == (b"", False)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b"}" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer


def test_idle_connections_beyond_the_cap_make_room_for_a_real_request(guarded: LocalCluster) -> None:
    """1,100 idle connections exhausted the node's descriptors; now the longest idle are closed."""
    port = guarded.base_config.member("n1").http_port
    count = 20
    socks = [connect(port) for _ in range(count)]
    try:
        got = http(guarded.url("n1"), "GET", "/health")
        assert got.status == 200, got
        quorum_write_works(guarded, "after-idle-flood")
        # Whatever else was open, at most MAX_HTTP_CONNECTIONS of ours can still be.
        open_socks = list(socks)
        deadline = time.monotonic() + MARGIN_S
        while len(open_socks) > MAX_HTTP_CONNECTIONS:
            assert time.monotonic() < deadline, f"{len(open_socks)} idle connections still open"
            ready, _, _ = select.select(open_socks, [], [], 0.5)
            for sock in ready:
                try:
                    data = sock.recv(1024)
                except ConnectionError:
                    data = b""
                assert data == b"", data  # an idle connection is closed silently, as keep-alive ones are
                open_socks.remove(sock)
    finally:
        for sock in socks:
            sock.close()
    assert metric(guarded, "n1", "kvstore_http_connections_closed_total", 'reason="idle_evicted"') >= (
        count - MAX_HTTP_CONNECTIONS
    )


def test_when_every_connection_is_working_a_new_one_gets_503(guarded: LocalCluster) -> None:
    """Fill every slot with a request in progress (a PUT whose body has not arrived yet)."""
    port = guarded.base_config.member("n1").http_port
    body = b"x" * 100
    workers = []
    try:
        for i in range(MAX_HTTP_CONNECTIONS):
            sock = connect(port)
            workers.append(sock)
            sock.sendall(
                f"PUT {kv_path(f'slow-body-{i}', w=2)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
            )
        for sock in workers:
            # "100 Continue" proves the node has read this request: the connection is not idle.
            interim = b""
            while b"\r\n\r\n" not in interim:
                chunk = sock.recv(4096)
                assert chunk, "the node closed a connection with a request in progress"
                interim += chunk
            assert interim.startswith(b"HTTP/1.1 100"), interim
        refused = http(guarded.url("n1"), "GET", "/health")
        assert refused.status == 503, refused
        assert refused.headers.get("connection", "").lower() == "close"
        doc = refused.json()
        assert isinstance(doc, dict) and doc["error"] == "overloaded" and doc["indeterminate"] is False
        # The requests in progress are unharmed: they finish when their bodies arrive.
        for sock in workers:
            sock.sendall(body)
        for sock in workers:
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                assert chunk, "the node dropped a request in progress"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 204"), answer
    finally:
        for sock in workers:
            sock.close()
    deadline = time.monotonic() + MARGIN_S
    while (got := http(guarded.url("n1"), "GET", "/health")).status != 200:
        assert time.monotonic() < deadline, got  # the slots free as the node sees the closes
        time.sleep(0.1)


def test_idle_connections_are_closed_after_the_idle_timeout(impatient: LocalCluster) -> None:
    port = impatient.base_config.member("n1").http_port
    # A connection that never sends a byte...
    started = time.monotonic()
    with connect(port) as sock:
        received, closed = read_until_closed(sock, started + IDLE_TIMEOUT_S + MARGIN_S)
    assert closed and received == b"" and time.monotonic() - started >= IDLE_TIMEOUT_S
    # ...and a keep-alive connection after its response.
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received, closed = read_until_closed(sock, started + IDLE_TIMEOUT_S + MARGIN_S)
    assert closed and time.monotonic() - started >= IDLE_TIMEOUT_S
    assert received.startswith(b"HTTP/1.1 200") and b'"status": "ok"' in received


def test_the_idle_timeout_counts_from_the_last_answer(impatient: LocalCluster) -> None:
    """The idle timer is not re-armed per request: one armed after an earlier answer must not close
    the connection before it has been idle for the whole timeout after the last one."""
    port = impatient.base_config.member("n1").http_port
    request = f"GET {kv_path('idle-probe', r=1)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    for _attempt in range(5):  # a machine too slow to ask again within the timeout gets another try
        with connect(port) as sock:
            try:
                sock.sendall(request)
                read_answer(sock, time.monotonic() + MARGIN_S)
                time.sleep(IDLE_TIMEOUT_S / 3)
                asked = time.monotonic()  # the node is idle again only after this request's answer
                sock.sendall(request)
                assert read_answer(sock, time.monotonic() + MARGIN_S).startswith(b"HTTP/1.1 404")
            except ConnectionError:
                continue  # closed as idle before the second request arrived
            _, closed = read_until_closed(sock, asked + IDLE_TIMEOUT_S + MARGIN_S)
            assert closed and time.monotonic() - asked >= IDLE_TIMEOUT_S - TIMER_SLACK_S
            return
    raise AssertionError("no attempt sent two requests within the idle timeout")


# --- no 500 for a bad secret header or an anonymous internal message ----------------------------


def test_a_non_ascii_secret_header_is_401_json(guarded: LocalCluster) -> None:
    url = guarded.url("n1")
    for secret in ("s\u00e9cret", "s\u00e9cret".encode(), b"\xff\xfe"):  # latin-1, UTF-8, not text at all
        reply = http(url, "POST", "/admin/repair", headers={"X-Cluster-Secret": secret})  # type: ignore[dict-item]
        assert reply.status == 401, reply
        assert reply.json() == {
            "error": "unauthorized", "message": "this route needs the cluster secret in X-Cluster-Secret"
        }


def test_an_internal_message_without_a_member_sender_is_400_json(guarded: LocalCluster) -> None:
    url = guarded.url("n1")
    ping = msgpack.packb({"op": "ping"}, use_bin_type=True)
    reply = http(url, "POST", "/internal/msg", body=ping, headers={"X-Cluster-Secret": guarded.secret})
    assert reply.status == 400, reply
    doc = reply.json()
    assert isinstance(doc, dict) and doc["error"] == "invalid_header" and "X-Node" in doc["message"]
    reply = http(url, "POST", "/internal/msg", body=ping,
                 headers={"X-Cluster-Secret": guarded.secret, "X-Node": "intruder"})
    assert reply.status == 400, reply
    doc = reply.json()
    assert isinstance(doc, dict) and doc["error"] == "unknown_member"
    reply = http(url, "POST", "/internal/msg", body=ping, headers={"X-Cluster-Secret": guarded.secret, "X-Node": "n2"})
    # The reply also carries the node's membership version ("cv", docs/membership.md).
    assert reply.status == 200 and msgpack.unpackb(reply.body) == {"ok": True, "cv": 0}


# --- the secret on disk -------------------------------------------------------------------------


def _cluster_up_ports() -> int:
    for _ in range(50):
        (port,) = free_ports(1)
        if port + 100 <= 65535 and port_is_free(port + 100):
            return port
    raise AssertionError("no free pair of ports for kvstore cluster up")


def test_cluster_up_writes_the_secret_readable_by_its_owner_only(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = _cluster_up_ports()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "cluster", "up", "--nodes", "1", "--replicas", "1",
         "--data-dir", str(data_dir), "--base-port", str(port), "--storage", "memory"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        output = b""
        while b"nodes up" not in output:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, output + line
            output += line
        config = data_dir / "n1" / "node.toml"
        assert "secret" in config.read_text()
        assert config.stat().st_mode & 0o777 == 0o600
        assert (data_dir / "n1").stat().st_mode & 0o777 == 0o700
        assert data_dir.stat().st_mode & 0o777 == 0o700
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0


def test_a_config_left_readable_by_an_older_version_is_made_private(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('secret = "old"\n')
    config.chmod(0o644)
    write_private(config, 'secret = "new"\n')
    assert config.stat().st_mode & 0o777 == 0o600 and config.read_text() == 'secret = "new"\n'
