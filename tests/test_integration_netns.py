"""Real network partitions: nodes in network namespaces, links cut by nftables (kvstore/harness/netns.py,
kvstore/harness/nft_nemesis.py).  Needs Linux, root, ``ip`` and ``nft``; skipped with the reason otherwise.

Every network gets a fresh random tag, so runs never share names; every test removes what it made
(namespaces, veths, node processes) in a ``finally``, and checks it did.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import APSettings, Limits
from kvstore.harness.nemesis import PARTITION_KINDS, partition_grudge
from kvstore.harness.netns import (
    NetnsCluster,
    NetnsError,
    NetnsNetwork,
    existing_namespaces,
    probe_reason,
    run,
)
from kvstore.harness.nft_nemesis import NFT_TABLE, NftClusterControl, control_for
from tests.conftest import http, kv_path

SKIP_REASON = probe_reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(SKIP_REASON is not None, reason=f"netns tests: {SKIP_REASON}"),
]

FAST_AP = APSettings(heartbeat_interval_ms=100, anti_entropy_interval_s=3600.0)
SHORT_LIMITS = Limits(request_timeout_ms=1000, replica_timeout_ms=500)
UNRELATED_TABLE = "kvtest_unrelated"


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.1)


def ours(tag: str) -> list[str]:
    return [ns for ns in existing_namespaces() if ns.startswith(f"kvns-{tag}-")]


def root_links() -> str:
    return run(["ip", "-o", "link", "show"])


def assert_gone(tag: str, pids: list[int]) -> None:
    assert ours(tag) == [], "every namespace of the network is deleted"
    assert f"kvns-{tag}-" not in root_links(), "the root end of the uplink is gone too"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[NetnsCluster]:
    cluster = NetnsCluster(3, 3, data_dir=str(tmp_path / "c3"), ap=FAST_AP, limits=SHORT_LIMITS)
    try:
        cluster.start()
        yield cluster
    finally:
        pids = [p.pid for p in cluster.procs.values()]
        cluster.stop()
        assert_gone(cluster.network.tag, pids)


def nft_ruleset(network: NetnsNetwork, node: str) -> str:
    return network.run_in(node, ["nft", "list", "ruleset"])


# --- the wire --------------------------------------------------------------------------------------


def test_each_node_is_its_own_host_and_clients_reach_it_from_the_root_namespace(cluster3: NetnsCluster) -> None:
    root_netns = os.readlink("/proc/self/ns/net")
    netns_of = {n: os.readlink(f"/proc/{cluster3.pid(n)}/ns/net") for n in cluster3.node_ids}
    assert len(set(netns_of.values())) == 3 and root_netns not in netns_of.values()
    layout = cluster3.network.describe()
    for node in cluster3.node_ids:
        address = layout["nodes"][node]["address"]
        assert cluster3.url(node) == f"http://{address}:7001", "every node serves on its own address"
        assert address in cluster3.network.run_in(node, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    # A write on one node is read on another: peers reach each other over the bridge.
    assert http(cluster3.url("n1"), "PUT", kv_path("wire", w=3), b"v").status == 204
    got = http(cluster3.url("n3"), "GET", kv_path("wire", r=3))
    assert (got.status, got.body) == (200, b"v")
    members = json.loads(http(cluster3.url("n2"), "GET", "/cluster").body)["members"]
    assert {m["url"] for m in members} == {cluster3.url(n) for n in cluster3.node_ids}


def test_a_failing_test_still_removes_namespaces_veths_and_processes(tmp_path: Path) -> None:
    cluster = NetnsCluster(3, 3, data_dir=str(tmp_path / "c"), ap=FAST_AP)
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed"), cluster:
        pids = [cluster.pid(n) for n in cluster.node_ids]
        assert len(ours(cluster.network.tag)) == 4, "a switch and three nodes"
        raise RuntimeError("the test failed")
    assert pids
    assert_gone(cluster.network.tag, pids)


def test_a_network_that_fails_half_way_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvstore.harness.netns as netns

    real = netns.creation_commands

    def failing(layout: netns.NetnsLayout) -> list[list[str]]:
        cmds = real(layout)
        return [*cmds[:-3], ["ip", "link", "set", "dev", "kvns-nonexistent", "up"], *cmds[-3:]]

    monkeypatch.setattr(netns, "creation_commands", failing)
    network = NetnsNetwork(["n1", "n2"])
    with pytest.raises(NetnsError, match="kvns-nonexistent"):
        network.create()
    assert_gone(network.tag, [])


# --- every partition shape cuts exactly its grudge, and never a client --------------------------------

PROBER = r"""
import json, select, socket, sys, time
me, port = sys.argv[1], int(sys.argv[2])
targets = json.loads(sys.argv[3])  # name -> address to send to
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", port))
heard = set()
next_send = 0.0
while True:  # until the test closes our stdin
    now = time.monotonic()
    if now >= next_send:
        for address in targets.values():
            try:
                sock.sendto(me.encode(), (address, port))
            except OSError:
                pass  # e.g. EPERM from an nft output drop: that is the cut
        next_send = now + 0.05
    ready, _, _ = select.select([sock, sys.stdin], [], [], 0.05)
    if sys.stdin in ready and not sys.stdin.readline():
        break
    if sock in ready:
        heard.add(sock.recv(64).decode())
        print(json.dumps(sorted(heard)), flush=True)
