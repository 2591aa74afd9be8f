"""Running a node as a process: wiring config, storage, transport, clock and HTTP.

Theory of operation
-------------------
``build_node`` is the single place where the real seams are chosen: sqlite (or
memory) storage, the multiplexed stream transport, the system clock, an rng seeded
from real entropy.  It hands them to ``kvstore.runtime.assembly.assemble_node``, which
builds the node with all its collaborators; tests and the simulator call
``assemble_node`` with other seams and get the same node.  The Paxos acceptor
state is always kept in sqlite with ``fsync=always`` when the node has a data
directory: a promise forgotten by a restart would break linearizability, so it
is never held in memory only.

Admin routes added here (all need the cluster secret) let the chaos harness
change a running node: ``/admin/faults`` (per-link drop/delay/loss rules),
``/admin/storage-faults`` (a full disk, a slow fsync, failing I/O: the node's
stores are wrapped in ``FaultyStorage``, which costs nothing while no fault is
set) and ``/admin/clock`` (skew the wall clock, which moves LWW timestamps).

Once serving, a node process tunes Python's cyclic garbage collector (``tune_gc``): what
start-up made is frozen out of every collection, and the youngest generation is collected
after ``GC_GEN0_THRESHOLD`` net allocations instead of 700.  Measured under load (issue 15):
with the defaults, collections took 2-5% of a node's CPU and an occasional full collection
paused the event loop for 30+ ms of CPU, which every request in flight waits out; tuned, there
were none in the same runs.  Reference counting still frees every acyclic object at once; only
garbage cycles wait a little longer.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from kvstore import config as config_mod
from kvstore import lifeline, tls
from kvstore.clock import SystemClock
from kvstore.config import NodeConfig
from kvstore.errors import BadRequest, NodeError
from kvstore.runtime.assembly import NodeSeams, assemble_node
from kvstore.runtime.node import Node
from kvstore.server import http_front, http_guard
from kvstore.server.api import (
    KV_API_KEY,
    NODE_KEY,
    admin_json,
    build_app,
    refuse_unknown_fields,
    require_secret,
    start_runner,
)
from kvstore.server.membership_api import membership_routes
from kvstore.storage import open_storage
from kvstore.storage.faulty import DiskFaults, FaultSettings, FaultyStorage
from kvstore.transport.base import LinkRule
from kvstore.transport.http import HttpTransport
from kvstore.transport.stream import StreamTransport

log = logging.getLogger("kvstore.server.app")


TRANSPORTS = ("stream", "http")


def chosen_transport(cfg: NodeConfig, env_value: str | None) -> str:
    """The transport ``KVSTORE_TRANSPORT`` names (unset or empty: stream), or ``ConfigError``.

    Refused rather than run: a misspelt name (it would silently measure the stream transport as
    the baseline) and ``http`` with TLS (the baseline has no TLS client and dials plain http: its
    peers would never answer, and the acceptors would wait forever to vote)."""
    name = env_value or "stream"
    if name not in TRANSPORTS:
        raise config_mod.ConfigError("KVSTORE_TRANSPORT", f"{name!r} is not one of {', '.join(TRANSPORTS)}")
    if name == "http" and cfg.tls.enabled:
        raise config_mod.ConfigError(
            "KVSTORE_TRANSPORT", "the http baseline transport has no TLS: run it without [tls] (or use stream)"
        )
    return name


def build_node(cfg: NodeConfig) -> Node:
    node_dir = Path(cfg.data_dir) / cfg.node_id
    node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # holds the data; only the owner may enter
    engine = cfg.storage
    fsync: Any = cfg.fsync
    disk = DiskFaults()  # one disk: a full disk refuses all three stores
    data = FaultyStorage(open_storage(engine, str(node_dir / "data.db"), fsync, cfg.batch_window_ms), disk)
    hints = FaultyStorage(open_storage(engine, str(node_dir / "hints.db"), fsync, cfg.batch_window_ms), disk)
    paxos = FaultyStorage(open_storage("sqlite", str(node_dir / "paxos.db"), "always", cfg.batch_window_ms), disk)
    peers = {m.id: (m.host, m.peer_port) for m in cfg.members if m.id != cfg.node_id}
    transport: Any
    if chosen_transport(cfg, os.environ.get("KVSTORE_TRANSPORT")) == "http":  # the benchmark's baseline only
        peer_urls = {m.id: m.url for m in cfg.members if m.id != cfg.node_id}
        transport = HttpTransport(cfg.node_id, cfg.secret, peer_urls)
    else:
        peer_server_ssl, peer_client_ssl = tls.peer_contexts(cfg.tls)
        transport = StreamTransport(
            cfg.node_id,
            cfg.secret,
            peers,
            (cfg.bind, cfg.me.peer_port),
            hello_timeout_s=cfg.limits.peer_hello_timeout_ms / 1000.0,
            max_unauthenticated=cfg.limits.max_unauthenticated_peer_connections,
            server_ssl=peer_server_ssl,
            client_ssl=peer_client_ssl,
        )
    # The node's rng drives jitter and backoff, and draws the incarnations that keep its dots and
    # its acceptor votes unique across disk losses (kvstore.runtime.identity): it must never repeat a
    # stream across starts, so it is seeded from real entropy (a PID is reused; a seed is chosen
    # by a simulator only).
    rng = random.Random(int.from_bytes(os.urandom(16), "big"))
    seams = NodeSeams(transport=transport, data=data, hints=hints, paxos=paxos, clock=SystemClock(), rng=rng)
    return assemble_node(cfg, seams)


RULE_FLAGS = ("drop_out", "drop_in")
RULE_NUMBERS = ("delay_ms", "jitter_ms", "loss")


def _rule_from_json(peer: str, raw: Any) -> LinkRule:
    """One link rule, strictly typed: a misspelt field (``dorp_in``) or a string where a
    boolean belongs would otherwise install a different fault than the operator asked for."""
    if not isinstance(raw, dict):
        raise BadRequest("invalid_body", f"the rule for {peer!r} must be an object")
    refuse_unknown_fields(raw, RULE_FLAGS + RULE_NUMBERS, f"the rule for {peer!r}")
    for name in RULE_FLAGS:
        if name in raw and not isinstance(raw[name], bool):
            raise BadRequest("invalid_body", f"{name} (rule for {peer!r}) must be true or false")
    for name in RULE_NUMBERS:
        value = raw.get(name, 0.0)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise BadRequest("invalid_body", f"{name} (rule for {peer!r}) must be a finite number")
    rule = LinkRule(
        drop_out=raw.get("drop_out", False),
        drop_in=raw.get("drop_in", False),
        delay_ms=float(raw.get("delay_ms", 0.0)),
        jitter_ms=float(raw.get("jitter_ms", 0.0)),
        loss=float(raw.get("loss", 0.0)),
    )
    if not 0.0 <= rule.loss <= 1.0 or rule.delay_ms < 0 or rule.jitter_ms < 0:
        raise BadRequest("invalid_body", "loss must be in [0,1], delays non-negative")
    return rule


async def faults_get(request: web.Request) -> web.Response:
    require_secret(request)
    node = request.app[NODE_KEY]
    return web.json_response({"rules": node.transport.faults.to_json()})


async def faults_put(request: web.Request) -> web.Response:
    """Replace this node's link rules: {"rules": {peer: {drop_out, drop_in, delay_ms, jitter_ms, loss}}}."""
    data = await admin_json(request)
    refuse_unknown_fields(data, ("rules",), "the body")
    node = request.app[NODE_KEY]
    rules = data.get("rules", {})
    if not isinstance(rules, dict):
        raise BadRequest("invalid_body", "rules must be an object keyed by peer id")
    parsed = {}
    for peer, raw in rules.items():
        if peer not in node.config.members or peer == node.node_id:  # the membership in force
            raise BadRequest("invalid_body", f"{peer!r} is not a peer of {node.node_id}")
        parsed[peer] = _rule_from_json(peer, raw)
    node.transport.faults.clear()
    for peer, rule in parsed.items():
        node.transport.faults.set_rule(peer, rule)
    return web.json_response({"rules": node.transport.faults.to_json()})


