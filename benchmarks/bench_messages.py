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
For scale, the same run also measures the CPU of a whole quorum write (N=3, W=2) and read (R=2)
in a 3-node in-process cluster on the memory seams (``KvApi.handle``, no sockets; the memory
transport packs every message through msgpack as the stream transport does), and prints the
codec's share.

``--against PYTHON`` is an A/B of two checkouts: each round runs this file once under this
interpreter and once under ``PYTHON`` (another checkout's venv: ``kvstore`` is imported from
there), in alternating order, each in a fresh process measuring the codec steps and the whole
in-process write and read, and prints the ratios of the two, same run.

Usage::

    python benchmarks/bench_messages.py [--rounds 5] [--ops 20000]
    python benchmarks/bench_messages.py --against /path/to/base/.venv/bin/python [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from typing import Any

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
    encoded = m.encode(m.ReplicaPut("key-1", 12345, OBJ, cv=1))
    for hint in hints:
        message = dict(encoded) if hint is None else m.encode(m.ReplicaPut("key-1", 12345, OBJ, cv=1, hint_for=hint))
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


async def cluster_us(ops: int) -> tuple[float, float, int]:
    """CPU per PUT (N=3, W=2, 100 B, new keys) and per GET (R=2, random loaded keys) of a 3-node
    in-process cluster, each request at a rotating node; and how many answers were not a success
    (on a busy machine a request may time out on the real clock: counted, not hidden)."""
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
        pick = random.Random(7)
        failed = 0

        async def put(i: int) -> None:
            nonlocal failed
            query = {"consistency": "quorum", "w": "2"}
            answer = await apis[i % 3].handle(ApiRequest("PUT", f"/kv/k{i}", query, {}, OBJ))
            failed += answer.status not in (200, 204)

        async def get(i: int) -> None:
            nonlocal failed
            query = {"consistency": "quorum", "r": "2"}
            answer = await apis[i % 3].handle(ApiRequest("GET", f"/kv/k{pick.randrange(ops)}", query, {}))
            failed += answer.status != 200

        for i in range(200):  # warm-up
            await put(-1 - i)
        started = time.process_time()
        for i in range(ops):
            await put(i)
        put_us = (time.process_time() - started) / ops * 1e6
        for i in range(200):
            await get(i)
        started = time.process_time()
        for i in range(ops):
            await get(i)
        return put_us, (time.process_time() - started) / ops * 1e6, failed
    finally:
        for node in nodes:
            await node.stop()


def measure_once(ops: int, cluster_ops: int) -> dict[str, float]:
    """One round of every figure (CPU us per operation; ``cluster_failed``: requests not answered ok)."""
    put_us, get_us, failed = asyncio.run(cluster_us(cluster_ops))
    return {"old_primary": time_us(old_primary_write, ops), "codec_primary": time_us(new_primary_write, ops),
            "old_worst": time_us(old_worst_write, ops), "codec_worst": time_us(new_worst_write, ops),
            "cluster_put": put_us, "cluster_get": get_us, "cluster_failed": failed}


AB_FIGURES = {"codec_primary": "codec, a primary write's messages", "codec_worst": "codec, a forwarded+hinted write",
              "cluster_put": "in-process cluster quorum PUT", "cluster_get": "in-process cluster quorum GET"}


def ab(against: str, rounds: int, ops: int, cluster_ops: int) -> int:
    """This checkout (A) against another interpreter's (B), alternating, one fresh process each."""
    def child(python: str) -> dict[str, Any]:
        argv = [python, __file__, "--child", "--ops", str(ops), "--cluster-ops", str(cluster_ops)]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    for round_no in range(1, rounds + 1):
        order = ("A", "B") if round_no % 2 else ("B", "A")
        for side in order:
            runs[side].append(child(sys.executable if side == "A" else against))
        a, b = runs["A"][-1], runs["B"][-1]
        print(f"round {round_no} ({order[0]} first): " + "; ".join(
            f"{name} A {a[name]:.2f} B {b[name]:.2f} us" for name in AB_FIGURES)
            + f"; not ok A {a['cluster_failed']} B {b['cluster_failed']}")
    print(f"A: kvstore from {runs['A'][0]['kvstore']}\nB: kvstore from {runs['B'][0]['kvstore']}")
    for name, label in AB_FIGURES.items():
        a_med = statistics.median(r[name] for r in runs["A"])
        b_med = statistics.median(r[name] for r in runs["B"])
        ratios = [x[name] / y[name] for x, y in zip(runs["A"], runs["B"], strict=True)]
        print(f"{label}: median A {a_med:.2f} us, B {b_med:.2f} us, A/B {a_med / b_med:.3f} "
              f"(per round {min(ratios):.3f}..{max(ratios):.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=20_000, help="write paths per round and variant")
    parser.add_argument("--cluster-ops", type=int, default=2000, help="in-process cluster writes (and reads) per round")
    parser.add_argument("--against", metavar="PYTHON", help="A/B: this checkout against PYTHON's kvstore")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one A/B round, as JSON
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps({**measure_once(args.ops, args.cluster_ops), "kvstore": m.__file__}))
        return 0
    if args.against:
        return ab(args.against, args.rounds, args.ops, args.cluster_ops)
    rows: list[dict[str, float]] = []
    for round_no in range(1, args.rounds + 1):
        rows.append(measure_once(args.ops, args.cluster_ops))
        r = rows[-1]
        print(f"round {round_no}: primary write old {r['old_primary']:.2f} codec {r['codec_primary']:.2f} us; "
              f"forwarded+hinted old {r['old_worst']:.2f} codec {r['codec_worst']:.2f} us; in-process cluster "
              f"write {r['cluster_put']:.0f} us, read {r['cluster_get']:.0f} us ({r['cluster_failed']:.0f} not ok)")
    o, n, w, g = (statistics.median(r[name] for r in rows)
                  for name in ("old_primary", "codec_primary", "cluster_put", "cluster_get"))
    ow, nw = (statistics.median(r[name] for r in rows) for name in ("old_worst", "codec_worst"))
    print(f"median CPU of a primary write's messages: old maps {o:.2f} us, codec {n:.2f} us ({n - o:+.2f} us)")
    print(f"median CPU of a forwarded, hinted write's messages: old maps {ow:.2f} us, "
          f"codec {nw:.2f} us ({nw - ow:+.2f} us)")
    print(f"median CPU of a whole in-process quorum write (at a primary): {w:.0f} us; "
          f"the codec's extra is {(n - o) / w:.1%} of it; a quorum read: {g:.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
