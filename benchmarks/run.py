"""``kvstore bench`` (issues 8 and 15): throughput, latency, recovery and memory of a real local cluster.

Why it is built this way
------------------------
A figure means something only next to a baseline measured in the same run, on the same
(shared, 2-core) machine, with the same load generator.  So every section starts its own
processes, drives them with wrk (``benchmarks/bench.lua``; a Python generator if wrk is
missing, with a warning) and the summary prints ratios against two baselines:

* ``single``: one in-memory node, N=1, no replication: the ceiling of our HTTP stack;
* ``etcd``: a 3-member etcd cluster on 127.0.0.1 through its HTTP/JSON gateway (PUT, and
  linearizable range reads), the reference for a replicated, fsyncing CP store.

Sections (``--only a,b`` selects; the order below is the run order):

``cluster3``     3 nodes, N=3, sqlite ``fsync=batch``: eventual (W=1/R=1), quorum (W=2/R=2) and
                 linearizable (reported "not available" while the node answers 400
                 ``invalid_parameter`` ... "not available") x PUT/GET x 100 B/10 KiB, each at
                 saturation (closed loop, 64 connections) and at half that rate (paced).
``etcd``         the same PUT/GET x sizes x loads against etcd (linearizable reads).
``frontend``     (only with ``--only``) the two HTTP front ends (``[server] front_end``, issue 15) in rounds interleaved
                 aiohttp, httptools, aiohttp, ...: one in-memory node (PUT/GET 100 B: the HTTP stack
                 alone) and 3 nodes, N=3, quorum PUT/GET 100 B on ``--storage``; medians, the
                 httptools/aiohttp ratios of throughput and CPU per op, and against etcd when the
                 ``etcd`` section ran before it in the same run.
``single``       the same PUT/GET x sizes x loads against one in-memory N=1 node.
``client``       quorum PUT/GET through ``kvstore.Client`` (Python): what an application sees.
``antientropy``  convergence of keys a node missed, via ``POST /admin/repair`` (if it answers 202).
``cluster5``     5 nodes, N=3: eventual and quorum PUT/GET, 100 B.
``recovery``     on the 5-node cluster: SIGKILL a node, write keys with a sloppy quorum, restart
                 it; time to /health, to a first successful read, and for the hints to drain.
``memory``       resident memory (VmRSS) per node per million keys, memory and sqlite engines:
                 writes a sample of keys to one node and extrapolates linearly.

Bounds: every load run stops at an op count or a time limit, whichever comes first; the whole
default run has a budget of under 5 minutes (``--quick``: about 1 minute) and skips what no
longer fits, saying so.  Every process (nodes, etcd members, wrk) is stopped by its PID, also
on an error, Ctrl-C or SIGTERM.

Entry points: ``python -m benchmarks.run`` or ``python benchmarks/run.py``, and
``main(argv) -> int`` for the ``kvstore bench`` CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/run.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.etcd import EtcdCluster, EtcdError, ensure_etcd, etcd_version  # noqa: E402
from benchmarks.loadgen import (  # noqa: E402
    LoadResult,
    LoadSpec,
    cpu_seconds,
    ensure_wrk,
    http_call,
    loadavg,
    machine_info,
    prepopulate,
    rss_kib,
    run_load,
    warn,
)
from kvstore.config import ServerSettings  # noqa: E402
from kvstore.harness.local_cluster import ClusterError, LocalCluster  # noqa: E402

SECTIONS = ("cluster3", "etcd", "frontend", "single", "client", "antientropy", "cluster5", "recovery", "memory")
FRONT_ENDS = ("aiohttp", "httptools")
OPT_IN_SECTIONS = ("frontend",)  # run only when named with --only

MODES: dict[str, dict[str, str]] = {
    "eventual": {"put": "w=1", "get": "r=1"},
    "quorum": {"put": "consistency=quorum&w=2", "get": "consistency=quorum&r=2"},
    "linearizable": {"put": "consistency=linearizable", "get": "consistency=linearizable"},
}


@dataclass(frozen=True)
class Plan:
    sat_s: float  # time bound of a saturation run
    half_s: float  # time bound of a half-saturation run
    sizes: tuple[int, ...]
    c5_sizes: tuple[int, ...]
    read_keys: int  # keys loaded before read runs
    mem_keys: int  # keys written per engine for the memory figures
    hint_keys: int  # keys written while a node is down (recovery)
    ae_keys: int  # keys a node misses (anti-entropy)
    client_s: float
    budget_s: float  # the whole run; what does not fit is skipped
    count: int = 200_000  # op-count bound of a saturation run
    connections: int = 64
    half_connections: int = 64  # idle connections let the paced schedule hold through a latency spike


FULL = Plan(
    sat_s=3, half_s=2, sizes=(100, 10 * 1024), c5_sizes=(100,), read_keys=2000, mem_keys=50_000,
    hint_keys=2000, ae_keys=10_000, client_s=3, budget_s=280,
)
QUICK = Plan(
    sat_s=1, half_s=1, sizes=(100,), c5_sizes=(), read_keys=500, mem_keys=20_000, hint_keys=500,
    ae_keys=2000, client_s=1, budget_s=70,
)


@dataclass
class Row:
    system: str  # kvstore-3 | kvstore-5 | single | etcd | client
    mode: str  # eventual | quorum | linearizable | n1 | etcd
    op: str
    size: int
    load: str  # sat | half
    result: LoadResult | None
    note: str = ""
    cpu_us_per_op: float | None = None  # server-side CPU (all nodes/members) per successful op

    @property
    def key(self) -> str:
        return f"{self.system}/{self.mode}/{self.op}/{self.size}/{self.load}"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # recovery, memory, anti-entropy, ...

    def find(self, system: str, mode: str, op: str, size: int, load: str) -> LoadResult | None:
        row = self.row(system, mode, op, size, load)
        return row.result if row is not None else None

    def row(self, system: str, mode: str, op: str, size: int, load: str) -> Row | None:
        for row in self.rows:
            if (row.system, row.mode, row.op, row.size, row.load) == (system, mode, op, size, load):
                return row
        return None


# --- small HTTP helpers ----------------------------------------------------------------------


def probe_linearizable(url: str) -> tuple[bool, str]:
    """Does ``?consistency=linearizable`` work on this node?  (available, why not)."""
    status, body = http_call(url, "PUT", "/kv/bench-probe-linearizable?consistency=linearizable", b"probe")
    if 200 <= status < 300:
        status, body = http_call(url, "GET", "/kv/bench-probe-linearizable?consistency=linearizable")
        if status == 200:
            return True, ""
        return False, f"linearizable GET answered {status}: {body[:200]!r}"
    try:
        err = json.loads(body)
    except ValueError:
        err = {}
    if status == 400 and err.get("error") == "invalid_parameter" and "not available" in str(err.get("message")):
        return False, "not available (node answers 400 invalid_parameter: " + str(err.get("message")) + ")"
    return False, f"linearizable PUT answered {status}: {body[:200]!r}"


def cluster_json(url: str) -> dict[str, Any] | None:
    status, body = http_call(url, "GET", "/cluster", timeout_s=2.0)
    if status != 200:
        return None
    data: dict[str, Any] = json.loads(body)
    return data


def storage_records(url: str) -> int | None:
    status, body = http_call(url, "GET", "/metrics", timeout_s=5.0)
    if status != 200:
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("kvstore_storage_records "):
            return int(float(line.split()[1]))
    return None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- the benchmark ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.report = Report()
        self.started = time.monotonic()
        self.clusters: dict[str, LocalCluster] = {}
        self.loaded: dict[tuple[str, int, bool], tuple[str, int]] = {}  # (system, size, cp) -> (prefix, keys)
        self.etcd: EtcdCluster | None = None
        self.generator = args.generator
        self.linearizable: tuple[bool, str] | None = None

    # -- budget and output

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over_budget(self, reserve_s: float = 0.0) -> bool:
        return self.elapsed() + reserve_s > self.plan.budget_s

    def print_row(self, row: Row) -> None:
        r = row.result
        size = f"{row.size // 1024}KiB" if row.size >= 1024 else f"{row.size}B"
        head = f"{row.system:<10} {row.mode:<12} {row.op:<4} {size:>6} {row.load:<4}"
        if r is None:
            print(f"{head} {'-':>9}  {row.note}", flush=True)
            return
        offered = f"(offered {r.offered_rate:.0f}/s)" if r.offered_rate else ""
        cpu = f"{row.cpu_us_per_op:>7.0f}" if row.cpu_us_per_op is not None else f"{'-':>7}"
        cores = f"{row.cpu_us_per_op * r.ops_per_s / 1e6:>5.2f}" if row.cpu_us_per_op is not None else f"{'-':>5}"
        print(
            f"{head} {r.ops_per_s:>9.0f} {r.p('p50'):>7.2f} {r.p('p99'):>7.2f} {r.p('p999'):>8.2f} {cpu} {cores}  "
            f"{offered} {r.error_text()} {row.note}".rstrip(),
            flush=True,
        )

    @staticmethod
    def print_header(title: str) -> None:
        print(f"\n== {title}")
        print(f"{'system':<10} {'mode':<12} {'op':<4} {'size':>6} {'load':<4} {'ops/s':>9} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'p999 ms':>8} {'cpu us':>7} {'cores':>5}")

    # -- processes

    def cluster(self, name: str) -> LocalCluster:
        if name not in self.clusters:
            args = self.args
            fe = args.front_end
            if name == "kvstore-3":
                c = LocalCluster(3, 3, storage=args.storage, fsync=args.fsync, r=2, w=2, front_end=fe)
            elif name == "kvstore-5":
                c = LocalCluster(5, 3, storage=args.storage, fsync=args.fsync, r=2, w=2, front_end=fe)
            elif name == "single":
                c = LocalCluster(1, 1, storage="memory", fsync="never", r=1, w=1, front_end=fe)
            elif name.startswith(("fe-single-", "fe-3-")):  # the frontend section's own clusters
                fe = name.rsplit("-", 1)[1]
                if name.startswith("fe-single-"):
                    c = LocalCluster(1, 1, storage="memory", fsync="never", r=1, w=1, front_end=fe)
                else:
                    c = LocalCluster(3, 3, storage=args.storage, fsync=args.fsync, r=2, w=2, front_end=fe)
            else:
                raise KeyError(name)
            self.clusters[name] = c
            try:
                c.start()
            except BaseException:
                c.stop()
                del self.clusters[name]
                raise
        return self.clusters[name]

    @staticmethod
    def pids_of(c: LocalCluster) -> Callable[[], list[int]]:
        return lambda: [c.pid(n) for n in c.node_ids if c.alive(n)]

    def release(self, name: str) -> None:
        c = self.clusters.pop(name, None)
        if c is not None:
            c.stop()
        self.loaded = {k: v for k, v in self.loaded.items() if k[0] != name}

    def stop_all(self) -> None:
        for name in list(self.clusters):
            with contextlib.suppress(Exception):
                self.release(name)
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.stop()
            self.etcd = None

    # -- throughput / latency matrix

    def read_keys(
        self, system: str, urls: list[str], size: int, target: str = "kvstore", query: str = "", cp: bool = False,
    ) -> tuple[str, int]:
        """Load (once) the keys read runs pick from; (prefix, count).

        A key belongs to one mode: a linearizable read of a key written outside CASPaxos is
        refused (409), so linearizable reads get their own, smaller set written through CASPaxos.
        """
        loaded = self.loaded.get((system, size, cp))
        if loaded is None:
            keys = max(100, self.plan.read_keys // 4) if cp else self.plan.read_keys
            prefix = f"pre{size}-{'cp-' if cp else ''}"
            if cp:
                query = "consistency=linearizable"
            prepopulate(urls, prefix, keys, size, target=target, query=query)  # type: ignore[arg-type]
            loaded = self.loaded[(system, size, cp)] = (prefix, keys)
        return loaded

    def matrix(
        self, system: str, urls: list[str], modes: dict[str, dict[str, str]], sizes: tuple[int, ...],
        target: str = "kvstore", load_query: str = "", threads: int | None = None,
        pids: Callable[[], list[int]] | None = None,
    ) -> None:
        plan = self.plan
        for size in sizes:
            per_size = len(modes) * 2 * (plan.sat_s + plan.half_s + 0.5)
            if self.over_budget(min(per_size, 10)):
                for mode in modes:
                    for op in ("put", "get"):
                        self.add(Row(system, mode, op, size, "sat", None, "skipped: time budget"))
                continue
            for mode, queries in modes.items():
                for op in ("put", "get"):
                    if self.over_budget(plan.sat_s + plan.half_s):
                        self.add(Row(system, mode, op, size, "sat", None, "skipped: time budget"))
                        continue
                    prefix_get, keys = self.read_keys(system, urls, size, target, load_query, cp=mode == "linearizable")
                    base = dict(
                        urls=urls, op=op, target=target, query=queries[op], value_size=size,
                        prefix=f"{system}-{mode}-{size}-" if op == "put" else prefix_get,
                        keys=keys, threads=threads,
                    )
                    sat, cpu = self.measured(LoadSpec(
                        **base, count=plan.count, duration_s=plan.sat_s,  # type: ignore[arg-type]
                        connections=plan.connections,
                    ), pids)
                    self.add(Row(system, mode, op, size, "sat", sat, cpu_us_per_op=cpu))
                    rate = 0.5 * sat.ops_per_s
                    if rate < 1:
                        self.add(Row(system, mode, op, size, "half", None, "skipped: nothing succeeded at saturation"))
                        continue
                    if op == "put":
                        base["prefix"] = f"{system}-{mode}-{size}-half-"
                    half, cpu = self.measured(LoadSpec(
                        **base, count=int(rate * plan.half_s) + 1,  # type: ignore[arg-type]
                        duration_s=plan.half_s, connections=plan.half_connections, rate=rate,
                    ), pids)
                    self.add(Row(system, mode, op, size, "half", half, cpu_us_per_op=cpu))

    def measured(self, spec: LoadSpec, pids: Callable[[], list[int]] | None) -> tuple[LoadResult, float | None]:
        """One run, plus the server processes' CPU per successful op (None without pids)."""
        before = cpu_seconds(pids()) if pids else 0.0
        result = run_load(spec, self.generator)
        if not pids or not result.ok:
            return result, None
        return result, (cpu_seconds(pids()) - before) / result.ok * 1e6

    def add(self, row: Row) -> None:
        self.report.rows.append(row)
        self.print_row(row)

    # -- sections

    def section_cluster3(self) -> None:
        self.print_header(f"kvstore, 3 nodes, N=3, storage={self.args.storage} fsync={self.args.fsync}")
        c = self.cluster("kvstore-3")
        self.linearizable = probe_linearizable(c.urls[0])
        modes = dict(MODES)
        if not self.linearizable[0]:
            del modes["linearizable"]
            print(f"linearizable: {self.linearizable[1]}")
            self.report.facts["linearizable"] = self.linearizable[1]
        # Read keys are written to all N replicas, so R=1 reads find them wherever they land.
        self.matrix("kvstore-3", c.urls, modes, self.plan.sizes, load_query="w=3", pids=self.pids_of(c))
        if not self.linearizable[0]:
            for op in ("put", "get"):
                self.report.rows.append(Row("kvstore-3", "linearizable", op, 100, "sat", None, "not available"))

    def section_etcd(self) -> None:
        self.print_header("etcd, 3 members (HTTP/JSON gateway; linearizable range reads)")
        binary = ensure_etcd(install=not self.args.no_install)
        if binary is None:
            print("etcd: not available (no etcd binary; apt-get install etcd-server needs root)")
            self.report.facts["etcd"] = "not available"
            return
        self.report.facts["etcd_version"] = etcd_version(binary)
        try:
            self.etcd = EtcdCluster(binary).start()
        except EtcdError as exc:
            print(f"etcd: not available ({exc})")
            self.report.facts["etcd"] = f"not available: {exc}"
            return
        try:
            etcd = self.etcd
            self.matrix("etcd", etcd.urls, {"etcd": {"put": "", "get": ""}}, self.plan.sizes, target="etcd",
                        pids=lambda: list(etcd.pids().values()))
        finally:
            self.etcd.stop()
            self.etcd = None

    def section_frontend(self) -> None:
        """aiohttp vs httptools front end, interleaved rounds on the same machine (issue 15)."""
        rounds = self.args.frontend_rounds
        duration_s = self.plan.sat_s
        self.print_header(f"front ends: aiohttp vs httptools, {rounds} interleaved rounds of {duration_s:g} s "
                          f"(single = 1 in-memory node; 3 nodes = N=3 quorum, {self.args.storage}/fsync={self.args.fsync})")
        setups = [("single", "n1", {"put": "w=1", "get": "r=1"}, "w=1"),
                  ("3", "quorum", {"put": MODES["quorum"]["put"], "get": MODES["quorum"]["get"]}, "w=3")]
        figures: dict[str, dict[str, list[tuple[float, float | None]]]] = {}
        for shape, mode, queries, load_query in setups:
            names = {fe: f"fe-{shape}-{fe}" for fe in FRONT_ENDS}
            clusters = {fe: self.cluster(name) for fe, name in names.items()}
            try:
                for op in ("put", "get"):
                    for round_no in range(rounds):
                        for fe in FRONT_ENDS if round_no % 2 == 0 else reversed(FRONT_ENDS):
                            if self.over_budget(duration_s + 1):
                                continue
                            c, system = clusters[fe], names[fe]
                            prefix, keys = self.read_keys(system, c.urls, 100, query=load_query)
                            spec = LoadSpec(
                                urls=c.urls, op=op, query=queries[op], value_size=100,  # type: ignore[arg-type]
                                prefix=f"{system}-r{round_no}-" if op == "put" else prefix, keys=keys,
                                count=self.plan.count, duration_s=duration_s, connections=self.plan.connections,
                            )
                            result, cpu = self.measured(spec, self.pids_of(c))
                            row = Row(system, mode, op, 100, f"sat{round_no + 1}", result, cpu_us_per_op=cpu)
                            self.add(row)
                            figures.setdefault(f"{shape}/{op}", {}).setdefault(fe, []).append(
                                (result.ops_per_s, cpu))
            finally:
                for name in names.values():
                    self.release(name)
        self.report.facts["front_end"] = self.front_end_summary(figures)

    def front_end_summary(self, figures: dict[str, dict[str, list[tuple[float, float | None]]]]) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        print("\n  front end figures (median over rounds; ratio = httptools / aiohttp; per-round ratios in brackets)")
        for what, by_fe in figures.items():
            if set(by_fe) != set(FRONT_ENDS) or len(by_fe["aiohttp"]) != len(by_fe["httptools"]):
                continue
            entry: dict[str, Any] = {}
            for fe in FRONT_ENDS:
                rates = [r for r, _ in by_fe[fe]]
                cpus = [c for _, c in by_fe[fe] if c is not None]
                entry[fe] = {"ops_per_s": statistics.median(rates),
                             "cpu_us_per_op": statistics.median(cpus) if cpus else None,
                             "rounds": rates}
            per_round = [h[0] / a[0] for a, h in zip(by_fe["aiohttp"], by_fe["httptools"], strict=True) if a[0]]
            entry["ratio_ops"] = entry["httptools"]["ops_per_s"] / entry["aiohttp"]["ops_per_s"]
            entry["ratio_rounds"] = per_round
            a_cpu, h_cpu = entry["aiohttp"]["cpu_us_per_op"], entry["httptools"]["cpu_us_per_op"]
            entry["ratio_cpu_per_op"] = h_cpu / a_cpu if a_cpu and h_cpu else None
            shape, op = what.split("/")
            etcd = self.report.row("etcd", "etcd", op, 100, "sat")
            if shape == "3" and etcd is not None and etcd.result is not None and etcd.result.ops_per_s:
                entry["etcd"] = {"ops_per_s": etcd.result.ops_per_s, "cpu_us_per_op": etcd.cpu_us_per_op}
            summary[what] = entry
            label = f"{'1 node, memory' if shape == 'single' else '3 nodes, quorum'} {op}"
            line = (f"  {label:<22} aiohttp {entry['aiohttp']['ops_per_s']:>7.0f}/s "
                    f"({a_cpu or 0:.0f} us/op)  httptools {entry['httptools']['ops_per_s']:>7.0f}/s "
                    f"({h_cpu or 0:.0f} us/op)  ratio {entry['ratio_ops']:.2f}x "
                    f"[{', '.join(f'{r:.2f}' for r in per_round)}]")
            if entry["ratio_cpu_per_op"] is not None:
                line += f"  CPU/op {entry['ratio_cpu_per_op']:.2f}x"
            if "etcd" in entry:
                e = entry["etcd"]
                line += (f"  vs etcd {e['ops_per_s']:.0f}/s: aiohttp {entry['aiohttp']['ops_per_s'] / e['ops_per_s']:.2f}x"
                         f", httptools {entry['httptools']['ops_per_s'] / e['ops_per_s']:.2f}x")
            print(line, flush=True)
        return summary

    def section_single(self) -> None:
        self.print_header("baseline: one in-memory node, N=1 (no replication)")
        c = self.cluster("single")
        try:
            self.matrix("single", c.urls, {"n1": {"put": "w=1", "get": "r=1"}}, self.plan.sizes, load_query="w=1",
                        pids=self.pids_of(c))
        finally:
            self.release("single")

    def section_client(self) -> None:
        self.print_header("kvstore.Client (Python, in this process), 3 nodes, quorum, 100 B")
        c = self.cluster("kvstore-3")
        prefix, keys = self.read_keys("kvstore-3", c.urls, 100, query="w=3")
        for op in ("put", "get"):
            spec = LoadSpec(
                urls=c.urls, op=op, query=MODES["quorum"][op], value_size=100,  # type: ignore[arg-type]
                prefix="client-put-" if op == "put" else prefix, keys=keys, count=self.plan.count,
                duration_s=self.plan.client_s, connections=32,
            )
            before = cpu_seconds(self.pids_of(c)())
            result = run_load(spec, "client")
            cpu = (cpu_seconds(self.pids_of(c)()) - before) / result.ok * 1e6 if result.ok else None
            self.add(Row("client", "quorum", op, 100, "sat", result, cpu_us_per_op=cpu))

    def section_antientropy(self) -> None:
        print("\n== anti-entropy convergence (3 nodes)")
        c = self.cluster("kvstore-3")
        status, body = http_call(c.urls[0], "POST", "/admin/repair", b"", {"X-Cluster-Secret": c.secret})
        if status != 202:
            why = body.decode(errors="replace")[:160]
            print(f"anti-entropy: not available (POST /admin/repair answered {status}: {why})")
            self.report.facts["anti_entropy"] = f"not available ({status})"
            return
        n = self.plan.ae_keys
        victim = c.node_ids[-1]
        before = storage_records(c.url(victim)) or 0
        c.kill(victim)
        live = [c.url(x) for x in c.node_ids if x != victim]
        # Strict quorum: with 3 nodes and N=3 there is no fallback, so the victim simply misses these.
        wrote = prepopulate(live, "ae-", n, 100, query="w=2&sloppy=false")
        c.restart(victim)
        t0 = time.monotonic()
        limit_s = 90.0 if self.plan is FULL else 30.0
        next_trigger = 0.0
        converged_s: float | None = None
        got = before
        while time.monotonic() - t0 < limit_s:
            if time.monotonic() - t0 >= next_trigger:
                for url in c.urls:
                    http_call(url, "POST", "/admin/repair", b"", {"X-Cluster-Secret": c.secret})
                next_trigger += 5.0
            got = storage_records(c.url(victim)) or got
            if got >= before + wrote.ok:
                converged_s = time.monotonic() - t0
                break
            time.sleep(0.25)
        fact = {"keys": wrote.ok, "converged_s": converged_s, "records_seen": got - before}
        self.report.facts["anti_entropy"] = fact
        if converged_s is None:
            print(f"anti-entropy: {victim} holds {got - before}/{wrote.ok} missed keys after {limit_s:.0f} s")
        else:
            print(f"anti-entropy: {wrote.ok} missed keys repaired on {victim} in {converged_s:.2f} s "
                  f"({wrote.ok / max(converged_s, 1e-9):.0f} keys/s)")

    def section_cluster5(self) -> None:
        self.print_header(f"kvstore, 5 nodes, N=3, storage={self.args.storage} fsync={self.args.fsync}")
        sizes = self.plan.c5_sizes or ((100,) if self.args.explicit_sections else ())
        if not sizes:
            print("skipped in --quick (run without --quick, or with --only cluster5)")
            return
        self.release("kvstore-3")
        c = self.cluster("kvstore-5")
        modes = {k: MODES[k] for k in ("eventual", "quorum")}
        self.matrix("kvstore-5", c.urls, modes, sizes, load_query="w=3", pids=self.pids_of(c))

    def section_recovery(self) -> None:
        print("\n== recovery (5 nodes, N=3): hinted handoff and restart")
        self.release("kvstore-3")
        c = self.cluster("kvstore-5")
        victim = c.node_ids[-1]
        live = [x for x in c.node_ids if x != victim]
        c.kill(victim)
        wrote = prepopulate([c.url(x) for x in live], "hint-", self.plan.hint_keys, 100, query="w=2&sloppy=true")

        def pending() -> int | None:
            """Hints waiting on every live node; None if a node gives no figure (no AP machinery)."""
            total = 0
            for x in c.node_ids:
                if not c.alive(x):
                    continue
                data = cluster_json(c.url(x))
                counts = (data or {}).get("pending_hints") or {}
                if not counts:  # a node with hinted handoff lists every peer, with 0 if none
                    return None
                total += sum(int(v) for v in counts.values())
            return total

        hints = pending()
        if hints is None:
            print(f"wrote {wrote.ok} keys with {victim} down; hinted handoff: not available "
                  "(GET /cluster gives no pending_hints: the AP machinery is not installed on the nodes)")
            self.report.facts["hinted_handoff"] = "not available"
        else:
            print(f"wrote {wrote.ok} keys with {victim} down (W=2, sloppy); hints pending: {hints}")
        errors: list[BaseException] = []

        def restart() -> None:
            try:
                c.restart(victim)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        t0 = time.monotonic()
        thread = threading.Thread(target=restart, name="restart", daemon=True)
        thread.start()
        health_s = read_s = drained_s = None
        url = c.url(victim)
        deadline = t0 + (60.0 if self.plan is FULL else 30.0)
        while time.monotonic() < deadline and not errors:
            now = time.monotonic() - t0
            if health_s is None:
                if http_call(url, "GET", "/health", timeout_s=0.5)[0] == 200:
                    health_s = now
            elif read_s is None and http_call(url, "GET", "/kv/hint-0", timeout_s=1.0)[0] == 200:
                read_s = now
            if health_s is not None and drained_s is None and hints is not None and pending() == 0:
                drained_s = time.monotonic() - t0
            if health_s is not None and read_s is not None and (drained_s is not None or hints is None):
                break
            time.sleep(0.02 if read_s is None else 0.1)
        thread.join(timeout=35)
        if errors:
            raise errors[0]
        fact = {
            "keys_written": wrote.ok, "hints": hints, "restart_to_health_s": health_s,
            "restart_to_first_read_s": read_s, "restart_to_hints_drained_s": drained_s,
        }
        self.report.facts["recovery"] = fact

        def fmt(x: float | None) -> str:
            return f"{x:.2f} s" if x is not None else "not reached"

        print(f"restart -> first /health 200: {fmt(health_s)}")
        print(f"restart -> first successful read on {victim}: {fmt(read_s)}")
        if hints is None:
            print("restart -> hints drained: not available")
        else:
            detail = ""
            if drained_s is not None and health_s is not None and hints:
                rate = hints / max(drained_s - health_s, 1e-9)
                detail = f" ({drained_s - health_s:.2f} s after healthy, {rate:.0f} hints/s)"
            print(f"restart -> all {hints} hints drained: {fmt(drained_s)}{detail}")
        self.release("kvstore-5")

    def section_memory(self) -> None:
        print("\n== memory: VmRSS per node per million keys (100 B values; sample extrapolated linearly)")
        self.release("kvstore-3")
        self.release("kvstore-5")
        results: dict[str, Any] = {}
        for engine in ("memory", "sqlite"):
            if self.over_budget(15):
                print(f"{engine}: skipped: time budget")
                continue
            c = LocalCluster(1, 1, storage=engine, fsync="batch", r=1, w=1)
            try:
                c.start()
                node = c.node_ids[0]
                url = c.url(node)
                prepopulate(c.urls, "warm-", 1000, 100, query="w=1")  # allocator and code paths warm
                rss0, rec0 = rss_kib(c.pid(node)), storage_records(url) or 0
                left_s = self.plan.budget_s - self.elapsed() - 5
                spec = LoadSpec(
                    urls=c.urls, op="put", query="w=1", value_size=100, prefix="mem-", count=self.plan.mem_keys,
                    duration_s=max(5.0, min(60.0, left_s)), connections=self.plan.connections,
                )
                run_load(spec, self.generator)
                time.sleep(0.5)
                rss1, rec1 = rss_kib(c.pid(node)), storage_records(url) or 0
                keys = rec1 - rec0
                if keys <= 0:
                    print(f"{engine}: no keys were written")
                    continue
                per_m = (rss1 - rss0) / 1024 / keys * 1e6
                disk = dir_bytes(c.data_dir / node) / 1024 / 1024
                results[engine] = {
                    "keys": keys, "rss_before_mib": rss0 / 1024, "rss_after_mib": rss1 / 1024,
                    "rss_mib_per_million_keys": per_m, "disk_mib": disk,
                    "disk_mib_per_million_keys": disk / rec1 * 1e6 if engine == "sqlite" else None,
                }
                line = (f"{engine:<7} {keys} keys: RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB; "
                        f"~{per_m:.0f} MiB RSS per million keys per node")
                if engine == "sqlite":
                    line += f"; on disk {disk:.1f} MiB (~{disk / rec1 * 1e6:.0f} MiB per million keys)"
                print(line, flush=True)
            finally:
                c.stop()
        self.report.facts["memory"] = results

    # -- summary

    def summary(self) -> None:
        rep = self.report
        print("\n== ratios (throughput at saturation; p99 at half saturation)")
        for size in self.plan.sizes:
            for op in ("put", "get"):
                etcd = rep.find("etcd", "etcd", op, size, "sat")
                single = rep.find("single", "n1", op, size, "sat")
                for mode in MODES:
                    ours = rep.find("kvstore-3", mode, op, size, "sat")
                    if ours is None:
                        continue
                    parts = [f"kvstore-3 {mode:<12} {op:<3} {size:>5} B: {ours.ops_per_s:>7.0f}/s"]
                    if single is not None:
                        parts.append(f"ours/single {ratio(ours.ops_per_s, single.ops_per_s)}")
                    if etcd is not None:
                        parts.append(f"ours/etcd {ratio(ours.ops_per_s, etcd.ops_per_s)}")
                        our_row = rep.row("kvstore-3", mode, op, size, "sat")
                        etcd_row = rep.row("etcd", "etcd", op, size, "sat")
                        if our_row and etcd_row and our_row.cpu_us_per_op and etcd_row.cpu_us_per_op:
                            parts.append(f"CPU/op ours {our_row.cpu_us_per_op:.0f} us vs etcd "
                                         f"{etcd_row.cpu_us_per_op:.0f} us")
                        half_ours = rep.find("kvstore-3", mode, op, size, "half")
                        half_etcd = rep.find("etcd", "etcd", op, size, "half")
                        if half_ours and half_etcd:
                            parts.append(f"p99@half ours {half_ours.p('p99'):.1f} ms vs etcd {half_etcd.p('p99'):.1f} ms")
                    print("  " + "; ".join(parts))
        client_put = rep.find("client", "quorum", "put", 100, "sat")
        client_get = rep.find("client", "quorum", "get", 100, "sat")
        for op, cr in (("put", client_put), ("get", client_get)):
            wrk = rep.find("kvstore-3", "quorum", op, 100, "sat")
            if cr is not None and wrk is not None:
                print(f"  kvstore.Client quorum {op}: {cr.ops_per_s:.0f}/s = {ratio(cr.ops_per_s, wrk.ops_per_s)} "
                      f"of the {wrk.generator} figure")
        print("\n== targets (issue 15)")
        for line in self.targets():
            print("  " + line)

    def targets(self) -> list[str]:
        missing = self.linearizable[1] if self.linearizable is not None and not self.linearizable[0] else None
        return target_lines(
            self.report, f"{self.args.storage}/fsync={self.args.fsync}", self.plan.sizes, missing
        )

    def to_json(self, info: dict[str, str], command: str) -> dict[str, Any]:
        return {
            "machine": info, "command": command, "plan": self.plan.__dict__,
            "rows": {
                r.key: ({**r.result.to_json(), "cpu_us_per_op": r.cpu_us_per_op} if r.result else {"note": r.note})
                for r in self.report.rows
            },
            "facts": self.report.facts, "targets": self.targets(),
            "storage": f"{self.args.storage}/fsync={self.args.fsync}",
            "linearizable_missing": (
                self.linearizable[1] if self.linearizable is not None and not self.linearizable[0] else None
            ),
        }


