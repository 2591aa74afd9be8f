"""The deterministic simulator (kvstore.sim): virtual time, process faults, network, disks, whole runs.

Everything here runs on simulated time: no assertion depends on how fast the machine is.  Whole
runs are short (a few simulated seconds) and judged by the checker as the explorer judges them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvstore.harness.endpoint import ApiRequest, NoAnswerError
from kvstore.protocol.ring import key_token
from kvstore.sim import vloop
from kvstore.sim.cluster import ClusterSpec, SimCluster
from kvstore.sim.network import Latency, SimNetwork
from kvstore.sim.run import SimConfig, SimResult, run_sim
from kvstore.sim.vloop import Host, SimDeadlock, SimLimitExceeded
from kvstore.transport.base import LinkRule, Message, PeerUnavailable

REPO = Path(__file__).resolve().parent.parent

# Short runs: 4 simulated seconds of workload, 6 clients.
SHORT = {"duration_s": 4.0, "clients": 6, "rate_per_s": 60.0, "settle_s": 2.0}


def short(mode: str, scenario: str, **extra: Any) -> SimConfig:
    return SimConfig(mode=mode, scenario=scenario, **{**SHORT, **extra})


# --- the virtual-time loop ----------------------------------------------------------------------


def test_time_jumps_to_the_next_timer_and_timeouts_fire_on_time() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        seen = []
        await asyncio.sleep(10.0)
        seen.append(loop.time())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.sleep(3600.0), 5.0)
        seen.append(loop.time())
        return seen

    first, second = vloop.run(main())
    assert first == pytest.approx(10.0, abs=1e-6)
    assert second == pytest.approx(15.0, abs=1e-6)


def test_deadlock_is_a_typed_error_naming_the_stuck_task() -> None:
    async def main() -> None:
        never = asyncio.Event()
        waiter = asyncio.get_running_loop().create_task(never.wait(), name="waits-for-ever")
        await waiter

    with pytest.raises(SimDeadlock) as caught:
        vloop.run(main())
    assert any("waits-for-ever" in task for task in caught.value.stuck)
    assert "waits-for-ever" in str(caught.value)


def test_a_livelock_ends_at_the_time_budget() -> None:
    async def main() -> None:
        while True:
            await asyncio.sleep(1.0)

    with pytest.raises(SimLimitExceeded):
        vloop.run(main(), max_time_s=30.0)


def test_pause_holds_a_hosts_steps_and_resume_releases_them() -> None:
    async def main() -> list[tuple[float, int]]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, vloop.VirtualLoop)
        host = Host("n1")
        ticks: list[tuple[float, int]] = []

        async def ticker() -> None:
            for i in range(4):
                await asyncio.sleep(1.0)
                ticks.append((round(loop.time(), 3), i))

        host.spawn(ticker())
        await asyncio.sleep(2.5)
        loop.pause(host)
        await asyncio.sleep(3.0)
        assert [i for _, i in ticks] == [0, 1]  # nothing of the host ran while it was paused
        loop.release(host)
        await asyncio.sleep(5.0)
        return ticks

    ticks = vloop.run(main())
    # The tick due at 3.0 runs at the resume (5.5), late, as after SIGCONT; then every second again.
    assert ticks == [(1.0, 0), (2.0, 1), (5.5, 2), (6.5, 3)]


def test_crash_cancels_a_hosts_tasks_in_creation_order_and_only_them() -> None:
    async def main() -> tuple[list[str], bool]:
        host = Host("n1")
        cancelled: list[str] = []

        async def worker(name: str) -> None:
            try:
                await asyncio.sleep(100.0)
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        async def parent() -> None:
            asyncio.ensure_future(worker("child"))  # a child task belongs to its creator's host
            await asyncio.sleep(100.0)

        for name in ("a", "b"):
            host.spawn(worker(name))
        host.spawn(parent())
        host.spawn(worker("c"))
        bystander = asyncio.ensure_future(asyncio.sleep(5.0))  # the harness's, not the host's
        await asyncio.sleep(1.0)
        host.crash()
        await asyncio.sleep(1.0)
        return cancelled, bystander.cancelled()

    cancelled, bystander_cancelled = vloop.run(main())
    assert cancelled == ["a", "b", "c", "child"]
    assert not bystander_cancelled


# --- the simulated network ----------------------------------------------------------------------


def test_network_cut_link_refused_peer_and_crash_mid_call() -> None:
    async def main() -> dict[str, Any]:
        import random

        network = SimNetwork(random.Random(1), Latency(median_ms=1.0, sigma=0.0))
        handled: list[str] = []
        host_b = Host("b")
        a = network.attach("a", Host("a"))
        b = network.attach("b", host_b)

        async def slow_handler(sender: str, message: Message) -> Message:
            handled.append(message["op"])
            await asyncio.sleep(1.0)
            return {"ok": True}

        await b.start(slow_handler)
        out: dict[str, Any] = {"ok": await a.call("b", {"op": "first"}, 5.0)}
        loop = asyncio.get_running_loop()

        a.faults.set_rule("b", LinkRule(drop_out=True))  # a partition, as the nemesis installs it
        t0 = loop.time()
        with pytest.raises(PeerUnavailable) as cut:
            await a.call("b", {"op": "cut"}, 2.0)
        out["cut"] = (cut.value.maybe_delivered, round(loop.time() - t0, 6))
        a.faults.clear()

        call = asyncio.ensure_future(a.call("b", {"op": "crashed-mid-call"}, 5.0))
        await asyncio.sleep(0.5)  # delivered (1 ms), being handled (1 s)
        b.crash()
        host_b.crash()
        with pytest.raises(PeerUnavailable) as lost:
            await call
        out["lost"] = lost.value.maybe_delivered

        t0 = loop.time()
        with pytest.raises(PeerUnavailable) as refused:
            await a.call("b", {"op": "refused"}, 5.0)
        out["refused"] = (refused.value.maybe_delivered, round(loop.time() - t0, 6))
        out["handled"] = handled
        return out

    out = vloop.run(main())
    assert out["ok"] == {"ok": True}
    assert out["cut"] == (False, 2.0)  # waits out its timeout, never delivered
    assert out["lost"] is True  # it reached the node that then died: maybe applied
    assert out["refused"] == (False, 0.002)  # one round trip: nobody listens there
    assert out["handled"] == ["first", "crashed-mid-call"]


# --- the simulated cluster ------------------------------------------------------------------------


def _put(key: str, value: bytes, **query: str) -> ApiRequest:
    return ApiRequest("PUT", f"/kv/{key}", {"timeout_ms": "800", **query}, {}, value)


def test_a_crash_keeps_or_loses_the_disk_and_the_identity_with_it() -> None:
    async def main() -> dict[str, Any]:
        cluster = SimCluster(ClusterSpec(nodes=3, replicas=3, vnodes=16), seed=3)
        await cluster.start()
        await asyncio.sleep(1.0)
        out: dict[str, Any] = {}
        answer = await cluster.request("n1", _put("k", b"v1", w="3"), 1.0)
        out["put"] = answer.status
        node = cluster.node("n1")
        actor = node.actor
        token = key_token("k")

        cluster.crash("n1", lose_state=False)
        with pytest.raises(NoAnswerError) as refused:
            await cluster.request("n1", ApiRequest("GET", "/kv/k", {}, {}, None), 1.0)
        out["while_down"] = refused.value.kind
        await cluster.restart("n1")
        out["kept"] = (await cluster.node("n1").data.get("k", token)) is not None
        out["same_actor"] = cluster.node("n1").actor == actor

        cluster.crash("n1", lose_state=True)
        await cluster.restart("n1")
        out["lost"] = (await cluster.node("n1").data.get("k", token)) is None
        out["new_actor"] = cluster.node("n1").actor != actor
        answer = await cluster.request("n1", ApiRequest("GET", "/kv/k", {"r": "3"}, {}, None), 1.0)
        out["read_after_loss"] = (answer.status, answer.body)
        await cluster.stop()
        return out

    out = vloop.run(main())
    assert out["put"] == 204
    assert out["while_down"] == "unreachable"
    assert out["kept"] and out["same_actor"]
    assert out["lost"] and out["new_actor"]
    assert out["read_after_loss"] == (200, b"v1")  # the other replicas still have it


def test_wait_answer_gives_the_answer_the_error_or_a_timeout_at_the_deadline() -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        out: list[Any] = []
        answered: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.2, answered.set_result, "yes")
        out.append((await vloop.wait_answer(answered, 1.0), loop.time()))
        failed: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.1, failed.set_exception, PeerUnavailable("n2", "refused", maybe_delivered=False))
        with pytest.raises(PeerUnavailable):
            await vloop.wait_answer(failed, 1.0)
        silent: asyncio.Future[str] = loop.create_future()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await vloop.wait_answer(silent, 0.5)
        out.append((silent.done(), loop.time() - started))
        silent_now: asyncio.Future[str] = loop.create_future()
        with pytest.raises(TimeoutError):
            await vloop.wait_answer(silent_now, 0.0)  # no time left: as wait_for, at once
        out.append(silent_now.cancelled())
        waiting: asyncio.Future[str] = loop.create_future()
        caller = asyncio.ensure_future(vloop.wait_answer(waiting, 5.0))
        await asyncio.sleep(0.1)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        out.append(waiting.cancelled())  # a cancelled caller cancels the future, as wait_for does
        return out

    (answer, at), (done, waited), cancelled_at_once, cancelled_with_caller = vloop.run(main())
    assert answer == "yes" and at == pytest.approx(0.2, abs=1e-6)
    assert done and waited == pytest.approx(0.5, abs=1e-6)
    assert cancelled_at_once and cancelled_with_caller


def test_a_disk_write_lands_after_its_latency_in_order_even_if_its_caller_stops_waiting() -> None:
    async def main() -> dict[str, Any]:
        from kvstore.sim.disk import SimDisk

        loop = asyncio.get_running_loop()
        disk = SimDisk("n1", 0, lambda: 0.010)
        host = Host("n1#1")
        data = disk.open()["data"]
        out: dict[str, Any] = {}

        async def writes() -> None:
            await data.put("a", 1, b"1")
            out["a_at"] = loop.time()
            await data.put("b", 2, b"2")
            out["b_at"] = loop.time()
            abandoned = asyncio.ensure_future(data.put("c", 3, b"3"))
            await asyncio.sleep(0.001)
            abandoned.cancel()  # the caller stops waiting: the write still lands
            await asyncio.sleep(0.1)
            out["c"] = await data.get("c", 3)

        await host.spawn(writes())
        return out

    out = vloop.run(main())
    assert out["a_at"] == pytest.approx(0.010, abs=1e-6) and out["b_at"] == pytest.approx(0.020, abs=1e-6)
    assert out["c"] == b"3"


def test_a_disk_write_of_a_paused_node_lands_on_resume_and_a_crash_drops_it() -> None:
    async def main() -> dict[str, Any]:
        from kvstore.sim.disk import SimDisk

        loop = asyncio.get_running_loop()
        assert isinstance(loop, vloop.VirtualLoop)
        disk = SimDisk("n1", 0, lambda: 0.010)
        host = Host("n1#1")
        stores = disk.open()
        out: dict[str, Any] = {}
        host.spawn(stores["data"].put("p", 1, b"paused"))
        await asyncio.sleep(0.001)
        loop.pause(host)
        await asyncio.sleep(0.1)  # the write's instant passes while the node is stopped
        out["while_paused"] = disk.stores["data"]._data.get((1, "p"))
        loop.release(host)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        out["after_resume"] = disk.stores["data"]._data.get((1, "p"))
        host.spawn(stores["data"].put("q", 2, b"crashed"))
        await asyncio.sleep(0.001)
        disk.fence()
        host.crash()
        await asyncio.sleep(0.1)
        out["after_crash"] = disk.stores["data"]._data.get((2, "q"))
        return out

    out = vloop.run(main())
    assert out["while_paused"] is None and out["after_resume"] == b"paused"
    assert out["after_crash"] is None


# --- whole runs -----------------------------------------------------------------------------------


def test_same_seed_same_history_in_one_process_and_another_seed_differs(tmp_path: Path) -> None:
    config = short("linearizable", "kill-restart")
    first = run_sim(11, config, tmp_path / "a", judge_history=False)
    again = run_sim(11, config, tmp_path / "b", judge_history=False)
    other = run_sim(12, config, tmp_path / "c", judge_history=False)
    assert first.history_sha256 == again.history_sha256
    assert (tmp_path / "a" / "history.jsonl").read_bytes() == (tmp_path / "b" / "history.jsonl").read_bytes()
    assert other.history_sha256 != first.history_sha256
    assert len(first.events) > 100


def _sim_seed_7(tmp_path: Path, hash_seed: str, out: str) -> subprocess.Popen[str]:
    # Exactly issue 12's criterion: `kvstore sim --seed 7 --json`, in a fresh process.
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.Popen(
        [sys.executable, "-m", "kvstore", "sim", "--seed", "7", "--json", "--out", str(tmp_path / out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )


def _answer(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode in (0, 1), stderr
    return json.loads(stdout)  # type: ignore[no-any-return]


def test_same_seed_same_history_across_processes_with_different_hash_seeds(tmp_path: Path) -> None:
    procs = [_sim_seed_7(tmp_path, "1", "h1"), _sim_seed_7(tmp_path, "2", "h2")]
    one, two = (_answer(p) for p in procs)
    assert one["history_sha256"] == two["history_sha256"]
    assert (tmp_path / "h1" / "history.jsonl").read_bytes() == (tmp_path / "h2" / "history.jsonl").read_bytes()
    assert one["ops"] > 50
    history = [json.loads(line) for line in (tmp_path / "h1" / "history.jsonl").read_text().splitlines()]
    assert any(e["process"] == "nemesis" for e in history)  # the partition happened


def _fault_ops(result: SimResult, side: str) -> dict[str, Any]:
    return result.summary[f"fault_ops_{side}"]  # type: ignore[no-any-return]


def test_majority_partition_linearizable_refuses_on_the_minority_and_eventual_answers(tmp_path: Path) -> None:
    lin = run_sim(5, short("linearizable", "majority-partition"), tmp_path / "lin")
    assert lin.ok, lin.broken
    assert lin.summary["linearizable"] == "true"
    minority = _fault_ops(lin, "minority")
    assert minority["total"] > 0 and minority["ok"] == 0  # asked there, refused there
    assert _fault_ops(lin, "majority")["ok"] > 0  # the majority side went on

    eventual = run_sim(5, short("eventual", "majority-partition"), tmp_path / "ev")
    assert eventual.ok, eventual.broken
    assert _fault_ops(eventual, "minority")["total"] > 0
    assert eventual.summary["availability_fault_minority"] >= 0.9
    assert eventual.summary["writes_ok_on_minority_during_fault"] > 0


@pytest.mark.parametrize("mode", ["eventual", "eventual-lww", "quorum", "linearizable"])
@pytest.mark.parametrize("scenario", ["kill-restart", "kill-wipe-restart"])
def test_kill_restart_with_state_kept_or_lost_keeps_each_modes_promise(
    tmp_path: Path, mode: str, scenario: str
) -> None:
    result = run_sim(21, short(mode, scenario), tmp_path)
    nemesis = [(e["f"], e["value"]) for e in result.events if e["process"] == "nemesis"]
    kinds = [f for f, _ in nemesis]
    assert "kill" in kinds and "restart" in kinds
    assert ("lose-state" in kinds) == (scenario == "kill-wipe-restart")
    # The kill bit: the killed node's clients got no answer while it was down.
    assert _fault_ops(result, "minority")["ok"] == 0 < _fault_ops(result, "minority")["total"]
    assert result.ok, result.broken
    if mode == "linearizable":
        assert result.summary["linearizable"] == "true"
    if mode == "quorum" or (mode == "eventual" and scenario == "kill-restart"):
        assert result.summary["lost_writes"] == 0


def _ev(index: int, process: int, type_: str, f: str, value: Any, client: int | None) -> dict[str, Any]:
    event = {"index": index, "time": index, "process": process, "type": type_, "f": f, "key": "k", "value": value}
    if client is not None:
        event["client"] = client
    return event


@pytest.mark.parametrize(
    ("later", "explained"),
    [
        # the writer's own later delete, under a fresh process id after an info: its context covered the write
        ([_ev(2, 9, "invoke", "delete", None, 4), _ev(3, 9, "ok", "delete", None, 4)], True),
        ([_ev(2, 9, "invoke", "write", 4000031, 4), _ev(3, 9, "info", "write", 4000031, 4)], True),
        # certainly refused: it superseded nothing
        ([_ev(2, 9, "invoke", "delete", None, 4), _ev(3, 9, "fail", "delete", None, 4)], False),
        # another client never saw the value (no read returned it): its context cannot cover it
        ([_ev(2, 1, "invoke", "delete", None, 1), _ev(3, 1, "ok", "delete", None, 1)], False),
        ([], False),
    ],
)
def test_a_lost_write_is_explained_only_by_its_own_clients_later_write(
    later: list[dict[str, Any]], explained: bool
) -> None:
    from kvstore.sim.run import superseded_by_its_client

    events = [_ev(0, 6, "invoke", "write", 4000020, 4), _ev(1, 6, "ok", "write", 4000020, 4), *later]
    assert superseded_by_its_client({"key": "k", "value": 4000020}, events) is explained


def test_explore_simulate_gives_the_explorers_table_and_report_and_replays(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore", "explore", "--simulate", "--jobs", "2", "--modes", "eventual,linearizable",
         "--scenarios", "isolated-node", "--duration", "4", "--seed", "3", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert results["meta"]["simulated"] is True
    cells = {c["mode"]: c for c in results["cells"]}
    assert cells["linearizable"]["linearizable"] == "true" and cells["linearizable"]["broken"] == []
    assert cells["linearizable"]["availability_fault_minority"] < 0.2 < 0.8 < cells["eventual"][
        "availability_fault_minority"]
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "kvstore sim --seed 3 --mode linearizable" in html
    # Each cell's section (its plots) was rendered by the worker that ran it, and the report has them all.
    assert html.count("<section id=") == 2
    assert all((out / "runs" / f"{mode}--isolated-node" / "plot.png").stat().st_size > 0
               for mode in ("eventual", "linearizable"))
    # A cell is the same run as `kvstore sim` with its replay options.
    replay = run_sim(3, SimConfig(mode="linearizable", scenario="isolated-node", duration_s=4.0), tmp_path / "again",
                     judge_history=False)
    assert replay.history_sha256 == cells["linearizable"]["history_sha256"]


def test_sweep_seed_300_clients_never_reach_a_node_before_it_has_started(tmp_path: Path) -> None:
    """Found by `kvstore sim --seeds 1..1000`: after a kill-all, the simulator let a client's PUT reach a
    restarting node before Node.start had loaded its identity (an AssertionError answered as a 500).
    A real node opens its HTTP port only after Node.start; the simulated one now does the same."""
    result = run_sim(300, SimConfig(mode="eventual-lww", scenario="kill-all-restart"), tmp_path / "run")
    assert result.node_errors == []
    assert result.broken == []
