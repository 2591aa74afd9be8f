"""The live checker: per-key windows (sound for "not linearizable"), carried info ops, anomalies."""

from __future__ import annotations

import random
from typing import Any

import pytest

from kvstore.checker import analysis
from kvstore.checker.history import from_dicts
from kvstore.ui import verdicts
from kvstore.ui.verdicts import UNKNOWN, LiveChecker, ModeChecker, model_for


class Events:
    """Builds a history the way the workload records it: dense indexes, rising times."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.t = 0

    def add(self, **row: Any) -> dict[str, Any]:
        self.t += 1_000_000  # 1 ms apart
        full = {"index": len(self.rows), "time": self.t, "mode": "eventual", **row}
        self.rows.append(full)
        return full

    def op(self, process: int, f: str, value: Any, result: Any = None, kind: str = "ok", key: str = "k",
           node: str = "n1", **extra: Any) -> None:
        self.add(process=process, type="invoke", f=f, key=key, value=value, node=node)
        done_value = result if f == "read" else value
        self.add(process=process, type=kind, f=f, key=key, value=done_value, node=node, **extra)


def run(rows: list[dict[str, Any]], mode: str = "eventual", chunk: int = 7) -> dict[str, Any]:
    checker = ModeChecker(mode)
    out: dict[str, Any] = {}
    counterexamples = []
    for i in range(0, len(rows), chunk):
        checker.feed(rows[i : i + chunk])
        out = checker.round()
        counterexamples += out["counterexamples"]
    out["all_counterexamples"] = counterexamples
    return out


def test_a_register_history_is_valid_and_exact_in_one_window() -> None:
    h = Events()
    h.op(1, "write", 1)
    h.op(2, "read", None, 1)
    h.op(1, "write", 2)
    out = run(h.rows)
    assert out["keys"]["k"]["verdict"] == "valid" and out["keys"]["k"]["exact"] is True
    assert out["all_counterexamples"] == []


def test_a_stale_read_turns_the_key_not_linearizable_with_its_timeline() -> None:
    h = Events()
    h.op(1, "write", 1)
    h.op(1, "write", 2)
    h.op(2, "read", None, 1, node="n4")  # began after write 2 completed
    out = run(h.rows)
    key = out["keys"]["k"]
    assert key["verdict"] == "invalid" and key["worst"] == "invalid" and key["invalid_windows"] == 1
    [ce] = out["all_counterexamples"]
    assert ce["key"] == "k" and ce["mode"] == "eventual" and ce["exact"] is True
    assert ce["svg"].startswith("<svg") and "not linearizable" in ce["svg"] and "@n4" in ce["svg"]
    assert "read -> 1" in ce["stuck"] and ce["explanation"]
    assert out["anomalies"]["stale_reads"] == 1


def test_windows_close_at_quiescent_points_and_later_windows_start_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verdicts, "WINDOW_OPS", 4)
    h = Events()
    for v in range(1, 5):
        h.op(1, "write", v)
    h.op(2, "read", None, 4)  # window 2 starts here: reads what window 1 left, which it cannot know
    h.op(1, "write", 5)
    h.op(2, "read", None, 5)
    out = run(h.rows, chunk=2)
    key = out["keys"]["k"]
    assert key["window"] == 2 and key["windows_checked"] == 1 and key["exact"] is False
    assert key["verdict"] == "valid" and key["worst"] == "valid"
    # A violation inside a later window is still found.
    h.op(1, "write", 6)
    h.op(1, "write", 7)
    h.op(2, "read", None, 6)
    out = run(h.rows, chunk=2)
    assert out["keys"]["k"]["verdict"] == "invalid" and out["keys"]["k"]["window"] >= 2
    assert out["all_counterexamples"][0]["exact"] is False


def test_an_unknown_write_of_an_earlier_window_may_still_take_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verdicts, "WINDOW_OPS", 3)
    h = Events()
    h.op(1, "write", 1)
    h.op(3, "write", 99, kind="info", error="timeout")  # may land at any time later
    h.op(1, "write", 2)
    h.op(1, "write", 3)  # window 2 from here on
    h.op(2, "read", None, 99)  # only the carried unknown write explains this
    out = run(h.rows, chunk=2)
    key = out["keys"]["k"]
    assert key["window"] == 2 and key["carried_unknown_writes"] == 1
    assert key["verdict"] == "valid", out


def test_model_from_unknown_is_decided_by_the_first_observation() -> None:
    model = model_for("linearizable", first_window=False)
    assert model.initial is UNKNOWN and model.cas
    h = from_dicts([
        {"process": 1, "type": "invoke", "f": "cas", "key": "k", "value": [5, 6]},
        {"process": 1, "type": "ok", "f": "cas", "key": "k", "value": [5, 6]},
        {"process": 2, "type": "invoke", "f": "read", "key": "k"},
        {"process": 2, "type": "ok", "f": "read", "key": "k", "value": 6},
    ])
    cas_step, read_step = (model.compile(op) for op in h.ops)
    assert cas_step is not None and read_step is not None
    assert cas_step.fn(UNKNOWN) == 6 and read_step.fn(UNKNOWN) == 6 and read_step.fn(7) is not UNKNOWN
    assert model_for("eventual", first_window=True).initial is None


def random_register_history(seed: int, ops: int = 300) -> list[dict[str, Any]]:
    """A linearizable history of one key: concurrent clients, each op taking effect at a random
    point between its invoke and its completion; some writes time out (info) and some of those
    take effect."""
    rng = random.Random(seed)
    h = Events()
    value: Any = None
    clients = {c: None for c in range(4)}  # client -> (process, f, arg, effect_done, result)
    process_of = {c: c for c in clients}
    next_process = 100
    written = 0
    while written < ops or any(clients.values()):
        c = rng.choice(list(clients))
        state = clients[c]
        if state is None:
            if written >= ops:
                continue
            written += 1
            f = "read" if rng.random() < 0.5 else "write"
            arg = None if f == "read" else seed * 100_000 + written
            h.add(process=process_of[c], type="invoke", f=f, key="k", value=arg, node=f"n{c + 1}")
            clients[c] = [f, arg, False, None]
            continue
        f, arg, done, result = state
        if not done:
            if f == "write":
                if rng.random() < 0.1:  # times out; took effect or not
                    if rng.random() < 0.5:
                        value = arg
                    h.add(process=process_of[c], type="info", f=f, key="k", value=arg, error="timeout")
                    process_of[c] = next_process
                    next_process += 1
                    clients[c] = None
                    continue
                value = arg
            else:
                result = value
            clients[c] = [f, arg, True, result]
            continue
        h.add(process=process_of[c], type="ok", f=f, key="k", value=result if f == "read" else arg,
              node=f"n{c + 1}")
        clients[c] = None
    return h.rows


@pytest.mark.parametrize("seed", range(12))
def test_windows_never_call_a_linearizable_history_invalid(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verdicts, "WINDOW_OPS", 10 + seed)
    rows = random_register_history(seed)
    out = run(rows, chunk=5 + seed % 4)
    key = out["keys"]["k"]
    assert key["windows_checked"] >= 3, key
    assert key["worst"] in ("valid", "unknown"), out["all_counterexamples"][:1]


def test_anomalies_kept_between_rounds_equal_the_batch_analysis() -> None:
    rng = random.Random(3)
    h = Events()
    h.add(process="nemesis", type="info", f="start-partition",
          value={"kind": "majority", "groups": [["n1", "n2", "n3"], ["n4", "n5"]]})
    stored = {"a": None, "b": None}
    for i in range(400):
        key = rng.choice("ab")
        node = rng.choice(["n1", "n4"])
        if rng.random() < 0.5:
            h.op(i, "write", i, key=key, node=node)
            if node == "n1":
                stored[key] = i
        else:
            h.op(i, "read", None, stored[key] if rng.random() < 0.8 else None, key=key, node=node)
        if i == 200:
            h.add(process="nemesis", type="info", f="stop-partition", value={})
    out = LiveChecker().step({"eventual": h.rows[:301]})
    out = LiveChecker().step({"eventual": h.rows})  # one round over all
    mine = out["eventual"]["anomalies"]
    batch = from_dicts(h.rows)
    assert mine["lost_writes"] + mine["lost_writes_unsettled"] == len(analysis.lost_writes(batch))
    assert mine["stale_reads"] == len(analysis.stale_reads(batch, None))
    assert mine["sibling_reads"] == len(analysis.sibling_reads(batch))
    assert mine["stale_reads"] > 0 and mine["ops"] == 400
    checker = ModeChecker("eventual")
    for i in range(0, len(h.rows), 13):
        checker.feed(h.rows[i : i + 13])
        step = checker.round()
    assert step["anomalies"] == mine  # fed in pieces, the same figures


def test_an_unseen_write_is_lost_only_once_it_settled_and_a_later_read_clears_it() -> None:
    h = Events()
    h.op(0, "write", 1, node="n1")
    h.op(1, "read", None, None, node="n2")  # right after: the replica has not received it yet
    first = anomalies_of(h.rows)
    assert first["lost_writes"] == 0 and first["lost_writes_unsettled"] == 1
    h.t += int(verdicts.LOST_SETTLE_S * 1e9)  # time passes; still no read sees it
    h.op(1, "read", None, None, node="n2")
    settled = anomalies_of(h.rows)
    assert settled["lost_writes"] == 1 and settled["lost_writes_unsettled"] == 0
    assert settled["lost_writes_recent"] == 1
    h.op(2, "read", None, 1, node="n3")  # a later read sees it: not lost after all
    seen = anomalies_of(h.rows)
    assert seen["lost_writes"] == 0 and seen["lost_writes_unsettled"] == 0


def anomalies_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    checker = ModeChecker("eventual")
    checker.feed(rows)
    result: dict[str, Any] = checker.round()["anomalies"]
    return result
