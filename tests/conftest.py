"""Shared fixtures: real node processes on 127.0.0.1 on free ports, always stopped by PID."""

from __future__ import annotations

import http.client as httpclient
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvstore.config import APSettings
from kvstore.harness.local_cluster import LocalCluster

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus" / "porcupine"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def http(
    base_url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> Reply:
    parsed = urllib.parse.urlparse(base_url)
    conn = httpclient.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def kv_path(key: str, **params: object) -> str:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return "/kv/" + urllib.parse.quote(key, safe="") + (f"?{query}" if query else "")


FAST_AP = APSettings(heartbeat_interval_ms=100, anti_entropy_interval_s=3600.0)
# Both HTTP front ends (kvstore.config.FRONT_ENDS) answer the same requests the same way: the
# API and conformance tests run against each (fixtures parametrized with these).
FRONT_ENDS = ["aiohttp", "httptools"]


@pytest.fixture(scope="module", params=FRONT_ENDS)
def cluster5(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """A shared healthy 5-node, N=3 cluster for tests that do not break it (once per front end)."""
    cluster = LocalCluster(5, 3, data_dir=str(tmp_path_factory.mktemp("c5")), ap=FAST_AP, front_end=request.param)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A private 5-node cluster that the test may kill, pause or restart."""
    cluster = LocalCluster(5, 3, data_dir=str(tmp_path / "cluster"), ap=FAST_AP)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
