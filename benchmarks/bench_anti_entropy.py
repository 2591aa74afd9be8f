"""Anti-entropy convergence: how long a replica that missed K writes takes to catch up, with no reads.

Theory of operation
-------------------
Read repair only fixes keys that are read and hinted handoff only covers writes that went to
fallbacks; anti-entropy is what repairs everything else.  This benchmark builds the worst case
for it on real node processes (``LocalCluster``: 5 nodes, N=3, sqlite, fsync=batch):

1. isolate one node with ``/admin/faults`` (both directions, on every node) and wait until
   the others' failure detectors call it down;
2. write K keys through the other nodes with ``sloppy=false, w=2``: strict quorums, so no
   fallback keeps a hint and the isolated node's share of the keys (about 3/5 of K) exists
   only on the two other primaries;
3. heal, wait until everyone sees it up, then ``POST /admin/repair`` on every node and time
   until the isolated node's *own* copy (read from its data store through the authenticated
   internal route, never a client read) holds every key it replicates.

Printed: keys written, keys the node missed, seconds to converge, keys exchanged (the
``kvstore_anti_entropy_keys`` counter summed over nodes; both sides of a pair may exchange the
same key), range exchanges by result, and the duration of one more, already-converged round.
Client reads are counted from the nodes' metrics and must be 0.

Each run uses a fresh cluster; with ``--runs R`` the summary gives the median and every run.
The machine, load average, commit and where ``kvstore`` was imported from are printed first
(``benchmarks.loadgen.machine_info``): measure a ``git archive`` snapshot, see docs/benchmarks.md.

Usage: ``python benchmarks/bench_anti_entropy.py [--keys 10000] [--runs 3] [--nodes 5] [--rate 20000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

if __package__ in (None, ""):  # ``python benchmarks/bench_anti_entropy.py``: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen import http_call, loadavg, machine_info  # noqa: E402
from kvstore.client import AiohttpTransport, Client, KVError  # noqa: E402
from kvstore.config import APSettings  # noqa: E402
from kvstore.harness.local_cluster import LocalCluster  # noqa: E402
from kvstore.protocol import versions  # noqa: E402
from kvstore.protocol.ring import Ring, key_token  # noqa: E402

PULL_BATCH = 256


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return http_call(url, method, path, body, headers, timeout_s=30.0)


async def write_keys(urls: list[str], keys: list[str], writers: int) -> list[int]:
    """Write each key (its own bytes as value, w=2, strict quorum) through ``kvstore.Client``, key ``i``
    via ``urls[i % len(urls)]``, ``writers`` at a time; the status of each (599: no answer)."""
    transport = AiohttpTransport(max_connections=writers)
    clients = [Client(url, transport=transport, timeout_s=30.0) for url in urls]
    statuses = [0] * len(keys)
    next_index = 0

    async def writer() -> None:
        nonlocal next_index
        while next_index < len(keys):
            i = next_index
            next_index += 1
            try:
                await clients[i % len(clients)].put(keys[i], keys[i].encode(), w=2, sloppy=False)
                statuses[i] = 204
            except KVError as exc:
                statuses[i] = exc.status or 599

    try:
        await asyncio.gather(*(writer() for _ in range(writers)))
    finally:
        await transport.close()
    return statuses


class Bench:
    def __init__(self, cluster: LocalCluster) -> None:
        self.c = cluster
        self.secret = {"X-Cluster-Secret": cluster.secret}

    def admin(self, node: str, method: str, path: str, body: Any = None) -> Any:
        status, raw = request(self.c.url(node), method, path, None if body is None else json.dumps(body).encode(),
                              {**self.secret, "Content-Type": "application/json"})
        if status not in (200, 202):
            raise RuntimeError(f"{method} {path} on {node}: {status} {raw[:200]!r}")
        return json.loads(raw)

    def state(self, observer: str, member: str) -> str:
        _, raw = request(self.c.url(observer), "GET", "/cluster")
        return str(next(m["state"] for m in json.loads(raw)["members"] if m["id"] == member))

    def wait_state(self, observers: list[str], member: str, state: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(self.state(o, member) == state for o in observers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{observers} never saw {member} {state}")
            time.sleep(0.1)

    def stored(self, node: str, keys: list[str]) -> dict[str, bytes | None]:
        """The node's own data-store copies (live value or None), through the internal ae_pull route."""
        out: dict[str, bytes | None] = {}
        pending = list(keys)
        while pending:
            batch = pending[:PULL_BATCH]
            message = {"op": "ae_pull", "keys": [[key_token(k), k] for k in batch]}
            status, raw = request(self.c.url(node), "POST", "/internal/msg", msgpack.packb(message),
                                  {**self.secret, "X-Node": "bench"})
            assert status == 200, raw
            objects = msgpack.unpackb(raw, raw=False)["objects"]
            for key, blob in objects:
                live = versions.decode(blob).live_values if blob is not None else []
                out[key] = live[0] if len(live) == 1 else None
            pending = pending[len(objects):]
        return out

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for node in self.c.node_ids:
            _, raw = request(self.c.url(node), "GET", "/metrics")
            for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", raw.decode(), re.MULTILINE):
                got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
                if all(got.get(k) == v for k, v in labels.items()):
                    total += float(m.group(2))
        return total

    def ae_status(self, node: str) -> dict[str, Any]:
        status, raw = request(self.c.url(node), "POST", "/internal/msg", msgpack.packb({"op": "ae_status"}),
                              {**self.secret, "X-Node": "bench"})
        assert status == 200, raw
        doc: dict[str, Any] = msgpack.unpackb(raw, raw=False)
        return doc

    def wait_rounds_done(self, nodes: list[str], timeout_s: float = 600) -> list[dict[str, Any]]:
        """Until no node is running an anti-entropy round; returns each node's last round."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = [self.ae_status(n) for n in nodes]
            if not any(s["running"] for s in status):
                return [s["last_round"] for s in status]
            if time.monotonic() > deadline:
                raise RuntimeError("rounds did not finish")
            time.sleep(0.1)


@dataclass
class RunResult:
    diverged: int
    converge_s: float
    rounds_s: float
    exchanged: float
    idle_round_s: float


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=1, help="fresh clusters, one after the other")
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--rate", type=int, default=20_000, help="ap.anti_entropy_keys_per_s")
    parser.add_argument("--writers", type=int, default=16)
    args = parser.parse_args()
    for name, value in machine_info().items():
        if name != "wrk":
            print(f"{name}: {value}")
    ap = APSettings(heartbeat_interval_ms=100, anti_entropy_interval_s=3600.0, anti_entropy_keys_per_s=args.rate)
    results: list[RunResult] = []
    for run_index in range(args.runs):
        print(f"--- run {run_index + 1}/{args.runs} (loadavg {loadavg()})")
        with tempfile.TemporaryDirectory(prefix="bench-ae-") as tmp:
            cluster = LocalCluster(args.nodes, 3, data_dir=tmp, ap=ap)
            try:
                cluster.start()
                result = run(Bench(cluster), args)
            finally:
                cluster.stop()
        if result is None:
            return 1
        results.append(result)
    converge = [r.converge_s for r in results]
    print(f"=== {args.keys} keys written, {args.nodes} nodes, N=3, rate {args.rate} keys/s: "
          f"converged in {statistics.median(converge):.2f}s (median of {len(results)}; runs: "
          + " / ".join(f"{r.converge_s:.2f}s ({r.diverged} diverged, {r.exchanged:.0f} exchanged)" for r in results)
          + f"); already-converged round {statistics.median(r.idle_round_s for r in results):.2f}s")
    return 0


def run(b: Bench, args: argparse.Namespace) -> RunResult | None:
    c = b.c
    victim = c.node_ids[-1]
    others = [n for n in c.node_ids if n != victim]
    ring = Ring(c.node_ids, c.base_config.vnodes)
    off = {"drop_in": True, "drop_out": True}
    b.admin(victim, "PUT", "/admin/faults", {"rules": {o: off for o in others}})
    for o in others:
        b.admin(o, "PUT", "/admin/faults", {"rules": {victim: off}})
    b.wait_state(others, victim, "down")

    keys = [f"bench-ae:{i:06d}" for i in range(args.keys)]

    started = time.monotonic()
    statuses = asyncio.run(write_keys([c.url(o) for o in others], keys, args.writers))
    if statuses.count(204) != len(keys):
        print(f"writes failed: { {s: statuses.count(s) for s in set(statuses)} }", file=sys.stderr)
        return None
    print(f"wrote {len(keys)} keys (w=2, sloppy=false) with {victim} partitioned in "
          f"{time.monotonic() - started:.1f}s")
    held = [k for k in keys if victim in ring.preference_list(k, 3)]
    missing = [k for k, v in b.stored(victim, held).items() if v is None]
    print(f"{victim} replicates {len(held)} of them and holds {len(held) - len(missing)}: {len(missing)} diverged")

    for n in c.node_ids:
        b.admin(n, "DELETE", "/admin/faults")
    b.wait_state(others, victim, "up")
    for o in others:
        b.wait_state([victim], o, "up")

    started = time.monotonic()
    for n in c.node_ids:
        b.admin(n, "POST", "/admin/repair")
    polls = 0
    while True:
        polls += 1
        now = b.stored(victim, held)
        if all(now[k] == k.encode() for k in held):
            break
        if time.monotonic() - started > 600:
            print("did not converge within 600 s", file=sys.stderr)
            return None
        time.sleep(0.2)
    converged_s = time.monotonic() - started
    rounds = b.wait_rounds_done(c.node_ids)
    rounds_s = time.monotonic() - started
    exchanged = b.metric("kvstore_anti_entropy_keys_total")
    by_result = {r: b.metric("kvstore_anti_entropy_rounds_total", result=r)
                 for r in ("in_sync", "repaired", "failed", "peer_down", "error")}
    reads = b.metric("kvstore_requests_total", op="get")

    # One more round over converged replicas: the cost of anti-entropy when nothing differs.
    idle_started = time.monotonic()
    for n in c.node_ids:
        b.admin(n, "POST", "/admin/repair")
    idle_rounds = b.wait_rounds_done(c.node_ids)
    idle_s = time.monotonic() - idle_started

    print(f"converged: {len(missing)} diverged keys on {victim} repaired in {converged_s:.2f}s "
          f"(all nodes' rounds finished after {rounds_s:.2f}s), no client reads ({reads:.0f} GETs)")
    print(f"keys exchanged (all nodes): {exchanged:.0f}; range exchanges: "
          + ", ".join(f"{k}={v:.0f}" for k, v in by_result.items() if v))
    for node, r in zip(c.node_ids, rounds, strict=True):
        print(f"  {node} repair round: {r}")
    print(f"an already-converged round on every node: {idle_s:.2f}s")
    for node, r in zip(c.node_ids, idle_rounds, strict=True):
        print(f"  {node} idle round: {r}")
    if reads:
        print(f"{reads:.0f} client reads happened: the measurement is void", file=sys.stderr)
        return None
    return RunResult(len(missing), converged_s, rounds_s, exchanged, idle_s)


if __name__ == "__main__":
    sys.exit(main())
