"""Building a node: the one place that gives a ``Node`` its seams and its collaborators.

Theory of operation
-------------------
A node is a coordinator and replica (``kvstore.runtime.node.Node``) plus the mechanisms around it:
hinted handoff (``kvstore.runtime.handoff``), read repair (``kvstore.runtime.read_repair``), anti-entropy
(``kvstore.runtime.anti_entropy``), the tombstone reaper (``kvstore.runtime.reaper``) and the linearizable
register (``kvstore.runtime.register``) with its CASPaxos proposer and acceptor (``kvstore.runtime.caspaxos``) and the
acceptor's recovery after a lost disk (``kvstore.runtime.register_recovery``).  ``assemble_node`` builds all
of them, each from the node's own seams and config, and hands them to the node by
composition: no module patches a node after the fact, and nothing is optional or probed for.

The seams are the only I/O a node does (``NodeSeams``): a ``Transport`` to its peers, three
``Storage`` stores (data, hints, Paxos state), a ``Clock`` and one ``random.Random``.
``kvstore.server.app.build_node`` calls this with the real ones (sqlite, the stream transport, the
system clock, an rng seeded from real entropy); a simulator calls it with in-memory stores, the
in-memory network, a virtual clock and a seeded rng, and gets the same node.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvstore.clock import Clock
from kvstore.config import NodeConfig
from kvstore.runtime.anti_entropy import AntiEntropy
from kvstore.runtime.caspaxos import PaxosAcceptor, PaxosProposer
from kvstore.runtime.handoff import HintedHandoff
from kvstore.runtime.metrics import Metrics
from kvstore.runtime.node import Node, NodeParts
from kvstore.runtime.read_repair import ReadRepair
from kvstore.runtime.reaper import TombstoneReaper
from kvstore.runtime.reconfig import Reconfiguration
from kvstore.runtime.register import LinearizableRegister
from kvstore.runtime.register_recovery import AcceptorRecovery
from kvstore.storage.base import Storage
from kvstore.transport.base import Transport


@dataclass(frozen=True)
class NodeSeams:
    """Everything a node reads from or writes to the world outside its own memory."""

    transport: Transport
    data: Storage  # the key-value data (versioned objects)
    hints: Storage  # hints held for unreachable owners
    paxos: Storage  # the CASPaxos acceptor's state: must be durable in a real node
    clock: Clock
    rng: random.Random  # every random choice of the node (incarnations, jitter, backoff)
    metrics: Metrics | None = None  # None: a fresh registry of its own


def assemble_node(cfg: NodeConfig, seams: NodeSeams) -> Node:
    """The one place that builds a Node with all its collaborators (hinted handoff, read repair,
    anti-entropy, tombstone reaper, the CP register + acceptor recovery, membership changes).  server.build_node calls
    it with real seams; the simulator with simulated ones."""
    assert seams.transport.node_id == cfg.node_id, "the transport must speak for this node"
    return Node(
        cfg,
        transport=seams.transport,
        data=seams.data,
        hints=seams.hints,
        paxos=seams.paxos,
        clock=seams.clock,
        rng=seams.rng,
        metrics=seams.metrics,
        parts=_parts,
    )


def _parts(node: Node) -> NodeParts:
    reaper = TombstoneReaper(node)
    return NodeParts(
        handoff=HintedHandoff(node),
        read_repair=ReadRepair(node),
        anti_entropy=AntiEntropy(node, reaper),
        reaper=reaper,
        register=_register(node),
        reconfig=Reconfiguration(node),
    )


def _register(node: Node) -> LinearizableRegister:
    # The register's key set is shared with the recovery, which adds the keys it merges.
    register_keys: set[str] = set()
    recovery = AcceptorRecovery(
        node.node_id,
        node.cfg.member_ids,
        node.paxos_storage,
        node.rng,
        node.call,
        replicas_of=lambda token: node.ring.walk_token(token)[: node.n],
        cluster_state=node.cfg.initial_cluster_state,
        clock=node.clock,
        on_key=register_keys.add,
    )
    acceptor = PaxosAcceptor(node.paxos_storage, gate=recovery)
    recovery.acceptor = acceptor  # recovery merges peers' state through the acceptor it gates
    proposer = PaxosProposer(node.node_id, node.call, node.clock, node.rng)
    return LinearizableRegister(
        node, proposer=proposer, acceptor=acceptor, recovery=recovery, register_keys=register_keys
    )
