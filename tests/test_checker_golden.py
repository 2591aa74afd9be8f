"""Golden histories (tests/golden): every semantic rule of the checker, with reasoned verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvstore.checker import Verdict, check

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES: list[dict[str, Any]] = json.loads((GOLDEN / "manifest.json").read_text())["cases"]


def _id(case: dict[str, Any]) -> str:
    suffix = f"-initial={case['initial']}" if "initial" in case else ""
    return f"{case['file']}[{case['model']}{suffix}]"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_golden_verdict(case: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {"initial": case["initial"]} if "initial" in case else {}
    result = check(GOLDEN / case["file"], model=case["model"], **kwargs)
    assert result.valid == Verdict(case["expected"]), case["why"]
    counts = {
        "stale_reads": len(result.analyses.stale_reads),
        "lost_writes": len(result.analyses.lost_writes),
        "sibling_reads": len(result.analyses.sibling_reads),
    }
    for name, expected in case.get("anomalies", {}).items():
        assert counts[name] == expected, f"{name}: {case['why']}"
    if result.valid == Verdict.FALSE:
        bad = result.invalid_keys[0]
        assert bad.counterexample is not None
        stuck = result.op(bad.counterexample.stuck)
        assert stuck.key == bad.key
        assert bad.counterexample.stuck in bad.counterexample.pending
        assert result.explain(bad)


def test_every_golden_file_is_used() -> None:
    used = {c["file"] for c in CASES}
    on_disk = {p.name for p in GOLDEN.iterdir() if p.suffix in (".jsonl", ".edn")}
    assert on_disk == used


def test_independent_edn_is_split_by_key() -> None:
    result = check(GOLDEN / "jepsen-independent.edn", model="cas-register")
    verdicts = {kr.key: kr.verdict for kr in result.keys}
    assert verdicts == {1: "valid", 2: "invalid"}


def test_failed_cas_etcd_counterexample_names_the_cas() -> None:
    result = check(GOLDEN / "failed-cas-matching.jsonl", model="etcd")
    ce = result.invalid_keys[0].counterexample
    assert ce is not None
    blocked = result.op(ce.stuck)
    assert (blocked.f, blocked.type, blocked.value) == ("cas", "fail", (1, 3))
    assert ce.state == 1  # the value the failed compare should not have matched
