"""Each node a separate host on the wire: Linux network namespaces, veth pairs and a bridge.

Theory of operation
-------------------
``NetnsCluster`` is a ``LocalCluster`` whose nodes each run in their own network namespace
(``ip netns exec``), with their own address on one Ethernet segment, so that a partition can be
made by the kernel (nftables rules inside a node's namespace, ``kvstore/harness/nft_nemesis.py``) rather
than by the nodes' own transport.  Jepsen does the same with iptables on separate hosts.

The wire, for a network tagged ``T`` on the subnet ``10.213.K.0/24``::

    root namespace (clients: CLI, workload, explorer)
      kvns-T-h 10.213.K.254  ──veth──┐
                                     │   namespace kvns-T-sw (the switch)
                                     └── uplink ─┐
                                         br0 (bridge, no address, no rules)
                         ┌── n1 ─────────────────┼── n2 ── ...
      namespace kvns-T-n1│                        │
        eth0 10.213.K.1 ─┘        kvns-T-n2: eth0 10.213.K.2 ...

The bridge lives in its own namespace, not in the root one, so that whatever firewall the host
runs (Docker's ``FORWARD`` policy, ``br_netfilter``) never sees node-to-node frames, and so that
deleting that one namespace removes the bridge, the uplink and the root side of the veth with it.
Clients reach the nodes from the root namespace through ``kvns-T-h``; their packets come from
``.254``, an address no node has, which is how the nemesis cuts node-to-node traffic only.

Names: every namespace and the root-side interface start with ``kvns-`` and carry a random tag
(interface names have at most 15 bytes: ``kvns-`` + 6 hex digits + ``-h``).  The subnet is the
first ``/24`` of ``10.213.0.0/16`` that no route of the root namespace overlaps; it is chosen and
claimed under a file lock, so clusters started at the same time get different ones.

Cleanup: ``NetnsNetwork.destroy`` deletes every namespace it created (the veths go with them) and
is idempotent; ``NetnsCluster.stop`` stops the node processes by PID first, then destroys the
network, also when stopping the nodes failed.  A network whose creation fails half-way is
destroyed before the error is raised.

Needs Linux, root, ``ip`` (iproute2) and, for partitions, ``nft`` (nftables).  There is no netem
here (the kernel this was built on has none): latency and loss stay in the nodes' transport.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvstore.config import Member, validate
from kvstore.harness.local_cluster import ClusterError, LocalCluster

NAME_PREFIX = "kvns-"
SUBNET_POOL = ipaddress.IPv4Network("10.213.0.0/16")
CLIENT_HOST_OCTET = 254  # the root namespace's address on every network
MAX_NODES = 200  # node i gets .i; .254 is the clients'
LOCK_PATH = Path("/run/kvstore-netns.lock")
COMMAND_TIMEOUT_S = 20.0
DEFAULT_HTTP_PORT = 7001  # every node has its own address, so they can all use the same ports


class NetnsError(ClusterError):
    """A namespace, link or address could not be created or removed (the command's stderr says why)."""


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can (cheap: no probing)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or without --netns)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if shutil.which("nft") is None:
        return "the `nft` command (nftables) is not installed"
    return None


def probe_reason() -> str | None:
    """Like ``unavailable_reason``, and also tries to make (and remove) a namespace with a table in
    it: a container without CAP_SYS_ADMIN or without nf_tables passes the cheap checks but not this."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    name = f"{NAME_PREFIX}{secrets.token_hex(3)}-probe"
    try:
        run(["ip", "netns", "add", name])
        run(["ip", "netns", "exec", name, "nft", "-f", "-"], "table inet kvstore_probe {}\n")
    except NetnsError as exc:
        return f"cannot use network namespaces with nftables here: {exc}"
    finally:
        with contextlib.suppress(NetnsError):
            if name in existing_namespaces():
                run(["ip", "netns", "delete", name])
    return None


def run(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run one command; its stdout, or NetnsError with its stderr."""
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


# --- the layout: names and addresses (pure) ------------------------------------------------------


