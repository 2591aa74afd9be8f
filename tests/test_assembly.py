"""Nodes built by ``kvstore.runtime.assembly`` on in-memory seams, answering through the kv core.

No socket and no process: the nodes talk over a ``MemoryNetwork``, store in ``MemoryStorage``
and clients call ``KvApi.handle`` directly, as the simulator will.

The tests on a running three-node cluster run on virtual time (``@simulated`` from
tests/vtime.py, the nodes on ``CLOCK``): request deadlines, heartbeats, the CP recovery and the
``WAIT_S`` bound are simulated, so a busy machine cannot make them time out.  The other tests wait
for nothing and read no real deadline (the injected-clock test drives its own jumping clock).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from kvstore.clock import Clock, ManualClock
from kvstore.config import APSettings, Member, NodeConfig
from kvstore.contract import etag_of
from kvstore.runtime.anti_entropy import AntiEntropy
from kvstore.runtime.assembly import NodeSeams, _parts, assemble_node
from kvstore.runtime.node import Node, NodeParts
from kvstore.runtime.reaper import TombstoneReaper
from kvstore.server.kv_api import ApiRequest, ApiResponse, KvApi
from kvstore.storage import MemoryStorage, SqliteStorage
from kvstore.transport.base import Handler, Message
from kvstore.transport.memory import MemoryNetwork
from tests.vtime import CLOCK, simulated

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST_AP = APSettings(heartbeat_interval_ms=50, anti_entropy_interval_s=3600.0)
WAIT_S = 20.0  # a bound on waiting for a condition (simulated seconds where @simulated), never an expected duration


def cluster_configs(count: int, replicas: int, **overrides: Any) -> list[NodeConfig]:
    members = tuple(Member(f"n{i + 1}", "127.0.0.1", 7000 + i, 8000 + i) for i in range(count))
    settings: dict[str, Any] = {
        "secret": "s3cret", "replicas": replicas, "r": min(2, replicas), "w": min(2, replicas),
        "storage": "memory", "initial_cluster_state": "new", "ap": FAST_AP, **overrides,
    }
    return [NodeConfig(node_id=m.id, members=members, **settings) for m in members]


def memory_seams(network: MemoryNetwork, node_id: str, clock: Clock, seed: int) -> NodeSeams:
    return NodeSeams(
        transport=network.endpoint(node_id), data=MemoryStorage(), hints=MemoryStorage(),
        paxos=MemoryStorage(), clock=clock, rng=random.Random(seed),
    )


async def start_cluster(configs: list[NodeConfig], clock: Clock) -> list[Node]:
    network = MemoryNetwork()
    nodes = [assemble_node(cfg, memory_seams(network, cfg.node_id, clock, seed)) for seed, cfg in enumerate(configs)]
    for node in nodes:
        await node.start()
    return nodes


@contextlib.asynccontextmanager
async def running_trio() -> AsyncIterator[list[Node]]:
    nodes = await start_cluster(cluster_configs(3, 3), CLOCK)
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


def kv(method: str, key: str, query: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
       body: bytes | None = None) -> ApiRequest:
    return ApiRequest(method, "/kv/" + key, dict(query or {}), dict(headers or {}), body)


def document(response: ApiResponse) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    parsed = json.loads(response.body)
    assert isinstance(parsed, dict)
    return parsed


def requests_counted(node: Node, op: str, status: int) -> float:
    value = node.metrics.registry.get_sample_value("kvstore_requests_total", {"op": op, "status": str(status)})
    return value or 0.0


@simulated
async def test_an_assembled_node_answers_a_put_and_a_get_through_the_kv_core() -> None:
    async with running_trio() as trio:
        apis = [KvApi(node) for node in trio]
        put = await apis[0].handle(kv("PUT", "user%3A42", {"w": "3"}, body=b"hello"))
        assert put.status == 204, put.body
        assert put.body == b"" and put.headers["X-Siblings"] == "1" and put.headers["ETag"] == etag_of(b"hello")
        for api in apis:  # w=3: every replica took it, so any node reads it back
            got = await api.handle(kv("GET", "user%3A42", {"r": "1"}))
            assert (got.status, got.body) == (200, b"hello")
            assert got.headers["ETag"] == etag_of(b"hello") and got.headers["X-Context"] == put.headers["X-Context"]
            assert got.headers["Content-Type"] == "application/octet-stream"
        assert requests_counted(trio[0], "put", 204) == 1 and requests_counted(trio[2], "get", 200) == 1


@simulated
async def test_the_kv_core_refuses_bad_input_with_json_errors() -> None:
    async with running_trio() as trio:
        api = KvApi(trio[0])
        cases = [
            (kv("GET", "%FF"), 400, "invalid_key"),
            (kv("GET", ""), 400, "invalid_key"),
            (kv("GET", "k", {"r": "9"}), 400, "invalid_quorum"),
            (kv("GET", "k", {"colour": "blue"}), 400, "invalid_parameter"),
            (kv("PUT", "k", headers={"x-context": "not base64!"}, body=b"v"), 400, "invalid_context"),
            (kv("PUT", "k", headers={"if-match": '"abc"'}, body=b"v"), 400, "invalid_parameter"),
            (kv("PUT", "k", body=b"x" * (trio[0].cfg.limits.max_value_bytes + 1)), 413, "value_too_large"),
            (kv("POST", "k", body=b"v"), 405, "method_not_allowed"),
            (ApiRequest("GET", "/elsewhere", {}, {}), 404, "no_route"),
        ]
        for request, status, code in cases:
            response = await api.handle(request)
            assert (response.status, document(response)["error"]) == (status, code), request
        assert (await api.handle(kv("POST", "k"))).headers["Allow"] == "DELETE,GET,PUT"
        # Headers are looked up case-insensitively: a plain dict with a lower-case name still counts.
        missing = await api.handle(kv("GET", "nothing-here"))
        assert missing.status == 404 and document(missing)["error"] == "not_found"


@simulated
async def test_the_kv_core_bounds_the_requests_in_flight() -> None:
    async with running_trio() as trio:
        api = KvApi(trio[0])
        api.inflight = api.max_inflight  # as if that many requests were being handled right now
        refused = await api.handle(kv("GET", "k"))
        assert refused.status == 429 and document(refused)["error"] == "overloaded"
        api.inflight = 0
        assert (await api.handle(kv("GET", "k"))).status == 404


@simulated
async def test_a_linearizable_put_and_compare_and_set_through_the_kv_core() -> None:
    async with running_trio() as trio:
        await asyncio.wait_for(asyncio.gather(*(n.parts.register.recovery.active.wait() for n in trio)), WAIT_S)
        api = KvApi(trio[1])
        lin = {"consistency": "linearizable"}
        created = await api.handle(kv("PUT", "lock", lin, body=b"free"))
        assert created.status == 204 and created.headers["ETag"] == etag_of(b"free")
        stale = await api.handle(kv("PUT", "lock", lin, {"If-Match": etag_of(b"taken")}, b"mine"))
        assert stale.status == 412 and document(stale)["current"] == etag_of(b"free")
        swapped = await api.handle(kv("PUT", "lock", lin, {"If-Match": etag_of(b"free")}, b"mine"))
        assert swapped.status == 204
        read = await KvApi(trio[2]).handle(kv("GET", "lock", lin))
        assert (read.status, read.body, read.headers["ETag"]) == (200, b"mine", etag_of(b"mine"))
        mixed = await api.handle(kv("GET", "lock"))  # eventual access to a register key is refused
        assert mixed.status == 409 and document(mixed)["error"] == "consistency_conflict"


@simulated
async def test_the_handler_table_is_the_nodes_own_plus_its_parts() -> None:
    async with running_trio() as trio:
        node = trio[0]
        parts = node.parts
        owners = {
            "ping": node, "replica_get": node.replica, "replica_put": node.replica,
            "coordinate_write": node.coordinator,
            "ae_summary": parts.anti_entropy, "ae_level": parts.anti_entropy, "ae_buckets": parts.anti_entropy,
            "ae_pull": parts.anti_entropy, "ae_push": parts.anti_entropy, "ae_status": parts.anti_entropy,
            "reap_check": parts.reaper, "reap": parts.reaper,
            "paxos_prepare": parts.register, "paxos_accept": parts.register, "paxos_peek": parts.register,
            "cp_propose": parts.register,
            "paxos_register": parts.register.recovery, "paxos_recover_scan": parts.register.recovery,
            "paxos_status": parts.register.recovery,
            "config_get": parts.reconfig, "config_push": parts.reconfig, "mb_transfer": parts.reconfig,
            "mb_catchup": parts.reconfig,
        }
        assert sorted(node.handlers) == sorted(owners)
        for op, owner in owners.items():
            assert getattr(node.handlers[op], "__self__", None) is owner, op
        reply = await node.handle_message("n2", {"op": "ae_status"})
        assert reply["rounds_completed"] == 0 and reply["running"] is False


class GreedyReaper(TombstoneReaper):
    def handlers(self) -> dict[str, Handler]:
        async def pong(sender: str, message: Message) -> Message:
            return {"ok": True}

        return {**super().handlers(), "ping": pong}


def test_two_parts_answering_one_op_is_a_programming_error() -> None:
    cfg = cluster_configs(1, 1)[0]

    def parts(node: Node) -> NodeParts:
        real = _parts(node)
        reaper = GreedyReaper(node)
        return NodeParts(real.handoff, real.read_repair, AntiEntropy(node, reaper), reaper, real.register, real.reconfig)

    seams = memory_seams(MemoryNetwork(), cfg.node_id, ManualClock(), 1)
    with pytest.raises(AssertionError, match="ping"):
        Node(cfg, transport=seams.transport, data=seams.data, hints=seams.hints, paxos=seams.paxos,
             clock=seams.clock, rng=seams.rng, parts=parts)


def test_whether_the_data_is_durable_comes_from_the_store_not_the_config(tmp_path: Path) -> None:
    cfg = cluster_configs(1, 1)[0]  # storage = "memory" in the config
    kept = memory_seams(MemoryNetwork(), cfg.node_id, ManualClock(), 1)
    kept = NodeSeams(kept.transport, MemoryStorage(durable=True), kept.hints, kept.paxos, kept.clock, kept.rng)
    assert assemble_node(cfg, kept).durable_data is True  # a simulator's disk kept across restarts
    sqlite_cfg = cluster_configs(1, 1, storage="sqlite", fsync="batch")[0]
    loose = SqliteStorage(str(tmp_path / "data.db"), "never")  # a crash may lose acknowledged writes
    seams = memory_seams(MemoryNetwork(), cfg.node_id, ManualClock(), 2)
    seams = NodeSeams(seams.transport, loose, seams.hints, seams.paxos, seams.clock, seams.rng)
    try:
        assert assemble_node(sqlite_cfg, seams).durable_data is False
    finally:
        asyncio.run(loose.close())


class JumpingClock(ManualClock):
    """Moves ``step_ns`` forward at every monotonic reading once armed: a deadline read on it
    passes at its next reading, whatever the event loop's own time says."""

    def __init__(self) -> None:
        super().__init__()
        self.step_ns = 0

    def monotonic_ns(self) -> int:
        self.advance(self.step_ns)
        return super().monotonic_ns()