# The issue-15 targets: (label, our mode, op, factor over etcd's same op at saturation, 100 B values).
THROUGHPUT_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("quorum writes (3 nodes, N=3, W=2, {storage}) >= 1.5x etcd writes", "quorum", "put", 1.5),
    ("quorum reads (R=2) >= 2x etcd linearizable reads", "quorum", "get", 2.0),
    ("linearizable writes >= 1x etcd writes", "linearizable", "put", 1.0),
    ("linearizable reads >= 1x etcd linearizable reads", "linearizable", "get", 1.0),
)
P99_AT_HALF_LIMIT_MS = 10.0


def target_lines(rep: Report, storage: str, sizes: tuple[int, ...], linearizable_missing: str | None) -> list[str]:
    """The issue's targets, each MET / NOT MET / n/a with its figures and CPU per op.

    Throughput targets compare saturation rows at 100 B; the latency target asks p99 < 10 ms at
    half saturation for every mode the throughput targets name, at every measured value size.
    CPU per op is printed next to each figure: on a shared machine it is the steadier number.
    """
    lines: list[str] = []

    def verdict(ok: bool | None) -> str:
        return "n/a    " if ok is None else ("MET    " if ok else "NOT MET")

    def cpu(row: Row | None) -> str:
        return f"{row.cpu_us_per_op:.0f} us CPU/op" if row is not None and row.cpu_us_per_op else "CPU/op n/a"

    for label_template, mode, op, factor in THROUGHPUT_TARGETS:
        label = label_template.format(storage=storage)
        if mode == "linearizable" and linearizable_missing is not None:
            lines.append(f"{verdict(None)} {label}: {linearizable_missing}")
            continue
        ours_row = rep.row("kvstore-3", mode, op, 100, "sat")
        etcd_row = rep.row("etcd", "etcd", op, 100, "sat")
        ours = ours_row.result if ours_row else None
        theirs = etcd_row.result if etcd_row else None
        if ours is None or theirs is None:
            missing = "kvstore" if ours is None else "etcd"
            lines.append(f"{verdict(None)} {label}: {missing} figure not measured")
            continue
        ok = ours.ops_per_s >= factor * theirs.ops_per_s
        line = (f"{verdict(ok)} {label}: {ours.ops_per_s:.0f}/s ({cpu(ours_row)}) vs etcd "
                f"{theirs.ops_per_s:.0f}/s ({cpu(etcd_row)}) = {ratio(ours.ops_per_s, theirs.ops_per_s)} "
                f"(target >= {factor:g}x)")
        if ours_row is not None and etcd_row is not None and ours_row.cpu_us_per_op and etcd_row.cpu_us_per_op:
            # Throughput at equal CPU: the ratio that survives a noisy shared machine.
            line += f"; {ratio(etcd_row.cpu_us_per_op, ours_row.cpu_us_per_op)} at equal CPU"
        lines.append(line)
    modes = ["quorum"] + ([] if linearizable_missing is not None else ["linearizable"])
    for mode in modes:
        for op in ("put", "get"):
            for size in sizes:
                label = f"p99 at half saturation < {P99_AT_HALF_LIMIT_MS:g} ms, {mode} {op} {size} B"
                half_row = rep.row("kvstore-3", mode, op, size, "half")
                half = half_row.result if half_row else None
                if half is None:
                    lines.append(f"{verdict(None)} {label}: not measured")
                    continue
                ok = half.p("p99") < P99_AT_HALF_LIMIT_MS
                etcd_row = rep.row("etcd", "etcd", op, size, "half")
                etcd_half = etcd_row.result if etcd_row else None
                context = (f" (etcd, same run: {etcd_half.p('p99'):.2f} ms, {cpu(etcd_row)})"
                           if etcd_half else "")
                lines.append(f"{verdict(ok)} {label}: {half.p('p99'):.2f} ms at {half.ops_per_s:.0f}/s "
                             f"({cpu(half_row)}){context}")
    return lines