@dataclass(frozen=True)
class NetnsLayout:
    """Every name and address of one network; a pure value (nothing is created by building it)."""

    tag: str
    node_ids: tuple[str, ...]
    subnet: ipaddress.IPv4Network

    def __post_init__(self) -> None:
        assert self.subnet.prefixlen == 24, "one /24 per network"
        assert 1 <= len(self.node_ids) <= MAX_NODES
        assert len(self.root_link) <= 15, "Linux interface names have at most 15 bytes"

    @property
    def switch(self) -> str:
        return f"{NAME_PREFIX}{self.tag}-sw"

    @property
    def root_link(self) -> str:
        return f"{NAME_PREFIX}{self.tag}-h"

    @property
    def client_address(self) -> str:
        return str(self.subnet.network_address + CLIENT_HOST_OCTET)

    def namespace(self, node_id: str) -> str:
        return f"{NAME_PREFIX}{self.tag}-{node_id}"

    def address(self, node_id: str) -> str:
        return str(self.subnet.network_address + 1 + self.node_ids.index(node_id))

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the network, the switch first."""
        return [self.switch, *(self.namespace(n) for n in self.node_ids)]

    def describe(self) -> dict[str, Any]:
        return {
            "subnet": str(self.subnet),
            "client_address": self.client_address,
            "switch_namespace": self.switch,
            "nodes": {n: {"namespace": self.namespace(n), "address": self.address(n)} for n in self.node_ids},
        }


def creation_commands(layout: NetnsLayout) -> list[list[str]]:
    """The ``ip`` commands that build the wire drawn in the module docstring, in order."""
    sw = layout.switch
    prefix = layout.subnet.prefixlen
    cmds = [
        ["ip", "netns", "add", sw],
        ["ip", "-n", sw, "link", "set", "dev", "lo", "up"],
        ["ip", "-n", sw, "link", "add", "br0", "type", "bridge"],
        ["ip", "-n", sw, "link", "set", "dev", "br0", "up"],
        ["ip", "link", "add", layout.root_link, "type", "veth", "peer", "name", "uplink", "netns", sw],
        ["ip", "-n", sw, "link", "set", "dev", "uplink", "master", "br0"],
        ["ip", "-n", sw, "link", "set", "dev", "uplink", "up"],
        ["ip", "addr", "add", f"{layout.client_address}/{prefix}", "dev", layout.root_link],
        ["ip", "link", "set", "dev", layout.root_link, "up"],
    ]
    for index, node_id in enumerate(layout.node_ids, start=1):
        ns = layout.namespace(node_id)
        port = f"p{index}"  # the node's port on the bridge (inside the switch namespace)
        cmds += [
            ["ip", "netns", "add", ns],
            ["ip", "-n", ns, "link", "set", "dev", "lo", "up"],
            ["ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns],
            ["ip", "-n", sw, "link", "set", "dev", port, "master", "br0"],
            ["ip", "-n", sw, "link", "set", "dev", port, "up"],
            ["ip", "-n", ns, "addr", "add", f"{layout.address(node_id)}/{prefix}", "dev", "eth0"],
            ["ip", "-n", ns, "link", "set", "dev", "eth0", "up"],
        ]
    return cmds


def choose_subnet(used: Sequence[ipaddress.IPv4Network], pool: ipaddress.IPv4Network = SUBNET_POOL
                  ) -> ipaddress.IPv4Network:
    """The first /24 of the pool that overlaps none of ``used`` (the root namespace's routes)."""
    for candidate in pool.subnets(new_prefix=24):
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsError(f"every /24 of {pool} is in use by a route of this host")


def _routes_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination the root namespace routes (any table), except the default route."""
    used: list[ipaddress.IPv4Network] = []
    for route in json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]"):
        dst = route.get("dst", "default")
        if dst == "default":
            continue
        with contextlib.suppress(ValueError):
            used.append(ipaddress.IPv4Network(dst, strict=False))
    return used


def existing_namespaces() -> list[str]:
    """Names of the network namespaces ``ip netns`` knows."""
    out = run(["ip", "-j", "netns", "list"]).strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    """Serialises choose-and-claim of a subnet between processes (the claim is the route itself)."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class NetnsNetwork:
    """One network of namespaces for ``node_ids``: ``create``, then ``destroy`` (idempotent)."""

    def __init__(self, node_ids: Sequence[str], tag: str | None = None) -> None:
        self.node_ids = tuple(node_ids)
        self.tag = tag or secrets.token_hex(3)
        assert self.tag.isalnum() and len(self.tag) <= 6, "the tag must fit in an interface name"
        self.layout: NetnsLayout | None = None
        self.owned = True  # False for a network attached to, not created: never destroyed by us

    @property
    def created(self) -> bool:
        return self.layout is not None

    def create(self) -> NetnsLayout:
        assert self.layout is None, "create once"
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        taken = [ns for ns in existing_namespaces() if ns.startswith(f"{NAME_PREFIX}{self.tag}-")]
        if taken:
            raise NetnsError(f"namespaces with tag {self.tag!r} exist already: {taken}")
        with _allocation_lock():
            layout = NetnsLayout(self.tag, self.node_ids, choose_subnet(_routes_in_use()))
            self.layout = layout  # set first: a half-built network is destroyed like a whole one
            try:
                for argv in creation_commands(layout):
                    run(argv)
            except BaseException:
                self.destroy()
                raise
        return layout

    @classmethod
    def attach(cls, addresses: dict[str, str]) -> NetnsNetwork:
        """The network of a running ``cluster up --netns`` (node id -> its address), found by its
        namespace names; it is not ours to destroy (``destroy`` leaves it alone)."""
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        ids = sorted(addresses)
        tags = {ns[len(NAME_PREFIX):-len(f"-{ids[0]}")] for ns in existing_namespaces()
                if ns.startswith(NAME_PREFIX) and ns.endswith(f"-{ids[0]}")}
        for tag in sorted(t for t in tags if t.isalnum() and len(t) <= 6):
            try:
                subnet = ipaddress.IPv4Network(f"{addresses[ids[0]]}/24", strict=False)
                layout = NetnsLayout(tag, tuple(ids), subnet)
            except (ValueError, AssertionError):
                continue
            if all(layout.address(n) == addresses[n] and _has_address(layout.namespace(n), addresses[n])
                   for n in ids):
                network = cls(ids, tag)
                network.layout = layout
                network.owned = False
                return network
        raise NetnsError(f"no kvstore network namespaces hold these node addresses: {addresses}")

    def _layout(self) -> NetnsLayout:
        if self.layout is None:
            raise NetnsError("the network is not created")
        return self.layout

    def address(self, node_id: str) -> str:
        return self._layout().address(node_id)

    def namespace(self, node_id: str) -> str:
        return self._layout().namespace(node_id)

    def exec_prefix(self, node_id: str) -> list[str]:
        """Prefix that runs a command inside the node's namespace (``ip netns exec`` execs in place:
        the child's PID is the command's own, so it is signalled directly)."""
        return ["ip", "netns", "exec", self.namespace(node_id)]

    def run_in(self, node_id: str, argv: Sequence[str], stdin: str | None = None) -> str:
        return run([*self.exec_prefix(node_id), *argv], stdin)

    def describe(self) -> dict[str, Any]:
        return {"tag": self.tag, **self._layout().describe()} if self.layout else {"tag": self.tag}

    def destroy(self) -> None:
        """Delete every namespace of this network that exists (their veths and the bridge go with them)."""
        if self.layout is None or not self.owned:
            return
        present = set(existing_namespaces())
        errors = []
        for ns in self.layout.namespaces:
            if ns in present:
                try:
                    run(["ip", "netns", "delete", ns])
                except NetnsError as exc:  # keep removing the others
                    errors.append(str(exc))
        # The root side of the uplink goes with the switch namespace; remove it by name in case the
        # switch namespace was never created but the link was.
        if self.layout.root_link in _root_links():
            with contextlib.suppress(NetnsError):
                run(["ip", "link", "delete", "dev", self.layout.root_link])
        if errors:
            raise NetnsError("; ".join(errors))
        self.layout = None


def _has_address(namespace: str, address: str) -> bool:
    try:
        out = run(["ip", "-n", namespace, "-j", "-4", "addr", "show"]).strip()
    except NetnsError:
        return False
    return any(a.get("local") == address for link in json.loads(out or "[]") for a in link.get("addr_info", []))


def _root_links() -> list[str]:
    out = run(["ip", "-j", "link", "show"]).strip()
    return [link["ifname"] for link in json.loads(out)] if out else []


class NetnsCluster(LocalCluster):
    """A ``LocalCluster`` with every node in its own network namespace (see the module docstring).

    Node addresses exist once ``start`` has built the network; before that ``url`` is meaningless.
    All nodes listen on the same ports (``base_port`` for HTTP, ``base_port + 100`` for peers)
    on their own addresses.
    """

    def __init__(self, nodes: int = 5, replicas: int = 3, *, tag: str | None = None, **kwargs: Any) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise ClusterError(f"--netns: {reason}")
        assert nodes <= MAX_NODES
        self.http_port = kwargs.pop("base_port", None) or DEFAULT_HTTP_PORT
        super().__init__(nodes, replicas, **kwargs)
        self.network = NetnsNetwork(self.node_ids, tag)

    def start(self, timeout_s: float = 30.0) -> NetnsCluster:
        if not self.network.created:
            layout = self.network.create()
            members = tuple(
                Member(m.id, layout.address(m.id), self.http_port, self.http_port + 100)
                for m in self.base_config.members
            )
            # bind 0.0.0.0: inside its namespace a node has only its own address (and loopback).
            self.base_config = validate(replace(self.base_config, members=members, bind="0.0.0.0"))
        try:
            super().start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def node_command(self, node_id: str, config_path: Path) -> list[str]:
        return [*self.network.exec_prefix(node_id), *super().node_command(node_id, config_path)]

    def stop(self, remove_data: bool | None = None) -> None:
        try:
            super().stop(remove_data)
        finally:
            self.network.destroy()
