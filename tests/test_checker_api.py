"""The library API the explorer calls in-process: check() -> Result, JSON, scheduling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvstore.checker import HistoryFormatError, ModelError, Verdict, check
from kvstore.checker.core import _run, check_keys
from kvstore.checker.history import from_dicts
from kvstore.checker.models import make_model

GOLDEN = Path(__file__).resolve().parent / "golden"


def ops(key: str, *lines: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for line in lines:
        process, kind, f, *rest = line.split()
        value = None if not rest or rest[0] == "nil" else int(rest[0])
        out.append({"process": int(process), "type": kind, "f": f, "key": key, "value": value})
    return out


def stale(key: str, base: int) -> list[dict[str, Any]]:
    return ops(key, f"{base} invoke write 1", f"{base} ok write 1", f"{base} invoke write 2", f"{base} ok write 2",
               f"{base + 1} invoke read", f"{base + 1} ok read 1")


def fine(key: str, base: int) -> list[dict[str, Any]]:
    return ops(key, f"{base} invoke write 1", f"{base} ok write 1", f"{base + 1} invoke read", f"{base + 1} ok read 1")


def test_check_accepts_op_dicts_and_reports_per_key() -> None:
    result = check(fine("a", 0) + stale("b", 10), model="register")
    assert result.valid == Verdict.FALSE and result.exit_code == 1
    assert {kr.key: kr.verdict for kr in result.keys} == {"a": "valid", "b": "invalid"}
    assert [kr.key for kr in result.invalid_keys] == ["b"]
    assert result.key_result("a").verdict == "valid"


def test_check_accepts_a_path_and_guesses_the_model() -> None:
    assert check(GOLDEN / "cas-chain.jsonl").model == "cas-register"
    assert check(GOLDEN / "delete.jsonl").model == "register"
    assert check(GOLDEN / "kv-append.edn").model == "kv"
    assert check(GOLDEN / "kv-append.edn").initial == ""


def test_to_json_round_trips_with_counterexample() -> None:
    result = check(GOLDEN / "stale-read.jsonl", model="register")
    data = json.loads(result.to_json())
    assert data["valid"] == "false" and data["model"] == "register"
    key = data["keys"][0]
    assert key["verdict"] == "invalid"
    ce = key["counterexample"]
    assert [o["description"] for o in ce["not_linearizable"]] == ["read -> 1"]
    assert [o["description"] for o in ce["longest_linearizable_prefix"]] == ["write 1", "write 2"]
    assert [o["state_after"] for o in ce["longest_linearizable_prefix"]] == [1, 2]
    assert data["analyses"]["stale_reads"][0]["op"] == 2
    assert set(data["analyses"]["availability"]) >= {"overall", "by_phase", "by_side"}


def test_unknown_when_budget_runs_out() -> None:
    lines = [f"{p} invoke write {p}" for p in range(14)] + [f"{p} ok write {p}" for p in range(14)]
    lines += ["99 invoke read", "99 ok read 1000"]
    result = check(ops("k", *lines), model="register", max_states=100)
    assert result.valid == Verdict.UNKNOWN and result.exit_code == 2
    assert "states" in (result.keys[0].reason or "")


def test_invalid_key_stops_the_others_unless_exhaustive() -> None:
    hard = [f"{p} invoke write {p}" for p in range(14)] + [f"{p} ok write {p}" for p in range(14)]
    hard += ["99 invoke read", "99 ok read 1000"]
    history = ops("hard", *hard) + stale("bad", 200)
    groups = from_dicts(history).by_key()
    quick, _ = check_keys(groups, make_model("register"), max_states=300_000, workers=1)
    assert quick["bad"].verdict == "invalid"
    assert quick["hard"].verdict == "unknown" and "another key" in (quick["hard"].reason or "")
    full, _ = check_keys(groups, make_model("register"), max_states=300_000, workers=1, exhaustive=True)
    assert full["hard"].verdict == "invalid"


def test_worker_processes_give_the_serial_answers() -> None:
    model = make_model("register")
    groups = from_dicts(fine("a", 0) + stale("b", 10) + fine("c", 20)).by_key()
    tasks = [(k, v, model, 1000, None) for k, v in groups.items()]
    parallel, used = _run(tasks, workers=2, stop_on_invalid=False)
    serial, _ = _run(tasks, workers=1, stop_on_invalid=False)
    assert used
    assert sorted((kr.key, kr.verdict) for kr in parallel) == sorted((kr.key, kr.verdict) for kr in serial)
    assert sorted((kr.key, kr.verdict) for kr in serial) == [("a", "valid"), ("b", "invalid"), ("c", "valid")]


def test_bad_inputs_raise_typed_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"process": 0, "type": "invoke", "f": "read", "key": "k"}\nnot json\n')
    with pytest.raises(HistoryFormatError) as err:
        check(bad)
    assert err.value.line == 2
    with pytest.raises(ModelError):
        check(GOLDEN / "cas-chain.jsonl", model="register")
    with pytest.raises(ModelError):
        check(GOLDEN / "cas-chain.jsonl", model="nope")
    with pytest.raises(TypeError):
        check(42)  # type: ignore[arg-type]
