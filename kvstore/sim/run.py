"""One simulated chaos run: ``(seed, SimConfig) -> (history, verdict)``.

Theory of operation
-------------------
``run_sim(seed, config)`` builds a fresh ``VirtualLoop`` and a ``SimCluster`` (``config.nodes``
real nodes over the simulated network and disks), lets the cluster warm up (failure detectors
see every peer, acceptors are active), then runs the chaos harness's own scenario runner
(``kvstore.harness.runner.run_scenario``: the same workload, the same fault schedule and driver, the same
healing, convergence and final reads) against it through ``SimControl``, and judges the history
with the explorer's judge (``kvstore.explore.report.judge``, i.e. the checker).  Nothing else
varies: a run is fully described by ``(seed, config)``, and the same pair gives a byte-identical
``history.jsonl`` in any process (its sha256 is ``SimResult.history_sha256``).

The verdict says whether the mode kept its promise (``broken``, with reasons):

* ``linearizable``: the history is linearizable;
* ``quorum`` (W=2 of N=3, siblings): no acknowledged write lost, whatever single fault happened
  (a lost disk included: every acknowledged write is on two disks);
* ``eventual`` (W=1, siblings): no acknowledged write lost, except under a fault that loses a
  disk (``kill-wipe``): a write acknowledged by one node is on one disk only until it spreads,
  which is what W=1 means.

  In both sibling modes a write the checker counts as lost is *explained* when the client that
  wrote it later wrote, deleted or cas'ed the same key (not certainly refused): a client sends
  the causal context its write returned, which covers that write, so the later op may have
  superseded it legitimately before any read saw it.  No other client can supersede a value no
  read returned (its context cannot cover it), so every other lost write is a broken promise.
  The checker's lost-write rule does not know causal contexts; ``check.json`` keeps its count.
* ``eventual-lww``: last-write-wins drops concurrent writes by design; nothing to break but
* every mode: no node logged an error (an unhandled exception, a failed assertion in a task).

Node logs: while a run is on, the ``kvstore`` and ``asyncio`` loggers go to an in-memory list
(their records at ERROR and above become ``SimResult.node_errors``); below ERROR they are
dropped, so a run prints nothing but its summary.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kvstore.config import APSettings, Limits
from kvstore.harness.runner import SCENARIOS, Phase, RunSpec, run_scenario
from kvstore.harness.workload import MODES
from kvstore.sim import vloop
from kvstore.sim.cluster import ClusterSpec, SimCluster
from kvstore.sim.control import SimControl
from kvstore.sim.network import Latency

# The explorer's cluster settings (kvstore.explore.matrix: EXPLORE_AP, EXPLORE_LIMITS), so a simulated
# cell and a real one run the same configuration.
SIM_AP = APSettings(heartbeat_interval_ms=100, anti_entropy_interval_s=5.0, read_repair="async")
SIM_LIMITS = Limits(request_timeout_ms=1000, replica_timeout_ms=500)
WIPE_FAULTS = ("kill-wipe",)
MAX_ERRORS_KEPT = 20


@dataclass(frozen=True)
class SimConfig:
    """Everything a simulated run depends on besides its seed."""

    mode: str = "eventual"
    scenario: str = "majority-partition"
    nodes: int = 5
    replicas: int = 3
    duration_s: float = 8.0
    clients: int = 10
    keys: int = 5
    rate_per_s: float = 100.0
    settle_s: float = 2.0
    warmup_s: float = 1.0
    random_schedule: bool = False
    vnodes: int = 256
    ap: APSettings = field(default_factory=lambda: SIM_AP)
    limits: Limits = field(default_factory=lambda: SIM_LIMITS)
    latency: Latency = field(default_factory=Latency)
    # An explicit fault schedule (``--faults``) instead of the nemesis's fixed or random one: what
    # ``--shrink`` reduces.  The nemesis still names the run (and its promise: see broken_promises).
    faults: tuple[FaultWindow, ...] | None = None
    # Test-only: the injected durability bug (kvstore.sim.disk); no node configuration can set it.
    unsafe_skip_fsync_before_ack: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (known: {', '.join(MODES)})")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown nemesis {self.scenario!r} (known: {', '.join(SCENARIOS)})")
        if not 1 <= self.replicas <= self.nodes:
            raise ValueError(f"replicas must be between 1 and nodes ({self.nodes})")
        if self.duration_s <= 0 or self.clients < 1 or self.keys < 1 or self.rate_per_s <= 0:
            raise ValueError("duration, clients, keys and rate must be positive")
        if self.faults is not None:
            check_fault_windows(self.faults, self.duration_s)

    def cluster_spec(self) -> ClusterSpec:
        return ClusterSpec(
            nodes=self.nodes, replicas=self.replicas, conflict_mode=MODES[self.mode]["conflict_mode"],
            vnodes=self.vnodes, ap=self.ap, limits=self.limits, latency=self.latency,
            unsafe_skip_fsync_before_ack=self.unsafe_skip_fsync_before_ack,
        )

    def run_spec(self, seed: int) -> RunSpec:
        phases = phases_from_windows(self.faults, self.duration_s) if self.faults is not None else None
        return RunSpec(
            scenario=self.scenario, mode=self.mode, duration_s=self.duration_s, seed=seed, clients=self.clients,
            keys=self.keys, rate_per_s=self.rate_per_s, random_schedule=self.random_schedule, settle_s=self.settle_s,
            phases=phases,
        )

    def fault_windows(self, seed: int) -> tuple[FaultWindow, ...]:
        """The run's fault windows: the explicit ones, or those of the nemesis's schedule for ``seed``."""
        if self.faults is not None:
            return self.faults
        return tuple(FaultWindow(p.start_s, p.end_s, tuple(p.faults))
                     for p in replace(self, faults=None).run_spec(seed).schedule() if p.faults)

    def fault_kinds(self, seed: int) -> set[str]:
        return {kind for window in self.fault_windows(seed) for kind in window.kinds}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FaultWindow:
    """Faults in force from ``start_s`` to ``end_s`` of the workload (one phase of a schedule)."""

    start_s: float
    end_s: float
    kinds: tuple[str, ...]

    def text(self) -> str:
        return f"{'+'.join(self.kinds)}@{self.start_s:g}-{self.end_s:g}"


FAULT_KINDS = tuple(dict.fromkeys(kind for kinds in SCENARIOS.values() for kind in kinds))


def check_fault_windows(windows: tuple[FaultWindow, ...], duration_s: float) -> None:
    previous_end = 0.0
    for w in windows:
        unknown = [k for k in w.kinds if k not in FAULT_KINDS]
        if not w.kinds or unknown:
            raise ValueError(f"unknown fault {'+'.join(unknown) or '(none)'} (known: {', '.join(FAULT_KINDS)})")
        if not previous_end <= w.start_s < w.end_s <= duration_s:
            raise ValueError(f"fault window {w.text()}: windows must be in order, not overlap, and end by "
                             f"the duration ({duration_s:g} s)")
        previous_end = w.end_s


def parse_fault_windows(text: str) -> tuple[FaultWindow, ...]:
    """``"kill@2.4-5.6,latency+loss@6-7"`` -> windows; ``"none"`` -> no faults at all."""
    if text.strip() == "none":
        return ()
    windows = []
    for item in text.split(","):
        kinds, at, span = item.strip().partition("@")
        start, dash, end = span.partition("-")
        try:
            if not at or not dash:
                raise ValueError
            windows.append(FaultWindow(float(start), float(end), tuple(kinds.split("+"))))
        except ValueError:
            raise ValueError(f"not a fault window KIND[+KIND]@START-END: {item.strip()!r}") from None
    return tuple(windows)


def fault_windows_text(windows: tuple[FaultWindow, ...]) -> str:
    return ",".join(w.text() for w in windows) or "none"


def phases_from_windows(windows: tuple[FaultWindow, ...], duration_s: float) -> list[Phase]:
    """A schedule with these fault windows, healthy between them and healed after the last."""
    phases: list[Phase] = []
    t = 0.0
    for w in windows:
        if w.start_s > t:
            phases.append(Phase("healthy", t, w.start_s))
        phases.append(Phase("fault", w.start_s, w.end_s, list(w.kinds)))
        t = w.end_s
    phases.append(Phase("healed", t, duration_s))
    return [p for p in phases if p.end_s > p.start_s]


@dataclass
class SimResult:
    seed: int
    config: SimConfig
    out_dir: Path
    history_path: Path
    history_sha256: str
    events: list[dict[str, Any]]
    summary: dict[str, Any]  # the explorer's figures for this run (kvstore.explore.report.judge)
    broken: list[str]  # the mode's promises this run broke (empty: kept)
    node_errors: list[str]
    simulated_s: float
    wall_s: float

    @property
    def ok(self) -> bool:
        return not self.broken

    def to_json(self) -> dict[str, Any]:
        figures = {k: v for k, v in self.summary.items() if k not in ("plot_marks", "timeline_svg")}
        return {
            "seed": self.seed, "config": self.config.to_json(), "verdict": "ok" if self.ok else "broken",
            "broken": self.broken, "history": str(self.history_path), "history_sha256": self.history_sha256,
            "ops": len([e for e in self.events if e.get("type") == "invoke"]),
            "node_errors": self.node_errors, "simulated_s": round(self.simulated_s, 3),
            "wall_s": round(self.wall_s, 3), "summary": figures,
        }


def superseded_by_its_client(lost: dict[str, Any], events: list[dict[str, Any]]) -> bool:
    """Whether the client that wrote a lost value later wrote, deleted or cas'ed its key (not a
    certain refusal): then its own causal context may have superseded the value (module docstring)."""
    value, key = lost.get("value"), lost.get("key")
    write = next((e for e in events if e.get("type") == "invoke" and e.get("key") == key
                  and (e.get("value") == value or (e.get("f") == "cas" and isinstance(e.get("value"), list)
                                                   and e["value"][1:] == [value]))), None)
    if write is None or write.get("client") is None:
        return False
    outcome: dict[tuple[Any, Any], str] = {}  # (process, invoke index) -> completion type
    open_invokes: dict[Any, int] = {}
    for e in events:
        if e.get("process") == "nemesis":
            continue
        if e["type"] == "invoke":
            open_invokes[e["process"]] = e["index"]
        elif e["process"] in open_invokes:
            outcome[(e["process"], open_invokes.pop(e["process"]))] = e["type"]
    return any(
        e.get("type") == "invoke" and e["index"] > write["index"] and e.get("client") == write["client"]
        and e.get("key") == key and e.get("f") in ("write", "delete", "cas")
        and outcome.get((e["process"], e["index"]), "info") != "fail"
        for e in events
    )


def broken_promises(
    mode: str, scenario: str, summary: dict[str, Any], node_errors: list[str],
    lost_writes: list[dict[str, Any]] | None = None, events: list[dict[str, Any]] | None = None,
    fault_kinds: set[str] | None = None,
) -> list[str]:
    """The promises of ``mode`` that a run with these figures broke (see the module docstring).

    ``lost_writes`` are the checker's (``check.json``), with the ``events`` of the history."""
    broken: list[str] = []
    kinds = fault_kinds if fault_kinds is not None else set(SCENARIOS[scenario])
    disk_lost = any(kind in WIPE_FAULTS for kind in kinds)
    if mode == "linearizable" and summary["linearizable"] == "false":
        broken.append(f"not linearizable ({len(summary['keys_invalid'])}/{summary['keys']} keys)")
    if summary["lost_writes"] and (mode == "quorum" or (mode == "eventual" and not disk_lost)):
        if lost_writes is None or events is None:
            unexplained = summary["lost_writes"]
        else:
            unexplained = sum(1 for lw in lost_writes if not superseded_by_its_client(lw, events))
        if unexplained:
            broken.append(f"{unexplained} acknowledged write(s) lost")
    if node_errors:
        broken.append(f"{len(node_errors)} error(s) logged by the nodes (first: {node_errors[0]})")
    return broken


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < MAX_ERRORS_KEPT:
            text = f"{record.name}: {record.getMessage()}"
            if record.exc_info and record.exc_info[1] is not None:
                text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
            self.messages.append(text)


