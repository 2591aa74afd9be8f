"""A seeded, bounded fuzz of every route: no input yields a 500, every error is JSON."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from kvstore.client.http_session import client_session
from kvstore.harness.local_cluster import LocalCluster

pytestmark = pytest.mark.integration

METHODS = ["GET", "PUT", "DELETE", "POST", "PATCH", "HEAD", "OPTIONS"]
PATHS = ["/kv/", "/kv/a", "/kv/%00", "/kv/%E2%82", "/kv/" + "x" * 2000, "/kv/a/b", "/kv/%2F", "/cluster",
         "/health", "/metrics", "/openapi.json", "/admin/repair", "/admin/faults", "/admin/clock", "/internal/msg",
         "/kv", "/"]
PARAMS = ["", "?r=2", "?w=0", "?r=one&w=all", "?consistency=linearizable", "?consistency=quorum&sloppy=true",
          "?timeout_ms=-5", "?timeout_ms=99999999", "?sloppy=1", "?r=%FF", "?x=1", "?r=2&r=3", "?consistency="]
HEADERS: list[dict[str, str]] = [
    {}, {"X-Context": "AAAA"}, {"X-Context": "\u00ff"}, {"If-Match": '"abc"'}, {"If-None-Match": "*"},
    {"If-None-Match": "nope"}, {"X-Cluster-Secret": "wrong"}, {"Content-Type": "application/json"},
    {"If-Match": '"0123456789abcdef"', "If-None-Match": "*"},
]
BODIES = [b"", b"v", b"{}", b"\x80\x81", b'{"rules": {"n9": {}}}', b'{"rules": {"n2": {"loss": 7}}}',
          b'{"skew_ms": "x"}', b"[1, 2]", b"x" * 70000]


def test_no_input_yields_a_500(tmp_path: object) -> None:
    rng = random.Random(20261121)
    problems: list[tuple[object, ...]] = []

    async def go(cluster: LocalCluster) -> int:
        sent = 0
        async with client_session() as session:
            for _ in range(1500):
                method, path = rng.choice(METHODS), rng.choice(PATHS) + rng.choice(PARAMS)
                headers = dict(rng.choice(HEADERS))
                if rng.random() < 0.3:
                    headers["X-Cluster-Secret"] = cluster.secret
                body = rng.choice(BODIES) if method not in ("GET", "HEAD") else None
                url = cluster.urls[rng.randrange(len(cluster.urls))] + path
                async with session.request(method, url, data=body, headers=headers,
                                           timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    raw = await resp.read()
                    sent += 1
                    server_error = resp.status >= 500 and resp.status != 503
                    not_json = resp.status >= 400 and method != "HEAD" and not raw.startswith(b"{")
                    if server_error or not_json:
                        problems.append((method, path, headers, resp.status, raw[:200]))
        return sent

    with LocalCluster(3, 3, storage="memory") as cluster:
        sent = asyncio.run(go(cluster))
        logs = "".join(cluster.log_tail(n, 2000) for n in cluster.node_ids)
        # The fuzz must not have healed or broken anything silently: the cluster still works.
        assert cluster.health("n1")
    assert sent == 1500
    assert problems == []
    assert "Traceback" not in logs
