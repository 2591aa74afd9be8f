"""Local clusters that outlive the command that started them: ``cluster up --detach``, ``stop``, ``restart``.

Theory of operation
-------------------
``kvstore cluster up --detach`` starts the nodes as ``kvstore cluster up`` does (``LocalCluster``),
then writes ``cluster.json`` into the data directory and exits, leaving the node processes running
(each in its own session, its output in ``<data-dir>/<id>/node.log``).  The state file lists every
node's PID, ports, URL, config and log; it is the only thing ``kvstore cluster stop`` and ``kvstore
cluster restart NODE`` read, so they work from any shell.

**Only our own processes are signalled.**  A PID in the file is signalled only while
``/proc/<pid>/cmdline`` still names that node's ``node.toml``: after a reboot or a crash the PID may
belong to another program by now, and that program is left alone (where ``/proc`` does not exist,
the PID is trusted if it is alive).  Nothing is ever found or killed by name.  ``stop`` sends
SIGTERM, waits up to a grace period, then SIGKILLs what is left; the file then records no PIDs.
``restart NODE`` stops that node the same way and starts it again from its own ``node.toml``
(which says ``initial_cluster_state = "existing"`` once the cluster was bootstrapped), then waits
until it answers ``/health``.

``DeathReporter`` serves the foreground supervisor (``cluster up`` without ``--detach``), which
polls its children every 0.2 s: it says once that a node died, not once per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvstore.harness.local_cluster import LocalCluster

STATE_FILE = "cluster.json"
STATE_FORMAT = 1
POLL_S = 0.05


class ControlError(Exception):
    """A detached cluster could not be found, stopped or restarted (one line for the operator)."""


@dataclass
class NodeRecord:
    pid: int | None
    url: str
    http_port: int
    peer_port: int
    config: str
    log: str


@dataclass
class ClusterState:
    data_dir: Path
    nodes: dict[str, NodeRecord]
    ca_file: str | None = None  # to check /health over https

    @property
    def path(self) -> Path:
        return self.data_dir / STATE_FILE

    def save(self) -> None:
        doc = {"format": STATE_FORMAT, "ca_file": self.ca_file,
               "nodes": {node_id: asdict(rec) for node_id, rec in self.nodes.items()}}
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, self.path)  # a reader never sees half a file

    @classmethod
    def load(cls, data_dir: str | Path) -> ClusterState:
        path = Path(data_dir) / STATE_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ControlError(f"no detached cluster in {data_dir} ({STATE_FILE} not found)") from None
        except (OSError, ValueError) as exc:
            raise ControlError(f"{path} is unreadable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or not isinstance(doc.get("nodes"), dict):
            raise ControlError(f"{path} is not a kvstore cluster state file (format {STATE_FORMAT})")
        try:
            nodes = {str(node_id): NodeRecord(**rec) for node_id, rec in doc["nodes"].items()}
        except TypeError as exc:
            raise ControlError(f"{path}: {exc}") from None
        return cls(Path(data_dir), nodes, doc.get("ca_file"))

    def running(self) -> dict[str, int]:
        """The nodes whose recorded PID is still that node's process."""
        return {node_id: rec.pid for node_id, rec in self.nodes.items()
                if rec.pid is not None and is_node_process(rec.pid, rec.config)}


