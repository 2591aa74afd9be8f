"""Integration: ``kvstore cluster up --detach``, ``cluster stop``, ``cluster restart NODE`` and the
foreground supervisor's one line per node death (issue 14, part 3), with real processes.

Each test cleans up by the PIDs it knows (the state file, or the supervisor's own output), even
when it fails; nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.harness import cluster_control
from kvstore.harness.local_cluster import free_ports, port_is_free

pytestmark = pytest.mark.integration

DEADLINE_S = 60.0


def kvstore_cmd(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)


def pick_base_port(nodes: int) -> int:
    """A base port whose HTTP (base..) and peer (base+100..) ranges are free right now."""
    for _ in range(50):
        base = free_ports(1)[0]
        ports = [base + i for i in range(nodes)] + [base + 100 + i for i in range(nodes)]
        if max(ports) < 65536 and all(port_is_free(p) for p in ports):
            return base
    raise AssertionError("no free port range found")


def kill_recorded(data_dir: Path) -> None:
    """Last-resort cleanup: SIGKILL the PIDs the state file records, if they are still those nodes."""
    with contextlib.suppress(cluster_control.ControlError):
        state = cluster_control.ClusterState.load(data_dir)
        for rec in state.nodes.values():
            if rec.pid is not None and cluster_control.is_node_process(rec.pid, rec.config):
                os.kill(rec.pid, signal.SIGKILL)


@pytest.fixture
def detached_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "data"
    try:
        yield data_dir
    finally:
        kill_recorded(data_dir)


def test_up_detach_then_restart_one_node_then_stop(detached_dir: Path) -> None:
    base = pick_base_port(3)
    up = kvstore_cmd("cluster", "up", "--detach", "--nodes", "3", "--replicas", "3",
                     "--data-dir", str(detached_dir), "--base-port", str(base))
    assert up.returncode == 0, up.stderr
    assert "kvstore cluster stop --data-dir" in up.stdout
    state = cluster_control.ClusterState.load(detached_dir)
    assert sorted(state.nodes) == ["n1", "n2", "n3"]
    assert oct(state.path.stat().st_mode & 0o777) == "0o600"
    pids = {n: rec.pid for n, rec in state.nodes.items()}
    assert all(pid is not None and cluster_control.is_node_process(pid, state.nodes[n].config)
               for n, pid in pids.items())
    # The command has exited and the nodes serve: a write and a read through the CLI.
    n1 = f"http://127.0.0.1:{base}"
    put = kvstore_cmd("put", "k", "v1", "--node", n1, "--w", "3")
    assert put.returncode == 0, put.stderr
    # Another `up` on the same directory is refused while the cluster runs.
    again = kvstore_cmd("cluster", "up", "--detach", "--nodes", "3", "--data-dir", str(detached_dir),
                        "--base-port", str(pick_base_port(3)))
    assert again.returncode == 1 and "still running" in again.stderr, again.stderr

    restarted = kvstore_cmd("cluster", "restart", "n2", "--data-dir", str(detached_dir))
    assert restarted.returncode == 0, restarted.stderr
    state = cluster_control.ClusterState.load(detached_dir)
    new_pid = state.nodes["n2"].pid
    assert new_pid is not None and new_pid != pids["n2"]
    assert not cluster_control.is_node_process(pids["n2"], state.nodes["n2"].config)  # the old one is gone
    assert state.nodes["n1"].pid == pids["n1"] and state.nodes["n3"].pid == pids["n3"]
    got = kvstore_cmd("get", "k", "--node", f"http://127.0.0.1:{base + 1}", "--r", "1")  # n2's own copy
    assert got.returncode == 0 and got.stdout == "v1", (got.stdout, got.stderr)

    stopped = kvstore_cmd("cluster", "stop", "--data-dir", str(detached_dir))
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped n1, n2, n3" in stopped.stdout
    state = cluster_control.ClusterState.load(detached_dir)
    assert all(rec.pid is None for rec in state.nodes.values())
    for node_id, pid in {**pids, "n2": new_pid}.items():
        assert pid is not None and not cluster_control.is_node_process(pid, state.nodes[node_id].config)
    assert kvstore_cmd("cluster", "stop", "--data-dir", str(detached_dir)).stdout.startswith(
        "kvstore: no node of this cluster was running")


def test_stop_never_signals_a_pid_that_is_not_the_node(tmp_path: Path) -> None:
    """A recorded PID now used by another program (a reboot, a crash) is left alone."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        state = cluster_control.ClusterState(tmp_path, {
            "n1": cluster_control.NodeRecord(pid=bystander.pid, url="http://127.0.0.1:1", http_port=1, peer_port=2,
                                             config=str(tmp_path / "n1" / "node.toml"), log=str(tmp_path / "n1.log")),
        })
        state.save()
        assert cluster_control.stop(tmp_path, grace_s=0.5) == []
        assert bystander.poll() is None, "the bystander was signalled"
    finally:
        bystander.kill()
        bystander.wait(10)


