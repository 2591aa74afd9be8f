"""What the fault layer costs a healthy cluster: loopback transport calls with and without it.

Every internal message passes through ``FaultRules`` twice (on send and on receipt).  With no
fault installed that is one dict lookup each.  This benchmark runs two real ``StreamTransport``
endpoints on 127.0.0.1 and measures calls/s (64 in flight) with the normal, empty fault table
and with the checks replaced by constants, alternating the two in rounds so machine noise hits
both alike, and prints the ratio.  It also times the checks alone.

    python benchmarks/bench_fault_layer.py [--calls 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import timeit
from typing import Any

from kvstore.harness.local_cluster import free_ports
from kvstore.transport.base import FaultRules
from kvstore.transport.stream import StreamTransport


class NoFaults(FaultRules):
    """The same interface with the checks removed: the cost floor."""

    def outgoing_delay_s(self, peer: str) -> float | None:
        return 0.0

    def incoming_dropped(self, peer: str) -> bool:
        return False


async def calls_per_s(faults_a: FaultRules, faults_b: FaultRules, calls: int, concurrency: int = 64) -> float:
    port_a, port_b = free_ports(2)
    a = StreamTransport("a", "bench-secret", {"b": ("127.0.0.1", port_b)}, ("127.0.0.1", port_a), faults_a)
    b = StreamTransport("b", "bench-secret", {"a": ("127.0.0.1", port_a)}, ("127.0.0.1", port_b), faults_b)

    async def echo(sender: str, message: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    await a.start(echo)
    await b.start(echo)
    try:
        await a.call("b", {"op": "warm"}, 2.0)
        remaining = calls
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await a.call("b", {"op": "x", "key": "k", "obj": b"v" * 100}, 2.0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return calls / (time.perf_counter() - started)
    finally:
        await a.close()
        await b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    rules = FaultRules()
    check_ns = timeit.timeit(lambda: (rules.outgoing_delay_s("b"), rules.incoming_dropped("a")), number=200_000) / 200_000 * 1e9
    with_layer: list[float] = []
    without: list[float] = []
    for _ in range(args.rounds):
        with_layer.append(asyncio.run(calls_per_s(FaultRules(), FaultRules(), args.calls)))
        without.append(asyncio.run(calls_per_s(NoFaults(), NoFaults(), args.calls)))
    med_with, med_without = statistics.median(with_layer), statistics.median(without)
    print(f"fault checks alone (empty table, send + receive): {check_ns:.0f} ns per message")
    print(f"loopback calls/s with the fault layer:    median {med_with:8.0f}  rounds {[round(x) for x in with_layer]}")
    print(f"loopback calls/s without (checks stubbed): median {med_without:8.0f}  rounds {[round(x) for x in without]}")
    print(f"ratio with/without: {med_with / med_without:.3f}   "
          f"(per-call cost {1e9 / med_with:.0f} ns vs {1e9 / med_without:.0f} ns)")


if __name__ == "__main__":
    main()
