"""The live explorer's HTTP surface: the page and its assets ship in the package, actions are
refused clearly (JSON, stable codes) and only from the explorer's own page; and ``kvstore ui``
attached to a cluster it did not start: faults through the nemesis, no kill, clean exit."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from kvstore.harness.local_cluster import LocalCluster
from kvstore.ui.server import MAX_BODY_BYTES, build_app
from kvstore.ui.session import LiveSession, SessionConfig
from tests.conftest import FAST_AP, http

ACTION_HEADERS = {"X-Explorer": "1", "Content-Type": "application/json"}


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    session = LiveSession(SessionConfig(modes=["eventual"]))  # never started: status "starting"
    async with TestClient(TestServer(build_app(session))) as c:
        yield c


def test_the_page_and_its_assets_ship_in_the_package_and_fetch_nothing_elsewhere() -> None:
    static = resources.files("kvstore.ui").joinpath("static")
    for name in ("index.html", "app.js", "app.css"):
        assert static.joinpath(name).is_file(), name
    page = static.joinpath("index.html").read_text()
    script = static.joinpath("app.js").read_text()
    for text in (page, script, static.joinpath("app.css").read_text()):
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
        assert "url(http" not in text and "@import" not in text
    assert '<script src="/static/app.js">' in page


async def test_serves_the_page_and_refuses_other_files(client: TestClient) -> None:
    resp = await client.get("/")
    assert resp.status == 200 and "live CAP explorer" in await resp.text()
    resp = await client.get("/static/app.js")
    assert resp.status == 200 and resp.content_type == "text/javascript"
    for path in ("/static/..%2Fsession.py", "/static/session.py", "/static/.hidden.js", "/static/nope.js"):
        resp = await client.get(path)
        assert resp.status == 404, path
        assert (await resp.json())["error"] == "no_route"


@pytest.mark.parametrize(("headers", "body", "status", "code"), [
    ({"Content-Type": "application/json"}, b'{"action": "heal-all"}', 403, "forbidden"),
    ({**ACTION_HEADERS, "Origin": "http://evil.example"}, b'{"action": "heal-all"}', 403, "forbidden"),
    (ACTION_HEADERS, b"{not json", 400, "invalid_body"),
    (ACTION_HEADERS, b"[1, 2]", 400, "invalid_body"),
    (ACTION_HEADERS, b'{"action": "heal-all", "pad": "' + b"x" * MAX_BODY_BYTES + b'"}', 413, "body_too_large"),
    (ACTION_HEADERS, b'{"action": "heal-all"}', 409, "busy"),  # the clusters are not up yet
])
async def test_actions_are_refused_clearly(client: TestClient, headers: dict[str, str], body: bytes, status: int,
                                           code: str) -> None:
    resp = await client.post("/api/action", data=body, headers=headers)
    assert resp.status == status
    doc = await resp.json()
    assert doc["error"] == code and doc["message"]


async def test_counterexample_ids(client: TestClient) -> None:
    resp = await client.get("/api/counterexample/abc")
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_parameter"
    resp = await client.get("/api/counterexample/5")
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"


async def test_the_live_feed_sends_a_snapshot_and_only_to_the_own_origin(client: TestClient) -> None:
    ws = await client.ws_connect("/api/ws")
    snap = json.loads(await ws.receive_str(timeout=10))
    assert snap["type"] == "state" and snap["status"] == "starting" and "modes" in snap
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await client.ws_connect("/api/ws", headers={"Origin": "http://evil.example"})
    assert err.value.status == 403


# --- kvstore ui on an existing cluster -------------------------------------------------------------

@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(3, 3, data_dir=str(tmp_path / "c3"), ap=FAST_AP)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _state(url: str) -> dict[str, object]:
    reply = http(url, "GET", "/api/state")
    assert reply.status == 200
    doc = reply.json()
    assert isinstance(doc, dict)
    return doc


def _act(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    reply = http(url, "POST", "/api/action", json.dumps(body).encode(), dict(ACTION_HEADERS), timeout_s=60)
    doc = reply.json()
    assert isinstance(doc, dict)
    return reply.status, doc


@pytest.mark.integration
def test_kvstore_ui_attaches_to_a_running_cluster(cluster3: LocalCluster, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore.cli", "ui", "--node", cluster3.url("n1"), "--secret", cluster3.secret,
         "--no-browser", "--port", "0", "--modes", "eventual,quorum", "--clients", "2", "--rate", "10",
         "--keys", "2", "--out", str(tmp_path / "histories")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+)/", first)
        assert found, first
        url = found.group(1)
        deadline = time.monotonic() + 60
        while _state(url)["status"] != "running":
            assert time.monotonic() < deadline, _state(url)["status_text"]
            time.sleep(0.3)
        state = _state(url)
        assert state["cluster"]["nodes"] == ["n1", "n2", "n3"]  # type: ignore[index]
        assert state["cluster"]["local"] is False  # type: ignore[index]
        caps = state["capabilities"]
        assert caps["partition"] and not caps["kill"] and not caps["pause"]  # type: ignore[index]
        status, doc = _act(url, {"action": "kill", "node": "n2"})
        assert status == 400 and doc["error"] == "refused" and "not available" in str(doc["message"])
        status, doc = _act(url, {"action": "preset", "kind": "isolate", "node": "n3"})
        assert status == 200, doc
        topo = _state(url)["topology"]
        assert topo["groups"] == [["n1", "n2"], ["n3"]]  # type: ignore[index]
        status, doc = _act(url, {"action": "heal-all"})
        assert status == 200, doc
        assert _state(url)["topology"]["partitioned"] is False  # type: ignore[index]
        status, doc = _act(url, {"action": "preset", "kind": "nonsense"})
        assert status == 400 and "unknown preset" in str(doc["message"])
        keys = [k for m in _state(url)["modes"].values() for k in m["keys"]]  # type: ignore[attr-defined]
        assert keys and all(re.match(r"ui-[0-9a-f]{6}\.", k) for k in keys)  # its own keys, not the users'
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 130, out
    assert "interrupted; faults healed" in out and "Traceback" not in out
