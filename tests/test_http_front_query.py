"""The httptools front end's query parsing (kvstore.server.http_front): what aiohttp's route gives the core."""

from __future__ import annotations

import pytest
from multidict import MultiDict
from yarl import URL

from kvstore.server.http_front import MAX_REMEMBERED_QUERIES, _QueryCache

QUERIES = [
    "w=2", "consistency=quorum&w=2", "r=1&r=3", "w=", "w", "&&w=1&", "a=%41%zz&b=x+y", "timeout_ms=%31%30",
    "w=1;r=2", "=1", "w=%C3%A9", "w=%FF",
]


@pytest.mark.parametrize("query_string", QUERIES)
def test_a_query_reads_as_aiohttp_gives_it(query_string: str) -> None:
    cache = _QueryCache()
    expected: MultiDict[str] = MultiDict(URL("/kv/k?" + query_string).query)
    for _ in range(2):  # parsed, then remembered
        query = cache.parse(query_string)
        assert set(query) == set(expected)
        assert {name: query[name] for name in query} == {name: expected.get(name) for name in expected}


def test_remembered_queries_are_bounded_and_read_only() -> None:
    cache = _QueryCache()
    for i in range(MAX_REMEMBERED_QUERIES + 10):
        assert cache.parse(f"timeout_ms={i}")["timeout_ms"] == str(i)
    assert len(cache._parsed) == MAX_REMEMBERED_QUERIES
    with pytest.raises(TypeError):
        cache.parse("w=1")["w"] = "2"  # type: ignore[index]