def test_restart_does_not_call_a_node_dead_before_it_has_execd(tmp_path: Path) -> None:
    """Between fork and exec /proc shows the parent's command line, not the node's: a child that
    still runs must count as starting, not as "the node exited" (this failed on a busy machine)."""
    port = free_ports(1)[0]  # nothing listens there: the child never becomes healthy
    not_yet_the_node = subprocess.Popen(["sleep", "60"])  # alive, /proc cmdline without the config
    rec = cluster_control.NodeRecord(pid=not_yet_the_node.pid, url=f"http://127.0.0.1:{port}", http_port=port,
                                     peer_port=port, config=str(tmp_path / "n1" / "node.toml"),
                                     log=str(tmp_path / "n1.log"))
    try:
        with pytest.raises(cluster_control.ControlError, match="not healthy after"):
            cluster_control.wait_healthy(rec, 0.5, None, not_yet_the_node)
        not_yet_the_node.kill()
        not_yet_the_node.wait(10)
        with pytest.raises(cluster_control.ControlError, match="the node exited"):
            cluster_control.wait_healthy(rec, 30.0, None, not_yet_the_node)
    finally:
        not_yet_the_node.kill()
        not_yet_the_node.wait(10)


def test_stop_and_restart_explain_a_missing_cluster(tmp_path: Path) -> None:
    result = kvstore_cmd("cluster", "stop", "--data-dir", str(tmp_path))
    assert result.returncode == 1 and "no detached cluster" in result.stderr
    result = kvstore_cmd("cluster", "restart", "n1", "--data-dir", str(tmp_path))
    assert result.returncode == 1 and "no detached cluster" in result.stderr


def test_the_foreground_supervisor_reports_a_dead_node_once(tmp_path: Path) -> None:
    stderr_path = tmp_path / "supervisor.err"
    with open(stderr_path, "wb") as err:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "cluster", "up", "--nodes", "3", "--replicas", "3",
             "--data-dir", str(tmp_path / "data"), "--base-port", str(pick_base_port(3))],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
        )
    node_pids: dict[str, int] = {}
    try:
        assert supervisor.stdout is not None
        deadline = time.monotonic() + DEADLINE_S
        for line in supervisor.stdout:
            found = re.match(r"\s+(n\d)\s+http://\S+\s+pid (\d+)", line)
            if found:
                node_pids[found.group(1)] = int(found.group(2))
            if "Ctrl-C stops every node" in line or time.monotonic() > deadline:
                break
        assert sorted(node_pids) == ["n1", "n2", "n3"], (node_pids, stderr_path.read_text())
        os.kill(node_pids["n2"], signal.SIGKILL)

        def lines() -> list[str]:
            return [x for x in stderr_path.read_text().splitlines() if "node n2 exited" in x]

        while not lines():
            assert time.monotonic() < deadline, "the death was never reported"
            time.sleep(0.1)
        # The supervisor polls every 0.2 s: let it poll many more times, then count.
        polls_after = time.monotonic() + 2.0
        while time.monotonic() < polls_after:
            assert supervisor.poll() is None
            time.sleep(0.1)
        assert len(lines()) == 1, lines()
        assert "code -9" in lines()[0] and "node.log" in lines()[0]
    finally:
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(60)
            except subprocess.TimeoutExpired:
                supervisor.kill()
                supervisor.wait(10)
        for pid in node_pids.values():  # the supervisor stops them; this only runs if it could not
            with contextlib.suppress(ProcessLookupError):
                if Path(f"/proc/{pid}/cmdline").exists() and b"kvstore.server.app" in Path(
                        f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        if supervisor.stdout is not None:
            supervisor.stdout.close()


def test_the_state_file_round_trips(tmp_path: Path) -> None:
    rec = cluster_control.NodeRecord(pid=123, url="https://h:1", http_port=1, peer_port=2, config="/c", log="/l")
    cluster_control.ClusterState(tmp_path, {"n1": rec}, ca_file="/ca.pem").save()
    loaded = cluster_control.ClusterState.load(tmp_path)
    assert loaded.nodes == {"n1": rec} and loaded.ca_file == "/ca.pem"
    (tmp_path / "cluster.json").write_text(json.dumps({"format": 99, "nodes": {}}))
    with pytest.raises(cluster_control.ControlError, match="not a kvstore cluster state file"):
        cluster_control.ClusterState.load(tmp_path)


@pytest.mark.parametrize(
    "polls,expected",
    [
        ([{"a": True, "b": True}], [[]]),
        ([{"a": False}, {"a": False}, {"a": False}], [["a"], [], []]),  # once, not once per poll
        ([{"a": False}, {"a": True}, {"a": False}], [["a"], [], ["a"]]),  # back, then dead again
        ([{"a": False, "b": False}, {"a": False, "b": False}], [["a", "b"], []]),
    ],
)
def test_death_reporter_table(polls: list[dict[str, bool]], expected: list[list[str]]) -> None:
    reporter = cluster_control.DeathReporter()
    assert [reporter.newly_dead(poll.items()) for poll in polls] == expected
