"""Integration: docs/deployment.md's "Three hosts by hand", run as the page writes it (issue 14, part 3).

The test reads the blocks of that section marked ``deploy-test:three-hosts`` and runs them in
page order: the shell commands with ``sh``, the config files written where the page says, the
nodes started with the page's own command line. Three things are changed, and only these:

* the hosts are three node processes on 127.0.0.1, each with its own two free ports instead of
  192.0.2.11-13 with 7001/7101 (the network-namespace helpers of issue 14 part 4 are not on main
  yet; only loopback is allowed here);
* ``bind = "0.0.0.0"`` becomes ``"127.0.0.1"`` for the same reason;
* ``/etc/kvstore`` and ``/var/lib/kvstore`` are directories of each host's own under a temp dir,
  and ``kvstore`` is this checkout's (steps 1 and 2, install and secret, are not marked).

The page's config files are also loaded unchanged with the node's config loader. Every node
started is stopped by its PID at the end, also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore import config
from kvstore.harness.local_cluster import free_ports
from tests.deploy_doc import Step, read_doc, scenario_steps, section

pytestmark = pytest.mark.integration

SCENARIO = "three-hosts"
STEP_TIMEOUT_S = 200.0  # a block may wait up to 60 s per node for /health, as the page's loop does
DEADLINE_S = 60.0


class Hosts:
    """Three pretend hosts: a root directory each, and the loopback ports standing for their addresses."""

    def __init__(self, tmp_path: Path, names: list[str]) -> None:
        self.names = names
        self.roots = {name: tmp_path / name for name in names}
        for root in self.roots.values():
            root.mkdir()
        self.ports: dict[str, tuple[int, int]] = {}  # a documented address -> (http, peer) here
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "KVSTORE_LOG": "INFO"}
        for var in ("KVSTORE_CACERT", "KVSTORE_SECRET", "KVSTORE_NODE"):
            self.env.pop(var, None)

    def learn_addresses(self, documented_toml: str) -> None:
        if self.ports:
            return
        members = tomllib.loads(documented_toml)["members"]
        ports = free_ports(2 * len(members))
        for i, member in enumerate(members):
            self.ports[member["host"]] = (ports[2 * i], ports[2 * i + 1])

    def localize(self, host: str, text: str) -> str:
        root = self.roots[host]
        for path in ("/etc/kvstore", "/var/lib/kvstore"):
            text = text.replace(path, f"{root}{path}")
        for address, (http_port, _) in self.ports.items():
            text = text.replace(f"{address}:7001", f"127.0.0.1:{http_port}")
        assert not re.search(r"192\.0\.2\.\d+", text), f"an address left unmapped in:\n{text}"
        return text

    def localize_toml(self, host: str, text: str) -> str:
        chunks = text.split("[[members]]")
        out = [chunks[0].replace('bind = "0.0.0.0"', 'bind = "127.0.0.1"')]
        for chunk in chunks[1:]:
            address = re.search(r'^host = "([^"]+)"$', chunk, re.M)
            assert address is not None, chunk
            http_port, peer_port = self.ports[address[1]]
            chunk = chunk.replace(address[0], 'host = "127.0.0.1"')
            chunk = re.sub(r"^http_port = 7001$", f"http_port = {http_port}", chunk, flags=re.M)
            chunk = re.sub(r"^peer_port = 7101$", f"peer_port = {peer_port}", chunk, flags=re.M)
            out.append(chunk)
        return self.localize(host, "[[members]]".join(out))

    def targets(self, target: str) -> list[str]:
        return self.names if target == "all" else [target]

    def run(self, host: str, code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-ec", self.localize(host, code)], cwd=self.roots[host], env=self.env,
                              capture_output=True, text=True, timeout=STEP_TIMEOUT_S, stdin=subprocess.DEVNULL)

    def start(self, host: str, code: str) -> None:
        command = self.localize(host, code).strip()
        assert "\n" not in command, f"a start block is one command, the node itself: {command!r}"
        assert host not in self.procs or self.procs[host].poll() is not None, f"{host} already runs"
        with open(self.roots[host] / "node.log", "ab") as log:
            # exec: the PID is the node's, so the stop step signals the node as the page says.
            self.procs[host] = subprocess.Popen(["sh", "-c", f"exec {command}"], cwd=self.roots[host],
                                                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self, host: str) -> int:
        proc = self.procs[host]
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=DEADLINE_S)

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)

    def log_tail(self, host: str) -> str:
        path = self.roots[host] / "node.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


def host_names(steps: list[Step]) -> list[str]:
    names = {arg for step in steps for arg in step.args[:len(step.args) if step.action in ("start", "stop") else 1]
             if arg != "all"}
    return sorted(names)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    steps = scenario_steps(read_doc(), SCENARIO)
    made = Hosts(tmp_path, host_names(steps))
    try:
        yield made
    finally:
        made.kill_all()


def test_the_three_host_steps_are_marked() -> None:
    """The section still has its marked steps (a page edit that drops markers fails here, not silently)."""
    steps = scenario_steps(read_doc(), SCENARIO)
    actions = [s.action for s in steps]
    assert actions.count("file") == 3 and "start" in actions and "stop" in actions
    assert any(s.options.get("stdout") for s in steps), "no step checks an output"
    body = section(read_doc(), "## Three hosts by hand")
    assert body.count("<!-- deploy-test:three-hosts") == len(steps)


def test_the_documented_configs_load_unchanged() -> None:
    files = [s for s in scenario_steps(read_doc(), SCENARIO) if s.action == "file"]
    loaded = [config.from_dict(tomllib.loads(s.code)) for s in files]
    assert sorted(c.node_id for c in loaded) == ["n1", "n2", "n3"]
    for cfg in loaded:
        assert cfg.bind == "0.0.0.0" and cfg.initial_cluster_state == "new"
        assert {m.host for m in cfg.members} == {"192.0.2.11", "192.0.2.12", "192.0.2.13"}
        assert cfg == config.from_dict(tomllib.loads(files[0].code)).with_node(cfg.node_id)


def cluster_view(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/cluster", timeout=5) as resp:
        view = json.loads(resp.read())
    assert isinstance(view, dict)
    return view


def test_three_hosts_by_hand_as_the_page_says(hosts: Hosts) -> None:
    if not shutil.which("curl"):
        pytest.skip("the page's check step uses curl, which is not installed")
    steps = scenario_steps(read_doc(), SCENARIO)
    outputs_checked = 0
    for step in steps:
        where = f"{step.action} {' '.join(step.args)}"
        if step.action == "file":
            host, path = step.args
            hosts.learn_addresses(step.code)
            target = Path(hosts.localize(host, path))
            assert target.parent.is_dir(), f"{where}: the page's earlier steps did not make {target.parent}"
            target.write_text(hosts.localize_toml(host, step.code), encoding="utf-8")
            config.load(target)  # the localized file still loads
        elif step.action == "run":
            for host in hosts.targets(step.args[0]):
                result = hosts.run(host, step.code)
                detail = f"{where} on {host}: rc {result.returncode}\n{result.stdout}\n{result.stderr}"
                logs = "\n".join(f"--- {h} ---\n{hosts.log_tail(h)}" for h in hosts.names)
                assert result.returncode == 0, f"{detail}\n{logs}"
                if "stdout" in step.options:
                    assert result.stdout.rstrip("\n") == step.options["stdout"], detail
                    outputs_checked += 1
        elif step.action == "start":
            for host in step.args:
                hosts.start(host, step.code)
        elif step.action == "stop":
            for host in step.args:
                assert hosts.stop(host) == 0, f"{host} did not exit cleanly on SIGTERM:\n{hosts.log_tail(host)}"
        else:
            raise AssertionError(f"unknown step {where}")
    assert outputs_checked == 2  # the get on host 3, and on host 2 after its restart

    # Every node sees the three members up, on links nobody refuses.
    urls = [f"http://127.0.0.1:{http_port}" for http_port, _ in hosts.ports.values()]
    deadline = time.monotonic() + DEADLINE_S
    while True:
        views = {url: cluster_view(url) for url in urls}
        states = {url: {m["id"]: m["state"] for m in view["members"]} for url, view in views.items()}
        if all(set(s.values()) == {"up"} and len(s) == 3 for s in states.values()):
            break
        assert time.monotonic() < deadline, f"not all up after {DEADLINE_S:.0f}s: {states}"
        time.sleep(0.5)
    for view in views.values():
        assert view["refused_peers"] == []
    # The config change of step 7 reached the files the nodes read.
    for host in hosts.names:
        node_toml = hosts.roots[host] / "etc" / "kvstore" / "node.toml"
        assert config.load(node_toml).initial_cluster_state == "existing"
        assert oct(node_toml.stat().st_mode & 0o777) == "0o600"
    for host in hosts.names:
        assert oct((hosts.roots[host] / "var" / "lib" / "kvstore").stat().st_mode & 0o777) == "0o700"
