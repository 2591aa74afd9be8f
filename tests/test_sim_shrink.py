"""Shrinking simulated runs: ddmin and shrink_int tables, failure kinds, fault windows, and the
injected durability bug shrunk to a short run whose replay command reproduces it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shlex
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import NodeConfig
from kvstore.protocol.ring import key_token
from kvstore.sim import cli, vloop
from kvstore.sim.cluster import ClusterSpec
from kvstore.sim.disk import SimDisk
from kvstore.sim.run import (
    FaultWindow,
    SimConfig,
    fault_windows_text,
    parse_fault_windows,
    phases_from_windows,
    replay_command,
    run_sim,
)
from kvstore.sim.shrink import (
    ShrinkBudgetExhausted,
    ShrinkResult,
    ddmin,
    failure_kinds,
    shrink_int,
    shrink_run,
)

# --- ddmin: pure tables with fake predicates ------------------------------------------------------


def contains_all(needed: set[int]) -> Callable[[list[int]], bool]:
    return lambda items: needed <= set(items)


@pytest.mark.parametrize(
    ("items", "needed", "expected"),
    [
        (list(range(8)), {5}, [5]),
        (list(range(8)), {0, 7}, [0, 7]),
        (list(range(10)), {2, 3, 9}, [2, 3, 9]),
        (list(range(1)), {0}, [0]),
        ([4, 1, 3], {3, 4}, [4, 3]),  # order kept
        (list(range(16)), set(), []),  # fails without any element: the empty list
    ],
)
def test_ddmin_finds_the_elements_the_failure_needs(items: list[int], needed: set[int], expected: list[int]) -> None:
    assert ddmin(items, contains_all(needed)) == expected


def test_ddmin_result_is_one_minimal_for_a_non_monotonic_predicate() -> None:
    # Fails iff exactly two of the elements are even (not monotonic: adding an even one passes).
    def fails(items: list[int]) -> bool:
        return sum(1 for x in items if x % 2 == 0) == 2

    items = [1, 2, 3, 4, 5, 7]
    result = ddmin(items, fails)
    assert fails(result)
    assert all(not fails(result[:i] + result[i + 1:]) for i in range(len(result)))
    assert result == [2, 4]


def test_ddmin_runs_each_subset_test_through_the_predicate_and_propagates_its_exceptions() -> None:
    calls: list[list[int]] = []

    def fails(items: list[int]) -> bool:
        calls.append(items)
        if len(calls) > 3:
            raise ShrinkBudgetExhausted
        return 6 in items

    with pytest.raises(ShrinkBudgetExhausted):
        ddmin(list(range(32)), fails)
    assert calls[0] == []  # the empty list first
    assert calls[1] == list(range(16))  # then the halves


@pytest.mark.parametrize(
    ("value", "minimum", "threshold", "expected"),
    [
        (10, 1, 1, 1),  # fails at the minimum: no bisection
        (10, 1, 7, 7),
        (10, 1, 10, 10),
        (100, 1, 37, 37),
        (5, 5, 5, 5),
    ],
)
def test_shrink_int_finds_the_least_failing_value_of_a_monotonic_predicate(
    value: int, minimum: int, threshold: int, expected: int
) -> None:
    tried: list[int] = []

    def fails(v: int) -> bool:
        tried.append(v)
        return v >= threshold

    assert shrink_int(value, minimum, fails) == expected
    assert len(tried) <= 1 + (value - minimum).bit_length()  # a bisection, not a scan


def test_shrink_int_answers_a_value_that_failed_when_the_predicate_is_not_monotonic() -> None:
    fails_at = {3, 9, 20}
    seen: list[int] = []

    def fails(v: int) -> bool:
        seen.append(v)
        return v in fails_at or v == 20

    result = shrink_int(20, 1, fails)
    assert result in fails_at and (result == 20 or result in seen)


@pytest.mark.parametrize(
    ("broken", "kinds"),
    [
        ([], set()),
        (["2 acknowledged write(s) lost"], {"acknowledged write lost"}),
        (["17 acknowledged write(s) lost"], {"acknowledged write lost"}),
        (["not linearizable (3/5 keys)", "1 error(s) logged by the nodes (first: x)"],
         {"not linearizable", "error logged by a node"}),
        (["simulation failed (SimDeadlock): stuck tasks: a, b"], {"simulation failed (SimDeadlock)"}),
    ],
)
def test_failure_kinds_ignore_counts(broken: list[str], kinds: set[str]) -> None:
    assert failure_kinds(broken) == frozenset(kinds)


# --- explicit fault windows ---------------------------------------------------------------------------


def test_fault_windows_round_trip_and_become_phases() -> None:
    windows = parse_fault_windows("kill-all@2.4-5.6,latency+loss@6-7.5")
    assert windows == (FaultWindow(2.4, 5.6, ("kill-all",)), FaultWindow(6.0, 7.5, ("latency", "loss")))
    assert parse_fault_windows(fault_windows_text(windows)) == windows
    assert parse_fault_windows("none") == () and fault_windows_text(()) == "none"
    phases = phases_from_windows(windows, 8.0)
    assert [(p.name, p.start_s, p.end_s, p.faults) for p in phases] == [
        ("healthy", 0.0, 2.4, []), ("fault", 2.4, 5.6, ["kill-all"]), ("healthy", 5.6, 6.0, []),
        ("fault", 6.0, 7.5, ["latency", "loss"]), ("healed", 7.5, 8.0, []),
    ]


@pytest.mark.parametrize("text", ["kill", "kill@3", "meteor@1-2", "kill@2-1", "kill@1-2,kill@1.5-3", "kill@7-9"])
def test_bad_fault_windows_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        SimConfig(duration_s=8.0, faults=parse_fault_windows(text))


def test_the_nemesis_schedule_made_explicit_gives_the_same_history(tmp_path: Path) -> None:
    config = SimConfig(mode="eventual", scenario="kill-restart", duration_s=6.0, clients=3, rate_per_s=15.0,
                       random_schedule=True)
    explicit = SimConfig(mode="eventual", scenario="kill-restart", duration_s=6.0, clients=3, rate_per_s=15.0,
                         faults=config.fault_windows(4))
    assert explicit.faults
    a = run_sim(4, config, tmp_path / "a")
    b = run_sim(4, explicit, tmp_path / "b")
    assert a.history_sha256 == b.history_sha256


# --- the injected bug, found and shrunk ----------------------------------------------------------------

# A short eventual run whose kill-all lands right after writes the (buggy) disks had not written
# back: acknowledged writes are lost.  Found with
#   kvstore sim --seeds 1..40 --mode eventual --nemesis kill-all-restart --duration 3 --clients 4
#               --rate 40 --unsafe-skip-fsync-before-ack
BUG_SEED = 1
BUG_CONFIG = SimConfig(mode="eventual", scenario="kill-all-restart", duration_s=3.0, clients=4, rate_per_s=40.0,
                       unsafe_skip_fsync_before_ack=True)


def test_the_injected_bug_loses_acknowledged_writes_and_without_it_the_seed_passes(tmp_path: Path) -> None:
    with_bug = run_sim(BUG_SEED, BUG_CONFIG, tmp_path / "bug")
    assert failure_kinds(with_bug.broken) == {"acknowledged write lost"}, with_bug.broken
    without = run_sim(BUG_SEED, SimConfig(**{**BUG_CONFIG.__dict__, "unsafe_skip_fsync_before_ack": False}),
                      tmp_path / "fixed")
    assert without.ok, without.broken
    assert "--unsafe-skip-fsync-before-ack" in replay_command(BUG_SEED, BUG_CONFIG)


def test_shrink_reduces_the_injected_bug_to_a_shorter_run_whose_replay_reproduces_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--seed", str(BUG_SEED), "--mode", "eventual", "--nemesis", "kill-all-restart",
                     "--duration", "3", "--clients", "4", "--rate", "40", "--unsafe-skip-fsync-before-ack",
                     "--shrink", "--shrink-max-runs", "30", "--json", "--out", str(tmp_path / "shrink")])
    doc = json.loads(capsys.readouterr().out)
    assert code == cli.EXIT_BROKEN
    assert doc["failure"] == ["acknowledged write lost"]
    original, minimal = doc["original"], doc["minimal"]
    assert failure_kinds(original["broken"]) == failure_kinds(minimal["broken"]) == {"acknowledged write lost"}
    assert minimal["ops"] < original["ops"] and minimal["events"] < original["events"]
    assert doc["runs"] <= 30
    assert doc["replayed"]["same_failure"] and doc["replayed"]["history_sha256"] == minimal["history_sha256"]

    # The printed replay command, run as the CLI, breaks the same promise with the same history.
    argv = shlex.split(doc["replay"])
    assert argv[:2] == ["kvstore", "sim"] and "--faults" in argv and "--unsafe-skip-fsync-before-ack" in argv
    code = cli.main([*argv[2:], "--out", str(tmp_path / "replay")])
    replayed = json.loads(capsys.readouterr().out)
    assert code == cli.EXIT_BROKEN
    assert failure_kinds(replayed["broken"]) == {"acknowledged write lost"}
    assert replayed["history_sha256"] == minimal["history_sha256"]
    assert replayed["ops"] == minimal["ops"]


def test_shrink_run_answers_the_smallest_failure_it_saw_within_its_run_budget(tmp_path: Path) -> None:
    result = shrink_run(BUG_SEED, BUG_CONFIG, tmp_path / "shrink", max_runs=2, max_wall_s=600.0)
    assert isinstance(result, ShrinkResult)
    assert result.runs == 2 and result.budget_exhausted
    assert result.reproduced
    small, big = result.minimal.config, BUG_CONFIG
    assert small != replace(big, faults=big.fault_windows(BUG_SEED))  # it did reduce something
    assert small.clients <= big.clients and small.keys <= big.keys and small.duration_s <= big.duration_s
    assert set(small.faults or ()) <= set(big.fault_windows(BUG_SEED))


def test_shrink_of_a_passing_seed_has_nothing_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["--seed", str(BUG_SEED), "--mode", "eventual", "--nemesis", "kill-all-restart",
                     "--duration", "3", "--clients", "4", "--rate", "40", "--shrink", "--json",
                     "--out", str(tmp_path / "ok")])
    doc = json.loads(capsys.readouterr().out)
    assert code == cli.EXIT_OK
    assert doc["verdict"] == "ok" and doc["shrunk"] is False


# --- the switch itself ------------------------------------------------------------------------------------


def test_the_unsafe_disk_acks_at_once_and_a_crash_before_write_back_loses_the_write() -> None:
    async def main(writeback_s: float | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        disk = SimDisk("n1", 0, lambda: 0.002, unsafe_writeback_s=writeback_s)
        out: dict[str, Any] = {}
        stores = disk.open()
        started = loop.time()
        await stores["data"].put("a", key_token("a"), b"x")
        out["ack_after_s"] = loop.time() - started
        out["read_back"] = await stores["data"].get("a", key_token("a"))
        disk.fence()  # crash right after the acknowledgement
        stores = disk.open()
        out["after_crash"] = await stores["data"].get("a", key_token("a"))
        await stores["data"].put("b", key_token("b"), b"y")
        await asyncio.sleep(1.5)  # past the write-back
        disk.fence()
        out["written_back"] = await disk.open()["data"].get("b", key_token("b"))
        return out

    buggy = vloop.run(main(1.0))
    assert buggy == {"ack_after_s": 0.0, "read_back": b"x", "after_crash": None, "written_back": b"y"}
    sound = vloop.run(main(None))
    assert sound["ack_after_s"] >= 0.002 and sound["after_crash"] == b"x" and sound["written_back"] == b"y"


def test_the_switch_exists_only_in_the_simulator() -> None:
    assert not any("unsafe" in f.name or "skip_fsync" in f.name for f in dataclasses.fields(NodeConfig))
    assert not any("unsafe" in f.name for f in dataclasses.fields(ClusterSpec)
                   if f.name != "unsafe_skip_fsync_before_ack")
    assert ClusterSpec().unsafe_skip_fsync_before_ack is False and SimConfig().unsafe_skip_fsync_before_ack is False


@pytest.mark.parametrize("argv", [
    ["--seed", "1", "--faults", "meteor@1-2"],
    ["--seed", "1", "--faults", "kill@7-9"],
    ["--seeds", "1..3", "--shrink"],
    ["--seeds", "1..3", "--faults", "kill@1-2"],
    ["--seed", "1", "--shrink", "--shrink-max-runs", "0"],
])
def test_shrink_and_fault_window_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == cli.EXIT_USAGE
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("broken", "kind"),
    [
        (["simulation failed (crash: KeyError): 'n9'"], "simulation failed (crash: KeyError)"),
        (["simulation failed (SimLimitExceeded): past 100 s"], "simulation failed (SimLimitExceeded)"),
    ],
)
def test_a_crashed_or_stuck_run_is_a_failure_kind_of_its_own(broken: list[str], kind: str) -> None:
    assert failure_kinds(broken) == {kind}
    assert failure_kinds(broken) != failure_kinds(["1 acknowledged write(s) lost"])
