"""Where a node's CPU goes under load: py-spy on every node of a local cluster, aggregated.

Why
---
The throughput targets of issue 8 are about CPU on a 2-core machine: three Python node
processes share two cores with the load generator, so a request's cost in CPU is what bounds
throughput.  This samples every node with ``py-spy record --nonblocking`` (the nodes are not
paused) while wrk drives the cluster at saturation, then aggregates the collapsed stacks of
all nodes into:

* samples per thread kind (event loop vs. the sqlite writer thread),
* *self* time by leaf function (where the interpreter actually is),
* *inclusive* time by component (aiohttp, event loop, msgpack, versions, storage, transport,
  metrics, ...), attributed by the leaf frame's module,
* *inclusive* time of kvstore functions (any frame in the stack).

By default only the thread holding the GIL is sampled (``--gil``): in a Python process that is
the CPU that bounds throughput; ``--all-threads`` samples every thread py-spy deems active.
It also reports the CPU time (utime+stime from /proc) the node processes used per operation,
which, unlike throughput, hardly depends on what else runs on a shared machine.

Caveat: py-spy sees the Python stack; time in C (uvloop, the HTTP parser, sqlite, msgpack)
is charged to the Python frame that called it.  Idle time (waiting in epoll) is not sampled.

Usage (py-spy: ``pip install py-spy`` into the venv; needs ptrace, e.g. root)::

    python benchmarks/profile_node.py --op put --mode quorum [--duration 8] [--storage sqlite]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # ``python benchmarks/profile_node.py``: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen import (  # noqa: E402
    LoadSpec,
    cpu_seconds,
    ensure_wrk,
    machine_info,
    prepopulate,
    run_load,
)
from kvstore.harness.local_cluster import LocalCluster  # noqa: E402

QUERIES = {
    ("eventual", "put"): "w=1", ("eventual", "get"): "r=1",
    ("quorum", "put"): "consistency=quorum&w=2", ("quorum", "get"): "consistency=quorum&r=2",
    ("linearizable", "put"): "consistency=linearizable", ("linearizable", "get"): "consistency=linearizable",
}

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

# Leaf-module -> component, first match wins (paths as py-spy prints them: relative to site-packages/repo).
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("kvstore/storage/", "storage (kvstore.storage)"),
    ("sqlite3", "storage (kvstore.storage)"),
    ("kvstore/transport/", "transport (stream/http)"),
    ("msgpack", "msgpack"),
    ("kvstore/protocol/versions.py", "versions (DVV merge/encode)"),
    ("prometheus_client", "metrics (prometheus_client)"),
    ("kvstore/server/api.py", "kvstore.server.api (validation, responses)"),
    ("kvstore/runtime/caspaxos.py", "kvstore.runtime.caspaxos (CP proposer)"),
    ("kvstore/runtime/register.py", "kvstore.runtime.caspaxos (CP proposer)"),
    ("paxos", "kvstore paxos (acceptor, wire)"),
    ("kvstore/protocol/messages.py", "kvstore.protocol.messages (codec)"),
    ("msgspec", "kvstore.protocol.messages (codec)"),
    ("kvstore/server/http_front.py", "kvstore.server.http_front (httptools front end)"),
    ("kvstore/runtime/node.py", "kvstore.runtime.node (coordinator/replica)"),
    ("kvstore/runtime/coordinator.py", "kvstore.runtime.node (coordinator/replica)"),
    ("kvstore/runtime/replica.py", "kvstore.runtime.node (coordinator/replica)"),
    ("kvstore/", "kvstore (other modules)"),
    ("aiohttp/", "aiohttp (HTTP server/client)"),
    ("multidict", "aiohttp (HTTP server/client)"),
    ("yarl", "aiohttp (HTTP server/client)"),
    ("asyncio/", "event loop (asyncio/uvloop)"),
    ("uvloop", "event loop (asyncio/uvloop)"),
    ("threading.py", "threads (locks, conditions)"),
)


def parse_frame(text: str) -> tuple[str, str]:
    m = FRAME.match(text.strip())
    if not m:
        return text.strip(), ""
    return m.group("func"), m.group("file") or ""


def component(file: str) -> str:
    for needle, name in COMPONENTS:
        if needle in file:
            return name
    return "other (" + (file.rsplit("/", 1)[-1] or "?") + ")"


def aggregate(paths: list[Path], top: int) -> str:
    total = 0
    by_thread: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    by_component: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [parse_frame(f) for f in stack.split(";") if f.strip()]
            if not frames:
                continue
            total += count
            writer = any("_writer_main" in func for func, _ in frames)
            by_thread["sqlite writer thread" if writer else "event-loop thread"] += count
            func, file = frames[-1]
            self_time[f"{func} ({file})"] += count
            by_component[component(file)] += count
            seen = {f"{fn} ({fl})" for fn, fl in frames if fl.startswith("kvstore/")}
            for name in seen:
                inclusive[name] += count
    if total == 0:
        return "no samples"

    def table(title: str, counter: collections.Counter[str], n: int) -> list[str]:
        out = [f"\n{title}"]
        for name, count in counter.most_common(n):
            out.append(f"  {100.0 * count / total:5.1f}%  {name}")
        return out

    lines = [f"samples: {total} (all nodes; percentages of non-idle samples)"]
    lines += table("by thread:", by_thread, 5)
    lines += table("by component (leaf frame's module):", by_component, 20)
    lines += table("self time, top functions:", self_time, top)
    lines += table("inclusive time, kvstore functions:", inclusive, top)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=("put", "get"), default="put")
    parser.add_argument("--mode", choices=("eventual", "quorum", "linearizable"), default="quorum")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--storage", choices=("memory", "sqlite"), default="sqlite")
    parser.add_argument("--fsync", choices=("always", "batch", "never"), default="batch")
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--duration", type=int, default=8, help="seconds sampled (the load runs 2 s longer)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second per node")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--keep", help="directory to keep the raw collapsed stacks in")
    parser.add_argument(
        "--all-threads", action="store_true",
        help="sample every non-idle thread instead of only the one holding the GIL (the default: in a "
             "Python process, GIL time is the CPU that bounds throughput)",
    )
    args = parser.parse_args(argv)

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 1
    if ensure_wrk() is None:
        print("warning: wrk missing; the Python generator will share the CPU with the nodes", file=sys.stderr)
    info = machine_info()
    print(f"# profile: {args.mode} {args.op} {args.value_size} B, {args.nodes} nodes N=3, "
          f"storage={args.storage} fsync={args.fsync}; commit {info['commit']}; loadavg {info['loadavg']}")
    print(f"kvstore measured from: {info['kvstore_source']}")
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="kvstore-profile-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(args.nodes, min(3, args.nodes), storage=args.storage, fsync=args.fsync)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        cluster.start()
        query = QUERIES[(args.mode, args.op)]
        if args.op == "get":
            # A key belongs to one mode: linearizable reads need keys written through CASPaxos.
            load_query = query if args.mode == "linearizable" else "w=3"
            keys = 500 if args.mode == "linearizable" else 2000
            prepopulate(cluster.urls, "prof-", keys, args.value_size, query=load_query)
        paths = []
        for node_id in cluster.node_ids:
            path = out_dir / f"{node_id}.txt"
            paths.append(path)
            spies.append(subprocess.Popen(
                [pyspy, "record", "-p", str(cluster.pid(node_id)), "-d", str(args.duration), "-r", str(args.rate),
                 "--nonblocking", "-f", "raw", "-o", str(path), *([] if args.all_threads else ["--gil"])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        pids = [cluster.pid(n) for n in cluster.node_ids]
        cpu0 = cpu_seconds(pids)
        result = run_load(LoadSpec(
            urls=cluster.urls, op=args.op, query=query, value_size=args.value_size, prefix="prof-",
            keys=500 if args.mode == "linearizable" else 2000, duration_s=args.duration + 2, connections=64,
        ))
        cpu = cpu_seconds(pids) - cpu0
        for spy in spies:
            spy.wait(timeout=args.duration + 30)
        print(f"load during sampling: {result.ops_per_s:.0f} ops/s, p50 {result.p('p50'):.1f} ms, "
              f"p99 {result.p('p99'):.1f} ms {result.error_text()}")
        if result.ok:
            print(f"node CPU: {cpu:.2f} s for {result.ok} ops = {cpu / result.ok * 1e6:.0f} us of CPU per op "
                  f"(all {len(pids)} nodes, py-spy sampling included)")
        print(aggregate([p for p in paths if p.exists()], args.top))
        print(f"\nraw collapsed stacks: {out_dir}")
    finally:
        for spy in spies:
            if spy.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(spy.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(timeout=10)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
