"""Integration: optional TLS for client and peer traffic (issue 14, part 3), with real processes.

A throwaway CA (and a rogue one) is made in the test with the ``openssl`` command; without it the
tests skip and say so.  A TLS cluster serves HTTPS to clients that trust the CA, replicates over
mutual-TLS peer links, and a node whose certificate comes from another CA is refused by its peers,
which /cluster shows on both sides.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import msgpack
import pytest

from kvstore.config import TLSSettings
from kvstore.harness.local_cluster import LocalCluster, free_ports, stop_processes
from kvstore.transport.base import PeerUnavailable
from kvstore.transport.stream import StreamTransport
from tests.conftest import FAST_AP
from tests.node_process import cluster_doc, member, start_node_process, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is needed to make test certificates"),
]


@dataclass
class Pki:
    ca: Path
    node_cert: Path
    node_key: Path
    rogue_cert: Path  # names 127.0.0.1 too, but signed by another CA
    rogue_key: Path
    rogue_ca: Path


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}")
    return cert, key


def make_cert(directory: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "cluster-ca")
    rogue_ca = make_ca(directory, "rogue-ca")
    node_cert, node_key = make_cert(directory, "node", ca)
    rogue_cert, rogue_key = make_cert(directory, "rogue", rogue_ca)
    return Pki(ca[0], node_cert, node_key, rogue_cert, rogue_key, rogue_ca[0])


@pytest.fixture(scope="module")
def tls_cluster(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tls = TLSSettings(cert_file=str(pki.node_cert), key_file=str(pki.node_key), ca_file=str(pki.ca))
    cluster = LocalCluster(3, 3, data_dir=str(tmp_path_factory.mktemp("tls")), ap=FAST_AP, tls=tls, log_level="INFO")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def kvstore_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


def test_a_tls_cluster_serves_https_and_replicates_over_tls(tls_cluster: LocalCluster, pki: Pki) -> None:
    n1, n3 = tls_cluster.url("n1"), tls_cluster.url("n3")
    assert n1.startswith("https://127.0.0.1:")
    put = kvstore_cli("put", "greeting", "hello", "--node", n1, "--cacert", str(pki.ca), "--w", "3")
    assert put.returncode == 0, put.stderr  # w=3: both peers stored it, over mutual-TLS links
    got = kvstore_cli("get", "greeting", "--node", n3, "--cacert", str(pki.ca), "--r", "1")
    assert got.returncode == 0 and got.stdout == "hello", got.stderr
    status = json.loads(kvstore_cli("status", "--node", n1, "--cacert", str(pki.ca), "--json").stdout)
    assert [m["url"] for m in status["members"]] == tls_cluster.urls
    assert all(m["state"] == "up" for m in status["members"])
    # Without the CA, the node's certificate is not trusted; with the wrong CA neither.
    for extra in ([], ["--cacert", str(pki.rogue_ca)]):
        refused = kvstore_cli("get", "greeting", "--node", n1, *extra)
        assert refused.returncode == 1 and "certificate" in refused.stderr.lower(), refused.stderr
    # No plaintext HTTP on the port.
    port = int(n1.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        conn.request("GET", "/health")
        conn.getresponse()
    conn.close()
    # From Python, with the CA.
    context = ssl.create_default_context(cafile=str(pki.ca))
    assert cluster_doc(n1, context)["node"] == "n1"


def test_the_peer_port_requires_tls(tls_cluster: LocalCluster) -> None:
    """A plaintext hello gets no msgpack answer at all: the TLS layer drops it."""
    peer_port = tls_cluster.base_config.member("n1").peer_port
    hello = msgpack.packb({"node": "n2", "secret": tls_cluster.secret, "protocol": 1}, use_bin_type=True)
    with socket.create_connection(("127.0.0.1", peer_port), timeout=10) as sock:
        sock.sendall(struct.pack(">I", len(hello)) + hello)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert not received.startswith(b"\x00\x00"), received  # not a framed msgpack refusal


def _peer_transport(name: str, secret: str, target: tuple[str, int], cert: Path, key: Path, ca: Path) -> StreamTransport:
    tls = TLSSettings(cert_file=str(cert), key_file=str(key), ca_file=str(ca))
    from kvstore.tls import peer_contexts

    server_ssl, client_ssl = peer_contexts(tls)
    return StreamTransport(name, secret, {"n1": target}, ("127.0.0.1", free_ports(1)[0]),
                           server_ssl=server_ssl, client_ssl=client_ssl)


def test_a_peer_with_a_certificate_from_another_ca_is_refused(tls_cluster: LocalCluster, pki: Pki) -> None:
    n1 = tls_cluster.base_config.member("n1")

    async def call(transport: StreamTransport) -> tuple[str, StreamTransport]:
        try:
            with pytest.raises(PeerUnavailable) as refused:
                await transport.call("n1", {"op": "ping"}, 10.0)
            return refused.value.reason, transport
        finally:
            await transport.close()

    # It trusts n1 (right CA) but shows a rogue certificate: n1 rejects it; right secret, right id.
    reason, rogue = asyncio.run(call(_peer_transport("n2", tls_cluster.secret, (n1.host, n1.peer_port),
                                                     pki.rogue_cert, pki.rogue_key, pki.ca)))
    assert "tls_rejected" in reason, reason
    out = rogue.links.refuses_us("n1")
    assert out is not None and out.code == "tls_rejected"
    # It trusts only the rogue CA: it rejects n1's certificate itself.
    reason, picky = asyncio.run(call(_peer_transport("n2", tls_cluster.secret, (n1.host, n1.peer_port),
                                                     pki.rogue_cert, pki.rogue_key, pki.rogue_ca)))
    assert "tls_rejected" in reason and "does not trust" in reason, reason
    assert picky.links.outgoing_blocked("n1") and picky.links.refuses_us("n1") is None


def test_a_member_restarted_with_a_rogue_certificate_shows_refused_both_ways(
    tls_cluster: LocalCluster, pki: Pki,
) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    tls_cluster.terminate("n3")
    rogue_tls = replace(tls_cluster.base_config.tls, cert_file=str(pki.rogue_cert), key_file=str(pki.rogue_key))
    cfg = replace(tls_cluster.base_config, node_id="n3", tls=rogue_tls, initial_cluster_state="existing")
    proc = start_node_process(cfg, tls_cluster.data_dir)
    try:
        def n1_refuses_n3() -> dict[str, object] | None:
            view = member(cluster_doc(tls_cluster.url("n1"), context), "n3")
            return view if view["state"] == "refused" and view["link"]["we_refuse_them"] else None

        view = wait_for("n1 refuses n3's rogue certificate", n1_refuses_n3)
        refusal = view["link"]["we_refuse_them"]  # type: ignore[index]
        assert refusal["code"] == "tls_rejected" and "does not trust" in refusal["message"], view

        rogue_context = ssl.create_default_context(cafile=str(pki.rogue_ca))  # n3 serves the rogue cert

        def n3_refused_by_n1() -> dict[str, object] | None:
            view = member(cluster_doc(tls_cluster.url("n3"), rogue_context), "n1")
            return view if view["state"] == "refused" and view["link"]["they_refuse_us"] else None

        view = wait_for("n3 sees n1 refuse its certificate", n3_refused_by_n1)
        assert view["link"]["they_refuse_us"]["code"] == "tls_rejected", view  # type: ignore[index]
        text = kvstore_cli("status", "--node", tls_cluster.url("n1"), "--cacert", str(pki.ca)).stdout
        assert "we refuse: tls_rejected" in text, text
    finally:
        stop_processes([proc])
    tls_cluster.restart("n3")

    def n3_back() -> bool:
        return bool(member(cluster_doc(tls_cluster.url("n1"), context), "n3")["state"] == "up")

    wait_for("n3 up again with its own certificate", n3_back)
