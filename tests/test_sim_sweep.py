"""The seed sweep (kvstore sim --seeds): seed lists, the per-seed pick, broken seeds and the CLI.

Runs are short simulated runs; nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kvstore.harness.runner import SCENARIOS
from kvstore.harness.workload import MODES
from kvstore.sim import cli, sweep
from kvstore.sim.run import SimConfig, run_sim
from kvstore.sim.sweep import SeedOutcome, SeedSpecError, SweepResult, parse_seeds, pick, run_seed

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "seeds"),
    [
        ("1..5", [1, 2, 3, 4, 5]),
        ("7", [7]),
        ("3,8,21", [3, 8, 21]),
        ("1..3,10,2..4", [1, 2, 3, 10, 4]),  # a mix; duplicates dropped, first order kept
        (" 5 .. 6 , 9 ", [5, 6, 9]),
        ("-2..0", [-2, -1, 0]),
    ],
)
def test_seed_lists_and_ranges(text: str, seeds: list[int]) -> None:
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "1..", "5..1", "a", "1,,2", "1...3", "0..2000000"])
def test_bad_seed_lists_are_refused(text: str) -> None:
    with pytest.raises(SeedSpecError):
        parse_seeds(text)


def test_the_pick_is_a_function_of_the_seed_and_covers_every_mode_and_nemesis() -> None:
    picks = [pick(seed) for seed in range(1, 1001)]
    assert picks == [pick(seed) for seed in range(1, 1001)]
    assert set(Counter(p.mode for p in picks)) == set(MODES)
    assert set(Counter(p.scenario for p in picks)) == set(SCENARIOS)
    assert 300 < sum(p.random_schedule for p in picks) < 700
    # Restricted picks stay inside the restriction.
    assert {pick(s, ["quorum"], ["pause", "bridge"]).scenario for s in range(50)} == {"pause", "bridge"}
    assert {pick(s, ["quorum"]).mode for s in range(50)} == {"quorum"}


def test_a_run_that_cannot_finish_is_a_broken_seed_with_its_replay(tmp_path: Path) -> None:
    config = SimConfig(mode="quorum", scenario="pause", duration_s=2.0, clients=4, rate_per_s=40.0)
    outcome = run_seed(3, config, str(tmp_path), wall_limit_s=0.05)  # far too short: the wall-clock guard fires
    assert not outcome.ok and outcome.failure == "hung"
    assert "wall-clock limit" in outcome.broken[0]
    assert outcome.replay == "kvstore sim --seed 3 --mode quorum --nemesis pause --duration 2 --clients 4 --rate 40"


def test_a_seed_that_keeps_its_promise_leaves_nothing_behind(tmp_path: Path) -> None:
    config = SimConfig(mode="linearizable", scenario="isolated-node", duration_s=2.0, clients=4, rate_per_s=40.0)
    outcome = run_seed(5, config, str(tmp_path))
    assert outcome.ok, outcome.broken
    assert outcome.out_dir is None and list(tmp_path.iterdir()) == []
    assert outcome.ops > 20
    assert outcome.history_sha256 == run_sim(5, config, tmp_path / "again", judge_history=False).history_sha256


def test_the_cli_reports_every_broken_seed_with_its_replay_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def fake_sweep(seeds: list[int], base: SimConfig, out_root: Path, **kw: Any) -> SweepResult:
        outcomes = []
        for seed, config in sweep.seed_configs(seeds, base, kw.get("modes"), kw.get("scenarios")):
            broken = ["2 acknowledged write(s) lost"] if seed == 2 else []
            outcomes.append(SeedOutcome(seed, config, broken, "ab" * 32, 10, 1.0, 0.5))
            kw["on_done"](outcomes[-1])
        return SweepResult(outcomes, kw["jobs"], 1.0)

    monkeypatch.setattr(sweep, "sweep", fake_sweep)
    assert cli.main(["--seeds", "1..3", "--mode", "quorum", "--jobs", "1", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "1 seed(s) broke" in out and "seed 2: quorum x" in out
    replay = pick(2, ["quorum"])
    assert f"replay: kvstore sim --seed 2 --mode quorum --nemesis {replay.scenario}" in out
    assert cli.main(["--seeds", "1,3", "--mode", "quorum", "--jobs", "1", "--out", str(tmp_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["seeds"] == 2 and document["broken"] == [] and len(document["results"]) == 2


def test_a_sweep_in_worker_processes_replays_seed_by_seed(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore", "sim", "--seeds", "4,11", "--jobs", "2", "--duration", "2", "--clients", "4",
         "--rate", "40", "--json", "--out", str(tmp_path / "sweep")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    document = json.loads(proc.stdout)
    assert proc.returncode == (1 if document["broken"] else 0), proc.stderr[-2000:]
    assert document["seeds"] == 2 and document["jobs"] == 2
    for seed_result in document["results"]:
        chosen = pick(seed_result["seed"])
        assert (seed_result["mode"], seed_result["nemesis"]) == (chosen.mode, chosen.scenario)
        config = SimConfig(mode=chosen.mode, scenario=chosen.scenario, random_schedule=chosen.random_schedule,
                           duration_s=2.0, clients=4, rate_per_s=40.0)
        replay = run_sim(seed_result["seed"], config, tmp_path / f"replay-{seed_result['seed']}", judge_history=False)
        assert replay.history_sha256 == seed_result["history_sha256"]


def test_sweep_usage_errors() -> None:
    for argv in (["--seeds", "5..1"], ["--seed", "1", "--jobs", "2"], ["--seeds", "1..2", "--random-schedule"],
                 ["--seeds", "1..2", "--seed", "3"], ["--seeds", "1", "--jobs", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == cli.EXIT_USAGE
