"""Starting and stopping a local cluster of real node processes on 127.0.0.1.

Theory of operation
-------------------
``LocalCluster`` writes one TOML config per node (same member list everywhere,
so every node computes the same ring), starts each node as its own OS process
(``python -m kvstore node --config ...``), and waits until every ``/health``
answers and every Paxos acceptor votes.  ``start`` writes
``initial_cluster_state = "new"`` (a new cluster: empty Paxos stores are fresh),
then ``"existing"`` once bootstrapped, which ``restart`` also writes (an empty
Paxos store then means the node lost its disk, and it recovers from its peers
before voting: ``kvstore.runtime.register_recovery``).  It remembers each child's PID and only
ever signals those PIDs: ``stop()`` sends SIGTERM, waits, then SIGKILLs stragglers.  ``kill``,
``wipe`` (a killed node's disk is lost), ``restart``, ``pause`` and ``resume`` are the process nemeses of the chaos
harness.  Ports are picked free by the OS unless a base port is given.

It is a context manager and also registers an ``atexit`` hook, so a failing
test or an interrupted run does not leave node processes behind; and each node watches
this process (``kvstore.lifeline``), so not even a SIGKILL of it does.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack

from kvstore import lifeline
from kvstore.config import (
    APSettings,
    Limits,
    Member,
    NodeConfig,
    ServerSettings,
    TLSSettings,
    to_toml,
    validate,
)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class ClusterError(Exception):
    """The cluster could not be started or a node did not become healthy."""


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (a node's config holds the cluster secret).

    The mode is set when the file is created, so the secret is never readable by others, not even
    for a moment, and fixed on an existing file written by an older version.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), PRIVATE_FILE_MODE)
        fh.write(text)


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_processes(procs: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """SIGTERM every child still running, by PID; SIGKILL those that outlive ``grace_s``."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def port_is_free(port: int) -> bool:
    """Whether a node could listen on the port: bound like the nodes bind (SO_REUSEADDR), so a
    previous cluster's connections lingering in TIME_WAIT do not count as "in use"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    def __init__(
        self,
        nodes: int = 5,
        replicas: int = 3,
        *,
        data_dir: str | None = None,
        base_port: int | None = None,
        storage: str = "sqlite",
        fsync: str = "batch",
        conflict_mode: str = "siblings",
        consistency: str = "eventual",
        r: int = 2,
        w: int = 2,
        vnodes: int = 256,
        sloppy: bool = True,
        ap: APSettings | None = None,
        limits: Limits | None = None,
        secret: str | None = None,
        log_level: str = "WARNING",
        spares: int = 0,
        tls: TLSSettings | None = None,
        front_end: str | None = None,  # None: ServerSettings' default
        nodes_per_machine: int = 1,
        exit_with_parent: bool = True,
    ) -> None:
        """``exit_with_parent``: each node exits when this process dies, even by SIGKILL
        (``kvstore.lifeline``); off only for nodes meant to outlive it (``cluster up --detach``).
        ``spares``: extra node ids (n{nodes+1}...) with ports reserved, not members yet: they
        enter with ``join`` (a membership change, kvstore.runtime.reconfig).  ``nodes_per_machine``
        > 1 names machines m1, m2, ... for consecutive nodes (n1, n2 on m1 ...), as a deployment
        with one node per core does (docs/deployment.md, "Using more cores"): a key's replicas then
        go to nodes of distinct machines first, though here every "machine" is this one host."""
        assert nodes >= 1 and spares >= 0 and nodes_per_machine >= 1
        self._owns_dir = data_dir is None
        # Absolute: node processes, and `cluster stop`/`restart` run from elsewhere, find it by this path.
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="kvstore-cluster-")).absolute()  # mkdtemp: 0700
        if base_port is not None:
            http_ports = [base_port + i for i in range(nodes)]
            peer_ports = [base_port + 100 + i for i in range(nodes)]
            busy = [p for p in http_ports + peer_ports if not port_is_free(p)]
            if busy:
                raise ClusterError(f"ports already in use: {busy} (choose another --base-port)")
        else:
            ports = free_ports(2 * (nodes + spares))
            http_ports, peer_ports = ports[: nodes + spares], ports[nodes + spares :]
        if base_port is not None and spares:
            raise ClusterError("spares need OS-picked ports (no --base-port)")
        everyone = tuple(
            Member(f"n{i + 1}", "127.0.0.1", http_ports[i], peer_ports[i],
                   f"m{i // nodes_per_machine + 1}" if nodes_per_machine > 1 else "")
            for i in range(nodes + spares)
        )
        members = everyone[:nodes]
        self.all_members = {m.id: m for m in everyone}
        self._ids = [m.id for m in members]
        # A node that joined later was started with the member list of the change that added it.
        self._members_of: dict[str, tuple[Member, ...]] = {}
        self.secret = secret or secrets.token_hex(16)
        self.base_config = validate(
            NodeConfig(
                node_id="n1",
                members=members,
                secret=self.secret,
                replicas=replicas,
                r=r,
                w=w,
                vnodes=vnodes,
                conflict_mode=conflict_mode,
                consistency=consistency,
                sloppy=sloppy,
                storage=storage,
                data_dir=str(self.data_dir),
                fsync=fsync,
                ap=ap or APSettings(),
                limits=limits or Limits(),
                tls=tls or TLSSettings(),
                server=ServerSettings(front_end=front_end) if front_end else ServerSettings(),
            )
        )
        # Our own HTTPS requests (health, acceptor status) trust the cluster's CA (kvstore.tls).
        self.ssl_context = (
            ssl.create_default_context(cafile=self.base_config.tls.ca_file)
            if self.base_config.scheme == "https" else None
        )
        self.log_level = log_level
        self.exit_with_parent = exit_with_parent
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paused: set[str] = set()
        self._atexit_registered = False

    # --- addresses ---------------------------------------------------------------------------

    @property
    def node_ids(self) -> list[str]:
        """The current members (the initial ones, plus those that joined, minus those that left)."""
        return list(self._ids)

    def url(self, node_id: str) -> str:
        # A member's own address (NetnsCluster rewrites the members' hosts), else a spare's.
        member = next((m for m in self.base_config.members if m.id == node_id), None) or self.all_members[node_id]
        return self.base_config.url_of(member)

    @property
    def urls(self) -> list[str]:
        return [self.url(n) for n in self._ids]

    def config_path(self, node_id: str) -> Path:
        return self.data_dir / node_id / "node.toml"

    def pid(self, node_id: str) -> int:
        return self.procs[node_id].pid

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        # Only the owner may enter (when we create it): the node directories hold the secret and the data.
        self.data_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        for node_id in self.node_ids:
            self._spawn(node_id, "new")
        self.wait_healthy(self.node_ids, timeout_s)
        self.wait_acceptors_active(self.node_ids, timeout_s)
        for node_id in self.node_ids:
            # Bootstrapped: a node started by hand from its node.toml from now on is an existing
            # member (etcd's advice for initial-cluster-state).  Rewriting keeps the file's mode.
            existing = replace(self.base_config, node_id=node_id, initial_cluster_state="existing")
            self.config_path(node_id).write_text(to_toml(existing))
        return self

    def _spawn(self, node_id: str, initial_cluster_state: str = "existing") -> None:
        members = self._members_of.get(node_id, self.base_config.members)
        cfg = replace(self.base_config, node_id=node_id, members=members, initial_cluster_state=initial_cluster_state)
        path = self.config_path(node_id)
        path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path.parent, PRIVATE_DIR_MODE)  # also when an older run created it readable
        write_private(path, to_toml(cfg))
        log = open(path.parent / "node.log", "ab")  # noqa: SIM115 - handed to the child process
        env = lifeline.child_environment({**os.environ, "KVSTORE_LOG": self.log_level}, self.exit_with_parent)
        self.procs[node_id] = subprocess.Popen(
            self.node_command(node_id, path),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the nodes in order
        )
        log.close()

    def node_command(self, node_id: str, config_path: Path) -> list[str]:
        """The command line of one node (``kvstore.harness.netns.NetnsCluster`` runs it in a namespace)."""
        return [sys.executable, "-m", "kvstore.server.app", "--config", str(config_path)]

    def health(self, node_id: str, timeout_s: float = 0.5) -> bool:
        try:
            with urllib.request.urlopen(self.url(node_id) + "/health", timeout=timeout_s,
                                        context=self.ssl_context) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, node_ids: list[str], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(node_ids)
        while pending:
            for node_id in list(pending):
                proc = self.procs.get(node_id)
                if proc is not None and proc.poll() is not None:
                    raise ClusterError(
                        f"node {node_id} exited with code {proc.returncode}; see {self.log_path(node_id)}:\n"
                        + self.log_tail(node_id)
                    )
                if self.health(node_id):
                    pending.remove(node_id)
            if pending and time.monotonic() > deadline:
                raise ClusterError(f"nodes {pending} not healthy after {timeout_s:.0f}s")
            if pending:
                time.sleep(0.05)

    def acceptor_status(self, node_id: str, timeout_s: float = 2.0) -> dict[str, Any]:
        """The node's Paxos acceptor identity and recovery state (``paxos_status``, internal route)."""
        request = urllib.request.Request(
            self.url(node_id) + "/internal/msg",
            data=msgpack.packb({"op": "paxos_status"}, use_bin_type=True),
            headers={"X-Cluster-Secret": self.secret, "X-Node": "cluster", "Content-Type": "application/msgpack"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout_s, context=self.ssl_context) as resp:
            doc = msgpack.unpackb(resp.read(), raw=False)
        if not isinstance(doc, dict):
            raise ClusterError(f"node {node_id}: unexpected paxos_status reply {doc!r}")
        return doc

    def wait_acceptors_active(self, node_ids: list[str], timeout_s: float = 30.0) -> None:
        """Wait until every named node's acceptor votes (a new cluster's nodes decide they are new
        once a majority of them answered each other)."""
        deadline = time.monotonic() + timeout_s
        pending = list(node_ids)
        while pending:
            for node_id in list(pending):
                try:
                    if self.acceptor_status(node_id).get("status") == "active":
                        pending.remove(node_id)
                except (urllib.error.URLError, OSError, ValueError):
                    pass
            if pending and time.monotonic() > deadline:
                raise ClusterError(f"acceptors of {pending} not voting after {timeout_s:.0f}s")
            if pending:
                time.sleep(0.05)

    def log_path(self, node_id: str) -> Path:
        return self.data_dir / node_id / "node.log"

    def log_tail(self, node_id: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path(node_id).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, node_id: str) -> None:
        """SIGKILL one node (the kill nemesis): no shutdown, no flush."""
        proc = self.procs[node_id]
        if proc.poll() is None:
            if node_id in self.paused:
                self.resume(node_id)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def kill_all(self, node_ids: list[str]) -> None:
        """SIGKILL several nodes at once: every signal is sent before waiting for any of them, so
        none of them gets to notice the others' deaths first (a power cut, not a rolling kill)."""
        signalled = []
        for node_id in node_ids:
            proc = self.procs[node_id]
            if proc.poll() is None:
                if node_id in self.paused:
                    self.resume(node_id)
                os.kill(proc.pid, signal.SIGKILL)
                signalled.append(proc)
        for proc in signalled:
            proc.wait(timeout=10)

    def restart(self, node_id: str, timeout_s: float = 30.0) -> None:
        self.restart_many([node_id], timeout_s)

    def restart_many(self, node_ids: list[str], timeout_s: float = 30.0) -> None:
        """Restart nodes from their data: start them all, then wait until every one is healthy."""
        for node_id in node_ids:
            proc = self.procs.get(node_id)
            if proc is not None and proc.poll() is None:
                self.terminate(node_id)
        for node_id in node_ids:
            self._spawn(node_id)
        self.wait_healthy(list(node_ids), timeout_s)

    def terminate(self, node_id: str, timeout_s: float = 10.0) -> None:
        proc = self.procs[node_id]
        if proc.poll() is not None:
            return
        if node_id in self.paused:
            self.resume(node_id)
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def pause(self, node_id: str) -> None:
        os.kill(self.procs[node_id].pid, signal.SIGSTOP)
        self.paused.add(node_id)

    def resume(self, node_id: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.procs[node_id].pid, signal.SIGCONT)
        self.paused.discard(node_id)

    def wipe(self, node_id: str) -> None:
        """Lose a killed node's disk: delete its stores (its config and log stay).  It restarts
        as a new identity and recovers its Paxos state from its peers (the kill-wipe nemesis)."""
        assert not self.alive(node_id), f"wipe {node_id} only once it is dead"
        node_dir = self.data_dir / node_id
        for path in sorted(node_dir.iterdir()):
            if path.name in ("node.toml", "node.log"):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def alive(self, node_id: str) -> bool:
        proc = self.procs.get(node_id)
        return proc is not None and proc.poll() is None

    def stop(self, remove_data: bool | None = None) -> None:
        for node_id in list(self.paused):
            self.resume(node_id)
        stop_processes(list(self.procs.values()))
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False
        if remove_data if remove_data is not None else self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def detach(self) -> None:
        """Leave the running nodes to outlive this process (``cluster up --detach``): no atexit stop."""
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    # --- membership changes (kvstore.runtime.reconfig, /admin/membership) -------------------------------

    def admin(self, node_id: str, method: str, path: str, body: Any = None, timeout_s: float = 10.0) -> dict[str, Any]:
        """One admin request (sent once); raises ClusterError with the JSON error on a non-2xx."""
        request = urllib.request.Request(
            self.url(node_id) + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"X-Cluster-Secret": self.secret, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=self.ssl_context) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ClusterError(f"{method} {path} on {node_id}: {exc.code} {exc.read().decode(errors='replace')}") from None
        assert isinstance(doc, dict)
        return doc

    def wait_membership(self, via: str, version: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until ``via`` (the node driving the change) holds a stable configuration of at least
        ``version`` and is done with it."""
        deadline = time.monotonic() + timeout_s
        while True:
            doc = self.admin(via, "GET", "/admin/membership")
            config, progress = doc["config"], doc["progress"]
            if config["version"] >= version and config["phase"] == "stable" and progress.get("step") == "done":
                return doc  # committed, and ``via`` finished announcing it
            if "error" in progress:
                raise ClusterError(f"the membership change stopped: {progress}")
            if time.monotonic() > deadline:
                raise ClusterError(f"membership not at a stable version >= {version} after {timeout_s:.0f}s: {doc}")
            time.sleep(0.2)

    def join(self, node_id: str, via: str | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
        """Add spare ``node_id``: ask ``via`` (a member) to begin the change, start the node with
        the member list of the joint configuration it answered, wait until the move is committed."""
        seed = via or self._ids[0]
        done = self._bring_in(node_id, seed, {"action": "join", "id": node_id}, timeout_s)
        self._ids.append(node_id)
        return done

    def replace(self, node_id: str, by: str, via: str | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
        """Replace member ``node_id`` by spare ``by`` in one change; ``node_id`` is stopped afterwards."""
        seed = via or next(n for n in self._ids if n != node_id)
        done = self._bring_in(by, seed, {"action": "replace", "id": node_id, "by": by}, timeout_s)
        self._ids = [by if n == node_id else n for n in self._ids]
        if node_id in self.procs:
            self.terminate(node_id)
        return done

    def _bring_in(self, newcomer: str, seed: str, change: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Begin ``change`` (a join or replace of spare ``newcomer``) through ``seed``, start the
        newcomer with the joint configuration's members, wait until the change is committed, and
        leave it a config that restarts it as an existing member."""
        member = self.all_members[newcomer]
        doc = self.admin(seed, "POST", "/admin/membership", {
            **change, "host": member.host, "http_port": member.http_port, "peer_port": member.peer_port,
            **({"machine": member.machine} if member.machine else {}),
        })
        joint = doc["config"]
        self._members_of[newcomer] = tuple(
            Member(m, a["host"], a["http_port"], a["peer_port"], a.get("machine", ""))
            for m, a in sorted(joint["members"].items())
        )
        self._spawn(newcomer, "new")
        self.wait_healthy([newcomer], timeout_s)
        done = self.wait_membership(seed, int(joint["version"]) + 1, timeout_s)
        existing = replace(self.base_config, node_id=newcomer, members=self._members_of[newcomer],
                           initial_cluster_state="existing")
        self.config_path(newcomer).write_text(to_toml(existing))
        return done

    def leave(
        self, node_id: str, via: str | None = None, timeout_s: float = 120.0, stop: bool = True, wipe: bool = False
    ) -> dict[str, Any]:
        """Remove member ``node_id`` (its ranges move to the others first), then stop its process;
        ``wipe`` also deletes its directory, so it can join again as a new node (a spare)."""
        seed = via or next(n for n in self._ids if n != node_id)
        doc = self.admin(seed, "POST", "/admin/membership", {"action": "leave", "id": node_id})
        done = self.wait_membership(seed, int(doc["config"]["version"]) + 1, timeout_s)
        self._ids.remove(node_id)
        if stop and node_id in self.procs:
            self.terminate(node_id)
            if wipe:
                shutil.rmtree(self.data_dir / node_id, ignore_errors=True)
                self._members_of.pop(node_id, None)
        return done

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def cluster_up(args: Any) -> int:
    """``kvstore cluster up``: start the nodes, print their URLs, stop them all on Ctrl-C/SIGTERM
    (with ``--detach``: leave them running, see kvstore.harness.cluster_control)."""
    from kvstore.harness import cluster_control

    detach = bool(getattr(args, "detach", False))
    try:
        if detach and getattr(args, "netns", False):
            # cluster stop signals PIDs only; it would leave the namespaces and the bridge behind.
            print("kvstore: --detach cannot be combined with --netns (cluster stop does not remove namespaces); "
                  "run cluster up --netns in the foreground", file=sys.stderr)
            return 2
        if args.data_dir:
            cluster_control.refuse_if_running(args.data_dir)
        cluster_class: type[LocalCluster] = LocalCluster
        if getattr(args, "netns", False):  # each node its own host on a bridge: kvstore/harness/netns.py
            from kvstore.harness.netns import NetnsCluster

            cluster_class = NetnsCluster
        cluster = cluster_class(
            nodes=args.nodes,
            replicas=args.replicas,
            data_dir=args.data_dir,
            base_port=args.base_port,
            storage=args.storage,
            fsync=args.fsync,
            conflict_mode=getattr(args, "conflict_mode", "siblings"),
            r=getattr(args, "r", None) or min(2, args.replicas),
            w=getattr(args, "w", None) or min(2, args.replicas),
            vnodes=getattr(args, "vnodes", 256),
            log_level="INFO",
            nodes_per_machine=getattr(args, "nodes_per_machine", 1),
            exit_with_parent=not detach,  # detached nodes outlive this command; foreground ones die with it
        )
    except (ClusterError, ValueError, cluster_control.ControlError) as exc:
        print(f"kvstore cluster up: {exc}", file=sys.stderr)
        return 1
    stopping = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"kvstore cluster up: {exc}", file=sys.stderr)
        cluster.stop()
        return 1
    print(f"kvstore: {len(cluster.node_ids)} nodes up (N={args.replicas}), data in {cluster.data_dir}")
    for node_id in cluster.node_ids:
        machine = cluster.all_members[node_id].machine
        print(f"  {node_id}  {cluster.url(node_id)}  pid {cluster.pid(node_id)}" + (f"  machine {machine}" if machine else ""))
    network = getattr(cluster, "network", None)
    if network is not None:
        net = network.describe()
        names = " ".join(node["namespace"] for node in net["nodes"].values())
        print(f"  network namespaces {names} on {net['subnet']} (this host is {net['client_address']})")
    print(f"cluster secret (admin routes): {cluster.secret}")
    if detach:
        cluster.detach()
        state = cluster_control.record_detached(cluster)
        print(f"detached: state in {state.path}; stop with: kvstore cluster stop --data-dir {cluster.data_dir}",
              flush=True)
        return 0
    print("Ctrl-C stops every node.", flush=True)
    deaths = cluster_control.DeathReporter()  # one line per death, not one per 0.2 s poll
    try:
        while not stopping["flag"]:
            for node_id in deaths.newly_dead((n, cluster.alive(n)) for n in cluster.node_ids):
                if not stopping["flag"]:
                    code = cluster.procs[node_id].returncode
                    print(f"kvstore: node {node_id} exited (code {code}); see {cluster.log_path(node_id)}",
                          file=sys.stderr, flush=True)
            time.sleep(0.2)
    finally:
        print("kvstore: stopping nodes...", flush=True)
        cluster.stop(remove_data=False)
        print("kvstore: all nodes stopped.")
    return 0