"""


def probe_links(network: NetnsNetwork, nodes: list[str], expected: dict[str, set[str]],
                client: str, timeout_s: float = 20.0) -> dict[str, set[str]]:
    """Who each node (and the root namespace, ``client``) hears over UDP: every endpoint sends to
    every other one until each has heard at least ``expected``; returns everything heard."""
    port = 17999
    addresses = {n: network.address(n) for n in nodes}
    addresses[client] = network.describe()["client_address"]
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for name in [*nodes, client]:
            targets = {m: a for m, a in addresses.items() if m != name}
            prefix = [] if name == client else network.exec_prefix(name)
            procs[name] = subprocess.Popen([*prefix, sys.executable, "-c", PROBER, name, str(port), json.dumps(targets)],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        heard: dict[str, set[str]] = {name: set() for name in procs}
        deadline = time.monotonic() + timeout_s
        import selectors

        sel = selectors.DefaultSelector()
        for name, proc in procs.items():
            assert proc.stdout is not None
            sel.register(proc.stdout, selectors.EVENT_READ, name)
        while any(not expected[n] <= heard[n] for n in procs) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if line:
                    heard[key.data] = set(json.loads(line))
        # A little longer so a leak through a cut has every chance to show (it can only add to `heard`).
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for key, _ in sel.select(timeout=0.1):
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if line:
                    heard[key.data] = set(json.loads(line))
        return heard
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def test_every_partition_shape_cuts_exactly_its_grudge_and_never_a_client() -> None:
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    network = NetnsNetwork(nodes)
    try:
        network.create()
        control = NftClusterControl(urls={n: f"http://{network.address(n)}:1" for n in nodes}, secret="x" * 16,
                                    network=network)
        client = "client"
        for kind in PARTITION_KINDS:
            grudge, description = partition_grudge(kind, nodes, random.Random(5))
            asyncio.run(control.partition(grudge))
            expected = {n: {m for m in nodes if m != n and m not in grudge[n]} | {client} for n in nodes}
            expected[client] = set(nodes)
            heard = probe_links(network, nodes, expected, client)
            assert heard == expected, (kind, description)
        asyncio.run(control.heal_partition())
        everyone = {n: ({*nodes, "client"} - {n}) for n in [*nodes, "client"]}
        assert probe_links(network, nodes, everyone, "client") == everyone, "healed: every link is back"
        for node in nodes:
            assert NFT_TABLE not in nft_ruleset(network, node)
    finally:
        tag = network.tag
        network.destroy()
        assert_gone(tag, [])


# --- a majority partition on a live cluster --------------------------------------------------------


def lin_get(url: str) -> Any:
    return http(url, "GET", kv_path("lin", consistency="linearizable"))


def test_majority_partition_by_nftables_refuses_linearizable_on_the_minority(cluster3: NetnsCluster) -> None:
    net = cluster3.network
    urls = {n: cluster3.url(n) for n in cluster3.node_ids}
    root_ruleset_before = run(["nft", "list", "ruleset"])
    # Someone else's table and rule in every node's namespace: the nemesis must leave them alone.
    for node in cluster3.node_ids:
        net.run_in(node, ["nft", "-f", "-"],
                   f"table inet {UNRELATED_TABLE} {{\n chain c {{ type filter hook input priority 10; policy accept; }}\n}}\n"
                   f"add rule inet {UNRELATED_TABLE} c ip saddr 192.0.2.123 counter drop\n")
    assert http(urls["n1"], "PUT", kv_path("lin", consistency="linearizable"), b"before").status == 204
    assert http(urls["n1"], "PUT", kv_path("ev", w=3), b"e1").status == 204

    grudge, groups = partition_grudge("majority", cluster3.node_ids, random.Random(1))
    majority, (minority,) = groups[0], groups[1]
    control = control_for(cluster3)
    assert isinstance(control, NftClusterControl)

    async def partition() -> None:
        await control.partition(grudge)
        await control.close()

    asyncio.run(partition())
    for node in cluster3.node_ids:
        ruleset = nft_ruleset(net, node)
        assert f"table inet {NFT_TABLE}" in ruleset and UNRELATED_TABLE in ruleset
    # The minority side: a linearizable request is refused (it cannot reach a majority)...
    refused = lin_get(urls[minority])
    assert refused.status == 503, refused.body
    assert json.loads(refused.body)["error"] in ("quorum_unavailable", "timeout")
    put = http(urls[minority], "PUT", kv_path("lin", consistency="linearizable"), b"minority")
    assert put.status == 503, put.body
    # ... while eventual requests there are answered: the client still reaches its node.
    got = http(urls[minority], "GET", kv_path("ev", r=1))
    assert (got.status, got.body) == (200, b"e1")
    assert http(urls[minority], "PUT", kv_path("ev2", w=1), b"on-minority").status == 204
    # The majority side keeps serving linearizable requests.
    wait_for(lambda: http(urls[majority[0]], "PUT", kv_path("lin", consistency="linearizable"),
                          b"majority").status == 204, 30, "a linearizable write on the majority side")
    assert lin_get(urls[majority[1]]).body == b"majority"

    async def heal() -> None:
        await control.heal_all()
        await control.close()

    asyncio.run(heal())
    # Healed: the minority node answers linearizable reads again, with the majority's write.
    wait_for(lambda: lin_get(urls[minority]).status == 200, 30, "the minority serving linearizable reads again")
    assert lin_get(urls[minority]).body == b"majority"
    # Only our table went away; someone else's survives with its rule, and the root namespace is untouched.
    for node in cluster3.node_ids:
        ruleset = nft_ruleset(net, node)
        assert NFT_TABLE not in ruleset
        assert f"table inet {UNRELATED_TABLE}" in ruleset and "ip saddr 192.0.2.123" in ruleset
    assert run(["nft", "list", "ruleset"]) == root_ruleset_before


# --- the command line --------------------------------------------------------------------------------


def test_cluster_up_netns_serves_is_partitioned_by_chaos_and_cleans_up(tmp_path: Path) -> None:
    up = subprocess.Popen([sys.executable, "-m", "kvstore", "cluster", "up", "--netns", "--nodes", "3",
                           "--data-dir", str(tmp_path / "data")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines: list[str] = []
    tag = None
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops every node" in line:
                break
        text = "".join(lines)
        assert "Ctrl-C stops every node" in text, text
        urls = re.findall(r"^\s+n\d\s+(http://[\d.]+:7001)", text, re.M)
        secret = re.search(r"cluster secret \(admin routes\): (\S+)", text)
        namespaces = re.search(r"network namespaces (kvns-(\w+)-n1) ", text)
        assert len(urls) == 3 and secret and namespaces, text
        tag = namespaces.group(2)
        kv = [sys.executable, "-m", "kvstore"]
        put = subprocess.run([*kv, "put", "greeting", "hello", "--node", urls[0]], capture_output=True, text=True,
                             timeout=60)
        assert put.returncode == 0, put.stderr
        got = subprocess.run([*kv, "get", "greeting", "--node", urls[2]], capture_output=True, timeout=60)
        assert (got.returncode, got.stdout) == (0, b"hello"), got.stderr
        # A chaos scenario attached to this cluster cuts it with nftables and judges the history.
        chaos = subprocess.run([*kv, "chaos", "majority-partition", "--netns", "--nodes", ",".join(urls),
                                "--secret", secret.group(1), "--mode", "linearizable", "--duration", "4",
                                "--clients", "3", "--rate", "30", "--out", str(tmp_path / "run")],
                               capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert chaos.returncode == 0, chaos.stdout[-2000:] + chaos.stderr[-2000:]
        assert "LINEARIZABLE" in chaos.stdout and "NOT LINEARIZABLE" not in chaos.stdout, chaos.stdout[-2000:]
        run_info = json.loads((tmp_path / "run" / "run.json").read_text())
        assert run_info["cluster"]["netns"]["network"]["tag"] == tag
        events = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
        assert any(e.get("f") == "start-partition" for e in events)
        assert len(ours(tag)) == 4, "the chaos run healed but left the cluster's network alone"
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(up.pid, signal.SIGKILL)
            up.wait(timeout=10)
        if tag is not None:
            left = ours(tag)
            for ns in left:  # only if `cluster up` failed to: the assertion below still fails the test
                for pid in run(["ip", "netns", "pids", ns]).split():
                    os.kill(int(pid), signal.SIGKILL)
                run(["ip", "netns", "delete", ns])
            assert left == [], "cluster up --netns removes its namespaces when stopped"
            assert f"kvns-{tag}-" not in root_links()


# --- the bar: the same table shape as the in-process partition ----------------------------


def table_shape(cell: dict[str, Any]) -> tuple[str, str, str | None]:
    """What the explorer's table says about one cell, in words: each side available or refusing
    during the fault, and for the linearizable mode whether the checker found it linearizable (the
    AP modes' verdict is not part of the shape: a short run may happen to stay linearizable)."""

    def side(availability: float | None) -> str:
        if availability is None:
            return "no ops"
        return "available" if availability >= 0.8 else "refuses" if availability <= 0.2 else "partial"

    verdict = cell["linearizable"] if cell["mode"] == "linearizable" else None
    return side(cell["availability_fault_majority"]), side(cell["availability_fault_minority"]), verdict


def explore(tmp_path: Path, name: str, *extra: str) -> dict[tuple[str, str], dict[str, Any]]:
    out = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore", "explore", *extra, "--modes", "eventual,linearizable",
         "--scenarios", "majority-partition", "--duration", "5", "--seed", "11", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # the explorer's cluster directories land here too
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    netns = "--netns" in extra
    assert results["meta"]["partitions"] == ("nftables in network namespaces" if netns else "in-process fault layer")
    for cell in results["cells"]:
        assert cell["error"] is None, cell["error"]
        assert cell["ops"]["total"] > 50, "the run did real work"
        run_info = json.loads((Path(cell["dir"]) / "run.json").read_text())
        assert ("netns" in run_info["cluster"]) == netns
        assert all(url.startswith("http://10.213." if netns else "http://127.0.0.1:")
                   for url in run_info["cluster"]["urls"].values())
    return {(c["mode"], c["scenario"]): c for c in results["cells"]}


def test_a_majority_partition_by_nftables_gives_the_same_table_shape_as_in_process(tmp_path: Path) -> None:
    in_process = explore(tmp_path, "in-process")
    netns = explore(tmp_path, "netns", "--netns")
    assert set(in_process) == set(netns) == {("eventual", "majority-partition"), ("linearizable", "majority-partition")}
    for cell in netns.values():
        assert cell["minority_nodes"] and all(re.fullmatch(r"n\d", n) for n in cell["minority_nodes"])
    shapes = {k: (table_shape(in_process[k]), table_shape(netns[k])) for k in in_process}
    for key, (expected, got) in shapes.items():
        assert got == expected, f"{key}: in-process {expected}, netns {got}"
    # And the shape is the CAP trade-off itself, not two equally broken runs.
    assert shapes[("linearizable", "majority-partition")][1] == ("available", "refuses", "true")
    assert shapes[("eventual", "majority-partition")][1][:2] == ("available", "available")
