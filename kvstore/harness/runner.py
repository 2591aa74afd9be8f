"""Running one chaos scenario: workload + nemesis schedule + final reads -> history.

Theory of operation
-------------------
A run is a fixed sequence: start (or attach to) a cluster, start the workload,
apply the nemesis schedule (each phase starts and stops its faults at set
offsets), stop the workload, heal everything, let the cluster converge
(anti-entropy is triggered on every node), then read every key from every node.
Every step lands in ``history.jsonl``; ``run.json`` records what is needed to
reproduce it (mode, seed, schedule, cluster configuration, versions, command).

The schedule is a pure function of (scenario, duration, seed): the same seed
gives the same faults at the same offsets against the same nodes.  Healing is in
a ``finally``: a Ctrl-C, an exception or a failed nemesis still leaves the
cluster without partitions, skews or stopped processes.
"""

from __future__ import annotations

import asyncio
import json
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

import kvstore
from kvstore.harness.history import HistoryWriter, NemesisLog
from kvstore.harness.nemesis import (
    CUSTOM_PARTITION,
    PARTITION_KINDS,
    SLOW_DISK,
    ClusterControl,
    FaultControl,
    Grudge,
    NemesisError,
    partition_grudge,
)
from kvstore.harness.workload import MODES, Workload, WorkloadSpec

SCENARIOS: dict[str, list[str]] = {
    "majority-partition": ["majority"],
    "isolated-node": ["isolate"],
    "kill-restart": ["kill"],
    "kill-wipe-restart": ["kill-wipe"],
    "kill-all-restart": ["kill-all"],
    "disk-full": ["disk-full"],
    "slow-disk": ["slow-disk"],
    "clock-skew": ["clock-skew"],
    "flaky-links": ["latency", "loss"],
    "bridge": ["bridge"],
    "halves": ["halves"],
    "majorities-ring": ["majorities-ring"],
    "one-way": ["one-way"],
    "pause": ["pause"],
    "membership": ["membership"],
}
SCENARIO_HELP = {
    "majority-partition": "a majority and a minority side, cut from each other",
    "isolated-node": "one node alone",
    "kill-restart": "SIGKILL a node, restart it from its data",
    "kill-wipe-restart": "SIGKILL a node and lose its disk; it restarts empty (a new identity)",
    "kill-all-restart": "SIGKILL every node at once, restart them all from their data",
    "disk-full": "one node's disk refuses every write (the others fail over to another primary)",
    "slow-disk": "one node's fsyncs take 3 s (its writes answer by the deadline, indeterminate)",
    "clock-skew": "one node's clock ahead and one behind (moves LWW timestamps)",
    "flaky-links": "50 ms +/- 40 ms delay and 20% loss on every link",
    "bridge": "two halves sharing one node",
    "halves": "two random halves",
    "majorities-ring": "every node sees a different majority",
    "one-way": "one node hears nobody but can still send",
    "pause": "SIGSTOP a node, SIGCONT it later",
    "membership": "two spare nodes join (ranges streamed to them), then leave again, under the workload",
}
CLOCK_SKEW_MS = 10_000.0


@dataclass
class Phase:
    name: str  # healthy | fault | healed
    start_s: float
    end_s: float
    faults: list[str] = field(default_factory=list)


def fixed_schedule(faults: list[str], duration_s: float) -> list[Phase]:
    """healthy 30% / fault 40% / healed 30% of the duration."""
    healthy_end = round(duration_s * 0.3, 3)
    fault_end = round(duration_s * 0.7, 3)
    return [
        Phase("healthy", 0.0, healthy_end),
        Phase("fault", healthy_end, fault_end, list(faults)),
        Phase("healed", fault_end, duration_s),
    ]


def random_schedule(faults: list[str], duration_s: float, rng: random.Random) -> list[Phase]:
    """Alternating healthy/fault windows of random length (2-6 s), ending healed."""
    phases: list[Phase] = []
    t = 0.0
    while t < duration_s * 0.8:
        calm = rng.uniform(2.0, 4.0)
        phases.append(Phase("healthy", round(t, 3), round(min(duration_s, t + calm), 3)))
        t += calm
        if t >= duration_s * 0.8:
            break
        window = rng.uniform(2.0, 6.0)
        chosen = [rng.choice(faults)]
        phases.append(Phase("fault", round(t, 3), round(min(duration_s * 0.85, t + window), 3), chosen))
        t += window
    phases.append(Phase("healed", round(t, 3), duration_s))
    return [p for p in phases if p.end_s > p.start_s]