def report_from_json(data: dict[str, Any]) -> Report:
    rep = Report(facts=dict(data.get("facts", {})))
    for key, row in data.get("rows", {}).items():
        system, mode, op, size, load = key.split("/")
        result = LoadResult.from_json(row) if "ops_per_s" in row else None
        rep.rows.append(Row(system, mode, op, int(size), load, result, row.get("note", ""), row.get("cpu_us_per_op")))
    return rep


def render_markdown(data: dict[str, Any]) -> str:
    """A docs/benchmarks.md entry for one run (from its --json file)."""
    m = data.get("machine", {})
    rep = report_from_json(data)
    sizes = tuple(data.get("plan", {}).get("sizes", (100,)))
    out = [
        f"### {m.get('date', '?')}, commit {m.get('commit', '?')}",
        "",
        f"* Machine: nproc={m.get('nproc')} ({m.get('cpu')}), Linux {m.get('kernel')}, Python {m.get('python')}; "
        f"load average {m.get('loadavg')} at the start, {data.get('loadavg_end', '?')} at the end.",
        f"* Code measured: {m.get('kvstore_source')}.",
        f"* Command: `{data.get('command')}`",
        "",
        "| system | mode | op | value | load | ops/s | p50 ms | p99 ms | p99.9 ms | server CPU us/op | errors |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rep.rows:
        size = f"{row.size // 1024} KiB" if row.size >= 1024 else f"{row.size} B"
        r = row.result
        if r is None:
            out.append(f"| {row.system} | {row.mode} | {row.op} | {size} | {row.load} | - | | | | | {row.note} |")
            continue
        load = row.load if not r.offered_rate else f"half ({r.offered_rate:.0f}/s offered)"
        cpu = f"{row.cpu_us_per_op:.0f}" if row.cpu_us_per_op else "-"
        out.append(
            f"| {row.system} | {row.mode} | {row.op} | {size} | {load} | {r.ops_per_s:.0f} | {r.p('p50'):.1f} | "
            f"{r.p('p99'):.1f} | {r.p('p999'):.1f} | {cpu} | {r.error_text().removeprefix('errors: ') or '0'} |"
        )
    out += ["", "Ratios at saturation (ours = 3 nodes, N=3):", "",
            "| op | value | mode | ours/single | ours/etcd | CPU/op ours vs etcd | etcd/ours CPU/op (= ratio at equal CPU) |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for size in sizes:
        for op in ("put", "get"):
            single = rep.find("single", "n1", op, size, "sat")
            etcd_row = rep.row("etcd", "etcd", op, size, "sat")
            for mode in MODES:
                ours_row = rep.row("kvstore-3", mode, op, size, "sat")
                if ours_row is None or ours_row.result is None:
                    continue
                o = ours_row.result.ops_per_s
                s_ratio = ratio(o, single.ops_per_s) if single else "-"
                e = etcd_row.result if etcd_row else None
                e_ratio = ratio(o, e.ops_per_s) if e else "-"
                cpu_o, cpu_e = ours_row.cpu_us_per_op, etcd_row.cpu_us_per_op if etcd_row else None
                cpus = f"{cpu_o:.0f} vs {cpu_e:.0f} us" if cpu_o and cpu_e else "-"
                eq = ratio(cpu_e, cpu_o) if cpu_o and cpu_e else "-"
                out.append(f"| {op} | {size} B | {mode} | {s_ratio} | {e_ratio} | {cpus} | {eq} |")
    out += ["", "Targets (issue 15):", ""]
    out += [f"* {line}" for line in target_lines(
        rep, str(data.get("storage", "sqlite/fsync=batch")), sizes, data.get("linearizable_missing"),
    )]
    facts = rep.facts
    rec = facts.get("recovery")
    if isinstance(rec, dict):
        def s(x: Any) -> str:
            return f"{x:.2f} s" if isinstance(x, int | float) else "not reached"

        out += ["", f"Recovery (5 nodes, N=3; {rec.get('keys_written')} keys written with a node SIGKILLed, "
                    f"W=2 sloppy, {rec.get('hints')} hints): restart to /health {s(rec.get('restart_to_health_s'))}, "
                    f"to a first successful read {s(rec.get('restart_to_first_read_s'))}, "
                    f"to every hint delivered {s(rec.get('restart_to_hints_drained_s'))}."]
    ae = facts.get("anti_entropy")
    if isinstance(ae, dict):
        conv = ae.get("converged_s")
        out += ["", f"Anti-entropy: {ae.get('keys')} keys missed by a node (3 nodes, strict W=2 while it was down) "
                    + (f"repaired in {conv:.2f} s after its restart ({ae.get('keys', 0) / conv:.0f} keys/s)."
                       if conv else f"not converged ({ae.get('records_seen')} seen).")]
    elif ae:
        out += ["", f"Anti-entropy: {ae}."]
    mem = facts.get("memory")
    if isinstance(mem, dict) and mem:
        out += ["", "Memory (one node, 100 B values, a sample of keys extrapolated linearly):", "",
                "| engine | keys written | RSS before -> after | RSS per million keys | on disk per million keys |",
                "|---|---:|---|---:|---:|"]
        for engine, v in mem.items():
            disk = v.get("disk_mib_per_million_keys")
            out.append(f"| {engine} | {v['keys']} | {v['rss_before_mib']:.1f} -> {v['rss_after_mib']:.1f} MiB | "
                       f"{v['rss_mib_per_million_keys']:.0f} MiB | {f'{disk:.0f} MiB' if disk else '-'} |")
    return "\n".join(out) + "\n"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def compare(previous: dict[str, Any], current: dict[str, Any]) -> None:
    print(f"\n== against {previous.get('machine', {}).get('commit', '?')} "
          f"({previous.get('machine', {}).get('date', '?')}): new/old")
    for key, row in current["rows"].items():
        old = previous.get("rows", {}).get(key)
        if not old or "ops_per_s" not in old or "ops_per_s" not in row:
            continue
        cpu = ""
        if row.get("cpu_us_per_op") and old.get("cpu_us_per_op"):
            cpu = f"   CPU/op {ratio(row['cpu_us_per_op'], old['cpu_us_per_op']):>7}"
        print(f"  {key:<40} ops/s {ratio(row['ops_per_s'], old['ops_per_s']):>7}   "
              f"p99 {ratio(row['latency_ms']['p99'], old['latency_ms']['p99']):>7}{cpu}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop every process by PID."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kvstore bench", description="Benchmark a local kvstore cluster against baselines and etcd (issues 8 and 15)."
    )
    parser.add_argument("--quick", action="store_true", help="a ~1 minute subset")
    parser.add_argument(
        "--only", action="append", default=[], metavar="SECTION",
        help=f"run only these sections (repeat or comma-separate): {', '.join(SECTIONS)}",
    )
    parser.add_argument("--storage", choices=("memory", "sqlite"), default="sqlite", help="engine of our clusters")
    parser.add_argument("--fsync", choices=("always", "batch", "never"), default="batch")
    parser.add_argument("--front-end", choices=FRONT_ENDS, default=ServerSettings().front_end,
                        help="HTTP front end of the clusters of every section but frontend ([server] front_end; "
                             "default: the node's default)")
    parser.add_argument("--frontend-rounds", type=int, default=3, help="interleaved rounds of the frontend section")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk/etcd")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--compare", help="a previous --json file: print new/old ratios")
    parser.add_argument("--markdown", help="write a docs/benchmarks.md entry for this run to this file")
    parser.add_argument("--render", metavar="JSON", help="only print the markdown entry of a --json file; no run")
    args = parser.parse_args(argv)
    only = [s.strip() for item in args.only for s in item.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in only or (not only and s not in OPT_IN_SECTIONS)]
    args.explicit_sections = bool(only)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code (``kvstore bench`` maps to this)."""
    args = parse_args(argv)
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())), end="")
        return 0
    plan = QUICK if args.quick else FULL
    if args.generator in ("auto", "wrk") and ensure_wrk(install=not args.no_install) is None:
        if args.generator == "wrk":
            print("kvstore bench: wrk is not installed and could not be installed", file=sys.stderr)
            return 1
        warn("wrk not available: using the Python generator, whose CPU cost understates the store")
    info = machine_info()
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"# kvstore bench  {info['date']}  commit {info['commit']}")
    print(f"machine: nproc={info['nproc']} cpu={info['cpu']} python={info['python']} kernel={info['kernel']} "
          f"loadavg={info['loadavg']}")
    print(f"command: {command.strip()}")
    print(f"kvstore measured from: {info['kvstore_source']}")
    print(f"sections: {', '.join(args.sections)}; budget {plan.budget_s:.0f} s; saturation = closed loop, "
          f"{plan.connections} connections; half = paced at 50% of the measured saturation rate, "
          f"{plan.half_connections} connections; each run bounded by {plan.sat_s:g} s and an op count")
    print("columns: ops/s = successful replies per second; latency from wrk (send to reply); cpu us = CPU time "
          "(user+sys, from /proc) of all the server's processes per successful op; cores = that CPU per second "
          "of the run (2 CPUs are shared with the load generator and anything else running)")
    bench = Bench(args, plan)
    sections: dict[str, Callable[[], None]] = {s: getattr(bench, f"section_{s}") for s in SECTIONS}
    code = 0
    with sigterm_as_interrupt():
        try:
            for name in args.sections:
                if bench.over_budget(5):
                    print(f"\n== {name}: skipped: time budget ({plan.budget_s:.0f} s) spent")
                    continue
                try:
                    sections[name]()
                except (ClusterError, EtcdError, RuntimeError, OSError) as exc:
                    print(f"\n{name}: FAILED: {exc}", flush=True)
                    code = 1
        except KeyboardInterrupt:
            print("\ninterrupted: stopping every process; figures so far follow", file=sys.stderr)
            code = 130
        finally:
            bench.stop_all()
    bench.summary()
    print(f"\ntotal time {bench.elapsed():.0f} s; loadavg at the end: {loadavg()} "
          f"(at the start: {info['loadavg']}; {info['nproc']} CPUs)")
    current = bench.to_json(info, command.strip())
    current["loadavg_end"] = loadavg()
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(current))
    if args.json:
        Path(args.json).write_text(json.dumps(current, indent=2, default=str))
    if args.compare:
        try:
            compare(json.loads(Path(args.compare).read_text()), current)
        except (OSError, ValueError) as exc:
            warn(f"cannot compare with {args.compare}: {exc}")
    return code


if __name__ == "__main__":
    sys.exit(main())
