"""The kill -9 campaign, small: two rounds under load in every mode (one node, then every node at
once), restarts from the nodes' data, and the checker's verdict on each mode's history.

The full campaign (10 rounds) is run by hand: ``kvstore chaos kill-campaign`` (docs/chaos.md
records the command and what it printed).  This one keeps the same machinery honest in the suite:
the kills really happen (every PID changes after a kill-all), the load continues after each
restart, and the verdict is the checker's -- 0 lost acknowledged writes in eventual, quorum and
linearizable modes, linearizable judged linearizable, and in LWW mode no loss that a later write
does not explain.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from kvstore.harness.history import read_history
from kvstore.harness.kill_campaign import ALL_MODES, CampaignSpec, main, run_campaign

pytestmark = pytest.mark.integration


def test_a_short_kill_campaign_loses_no_acknowledged_write(tmp_path: Path) -> None:
    spec = CampaignSpec(rounds=2, kill_all_every=2, seed=11, healthy_s=1.5, down_s=1.0, rate_per_s=40.0,
                        settle_s=2.0)
    result = await_campaign(spec, tmp_path / "campaign")

    rounds: list[dict[str, Any]] = result["rounds"]
    assert [r["kind"] for r in rounds] == ["kill", "kill-all"]
    for cluster, victim in rounds[0]["killed"].items():
        before, after = rounds[0]["pids_before"][cluster], rounds[0]["pids_after"][cluster]
        assert [n for n in before if before[n] != after[n]] == [victim], cluster  # that node, a new process
    for cluster, victims in rounds[1]["killed"].items():
        assert victims == ["n1", "n2", "n3", "n4", "n5"], cluster  # every node at once
        before, after = rounds[1]["pids_before"][cluster], rounds[1]["pids_after"][cluster]
        assert all(before[n] != after[n] for n in victims), cluster
    for mode in ALL_MODES:
        events = read_history(tmp_path / "campaign" / mode / "history.jsonl")
        nemesis = [e for e in events if e.get("process") == "nemesis"]
        assert [e["f"] for e in nemesis] == ["kill", "restart", "kill", "restart"], mode
        last_restart = nemesis[-1]["index"]
        # Under load through the whole campaign: writes are acknowledged after the last restart.
        assert any(e["type"] == "ok" and e["f"] != "read" and e["index"] > last_restart for e in events), mode

    by_mode = {m["mode"]: m for m in result["modes"]}
    for mode in ("eventual", "quorum", "linearizable"):
        assert by_mode[mode]["lost_writes"] == [], (mode, by_mode[mode])
        assert by_mode[mode]["writes_acknowledged"] > 0
    assert by_mode["linearizable"]["valid"] == "true", by_mode["linearizable"]
    lww_unexplained = [lw for lw in by_mode["eventual-lww"]["lost_writes"] if not lw["replaced_by_a_later_write"]]
    assert lww_unexplained == []
    assert result["passed"] is True


def await_campaign(spec: CampaignSpec, out: Path) -> dict[str, Any]:
    outcome = asyncio.run(run_campaign(spec, out))
    saved = json.loads((out / "campaign.json").read_text())
    assert saved["passed"] == outcome.passed
    assert isinstance(saved, dict)
    return saved


def test_bad_campaign_arguments_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rounds", "0"]) == 2
    assert "rounds must be at least 1" in capsys.readouterr().err
    assert main(["--modes", "eventual,strong"]) == 2
