"""Pure parts of the netns mode: names and addresses, the ip commands, subnet choice, nft scripts.

Nothing here needs root: the live half is tests/test_integration_netns.py.
"""

from __future__ import annotations

import ipaddress
import random
import re

import pytest

from kvstore.harness.nemesis import PARTITION_KINDS, grudge_to_rules, partition_grudge
from kvstore.harness.netns import NetnsLayout, NetnsNetwork, choose_subnet, creation_commands
from kvstore.harness.nft_nemesis import HEAL_SCRIPT, NFT_TABLE, cut_addresses, nft_script

NODES = ["n1", "n2", "n3", "n4", "n5"]
ADDRESS = {n: f"10.213.7.{i}" for i, n in enumerate(NODES, start=1)}


def layout(nodes: int = 5, tag: str = "a1b2c3") -> NetnsLayout:
    return NetnsLayout(tag, tuple(NODES[:nodes]), ipaddress.IPv4Network("10.213.7.0/24"))


def test_layout_names_and_addresses() -> None:
    lay = layout()
    assert lay.switch == "kvns-a1b2c3-sw" and lay.root_link == "kvns-a1b2c3-h"
    assert len(lay.root_link) <= 15, "a Linux interface name has at most 15 bytes"
    assert [lay.namespace(n) for n in NODES] == [f"kvns-a1b2c3-{n}" for n in NODES]
    assert [lay.address(n) for n in NODES] == [ADDRESS[n] for n in NODES]
    assert lay.client_address == "10.213.7.254" and lay.client_address not in ADDRESS.values()
    assert lay.namespaces[0] == lay.switch and len(lay.namespaces) == 6


def test_creation_commands_build_one_bridge_one_uplink_one_veth_per_node() -> None:
    cmds = [" ".join(c) for c in creation_commands(layout(3))]
    assert cmds[0] == "ip netns add kvns-a1b2c3-sw", "the switch namespace comes first"
    assert "ip -n kvns-a1b2c3-sw link add br0 type bridge" in cmds
    assert "ip link add kvns-a1b2c3-h type veth peer name uplink netns kvns-a1b2c3-sw" in cmds
    assert "ip addr add 10.213.7.254/24 dev kvns-a1b2c3-h" in cmds
    for i, node in enumerate(["n1", "n2", "n3"], start=1):
        ns = f"kvns-a1b2c3-{node}"
        assert f"ip netns add {ns}" in cmds
        assert f"ip -n kvns-a1b2c3-sw link add p{i} type veth peer name eth0 netns {ns}" in cmds
        assert f"ip -n kvns-a1b2c3-sw link set dev p{i} master br0" in cmds
        assert f"ip -n {ns} addr add 10.213.7.{i}/24 dev eth0" in cmds
        assert cmds.index(f"ip netns add {ns}") < cmds.index(f"ip -n {ns} addr add 10.213.7.{i}/24 dev eth0")
    # Only the uplink's root end lives in the root namespace: nothing else is created there.
    root = [c for c in cmds if c.startswith("ip ") and not c.startswith(("ip -n ", "ip netns "))]
    assert all("kvns-a1b2c3-h" in c for c in root), root


@pytest.mark.parametrize(("used", "expected"), [
    ([], "10.213.0.0/24"),
    (["192.0.2.0/24", "10.213.0.0/24"], "10.213.1.0/24"),
    (["10.213.0.0/23"], "10.213.2.0/24"),
    (["10.213.0.0/24", "10.213.2.0/24"], "10.213.1.0/24"),
    (["10.0.0.0/8"], None),  # a route covering the whole pool: no subnet is free
])
def test_choose_subnet_skips_every_overlapping_route(used: list[str], expected: str | None) -> None:
    nets = [ipaddress.IPv4Network(u) for u in used]
    if expected is None:
        with pytest.raises(Exception, match="in use"):
            choose_subnet(nets)
    else:
        assert str(choose_subnet(nets)) == expected


def test_a_network_that_was_never_created_has_nothing_to_destroy() -> None:
    NetnsNetwork(NODES).destroy()  # no layout: no command is run (this would need root otherwise)


