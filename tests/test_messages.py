"""The typed internal messages (kvstore.protocol.messages): one table row per request and reply.

Each row is a typed message and the map the transport sent for it *before* the types existed
(written out by hand from the code that built those maps), so the rows pin byte compatibility
with older nodes.  From the table: the round trip through msgpack, every field of every message
made malformed (wrong type, a wrong nested element, missing), and the registry against the ops a
real node serves.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import msgspec
import pytest

from kvstore.clock import SystemClock
from kvstore.config import Member, NodeConfig
from kvstore.protocol import messages as m
from kvstore.protocol.merkle import BucketRequest, LevelRequest, TreeShape
from kvstore.protocol.paxos import Ballot, RegisterValue
from kvstore.protocol.paxos_wire import PaxosRequest, accept_message, peek_message, prepare_message
from kvstore.runtime.assembly import NodeSeams, assemble_node
from kvstore.storage import MemoryStorage
from kvstore.transport.memory import MemoryNetwork

BALLOT = Ballot(7, "n1")
SHAPE = TreeShape(-100, 100, 2)
LEVEL = LevelRequest(SHAPE, 1, (0, 1))
BUCKETS = BucketRequest(SHAPE, (0, 3))
PREPARE = PaxosRequest("paxos_prepare", "k", 5, BALLOT, None, None, (), ("n1", "n2"))
ACCEPT = PaxosRequest(
    "paxos_accept", "k", 5, BALLOT, RegisterValue.of(b"v"), Ballot(8, "n1"), (Ballot(3, "n2"),), ()
)

# (typed message, the map the pre-typed code sent for it)
REQUESTS: list[tuple[Any, dict[str, Any]]] = [
    (m.Ping(cv=3), {"op": "ping", "cv": 3}),
    (m.ReplicaGet("k", 5, cv=2), {"op": "replica_get", "key": "k", "token": 5, "cv": 2}),
    (m.ReplicaPut("k", -5, b"obj", cv=2), {"op": "replica_put", "key": "k", "token": -5, "obj": b"obj", "cv": 2}),
    (m.ReplicaPut("k", 5, b"obj", cv=2, hint_for="n3"),
     {"op": "replica_put", "key": "k", "token": 5, "obj": b"obj", "cv": 2, "hint_for": "n3"}),
    (m.ReplicaPut("k", 5, b"obj"), {"op": "replica_put", "key": "k", "token": 5, "obj": b"obj"}),  # handoff
    (m.CoordinateWrite("k", b"v", [("n1.a", 3)], 2, True, 900),
     {"op": "coordinate_write", "key": "k", "value": b"v", "context": [["n1.a", 3]], "w": 2, "sloppy": True,
      "timeout_ms": 900}),
    (m.CoordinateWrite("k", None, [], 1, False, 1),
     {"op": "coordinate_write", "key": "k", "value": None, "context": [], "w": 1, "sloppy": False, "timeout_ms": 1}),
    (m.AeSummary([(-10, 10), (10, -10)]), {"op": "ae_summary", "ranges": [[-10, 10], [10, -10]]}),
    (m.AeLevel(LEVEL), {"op": "ae_level", "shape": [-100, 100, 2], "level": 1, "indexes": [0, 1]}),
    (m.AeBuckets(BUCKETS, fresh=True), {"op": "ae_buckets", "shape": [-100, 100, 2], "buckets": [0, 3], "fresh": True}),
    (m.AePull([(1, "a"), (2, "b")]), {"op": "ae_pull", "keys": [[1, "a"], [2, "b"]]}),
    (m.AePush([(1, "a", b"x")]), {"op": "ae_push", "objects": [[1, "a", b"x"]]}),
    (m.AeStatus(), {"op": "ae_status"}),
    (m.ReapCheck([(1, "a", b"t")]), {"op": "reap_check", "keys": [[1, "a", b"t"]]}),
    (m.Reap([(1, "a", b"t", ["n1", "n2"])]), {"op": "reap", "keys": [[1, "a", b"t", ["n1", "n2"]]]}),
    (m.ConfigGet(), {"op": "config_get"}),
    (m.ConfigPush(b'{"v":1}'), {"op": "config_push", "config": b'{"v":1}'}),
    (m.MbTransfer(4), {"op": "mb_transfer", "version": 4}),
    (m.MbCatchup(4), {"op": "mb_catchup", "version": 4}),
    (m.CpPropose("k", ["cas", "etag", b"v"], 500), {"op": "cp_propose", "key": "k", "change": ["cas", "etag", b"v"],
                                                    "timeout_ms": 500}),
    (m.PaxosRegister("abc123"), {"op": "paxos_register", "incarnation": "abc123"}),
    (m.PaxosRecoverScan("abc123", (5, "k"), 100, 4096),
     {"op": "paxos_recover_scan", "incarnation": "abc123", "after": [5, "k"], "limit": 100, "max_bytes": 4096}),
    (m.PaxosRecoverScan("abc123", None, 100, 4096),
     {"op": "paxos_recover_scan", "incarnation": "abc123", "after": None, "limit": 100, "max_bytes": 4096}),
    (m.PaxosStatus(), {"op": "paxos_status"}),
    (m.PaxosPrepare(PREPARE, cv=1), {**prepare_message("k", 5, BALLOT, ("n1", "n2")), "cv": 1}),
    (m.PaxosAccept(ACCEPT),
     accept_message("k", 5, BALLOT, RegisterValue.of(b"v"), Ballot(8, "n1"), (Ballot(3, "n2"),))),
    (m.PaxosPeek("k", 5, ("n1", "n2"), cv=2), {**peek_message("k", 5, ("n1", "n2")), "cv": 2}),
]

REPLIES: list[tuple[Any, dict[str, Any]]] = [
    (m.ErrorReply("bad_request", "no"), {"error": "bad_request", "message": "no", "remote_error": True}),
    (m.ErrorReply("stale_config", "old", cv=4),
     {"error": "stale_config", "message": "old", "remote_error": True, "cv": 4}),
    (m.Ok(), {"ok": True}),
    (m.PingReply(True, 3), {"ok": True, "cv": 3}),
    (m.ReplicaGetReply(b"o"), {"obj": b"o"}),
    (m.ReplicaGetReply(None, cp=True), {"obj": None, "cp": True}),
    (m.CoordinateWriteReply("ok", obj=b"o", acknowledged=2, hinted=["n4"]),
     {"status": "ok", "obj": b"o", "acknowledged": 2, "hinted": ["n4"]}),
    (m.CoordinateWriteReply("error", body={"error": "timeout", "indeterminate": True}, http=503),
     {"status": "error", "body": {"error": "timeout", "indeterminate": True}, "http": 503}),
    (m.AeSummaryReply([(3, b"h")]), {"summaries": [[3, b"h"]]}),
    (m.AeLevelReply([b"h1", b"h2"]), {"hashes": [b"h1", b"h2"]}),
    (m.AeBucketsReply([[("a", b"d")], []]), {"buckets": [[["a", b"d"]], []]}),
    (m.AePullReply([("a", b"x"), ("b", None)]), {"objects": [["a", b"x"], ["b", None]]}),
    (m.AePushReply(2, 1), {"applied": 2, "refused": 1}),
    (m.AeStatusReply(False, 3, {"ranges": 8}), {"running": False, "rounds_completed": 3, "last_round": {"ranges": 8}}),
    (m.ReapCheckReply([True, False]), {"covered": [True, False]}),
    (m.ReapReply(["reaped", "absent", "kept"]), {"reaped": ["reaped", "absent", "kept"]}),
    (m.ConfigGetReply(b"{}"), {"config": b"{}"}),
    (m.ConfigPushReply(4), {"version": 4}),
    (m.MbTransferReply(10, ["n1"]), {"keys": 10, "sources": ["n1"]}),
    (m.MbCatchupReply(2), {"registers": 2}),
    (m.CpProposeReply("ok", outcome="ok", value=None, etag=None), {"status": "ok", "outcome": "ok", "value": None,
                                                                                 "etag": None}),
    (m.CpProposeReply("error", body={"error": "timeout"}, http=503),
     {"status": "error", "value": None, "etag": None, "body": {"error": "timeout"}, "http": 503}),
    (m.PaxosRegisterReply(True, None, "abc"), {"ok": True, "previous": None, "incarnation": "abc"}),
    (m.PaxosRecoverScanReply([(1, "k", b"s")], (1, "k"), False),
     {"records": [[1, "k", b"s"]], "next": [1, "k"], "done": False}),
    (m.PaxosStatusReply("abc", "active", "new", "fresh", [], ["n2"]),
     {"incarnation": "abc", "status": "active", "bootstrap": "new", "decision": "fresh", "recovered_from": [],
      "peers": ["n2"]}),
    (m.PaxosStatusReply("abc", "recovering", "new", "fresh", [], ["n2"], 3, "StorageFull: disk full", 1500),
     {"incarnation": "abc", "status": "recovering", "bootstrap": "new", "decision": "fresh", "recovered_from": [],
      "peers": ["n2"], "identity_save_failures": 3, "identity_save_error": "StorageFull: disk full",
      "identity_unsaved_ms": 1500}),
]


def wire(raw: dict[str, Any]) -> Any:
    """What the peer receives: the map through msgpack, as the stream transport sends it."""
    return msgpack.unpackb(msgpack.packb(raw, use_bin_type=True), raw=False)


def _id(row: tuple[Any, dict[str, Any]]) -> str:
    return type(row[0]).__name__


@pytest.mark.parametrize("message,expected", REQUESTS, ids=[_id(r) for r in REQUESTS])
def test_a_request_encodes_to_the_old_map_byte_for_byte_and_decodes_back(message: Any, expected: dict[str, Any]) -> None:
    encoded = m.encode(message)
    assert wire(encoded) == wire(expected)  # tuples travel as arrays, as lists did
    assert list(encoded) == list(expected)  # key order too: the msgpack bytes are the same
    assert msgpack.packb(encoded, use_bin_type=True) == msgpack.packb(expected, use_bin_type=True)
    assert m.decode(wire(encoded)) == message
    assert m.decode_as(wire(expected), type(message)) == message


@pytest.mark.parametrize("reply,expected", REPLIES, ids=[_id(r) for r in REPLIES])
def test_a_reply_encodes_to_the_old_map_and_decodes_back(reply: Any, expected: dict[str, Any]) -> None:
    encoded = m.encode(reply)
    assert msgpack.packb(encoded, use_bin_type=True) == msgpack.packb(expected, use_bin_type=True)
    assert wire(encoded) == wire(expected) and list(encoded) == list(expected)
    assert m.decode_reply(wire(encoded), type(reply), "op") == reply


def test_every_message_type_has_a_row() -> None:
    covered = {type(message) for message, _ in REQUESTS + REPLIES}
    declared = set(m.REQUEST_TYPES) | {t for t in m.REPLIES.values() if t is not None} | {m.ErrorReply}
    assert declared - covered == set()


# --- malformed input: every field -----------------------------------------------------------------

WRONG = 3.5  # no field of any message is a float


def _wrong_inner(value: Any) -> Any | None:
    """The value with its first nested element replaced by a wrong one (None: nothing nested)."""
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, list) and first:
            return [[WRONG, *first[1:]], *value[1:]]
        return [WRONG, *value[1:]]
    if isinstance(value, dict) and value:
        return None  # free-form maps (an error body, a round's figures) are checked as maps only
    return None


def malformed_cases(rows: list[tuple[Any, dict[str, Any]]], is_request: bool) -> list[Any]:
    cases = []
    for message, expected in rows:
        name = type(message).__name__
        for field, value in expected.items():
            if field == "op":
                continue
            cases.append(pytest.param(type(message), {**expected, field: WRONG}, id=f"{name}-{field}-wrong-type"))
            inner = _wrong_inner(value)
            if inner is not None:
                cases.append(pytest.param(type(message), {**expected, field: inner}, id=f"{name}-{field}-wrong-element"))
        # optional fields omitted at their default are checked when present, too
        fields = msgspec.structs.fields(message)
        if not any(isinstance(f.type, type) and f.type.__name__.endswith("Request") for f in fields):
            for f in fields:
                if f.name not in expected:
                    cases.append(pytest.param(type(message), {**expected, f.name: WRONG}, id=f"{name}-{f.name}-present-wrong"))
        for f in fields:
            if f.required and f.name in expected:
                missing = {k: v for k, v in expected.items() if k != f.name}
                cases.append(pytest.param(type(message), missing, id=f"{name}-{f.name}-missing"))
    cases.append(pytest.param(type(rows[0][0]), [1, 2], id=f"{'request' if is_request else 'reply'}-not-a-map"))
    return cases


@pytest.mark.parametrize("cls,raw", malformed_cases(REQUESTS, True))
def test_a_malformed_request_field_is_a_message_error(cls: type, raw: Any) -> None:
    with pytest.raises(m.MessageError):
        m.decode_as(wire(raw) if isinstance(raw, dict) else raw, cls)
    if isinstance(raw, dict):
        with pytest.raises(m.MessageError):
            m.decode(wire(raw))


@pytest.mark.parametrize("cls,raw", malformed_cases(REPLIES, False))
def test_a_malformed_reply_field_is_a_message_error(cls: type, raw: Any) -> None:
    with pytest.raises(m.MessageError):
        m.decode_reply(wire(raw) if isinstance(raw, dict) else raw, cls, "op")


@pytest.mark.parametrize("raw", [None, [], {"op": 5}, {"op": "no_such_op"}, {}])
def test_an_unknown_or_missing_op_is_a_message_error(raw: Any) -> None:
    with pytest.raises(m.MessageError):
        m.decode(raw)


@pytest.mark.parametrize("cls,raw", [
    (m.AePull, {"op": "ae_pull", "keys": [[i, f"k{i}"] for i in range(m.OBJECTS_PER_MESSAGE + 1)]}),
    (m.AePush, {"op": "ae_push", "objects": [[i, "k", b""] for i in range(m.OBJECTS_PER_MESSAGE + 1)]}),
    (m.ReapCheck, {"op": "reap_check", "keys": [[i, "k", b""] for i in range(m.OBJECTS_PER_MESSAGE + 1)]}),
    (m.AeSummary, {"op": "ae_summary", "ranges": [[i, i + 1] for i in range(m.SUMMARY_BATCH + 1)]}),
    (m.CoordinateWrite, {"op": "coordinate_write", "key": "k", "value": None, "context": [], "w": 0,
                         "sloppy": False, "timeout_ms": 5}),
    (m.ReplicaPut, {"op": "replica_put", "key": "k", "token": True, "obj": b""}),  # a bool is not an int
    (m.ReplicaPut, {"op": "replica_put", "key": "k", "token": 1, "obj": "b2Jq"}),  # a str is not bytes
    (m.AeBuckets, {"op": "ae_buckets", "shape": [-100, 100, 2], "buckets": [0, 3], "fresh": 1}),
    (m.PaxosAccept, {**accept_message("k", 5, BALLOT, RegisterValue.of(b"v"), None), "promise_next": [1, "n1"]}),
], ids=["pull-bound", "push-bound", "reap-bound", "summary-bound", "w-zero", "bool-token", "str-obj", "int-fresh",
        "promise-before-ballot"])
def test_bounds_and_strictness(cls: type, raw: dict[str, Any]) -> None:
    with pytest.raises(m.MessageError):
        m.decode_as(wire(raw), cls)


def test_fields_a_newer_peer_adds_are_ignored() -> None:
    assert m.decode({"op": "replica_get", "key": "k", "token": 1, "future": [1]}) == m.ReplicaGet("k", 1)


# --- the registry against a real node ---------------------------------------------------------------


def test_every_op_a_node_serves_is_in_the_registry() -> None:
    node = _unstarted_node()
    assert sorted(node.handlers) == sorted(m.REGISTRY)
    assert set(m.REPLIES) == set(m.REGISTRY)
    for op, cls in m.REGISTRY.items():
        assert op == cls.OP  # type: ignore[attr-defined]


async def test_a_served_handler_decodes_calls_and_encodes() -> None:
    seen: list[m.ReplicaGet] = []

    async def handler(sender: str, request: m.ReplicaGet) -> m.ReplicaGetReply:
        seen.append(request)
        return m.ReplicaGetReply(b"o")

    served = m.serve(m.ReplicaGet, handler)
    assert await served("n2", {"op": "replica_get", "key": "k", "token": 1, "cv": 0}) == {"obj": b"o"}
    assert seen == [m.ReplicaGet("k", 1, cv=0)]
    with pytest.raises(m.MessageError):
        await served("n2", {"op": "replica_get", "key": "k"})
    assert len(seen) == 1  # a malformed request never reaches the handler


# Ops whose handlers parse their own maps: the CASPaxos votes, through paxos_wire (registered here
# as adapters; the acceptor refuses a malformed one with its own typed error).
SELF_PARSED = {"paxos_prepare", "paxos_accept", "paxos_peek"}


@pytest.mark.parametrize("op", sorted(set(m.REGISTRY) - SELF_PARSED))
async def test_the_node_answers_a_malformed_message_bad_request_before_any_handler_runs(op: str) -> None:
    node = _unstarted_node()
    sample = next(expected for message, expected in REQUESTS if op == type(message).OP)
    malformed = {**{k: WRONG for k in sample}, "cv": WRONG, "op": op}  # every field, cv too, of the wrong type
    reply = await node.handle_message("n2", malformed)
    assert reply["error"] == "bad_request" and reply["remote_error"] is True, reply
    assert f"malformed {op} message" in reply["message"]


@pytest.mark.parametrize("change", [["write", "text"], ["put_if_absent", None], ["cas", None, b"v"], ["cas", "e", "v"]])
async def test_a_cp_propose_whose_change_arguments_are_mistyped_is_bad_request_and_proposes_nothing(
    change: list[Any],
) -> None:
    node = _unstarted_node()
    proposed: list[Any] = []

    async def propose_here(*args: Any, **kwargs: Any) -> dict[str, Any]:
        proposed.append(args)
        return {"outcome": "ok", "value": None, "etag": None}

    node.parts.register.propose_here = propose_here  # type: ignore[method-assign]
    reply = await node.handle_message("n2", {"op": "cp_propose", "key": "k", "change": change, "timeout_ms": 500})
    assert reply["error"] == "bad_request" and reply["remote_error"] is True, reply
    assert proposed == []
    ok = await node.handle_message("n2", {"op": "cp_propose", "key": "k", "change": ["write", b"v"], "timeout_ms": 500})
    assert ok == {"status": "ok", "outcome": "ok", "value": None, "etag": None} and len(proposed) == 1


def _unstarted_node() -> Any:
    members = tuple(Member(f"n{i}", "127.0.0.1", 7000 + i, 8000 + i) for i in (1, 2, 3))
    cfg = NodeConfig(node_id="n1", members=members, secret="s", replicas=3, storage="memory",
                     initial_cluster_state="new")
    seams = NodeSeams(transport=MemoryNetwork().endpoint("n1"), data=MemoryStorage(), hints=MemoryStorage(),
                      paxos=MemoryStorage(), clock=SystemClock(), rng=random.Random(1))
    return assemble_node(cfg, seams)
