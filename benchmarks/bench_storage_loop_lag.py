"""Event-loop lag under storage write load: the sqlite engine vs. blocking sqlite on the loop.

Theory of operation
-------------------
A node serves every request from one event loop, so a storage engine that blocks the loop
(an fsync is milliseconds) delays *every* request, not just the writer.  This benchmark runs
a *ticker* coroutine that sleeps 1 ms over and over and records how late it wakes up
(``perf_counter`` overshoot), while 8 concurrent writer coroutines each do K puts, for:

* ``idle``: the ticker alone (the loop's own timer jitter: the floor),
* ``memory``: ``MemoryStorage`` (no I/O; the cost of the write path itself),
* ``sqlite-always`` / ``sqlite-batch`` / ``sqlite-never``: ``SqliteStorage`` per fsync policy,
* ``bad-sync``: the deliberately bad baseline, sqlite called synchronously on the loop with
  ``synchronous=FULL`` and a commit (an fsync) per write.

Each writer yields to the loop after every put (``sleep(0)``), as a node does between
requests; without that the bad baseline would starve the ticker completely.  Every run is
bounded by K puts per writer *and* a per-run time budget (6 s); three interleaved rounds, samples
pooled per run, take well under a minute.  Output: writes/s, lag p50/p99/max, commits (fsync batches) and the ratio of
each run's lag to the bad baseline's.

Usage: ``python benchmarks/bench_storage_loop_lag.py [--puts K] [--rounds R] [--dir DIR] [--loop asyncio]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kvstore.storage import MemoryStorage, SqliteStorage

TICK_S = 0.001


@dataclass
class Result:
    name: str
    writes: int
    elapsed_s: float
    lags_ms: list[float]
    commits: int | None

    @property
    def writes_per_s(self) -> float:
        return self.writes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def pct(self, q: float) -> float:
        if not self.lags_ms:
            return float("nan")
        ordered = sorted(self.lags_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.lags_ms) if self.lags_ms else float("nan")

    @property
    def p99(self) -> float:
        return self.pct(0.99)

    @property
    def max(self) -> float:
        return max(self.lags_ms) if self.lags_ms else float("nan")


class BadSyncStorage:
    """The anti-pattern: blocking sqlite calls on the event loop, one fsynced commit per write."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS kv (token INTEGER NOT NULL, key TEXT NOT NULL,"
            " blob BLOB NOT NULL, PRIMARY KEY (token, key)) WITHOUT ROWID"
        )
        self.commits = 0

    async def put(self, key: str, token: int, blob: bytes) -> None:
        self.conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (token, key, blob))
        self.commits += 1  # autocommit: each statement is its own fsynced transaction

    async def close(self) -> None:
        self.conn.close()


async def ticker(stop: asyncio.Event, lags_ms: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(TICK_S)
        lags_ms.append((time.perf_counter() - t0 - TICK_S) * 1000.0)


async def run_one(
    name: str,
    put: Callable[[str, int, bytes], Awaitable[None]] | None,
    writers: int,
    puts_per_writer: int,
    blob_size: int,
    budget_s: float,
) -> tuple[int, float, list[float]]:
    lags: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(stop, lags))
    await asyncio.sleep(0.05)  # let the ticker settle; its warm-up samples are dropped
    lags.clear()
    rng = random.Random(name)
    blob = rng.randbytes(blob_size)
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + budget_s

    async def writer(w: int) -> None:
        nonlocal done
        assert put is not None
        for i in range(puts_per_writer):
            if time.perf_counter() > deadline:
                return
            await put(f"w{w}-k{i}", rng.randint(-(2**63), 2**63 - 1), blob)
            done += 1
            await asyncio.sleep(0)  # a node yields between requests

    if put is None:
        await asyncio.sleep(min(1.0, budget_s))
    else:
        await asyncio.gather(*(writer(w) for w in range(writers)))
    elapsed = time.perf_counter() - t0
    stop.set()
    await tick
    return done, elapsed, lags


def count_commits(store: SqliteStorage) -> list[int]:
    """Count the writer's transactions by wrapping its batch method (benchmark-only hook)."""
    counter = [0]
    original = store._apply

    def counted(cur: Any, batch: Any) -> Any:
        counter[0] += 1
        return original(cur, batch)

    store._apply = counted  # type: ignore[method-assign]
    return counter


