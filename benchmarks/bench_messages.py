"""CPU of the typed message codec on a write's path, against the hand-built maps it replaced, same run.

Why
---
``kvstore.protocol.messages`` builds and checks every peer message.  A quorum write (N=3, W=2) at a
primary sends two ``replica_put`` calls, each decoded and answered at a replica; a write that
arrives at a non-primary adds a ``coordinate_write`` and its answer.  This measures what those
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
from dataclasses import replace
from typing import Any

from kvstore.clock import SystemClock
from kvstore.config import Member, NodeConfig
from kvstore.protocol import messages as m
from kvstore.runtime.assembly import NodeSeams, assemble_node
from kvstore.server.kv_api import ApiRequest, KvApi
from kvstore.storage import MemoryStorage
from kvstore.transport.memory import MemoryNetwork

OBJ = b"x" * 100


def old_write_path() -> None:
    """The pre-codec maps of one write at a non-primary: forward, coordinate, two replica puts."""
    forward: dict[str, Any] = {"op": "coordinate_write", "key": "key-1", "value": OBJ, "context": [("n1.a", 3)], "w": 2,
               "sloppy": True, "timeout_ms": 900, "cv": 1}
    _ = (forward["key"], forward["value"], dict(forward["context"]), int(forward["w"]), bool(forward["sloppy"]),
         int(forward["timeout_ms"]))
    put: dict[str, Any] = {"op": "replica_put", "key": "key-1", "token": 12345, "obj": OBJ}
    put["cv"] = 1
    for hint in (None, "n4"):
        message = dict(put)
        if hint is not None:
            message["hint_for"] = hint
        _ = (message["key"], int(message["token"]), message["obj"], message.get("hint_for"))
        reply: dict[str, Any] = {"ok": True}
        assert not reply.get("remote_error")
    answer: dict[str, Any] = {"status": "ok", "obj": OBJ, "acknowledged": 2, "hinted": []}
    _ = (answer["obj"], int(answer["acknowledged"]), list(answer.get("hinted", [])))


def new_write_path() -> None:
    """The same steps through the codec."""
    forward = m.encode(m.CoordinateWrite("key-1", OBJ, [("n1.a", 3)], 2, True, 900, cv=1))
    request = m.decode_as(forward, m.CoordinateWrite)
    _ = (request.key, request.value, dict(request.context), request.w, request.sloppy, request.timeout_ms)
    put = m.ReplicaPut("key-1", 12345, OBJ, cv=1)
    encoded = m.encode(put)
    for hint in (None, "n4"):
        message = dict(encoded) if hint is None else m.encode(replace(put, hint_for=hint))
        got = m.decode_as(message, m.ReplicaPut)
        _ = (got.key, got.token, got.obj, got.hint_for)
        reply = m.encode(m.Ok())
        assert not reply.get("remote_error")
    answer = m.decode_reply(m.encode(m.CoordinateWriteReply("ok", obj=OBJ, acknowledged=2, hinted=[])),
                            m.CoordinateWriteReply, "coordinate_write")
    _ = (answer.obj, answer.acknowledged, list(answer.hinted or []))


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
    whole: list[float] = []
    for round_no in range(1, args.rounds + 1):
        old.append(time_us(old_write_path, args.ops))
        new.append(time_us(new_write_path, args.ops))
        whole.append(asyncio.run(cluster_write_us(args.cluster_ops)))
        print(f"round {round_no}: old {old[-1]:.2f} us/write  codec {new[-1]:.2f} us/write  "
              f"in-process cluster write {whole[-1]:.0f} us")
    o, n, w = statistics.median(old), statistics.median(new), statistics.median(whole)
    print(f"median CPU per write path: old maps {o:.2f} us, codec {n:.2f} us, "
          f"codec - old = {n - o:.2f} us ({n / o:.2f}x of the message-handling part only)")
    print(f"median CPU of a whole in-process quorum write: {w:.0f} us; the codec's extra is {(n - o) / w:.1%} of it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