def is_node_process(pid: int, config_path: str) -> bool:
    """Whether ``pid`` is alive and, where /proc tells, still runs the node of ``config_path``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False  # /proc works and has no such process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False  # someone else's process: certainly not a node we started
        return True
    except OSError:
        return False
    # A zombie (exited, not yet reaped) has an empty cmdline: it is gone as far as we care.
    return os.fsencode(config_path) in cmdline.split(b"\0")


def record_detached(cluster: LocalCluster, ca_file: str | None = None) -> ClusterState:
    """Write the state file of a started cluster, whose processes are to outlive this one."""
    nodes = {}
    for node_id in cluster.node_ids:
        m = cluster.base_config.member(node_id)
        nodes[node_id] = NodeRecord(
            pid=cluster.pid(node_id), url=cluster.url(node_id), http_port=m.http_port, peer_port=m.peer_port,
            config=str(cluster.config_path(node_id)), log=str(cluster.log_path(node_id)),
        )
    if ca_file is None and cluster.base_config.scheme == "https":
        ca_file = cluster.base_config.tls.ca_file
    state = ClusterState(cluster.data_dir, nodes, ca_file)
    state.save()
    return state


def refuse_if_running(data_dir: str | Path) -> None:
    """``cluster up`` on a data directory whose detached cluster still runs would fight over its files."""
    try:
        state = ClusterState.load(data_dir)
    except ControlError:
        return
    running = state.running()
    if running:
        pids = ", ".join(f"{n} pid {p}" for n, p in sorted(running.items()))
        raise ControlError(f"a cluster started from {data_dir} is still running ({pids}); "
                           f"stop it first: kvstore cluster stop --data-dir {data_dir}")


def terminate_pids(records: Mapping[str, NodeRecord], grace_s: float) -> list[str]:
    """SIGTERM each node still running, SIGKILL those alive after ``grace_s``; return those signalled."""
    signalled = []
    for node_id, rec in records.items():
        if rec.pid is not None and is_node_process(rec.pid, rec.config):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGTERM)
            signalled.append(node_id)
    deadline = time.monotonic() + grace_s
    left = [n for n in signalled if _alive(records[n])]
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = [n for n in left if _alive(records[n])]
    for node_id in left:
        rec = records[node_id]
        assert rec.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)
    kill_deadline = time.monotonic() + 10.0
    while any(_alive(records[n]) for n in left) and time.monotonic() < kill_deadline:
        time.sleep(POLL_S)
    return signalled


def _alive(rec: NodeRecord) -> bool:
    if rec.pid is None:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(rec.pid, os.WNOHANG)  # reap it if it is our own child (a test), so it leaves /proc
    return is_node_process(rec.pid, rec.config)


def stop(data_dir: str | Path, grace_s: float = 10.0) -> list[str]:
    """Stop every node of the detached cluster in ``data_dir``; return the ids that were running."""
    state = ClusterState.load(data_dir)
    stopped = terminate_pids(state.nodes, grace_s)
    for rec in state.nodes.values():
        rec.pid = None
    state.save()
    return stopped


def restart(data_dir: str | Path, node_id: str, timeout_s: float = 30.0, grace_s: float = 10.0) -> NodeRecord:
    """Stop one node (if it runs) and start it again from its node.toml; wait for /health."""
    state = ClusterState.load(data_dir)
    rec = state.nodes.get(node_id)
    if rec is None:
        raise ControlError(f"no node {node_id!r} in {state.path} (nodes: {', '.join(sorted(state.nodes))})")
    terminate_pids({node_id: rec}, grace_s)
    proc = spawn_node(Path(rec.config), Path(rec.log))
    rec.pid = proc.pid
    state.save()
    wait_healthy(rec, timeout_s, state.ca_file, proc)
    return rec


def spawn_node(config: Path, log_path: Path, log_level: str = "INFO") -> subprocess.Popen[bytes]:
    """Start ``python -m kvstore.server.app --config CONFIG`` in its own session, output appended to the log."""
    if not config.exists():
        raise ControlError(f"{config} does not exist")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore.server.app", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "KVSTORE_LOG": log_level}, start_new_session=True,
        )
    return proc


def health_ok(url: str, ca_file: str | None = None, timeout_s: float = 0.5) -> bool:
    """Whether the node at ``url`` answers ``GET /health`` (through ``kvstore.Client``, from sync code)."""
    from kvstore.client import Client, KvstoreError  # aiohttp: only for the commands that wait on a node

    async def ask() -> None:
        async with Client(url, timeout_s=timeout_s, connect_timeout_s=timeout_s,
                          ca_file=ca_file if url.startswith("https:") else None) as client:
            await client.health()

    try:
        asyncio.run(ask())
    except (KvstoreError, ValueError):  # no answer, or not a 2xx
        return False
    return True


def wait_healthy(rec: NodeRecord, timeout_s: float, ca_file: str | None = None,
                 proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not health_ok(rec.url, ca_file):
        # Our own child is asked directly: until it has exec'd, /proc shows this program's command
        # line, not the node's, and is_node_process would call a starting node dead.
        exited = proc.poll() is not None if proc is not None else rec.pid is None or not _alive(rec)
        if exited:
            raise ControlError(f"the node exited; see {rec.log}")
        if time.monotonic() > deadline:
            raise ControlError(f"{rec.url} not healthy after {timeout_s:.0f}s; see {rec.log}")
        time.sleep(POLL_S)


class DeathReporter:
    """Names each node once when it dies, and again only after it was seen alive in between."""

    def __init__(self) -> None:
        self._reported: set[str] = set()

    def newly_dead(self, alive: Iterable[tuple[str, bool]]) -> list[str]:
        dead = []
        for node_id, is_alive in alive:
            if is_alive:
                self._reported.discard(node_id)
            elif node_id not in self._reported:
                self._reported.add(node_id)
                dead.append(node_id)
        return dead