async def _simulate(seed: int, config: SimConfig, out_dir: Path) -> float:
    cluster = SimCluster(config.cluster_spec(), seed)
    await cluster.start()
    await asyncio.sleep(config.warmup_s)
    control = SimControl(cluster)
    info = {"simulated": True, **asdict(config.cluster_spec())}
    try:
        await run_scenario(config.run_spec(seed), control, out_dir, cluster_info=info,
                           command=replay_command(seed, config, out_dir))
    finally:
        await cluster.stop()
    return cluster.loop.now_ns / 1e9


def run_sim(seed: int, config: SimConfig, out_dir: Path | None = None, *, judge_history: bool = True) -> SimResult:
    """Run one simulated chaos run and judge it (see the module docstring)."""
    from kvstore.explore.report import judge
    from kvstore.harness.history import read_history

    out = out_dir if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"kvstore-sim-{seed}-"))
    errors = _ErrorLog()
    watched = [logging.getLogger("kvstore"), logging.getLogger("asyncio")]
    saved = [(lg.level, lg.propagate) for lg in watched]
    for lg in watched:
        lg.addHandler(errors)
        lg.setLevel(logging.ERROR)
        lg.propagate = False
    started = time.perf_counter()
    try:
        # A run lasts duration + warm-up + settle + healing; anything far beyond is a livelock.
        budget_s = 10 * (config.duration_s + config.warmup_s + config.settle_s) + 600
        simulated_s = vloop.run(_simulate(seed, config, out), max_time_s=budget_s)
    finally:
        for lg, (level, propagate) in zip(watched, saved, strict=True):
            lg.removeHandler(errors)
            lg.setLevel(level)
            lg.propagate = propagate
    wall_s = time.perf_counter() - started
    history_path = out / "history.jsonl"
    digest = hashlib.sha256(history_path.read_bytes()).hexdigest()
    events = read_history(history_path)
    summary: dict[str, Any] = {}
    broken: list[str] = []
    if judge_history:
        members = config.cluster_spec().node_config("n1", "new").member_ids
        summary = judge(events, config.mode, out, members, config.vnodes, config.replicas)
        lost = json.loads((out / "check.json").read_text())["analyses"]["lost_writes"]
        broken = broken_promises(config.mode, config.scenario, summary, errors.messages, lost, events,
                                 config.fault_kinds(seed))
    return SimResult(seed, config, out, history_path, digest, events, summary, broken, errors.messages,
                     simulated_s, wall_s)


def replay_command(seed: int, config: SimConfig, out_dir: Path | None = None) -> str:
    """The command line that replays this run (defaults omitted)."""
    default = SimConfig()
    parts = ["kvstore", "sim", "--seed", str(seed), "--mode", config.mode, "--nemesis", config.scenario]
    for flag, name in (("--nodes", "nodes"), ("--replicas", "replicas"), ("--duration", "duration_s"),
                       ("--clients", "clients"), ("--keys", "keys"), ("--rate", "rate_per_s")):
        value = getattr(config, name)
        if value != getattr(default, name):
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if config.random_schedule and config.faults is None:
        parts.append("--random-schedule")
    if config.faults is not None:
        parts += ["--faults", fault_windows_text(config.faults)]
    if config.unsafe_skip_fsync_before_ack:
        parts.append("--unsafe-skip-fsync-before-ack")
    if out_dir is not None:
        parts += ["--out", str(out_dir)]
    return " ".join(parts)
