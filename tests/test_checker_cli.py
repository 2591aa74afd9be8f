"""``kvstore check``: output, exit codes (0/1/2, 3 for bad input), JSON, and the HTML report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.checker.cli import main, parse_initial

GOLDEN = Path(__file__).resolve().parent / "golden"


def test_valid_history_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(GOLDEN / "partition.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "LINEARIZABLE" in out and "NOT" not in out
    assert "minority side" in out and "phase partition" in out


def test_invalid_history_exits_1_and_names_the_op(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(GOLDEN / "stale-read.jsonl"), "--model", "register"]) == 1
    out = capsys.readouterr().out
    assert "NOT LINEARIZABLE" in out
    assert "read -> 1" in out and "longest linearizable prefix" in out
    assert "stale reads: 1" in out


def test_unknown_exits_2(tmp_path: Path) -> None:
    rows = [{"process": p, "type": "invoke", "f": "write", "key": "k", "value": p} for p in range(14)]
    rows += [{"process": p, "type": "ok", "f": "write", "key": "k", "value": p} for p in range(14)]
    rows += [{"process": 99, "type": "invoke", "f": "read", "key": "k", "value": None},
             {"process": 99, "type": "ok", "f": "read", "key": "k", "value": 1000}]
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(path), "--max-states", "100", "--json"]) == 2


def test_malformed_history_exits_3_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text('{"process": 0, "type": "invoke", "f": "read", "key": "k"}\n{"process": 0, "type": "ok",\n')
    assert main([str(path)]) == 3
    err = capsys.readouterr().err
    assert f"{path}:2: invalid JSON" in err and "Traceback" not in err


def test_missing_file_and_model_mismatch_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["/nonexistent/history.jsonl"]) == 3
    assert main([str(GOLDEN / "cas-chain.jsonl"), "--model", "register"]) == 3
    err = capsys.readouterr().err
    assert "cannot read" in err and "cas-register" in err


def test_json_output_and_initial(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(GOLDEN / "read-initial.jsonl"), "--initial", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] == "true" and data["initial"] == 0


def test_parse_initial() -> None:
    assert parse_initial("nil") is None
    assert parse_initial("null") is None
    assert parse_initial("0") == 0
    assert parse_initial('"x"') == "x"
    assert parse_initial("abc") == "abc"


def test_report_is_self_contained(tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(GOLDEN / "lost-write.jsonl"), "--report", str(out), "--json"]) == 1
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 3  # the counterexample, the activity chart, every op
    assert not re.search(r"<script|<link|@import|url\(|src=", page)
    # No link to anything outside the file (the SVG namespace is a name, not a fetch). The check is
    # for URLs, not the letters "http": the page names the history's path, which may contain them.
    assert not re.search(r"(?i)\b(?:https?|ftp)://", page.replace("http://www.w3.org/2000/svg", ""))
    assert "cannot be linearized" in page and "#e53935" in page  # the blocked op is drawn red
    assert json.loads((out / "result.json").read_text())["valid"] == "false"


def test_report_png(tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(GOLDEN / "info-write-flickers.jsonl"), "--report", str(out), "--png"]) == 1
    png = (out / "counterexample-0.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "kvstore.checker", str(GOLDEN / "delete.jsonl"), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["valid"] == "true"
