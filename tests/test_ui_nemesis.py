"""The nemesis as the live explorer drives it: aimed shapes, hand-drawn grudges, single faults undone."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest

from kvstore.client.admin import AdminClient
from kvstore.harness.nemesis import (
    ClusterControl,
    NemesisError,
    _complete_cut,
    groups_grudge,
    grudge_groups,
    links_grudge,
    partition_grudge,
)
from kvstore.harness.runner import CLOCK_SKEW_MS, FaultDriver

NODES = ["n1", "n2", "n3", "n4", "n5"]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("focus", NODES)
def test_focus_aims_each_shape_at_the_named_node(seed: int, focus: str) -> None:
    rng = random.Random(seed)
    _, groups = partition_grudge("isolate", NODES, rng, focus=focus)
    assert groups[0] == [focus]
    _, groups = partition_grudge("majority", NODES, rng, focus=focus)
    assert focus in groups[1] and len(groups[1]) == 2
    _, desc = partition_grudge("bridge", NODES, rng, focus=focus)
    assert desc["bridge"] == focus
    grudge, desc = partition_grudge("one-way", NODES, rng, focus=focus)
    assert desc["deaf"] == focus and grudge[focus] == set(NODES) - {focus}
    with pytest.raises(NemesisError):
        partition_grudge("isolate", NODES, rng, focus="n9")


def test_groups_grudge_is_the_complete_cut_and_refuses_a_node_in_two_groups() -> None:
    groups = [["n1", "n2"], ["n3"], ["n4", "n5"]]
    assert groups_grudge(groups) == _complete_cut(groups)
    assert grudge_groups(groups_grudge(groups)) == [["n1", "n2"], ["n4", "n5"], ["n3"]]
    with pytest.raises(NemesisError):
        groups_grudge([["n1", "n2"], ["n2", "n3"]])


@pytest.mark.parametrize(
    ("cut", "groups"),
    [
        ([], [NODES]),
        ([("n1", "n2"), ("n2", "n1")], [NODES]),  # one link down: everyone still talks through others
        ([(a, "n3") for a in NODES if a != "n3"], [["n1", "n2", "n4", "n5"], ["n3"]]),  # n3 deaf: alone
        ([(a, b) for a in ("n1", "n2") for b in ("n3", "n4", "n5")]
         + [(b, a) for a in ("n1", "n2") for b in ("n3", "n4", "n5")], [["n3", "n4", "n5"], ["n1", "n2"]]),
    ],
)
def test_links_grudge_and_the_groups_it_leaves(cut: list[tuple[str, str]], groups: list[list[str]]) -> None:
    grudge = links_grudge(NODES, cut)
    for sender, receiver in cut:
        assert sender in grudge[receiver]
    assert grudge_groups(grudge) == groups


def test_links_grudge_refuses_unknown_links() -> None:
    for bad in [("n1", "n1"), ("n1", "n9")]:
        with pytest.raises(NemesisError):
            links_grudge(NODES, [bad])


class FakeControl:
    """What FaultDriver calls on a ClusterControl, recorded."""

    def __init__(self) -> None:
        self.node_ids = list(NODES)
        self.killed: set[str] = set()
        self.calls: list[tuple[Any, ...]] = []

    async def partition(self, grudge: dict[str, set[str]]) -> None:
        self.calls.append(("partition", {k: sorted(v) for k, v in grudge.items() if v}))

    async def set_rules(self, rules: dict[str, Any]) -> None:
        self.calls.append(("set_rules", rules))

    async def kill(self, node: str) -> None:
        self.killed.add(node)
        self.calls.append(("kill", node))

    async def restart(self, node: str) -> None:
        self.killed.discard(node)
        self.calls.append(("restart", node))

    async def pause(self, node: str) -> None:
        self.calls.append(("pause", node))

    async def resume(self, node: str) -> None:
        self.calls.append(("resume", node))

    async def skew(self, node: str, skew_ms: float) -> None:
        self.calls.append(("skew", node, skew_ms))


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def nemesis(self, f: str, value: Any) -> None:
        self.events.append((f, value))


async def test_fault_driver_aims_and_undoes_single_faults() -> None:
    control, log = FakeControl(), Log()
    driver = FaultDriver(control, log, random.Random(1))  # type: ignore[arg-type]
    await driver.start("kill", target="n2")
    await driver.start("pause", target="n4")
    await driver.start("clock-skew", target="n5", skew_ms=-3000.0)
    with pytest.raises(NemesisError):
        await driver.start("pause", target="n2")  # killed: not a running node
    await driver.stop("pause", target="n4")
    assert ("kill", "n2") in driver.active and ("pause", "n4") not in driver.active
    await driver.stop("clock-skew", target="n5")
    await driver.stop("kill", target="n2")
    assert driver.active == []
    assert log.events == [("kill", ["n2"]), ("pause", ["n4"]), ("start-skew", {"n5": -3000.0}),
                          ("resume", ["n4"]), ("stop-skew", {"n5": -3000.0}), ("restart", ["n2"])]
    assert control.calls == [("kill", "n2"), ("pause", "n4"), ("skew", "n5", -3000.0), ("resume", "n4"),
                             ("skew", "n5", 0), ("restart", "n2")]


async def test_a_new_partition_replaces_the_active_one_without_a_heal_between() -> None:
    control, log = FakeControl(), Log()
    driver = FaultDriver(control, log, random.Random(1))  # type: ignore[arg-type]
    await driver.start("isolate", target="n1")
    grudge = groups_grudge([["n1", "n2"], ["n3", "n4", "n5"]])
    custom = {"kind": "custom", "groups": [["n3", "n4", "n5"], ["n1", "n2"]]}
    await driver.start_partition(grudge, custom)
    assert [e[0] for e in log.events] == ["start-partition", "stop-partition", "start-partition"]
    assert log.events[0][1] == {"kind": "isolate", "groups": [["n1"], ["n2", "n3", "n4", "n5"]]}
    assert log.events[2][1] == custom
    assert [c[0] for c in control.calls] == ["partition", "partition"]  # never a set_rules({}) between
    assert driver.active == [("custom", custom)]
    await driver.stop("partition")
    assert log.events[-1] == ("stop-partition", custom) and control.calls[-1] == ("set_rules", {})


async def test_unaimed_faults_draw_from_the_rng_as_before() -> None:
    control, log = FakeControl(), Log()
    driver = FaultDriver(control, log, random.Random(5))  # type: ignore[arg-type]
    await driver.start("clock-skew")
    ahead, behind = random.Random(5).sample(NODES, 2)
    assert log.events == [("start-skew", {ahead: CLOCK_SKEW_MS, behind: -CLOCK_SKEW_MS})]


class FakeLocal:
    def __init__(self) -> None:
        self.resumed: list[str] = []

    def resume(self, node: str) -> None:
        self.resumed.append(node)

    def pause(self, node: str) -> None:
        pass


class RecordingTransport:
    """A ``kvstore.client.ClientTransport`` that answers every admin call 200 ``{}`` and records
    (node, method, path, JSON body)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str, Any]] = []

    async def request(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
                      timeout_s: float, connect_timeout_s: float) -> tuple[int, Mapping[str, str], bytes]:
        parts = urlsplit(url)
        self.sent.append((parts.hostname, method, parts.path, json.loads(body) if body else None))
        return 200, {"Content-Type": "application/json"}, b"{}"

    async def close(self) -> None:
        pass


async def test_resume_gives_the_node_the_rules_in_force_now() -> None:
    """A partition started (or healed) while a node was stopped must reach it when it resumes."""
    control = ClusterControl(urls={n: f"http://{n}" for n in NODES}, secret="s", local=FakeLocal())  # type: ignore[arg-type]
    transport = RecordingTransport()
    control._admin_client = AdminClient(control.urls, control.secret, transport=transport)
    sent = transport.sent
    await control.pause("n1")
    await control.partition(groups_grudge([["n1", "n2"], ["n3", "n4", "n5"]]))
    assert all(node != "n1" for node, *_ in sent), "a stopped node cannot take rules"
    await control.resume("n1")
    assert sent[-1] == ("n1", "PUT", "/admin/faults",
                        {"rules": {m: {"drop_in": True, "drop_out": True} for m in ("n3", "n4", "n5")}})
    await control.pause("n1")
    await control.set_rules({})  # healed while n1 was stopped
    await control.resume("n1")
    assert sent[-1] == ("n1", "PUT", "/admin/faults", {"rules": {}})
