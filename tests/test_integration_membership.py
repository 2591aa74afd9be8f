"""Membership changes on real node processes: a 3-node cluster grows to 5 and shrinks back to 3
under the chaos workload (the ``membership`` nemesis), and the checker judges the history.

Issue 14's bar: linearizable mode stays linearizable; siblings mode (eventual, quorum) loses no
acknowledged write.  Plus the admin route's refusals (stable JSON codes) and a restarted node that
keeps the membership it learnt instead of its TOML's.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvstore.checker import check
from kvstore.cli import main as cli_main
from kvstore.explore.matrix import EXPLORE_AP, EXPLORE_LIMITS
from kvstore.harness.local_cluster import LocalCluster
from kvstore.harness.nemesis import ClusterControl
from kvstore.harness.runner import RunSpec, run_scenario

pytestmark = pytest.mark.integration


def _grow_and_shrink(tmp_path: Path, mode: str, seed: int) -> tuple[Any, list[dict[str, Any]], list[str]]:
    with LocalCluster(3, 3, data_dir=str(tmp_path / "cluster"), ap=EXPLORE_AP, limits=EXPLORE_LIMITS,
                      spares=2) as cluster:
        control = ClusterControl({n: cluster.url(n) for n in cluster.node_ids}, cluster.secret, local=cluster)
        spec = RunSpec(scenario="membership", mode=mode, duration_s=3.0, seed=seed, clients=6, keys=4,
                       rate_per_s=120, settle_s=2.0)

        async def run() -> Any:
            try:
                return await run_scenario(spec, control, tmp_path / "run")
            finally:
                await control.close()

        result = asyncio.run(run())
        assert not result.interrupted
        final = cluster.admin("n1", "GET", "/admin/membership")["config"]
        members = final["new"]
        assert final["phase"] == "stable"
    return result, result.events, members


@pytest.mark.parametrize(("mode", "seed"), [("linearizable", 3), ("eventual", 4), ("quorum", 5)])
def test_three_grow_to_five_and_shrink_back_under_the_workload(tmp_path: Path, mode: str, seed: int) -> None:
    result, events, members = _grow_and_shrink(tmp_path, mode, seed)
    nemesis = [(e["f"], e["value"]) for e in events if e["process"] == "nemesis"]
    assert nemesis == [("start-membership", {"joined": ["n4", "n5"]}),
                       ("stop-membership", {"leaving": ["n4", "n5"]})], nemesis
    assert members == ["n1", "n2", "n3"]
    client = [e for e in events if e["process"] != "nemesis"]
    oks = [e for e in client if e["type"] == "ok"]
    writes_ok = [e for e in oks if e["f"] in ("write", "cas", "delete")]
    assert len(writes_ok) > 20, f"too little load to judge: {len(writes_ok)} acknowledged writes"
    judged = check(events, model="cas-register" if mode == "linearizable" else "register",
                   time_limit_s=60, workers=1)
    if mode == "linearizable":
        assert str(judged.valid) == "true", [f"{kr.key}: {judged.explain(kr)}" for kr in judged.invalid_keys]
    lost = [lw.to_dict() for lw in judged.analyses.lost_writes]
    if mode == "eventual":
        # R=W=1: a read right after a write may miss it (stale), and the writer's own next write,
        # sent with the context its write returned, then supersedes it legitimately.  The lost-write
        # analysis does not model contexts and reports that pattern with no membership change at
        # all (same cluster and workload, 40 s, spares=0: one such report), so only writes that no
        # later acknowledged write of the same client superseded count as lost here.
        lost = [lw for lw in lost if not _superseded_by_own_write(judged.history.ops, lw["op"])]
    assert not lost, lost
    # The final reads (every key from each of the three remaining members) all answered.
    start = json.loads((tmp_path / "run" / "run.json").read_text())["final_reads_from_index"]
    final = [e for e in client if e["index"] >= start and e["type"] != "invoke"]
    assert len(final) == 4 * 3 and all(e["type"] == "ok" for e in final), final
    print(mode, {t: sum(1 for e in client if e["type"] == t) for t in ("ok", "fail", "info")})


def _superseded_by_own_write(ops: list[Any], op_id: int) -> bool:
    write = next(op for op in ops if op.id == op_id)
    return any(
        op.process == write.process and op.key == write.key and op.type == "ok" and op.invoke > write.complete
        and op.f in ("write", "delete")
        for op in ops
    )


def _post(url: str, secret: str | None, body: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} | ({"X-Cluster-Secret": secret} if secret else {})
    request = urllib.request.Request(url + "/admin/membership", data=json.dumps(body).encode(), method="POST",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _put(url: str, key: str, value: bytes) -> None:
    request = urllib.request.Request(f"{url}/kv/{key}?w=3", data=value, method="PUT")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 204


def _get(url: str, key: str) -> bytes:
    with urllib.request.urlopen(f"{url}/kv/{key}?r=2", timeout=10) as resp:
        return bytes(resp.read())


def test_admin_refusals_restart_keeps_the_learnt_membership(tmp_path: Path) -> None:
    with LocalCluster(3, 3, data_dir=str(tmp_path / "cluster"), ap=EXPLORE_AP, limits=EXPLORE_LIMITS,
                      spares=2) as cluster:
        url, secret = cluster.url("n1"), cluster.secret
        refusals = [
            (_post(url, None, {"action": "leave", "id": "n2"}), 401, "unauthorized"),
            (_post(url, secret, {"action": "explode"}), 400, "invalid_action"),
            (_post(url, secret, {"action": "leave", "id": "n2", "extra": 1}), 400, "invalid_body"),
            (_post(url, secret, {"action": "leave", "id": "n2"}), 409, "too_few_members"),
            (_post(url, secret, {"action": "leave", "id": "n9"}), 409, "unknown_member"),
            (_post(url, secret, {"action": "join", "id": "n2", "host": "127.0.0.1", "http_port": 1,
                                 "peer_port": 2}), 409, "already_member"),
            (_post(url, secret, {"action": "join", "id": "n4", "host": "127.0.0.1", "http_port": 0,
                                 "peer_port": 2}), 400, "invalid_body"),
            (_post(url, secret, {"action": "resume"}), 409, "no_change_in_progress"),
        ]
        for (status, doc), want_status, want_code in refusals:
            assert (status, doc.get("error")) == (want_status, want_code), doc
        done = cluster.join("n4")
        assert done["config"]["new"] == ["n1", "n2", "n3", "n4"] and done["config"]["version"] == 2
        # Every member installs the committed version (gossip + the driver's announce).
        for node in ("n2", "n3", "n4"):
            _wait_version(cluster, node, 2)
        # n3 restarts from its TOML (which lists n1..n3 only) and keeps the version it persisted.
        cluster.restart("n3")
        assert cluster.admin("n3", "GET", "/admin/membership")["config"]["new"] == ["n1", "n2", "n3", "n4"]
        with urllib.request.urlopen(cluster.url("n3") + "/cluster", timeout=5) as resp:
            members = [m["id"] for m in json.loads(resp.read())["members"]]
        assert members == ["n1", "n2", "n3", "n4"]
        # A replace (n4 out, n5 in, one range move), with a key written before it read after it.
        _put(cluster.url("n1"), "before-replace", b"kept")
        done = cluster.replace("n4", "n5")
        assert done["config"]["new"] == ["n1", "n2", "n3", "n5"]
        for node in ("n1", "n2", "n3", "n5"):
            assert _get(cluster.url(node), "before-replace") == b"kept"
        # The CLI: n5 leaves again through another member; the command waits for the commit.
        code = cli_main(["cluster", "leave", "n5", "--seed", cluster.url("n2"), "--secret", secret, "--wait", "120"])
        assert code == 0
        assert cluster.admin("n2", "GET", "/admin/membership")["config"]["new"] == ["n1", "n2", "n3"]
        assert _get(cluster.url("n3"), "before-replace") == b"kept"
        refused = cli_main(["cluster", "leave", "n5", "--seed", cluster.url("n2"), "--secret", secret])
        assert refused == 1  # unknown_member now


def _wait_version(cluster: LocalCluster, node: str, version: int, timeout_s: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while cluster.admin(node, "GET", "/admin/membership")["config"]["version"] < version:
        assert time.monotonic() < deadline, f"{node} did not install version {version}"
        time.sleep(0.1)


def test_a_partition_during_the_change_keeps_registers_linearizable(tmp_path: Path) -> None:
    """n4 joins while n3 is cut from n1 and n2 during the joint phase (the change waits for n3, at
    whichever step the cut met it, and goes on after the heal; rounds on the majority side need
    majorities of both acceptor sets).  A linearizable CAS workload runs throughout; judged."""
    from kvstore.harness.history import HistoryWriter
    from kvstore.harness.nemesis import _complete_cut
    from kvstore.harness.workload import Workload, WorkloadSpec

    keys = [f"p{i}" for i in range(4)]
    history_path = tmp_path / "history.jsonl"
    with LocalCluster(3, 3, data_dir=str(tmp_path / "cluster"), ap=EXPLORE_AP, limits=EXPLORE_LIMITS,
                      spares=1) as cluster:
        control = ClusterControl({n: cluster.url(n) for n in cluster.node_ids}, cluster.secret, local=cluster)

        async def run() -> None:
            history = HistoryWriter(history_path)
            spec = WorkloadSpec(mode="linearizable", keys=keys, clients=6, rate_per_s=100)
            try:
                async with Workload(spec, control.urls, history, 11) as workload:
                    load = asyncio.create_task(workload.run())
                    await asyncio.sleep(1.0)
                    join = asyncio.create_task(asyncio.to_thread(cluster.join, "n4"))
                    deadline = asyncio.get_running_loop().time() + 30
                    while cluster.admin("n1", "GET", "/admin/membership")["config"]["phase"] != "joint":
                        assert asyncio.get_running_loop().time() < deadline, "the change never began"
                        await asyncio.sleep(0.05)
                    groups = [["n3"], ["n1", "n2"]]
                    await control.partition(_complete_cut(groups))
                    history.nemesis("start-partition", {"kind": "isolate", "groups": groups})
                    await asyncio.sleep(4.0)
                    progress = cluster.admin("n1", "GET", "/admin/membership")
                    history.nemesis("stop-partition", {"kind": "isolate", "groups": groups})
                    await control.set_rules({})
                    # With n3 cut off the change cannot commit: n3 must install the joint version, take
                    # part in the stream and re-commit its registers first.
                    assert progress["config"]["phase"] == "joint", progress
                    done = await join
                    assert done["config"]["new"] == ["n1", "n2", "n3", "n4"]
                    await asyncio.sleep(1.0)
                    workload.stop()
                    await asyncio.wait_for(load, 30)
                    for key in keys:
                        for node in control.node_ids:
                            await workload.perform(workload.new_process(), node, "read", key, None)
            finally:
                history.close()
                await control.close()

        asyncio.run(run())
    events = [json.loads(line) for line in history_path.read_text().splitlines()]
    client = [e for e in events if e["process"] != "nemesis"]
    tally = {t: sum(1 for e in client if e["type"] == t) for t in ("ok", "fail", "info")}
    assert tally["ok"] > 50, tally
    judged = check(events, model="cas-register", time_limit_s=60, workers=1)
    assert str(judged.valid) == "true", [f"{kr.key}: {judged.explain(kr)}" for kr in judged.invalid_keys]
    print("partition during the change:", tally)