def dropped(grudge: dict[str, set[str]], sender: str, receiver: str) -> bool:
    """Whether a packet sender -> receiver is dropped by the nft rules of either end."""
    recv_in, _ = cut_addresses(grudge, receiver, ADDRESS)
    _, send_out = cut_addresses(grudge, sender, ADDRESS)
    return ADDRESS[sender] in recv_in or ADDRESS[receiver] in send_out


@pytest.mark.parametrize("kind", PARTITION_KINDS)
@pytest.mark.parametrize("seed", range(5))
def test_nft_rules_cut_exactly_the_grudge_like_the_in_process_rules(kind: str, seed: int) -> None:
    grudge, _ = partition_grudge(kind, NODES, random.Random(seed))
    rules = grudge_to_rules(grudge)
    for sender in NODES:
        for receiver in NODES:
            if sender == receiver:
                continue
            assert dropped(grudge, sender, receiver) == (sender in grudge[receiver]), (kind, sender, receiver)
            # The same two ends as the in-process layer: drop_in at the receiver, drop_out at the sender.
            recv_in, _ = cut_addresses(grudge, receiver, ADDRESS)
            _, send_out = cut_addresses(grudge, sender, ADDRESS)
            assert (ADDRESS[sender] in recv_in) == bool(rules[receiver].get(sender, {}).get("drop_in"))
            assert (ADDRESS[receiver] in send_out) == bool(rules[sender].get(receiver, {}).get("drop_out"))


@pytest.mark.parametrize("kind", PARTITION_KINDS)
def test_nft_script_touches_only_our_table_and_never_a_client(kind: str) -> None:
    grudge, _ = partition_grudge(kind, NODES, random.Random(1))
    for node in NODES:
        script = nft_script(grudge, node, ADDRESS)
        assert "flush ruleset" not in script
        for line in script.splitlines():
            # Every command names our table (chain declarations sit inside its block).
            assert f"inet {NFT_TABLE}" in line or line.strip().startswith(("chain ", "}")), line
        addresses = set(re.findall(r"\d+\.\d+\.\d+\.\d+", script))
        assert addresses <= set(ADDRESS.values()), "rules name node addresses only: clients are never cut"


def test_a_node_without_cuts_gets_the_heal_script() -> None:
    grudge, desc = partition_grudge("bridge", NODES, random.Random(2))
    assert nft_script(grudge, desc["bridge"], ADDRESS) == HEAL_SCRIPT  # the bridge node keeps every link
    assert nft_script({}, "n1", ADDRESS) == HEAL_SCRIPT
    assert HEAL_SCRIPT.splitlines() == [f"table inet {NFT_TABLE} {{}}", f"delete table inet {NFT_TABLE}"]


def test_one_way_script_drops_only_into_the_deaf_node() -> None:
    grudge, desc = partition_grudge("one-way", NODES, random.Random(3))
    deaf = desc["deaf"]
    others = sorted(ADDRESS[n] for n in NODES if n != deaf)
    script = nft_script(grudge, deaf, ADDRESS)
    assert f"input ip saddr {{ {', '.join(others)} }} drop" in script
    assert "output ip daddr" not in script, "the deaf node may still send"
    for node in NODES:
        if node != deaf:
            assert nft_script(grudge, node, ADDRESS).count("drop") == 1
            assert f"output ip daddr {{ {ADDRESS[deaf]} }} drop" in nft_script(grudge, node, ADDRESS)


def test_unavailable_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvstore.harness.netns as netns

    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "need root" in (netns.unavailable_reason() or "")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: None if name == "nft" else f"/usr/sbin/{name}")
    assert "nftables" in (netns.unavailable_reason() or "")
    monkeypatch.setattr(netns.shutil, "which", lambda name: f"/usr/sbin/{name}")
    assert netns.unavailable_reason() is None


def test_netns_cluster_refuses_clearly_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvstore.harness.netns as netns
    from kvstore.harness.local_cluster import ClusterError

    monkeypatch.setattr(netns, "unavailable_reason", lambda: "network namespaces need root")
    with pytest.raises(ClusterError, match="--netns: network namespaces need root"):
        netns.NetnsCluster(3, 3)
