"""A simulated cluster: N real ``Node``s in one process, on simulated time, network and disks.

Theory of operation
-------------------
Each member is a real ``Node`` with the real AP machinery (heartbeats, hinted handoff, read
repair, anti-entropy, tombstone reaping) and CP machinery (CASPaxos register, acceptor
recovery), built by the same assembly as a node process, over simulated seams:

* ``Transport``: a ``SimTransport`` of the cluster's ``SimNetwork`` (``kvstore.sim.network``);
* ``Storage``: the stores of the member's ``SimDisk`` (``kvstore.sim.disk``) behind the fault
  layer, durable across crashes that keep state;
* ``Clock``: a ``SimClock`` over the virtual loop (per-boot skew, as a process's is);
* ``random.Random``: seeded from the run's seed, the member and its boot number, so a node that
  restarts never replays the stream of an earlier boot (its incarnations stay unique, as
  ``server.build_node``'s real entropy guarantees for processes).

Every boot of a member runs in its own ``Host`` (``kvstore.sim.vloop``): the process faults are

* ``crash(node, lose_state)``: the endpoint goes down (new calls are refused, calls it was
  handling see "connection lost"), the disk handles of that boot are fenced, every task of the
  boot is cancelled in creation order; with ``lose_state`` the member's disk is replaced by an
  empty one.  Nothing of the dead boot runs on.
* ``restart(node)``: a new boot (``initial_cluster_state = "existing"``) on the member's disk,
  exactly as a process restarted from its data directory; it is awaited until ``Node.start``
  returned (the node serves).
* ``pause``/``resume``: the host's steps are held (SIGSTOP/SIGCONT; see ``vloop``).

Clients reach a node's kv API through ``SimEndpoint``: the request travels to the node for a
simulated client latency, is handled by a task of the node's current host (so a crash cuts it:
``disconnected``; a refused connection is ``unreachable``), and the answer travels back.  A
pause holds the request like a stopped process's socket would: the client times out.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kvstore.config import APSettings, Limits, Member, NodeConfig, validate
from kvstore.harness.endpoint import NoAnswerError
from kvstore.protocol.ring import key_token, shared_ring
from kvstore.protocol.versions import VersionedObject, decode
from kvstore.runtime.assembly import NodeSeams, assemble_node
from kvstore.runtime.node import Node
from kvstore.server.kv_api import ApiRequest, ApiResponse, KvApi
from kvstore.sim.disk import SimDisk, latency_sampler
from kvstore.sim.network import Latency, SimNetwork, SimTransport
from kvstore.sim.vloop import Host, SimClock, SimError, VirtualLoop, wait_answer
from kvstore.storage.faulty import FaultSettings
from kvstore.transport.base import LinkRule

log = logging.getLogger(__name__)

_NO_HOST = contextvars.Context()
SIM_SECRET = "simulated-cluster-secret"
UNSAFE_WRITEBACK_S = 1.0  # under the injected bug: how often unsynced writes reach the disk


@dataclass(frozen=True)
class ClusterSpec:
    """Everything that shapes a simulated cluster (with the seed, it determines the run)."""

    nodes: int = 5
    replicas: int = 3
    conflict_mode: str = "siblings"
    vnodes: int = 256
    ap: APSettings = field(default_factory=APSettings)
    limits: Limits = field(default_factory=Limits)
    latency: Latency = field(default_factory=Latency)  # node <-> node, one way
    client_latency: Latency = field(default_factory=lambda: Latency(median_ms=0.3, sigma=0.3, max_ms=20.0))
    disk_write_ms: tuple[float, float] = (0.05, 0.5)
    # Test-only injected durability bug (kvstore.sim.disk): disks acknowledge before syncing.
    unsafe_skip_fsync_before_ack: bool = False

    def node_config(self, node_id: str, initial_cluster_state: str) -> NodeConfig:
        members = tuple(Member(f"n{i + 1}", "sim", 10_000 + i, 20_000 + i) for i in range(self.nodes))
        return validate(NodeConfig(
            node_id=node_id, members=members, secret=SIM_SECRET, replicas=self.replicas,
            r=min(2, self.replicas), w=min(2, self.replicas), vnodes=self.vnodes,
            conflict_mode=self.conflict_mode, storage="memory", data_dir="/nonexistent-simulated",
            fsync="always", initial_cluster_state=initial_cluster_state, ap=self.ap, limits=self.limits,
        ))


class ConditionNotMet(SimError):
    """``SimCluster.wait_until``'s condition did not hold by its simulated deadline."""


class SimMember:
    """One member of the cluster across its boots: its disk survives them, the rest is per boot."""

    def __init__(self, node_id: str, disk: SimDisk) -> None:
        self.node_id = node_id
        self.disk = disk
        self.boots = 0
        self.host: Host | None = None
        self.node: Node | None = None
        self.api: KvApi | None = None
        self.transport: SimTransport | None = None
        self.clock: SimClock | None = None

    @property
    def up(self) -> bool:
        return self.host is not None and not self.host.crashed


