"""RateLimitedLog: the first line of a kind at once, then one per interval with a count of the rest."""

from __future__ import annotations

import logging

import pytest

from kvstore.ratelog import RateLimitedLog


def test_one_line_per_kind_per_interval_with_the_count_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("test.ratelog"), interval_s=10.0, now_s=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="test.ratelog")
    steps = [  # (time, kind, logged?)
        (100.0, "a", True),  # first of its kind: at once
        (100.0, "b", True),  # another kind is not held back by "a"
        (101.0, "a", False),
        (109.9, "a", False),
        (110.0, "a", True),  # an interval later, with the two left out
        (110.0, "a", False),
        (125.0, "a", True),
        (126.0, "b", True),
    ]
    for at, kind, logged in steps:
        now[0] = at
        assert limited.warning(kind, "refused %s", kind) is logged, (at, kind)
    assert [r.getMessage() for r in caplog.records] == [
        "refused a",
        "refused b",
        "refused a (and 2 more like it since the last such line)",
        "refused a (and 1 more like it since the last such line)",
        "refused b",
    ]
