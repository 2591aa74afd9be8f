"""Children exit when the process that started them is killed (``kvstore.lifeline``).

Each test starts a *parent* process of its own (its own session), lets it start children -- a
bare child, a LocalCluster's nodes, ``kvstore sim --seeds`` workers -- reads their PIDs, SIGKILLs
the parent (no cleanup of its own runs) and waits, with a bounded deadline, for every child PID
to be gone.  Nothing here depends on how fast that happens.  Whatever is left at the end (a
failed test) is killed by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore import lifeline

GONE_DEADLINE_S = 60.0  # generous: a node's graceful stop on a busy machine, then the SIGKILL after GRACE_S
REPO_ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited and waiting for init to reap it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_until(condition: object, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """PIDs to SIGKILL at the end if they still run (only a failed test leaves any)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def start_parent(script: str, cleanup: list[int]) -> tuple[subprocess.Popen[str], list[int]]:
    """Run ``script`` as the parent; it prints one JSON line, the PIDs of the children it started."""
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        start_new_session=True,
    )
    cleanup.append(parent.pid)
    assert parent.stdout is not None
    line = parent.stdout.readline()  # the parent's own deadlines bound this
    assert line, f"the parent printed nothing (exit code {parent.wait(timeout=30)})"
    pids: list[int] = json.loads(line)
    cleanup.extend(pids)
    return parent, pids


def kill_parent_and_wait_for_children(parent: subprocess.Popen[Any], pids: list[int]) -> None:
    assert pids and all(alive(p) for p in pids), pids
    parent.kill()
    parent.wait(timeout=30)
    wait_until(lambda: not any(alive(p) for p in pids), f"children {pids} to exit", GONE_DEADLINE_S)


def test_a_watching_child_exits_when_its_parent_is_killed(cleanup: list[int]) -> None:
    child = "import time; from kvstore.lifeline import exit_with_parent_from_env as w; w(); time.sleep(600)"
    parent, pids = start_parent(f"""
        import json, os, subprocess, sys, time
        from kvstore.lifeline import child_environment
        watched = subprocess.Popen([sys.executable, "-c", {child!r}], env=child_environment(os.environ))
        unwatched = subprocess.Popen([sys.executable, "-c", {child!r}], env=child_environment(os.environ, False))
        print(json.dumps([watched.pid, unwatched.pid]), flush=True)
        time.sleep(600)
    """, cleanup)
    watched, unwatched = pids
    kill_parent_and_wait_for_children(parent, [watched])
    assert alive(unwatched), "a child started without the watch (a detached node) outlives its parent"
    os.kill(unwatched, signal.SIGKILL)


def test_a_child_whose_parent_died_before_its_watch_began_exits_at_once(cleanup: list[int]) -> None:
    # The PID handed over is not this process's parent any more: the watch ends the child at once.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; from kvstore.lifeline import exit_with_parent_from_env as w; "
                               "w(); time.sleep(600)"],
        env={**os.environ, lifeline.PARENT_PID_ENV: str(2**22 + 1)},  # above pid_max's default: no such process
    )
    cleanup.append(child.pid)
    assert child.wait(timeout=GONE_DEADLINE_S) == -signal.SIGTERM


def test_the_nodes_of_a_local_cluster_exit_when_the_process_that_started_them_is_killed(
    tmp_path: Path, cleanup: list[int]
) -> None:
    # Started from a worker thread that has ended by the time the parent is killed: the nodes
    # outlive their starting thread (as asyncio.to_thread(cluster.start) needs), not their parent.
    parent, pids = start_parent(f"""
        import json, threading
        import time
        from kvstore.harness.local_cluster import LocalCluster
        cluster = LocalCluster(3, 3, data_dir={str(tmp_path / "cluster")!r})
        starter = threading.Thread(target=cluster.start)
        starter.start()
        starter.join()
        cluster.wait_healthy(cluster.node_ids, 30.0)  # still up after their starting thread ended
        print(json.dumps([cluster.pid(n) for n in cluster.node_ids]), flush=True)
        time.sleep(600)
    """, cleanup)
    assert len(pids) == 3
    kill_parent_and_wait_for_children(parent, pids)


def test_the_workers_of_a_seed_sweep_exit_when_the_sweep_is_killed(tmp_path: Path, cleanup: list[int]) -> None:
    sweep = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "sim", "--seeds", "1..200", "--jobs", "2", "--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT, start_new_session=True,
    )
    cleanup.append(sweep.pid)
    workers: list[int] = []

    def two_workers() -> bool:
        workers[:] = [p for p in children_of(sweep.pid) if b"spawn_main" in cmdline(p)]
        return len(workers) >= 2

    wait_until(two_workers, "the sweep's two workers", 60.0)
    cleanup.extend(workers)
    kill_parent_and_wait_for_children(sweep, workers)
