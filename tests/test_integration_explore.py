"""End to end: ``kvstore explore`` on a small matrix, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_explore_small_matrix_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore", "explore", "--modes", "eventual,linearizable",
         "--scenarios", "majority-partition", "--duration", "5", "--seed", "11", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert results == json.loads((out / "results.json").read_text())
    cells = {(c["mode"], c["scenario"]): c for c in results["cells"]}
    assert set(cells) == {("eventual", "majority-partition"), ("linearizable", "majority-partition")}
    for cell in cells.values():
        assert cell["error"] is None
        for field in ("linearizable", "availability_fault_majority", "availability_fault_minority", "stale_reads",
                      "lost_writes", "sibling_reads", "latency_p50_ms", "latency_p99_ms", "finding", "ops"):
            assert field in cell, field
        assert cell["ops"]["total"] > 50, "the run did real work"
        run_dir = Path(cell["dir"])
        assert (run_dir / "history.jsonl").exists() and (run_dir / "run.json").exists()
        assert (run_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lin = cells[("linearizable", "majority-partition")]
    assert lin["linearizable"] == "true", lin["finding"]
    # CP refuses on the side without a majority of the key's replicas; AP keeps answering there.
    assert lin["availability_fault_minority"] is not None and lin["availability_fault_minority"] < 0.2
    eventual = cells[("eventual", "majority-partition")]
    assert eventual["availability_fault_minority"] is not None and eventual["availability_fault_minority"] > 0.8
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "linearizable" in html
    # The pictures: the topology with the partition drawn (cut links), a key's placement on the ring.
    assert html.count('class="topology"') == 2 and "the fault: majority:" in html
    assert 'stroke-dasharray="5 4"><title>' in html  # a link drawn cut
    assert html.count('class="ring"') == 2 and "saw it during the fault" in html
    # Self-contained: nothing is fetched when it opens (no scripts, stylesheets or remote images).
    assert "<script" not in html and "<link" not in html
    assert 'src="http' not in html and "url(http" not in html


def test_explore_refuses_unknown_names(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kvstore", "explore", "--modes", "psychic"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0 and "unknown mode" in proc.stderr


def test_explore_says_clearly_when_no_cluster_can_be_reached(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kvstore", "explore", "--nodes", "http://127.0.0.1:9",
                           "--secret", "abcdefgh", "--quick", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert "cannot reach the cluster" in proc.stderr and "Traceback" not in proc.stderr
