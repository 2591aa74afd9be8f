"""CPU of the typed message codec on a write's path, against the hand-built maps it replaced, same run.

Why
---
``kvstore.protocol.messages`` builds and checks every peer message.  A quorum write (N=3, W=2) at a
primary sends two ``replica_put`` calls, each decoded and answered at a replica (in a 3-node
cluster every node is a primary of every key); a write that arrives at a non-primary adds a
``coordinate_write`` and its answer, and a put to a fallback a ``hint_for``: both are measured.  This measures what those
steps cost through the codec and through the code they replaced (dict literals, ``message["key"]``,
``int(...)``), interleaved in one process, so the difference is the codec's and nothing else's.
The object blob is a fixed 100-byte value: decoding the object itself is the same in both paths.
For scale, the same run also measures the CPU of a whole quorum write (N=3, W=2) in a 3-node
in-process cluster on the memory seams (``KvApi.handle``, no sockets), and prints the codec's share.

Usage::

    python benchmarks/bench_messages.py [--rounds 5] [--ops 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

import msgspec

from kvstore.clock import SystemClock
from kvstore.config import Member, NodeConfig
from kvstore.protocol import messages as m
from kvstore.runtime.assembly import NodeSeams, assemble_node
from kvstore.server.kv_api import ApiRequest, KvApi
from kvstore.storage import MemoryStorage
from kvstore.transport.memory import MemoryNetwork

OBJ = b"x" * 100


def old_replica_puts(hints: tuple[str | None, ...]) -> None:
    """The pre-codec maps of a primary's replica puts: built once, copied per call, parsed at the replica."""
    put: dict[str, Any] = {"op": "replica_put", "key": "key-1", "token": 12345, "obj": OBJ}
    put["cv"] = 1
    for hint in hints:
        message = dict(put)
        if hint is not None:
            message["hint_for"] = hint
        _ = (message["key"], int(message["token"]), message["obj"], message.get("hint_for"))
        reply: dict[str, Any] = {"ok": True}
        assert not reply.get("remote_error")


def new_replica_puts(hints: tuple[str | None, ...]) -> None:
    """The same steps through the codec."""
    put = m.ReplicaPut("key-1", 12345, OBJ, cv=1)
    encoded = m.encode(put)
    for hint in hints:
        message = dict(encoded) if hint is None else m.encode(msgspec.structs.replace(put, hint_for=hint))
        got = m.decode_as(message, m.ReplicaPut)
        _ = (got.key, got.token, got.obj, got.hint_for)
        reply = m.encode(m.OK)
        assert not reply.get("remote_error")


def old_forward() -> None:
    """The pre-codec maps of forwarding a write to a primary and reading its answer."""
    forward: dict[str, Any] = {"op": "coordinate_write", "key": "key-1", "value": OBJ, "context": [("n1.a", 3)],
                               "w": 2, "sloppy": True, "timeout_ms": 900, "cv": 1}
    _ = (forward["key"], forward["value"], dict(forward["context"]), int(forward["w"]), bool(forward["sloppy"]),
         int(forward["timeout_ms"]))
    answer: dict[str, Any] = {"status": "ok", "obj": OBJ, "acknowledged": 2, "hinted": []}
    _ = (answer["obj"], int(answer["acknowledged"]), list(answer.get("hinted", [])))


def new_forward() -> None:
    forward = m.encode(m.CoordinateWrite("key-1", OBJ, [("n1.a", 3)], 2, True, 900, cv=1))
    request = m.decode_as(forward, m.CoordinateWrite)
    _ = (request.key, request.value, dict(request.context), request.w, request.sloppy, request.timeout_ms)
    answer = m.decode_reply(m.encode(m.CoordinateWriteReply("ok", obj=OBJ, acknowledged=2, hinted=[])),
                            m.CoordinateWriteReply, "coordinate_write")
    _ = (answer.obj, answer.acknowledged, list(answer.hinted or []))


def old_primary_write() -> None:
    """A write at a primary (every write of a 3-node N=3 cluster): two replica puts."""
    old_replica_puts((None, None))


def new_primary_write() -> None:
    new_replica_puts((None, None))


def old_worst_write() -> None:
    """A write forwarded to a primary that hands one of its puts to a fallback."""
    old_forward()
    old_replica_puts((None, "n4"))


def new_worst_write() -> None:
    new_forward()
    new_replica_puts((None, "n4"))


def time_us(fn: Any, ops: int) -> float:
    started = time.process_time()
    for _ in range(ops):
        fn()
    return (time.process_time() - started) / ops * 1e6


async def cluster_write_us(ops: int) -> float:
    """CPU per PUT (N=3, W=2, 100 B) of a 3-node in-process cluster, each request at a rotating node."""
    members = tuple(Member(f"n{i}", "127.0.0.1", 7000 + i, 8000 + i) for i in (1, 2, 3))
    network = MemoryNetwork()
    nodes = []
    for seed, member in enumerate(members):
        cfg = NodeConfig(node_id=member.id, members=members, secret="s", replicas=3, r=2, w=2, storage="memory",
                         initial_cluster_state="new")
        nodes.append(assemble_node(cfg, NodeSeams(
            transport=network.endpoint(member.id), data=MemoryStorage(), hints=MemoryStorage(),
            paxos=MemoryStorage(), clock=SystemClock(), rng=random.Random(seed),
        )))
    for node in nodes:
        await node.start()
    try:
        apis = [KvApi(node) for node in nodes]

        async def put(i: int) -> None:
            answer = await apis[i % 3].handle(ApiRequest("PUT", f"/kv/k{i}", {"w": "2"}, {}, OBJ))
            assert answer.status in (200, 204), answer

        for i in range(200):  # warm-up
            await put(-1 - i)
        started = time.process_time()
        for i in range(ops):
            await put(i)
        return (time.process_time() - started) / ops * 1e6
    finally:
        for node in nodes:
            await node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=20_000, help="write paths per round and variant")
    parser.add_argument("--cluster-ops", type=int, default=2000, help="in-process cluster writes per round")
    args = parser.parse_args(argv)
    old: list[float] = []
    new: list[float] = []
    old_worst: list[float] = []
    new_worst: list[float] = []
    whole: list[float] = []
    for round_no in range(1, args.rounds + 1):
        old.append(time_us(old_primary_write, args.ops))
        new.append(time_us(new_primary_write, args.ops))
        old_worst.append(time_us(old_worst_write, args.ops))
        new_worst.append(time_us(new_worst_write, args.ops))
        whole.append(asyncio.run(cluster_write_us(args.cluster_ops)))
        print(f"round {round_no}: primary write old {old[-1]:.2f} codec {new[-1]:.2f} us; forwarded+hinted old "
              f"{old_worst[-1]:.2f} codec {new_worst[-1]:.2f} us; in-process cluster write {whole[-1]:.0f} us")
    med = statistics.median
    o, n, w = med(old), med(new), med(whole)
    print(f"median CPU of a primary write's messages: old maps {o:.2f} us, codec {n:.2f} us (+{n - o:.2f} us)")
    print(f"median CPU of a forwarded, hinted write's messages: old maps {med(old_worst):.2f} us, "
          f"codec {med(new_worst):.2f} us (+{med(new_worst) - med(old_worst):.2f} us)")
    print(f"median CPU of a whole in-process quorum write (at a primary): {w:.0f} us; "
          f"the codec's extra is {(n - o) / w:.1%} of it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