@dataclass
class RunSpec:
    scenario: str
    mode: str
    duration_s: float = 30.0
    seed: int = 7
    clients: int = 10
    keys: int = 5
    rate_per_s: float = 100.0
    random_schedule: bool = False
    settle_s: float = 3.0
    key_prefix: str = ""
    phases: list[Phase] | None = None  # an explicit schedule (the simulator's --faults); overrides the above

    def faults(self) -> list[str]:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r} (known: {', '.join(SCENARIOS)})")
        return SCENARIOS[self.scenario]

    def schedule(self) -> list[Phase]:
        if self.phases is not None:
            return [Phase(p.name, p.start_s, p.end_s, list(p.faults)) for p in self.phases]
        if self.random_schedule:
            return random_schedule(self.faults(), self.duration_s, random.Random(f"{self.seed}:schedule"))
        return fixed_schedule(self.faults(), self.duration_s)


@dataclass
class RunResult:
    out_dir: Path
    history_path: Path
    run_json_path: Path
    events: list[dict[str, Any]]
    schedule: list[Phase]
    interrupted: bool = False


class FaultDriver:
    """Starts and stops the faults of one phase, writing nemesis events to the history."""

    def __init__(self, control: FaultControl, history: NemesisLog, rng: random.Random) -> None:
        self.control = control
        self.history = history
        self.rng = rng
        self.active: list[tuple[str, Any]] = []
        self.link: dict[str, float] = {"delay_ms": 0.0, "jitter_ms": 0.0, "loss": 0.0}

    async def start(self, kind: str, target: str | None = None, skew_ms: float | None = None) -> None:
        """Start one fault.  The nodes it hits are drawn from the seeded rng, unless ``target``
        names the node to aim at (the live explorer's clicks); ``skew_ms`` with a target sets
        that node's skew (default +CLOCK_SKEW_MS) instead of one node ahead and one behind."""
        nodes = [n for n in self.control.node_ids if n not in self.control.killed]
        if target is not None and target not in nodes:
            raise NemesisError(f"{target!r} is not a running node (running: {', '.join(nodes)})")
        if kind in PARTITION_KINDS:
            grudge, description = partition_grudge(kind, nodes, self.rng, focus=target)
            await self.start_partition(grudge, {"kind": kind, "groups": description})
        elif kind == "kill":
            victim = target if target is not None else self.rng.choice(nodes)
            await self.control.kill(victim)
            self.history.nemesis("kill", [victim])
            self.active.append((kind, victim))
        elif kind == "kill-wipe":
            victim = target if target is not None else self.rng.choice(nodes)
            await self.control.kill(victim, lose_state=True)
            self.history.nemesis("kill", [victim])
            self.history.nemesis("lose-state", [victim])
            self.active.append((kind, victim))
        elif kind == "kill-all":
            await self.control.kill_all(nodes)
            self.history.nemesis("kill", list(nodes))
            self.active.append((kind, list(nodes)))
        elif kind == "pause":
            victim = target if target is not None else self.rng.choice(nodes)
            await self.control.pause(victim)
            self.history.nemesis("pause", [victim])
            self.active.append((kind, victim))
        elif kind == "clock-skew":
            value: dict[str, Any]
            if target is not None:
                value = {target: CLOCK_SKEW_MS if skew_ms is None else skew_ms}
            else:
                ahead, behind = self.rng.sample(nodes, 2)
                value = {ahead: CLOCK_SKEW_MS, behind: -CLOCK_SKEW_MS}
            for node, node_skew_ms in value.items():
                await self.control.skew(node, node_skew_ms)
            self.history.nemesis("start-skew", value)
            self.active.append((kind, value))
        elif kind in ("disk-full", "slow-disk"):
            victim = target if target is not None else self.rng.choice(nodes)
            faults: dict[str, Any] = {"disk_full": True} if kind == "disk-full" else dict(SLOW_DISK)
            await self.control.disk(victim, faults)
            value = {"node": victim, **faults}
            self.history.nemesis(f"start-{kind}", value)
            self.active.append((kind, value))
        elif kind == "membership":
            # Each join is a whole membership change (joint phase, stream, commit): it takes seconds,
            # so this phase lasts at least that long whatever the schedule says.
            joined: list[str] = []
            for spare in self.control.spares()[:2]:
                await self.control.join(spare)
                joined.append(spare)
            self.history.nemesis("start-membership", {"joined": joined})
            self.active.append((kind, joined))
        elif kind in ("latency", "loss"):
            # Latency and loss combine into one rule per link.
            if kind == "latency":
                self.link.update(delay_ms=50.0, jitter_ms=40.0)
            else:
                self.link.update(loss=0.2)
            await self.control.link_faults(**self.link)
            self.history.nemesis(f"start-{kind}", dict(self.link))
            self.active.append((kind, dict(self.link)))
        else:
            raise NemesisError(f"unknown fault {kind!r}")

    async def start_partition(self, grudge: Grudge, value: dict[str, Any]) -> None:
        """Install a partition and record it (``value`` describes it: its kind and groups).  An
        active partition is replaced without a healed moment in between: its stop is recorded,
        then the new rules replace the old ones on every node."""
        for kind, old in [a for a in self.active if _is_partition(a[0])]:
            self.history.nemesis("stop-partition", old)
            self.active.remove((kind, old))
        await self.control.partition(grudge)
        self.history.nemesis("start-partition", value)
        self.active.append((str(value.get("kind", CUSTOM_PARTITION)), value))

    async def stop(self, kind: str, target: str | None = None) -> None:
        """Undo the active faults of one kind (any partition shape for ``partition``), only
        those aimed at ``target`` when it is given."""
        for active_kind, value in reversed(list(self.active)):
            if not (active_kind == kind or (kind == "partition" and _is_partition(active_kind))):
                continue
            if target is not None and not _aims_at(value, target):
                continue
            self.active.remove((active_kind, value))
            await self._undo(active_kind, value)

    async def stop_all(self) -> None:
        for kind, value in reversed(self.active):
            await self._undo(kind, value)
        self.active.clear()
        self.link = {"delay_ms": 0.0, "jitter_ms": 0.0, "loss": 0.0}

    async def _undo(self, kind: str, value: Any) -> None:
        # The stop event is recorded *before* the fault is undone (and the start event after it
        # was installed), so every op inside a recorded window ran with the fault fully in force.
        if _is_partition(kind):
            self.history.nemesis("stop-partition", value)
            await self.control.set_rules({})
        elif kind in ("kill", "kill-wipe"):
            self.history.nemesis("restart", [value])
            await self.control.restart(value)
        elif kind == "kill-all":
            self.history.nemesis("restart", value)
            await self.control.restart_many(value)
        elif kind == "pause":
            self.history.nemesis("resume", [value])
            await self.control.resume(value)
        elif kind == "clock-skew":
            self.history.nemesis("stop-skew", value)
            for node in value:
                await self.control.skew(node, 0)
        elif kind in ("disk-full", "slow-disk"):
            self.history.nemesis(f"stop-{kind}", value)
            await self.control.disk(value["node"], {})
        elif kind in ("latency", "loss"):
            self.history.nemesis(f"stop-{kind}", value)
            await self.control.set_rules({})
        elif kind == "membership":
            self.history.nemesis("stop-membership", {"leaving": list(value)})
            for node in reversed(value):
                await self.control.leave(node)


