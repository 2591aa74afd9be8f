"""The kv core remembers the parameters of a query it validated (kvstore.server.kv_api.KvApi)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from kvstore.config import Member, NodeConfig, validate
from kvstore.errors import BadRequest
from kvstore.server.kv_api import MAX_REMEMBERED_PARAMS, KvApi, RequestParams


def api() -> KvApi:
    members = tuple(Member(f"n{i}", "127.0.0.1", 9000 + i, 9100 + i) for i in (1, 2, 3))
    cfg = validate(NodeConfig(node_id="n1", members=members, secret="s" * 32, replicas=3, r=2, w=2))
    node: Any = SimpleNamespace(cfg=cfg)
    return KvApi(node)


def fields(params: RequestParams) -> tuple[Any, ...]:
    return params.consistency, params.quorum, params.sloppy, params.timeout_s


@pytest.mark.parametrize("query", [{}, {"w": "3"}, {"consistency": "quorum"}, {"timeout_ms": "5", "sloppy": "no"}])
def test_remembered_parameters_are_those_a_fresh_parse_gives(query: dict[str, str]) -> None:
    core = api()
    for quorum_name in ("r", "w"):
        first = core._request_params(query, quorum_name)
        assert core._request_params(dict(query), quorum_name) is first
        assert fields(first) == fields(RequestParams(query, quorum_name, core.cfg))


@pytest.mark.parametrize("query", [{"w": "4"}, {"x": "1"}, {"w": ""}, {"timeout_ms": "0"}, {"consistency": "q"}])
def test_refused_parameters_are_refused_every_time_and_never_remembered(query: dict[str, str]) -> None:
    core = api()
    for _ in range(2):
        with pytest.raises(BadRequest):
            core._request_params(query, "w")
    assert core._params == {}


def test_remembered_parameters_are_bounded() -> None:
    core = api()
    for timeout_ms in range(1, MAX_REMEMBERED_PARAMS + 20):
        assert core._request_params({"timeout_ms": str(timeout_ms)}, "w").timeout_s == timeout_ms / 1000.0
    assert len(core._params) == MAX_REMEMBERED_PARAMS