async def faults_delete(request: web.Request) -> web.Response:
    require_secret(request)
    request.app[NODE_KEY].transport.faults.clear()
    return web.json_response({"rules": {}})


class NoFaultLayer(NodeError):
    status = 501
    code = "not_implemented"


def _disk_faults(request: web.Request) -> DiskFaults:
    data = request.app[NODE_KEY].data_engine
    if not isinstance(data, FaultyStorage):
        raise NoFaultLayer("this node's storage has no fault layer")
    return data.faults


async def storage_faults_get(request: web.Request) -> web.Response:
    require_secret(request)
    return web.json_response(_disk_faults(request).to_json())


async def storage_faults_put(request: web.Request) -> web.Response:
    """Set this node's disk faults: {disk_full, fsync_delay_ms, read_delay_ms, write_error_rate,
    read_error_rate, seed}; omitted fields are off; unknown fields are refused."""
    data = await admin_json(request)
    disk = _disk_faults(request)
    try:
        settings = FaultSettings.from_json(data)
    except (TypeError, ValueError) as exc:
        raise BadRequest("invalid_body", str(exc)) from None
    disk.configure(settings)
    log.warning("storage faults set: %s", settings)
    return web.json_response(disk.to_json())


async def storage_faults_delete(request: web.Request) -> web.Response:
    require_secret(request)
    disk = _disk_faults(request)
    disk.clear()
    return web.json_response(disk.to_json())


