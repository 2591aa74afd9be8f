"""A throw-away 3-member etcd cluster on 127.0.0.1, the CP baseline of ``benchmarks/run.py``.

Why etcd: it is the usual reference for a replicated, fsyncing, linearizable key-value store
(Raft, a WAL fsynced per batch, ReadIndex for linearizable reads), so "how do we compare with
etcd on the same machine and the same load generator" is the question the issue asks.  Load
goes through etcd's HTTP/JSON gRPC gateway (``POST /v3/kv/put`` and ``/v3/kv/range`` with
base64 keys and values; ranges are linearizable by default), which is HTTP/1.1 like ours, so
wrk drives both the same way.

Process hygiene: each member runs in its own session with its own data directory and ports,
is remembered by PID, and is stopped by that PID only (SIGTERM, then SIGKILL); ``stop`` is
also registered with ``atexit`` so an interrupted benchmark does not leave members behind.
The binary comes from Debian's ``etcd-server`` package (installed when missing and running as
root); without it the baseline is reported as "not available".
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.loadgen import ensure_tool
from kvstore.harness.local_cluster import free_ports, stop_processes


class EtcdError(Exception):
    """etcd could not be installed or did not become healthy."""


def ensure_etcd(install: bool = True) -> str | None:
    return ensure_tool("etcd", ["etcd-server", "etcd-client"], install)


def etcd_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].split(":", 1)[-1].strip() if out else "unknown"


class EtcdCluster:
    def __init__(self, binary: str, members: int = 3) -> None:
        self.binary = binary
        self.names = [f"e{i + 1}" for i in range(members)]
        ports = free_ports(2 * members)
        self.client_ports, self.peer_ports = ports[:members], ports[members:]
        self.data_dir = Path(tempfile.mkdtemp(prefix="kvstore-bench-etcd-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._atexit = False

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def start(self, timeout_s: float = 30.0) -> EtcdCluster:
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True))
        for name, cport, pport in zip(self.names, self.client_ports, self.peer_ports, strict=True):
            member_dir = self.data_dir / name
            member_dir.mkdir(parents=True, exist_ok=True)
            log = open(member_dir / "etcd.log", "ab")  # noqa: SIM115 - handed to the child process
            self.procs[name] = subprocess.Popen(
                [
                    self.binary, "--name", name, "--data-dir", str(member_dir / "data"),
                    "--listen-client-urls", f"http://127.0.0.1:{cport}",
                    "--advertise-client-urls", f"http://127.0.0.1:{cport}",
                    "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", f"kvstore-bench-{os.getpid()}",
                    "--logger", "zap", "--log-level", "error",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise EtcdError(f"etcd member(s) {dead} exited; see {self.data_dir}/<member>/etcd.log")
            if all(self._healthy(u) for u in self.urls):
                return self
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd not healthy after {timeout_s:.0f}s")
            time.sleep(0.1)

    @staticmethod
    def _healthy(url: str) -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1.0) as resp:
                body: Any = json.loads(resp.read())
                return resp.status == 200 and str(body.get("health")) == "true"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items()}

    def stop(self) -> None:
        stop_processes(list(self.procs.values()))
        if self._atexit:
            atexit.unregister(self.stop)
            self._atexit = False
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
