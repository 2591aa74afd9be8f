"""Integration (issue 14, part 2): status tells the truth about refused links, with real processes.

The scenarios of the issue: a 4th node whose member list has the cluster but whom the cluster does
not list, and a member restarted with a wrong secret; plus a peer speaking another protocol version.
Every node is a real process on 127.0.0.1; every wait has a deadline and no assertion depends on
speed (the log-volume bound is measured against the number of refusals the node itself counted).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from kvstore.config import Member
from kvstore.harness.local_cluster import LocalCluster, free_ports, stop_processes
from kvstore.ratelog import RateLimitedLog
from kvstore.transport.base import PeerUnavailable
from kvstore.transport.stream import StreamTransport
from tests.conftest import FAST_AP, http, kv_path
from tests.node_process import cluster_doc, member, start_node_process, wait_for

pytestmark = pytest.mark.integration

RATE_LIMIT_INTERVAL_S = 10.0
assert RateLimitedLog.__init__.__defaults__ is not None
assert RateLimitedLog.__init__.__defaults__[0] == RATE_LIMIT_INTERVAL_S  # what the log bound below assumes


def status_text(url: str, *extra: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "kvstore", "status", "--node", url, *extra],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(3, 3, data_dir=str(tmp_path_factory.mktemp("links")), ap=FAST_AP, log_level="INFO")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_a_node_the_cluster_does_not_list_sees_refused_links_and_the_cluster_sees_it_knock(
    cluster3: LocalCluster,
) -> None:
    http_port, peer_port = free_ports(2)
    newcomer = Member("n4", "127.0.0.1", http_port, peer_port)
    cfg = replace(cluster3.base_config, node_id="n4", members=(*cluster3.base_config.members, newcomer),
                  initial_cluster_state="new")
    started = time.monotonic()
    proc = start_node_process(cfg, cluster3.data_dir)
    try:
        peers = ["n1", "n2", "n3"]

        def all_refused() -> bool:
            doc = cluster_doc(newcomer.url)
            return all(member(doc, p)["state"] == "refused" for p in peers)

        wait_for("n4 sees every member refuse its link", all_refused)
        # From then on, never "up" (the detector alone would say "up, phi 0.00" for 5 s: it never
        # heard from them), and the reason is the one the members sent.
        sample_until = time.monotonic() + 2.0
        while time.monotonic() < sample_until:
            doc = cluster_doc(newcomer.url)
            for p in peers:
                view = member(doc, p)
                assert view["state"] == "refused" and view["phi"] is None, view
                refusal = view["link"]["they_refuse_us"]
                assert refusal["code"] == "unknown_member" and "'n4'" in refusal["message"], view
                assert refusal["count"] >= 1 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", refusal["since"])
            time.sleep(0.1)

        # The members list it as a refused stranger, and stay healthy among themselves.
        def n4_listed() -> dict[str, Any] | None:
            doc = cluster_doc(cluster3.url("n1"))
            found = [s for s in doc["refused_peers"] if s["id"] == "n4"]
            return found[0] if found and found[0]["count"] >= 10 else None

        stranger = wait_for("n1 lists n4 as a refused non-member", n4_listed)
        assert stranger["code"] == "unknown_member" and stranger["address"].startswith("127.0.0.1:")
        n1_view = cluster_doc(cluster3.url("n1"))
        assert {m["id"]: m["state"] for m in n1_view["members"]} == {"n1": "up", "n2": "up", "n3": "up"}
        assert all(m["link"] == {"they_refuse_us": None, "we_refuse_them": None}
                   for m in n1_view["members"] if m["id"] != "n1")

        # n4 knows it cannot reach a quorum: it refuses at once, and says nothing was applied.
        reply = http(newcomer.url, "PUT", kv_path("k", w=2), b"v")
        assert reply.status == 503, reply
        body = reply.json()
        assert isinstance(body, dict) and body["indeterminate"] is False, body

        text = status_text(newcomer.url)
        assert re.search(r"n1 .*refused .*refuses us: unknown_member", text), text
        assert "it refuses us: unknown_member since" in text, text
        assert "refused a non-member: 'n4' unknown_member" in status_text(cluster3.url("n1")), text

        # The log: a warning line, not a traceback per heartbeat, however often n4 knocks.
        knocks = cluster_doc(cluster3.url("n1"))["refused_peers"][0]["count"]
        elapsed_s = time.monotonic() - started
        allowed = 1 + int(elapsed_s / RATE_LIMIT_INTERVAL_S) + 1
        for node_id in peers:
            log_text = cluster3.log_path(node_id).read_text(errors="replace")
            assert "Traceback" not in log_text
            about_n4 = [line for line in log_text.splitlines() if "'n4'" in line]
            assert 1 <= len(about_n4) <= allowed < knocks, (len(about_n4), knocks, about_n4)
        n4_log = (cluster3.data_dir / "n4" / "node.log").read_text(errors="replace")
        assert "Traceback" not in n4_log
        for p in peers:
            lines = [line for line in n4_log.splitlines() if f"peer {p} handshake refused" in line]
            assert 1 <= len(lines) <= allowed, (p, lines)
    finally:
        stop_processes([proc])


def test_a_member_with_a_wrong_secret_is_refused_both_ways_until_fixed(cluster3: LocalCluster) -> None:
    cluster3.terminate("n3")
    wrong = replace(cluster3.base_config, node_id="n3", secret="not-the-cluster-secret",
                    initial_cluster_state="existing")
    proc = start_node_process(wrong, cluster3.data_dir)
    try:
        def n1_refuses_n3_both_ways() -> dict[str, Any] | None:
            view = member(cluster_doc(cluster3.url("n1")), "n3")
            link = view["link"]
            return view if link["they_refuse_us"] and link["we_refuse_them"] else None

        view = wait_for("n1 sees n3's link refused both ways", n1_refuses_n3_both_ways)
        assert view["state"] == "refused"
        assert view["link"]["they_refuse_us"]["code"] == "unauthorized"
        assert view["link"]["we_refuse_them"]["code"] == "unauthorized"
        assert view["link"]["we_refuse_them"]["address"].startswith("127.0.0.1:")

        def n3_refused_by_all() -> bool:
            doc = cluster_doc(cluster3.url("n3"))
            return all(member(doc, p)["state"] == "refused" for p in ("n1", "n2"))

        wait_for("n3 sees n1 and n2 refuse it", n3_refused_by_all)
        assert "both ways: unauthorized" in status_text(cluster3.url("n1"))
        doc = json.loads(status_text(cluster3.url("n3"), "--json"))
        assert member(doc, "n1")["link"]["they_refuse_us"]["message"] == "wrong cluster secret"
    finally:
        stop_processes([proc])
    cluster3.restart("n3")  # its own node.toml again: the right secret

    def n3_back() -> bool:
        view = member(cluster_doc(cluster3.url("n1")), "n3")
        return view["state"] == "up" and view["link"] == {"they_refuse_us": None, "we_refuse_them": None}

    wait_for("n1 sees n3 up again with a clear link", n3_back)


def test_a_peer_speaking_another_protocol_version_is_shown_refused(cluster3: LocalCluster) -> None:
    """A transport in this test process claims to be n2 with protocol 2 (a newer node)."""
    cfg = cluster3.base_config
    n1 = cfg.member("n1")

    async def knock() -> str:
        newer = StreamTransport("n2", cfg.secret, {"n1": (n1.host, n1.peer_port)}, ("127.0.0.1", free_ports(1)[0]),
                                protocol_version=2)
        try:
            with pytest.raises(PeerUnavailable) as refused:
                await newer.call("n1", {"op": "ping"}, 10.0)
            return refused.value.reason
        finally:
            await newer.close()

    reason = asyncio.run(knock())
    assert "version_mismatch" in reason and "peer protocol 1" in reason
    view = member(cluster_doc(cluster3.url("n1")), "n2")
    assert view["state"] == "refused", view
    refusal = view["link"]["we_refuse_them"]
    assert refusal["code"] == "version_mismatch" and refusal["address"].startswith("127.0.0.1:"), view
