"""Load generators and process plumbing shared by the kvstore benchmarks.

Why this module exists
----------------------
A benchmark of a Python server on a 2-core machine is only meaningful if the load generator
costs much less CPU than the server it measures; a Python client at 10k req/s eats most of a
core that the nodes then do not have.  So the preferred generator is ``wrk`` (C, epoll) driven
by ``benchmarks/bench.lua``; a Python generator is the fallback (with a loud warning,
because its figures understate the store) and is also what measures ``kvstore.Client`` itself
and what loads key ranges exactly before read runs.  The Python generators speak through the
client's own transport (``kvstore.client.AiohttpTransport``: one pooled session, each request
sent once, a failure typed ``NotSent`` -- never sent -- or ``Lost`` -- it may have landed), the
``client`` generator through the whole ``kvstore.Client``.

Every load loop here is bounded twice: by an operation count and by a time limit, whichever
comes first.  wrk only knows ``-d``; ``bench.lua`` adds the count bound by sending SIGINT to
wrk itself, which then prints its results with the true elapsed time.

Rates: ``rate=None`` is a closed loop (saturation: each connection sends its next request as
soon as the previous one is answered).  ``rate=R`` paces requests on an absolute schedule
(wrk2-style, which stock wrk lacks).  With wrk the pacing is per thread and latency is measured
from the actual send, so a stall that delays sends is under-reported (coordinated omission);
the Python open-loop generator measures from the *scheduled* time and does not have that bias.

Figures are per run: ``LoadResult.ops_per_s`` counts only successful (2xx/3xx) replies, and
every non-2xx status is kept in ``statuses`` so that errors are printed, never hidden.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlparse

from kvstore.client import AiohttpTransport, ClientTransport, Lost, NotSent
from kvstore.contract import FAIL, INFO, OK, answer_outcome

LUA_SCRIPT = Path(__file__).with_name("bench.lua")
REPO_ROOT = Path(__file__).resolve().parents[1]

Target = Literal["kvstore", "etcd"]
Op = Literal["put", "get"]
Generator = Literal["auto", "wrk", "python", "client"]


# --- results -------------------------------------------------------------------------------


@dataclass
class LoadSpec:
    """One load run: what to send, where, and its two bounds (count and time)."""

    urls: list[str]
    op: Op = "put"
    target: Target = "kvstore"
    query: str = ""
    value_size: int = 100
    prefix: str = "bench-"
    keys: int = 0  # get: keys are prefix0 .. prefix{keys-1}
    count: int = 1_000_000  # total operations (the count bound)
    duration_s: float = 5.0  # the time bound
    connections: int = 64
    rate: float | None = None  # total requests/s; None = closed loop (saturation)
    threads: int | None = None  # wrk threads; default: one per URL (at least 2)


def is_ok(status: int | str, op: str) -> bool:
    """Whether an answer counts as a completed operation (kvstore.contract: 2xx; a read's 300/404 too)."""
    return answer_outcome(int(status), None, read=op == "get") == OK


def count_ok(statuses: dict[str, int], op: str) -> int:
    return sum(n for code, n in statuses.items() if is_ok(code, op))


@dataclass
class LoadResult:
    generator: str
    requests: int
    ok: int
    duration_s: float
    latency_ms: dict[str, float]
    statuses: dict[str, int] = field(default_factory=dict)
    transport_errors: int = 0
    offered_rate: float | None = None
    op: str = "put"

    @property
    def ops_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        bad = sum(n for code, n in self.statuses.items() if not is_ok(code, self.op))
        return bad + self.transport_errors

    def p(self, name: str) -> float:
        return self.latency_ms.get(name, float("nan"))

    def error_text(self) -> str:
        if not self.errors:
            return ""
        parts = [f"{code}x{n}" for code, n in sorted(self.statuses.items()) if not is_ok(code, self.op)]
        if self.transport_errors:
            parts.append(f"socket/timeout x{self.transport_errors}")
        return "errors: " + ", ".join(parts)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadResult:
        return cls(
            generator=str(data["generator"]), requests=int(data["requests"]), ok=int(data["ok"]),
            duration_s=float(data["duration_s"]), latency_ms={k: float(v) for k, v in data["latency_ms"].items()},
            statuses={str(k): int(v) for k, v in data.get("statuses", {}).items()},
            transport_errors=int(data.get("transport_errors", 0)), offered_rate=data.get("offered_rate"),
            op=str(data.get("op", "put")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "generator": self.generator, "requests": self.requests, "ok": self.ok,
            "duration_s": round(self.duration_s, 3), "ops_per_s": round(self.ops_per_s, 1),
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "statuses": self.statuses, "transport_errors": self.transport_errors,
            "offered_rate": self.offered_rate, "op": self.op,
        }


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {k: float("nan") for k in ("mean", "p50", "p90", "p99", "p999", "max")}
    xs = sorted(latencies_s)

    def q(frac: float) -> float:
        return xs[min(len(xs) - 1, max(0, math.ceil(frac * len(xs)) - 1))] * 1000.0

    return {
        "mean": sum(xs) / len(xs) * 1000.0, "p50": q(0.50), "p90": q(0.90), "p99": q(0.99),
        "p999": q(0.999), "max": xs[-1] * 1000.0,
    }


# --- tools and machine ---------------------------------------------------------------------


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def apt_install(packages: list[str]) -> bool:
    """``apt-get install`` when running as root (the benchmark's own set-up); False otherwise."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", *packages], env=env, check=True, capture_output=True, timeout=600
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        warn(f"apt-get install {' '.join(packages)} failed: {exc}")
        return False
    return True


def ensure_tool(binary: str, packages: list[str], install: bool = True) -> str | None:
    path = shutil.which(binary)
    if path is None and install and apt_install(packages):
        path = shutil.which(binary)
    return path


def ensure_wrk(install: bool = True) -> str | None:
    return ensure_tool("wrk", ["wrk"], install)


def git_commit() -> str:
    """The commit measured: ``git rev-parse`` here, or ``KVSTORE_BENCH_COMMIT`` for a snapshot.

    A ``git archive`` snapshot (the way to measure a commit while others edit the working
    tree) has no ``.git``; whoever made it says which commit it is.
    """
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("KVSTORE_BENCH_COMMIT") or "unknown (not a git checkout)"


def source_state() -> str:
    """Where ``kvstore`` is imported from and whether that tree has uncommitted changes.

    Other engineers edit the shared working tree while benchmarks run; a figure is only
    attributable to a commit if the code measured was that commit (e.g. a ``git archive``
    snapshot on ``PYTHONPATH``), so the report says which it was.
    """
    import kvstore

    src = Path(kvstore.__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "kvstore"],
            cwd=src, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return f"{src} (git status unknown)"
    if out.returncode != 0:
        return f"{src} (not a git checkout: a snapshot)"
    dirty = [line[3:] for line in out.stdout.splitlines() if line.strip()]
    return f"{src} (uncommitted changes: {', '.join(dirty)})" if dirty else f"{src} (clean)"


def loadavg() -> str:
    """1/5/15-minute load averages: on a shared machine, the context every figure needs."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk = shutil.which("wrk")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk or "not installed",
        "kvstore_source": source_state(),
        "loadavg": loadavg(),
    }


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS from /proc/PID/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU time used so far by these processes (all their threads), from /proc.

    CPU per operation is the figure that survives a shared machine: throughput moves with
    whatever else runs, but the CPU a node spends on a request hardly does.
    """
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        total += (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    return total


@contextlib.contextmanager
def env_var(name: str, value: str | None) -> Iterator[None]:
    """Set (or unset) one environment variable for the block and restore it after."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def port_of(url: str) -> int:
    port = urlparse(url).port
    assert port is not None, url
    return port


# --- wrk -----------------------------------------------------------------------------------


def run_wrk(spec: LoadSpec, stop: Literal["first", "all"] = "first") -> LoadResult:
    """Run wrk with bench.lua; the process is stopped by PID if anything goes wrong."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed")
    threads = spec.threads or max(2, len(spec.urls))
    connections = max(threads, threads * math.ceil(spec.connections / threads))
    per_thread_count = max(1, math.ceil(spec.count / threads))
    rate_per_thread = (spec.rate / threads) if spec.rate else 0.0
    env = {
        **os.environ,
        "KVB_TARGET": spec.target, "KVB_OP": spec.op, "KVB_QUERY": spec.query,
        "KVB_PORTS": ",".join(str(port_of(u)) for u in spec.urls),
        "KVB_SIZE": str(spec.value_size), "KVB_PREFIX": spec.prefix, "KVB_KEYS": str(max(1, spec.keys)),
        "KVB_COUNT": str(per_thread_count), "KVB_RATE": f"{rate_per_thread:.3f}", "KVB_THREADS": str(threads),
        "KVB_STOP": stop,
    }
    seconds = max(1, math.ceil(spec.duration_s))
    cmd = [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(LUA_SCRIPT),
        spec.urls[0],
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + 30)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise
    line = next((ln for ln in out.splitlines() if ln.startswith("KVB_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (exit {proc.returncode}): {err.strip() or out.strip()}")
    data = json.loads(line[len("KVB_RESULT ") :])
    statuses = {str(k): int(v) for k, v in data["statuses"].items()}
    ok = count_ok(statuses, spec.op)
    e = data["errors"]
    lat = {k: float(v) / 1000.0 for k, v in data["latency_us"].items()}
    return LoadResult(
        generator="wrk", requests=int(data["requests"]), ok=ok, duration_s=int(data["duration_us"]) / 1e6,
        latency_ms=lat, statuses=statuses,
        transport_errors=int(e["connect"]) + int(e["read"]) + int(e["write"]) + int(e["timeout"]),
        offered_rate=spec.rate, op=spec.op,
    )


# --- Python generators -----------------------------------------------------------------------


def kv_path(key: str, query: str) -> str:
    return f"/kv/{key}" + (f"?{query}" if query else "")


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


RequestFn = Callable[[int, int], Awaitable[int]]  # (worker, sequence) -> HTTP status


_JSON = {"Content-Type": "application/json"}
_NO_HEADERS: dict[str, str] = {}


def _transport_request_fn(transport: ClientTransport, spec: LoadSpec, timeout_s: float) -> RequestFn:
    """Raw requests (any status is returned, never raised) through the client's transport."""
    value = b"v" * spec.value_size
    value_b64 = b64(value)
    urls = spec.urls
    import random

    rng = random.Random(1)
    connect_s = min(1.0, timeout_s)

    def key_for(seq: int) -> str:
        return f"{spec.prefix}{seq}" if spec.op == "put" else f"{spec.prefix}{rng.randrange(max(1, spec.keys))}"

    async def kv(worker: int, seq: int) -> int:
        url = urls[seq % len(urls)] + kv_path(key_for(seq), spec.query)
        if spec.op == "put":
            status, _, _ = await transport.request("PUT", url, _NO_HEADERS, value, timeout_s, connect_s)
        else:
            status, _, _ = await transport.request("GET", url, _NO_HEADERS, None, timeout_s, connect_s)
        return status

    async def etcd(worker: int, seq: int) -> int:
        base = urls[seq % len(urls)]
        key = b64(key_for(seq))
        if spec.op == "put":
            body: dict[str, str] = {"key": key, "value": value_b64}
            path = "/v3/kv/put"
        else:
            body, path = {"key": key}, "/v3/kv/range"
        status, _, _ = await transport.request("POST", base + path, _JSON, json.dumps(body).encode(), timeout_s,
                                               connect_s)
        return status

    return etcd if spec.target == "etcd" else kv


def _client_request_fn(client: Any, spec: LoadSpec) -> RequestFn:
    """Requests through ``kvstore.Client`` (the ``client`` generator): statuses are synthesized."""
    from kvstore.client import KVError

    params = dict(parse_qsl(spec.query))
    kwargs: dict[str, Any] = {}
    if "consistency" in params:
        kwargs["consistency"] = params["consistency"]
    if "sloppy" in params:
        kwargs["sloppy"] = params["sloppy"].lower() in ("1", "true", "yes")
    quorum_name = "w" if spec.op == "put" else "r"
    if quorum_name in params:
        kwargs[quorum_name] = int(params[quorum_name])
    value = b"v" * spec.value_size
    import random

    rng = random.Random(1)

    async def call(worker: int, seq: int) -> int:
        try:
            if spec.op == "put":
                await client.put(f"{spec.prefix}{seq}", value, **kwargs)
                return 204
            result = await client.get(f"{spec.prefix}{rng.randrange(max(1, spec.keys))}", **kwargs)
            return 200 if result.found else 404
        except KVError as exc:
            return int(getattr(exc, "status", None) or 599)

    return call


async def _drive(fn: RequestFn, spec: LoadSpec, name: str) -> LoadResult:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    transport_errors = 0
    issued = 0
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution: too coarse here
    started = clock()
    deadline = started + spec.duration_s

    async def one(worker: int, seq: int, t0: float) -> None:
        nonlocal transport_errors
        try:
            status = await fn(worker, seq)
        except (NotSent, Lost):
            transport_errors += 1
            return
        latencies.append(clock() - t0)
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    if spec.rate is None:

        async def worker(w: int) -> None:
            nonlocal issued
            while issued < spec.count and clock() < deadline:
                seq = issued
                issued += 1
                await one(w, seq, clock())

        await asyncio.gather(*(worker(w) for w in range(spec.connections)))
    else:
        # Open loop: request i is due at started + i/rate; latency counts from that due time, so a
        # stall shows up in the percentiles.  In-flight requests are capped so an overloaded
        # target cannot make this process grow without bound.
        interval = 1.0 / spec.rate
        cap = asyncio.Semaphore(max(spec.connections * 4, 64))
        tasks: set[asyncio.Task[None]] = set()

        async def paced(seq: int, due: float) -> None:
            async with cap:
                await one(0, seq, due)

        while issued < spec.count:
            due = started + issued * interval
            if due >= deadline:
                break
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(paced(issued, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            issued += 1
        if tasks:
            await asyncio.wait(tasks, timeout=max(1.0, spec.duration_s))
            for t in tasks:
                t.cancel()
    elapsed = clock() - started
    return LoadResult(
        generator=name, requests=issued, ok=count_ok(statuses, spec.op), duration_s=elapsed,
        latency_ms=percentiles_ms(latencies), statuses=statuses, transport_errors=transport_errors,
        offered_rate=spec.rate, op=spec.op,
    )


async def run_python_async(spec: LoadSpec) -> LoadResult:
    """The Python generator (fallback for wrk; costs far more CPU per request)."""
    transport = AiohttpTransport(max_connections=spec.connections)
    try:
        return await _drive(_transport_request_fn(transport, spec, 5.0), spec, "python")
    finally:
        await transport.close()


async def run_client_async(spec: LoadSpec) -> LoadResult:
    """Load through ``kvstore.Client`` itself: measures the client library, not only the nodes."""
    from kvstore.client import Client

    async with Client(spec.urls, max_connections=spec.connections, timeout_s=5.0) as client:
        return await _drive(_client_request_fn(client, spec), spec, "kvstore.Client")


def _run_async(coro: Awaitable[LoadResult]) -> LoadResult:
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(coro)  # type: ignore[no-any-return, arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


_warned_fallback = False


def run_load(spec: LoadSpec, generator: Generator = "auto") -> LoadResult:
    """Run one bounded load with the chosen generator (``auto``: wrk if installed, else Python)."""
    global _warned_fallback
    if generator == "client":
        return _run_async(run_client_async(spec))
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
        if generator == "python" and not _warned_fallback:
            _warned_fallback = True
            warn(
                "wrk is not installed: falling back to the Python aiohttp load generator. It competes with the "
                "nodes for CPU, so its figures UNDERSTATE the store; install wrk (apt-get install wrk)."
            )
    if generator == "wrk":
        return run_wrk(spec)
    return _run_async(run_python_async(spec))


# --- one request from synchronous code ----------------------------------------------------------


def http_call(
    url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, bytes]:
    """One request (a probe, an admin call) from synchronous benchmark code, through the client's
    transport (sent once, never re-sent); ``(599, reason)`` when no answer came.  Not for load: each
    call runs its own short event loop and connection."""

    async def send() -> tuple[int, bytes]:
        transport = AiohttpTransport(max_connections=1)
        try:
            status, _, raw = await transport.request(method, url.rstrip("/") + path, headers or {}, body, timeout_s,
                                                     min(1.0, timeout_s))
            return status, raw
        finally:
            await transport.close()

    try:
        return asyncio.run(send())
    except (NotSent, Lost) as exc:
        return 599, str(exc).encode()


# --- loading key ranges ----------------------------------------------------------------------


async def _prepopulate(spec: LoadSpec) -> LoadResult:
    transport = AiohttpTransport(max_connections=spec.connections)
    try:
        fn = _transport_request_fn(transport, spec, 10.0)
        statuses: dict[str, int] = {}
        next_seq = 0
        started = time.monotonic()

        async def worker() -> None:
            nonlocal next_seq
            while next_seq < spec.count and time.monotonic() - started < spec.duration_s:
                seq = next_seq
                next_seq += 1
                # A key range must be complete: send the write again, but only after an answer that
                # proves the first copy was not applied (kvstore.contract); a copy that may have
                # landed is not re-sent (it would make siblings), and prepopulate() reports the gap.
                for _ in range(3):
                    try:
                        status = await fn(0, seq)
                        outcome = answer_outcome(status, None, read=False)
                    except NotSent:
                        status, outcome = 599, FAIL
                    except Lost:
                        status, outcome = 599, INFO
                    if outcome != FAIL:
                        break
                statuses[str(status)] = statuses.get(str(status), 0) + 1

        await asyncio.gather(*(worker() for _ in range(spec.connections)))
        return LoadResult("python", next_seq, count_ok(statuses, "put"), time.monotonic() - started, {}, statuses)
    finally:
        await transport.close()


def prepopulate(
    urls: list[str], prefix: str, keys: int, value_size: int, *, target: Target = "kvstore", query: str = "",
    time_limit_s: float = 60.0,
) -> LoadResult:
    """Write prefix0..prefix{keys-1} (every key, retried) so read runs never hit a missing key."""
    spec = LoadSpec(
        urls=urls, op="put", target=target, query=query, value_size=value_size, prefix=prefix, count=keys,
        duration_s=time_limit_s, connections=32,
    )
    result = _run_async(_prepopulate(spec))
    if result.ok < keys:
        warn(f"loading {prefix}*: only {result.ok}/{keys} keys written ({result.statuses})")
    return result
