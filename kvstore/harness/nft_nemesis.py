"""Partitions made by the kernel: nftables rules inside each node's network namespace.

Theory of operation
-------------------
With ``--netns`` every node is its own host on a bridge (``kvstore/harness/netns.py``).  The partition
shapes are the same pure grudges as in-process (``kvstore.harness.nemesis.partition_grudge``: node -> the
nodes it must not hear from); only how a grudge is enforced changes.  Each node's namespace gets
one table of ours, ``inet kvstore_nemesis``, with two base chains:

* ``input``: drop packets whose source is a node this node holds a grudge against;
* ``output``: drop packets to a node that holds a grudge against this node.

That is the in-process ``drop_in``/``drop_out`` pair moved into the kernel: both ends drop, so a
cut holds as soon as either end has its rules.  Rules match node *addresses*; clients reach the
nodes from the root namespace's address (``.254``), which is never in a rule, so client-to-node
traffic is never cut and clients stay bound to their node, as in Jepsen.

One node's rules are replaced in one ``nft -f`` transaction (the table is declared, its chains
flushed and refilled atomically).  Healing deletes our table only: other tables and rules in the
namespace are never touched and the ruleset is never flushed.

What TCP makes of a one-way cut: the kernel drops *packets* in one direction, and a TCP
connection needs both (SYN/SYN-ACK, data/ACK).  New connections across a one-way cut fail both
ways; on an already open connection the data in the open direction still arrives until the
sender's window is full, but every answer and acknowledgement is lost.  The in-process fault layer
drops whole *messages* instead.  Both are "one node hears nobody": a history from either is judged
the same way.

Latency and loss are not done here (this kernel has no netem): they stay in the nodes' transport
through ``/admin/faults``, inherited from ``ClusterControl``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from kvstore.harness.local_cluster import LocalCluster
from kvstore.harness.nemesis import ClusterControl, Grudge, NemesisError
from kvstore.harness.netns import NetnsCluster, NetnsError, NetnsNetwork

NFT_TABLE = "kvstore_nemesis"
NFT_FAMILY = "inet"

# Declaring a table that exists is a no-op, so "declare, then delete" removes ours whether or not
# it is there, in one transaction, without touching any other table.
HEAL_SCRIPT = f"table {NFT_FAMILY} {NFT_TABLE} {{}}\ndelete table {NFT_FAMILY} {NFT_TABLE}\n"


def cut_addresses(grudge: Grudge, node: str, address: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(sources ``node`` must drop on input, destinations it must drop on output), sorted."""
    deaf_to = sorted({address[s] for s in grudge.get(node, set())})
    unheard_by = sorted({address[r] for r, senders in grudge.items() if node in senders})
    return deaf_to, unheard_by


def nft_script(grudge: Grudge, node: str, address: Mapping[str, str]) -> str:
    """The ``nft -f`` script that gives ``node``'s namespace exactly its part of ``grudge``."""
    drop_from, drop_to = cut_addresses(grudge, node, address)
    if not drop_from and not drop_to:
        return HEAL_SCRIPT
    t = f"{NFT_FAMILY} {NFT_TABLE}"
    lines = [
        f"table {t} {{",
        "  chain input { type filter hook input priority filter; policy accept; }",
        "  chain output { type filter hook output priority filter; policy accept; }",
        "}",
        f"flush chain {t} input",
        f"flush chain {t} output",
    ]
    if drop_from:
        lines.append(f"add rule {t} input ip saddr {{ {', '.join(drop_from)} }} drop")
    if drop_to:
        lines.append(f"add rule {t} output ip daddr {{ {', '.join(drop_to)} }} drop")
    return "\n".join(lines) + "\n"


@dataclass
class NftClusterControl(ClusterControl):
    """``ClusterControl`` whose partitions are nftables rules in the nodes' namespaces.

    Everything else (kill, pause, clock skew, disk faults, latency and loss) is inherited.
    """

    network: NetnsNetwork | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    cut: Grudge = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.network is None or not self.network.created:
            raise NemesisError("the nftables nemesis needs a created network of namespaces")
        self.addresses = {n: self.network.address(n) for n in self.node_ids}

    def _net(self) -> NetnsNetwork:
        assert self.network is not None
        return self.network

    async def _apply(self, grudge: Grudge) -> None:
        scripts = {node: nft_script(grudge, node, self.addresses) for node in self.node_ids}
        results = await asyncio.gather(
            *(asyncio.to_thread(self._net().run_in, node, ["nft", "-f", "-"], script)
              for node, script in scripts.items()),
            return_exceptions=True,
        )
        errors = [f"{node}: {r}" for node, r in zip(scripts, results, strict=True) if isinstance(r, BaseException)]
        if errors:
            raise NemesisError("nft: " + "; ".join(errors))

    async def partition(self, grudge: Grudge) -> None:
        self.cut = {n: set(s) for n, s in grudge.items() if s}
        await self._apply(grudge)

    async def heal_partition(self) -> None:
        """Delete our table in every namespace (only ours)."""
        self.cut = {}
        await self._apply({})

    async def set_rules(self, rules: dict[str, dict[str, dict[str, Any]]]) -> None:
        # The runner ends a partition with set_rules({}): that heals the kernel's cut too.
        if not rules and self.cut:
            await self.heal_partition()
        await super().set_rules(rules)

    async def heal_all(self) -> None:
        errors = []
        try:
            await self.heal_partition()
        except (NemesisError, NetnsError) as exc:
            errors.append(str(exc))
        try:
            await super().heal_all()
        except NemesisError as exc:
            errors.append(str(exc))
        if errors:
            raise NemesisError("; ".join(errors))

    def record(self) -> dict[str, Any]:
        """What run.json says about how partitions were made."""
        return {"partitions": "nftables in network namespaces", "table": f"{NFT_FAMILY} {NFT_TABLE}",
                "network": self._net().describe()}


def control_for(cluster: LocalCluster) -> ClusterControl:
    """The nemesis control for a cluster this harness started: nftables for a ``NetnsCluster``."""
    urls = {n: cluster.url(n) for n in cluster.node_ids}
    if isinstance(cluster, NetnsCluster):
        return NftClusterControl(urls=urls, secret=cluster.secret, local=cluster, network=cluster.network)
    return ClusterControl(urls=urls, secret=cluster.secret, local=cluster)


def attach_control(urls: dict[str, str], secret: str) -> NftClusterControl:
    """The nftables nemesis for a running ``kvstore cluster up --netns`` (``--nodes ... --netns``)."""
    hosts = {node: urlsplit(url).hostname or "" for node, url in urls.items()}
    return NftClusterControl(urls=urls, secret=secret, network=NetnsNetwork.attach(hosts))