async def clock_post(request: web.Request) -> web.Response:
    """Skew this node's wall clock: {"skew_ms": int} (0 heals)."""
    data = await admin_json(request)
    refuse_unknown_fields(data, ("skew_ms",), "the body")
    node = request.app[NODE_KEY]
    skew_ms = data.get("skew_ms")
    if (not isinstance(skew_ms, int | float) or isinstance(skew_ms, bool) or not math.isfinite(skew_ms)
            or abs(skew_ms) > 10 * 365 * 86_400_000):
        raise BadRequest("invalid_body", "skew_ms must be a number of milliseconds")
    assert isinstance(node.clock, SystemClock)
    node.clock.skew_ns = int(skew_ms * 1_000_000)
    return web.json_response({"skew_ms": node.clock.skew_ns / 1e6})


def admin_routes() -> list[web.RouteDef]:
    return [
        web.get("/admin/faults", faults_get),
        web.put("/admin/faults", faults_put),
        web.delete("/admin/faults", faults_delete),
        web.get("/admin/storage-faults", storage_faults_get),
        web.put("/admin/storage-faults", storage_faults_put),
        web.delete("/admin/storage-faults", storage_faults_delete),
        web.post("/admin/clock", clock_post),
        *membership_routes(),
    ]


def warn_if_few_file_descriptors(cfg: NodeConfig) -> None:
    """The connection caps only protect the node if the process may open that many files."""
    try:
        import resource

        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return
    # HTTP clients and refusals lingering, unauthenticated and member peer links both ways,
    # and a margin for storage files, logs and outgoing HTTP.
    needed = (
        cfg.limits.max_http_connections
        + http_guard.MAX_LINGERING
        + cfg.limits.max_unauthenticated_peer_connections
        + 4 * len(cfg.members)
        + 64
    )
    if soft_limit != resource.RLIM_INFINITY and soft_limit < needed:
        log.warning(
            "the open-file limit (%d) is below what limits.max_http_connections = %d may need (%d): "
            "lower it or raise the limit (ulimit -n)",
            soft_limit,
            cfg.limits.max_http_connections,
            needed,
        )


GC_GEN0_THRESHOLD = 10_000  # net container allocations between young collections (Python's default: 700)


def tune_gc() -> None:
    """Freeze what start-up made (modules, config, the app) out of all later collections, and
    collect the young generation less often (see the module docstring)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


async def serve(cfg: NodeConfig, stop: asyncio.Event) -> None:
    node = build_node(cfg)
    app = build_app(node, admin_routes())
    guard = http_guard.ConnectionGuard(
        cfg.limits.max_http_connections, cfg.limits.http_header_timeout_ms / 1000.0, node.metrics
    )
    app.middlewares.insert(0, guard.middleware())  # outermost: it sees each request's start and end
    warn_if_few_file_descriptors(cfg)
    runner = await start_runner(app, keepalive_timeout=cfg.limits.http_idle_timeout_ms / 1000.0)
    await node.start()
    front: http_front.FrontEnd | None = None
    listener: asyncio.Server | None = None
    ssl_context = tls.http_server_context(cfg.tls)
    if cfg.server.front_end == "httptools":  # /kv/* parsed by httptools, the rest forwarded to the app
        assert runner.server is not None
        front = http_front.FrontEnd(app[KV_API_KEY], runner.server, guard, cfg.limits)
        listener = await asyncio.get_running_loop().create_server(
            front.protocol_factory(), cfg.bind, cfg.me.http_port, reuse_address=True, ssl=ssl_context
        )
    else:
        site = http_guard.GuardedSite(runner, guard, cfg.bind, cfg.me.http_port, reuse_address=True,
                                      ssl_context=ssl_context)
        await site.start()
    tune_gc()
    log.info("node %s serving %s://%s:%d (peer port %d%s, front end %s)", cfg.node_id, cfg.scheme, cfg.bind,
             cfg.me.http_port, cfg.me.peer_port, ", mutual TLS" if cfg.tls.enabled and cfg.tls.peer else "",
             cfg.server.front_end)
    try:
        await stop.wait()
    finally:
        log.info("node %s stopping", cfg.node_id)
        if listener is not None and front is not None:
            listener.close()
            front.close()
        await runner.cleanup()
        await node.stop()


def run_node(config_path: str) -> int:
    try:
        cfg = config_mod.load(config_path)
        tls.http_server_context(cfg.tls)  # certificate files are checked now, not at the first connection
        tls.peer_contexts(cfg.tls)
        chosen_transport(cfg, os.environ.get("KVSTORE_TRANSPORT"))
    except config_mod.ConfigError as exc:
        print(f"kvstore node: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=os.environ.get("KVSTORE_LOG", "INFO"),
        format=f"%(asctime)s {cfg.node_id} %(levelname)s %(name)s: %(message)s",
    )
    lifeline.exit_with_parent_from_env()  # started by a harness that may be killed: exit with it
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is a dependency, but a node still runs without it
        log.warning("uvloop not available; using the default event loop")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"kvstore node {cfg.node_id}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # ``python -m kvstore.server.app --config node.toml`` (what LocalCluster runs)
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvstore.server.app", description="Run one kvstore node.")
    parser.add_argument("--config", required=True, help="the node's TOML config")
    sys.exit(run_node(parser.parse_args().config))