class SimCluster:
    def __init__(self, spec: ClusterSpec, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualLoop), "a simulated cluster runs on kvstore.sim.vloop.VirtualLoop"
        self.loop = loop
        self.net_rng = random.Random(f"{seed}:network")
        self.disk_rng = random.Random(f"{seed}:disk")
        self.client_rng = random.Random(f"{seed}:clients")
        self.network = SimNetwork(self.net_rng, spec.latency)
        self.ring = shared_ring([f"n{i + 1}" for i in range(spec.nodes)], spec.vnodes)  # the nodes' own ring
        self.members: dict[str, SimMember] = {}
        for i in range(spec.nodes):
            node_id = f"n{i + 1}"
            self.members[node_id] = SimMember(node_id, self._new_disk(node_id, 0))

    @property
    def node_ids(self) -> list[str]:
        return list(self.members)

    def _new_disk(self, node_id: str, generation: int) -> SimDisk:
        low, high = self.spec.disk_write_ms
        writeback_s = UNSAFE_WRITEBACK_S if self.spec.unsafe_skip_fsync_before_ack else None
        return SimDisk(node_id, generation, latency_sampler(self.disk_rng, low, high), writeback_s)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """First start of every member (a new cluster), all at once."""
        await asyncio.gather(*(self._boot(m, "new") for m in self.members.values()))

    async def _boot(self, member: SimMember, initial_cluster_state: str) -> None:
        assert not member.up, f"{member.node_id} is running"
        member.boots += 1
        host = Host(f"{member.node_id}#{member.boots}")
        transport = self.network.attach(member.node_id, host)
        stores = member.disk.open()
        clock = SimClock(self.loop)
        rng = random.Random(f"{self.seed}:node:{member.node_id}:boot:{member.boots}")
        cfg = self.spec.node_config(member.node_id, initial_cluster_state)
        seams = NodeSeams(transport=transport, data=stores["data"], hints=stores["hints"], paxos=stores["paxos"],
                          clock=clock, rng=rng)
        node = assemble_node(cfg, seams)
        member.host, member.node, member.transport, member.clock = host, node, transport, clock
        await host.spawn(node.start(), name=f"{member.node_id}-start")
        # Clients reach the node only once it has started, as a real node opens its HTTP port after
        # Node.start: before, a request would meet a node without its identity (sweep seed 300).
        member.api = KvApi(node)

    def crash(self, node_id: str, lose_state: bool = False) -> None:
        member = self.members[node_id]
        assert member.up and member.host is not None and member.transport is not None
        member.transport.crash()
        member.disk.fence()
        member.host.crash()
        member.node = member.api = None
        if lose_state:
            member.disk = self._new_disk(node_id, member.disk.generation + 1)

    async def restart(self, node_id: str) -> None:
        await self._boot(self.members[node_id], "existing")

    def pause(self, node_id: str) -> None:
        host = self.members[node_id].host
        assert host is not None and not host.crashed
        self.loop.pause(host)

    def resume(self, node_id: str) -> None:
        host = self.members[node_id].host
        assert host is not None
        self.loop.release(host)

    async def stop(self) -> None:
        """The end of a run: every member that is up crashes (nothing is left to flush)."""
        for node_id, member in self.members.items():
            if member.host is not None and member.host.paused:
                self.resume(node_id)
            if member.up:
                self.crash(node_id)
        await asyncio.sleep(0)

    # --- per-node settings (what the admin routes do on a real node) ---------------------------

    def node(self, node_id: str) -> Node:
        node = self.members[node_id].node
        assert node is not None, f"{node_id} is down"
        return node

    def set_rules(self, node_id: str, rules: dict[str, dict[str, Any]]) -> None:
        transport = self.members[node_id].transport
        assert transport is not None
        transport.faults.clear()
        for peer, raw in sorted(rules.items()):
            transport.faults.set_rule(peer, LinkRule(**raw))

    def set_skew(self, node_id: str, skew_ms: float) -> None:
        clock = self.members[node_id].clock
        assert clock is not None
        clock.skew_ns = int(skew_ms * 1_000_000)

    def set_disk_faults(self, node_id: str, faults: dict[str, Any]) -> None:
        self.members[node_id].disk.faults.configure(FaultSettings.from_json(faults))

    async def trigger_repair(self, node_id: str) -> None:
        member = self.members[node_id]
        if not member.up or member.node is None or member.host is None:
            return
        await member.host.spawn(member.node.parts.anti_entropy.trigger_repair(), name=f"{node_id}-repair")

    # --- partitions (what the nemesis installs through /admin/faults, both ends enforcing) -------

    def cut(self, a: str, b: str) -> None:
        """Partition ``a`` <-> ``b`` in both directions, keeping the other rules of ``a`` and ``b``.

        Rules live in a boot's transport: a restarted node starts with none, as a process does."""
        for here, there in ((a, b), (b, a)):
            transport = self.members[here].transport
            if transport is not None and self.members[here].up:
                transport.faults.set_rule(there, LinkRule(drop_in=True, drop_out=True))

    def isolate(self, node_id: str) -> None:
        for other in self.node_ids:
            if other != node_id:
                self.cut(node_id, other)

    def heal(self) -> None:
        """Every running node drops every link rule."""
        for member in self.members.values():
            if member.up and member.transport is not None:
                member.transport.faults.clear()

    # --- inspection and waiting (tests: what a real node's internal routes would show) ---------

    def walk(self, key: str) -> list[str]:
        """The key's preference list (its first ``replicas`` members), then its fallbacks, in ring order."""
        return list(self.ring.walk(key))

    async def local_object(self, node_id: str, key: str) -> VersionedObject:
        """A running node's knowledge of a key: its data plus its unexpired hints (its ``replica_get``)."""
        return await self.node(node_id).read_local(key, key_token(key))

    async def stored_object(self, node_id: str, key: str) -> VersionedObject | None:
        """A running node's *data store* copy of a key (tombstones included; hints not), or None."""
        blob = await self.node(node_id).data.get(key, key_token(key))
        return None if blob is None else decode(blob)

    def metric(self, node_id: str, name: str, **labels: str) -> float:
        """A running node's metric sample (e.g. ``kvstore_hints_stored_total``); 0 if never set."""
        value = self.node(node_id).metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def wait_until(
        self, what: str, condition: Callable[[], bool | Awaitable[bool]], deadline_s: float, every_s: float = 0.1
    ) -> float:
        """Advance simulated time until ``condition`` holds, checking every ``every_s`` simulated
        seconds; returns the simulated seconds it took.  Raises ``ConditionNotMet`` once
        ``deadline_s`` simulated seconds have passed without it (no wall-clock time is involved)."""
        started = self.loop.time()
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return self.loop.time() - started
            if self.loop.time() - started >= deadline_s:
                raise ConditionNotMet(f"not within {deadline_s:g} simulated s: {what}")
            await asyncio.sleep(every_s)

    # --- clients ------------------------------------------------------------------------------

    def _later(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> None:
        self.loop.call_later(delay_s, callback, *args, context=_NO_HOST)

    def _client_transit_s(self) -> float:
        return self.spec.client_latency.sample_s(self.client_rng)

    async def request(self, node_id: str, request: ApiRequest, timeout_s: float) -> ApiResponse:
        """One client request to ``node_id``'s kv API (see the module docstring)."""
        answer: asyncio.Future[ApiResponse] = self.loop.create_future()
        self._later(self._client_transit_s(), self._client_arrive, node_id, request, answer)
        try:
            return await wait_answer(answer, timeout_s)
        except TimeoutError:
            raise NoAnswerError("timeout", "timeout") from None

    def _client_arrive(self, node_id: str, request: ApiRequest, answer: asyncio.Future[ApiResponse]) -> None:
        member = self.members[node_id]
        if not member.up or member.api is None or member.host is None:
            self._later(self._client_transit_s(), _settle, answer, None,
                        NoAnswerError("unreachable", "connection_refused"))
            return
        task = member.host.spawn(member.api.handle(request), name=f"{node_id}-client")
        task.add_done_callback(lambda done: self._client_answered(done, answer))

    def _client_answered(self, task: asyncio.Task[ApiResponse], answer: asyncio.Future[ApiResponse]) -> None:
        if task.cancelled():
            error: BaseException | None = NoAnswerError("disconnected", "connection_reset")
            response = None
        elif task.exception() is not None:
            log.error("the kv API raised instead of answering", exc_info=task.exception())
            error, response = NoAnswerError("disconnected", "connection_reset"), None
        else:
            error, response = None, task.result()
        self._later(self._client_transit_s(), _settle, answer, response, error)


def _settle(answer: asyncio.Future[ApiResponse], response: ApiResponse | None, error: BaseException | None) -> None:
    if answer.done():
        return  # the client gave up
    if error is not None:
        answer.set_exception(error)
    else:
        assert response is not None
        answer.set_result(response)


class SimEndpoint:
    """The ``kvstore.harness.endpoint.Endpoint`` of a simulated cluster."""

    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster

    async def request(self, node: str, request: ApiRequest, timeout_s: float) -> ApiResponse:
        return await self.cluster.request(node, request, timeout_s)

    async def close(self) -> None:
        pass
