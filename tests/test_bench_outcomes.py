"""The benchmarks count outcomes with kvstore.contract and send each request once (issue 11, item 4)."""

from __future__ import annotations

import pytest

from benchmarks.loadgen import LoadResult, LoadSpec, _prepopulate, count_ok, is_ok
from tests.dropping_server import DroppingServer


@pytest.mark.parametrize(
    ("status", "op", "expected"),
    [(204, "put", True), (200, "put", True), (300, "put", False), (404, "put", False), (503, "put", False),
     (200, "get", True), (300, "get", True), (404, "get", True), (503, "get", False), (429, "get", False)],
)
def test_is_ok_follows_the_contract(status: int, op: str, expected: bool) -> None:
    assert is_ok(status, op) is expected


def test_errors_and_ok_agree() -> None:
    result = LoadResult("python", 6, count_ok({"200": 3, "404": 1, "503": 2}, "get"), 1.0, {},
                        {"200": 3, "404": 1, "503": 2}, op="get")
    assert result.ok == 4 and result.errors == 2 and result.error_text() == "errors: 503x2"
    assert LoadResult.from_json(result.to_json()).op == "get"


async def test_prepopulate_does_not_resend_a_write_that_may_have_landed() -> None:
    async with DroppingServer() as server:
        spec = LoadSpec(urls=[server.url], op="put", prefix="p", count=1, duration_s=5.0, connections=1)
        result = await _prepopulate(spec)
    assert len(server.requests) == 1, "a dropped write may have been applied: neither aiohttp nor we re-send it"
    assert result.ok == 0


async def test_prepopulate_sends_again_only_after_a_proven_refusal() -> None:
    async with DroppingServer(reply_status=429) as server:
        spec = LoadSpec(urls=[server.url], op="put", prefix="p", count=1, duration_s=5.0, connections=1)
        result = await _prepopulate(spec)
    assert len(server.requests) == 3 and result.statuses == {"429": 1} and result.ok == 0