async def test_a_request_deadline_is_read_on_the_injected_clock() -> None:
    clock = JumpingClock()
    [node] = await start_cluster(cluster_configs(1, 1), clock)
    try:
        api = KvApi(node)
        assert (await api.handle(kv("PUT", "k", {"timeout_ms": "60000"}, body=b"v1"))).status == 204
        clock.step_ns = 61 * 1_000_000_000  # each reading is 61 s after the previous one
        late = await api.handle(kv("PUT", "k", {"timeout_ms": "60000"}, body=b"v2"))
        assert late.status == 503, late.body
        assert document(late)["error"] == "timeout" and document(late)["indeterminate"] is False
        clock.step_ns = 0
        assert (await api.handle(kv("GET", "k"))).body == b"v1"  # the late write was never applied
    finally:
        clock.step_ns = 0
        await node.stop()


# Modules that run inside a node: they read time only through the injected Clock and draw
# randomness only from the injected random.Random (see SIM_PLAN / docs/architecture.md).
NODE_SIDE = tuple(
    sorted(p.relative_to(REPO_ROOT / "kvstore").as_posix() for p in (REPO_ROOT / "kvstore" / "runtime").glob("*.py")
           if p.name != "clock.py")  # the Clock seam itself is where real time is read
) + ("server/kv_api.py",)
# The event loop's own lag is the one thing measured on the loop's clock, on purpose.
ALLOWED = {("runtime/node.py", "_loop_lag_monitor")}


def _forbidden_reads(path: Path) -> list[tuple[str, str]]:
    """(function, what) for every reading of a clock or global randomness outside the seams."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                what = ast.unparse(child.func)
                owner = ast.unparse(child.func.value)
                if child.func.attr == "time" and (owner == "loop" or owner.endswith("get_running_loop()")):
                    found.append((name, what))
                if owner in ("time", "os") and child.func.attr in (
                    "time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "urandom", "getpid",
                ):
                    found.append((name, what))
                if owner == "random" and child.func.attr != "Random":
                    found.append((name, what))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_node_side_code_reads_time_and_randomness_only_through_its_seams() -> None:
    offenders = []
    for name in NODE_SIDE:
        for function, what in _forbidden_reads(REPO_ROOT / "kvstore" / name):
            if (name, function) not in ALLOWED:
                offenders.append(f"{name}:{function}: {what}()")
    assert offenders == []
    assert "runtime/node.py" in NODE_SIDE and "runtime/caspaxos.py" in NODE_SIDE
    # The scan does find what it looks for (it is not silently blind).
    assert ("_loop_lag_monitor", "loop.time") in _forbidden_reads(REPO_ROOT / "kvstore" / "runtime" / "node.py")
