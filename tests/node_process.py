"""Helpers for integration tests that run a node from a config of their own beside a LocalCluster."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvstore.config import NodeConfig, to_toml
from kvstore.harness.local_cluster import write_private

DEADLINE_S = 30.0


def start_node_process(cfg: NodeConfig, data_dir: Path) -> subprocess.Popen[bytes]:
    """Write ``cfg`` to ``data_dir/<id>/node.toml`` and run that node; the caller stops it by PID."""
    node_dir = data_dir / cfg.node_id
    node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(node_dir / "node.toml", to_toml(cfg))
    with open(node_dir / "node.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kvstore.server.app", "--config", str(node_dir / "node.toml")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "KVSTORE_LOG": "INFO"}, start_new_session=True,
        )


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = DEADLINE_S) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s:.0f}s (last: {last!r})")


def cluster_doc(url: str, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    import json

    with urllib.request.urlopen(url + "/cluster", timeout=10, context=context) as resp:
        doc = json.loads(resp.read())
    assert isinstance(doc, dict)
    return doc


def member(doc: dict[str, Any], member_id: str) -> dict[str, Any]:
    (found,) = [m for m in doc["members"] if m["id"] == member_id]
    assert isinstance(found, dict)
    return found
