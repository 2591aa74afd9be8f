"""kvstore.client.http_session: every session the project makes sends each request once."""

from __future__ import annotations

import re

import aiohttp
import pytest

from kvstore.client.http_session import client_session
from tests.conftest import REPO_ROOT
from tests.dropping_server import DroppingServer


async def _send(session: aiohttp.ClientSession, method: str, url: str) -> None:
    with pytest.raises(aiohttp.ClientError):
        async with session.request(method, url + "/kv/k", data=b"v" if method == "PUT" else None) as resp:
            await resp.read()


@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET"])
async def test_a_dropped_request_is_sent_once(method: str) -> None:
    async with DroppingServer() as server, client_session() as session:
        await _send(session, method, server.url)
    assert [r.method for r in server.requests] == [method]


async def test_a_plain_aiohttp_session_would_send_it_twice() -> None:
    """The control: what client_session prevents (if aiohttp stops re-sending, this says so)."""
    async with DroppingServer() as server, aiohttp.ClientSession() as session:  # KV-SESSION: the control
        await _send(session, "PUT", server.url)
    assert [r.method for r in server.requests] == ["PUT", "PUT"]


def test_no_module_makes_an_aiohttp_session_by_hand() -> None:
    pattern = re.compile(r"\bClientSession\(")
    offenders = []
    for folder in ("kvstore", "chaos", "benchmarks", "tests"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if path.name == "http_session.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line) and "KV-SESSION" not in line:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "make sessions with kvstore.client.http_session.client_session:\n" + "\n".join(offenders)
