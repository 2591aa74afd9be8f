"""The node warns at start when the open-file limit is below what its connection caps may need."""

from __future__ import annotations

import logging
import resource

import pytest

from kvstore.config import Limits, Member, NodeConfig, validate
from kvstore.server.app import warn_if_few_file_descriptors


def _config(max_http_connections: int) -> NodeConfig:
    members = tuple(Member(f"n{i}", "127.0.0.1", 7000 + i, 7100 + i) for i in range(1, 4))
    return validate(
        NodeConfig(node_id="n1", members=members, secret="s3cret-s3cret",
                   limits=Limits(max_http_connections=max_http_connections))
    )


@pytest.mark.parametrize("soft_limit,warned", [(256, True), (1024, False), (resource.RLIM_INFINITY, False)])
def test_warns_only_when_the_caps_do_not_fit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, soft_limit: int, warned: bool
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft_limit, resource.RLIM_INFINITY))
    caplog.set_level(logging.WARNING, logger="kvstore.server.app")
    warn_if_few_file_descriptors(_config(512))
    lines = [r.getMessage() for r in caplog.records]
    assert bool(lines) is warned, lines
    if warned:
        assert "limits.max_http_connections = 512" in lines[0] and "ulimit -n" in lines[0]