PLANS = ("idle", "memory", "sqlite-always", "sqlite-batch", "sqlite-never", "bad-sync")


async def run_plan(name: str, base: str, round_: int, args: argparse.Namespace) -> Result:
    path = os.path.join(base, f"{name}-{round_}.db")
    commits: list[int] | None = None
    store: Any = None
    if name == "memory":
        store = MemoryStorage()
    elif name.startswith("sqlite-"):
        store = SqliteStorage(path, name.split("-", 1)[1], args.batch_window_ms)  # type: ignore[arg-type]
        commits = count_commits(store)
    elif name == "bad-sync":
        store = BadSyncStorage(path)
    put = store.put if store is not None else None
    done, elapsed, lags = await run_one(name, put, args.writers, args.puts, args.blob_size, args.budget_s)
    if isinstance(store, BadSyncStorage):
        commits = [store.commits]
    if store is not None:
        await store.close()
    print(f"  round {round_} {name}: {done} writes in {elapsed:.2f} s", file=sys.stderr, flush=True)
    return Result(name, done, elapsed, lags, commits[0] if commits else None)


async def main_async(args: argparse.Namespace) -> list[Result]:
    base = tempfile.mkdtemp(prefix="kvstore-bench-", dir=args.dir)
    pooled: dict[str, Result] = {}
    try:
        # Rounds interleave the runs so that noise from other processes on the machine
        # spreads over every run instead of landing on one; samples are pooled per run.
        for round_ in range(args.rounds):
            for name in args.only or PLANS:
                r = await run_plan(name, base, round_, args)
                acc = pooled.setdefault(name, Result(name, 0, 0.0, [], None if r.commits is None else 0))
                acc.writes += r.writes
                acc.elapsed_s += r.elapsed_s
                acc.lags_ms.extend(r.lags_ms)
                if r.commits is not None and acc.commits is not None:
                    acc.commits += r.commits
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return list(pooled.values())


def report(results: list[Result], args: argparse.Namespace, loop_name: str) -> None:
    bad = next((r for r in results if r.name == "bad-sync"), None)
    print(
        f"# {args.rounds} rounds of {args.writers} writers x {args.puts} puts of {args.blob_size} B, ticker {TICK_S * 1000:.0f} ms,"
        f" loop={loop_name}, batch_window_ms={args.batch_window_ms}, dir={args.dir or tempfile.gettempdir()},"
        f" python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus"
    )
    header = (
        f"| {'run':<14} | {'writes':>6} | {'writes/s':>9} | {'commits':>7} | {'ticks':>5} | {'lag p50 ms':>10} |"
        f" {'lag p99 ms':>10} | {'lag max ms':>10} | {'p99 vs bad':>10} | {'max vs bad':>10} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    bad_p99 = bad.p99 if bad else float("nan")
    bad_max = bad.max if bad else float("nan")
    for r in results:
        commits = "-" if r.commits is None else str(r.commits)
        print(
            f"| {r.name:<14} | {r.writes:>6} | {r.writes_per_s:>9.0f} | {commits:>7} | {len(r.lags_ms):>5} | {r.p50:>10.3f} |"
            f" {r.p99:>10.3f} | {r.max:>10.3f} | {r.p99 / bad_p99:>10.3f} | {r.max / bad_max:>10.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--puts", type=int, default=2000, help="puts per writer (K), per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=PLANS, help="run only these (default: all)")
    parser.add_argument("--blob-size", type=int, default=256)
    parser.add_argument("--batch-window-ms", type=float, default=2.0)
    parser.add_argument("--budget-s", type=float, default=6.0, help="time cap per run")
    parser.add_argument("--dir", default=None, help="where to put the database files (default: $TMPDIR)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    assert args.writers >= 1 and args.puts >= 1 and args.rounds >= 1 and args.budget_s > 0
    loop_name = args.loop
    if args.loop == "uvloop":
        try:
            import uvloop

            results = uvloop.run(main_async(args))
        except ImportError:
            loop_name = "asyncio (uvloop missing)"
            results = asyncio.run(main_async(args))
    else:
        results = asyncio.run(main_async(args))
    report(results, args, loop_name)


if __name__ == "__main__":
    main()
