"""One live run of the explorer: clusters, a workload per mode, faults on demand, the checker.

Theory of operation
-------------------
``LiveSession`` owns what a live page shows and changes:

* **Clusters**: one local cluster per conflict mode the chosen modes need (``eventual-lww``
  needs a last-write-wins cluster, the others share a sibling-mode one), started like
  ``kvstore explore`` starts them (same settings) and stopped by PID at the end; or the nodes
  of an existing cluster (``kvstore ui --node``), where kill and pause are not available.
* **Load**: one ``kvstore.harness.workload.Workload`` per mode, each on its own keys (``<mode>.k0`` ...),
  recording into a ``LiveHistory`` (a ``HistoryWriter`` that hands each event to the session
  as it is written, and keeps the file for ``kvstore check`` afterwards).
* **Faults**: every click becomes a call of ``kvstore.harness.runner.FaultDriver`` (one per cluster,
  driven in lockstep with identically seeded rngs so both clusters get the same fault): the
  harness's own nemesis, recorded in every history of that cluster (``HistoryTee``).
  Actions run one at a time.
* **Figures**: each completed op becomes a ``stats.Sample`` on the side (per key, by
  ``topology.Topology.side``) its node was on when the op was invoked; events go to the
  checker worker every ``CHECK_INTERVAL_S`` (``verdicts.CheckerClient``); the replicas of
  every key are probed every ``PROBE_INTERVAL_S`` (``probe``); ``explain`` turns the figures
  into sentences.  ``snapshot`` is everything the page draws, as JSON.

Bounds: a run stops its workload after ``max_minutes`` or ``MAX_EVENTS_PER_MODE`` events
(the page offers a new run, on fresh keys); counterexamples kept: ``MAX_COUNTEREXAMPLES``;
action log: ``MAX_LOG`` lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.client import AiohttpTransport, Client, KvstoreError
from kvstore.explore.matrix import EXPLORE_AP, EXPLORE_LIMITS, MODE_HELP
from kvstore.harness.history import HistoryTee, HistoryWriter
from kvstore.harness.local_cluster import ClusterError, LocalCluster
from kvstore.harness.nemesis import (
    CUSTOM_PARTITION,
    ClusterControl,
    NemesisError,
    groups_grudge,
    grudge_groups,
    links_grudge,
)
from kvstore.harness.runner import FaultDriver
from kvstore.harness.workload import MODES, Workload, WorkloadSpec
from kvstore.protocol.placement import Placement, placement
from kvstore.protocol.ring import Ring
from kvstore.ui import explain as explain_mod
from kvstore.ui import pictures, probe
from kvstore.ui.stats import ModeStats, Sample
from kvstore.ui.topology import Topology
from kvstore.ui.verdicts import CheckerClient

log = logging.getLogger("kvstore.ui")

CHECK_INTERVAL_S = 1.5
PROBE_INTERVAL_S = 2.0
MAX_EVENTS_PER_MODE = 150_000
MAX_COUNTEREXAMPLES = 40
MAX_LOG = 40
PRESETS = ("majority", "isolate", "bridge", "one-way", "halves")
SKEW_MS_LIMIT = 3_600_000.0


class ActionError(Exception):
    """A request from the page that cannot be carried out (shown to the user as it is)."""


@dataclass
class SessionConfig:
    modes: list[str]
    seed: int = 7
    clients: int = 5  # per mode
    rate_per_s: float = 20.0  # per mode, all its clients together
    keys: int = 5
    nodes: int = 5
    replicas: int = 3
    max_minutes: float = 15.0
    out_dir: Path | None = None  # histories; a temporary directory when None
    attach_urls: list[str] = field(default_factory=list)  # kvstore ui: an existing cluster
    secret: str | None = None


class LiveHistory(HistoryWriter):
    """A history file that hands each event to the session as it is recorded (and keeps none
    in memory: the session keeps what it needs, bounded)."""

    def __init__(self, path: Path, start_ns: int, listener: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(path, start_ns)
        self.listener = listener

    def record(self, event: dict[str, Any]) -> dict[str, Any]:
        line = super().record(event)
        self.events.clear()
        self.listener(line)
        return line


@dataclass
class ModeRun:
    mode: str
    keys: list[str]
    conflict_mode: str
    history: LiveHistory
    workload: Workload
    stats: ModeStats = field(default_factory=ModeStats)
    inflight: dict[Any, tuple[float, str]] = field(default_factory=dict)  # process -> (invoke s, side)
    pending: list[dict[str, Any]] = field(default_factory=list)  # events not yet sent to the checker
    events: int = 0
    verdict: dict[str, Any] = field(default_factory=dict)  # the checker's last answer
    copies: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> node -> replica copy
    task: asyncio.Task[None] | None = None


class LiveSession:
    def __init__(self, cfg: SessionConfig) -> None:
        for mode in cfg.modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
        self.cfg = cfg
        self.status = "starting"
        self.status_text = "starting"
        self.clusters: dict[str, LocalCluster] = {}
        self.controls: dict[str, ClusterControl] = {}
        self.drivers: dict[str, FaultDriver] = {}
        self.tees: dict[str, HistoryTee] = {}
        self.modes: dict[str, ModeRun] = {}
        self.ring: Ring | None = None
        self.replicas = cfg.replicas
        self.node_ids: list[str] = []
        self.topology = Topology(())
        self.healed_at: float | None = None
        self.action_lock = asyncio.Lock()
        self.busy: str | None = None
        self.log: deque[str] = deque(maxlen=MAX_LOG)
        self.counterexamples: dict[int, dict[str, Any]] = {}
        self.latest_counterexample: dict[tuple[str, str], int] = {}
        self._ids = itertools.count(1)
        self.run_number = 0
        self.run_started = time.monotonic()
        self.run_stopped: str | None = None
        self.start_ns = time.monotonic_ns()
        self.checker = CheckerClient()
        self.out_dir = cfg.out_dir or Path(tempfile.mkdtemp(prefix="kvstore-live-"))
        self.key_prefix = "" if not cfg.attach_urls else f"ui-{secrets.token_hex(3)}."
        self._tasks: list[asyncio.Task[None]] = []
        self._transport: AiohttpTransport | None = None  # the probes' and placement look-ups' (sent once)
        self.unconfigured_modes: list[str] = []

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def local(self) -> bool:
        return not self.cfg.attach_urls

    def note(self, text: str) -> None:
        stamp = f"{self.now_s():6.1f}s"
        self.log.append(f"{stamp}  {text}")
        log.info("%s", text)

    def now_s(self) -> float:
        return (time.monotonic_ns() - self.start_ns) / 1e9

    async def start(self) -> None:
        """Start (or attach to) the clusters, then the first run. Raises ClusterError."""
        try:
            if self.local:
                await self._start_clusters()
            else:
                await self._attach()
            first = next(iter(self.controls.values()))
            self.node_ids = first.node_ids
            self.topology = Topology(tuple(self.node_ids))
            for conflict_mode, control in self.controls.items():
                self.drivers[conflict_mode] = FaultDriver(
                    control, HistoryTee([]), random.Random(f"{self.cfg.seed}:nemesis"))
            self._transport = AiohttpTransport(max_connections=16)
            await self.new_run()
            self._tasks = [asyncio.create_task(self._check_loop(), name="ui-check"),
                           asyncio.create_task(self._probe_loop(), name="ui-probe"),
                           asyncio.create_task(self._bound_loop(), name="ui-bound")]
            self.status, self.status_text = "running", "running"
        except Exception as exc:
            self.status, self.status_text = "failed", f"{type(exc).__name__}: {exc}"
            raise

    async def _start_clusters(self) -> None:
        needed = sorted({MODES[m]["conflict_mode"] for m in self.cfg.modes})
        for conflict_mode in needed:
            self.status_text = (f"starting a local {self.cfg.nodes}-node cluster (N={self.cfg.replicas}, "
                                f"conflict mode {conflict_mode})...")
            self.note(self.status_text)
            cluster = LocalCluster(
                self.cfg.nodes, self.cfg.replicas,
                data_dir=tempfile.mkdtemp(prefix=f"kvstore-live-{conflict_mode}-"),
                conflict_mode=conflict_mode, ap=EXPLORE_AP, limits=EXPLORE_LIMITS,
            )
            self.clusters[conflict_mode] = cluster
            await asyncio.to_thread(cluster.start)
            self.controls[conflict_mode] = ClusterControl(
                urls={n: cluster.url(n) for n in cluster.node_ids}, secret=cluster.secret, local=cluster)
            self.note(f"{conflict_mode} cluster up: " + ", ".join(
                f"{n} pid {cluster.pid(n)}" for n in cluster.node_ids))
        first = next(iter(self.clusters.values()))
        self.ring = Ring(first.node_ids, first.base_config.vnodes)
        self.replicas = first.base_config.replicas

    async def _attach(self) -> None:
        self.status_text = f"reading the cluster at {self.cfg.attach_urls[0]}..."
        info: dict[str, Any] | None = None
        errors: list[str] = []
        for url in self.cfg.attach_urls:
            try:
                async with Client(url, timeout_s=5.0) as client:
                    info = await client.cluster()
                break
            except (KvstoreError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
        if info is None:
            raise ClusterError("cannot reach the cluster: " + "; ".join(errors))
        conflict_mode = str(info.get("conflict_mode", "siblings"))
        usable = [m for m in self.cfg.modes if MODES[m]["conflict_mode"] == conflict_mode]
        self.unconfigured_modes = [m for m in self.cfg.modes if m not in usable]
        if not usable:
            raise ClusterError(f"the cluster is in {conflict_mode} mode: none of {', '.join(self.cfg.modes)} "
                               "can run on it")
        self.cfg.modes = usable
        urls = {m["id"]: m["url"] for m in info["members"]}
        self.controls[conflict_mode] = ClusterControl(urls=urls, secret=self.cfg.secret or "")
        self.ring = Ring(sorted(urls), int(info["vnodes"]))
        self.replicas = int(info["replicas"])
        self.note(f"attached to {len(urls)} nodes ({conflict_mode} mode)"
                  + ("" if self.cfg.secret else "; no --secret: watching only, faults disabled"))

    async def new_run(self) -> None:
        """Start the workloads on fresh keys and fresh histories (and fresh verdicts)."""
        await self._stop_workloads()
        self.run_number += 1
        self.run_started = time.monotonic()
        self.run_stopped = None
        await asyncio.to_thread(self.checker.close)
        self.checker = CheckerClient()
        self.counterexamples.clear()
        self.latest_counterexample.clear()
        run_dir = self.out_dir / f"run-{self.run_number}"
        run_tag = "" if self.run_number == 1 else f"r{self.run_number}."
        histories: dict[str, list[HistoryWriter]] = {}
        self.modes = {}
        for mode in self.cfg.modes:
            conflict_mode = MODES[mode]["conflict_mode"]
            keys = [f"{self.key_prefix}{run_tag}{mode}.k{i}" for i in range(self.cfg.keys)]
            history = LiveHistory(run_dir / mode / "history.jsonl", self.start_ns, self._listener(mode))
            spec = WorkloadSpec(mode=mode, keys=keys, clients=self.cfg.clients, rate_per_s=self.cfg.rate_per_s)
            workload = Workload(spec, self.controls[conflict_mode].urls, history, self.cfg.seed + self.run_number)
            self.modes[mode] = ModeRun(mode, keys, conflict_mode, history, workload)
            histories.setdefault(conflict_mode, []).append(history)
        for conflict_mode, driver in self.drivers.items():
            driver.history = HistoryTee(histories.get(conflict_mode, []))
        for run in self.modes.values():
            await run.workload.__aenter__()
            run.task = asyncio.create_task(run.workload.run(), name=f"ui-workload-{run.mode}")
        self.note(f"run {self.run_number}: workloads started ({', '.join(self.cfg.modes)}); histories in {run_dir}")

    async def _stop_workloads(self, reason: str | None = None) -> None:
        runs = list(self.modes.values())
        for run in runs:
            run.workload.stop()
        for run in runs:
            if run.task is not None:
                try:
                    await asyncio.wait_for(run.task, 10)
                except (TimeoutError, asyncio.CancelledError):
                    run.task.cancel()
                run.task = None
                await run.workload.__aexit__(None, None, None)
                run.history.close()
        if reason and runs:
            self.run_stopped = reason
            self.note(reason)

    async def close(self) -> None:
        """Stop everything this session started: loops, workloads, faults, clusters (by PID)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._stop_workloads()
        for control in self.controls.values():
            if control.secret:
                with contextlib.suppress(Exception):
                    await control.heal_all()
            await control.close()
        for cluster in self.clusters.values():
            await asyncio.to_thread(cluster.stop)
        await asyncio.to_thread(self.checker.close)
        if self._transport is not None:
            await self._transport.close()
        self.status, self.status_text = "stopped", "stopped"

    # --- events -----------------------------------------------------------------------------

    def _listener(self, mode: str) -> Callable[[dict[str, Any]], None]:
        def listen(event: dict[str, Any]) -> None:
            self._on_event(mode, event)

        return listen

    def _on_event(self, mode: str, event: dict[str, Any]) -> None:
        run = self.modes.get(mode)
        if run is None:
            return
        run.events += 1
        run.pending.append(event)
        if event.get("process") == "nemesis":
            return
        t_s = event["time"] / 1e9
        if event["type"] == "invoke":
            assert self.ring is not None
            owners = self.ring.preference_list(str(event["key"]), self.replicas)
            run.inflight[event["process"]] = (t_s, self.topology.side(str(event["node"]), owners, self.replicas))
            return
        invoked = run.inflight.pop(event["process"], None)
        if invoked is None:
            return
        invoke_s, side = invoked
        run.stats.add(Sample(
            t_s=t_s, side=side, type=event["type"], f=str(event["f"]), node=str(event.get("node")),
            latency_ms=(t_s - invoke_s) * 1000.0,
            refused=event["type"] == "fail" and event.get("error") == "precondition_failed",
            siblings="siblings" in event,
        ))

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            batch = {mode: run.pending for mode, run in self.modes.items() if run.pending}
            if not batch:
                continue
            for run in self.modes.values():
                run.pending = []
            checker = self.checker
            result = await checker.step(batch)
            if result is None or checker is not self.checker:  # a new run began meanwhile
                continue
            for mode, out in result.items():
                run = self.modes[mode]
                run.verdict = out
                for ce in out.get("counterexamples", []):
                    ident = next(self._ids)
                    self.counterexamples[ident] = {**ce, "id": ident}
                    self.latest_counterexample[(mode, ce["key"])] = ident
                    self.note(f"{mode}: key {ce['key']} is not linearizable (window {ce['window']}): {ce['stuck']}")
                while len(self.counterexamples) > MAX_COUNTEREXAMPLES:
                    del self.counterexamples[min(self.counterexamples)]

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            if not self.cfg.secret and not self.local:
                continue
            await self.probe_all()

    async def probe_all(self) -> None:
        assert self.ring is not None and self._transport is not None
        jobs = []
        for run in self.modes.values():
            if run.mode == "linearizable":
                continue  # the register lives in the Paxos store; its reads are majority rounds anyway
            control = self.controls[run.conflict_mode]
            for key in run.keys:
                for node in self.ring.preference_list(key, self.replicas):
                    jobs.append((run, key, node, control))

        async def one(run: ModeRun, key: str, node: str, control: ClusterControl) -> None:
            copy = None
            if node not in control.killed and node not in control.paused:
                assert self._transport is not None
                copy = await probe.replica_copy(self._transport, control.urls[node], control.secret, key)
            run.copies.setdefault(key, {})[node] = copy

        await asyncio.gather(*(one(*job) for job in jobs))

    async def _bound_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.run_stopped or not self.modes:
                continue
            minutes = (time.monotonic() - self.run_started) / 60
            if minutes >= self.cfg.max_minutes:
                await self._stop_workloads(f"run {self.run_number} stopped after {self.cfg.max_minutes:g} min "
                                           "(runs are bounded): press 'new run' for another")
            elif any(run.events >= MAX_EVENTS_PER_MODE for run in self.modes.values()):
                await self._stop_workloads(f"run {self.run_number} stopped at {MAX_EVENTS_PER_MODE} events "
                                           "per mode (runs are bounded): press 'new run' for another")

    # --- actions ----------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        faults = bool(self.local or self.cfg.secret)
        return {"partition": faults, "skew": faults, "kill": self.local, "pause": self.local,
                "why_not": None if self.local else ("kill and pause need a cluster this explorer started"
                                                    if faults else "no --secret: watching only")}

    async def act(self, action: dict[str, Any]) -> str:
        """Carry out one action from the page; returns what was done, in words."""
        if self.status != "running":
            raise ActionError(f"not running yet ({self.status_text})")
        name = action.get("action")
        if not isinstance(name, str):
            raise ActionError("an action needs an 'action' name")
        if self.action_lock.locked():
            raise ActionError(f"busy: {self.busy}")
        async with self.action_lock:
            self.busy = name
            try:
                message = await self._act(name, action)
            except (NemesisError, ClusterError, KvstoreError, TimeoutError) as exc:
                self._refresh_topology()
                self.note(f"{name} failed: {exc}")
                raise ActionError(f"{name} failed: {exc}") from None
            finally:
                self.busy = None
            self._refresh_topology()
            self.note(message)
            return message

    def _node(self, action: dict[str, Any], required: bool = True) -> str | None:
        node = action.get("node")
        if node is None and not required:
            return None
        if not isinstance(node, str) or node not in self.node_ids:
            raise ActionError(f"unknown node {node!r} (nodes: {', '.join(self.node_ids)})")
        return node

    def _need(self, capability: str) -> None:
        if not self.capabilities()[capability]:
            raise ActionError(f"{capability} is not available here: {self.capabilities()['why_not']}")

    async def _each(self, call: Callable[[FaultDriver], Any]) -> None:
        """The same fault on every cluster (drivers in lockstep: same rng draws)."""
        await asyncio.gather(*(call(driver) for driver in self.drivers.values()))

    async def _act(self, name: str, action: dict[str, Any]) -> str:
        if name == "new-run":
            await self.new_run()
            return f"new run {self.run_number} on fresh keys"
        if name == "heal-all":
            await self._each(lambda d: d.stop_all())
            for control in self.controls.values():
                if control.secret:
                    await control.heal_all()
            return "healed everything"
        if name == "preset":
            self._need("partition")
            kind = action.get("kind")
            if kind not in PRESETS:
                raise ActionError(f"unknown preset {kind!r} (known: {', '.join(PRESETS)})")
            target = self._node(action, required=False)
            await self._each(lambda d: d.start(str(kind), target=target))
            return f"partition: {kind}" + (f" aimed at {target}" if target else "")
        if name in ("groups", "links"):
            self._need("partition")
            grudge = self._grudge(name, action)
            if not any(grudge.values()):
                await self._each(lambda d: d.stop("partition"))
                return "partition healed"
            groups = grudge_groups(grudge)
            cut = [[s, r] for r in sorted(grudge) for s in sorted(grudge[r])]
            value = {"kind": CUSTOM_PARTITION, "groups": groups, "cut": cut}
            await self._each(lambda d: d.start_partition(grudge, dict(value)))
            return "partition: " + (" | ".join(" ".join(g) for g in groups) if len(groups) > 1
                                    else f"{len(cut) // 2} link(s) cut")
        if name == "heal-partition":
            await self._each(lambda d: d.stop("partition"))
            return "partition healed"
        if name in ("kill", "pause"):
            self._need(name)
            node = self._node(action)
            await self._each(lambda d: d.start(name, target=node))
            return f"{node} {'killed (SIGKILL)' if name == 'kill' else 'paused (SIGSTOP)'}"
        if name in ("restart", "resume"):
            self._need("kill" if name == "restart" else "pause")
            node = self._node(action)
            kind = "kill" if name == "restart" else "pause"
            if not any((kind, node) in d.active for d in self.drivers.values()):
                raise ActionError(f"{node} is not {'killed' if kind == 'kill' else 'paused'}")
            await self._each(lambda d: d.stop(kind, target=node))
            return f"{node} {'restarted from its data' if name == 'restart' else 'resumed (SIGCONT)'}"
        if name == "skew":
            self._need("skew")
            node = self._node(action)
            skew_ms = action.get("skew_ms")
            if not isinstance(skew_ms, int | float) or isinstance(skew_ms, bool) or abs(skew_ms) > SKEW_MS_LIMIT:
                raise ActionError(f"skew_ms must be a number of milliseconds within +-{SKEW_MS_LIMIT:g}")
            if node in self.topology.killed or node in self.topology.paused:
                raise ActionError(f"{node} is down: its clock cannot be set")
            await self._each(lambda d: d.stop("clock-skew", target=node))
            if skew_ms:
                await self._each(lambda d: d.start("clock-skew", target=node, skew_ms=float(skew_ms)))
                return f"{node} clock {skew_ms / 1000:+g} s"
            return f"{node} clock back to normal"
        raise ActionError(f"unknown action {name!r}")

    def _grudge(self, name: str, action: dict[str, Any]) -> dict[str, set[str]]:
        try:
            if name == "groups":
                groups = action.get("groups")
                if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
                    raise ActionError("groups must be a list of lists of node ids")
                for g in groups:
                    for n in g:
                        self._node({"node": n})
                named = {n for g in groups for n in g}
                rest = [n for n in self.node_ids if n not in named]
                grudge = groups_grudge([*(g for g in groups if g), *([rest] if rest else [])])
                return {n: grudge.get(n, set()) for n in self.node_ids}
            links = action.get("cut")
            if not isinstance(links, list) or not all(isinstance(p, list) and len(p) == 2 for p in links):
                raise ActionError("cut must be a list of [node, node] pairs")
            both_ways = [(str(a), str(b)) for a, b in links] + [(str(b), str(a)) for a, b in links]
            return links_grudge(self.node_ids, both_ways)
        except NemesisError as exc:
            raise ActionError(str(exc)) from None

    def _refresh_topology(self) -> None:
        control = next(iter(self.controls.values()))
        was_faulty = self.topology.faulty
        self.topology = Topology.from_rules(self.node_ids, control.rules, control.killed, control.paused,
                                            control.skews_ms)
        if was_faulty and not self.topology.faulty:
            self.healed_at = self.now_s()
        elif self.topology.faulty:
            self.healed_at = None

    # --- what the page shows ----------------------------------------------------------------

    async def placement_of(self, key: str, node: str | None) -> dict[str, Any]:
        """A key's placement as ``node`` sees it (the node's own /cluster/keys/{key}/placement),
        the ring picture of it, and what each replica holds."""
        assert self.ring is not None and self._transport is not None
        if not key or len(key.encode()) > 1024:
            raise ActionError("a key is 1 to 1024 bytes of UTF-8")
        asker = node or next((n for n in self.node_ids if self.topology.up(n)), self.node_ids[0])
        if asker not in self.node_ids:
            raise ActionError(f"unknown node {asker!r}")
        mode = next((r.mode for r in self.modes.values() if key in r.keys), None)
        conflict_mode = MODES[mode]["conflict_mode"] if mode else next(iter(self.controls))
        control = self.controls[conflict_mode]
        seen: dict[str, Any] | None = None
        error = None
        if self.topology.up(asker):
            try:
                async with Client(control.urls[asker], transport=self._transport, timeout_s=2.0) as client:
                    seen = await client.placement(key)
            except KvstoreError as exc:
                if getattr(exc, "status", None) is not None:
                    error = f"{asker} answered HTTP {exc.status}"
                else:
                    error = f"{asker} did not answer: {exc}"
        else:
            error = f"{asker} is down"
        where = self._placement_from(key, seen)
        down = list(where.primaries_down) + [f for f in where.fallbacks if f not in where.fallbacks_up]
        copies = {}
        run = self.modes.get(mode) if mode else None
        if run is not None:
            copies = run.copies.get(key, {})
        return {
            "key": key, "mode": mode, "asked": asker, "error": error, "placement": seen or where.to_json(),
            "svg": pictures.ring_svg(self.ring, where, down=down, title=f"as {asker} sees it"),
            "copies": copies, "agree": probe.agree(copies) if copies else None,
        }

    def _placement_from(self, key: str, seen: dict[str, Any] | None) -> Placement:
        assert self.ring is not None
        if seen is None:  # the node did not answer: the explorer's own view of who is down
            return placement(self.ring, key, self.replicas, self.topology.up)
        up = set(seen.get("primaries_up", [])) | {f["id"] for f in seen.get("fallbacks", []) if f.get("up")}
        return placement(self.ring, key, self.replicas, lambda m: m in up)

    def mode_figures(self, run: ModeRun, now_s: float) -> tuple[dict[str, Any], explain_mod.Figures]:
        fig = run.stats.figures(now_s)
        keys = run.verdict.get("keys", {})
        copies = {k: v for k, v in run.copies.items() if k in run.keys}
        agree = sum(1 for c in copies.values() if probe.agree(c)) if copies else None
        figures = explain_mod.Figures(
            mode=run.mode, fault=self.topology.describe(), partitioned=self.topology.partitioned,
            down_nodes=sorted(self.topology.killed | self.topology.paused), skews_ms=dict(self.topology.skews_ms),
            healed_s=(now_s - self.healed_at) if self.healed_at is not None else None,
            majority=fig["majority"], minority=fig["minority"], writes_ok_minority=fig["writes_ok_minority"],
            latency_p50_ms=fig["latency_p50_ms"], keys=len(run.keys),
            keys_invalid=sum(1 for k in keys.values() if k["worst"] == "invalid"),
            keys_invalid_now=sum(1 for k in keys.values() if k["verdict"] == "invalid"),
            keys_checked=sum(1 for k in keys.values() if k["verdict"] != "pending"),
            exact=all(k["exact"] for k in keys.values()), anomalies=run.verdict.get("anomalies", {}),
            agree=agree, probed_keys=len(copies), replicas=self.replicas,
        )
        return fig, figures

    def snapshot(self) -> dict[str, Any]:
        now_s = self.now_s()
        modes: dict[str, Any] = {}
        for mode, run in self.modes.items():
            fig, figures = self.mode_figures(run, now_s)
            keys = run.verdict.get("keys", {})
            modes[mode] = {
                "help": MODE_HELP.get(mode, ""),
                "conflict_mode": run.conflict_mode,
                "keys": run.keys,
                "figures": fig,
                "verdicts": {k: {**keys.get(k, {"verdict": "pending", "worst": "pending"}),
                                 "counterexample": self.latest_counterexample.get((mode, k))} for k in run.keys},
                "anomalies": run.verdict.get("anomalies", {}),
                "convergence": {"agree": figures.agree, "keys": figures.probed_keys,
                                "copies": {k: v for k, v in run.copies.items() if k in run.keys}},
                "explanation": [{"tone": tone, "text": text} for tone, text in explain_mod.explain(figures)],
                "finding": explain_mod.finding(figures),
                "events": run.events,
            }
        counterexamples = [{k: v for k, v in ce.items() if k not in ("svg", "explanation")}
                           for ce in self.counterexamples.values()]
        return {
            "type": "state",
            "t": round(now_s, 2),
            "status": self.status,
            "status_text": self.status_text,
            "busy": self.busy,
            "run": {"number": self.run_number, "seconds": round(time.monotonic() - self.run_started, 1),
                    "stopped": self.run_stopped, "max_minutes": self.cfg.max_minutes,
                    "histories": str(self.out_dir / f"run-{self.run_number}")},
            "cluster": {"nodes": self.node_ids, "replicas": self.replicas,
                        "vnodes": self.ring.vnodes if self.ring else None,
                        "ownership": {m: round(s, 4) for m, s in self.ring.ownership(1).items()} if self.ring else {},
                        "local": self.local, "clusters": sorted(self.controls)},
            "topology": self.topology.to_json(),
            "capabilities": self.capabilities(),
            "modes": modes,
            "skipped_modes": self.unconfigured_modes,
            "counterexamples": counterexamples[-MAX_COUNTEREXAMPLES:],
            "checker_error": self.checker.error,
            "log": list(self.log),
        }
