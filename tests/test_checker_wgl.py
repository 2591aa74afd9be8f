"""The WGL search: hand-made cases, budgets, and a cross-check against brute force.

The brute-force oracle below is written independently of kvstore.checker.models: it tries
every subset of the info ops and every order that respects real time, and replays it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import pytest

from kvstore.checker.history import History, Op, from_dicts
from kvstore.checker.models import ModelError, make_model
from kvstore.checker.wgl import Search, check_ops, deadline_after


def rows(*lines: str, key: str = "k") -> list[dict[str, Any]]:
    """'0 invoke write 1' / '0 ok read 1' -> op dicts in our format."""
    out: list[dict[str, Any]] = []
    for line in lines:
        process, kind, f, *rest = line.split(maxsplit=3)
        value: Any = None if not rest or rest[0] == "nil" else eval(rest[0])  # noqa: S307 - test literals
        out.append({"process": int(process), "type": kind, "f": f, "key": key, "value": value})
    return out


def verdict(history: History, model: str = "cas-register", **kw: Any) -> str:
    return check_ops("k", history.ops, make_model(model), **kw).verdict


def test_empty_and_trivial() -> None:
    assert check_ops("k", [], make_model("register")).verdict == "valid"
    h = from_dicts(rows("0 invoke read", "0 ok read nil"))
    assert verdict(h) == "valid"


def test_witness_is_a_real_time_order() -> None:
    h = from_dicts(rows("0 invoke write 1", "1 invoke write 2", "0 ok write 1", "1 ok write 2",
                        "2 invoke read", "2 ok read 1"))
    result = check_ops("k", h.ops, make_model("register"), want_witness=True)
    assert result.verdict == "valid"
    assert result.linearization is not None
    order = [h.ops[i].describe() for i in result.linearization]
    assert order == ["write 2", "write 1", "read -> 1"]


def test_counterexample_prefix_and_states() -> None:
    h = from_dicts(rows("0 invoke write 1", "0 ok write 1", "0 invoke write 2", "0 ok write 2",
                        "1 invoke read", "1 ok read 1"))
    result = check_ops("k", h.ops, make_model("register"))
    assert result.verdict == "invalid"
    ce = result.counterexample
    assert ce is not None
    assert ce.prefix == [0, 1] and ce.states == [1, 2] and ce.state == 2
    assert ce.stuck == 2 and ce.pending == [2]


def test_info_ops_nobody_observes_are_pruned() -> None:
    # 30 timed-out writes of values nobody read: without pruning, 2^30 subsets.
    lines = ["0 invoke write 0", "0 ok write 0"]
    lines += [f"{p} invoke write {p}" for p in range(1, 31)]
    lines += [f"{p} info write {p}" for p in range(1, 31)]
    lines += ["99 invoke read", "99 ok read 0"]
    h = from_dicts(rows(*lines))
    result = check_ops("k", h.ops, make_model("register"))
    assert result.verdict == "valid" and result.pruned == 30 and result.explored <= 3


def test_pruning_keeps_observed_info_writes() -> None:
    h = from_dicts(rows("0 invoke write 0", "0 ok write 0", "1 invoke write 5", "1 info write 5",
                        "2 invoke read", "2 ok read 5"))
    result = check_ops("k", h.ops, make_model("register"))
    assert result.verdict == "valid" and result.pruned == 0


def _hard_invalid() -> History:
    lines = [f"{p} invoke write {p}" for p in range(14)]
    lines += [f"{p} ok write {p}" for p in range(14)]
    lines += ["99 invoke read", "99 ok read 1000"]
    return from_dicts(rows(*lines))


def test_state_budget_gives_unknown_never_a_guess() -> None:
    result = check_ops("k", _hard_invalid().ops, make_model("register"), max_states=100)
    assert result.verdict == "unknown" and "states" in (result.reason or "")


def test_search_resumes_where_the_budget_stopped_it() -> None:
    ops = _hard_invalid().ops
    fresh = check_ops("k", ops, make_model("register"))
    search = Search("k", ops, make_model("register"))
    first = search.run(max_states=5000)
    assert first.verdict == "unknown" and 5000 < first.explored < fresh.explored
    second = search.run(max_states=10 * fresh.explored)
    assert second.verdict == fresh.verdict == "invalid"
    assert second.explored == fresh.explored  # nothing was explored twice
    assert search.run(max_states=1) is second  # a decided search keeps its verdict


def test_time_budget_gives_unknown() -> None:
    result = check_ops("k", _hard_invalid().ops, make_model("register"), deadline=lambda: True)
    assert result.verdict == "unknown" and result.reason == "time limit"


def test_deadline_after_uses_the_injected_clock() -> None:
    now = [100.0]
    expired = deadline_after(5.0, clock=lambda: now[0])
    assert not expired()
    now[0] = 105.0
    assert expired()
    assert not deadline_after(None)()


def test_model_rejects_unknown_ops() -> None:
    h = from_dicts(rows("0 invoke cas [1, 2]", "0 ok cas [1, 2]"))
    with pytest.raises(ModelError, match="cas-register"):
        check_ops("k", h.ops, make_model("register"))


# --- brute force oracle -----------------------------------------------------------------------


def brute_force(ops: Sequence[Op], etcd: bool, initial: Any = None) -> bool:
    def relevant(op: Op) -> bool:
        if op.f == "read":
            return op.type == "ok"
        return op.type != "fail" or (etcd and op.f == "cas")

    required = [op for op in ops if relevant(op) and op.type != "info"]
    optional = [op for op in ops if relevant(op) and op.type == "info"]

    def legal(order: Sequence[Op]) -> bool:
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                if b.type != "info" and b.complete is not None and b.complete < a.invoke:
                    return False  # b finished before a started, yet comes after it
        value = initial
        for op in order:
            if op.f == "read":
                if op.result != value:
                    return False
            elif op.f == "write":
                value = op.value
            elif op.f == "cas":
                expected, new = op.value
                if op.type == "fail":
                    if value == expected:
                        return False
                elif value == expected:
                    value = new
                else:
                    return False
        return True

    for size in range(len(optional) + 1):
        for subset in itertools.combinations(optional, size):
            for order in itertools.permutations(required + list(subset)):
                if legal(order):
                    return True
    return False


def random_history(rng: random.Random, n_ops: int) -> History:
    """A run of a real atomic register (each op takes effect inside its interval), then maybe a
    corrupted read, so both verdicts occur."""
    value: Any = None
    events: list[dict[str, Any]] = []
    procs: dict[int, dict[str, Any]] = {}  # process -> open op state
    next_proc = 3
    free = [0, 1, 2]
    started = 0
    while started < n_ops or procs:
        choices = [p for p in free if p not in procs] if started < n_ops else []
        choices += list(procs)
        p = rng.choice(choices)
        if p not in procs:
            f = rng.choice(["read", "write", "cas"])
            arg: Any = None if f == "read" else rng.randrange(3) if f == "write" else [rng.randrange(3), rng.randrange(3)]
            events.append({"process": p, "type": "invoke", "f": f, "key": "k", "value": arg})
            procs[p] = {"f": f, "arg": arg, "done": False, "result": None, "ok": True}
            started += 1
            continue
        st = procs[p]
        if not st["done"] and rng.random() < 0.7:
            st["done"] = True  # the op takes effect now
            if st["f"] == "read":
                st["result"] = value
            elif st["f"] == "write":
                value = st["arg"]
            elif value == st["arg"][0]:
                value = st["arg"][1]
            else:
                st["ok"] = False
            continue
        del procs[p]
        if not st["done"]:
            kind = "fail" if st["f"] == "read" else "info"  # never took effect: unknown outcome
        elif st["f"] == "cas" and not st["ok"]:
            kind = "fail"
        elif st["f"] != "read" and rng.random() < 0.15:
            kind = "info"  # it happened, but the client timed out
        else:
            kind = "ok"
        row: dict[str, Any] = {"process": p, "type": kind, "f": st["f"], "key": "k", "value": st["arg"]}
        if st["f"] == "read" and kind == "ok":
            row["value"] = st["result"]
        events.append(row)
        if kind == "info":
            free.remove(p)
            free.append(next_proc)
            next_proc += 1
    if rng.random() < 0.5:
        reads = [e for e in events if e["f"] == "read" and e["type"] == "ok"]
        if reads:
            rng.choice(reads)["value"] = rng.choice([None, 0, 1, 2])
    return from_dicts(events)


@pytest.mark.parametrize("model", ["cas-register", "etcd"])
def test_agrees_with_brute_force(model: str) -> None:
    rng = random.Random(f"wgl-brute-force-{model}")
    seen = {"valid": 0, "invalid": 0}
    for _ in range(400):
        h = random_history(rng, rng.randint(2, 6))
        expected = brute_force(h.ops, etcd=model == "etcd")
        got = check_ops("k", h.ops, make_model(model)).verdict
        assert got == ("valid" if expected else "invalid"), [op.describe() for op in h.ops]
        seen[got] += 1
    assert seen["valid"] > 50 and seen["invalid"] > 50  # both sides exercised