def _is_partition(kind: str) -> bool:
    return kind in PARTITION_KINDS or kind == CUSTOM_PARTITION


def _aims_at(value: Any, node: str) -> bool:
    """Whether an active fault's value names ``node`` (a victim, a skewed clock, a disk)."""
    if isinstance(value, str):
        return value == node
    if isinstance(value, list):
        return node in value
    if isinstance(value, dict):
        return node in value or value.get("node") == node
    return False


ProgressFn = Callable[[str, Workload, float], None]


async def run_scenario(
    spec: RunSpec,
    control: FaultControl,
    out_dir: Path,
    *,
    cluster_info: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    command: str | None = None,
) -> RunResult:
    if spec.mode not in MODES:
        raise ValueError(f"unknown mode {spec.mode!r} (known: {', '.join(MODES)})")
    schedule = spec.schedule()
    out_dir.mkdir(parents=True, exist_ok=True)
    history = HistoryWriter(out_dir / "history.jsonl", clock_ns=control.monotonic_ns)
    keys = [f"{spec.key_prefix}k{i}" for i in range(spec.keys)]
    workload_spec = WorkloadSpec(mode=spec.mode, keys=keys, clients=spec.clients, rate_per_s=spec.rate_per_s)
    rng = random.Random(f"{spec.seed}:nemesis")
    driver = FaultDriver(control, history, rng)
    run_info: dict[str, Any] = {
        "scenario": spec.scenario,
        "mode": spec.mode,
        "seed": spec.seed,
        "spec": asdict(spec),
        "schedule": [asdict(p) for p in schedule],
        "workload": asdict(workload_spec),
        "cluster": cluster_info or {"nodes": control.node_ids},
        "versions": {
            "kvstore": kvstore.__version__,
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
        },
        "command": command or " ".join(sys.argv),
        "started_at_unix_s": time.time(),
    }
    interrupted = False
    loop = asyncio.get_running_loop()
    started = loop.time()
    urls, transport = control.client_nodes()
    async with Workload(workload_spec, urls, history, spec.seed, transport=transport) as workload:
        load = asyncio.create_task(workload.run())
        try:
            for phase in schedule:
                for kind in phase.faults:
                    await driver.start(kind)
                await _sleep_until(started + phase.end_s, loop, progress, phase.name, workload, started)
                if phase.faults:
                    await driver.stop_all()
        except (asyncio.CancelledError, KeyboardInterrupt):
            interrupted = True
            raise
        finally:
            workload.stop()
            try:
                await asyncio.wait_for(load, spec.duration_s + 10)
            except (TimeoutError, asyncio.CancelledError):
                load.cancel()
            try:
                await driver.stop_all()
            finally:
                await control.heal_all()
            if not interrupted:
                await _converge(control, spec, progress, workload, started)
                run_info["final_reads_from_index"] = history.index
                await _final_reads(workload, keys, control.node_ids)
            run_info["finished_at_unix_s"] = time.time()
            local = control.local if isinstance(control, ClusterControl) else None
            if local is not None:  # PIDs change when a killed node is restarted
                run_info["cluster"] = {**run_info["cluster"],
                                       "final_pids": {n: local.pid(n) for n in local.node_ids}}
            run_info["interrupted"] = interrupted
            history.close()
            if transport is not None:
                await transport.close()
            (out_dir / "run.json").write_text(json.dumps(run_info, indent=2))
    return RunResult(out_dir, history.path, out_dir / "run.json", history.events, schedule, interrupted)


async def _sleep_until(
    deadline: float,
    loop: asyncio.AbstractEventLoop,
    progress: ProgressFn | None,
    phase: str,
    workload: Workload,
    started: float,
) -> None:
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(0.5, remaining))
        if progress is not None:
            progress(phase, workload, loop.time() - started)


async def _converge(
    control: FaultControl, spec: RunSpec, progress: ProgressFn | None, workload: Workload, started: float
) -> None:
    """After healing: trigger anti-entropy everywhere and give hints/repair time to land."""
    for node in control.node_ids:
        await control.trigger_repair(node)
    loop = asyncio.get_running_loop()
    await _sleep_until(loop.time() + spec.settle_s, loop, progress, "converging", workload, started)


async def _final_reads(workload: Workload, keys: list[str], nodes: list[str]) -> None:
    """Read every key from every node, as fresh processes (the checker's final reads)."""
    final_params = {"r": "all", "consistency": "quorum", "sloppy": "false"} if workload.spec.mode != "linearizable" else {}
    for key in keys:
        for node in nodes:
            await workload.perform(workload.new_process(), node, "read", key, None, params_override=final_params)
