"""The harness records what each request proves, and sends each operation once (issue 11, item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.checker import check
from kvstore.contract import answer_outcome
from kvstore.errors import Overloaded
from kvstore.harness.history import HistoryWriter, read_history
from kvstore.harness.workload import Workload, WorkloadSpec
from tests.dropping_server import DroppingServer


@pytest.mark.parametrize("refuse_after", [1, None], ids=["then-killed", "still-listening"])
@pytest.mark.parametrize("f,value", [("write", 7), ("delete", None), ("cas", [1, 2])])
async def test_a_write_whose_connection_drops_is_info_and_sent_once(
    tmp_path: Path, f: str, value: object, refuse_after: int | None
) -> None:
    # The node reads (and applies) the write and drops the connection.  If it is then gone, a hidden
    # re-send meets a refused connection and would record "fail" for a write that took effect; if it
    # still listens, a hidden re-send shows up as a second request.
    async with DroppingServer(refuse_after=refuse_after) as server:
        history = HistoryWriter(tmp_path / "history.jsonl")
        mode = "linearizable" if f == "cas" else "quorum"
        async with Workload(WorkloadSpec(mode=mode, keys=["k"], clients=1), {"n1": server.url}, history, 1) as w:
            kind = await w.perform(0, "n1", f, "k", value)
        history.close()
    assert len(server.requests) == 1, "one HTTP request per recorded operation"
    assert kind == "info"
    events = read_history(tmp_path / "history.jsonl")
    assert [e["type"] for e in events] == ["invoke", "info"]


async def test_a_read_whose_connection_drops_is_info_and_sent_once(tmp_path: Path) -> None:
    async with DroppingServer(refuse_after=1) as server:
        history = HistoryWriter(tmp_path / "history.jsonl")
        async with Workload(WorkloadSpec(mode="quorum", keys=["k"], clients=1), {"n1": server.url}, history, 1) as w:
            kind = await w.perform(0, "n1", "read", "k", None)
        history.close()
    assert len(server.requests) == 1
    assert kind == "info", "a cut read is unknown, not a refusal"


async def test_a_refused_connection_is_a_fail(tmp_path: Path) -> None:
    async with DroppingServer() as server:
        url = server.url
    history = HistoryWriter(tmp_path / "history.jsonl")
    async with Workload(WorkloadSpec(mode="quorum", keys=["k"], clients=1), {"n1": url}, history, 1) as w:
        kind = await w.perform(0, "n1", "write", "k", 1)
    history.close()
    assert kind == "fail", "nothing was sent: the write certainly did not happen"


def test_the_checker_ignores_info_reads() -> None:
    """The harness now records cut or timed-out reads as info (no value): they constrain nothing, are
    no evidence of a lost write or a stale read, and count as unavailable."""
    events = [
        {"process": 0, "type": "invoke", "f": "write", "key": "k", "value": 1, "node": "n1"},
        {"process": 0, "type": "ok", "f": "write", "key": "k", "value": 1, "node": "n1"},
        {"process": 1, "type": "invoke", "f": "read", "key": "k", "value": None, "node": "n2"},
        {"process": 1, "type": "info", "f": "read", "key": "k", "value": None, "node": "n2", "error": "timeout"},
        {"process": 2, "type": "invoke", "f": "read", "key": "k", "value": None, "node": "n3"},
        {"process": 2, "type": "ok", "f": "read", "key": "k", "value": 1, "node": "n3"},
    ]
    result = check(events, model="register")
    assert str(result.valid) == "true"
    analyses = result.analyses
    assert not analyses.lost_writes and not analyses.stale_reads
    overall = analyses.availability.overall
    assert (overall.ok, overall.fail, overall.info) == (2, 0, 1)


def test_overloaded_answers_say_nothing_was_written() -> None:
    body = Overloaded("too many proposals in flight").body()
    assert body["indeterminate"] is False
    assert answer_outcome(503, body, read=False) == "fail"
