"""The public Porcupine/Knossos corpus: 102 etcd histories and 6 kv histories, known verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.checker import Verdict, check

CORPUS = Path(__file__).resolve().parents[2] / "shared/corpus/porcupine"
VERDICTS = CORPUS / "VERDICTS.tsv"


def _cases() -> list[tuple[str, str]]:
    if not VERDICTS.is_file():
        return []
    rows = []
    for line in VERDICTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, expected = line.split("\t")
            rows.append((name, expected))
    return rows


CASES = _cases()
pytestmark = pytest.mark.skipif(not CASES, reason=f"corpus not present at {CORPUS}")


@pytest.mark.parametrize(("name", "expected"), CASES or [("-", "-")], ids=[c[0] for c in CASES] or ["none"])
def test_corpus_verdict(name: str, expected: str) -> None:
    model = "kv" if name.startswith("kv/") else "etcd"
    result = check(CORPUS / "test_data" / name, model=model, initial="" if model == "kv" else None)
    want = Verdict.TRUE if expected == "linearizable" else Verdict.FALSE
    assert result.valid == want
    if want == Verdict.FALSE:
        kr = result.invalid_keys[0]
        assert kr.counterexample is not None and kr.counterexample.pending


def test_corpus_is_complete() -> None:
    assert len(CASES) == 108
    assert sum(1 for name, _ in CASES if name.startswith("jepsen/")) == 102
